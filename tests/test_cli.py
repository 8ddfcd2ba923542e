"""Bad flags and inputs: one line naming the flag or file and the fix, exit code 2, no traceback."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import (
    ENTRYPOINT,
    REPO,
    base_flags,
    free_port,
    held_port,
    make_chat_data,
    make_model,
    run_forked,
    run_ranks,
    run_torchrun,
    wait_ranks,
)

pytestmark = pytest.mark.e2e  # every test here starts the entrypoint (the flag cases: tests/test_flags.py)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return root, make_model(root / "model", hidden=32, layers=4, heads=4), make_chat_data(root / "chat.jsonl")


def run_single(flags, timeout=120, env=None, fresh=False):
    """One process, no torchrun: pp = dp = 1 needs no --rank (a free port: the default 7033 may be taken). Forked
    from the imports done once (run_forked), or with `fresh` a new interpreter, imports and all."""
    if "--dist-url" not in flags:
        flags = [*flags, "--dist-url", f"tcp://127.0.0.1:{free_port()}"]
    if not fresh:
        return run_forked(flags, env=env, timeout=timeout)
    return subprocess.run(
        [sys.executable, ENTRYPOINT, *flags], capture_output=True, text=True, timeout=timeout, env=env
    )


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def assert_ranks_stop_on_user_error(ranks, *fragments):
    """Per rank (wait_ranks' results), one process per rank as the shell scripts start them: a rank that found the
    user error exits 2 with it, one line; a rank stopped because another failed first exits 1 and names that
    failure. Ranks that check the same input may both find it, or one may stop on the other's report first."""
    found = 0
    for rank, (code, _, stderr) in enumerate(ranks):
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert "Traceback" not in stderr, stderr[-2000:]
        stopped = [line for line in errors if line.startswith(f"error: [rank {rank}] stopping: rank ")]
        if stopped:
            assert code == 1, (rank, code, stderr[-2000:])
            line = stopped[0]
        else:
            assert code == 2 and len(errors) == 1, (rank, code, stderr[-2000:])
            line = errors[0]
            found += 1
        for fragment in fragments:
            assert fragment in line, line
    assert found, [stderr[-2000:] for _, _, stderr in ranks]


def test_a_bad_flag_in_a_real_process_is_one_line(setup, tmp_path):
    """The flag cases themselves run in-process (tests/test_flags.py); this one proves the process's own output,
    from a fresh interpreter (what its imports print included)."""
    _, model_dir, data = setup
    flags = base_flags(model_dir, data, str(tmp_path / "ck"), **{"batch-size": 3, "micro-batch-size": 2})
    result = run_single(flags, fresh=True)
    assert_one_line_error(result, "--batch-size 3", "--micro-batch-size 2")


def test_tokenizer_dir_without_tokenizer_files(setup, tmp_path):
    _, model_dir, data = setup
    empty = tmp_path / "no-tokenizer"
    empty.mkdir()
    result = run_single(base_flags(model_dir, data, str(tmp_path / "ck"), **{"tokenizer-name": str(empty)}))
    assert_one_line_error(result, f"--tokenizer-name {empty}", "tokenizer.json")


def test_tokenizer_larger_than_the_model_vocabulary(setup, tmp_path):
    _, _, data = setup
    small = make_model(tmp_path / "small-vocab", hidden=32, layers=2, heads=4, extra=("--vocab-size", "1000"))
    result = run_single(base_flags(small, data, str(tmp_path / "ck")))
    assert_one_line_error(result, "50257 tokens", "vocabulary has 1000")


def test_broken_tokenizer_file_names_the_flag(setup, tmp_path):
    _, model_dir, data = setup
    broken = tmp_path / "broken-tokenizer"
    broken.mkdir()
    (broken / "tokenizer.json").write_text('{"version": "1.0", truncated')
    result = run_single(base_flags(model_dir, data, str(tmp_path / "ck"), **{"tokenizer-name": str(broken)}))
    assert_one_line_error(result, f"--tokenizer-name {broken}: cannot load the tokenizer")


def test_wandb_without_a_key_says_how_to_log_in(setup, tmp_path):
    pytest.importorskip("wandb")
    _, model_dir, data = setup
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="online", WANDB_DIR=str(tmp_path), HOME=str(tmp_path))  # no ~/.netrc key either
    result = run_single(base_flags(model_dir, data, str(tmp_path / "ck"), **{"train-log-backend": "wandb"}), env=env)
    assert_one_line_error(result, "--train-log-backend wandb", "WANDB_MODE=offline")


def test_data_without_a_token_to_learn_stops_at_the_first_step(setup, tmp_path):
    """Chat records with no assistant turn mask every label: loss 0 and no update would be a silent no-op run."""
    _, model_dir, _ = setup
    data = tmp_path / "users-only.jsonl"
    data.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": f"question {i} about rivers"}]}) + "\n"
            for i in range(40)
        )
    )
    result = run_single(base_flags(model_dir, str(data), str(tmp_path / "ck")))
    assert_one_line_error(result, "hold no token to learn", "--train-on-inputs")
    assert "step 1 " not in result.stdout


# Found once the model config or data is read (inside the process group).
RUNTIME_ERRORS = [
    ({"num-layers": 3}, ["--num-layers 3", "--num-layers 4"]),
    ({"model-type": "llama"}, ["llama", "gptneox"]),
    ({"embedding-dim": 64}, ["--embedding-dim 64", "32"]),
    ({"task-name": "/nonexistent/data.jsonl"}, ["/nonexistent/data.jsonl"]),
    (
        {"evaluation-steps": 2, "evaluation-data": "/nonexistent/eval.jsonl"},
        ["--evaluation-data entry 1", "/nonexistent/eval.jsonl"],
    ),
]


@pytest.mark.parametrize("overrides,fragments", RUNTIME_ERRORS, ids=[str(i) for i in range(len(RUNTIME_ERRORS))])
def test_bad_model_or_data_exit_2(setup, tmp_path, overrides, fragments):
    _, model_dir, data = setup
    result = run_single(base_flags(model_dir, data, str(tmp_path / "ck"), **overrides))
    assert_one_line_error(result, *fragments)
    assert "step 1 " not in result.stdout  # before the first step, not at the first evaluation


def test_port_in_use_names_the_port_and_the_flag(setup, tmp_path):
    """Rank 0 of two cannot listen (a one-process run takes no port: tests/test_launcher.py)."""
    _, model_dir, data = setup
    ranks = {"pipeline-group-size": 2, "world-size": 2, "rank": 0}
    with held_port() as port:
        result = run_single(
            base_flags(model_dir, data, str(tmp_path / "ck"), **ranks, **{"dist-url": f"tcp://127.0.0.1:{port}"})
        )
    assert_one_line_error(result, str(port), "in use", "--dist-url")


def test_rank_without_rank_0_says_so_after_the_timeout(setup, tmp_path):
    _, model_dir, data = setup
    port = free_port()  # nothing listens there: rank 0 never started
    result = run_single(
        base_flags(
            model_dir,
            data,
            str(tmp_path / "ck"),
            **{
                "pipeline-group-size": 2,
                "world-size": 2,
                "rank": 1,
                "dist-timeout": 5,
                "dist-url": f"tcp://127.0.0.1:{port}",
            },
        )
    )
    assert_one_line_error(result, "rank 1", str(port), "--dist-timeout 5")


def test_rank_facing_a_foreign_listener_exits_after_the_timeout(setup, tmp_path):
    """Something that is not rank 0's store holds the port (another job, after rank 0 failed on it): rank 1's
    connection is accepted and never answered. It must still exit, with one line, soon after --dist-timeout."""
    _, model_dir, data = setup
    with held_port() as port:
        result = run_single(
            base_flags(
                model_dir,
                data,
                str(tmp_path / "ck"),
                **{
                    "pipeline-group-size": 2,
                    "world-size": 2,
                    "rank": 1,
                    "dist-timeout": 5,
                    "dist-url": f"tcp://127.0.0.1:{port}",
                },
            ),
            timeout=60,
        )
    assert_one_line_error(result, "rank 1", str(port), "no rendezvous")


def test_rank_0_alone_says_the_others_did_not_join(setup, tmp_path):
    _, model_dir, data = setup
    result = run_single(
        base_flags(
            model_dir,
            data,
            str(tmp_path / "ck"),
            **{"pipeline-group-size": 2, "world-size": 2, "rank": 0, "dist-timeout": 5},
        )
    )
    assert_one_line_error(result, "rank 0", "2 ranks joined", "1/2")


def test_malformed_jsonl_names_file_and_line(setup, tmp_path):
    _, model_dir, _ = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "<human>: hi\\n<bot>: hello"}\n{"text": broken\n')
    result = run_single(base_flags(model_dir, str(bad), str(tmp_path / "ck")))
    assert_one_line_error(result, "bad.jsonl", "2")


def test_num_layers_is_checked_under_interleaved_1f1b(setup, tmp_path):
    """With virtual stages --num-layers counts a rank's layers; a wrong value is not silently ignored."""
    _, model_dir, data = setup
    flags = base_flags(
        model_dir,
        data,
        str(tmp_path / "ck"),
        **{"pipeline-group-size": 2, "pp-mode": "interleaved-1f1b", "num-layers": 3},
    )
    assert_ranks_stop_on_user_error(wait_ranks(run_ranks(2, flags), timeout=120), "--num-layers 3", "--num-layers 2")


def test_error_on_one_rank_stops_all_ranks(setup, tmp_path):
    """A 2-stage pipeline where only the last stage finds the data bad (it counts the loss tokens: chat records with
    no assistant turn leave none) still ends both ranks: one process per rank, no torchrun agent to stop the other.
    The last stage exits 2 with the user error; the first stage, stopped because of it, exits 1 and names it."""
    _, model_dir, _ = setup
    data = tmp_path / "users-only.jsonl"
    data.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": f"question {i} about rivers"}]}) + "\n"
            for i in range(40)
        )
    )
    flags = base_flags(model_dir, str(data), str(tmp_path / "ck"), **{"pipeline-group-size": 2})
    ranks = wait_ranks(run_ranks(2, flags), timeout=120)
    assert_ranks_stop_on_user_error(ranks, "hold no token to learn")
    assert [code for code, _, _ in ranks] == [1, 2], [stderr[-2000:] for _, _, stderr in ranks]
    assert "error: [rank 0] stopping: rank 1 failed:" in ranks[0][2], ranks[0][2][-2000:]


class StoreThatDies:
    """A rendezvous store that answers the watchdog's first heartbeat, then is gone (rank 0 exited)."""

    def __init__(self):
        self.calls = 0

    def set(self, *_):
        self.calls += 1
        if self.calls > 1:
            raise ConnectionResetError("Broken pipe")


@pytest.mark.parametrize("main_thread_reports", [True, False])
def test_lost_store_leaves_a_failing_rank_time_to_name_its_own_error(monkeypatch, main_thread_reports):
    """When rank 0 exits first (every rank stopping on one failed save), a rank's watchdog loses the store. It waits
    STORE_LOST_GRACE_S for the main thread, which prints its own error and exits (stop() stands for that here);
    only a rank with nothing to say gets the lost-store line."""
    import time

    from comm import watchdog

    exits = []
    monkeypatch.setattr(watchdog, "HEARTBEAT_S", 0.02)
    monkeypatch.setattr(watchdog, "STORE_LOST_GRACE_S", 0.3)
    monkeypatch.setattr(watchdog.dist.distributed_c10d, "_get_default_store", StoreThatDies)
    monkeypatch.setattr(watchdog.os, "_exit", exits.append)
    monkeypatch.setattr(watchdog, "error_line", exits.append)
    dog = watchdog.Watchdog(rank=1, world_size=2, timeout_s=60).start()
    time.sleep(0.15)  # the store is lost; the grace runs
    assert exits == []
    if main_thread_reports:
        dog.stop()
        dog.thread.join(2.0)
        assert exits == [] and not dog.thread.is_alive()
    else:
        deadline = time.monotonic() + 5
        while not exits and time.monotonic() < deadline:
            time.sleep(0.02)
        dog.stop()  # (os._exit is a stand-in here: the thread would go on)
        assert "lost the rendezvous store" in exits[0] and exits[1] == 1


# Runs the real entrypoint with the last stage's forward raising what CUDA raises when the card is full.
LAST_STAGE_OUT_OF_MEMORY = """
import runpy, sys, torch
sys.path.insert(0, {repo!r})
import modules.stage
forward = modules.stage.Stage.forward
def forward_out_of_memory(self, *args, **kwargs):
    if self.is_last:
        raise torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 16.00 MiB. GPU 1 has a total capacity of 79.18 GiB of which "
            "4.12 MiB is free. Including non-PyTorch memory, this process has 79.17 GiB memory in use.")
    return forward(self, *args, **kwargs)
modules.stage.Stage.forward = forward_out_of_memory
sys.argv[0] = {entrypoint!r}
runpy.run_path({entrypoint!r}, run_name="__main__")
"""


def test_out_of_memory_in_a_pipeline_stage_is_one_line_with_the_fixes(setup, tmp_path):
    """torch.distributed.pipelining wraps a stage's error in a multi-line RuntimeError; the user must still get
    one line that says out of memory, torch's figures, and which flags lower peak memory, on every rank."""
    _, model_dir, data = setup
    script = tmp_path / "oom_on_last_stage.py"
    script.write_text(LAST_STAGE_OUT_OF_MEMORY.format(repo=REPO, entrypoint=ENTRYPOINT))
    flags = base_flags(model_dir, data, str(tmp_path / "ck"), **{"pipeline-group-size": 2, "pp-mode": "gpipe"})
    result = run_torchrun(2, flags, timeout=120, script=str(script))
    output = result.stdout + result.stderr
    # torchrun's agent exits 1 whatever its workers' codes; its report gives each rank's own: out of memory is the
    # layout not fitting (2) on the rank that ran out, the rank stopped because of it exits 1
    assert result.returncode == 1, output[-3000:]
    codes = dict(re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\s+exitcode\s*: (-?\d+)", output))
    # rank 0 exits 1 on its own, unless torchrun's agent, seeing rank 1 gone, ends it first (SIGTERM, -15)
    assert codes["1"] == "2" and codes["0"] in ("1", "-15"), output[-3000:]
    failing = re.findall(r"error: \[rank 1\] (.*)", output)
    assert len(failing) == 1, output[-3000:]
    for fragment in [
        "out of GPU memory",
        "Tried to allocate 16.00 MiB",
        "4.12 MiB is free",
        "--pp-mode 1f1b",
        "--activation-checkpointing selective or full",
        "--optimizer 8bit-adam",
    ]:
        assert fragment in failing[0], failing[0]
    assert "Including non-PyTorch" not in failing[0]
    assert "failed to run forward" not in output
    assert not re.search(r"\[default\d\]:Traceback", output), output[-3000:]  # torchrun's own one may follow
    if codes["0"] == "1":
        assert re.search(r"error: \[rank 0\] stopping: rank 1 failed: out of GPU memory", output), output[-3000:]


def test_8bit_adam_without_bitsandbytes_says_how_to_install(setup, tmp_path):
    """bitsandbytes is hidden from this one process (installed or not) by a sitecustomize.py on its PYTHONPATH that
    marks it missing in sys.modules, as `import` and importlib.util.find_spec then report: no switch in the product.
    A fresh interpreter: a fork would not run the sitecustomize."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text('import sys\n\nsys.modules["bitsandbytes"] = None\n')
    path = os.pathsep.join(filter(None, [str(hide), os.environ.get("PYTHONPATH")]))
    _, model_dir, data = setup
    flags = base_flags(model_dir, data, str(tmp_path / "ck"), optimizer="8bit-adam")
    result = run_single(flags, env=dict(os.environ, PYTHONPATH=path), fresh=True)
    assert_one_line_error(result, "8bit-adam", "pip install bitsandbytes")


def test_nepochs_derives_total_steps_from_a_cached_token_count(setup, tmp_path):
    _, model_dir, _ = setup
    data = make_chat_data(tmp_path / "epochs.jsonl", n=60)
    flags = base_flags(model_dir, data, str(tmp_path / "ck"), **{"total-steps": None, "nepochs": 2})
    result = run_single(flags)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(li for li in result.stdout.splitlines() if "--nepochs 2:" in li)
    tokens = int(line.split(": ")[1].split(" tokens")[0])
    steps = int(line.split("-> ")[1].split(" optimizer")[0])
    assert steps == -(-2 * (tokens // 32) // 4)  # ceil(epochs x windows / sequences per step)
    assert os.path.exists(tmp_path / ".epochs.jsonl.token_count.json")
    assert open(tmp_path / "ck" / "latest").read().strip() == str(steps)

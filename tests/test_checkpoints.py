"""Checkpoints survive crashes: atomic saves, exact resume, resume under another layout, rotation, clear errors.

Every run is a real multi-process (or one-process) CPU/gloo run of the entrypoint. One uninterrupted pp=2 run is the
reference; the others are killed (SIGKILL of a rank, a crash inside the save window, a torchrun restart), damaged or
relaunched, and must end bit-identical to it (same layout) or equal within fp32 tolerance (another layout).
"""

import json
import os
import shutil
import signal
import time

import pytest
import torch

from tests.helpers import (
    base_flags,
    checkpoint_entries,
    damaged_files,
    make_chat_data,
    make_model,
    read_checkpoint_weights,
    read_metrics,
    run_job,
    run_ranks,
    run_torchrun_launcher,
    wait_ranks,
)

pytestmark = pytest.mark.e2e  # real multi-process runs of the entrypoint

STEPS, EVERY, TIMEOUT = 6, 2, 6  # optimizer steps, --checkpoint-steps, --dist-timeout (s)
BOTH = ("_model.safetensors", "_optimizer.safetensors")


def flags_for(setup, ckpt, **overrides):
    flags = {
        "pipeline-group-size": 2,
        "total-steps": STEPS,
        "checkpoint-steps": EVERY,
        "keep-checkpoints": 0,
        "load-checkpoint": "true",
        "dist-timeout": TIMEOUT,
    }
    flags.update(overrides)
    return base_flags(setup["model"], setup["data"], str(ckpt), **flags)


def latest(ckpt):
    path = os.path.join(ckpt, "latest")
    return int(open(path).read()) if os.path.exists(path) else None


def assert_user_error(stderr, text):
    assert text in stderr, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error: ") and text in line]
    assert lines, stderr[-3000:]


def assert_bit_identical(got_dir, want_dir):
    got = read_checkpoint_weights(str(got_dir), suffix=BOTH)
    want = read_checkpoint_weights(str(want_dir), suffix=BOTH)
    assert set(got) == set(want) and len(want) > 100
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, different[:5]


def assert_close(got_dir, want_dir):
    got = read_checkpoint_weights(str(got_dir), suffix=BOTH)
    want = read_checkpoint_weights(str(want_dir), suffix=BOTH)
    assert set(got) == set(want) and len(want) > 100
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=4e-5, msg=lambda m, name=name: f"{name}: {m}")


def copy_checkpoints(src, dst, steps, latest_step):
    os.makedirs(dst)
    for step in steps:
        shutil.copytree(os.path.join(src, f"checkpoint_{step}"), os.path.join(dst, f"checkpoint_{step}"))
    if latest_step is not None:
        with open(os.path.join(dst, "latest"), "w") as f:
            f.write(f"{latest_step}\n")
    return str(dst)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny model, the data and the uninterrupted reference run (pp=2, checkpoints at 2, 4, 6, all kept)."""
    root = tmp_path_factory.mktemp("checkpoints")
    setup = {
        "root": root,
        "model": make_model(root / "model", hidden=32, layers=4, heads=4),
        "data": make_chat_data(root / "chat.jsonl"),
    }
    setup["ref"] = str(root / "reference")
    result = run_job(2, flags_for(setup, setup["ref"], **{"metrics-file": str(root / "reference.jsonl")}))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    setup["ref_losses"] = read_metrics(str(root / "reference.jsonl"))
    assert sorted(setup["ref_losses"]) == list(range(1, STEPS + 1))
    return setup


def test_layout_and_metadata(setup):
    ckpt = setup["ref"]
    assert latest(ckpt) == STEPS
    assert checkpoint_entries(ckpt) == ["checkpoint_2", "checkpoint_4", "checkpoint_6", "latest"]
    assert os.path.isfile(os.path.join(ckpt, "curves.png"))  # the run's curves beside its checkpoints
    folder = os.path.join(ckpt, f"checkpoint_{STEPS}")
    meta = json.load(open(os.path.join(folder, "meta.json")))
    assert meta["step"] == STEPS and meta["model_type"] == "gptneox"
    assert meta["model_config"]["hidden_size"] == 32 and meta["layout"]["pp"] == 2 and meta["layout"]["dp"] == 1
    assert meta["config"]["data"]["total_iterations"] == STEPS and {"torch", "transformers", "safetensors"} <= set(
        meta["versions"]
    )
    for name in (
        "prank_0_model.safetensors",
        "prank_1_model.safetensors",
        "prank_0_optimizer.safetensors",
        "prank_1_optimizer.safetensors",
        "prank_0_state.json",
        "rank_0_rng.safetensors",
        "rank_1_rng.safetensors",
        "data_state.json",
        "tokenizer/tokenizer.json",
    ):
        assert name in meta["files"], name
    assert damaged_files(folder) == []
    # stage files hold HF names by global layer index; the optimizer file holds the AdamW state per parameter
    weights = read_checkpoint_weights(ckpt)
    assert "gpt_neox.layers.3.attention.dense.weight" in weights and "embed_out.weight" in weights
    optimizer = read_checkpoint_weights(ckpt, suffix="_optimizer.safetensors")
    assert {"gpt_neox.layers.3.attention.dense.weight/exp_avg", "embed_out.weight/exp_avg_sq"} <= set(optimizer)
    state = json.load(open(os.path.join(folder, "prank_0_state.json")))
    assert state["step"] == STEPS and state["scheduler"]["last_epoch"] == STEPS
    assert json.load(open(os.path.join(folder, "data_state.json")))["windows"] == STEPS * 4


def test_sigkill_crash_in_save_and_torchrun_restart_resume_bit_exact(setup, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    metrics = [str(tmp_path / f"run{i}.jsonl") for i in range(3)]
    flags = flags_for(setup, ckpt, **{"keep-checkpoints": 1})

    # 1. SIGKILL rank 1 right after checkpoint 2 is complete: rank 0 must stop, non-zero, within --dist-timeout.
    procs = run_ranks(2, flags + ["--metrics-file", metrics[0]], env={"CKPT_HOLD_AFTER_SAVE": "2:60"})
    deadline = time.time() + 120
    while latest(ckpt) != 2 and time.time() < deadline and procs[0].poll() is None:
        time.sleep(0.05)
    assert latest(ckpt) == 2, wait_ranks(procs, 5)
    time.sleep(1.0)  # let rank 0 finish the save and reach the pause
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    (rc0, _, err0), (rc1, _, _) = wait_ranks(procs, TIMEOUT + 30)
    assert rc1 == -signal.SIGKILL and rc0 not in (0, None), err0[-2000:]
    assert time.time() - killed_at < TIMEOUT + 10
    assert "rank 1 sent no heartbeat" in err0, err0[-2000:]
    assert latest(ckpt) == 2 and damaged_files(os.path.join(ckpt, "checkpoint_2")) == []

    # 2. Same command; rank 0 dies inside the save window of step 4 (after writing 3 files): checkpoint 2 and
    #    `latest` stay as they were, the half-written save stays in a temporary folder.
    results = wait_ranks(
        run_ranks(2, flags + ["--metrics-file", metrics[1]], env={"CKPT_FAULT_AFTER_FILES": "3:4:0"}), 120
    )
    assert results[0][0] == 9 and results[1][0] != 0, results[1][2][-2000:]
    assert "checkpoint_2 (step 2" in results[1][1], results[1][1][-2000:]
    assert latest(ckpt) == 2 and damaged_files(os.path.join(ckpt, "checkpoint_2")) == []
    assert os.path.isdir(os.path.join(ckpt, ".tmp_checkpoint_4"))
    assert not os.path.exists(os.path.join(ckpt, "checkpoint_4"))
    os.makedirs(os.path.join(ckpt, ".tmp_checkpoint_999"))  # a stale leftover of some other crashed save

    # 3. Same flags under torchrun --max-restarts 1: the first attempt resumes from 2 and dies inside the final save
    #    (step 6); torchrun restarts it, it resumes from 4 and finishes. The c10d rendezvous without a shared store
    #    gives each attempt a fresh store: torchrun's default (static rendezvous, shared store) keeps the first
    #    attempt's keys, and the restarted process group may connect to the dead workers' addresses.
    result = run_torchrun_launcher(
        2,
        flags + ["--metrics-file", metrics[2]],
        ["--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "--max-restarts", "1"],
        env={"CKPT_FAULT_AFTER_FILES": "2:6", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "checkpoint_2 (step 2" in result.stdout and "checkpoint_4 (step 4" in result.stdout, result.stdout[-3000:]
    assert latest(ckpt) == STEPS

    # bit-identical to the uninterrupted run: weights, optimizer state, and every loss logged after the resume
    assert_bit_identical(ckpt, setup["ref"])
    for path in metrics:
        losses = read_metrics(path)
        assert losses and all(losses[s] == setup["ref_losses"][s] for s in losses), (path, losses)
    assert min(read_metrics(metrics[2])) == 3  # run 3 logged from step 3 (resumed from 2) on
    # rotation kept only the newest (and deleted none before its successor was complete); leftovers are gone
    assert checkpoint_entries(ckpt) == ["checkpoint_6", "latest"]


def test_background_write_matches_sync_and_a_kill_during_it_loses_nothing(setup, tmp_path):
    """The reference run wrote its checkpoints in the background (the default): a synchronous run writes the very
    same files. A job killed while the write of checkpoint 4 is in flight (training already past it) keeps checkpoint
    2 and `latest`; relaunched, it resumes from 2 and ends bit-identical to the uninterrupted run."""
    sync_dir = str(tmp_path / "sync")
    sync = run_job(2, flags_for(setup, sync_dir, **{"async-checkpoint": "false"}))
    assert sync.returncode == 0, sync.stdout[-3000:] + sync.stderr[-3000:]
    assert "saved checkpoint" in sync.stdout and "in the background" not in sync.stdout, sync.stdout[-3000:]
    for step in (EVERY, EVERY * 2, STEPS):
        metas = [json.load(open(os.path.join(d, f"checkpoint_{step}", "meta.json"))) for d in (sync_dir, setup["ref"])]
        # every file's sha256: weights, optimizer state, scheduler and scaler, data position, tokenizer, and the
        # RNG states (seeded from --seed: two runs of the same flags are the same run)
        files = [m["files"] for m in metas]
        assert files[0] == files[1] and len(files[0]) > 8 and any("_rng." in name for name in files[0]), step

    ckpt = str(tmp_path / "ckpt")
    metrics = [str(tmp_path / f"run{i}.jsonl") for i in range(2)]
    flags = flags_for(setup, ckpt)
    procs = run_ranks(2, flags + ["--metrics-file", metrics[0]], env={"CKPT_SLOW_WRITE": f"{EVERY * 2}:60"})
    deadline = time.time() + 120
    while max(read_metrics(metrics[0]), default=0) < STEPS and time.time() < deadline and procs[0].poll() is None:
        time.sleep(0.05)
    # training went on past step 4 while checkpoint 4 was being written (it is not there yet)
    assert max(read_metrics(metrics[0]), default=0) == STEPS, wait_ranks(procs, 5)
    assert latest(ckpt) == EVERY and not os.path.exists(os.path.join(ckpt, f"checkpoint_{EVERY * 2}"))
    for proc in procs:
        proc.send_signal(signal.SIGKILL)
    wait_ranks(procs, 30)
    assert latest(ckpt) == EVERY and damaged_files(os.path.join(ckpt, f"checkpoint_{EVERY}")) == []
    assert not os.path.exists(os.path.join(ckpt, f"checkpoint_{EVERY * 2}"))

    results = wait_ranks(run_ranks(2, flags + ["--metrics-file", metrics[1]]), 120)
    assert all(rc == 0 for rc, _, _ in results), results[1][2][-3000:]
    stdout = "".join(out for _, out, _ in results)
    assert f"checkpoint_{EVERY} (step {EVERY}" in stdout and "writing it in the background" in stdout, stdout[-3000:]
    assert latest(ckpt) == STEPS
    assert_bit_identical(ckpt, setup["ref"])
    losses = read_metrics(metrics[1])
    assert min(losses) == EVERY + 1 and all(losses[s] == setup["ref_losses"][s] for s in losses), losses
    # the stall and the write of every checkpoint are in the metrics file
    records = [json.loads(line) for line in open(metrics[1])]
    stalls = {r["checkpoint_step"] for r in records if "checkpoint_stall_s" in r}
    writes = {r["checkpoint_step"] for r in records if "checkpoint_write_s" in r}
    assert stalls == writes == {EVERY * 2, STEPS}, records
    # the optimizer step after a snapshot waited for its copies (the final checkpoint has no step after it)
    assert {r["checkpoint_step"] for r in records if "checkpoint_copy_wait_s" in r} == {EVERY * 2}, records


def test_a_save_due_during_a_slow_write_does_not_stop_training(setup, tmp_path):
    """--defer-checkpoints (the default; the other tests keep every checkpoint at its step): checkpoint 2's write takes
    6 s longer, so the save due at step 4 is owed rather than waited for, training runs on
    to the end, and the final save (step 6, which waits for the write in flight) equals the reference's bit for bit.
    (When the write ends before the run does, the owed save is taken after the next step: tests/test_snapshot.py.)"""
    ckpt, metrics = str(tmp_path / "ckpt"), str(tmp_path / "run.jsonl")
    flags = flags_for(setup, ckpt, **{"metrics-file": metrics, "dist-timeout": 60, "defer-checkpoints": "true"})
    result = run_job(2, flags, env={"CKPT_SLOW_WRITE": f"{EVERY}:6"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"checkpoint {EVERY * 2} is due while checkpoint {EVERY} is still being written" in result.stdout
    saved = sorted(name for name in os.listdir(ckpt) if name.startswith("checkpoint_"))
    assert saved == [f"checkpoint_{EVERY}", f"checkpoint_{STEPS}"], os.listdir(ckpt)
    records = [json.loads(line) for line in open(metrics)]
    assert {r["checkpoint_step"] for r in records if "checkpoint_stall_s" in r} == {EVERY, STEPS}, records
    steps = {r["step"]: r["step_s"] for r in records if "step_s" in r}
    assert max(steps[s] for s in range(EVERY + 1, STEPS + 1)) < 3.0, steps  # no step waited for the write
    final = [r for r in records if r.get("checkpoint_step") == STEPS and "checkpoint_wait_s" in r]
    assert final and final[0]["checkpoint_wait_s"] > 1.0, records  # the end of the run waited for it instead
    assert_bit_identical(ckpt, setup["ref"])  # both `latest`: step 6


def test_resume_under_another_layout(setup, tmp_path):
    """Saved with pp=4 x dp=1, resumed with pp=1 x dp=2 (same global batch): weights, optimizer state and the data
    position carry over; the result equals an uninterrupted run within fp32 tolerance."""
    source = str(tmp_path / "pp4")
    result = run_job(4, flags_for(setup, source, **{"pipeline-group-size": 4}))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_close(source, setup["ref"])  # the uninterrupted pp=4 run

    resumed = copy_checkpoints(source, tmp_path / "pp1dp2", [EVERY], EVERY)
    metrics = str(tmp_path / "pp1dp2.jsonl")
    result = run_job(
        2,
        flags_for(
            setup, resumed, **{"pipeline-group-size": 1, "data-group-size": 2, "batch-size": 2, "metrics-file": metrics}
        ),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"checkpoint_{EVERY} (step {EVERY}; saved with pp=4 x dp=1)" in result.stdout, result.stdout[-3000:]
    assert_close(resumed, source)
    losses = read_metrics(metrics)
    assert sorted(losses) == list(range(EVERY + 1, STEPS + 1))
    for step, loss in losses.items():
        assert loss == pytest.approx(setup["ref_losses"][step], rel=1e-5), step


def _damage(folder, name, how):
    path = os.path.join(folder, name)
    if how == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif how == "flip":
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    else:
        os.remove(path)


def _model_variant(setup, folder, **changes):
    """A copy of the tiny model's config.json with `changes` (trained from random init: no weights needed)."""
    os.makedirs(folder)
    config = json.load(open(os.path.join(setup["model"], "config.json")))
    config.update(changes)
    json.dump(config, open(os.path.join(folder, "config.json"), "w"))
    return str(folder)


def test_unusable_checkpoints_and_failed_saves_stop_with_one_line(setup, tmp_path):
    """Each case is its own run (all launched at once): a damaged or foreign checkpoint stops the run with one
    `error:` line and no traceback, --resume-fallback steps back with a warning, a failed save stops every rank and
    leaves the previous checkpoint whole."""
    ref = setup["ref"]
    one = {"pipeline-group-size": 1, "dist-timeout": 120}
    cases = {}  # name -> (checkpoint dir, flags, world, env)

    def case(name, steps=(STEPS,), latest_step=STEPS, damage=None, world=1, env=None, **overrides):
        ckpt = copy_checkpoints(ref, tmp_path / name, steps, latest_step) if steps is not None else str(tmp_path / name)
        if damage:
            _damage(os.path.join(ckpt, f"checkpoint_{STEPS}"), *damage)
        cases[name] = (ckpt, flags_for(setup, ckpt, **dict(one, **overrides)), world, env)

    case("modified", damage=("prank_0_model.safetensors", "flip"))
    case("missing", damage=("data_state.json", "remove"))
    case("no-latest", latest_step=None)
    case("latest-names-a-missing-step", latest_step=EVERY)
    case(
        "model-type",
        **{
            "model-name": _model_variant(
                setup, tmp_path / "as-llama", model_type="llama", architectures=["LlamaForCausalLM"]
            ),
            "tokenizer-name": setup["model"],
            "load-pretrained-model": "false",
        },
    )
    case(
        "shapes",
        **{
            "model-name": _model_variant(setup, tmp_path / "wider-mlp", intermediate_size=64),
            "tokenizer-name": setup["model"],
            "load-pretrained-model": "false",
        },
    )
    case(
        "fallback",
        steps=(EVERY * 2, STEPS),
        damage=("prank_1_optimizer.safetensors", "truncate"),
        **{"resume-fallback": True},
    )
    for name, flags in (("bad-latest", {}), ("bad-latest-fallback", {"resume-fallback": True})):
        case(name, **flags)
        with open(os.path.join(cases[name][0], "latest"), "wb") as f:
            f.write(b"\xff\xfe2\n")  # not even text
    residual = json.load(open(os.path.join(setup["model"], "config.json")))["use_parallel_residual"]
    case(
        "residual",
        **{
            "model-name": _model_variant(setup, tmp_path / "other-residual", use_parallel_residual=not residual),
            "tokenizer-name": setup["model"],
            "load-pretrained-model": "false",
        },
    )
    case("optimizer")  # saved by an 8-bit Adam run (bitsandbytes' state), resumed with AdamW
    meta_path = os.path.join(cases["optimizer"][0], f"checkpoint_{STEPS}", "meta.json")
    meta = json.load(open(meta_path))
    meta["config"]["optimizer"]["kind"] = "8bit-adam"
    json.dump(meta, open(meta_path, "w"))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    case(
        "not-a-directory",
        steps=None,
        **{"checkpoint-path": str(blocker / "ckpt"), "load-checkpoint": "false", "checkpoint-steps": 1},
    )
    case(
        "disk-full",
        steps=None,
        world=2,
        env={"CKPT_FAULT_OSERROR": f"{EVERY * 2}:1"},
        **{"pipeline-group-size": 2, "load-checkpoint": "false"},
    )

    def listing(folder):
        """Every file below `folder` with its size."""
        paths = [os.path.join(d, f) for d, _, files in os.walk(folder) for f in files]
        return sorted((os.path.relpath(p, folder), os.path.getsize(p)) for p in paths)

    before = {name: listing(ckpt) for name, (ckpt, *_) in cases.items()}
    procs = {name: run_ranks(world, flags, env=env) for name, (_, flags, world, env) in cases.items()}
    results = {name: wait_ranks(p, 240) for name, p in procs.items()}
    out = {name: (r[0][0], "".join(x[1] for x in r), "".join(x[2] for x in r)) for name, r in results.items()}

    expected = {
        "modified": "prank_0_model.safetensors fails its sha256 check",
        "missing": "data_state.json is missing",
        "no-latest": f"holds checkpoint_{STEPS} but no `latest` file",
        "model-type": "is a gptneox checkpoint, this run trains llama",
        "shapes": "gpt_neox.layers.0.mlp.dense_4h_to_h.weight has shape [32, 128], this model (--model-name) needs "
        "[32, 64]",
        "not-a-directory": "a-file is not a directory; give a directory that can be created",
        "bad-latest": "not a step number",
        "residual": f"it was trained with use_parallel_residual={residual!r}, the model of --model-name",
        "optimizer": "holds 8bit-adam state and this run has --optimizer adam; resume with --optimizer 8bit-adam",
        "latest-names-a-missing-step": f"checkpoint_{EVERY}",
    }
    for name, text in expected.items():
        rc, stdout, stderr = out[name]
        assert rc != 0, (name, stdout[-2000:], stderr[-2000:])  # 2; 1 when the rank's own watchdog exits first
        assert_user_error(stderr, text)
        assert listing(cases[name][0]) == before[name], name  # a start that fails creates nothing (metrics.jsonl)
        if name not in ("not-a-directory", "bad-latest", "optimizer", "residual"):
            assert "cannot resume" in stderr or "no `latest`" in stderr, stderr[-2000:]
            assert "--resume-fallback" in stderr and "--load-checkpoint false" in stderr
    assert "--checkpoint-path" in out["not-a-directory"][2] and "step 1 " not in out["not-a-directory"][1]

    # --resume-fallback: a warning naming the damage (a truncated file), then the run goes on from checkpoint 4
    # and ends where the reference ended
    rc, stdout, stderr = out["fallback"]
    assert rc == 0, stdout[-2000:] + stderr[-2000:]
    assert (
        f"WARNING: --resume-fallback: resuming from checkpoint {EVERY * 2}, because checkpoint {STEPS} cannot be used: "
    ) in stdout, stdout[-2000:]
    assert "prank_1_optimizer.safetensors is truncated or modified" in stdout
    assert_close(cases["fallback"][0], ref)
    rc, stdout, stderr = out["bad-latest-fallback"]  # an unreadable `latest`: the newest complete checkpoint
    assert rc == 0, stdout[-2000:] + stderr[-2000:]
    assert "WARNING: --resume-fallback:" in stdout and "not a step number" in stdout, stdout[-2000:]
    assert f"resumed from {os.path.join(cases['bad-latest-fallback'][0], f'checkpoint_{STEPS}')}" in stdout

    # a failed save (disk full on rank 1): every rank stops non-zero naming the cause; checkpoint 2 stays whole
    ckpt = cases["disk-full"][0]
    for rc, _, stderr in results["disk-full"]:
        assert rc != 0, stderr[-2000:]
        assert "No space left on device" in stderr and "Traceback" not in stderr, stderr[-2000:]
    assert f"checkpoint {EVERY * 2} not saved" in out["disk-full"][2]
    assert latest(ckpt) == EVERY and damaged_files(os.path.join(ckpt, f"checkpoint_{EVERY}")) == []
    assert checkpoint_entries(ckpt) == [f"checkpoint_{EVERY}", "latest"]


def test_export_to_hugging_face_matches_the_checkpoint(setup, tmp_path):
    """tools/convert_to_hf.py merges the stage files; transformers' logits equal the training stages' logits."""
    from transformers import AutoModelForCausalLM

    import modules
    from tools.convert_to_hf import convert

    out = str(tmp_path / "hf")
    convert(setup["ref"], out)
    weights = read_checkpoint_weights(setup["ref"])
    cfg = modules.load_model_config(setup["model"])
    stage = modules.build_stage(cfg, 0, cfg.num_layers, True, True)
    stage.load_state_dict(weights)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, stage(ids), rtol=1e-5, atol=1e-5)


def test_tied_embeddings_resume_from_one_stage_to_two(setup, tmp_path):
    """Tied input/output embeddings are one Parameter with one stage, two copies with several: a one-stage
    checkpoint resumed with pp=2 gives the last stage's head copy the embedding's optimizer state."""
    model = make_model(
        tmp_path / "llama",
        model_type="llama",
        hidden=32,
        layers=4,
        heads=4,
        extra=("--num-kv-heads", "2", "--tie-word-embeddings"),
    )
    source = str(tmp_path / "pp1")
    flags = {"model-name": model, "tokenizer-name": model}
    result = run_job(1, flags_for(setup, source, **dict(flags, **{"pipeline-group-size": 1})))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    resumed = copy_checkpoints(source, tmp_path / "pp2", [EVERY], EVERY)
    result = run_job(2, flags_for(setup, resumed, **flags))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    got = read_checkpoint_weights(resumed, suffix=BOTH)
    want = read_checkpoint_weights(source, suffix=BOTH)
    for key in ("/exp_avg", "/exp_avg_sq", "/step"):  # the head copy follows the embedding exactly
        want["lm_head.weight" + key] = want["model.embed_tokens.weight" + key]
    assert set(got) == set(want)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=4e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_changed_data_on_resume_stops_unless_resume_data_says_how(setup, tmp_path):
    """A data file that grew since the checkpoint: the exact resume stops with one line naming both ways on;
    --resume-data continue goes on at the saved position, --resume-data restart reads the data from the start."""
    data = tmp_path / "grows.jsonl"
    shutil.copy(setup["data"], data)
    one = {"pipeline-group-size": 1, "task-name": str(data), "total-steps": EVERY, "checkpoint-steps": 0}
    first = wait_ranks(run_ranks(1, flags_for(setup, tmp_path / "ck", **one)))
    assert first[0][0] == 0, first[0][2][-3000:]
    with open(data, "a") as f, open(setup["data"]) as source:
        f.write(source.readline())
    modes = ("exact", "continue", "restart")
    procs = {
        mode: run_ranks(
            1,
            flags_for(
                setup,
                copy_checkpoints(tmp_path / "ck", tmp_path / mode, [EVERY], EVERY),
                **dict(one, **{"total-steps": EVERY + 1, "resume-data": mode}),
            ),
        )
        for mode in modes
    }
    ((rc, _, stderr),) = wait_ranks(procs["exact"])
    assert rc != 0
    assert_user_error(stderr, "the files of task")
    assert "--resume-data continue" in stderr and "--resume-data restart" in stderr
    for mode in ("continue", "restart"):
        ((rc, stdout, stderr),) = wait_ranks(procs[mode])
        assert rc == 0, stdout[-2000:] + stderr[-2000:]
        assert latest(tmp_path / mode) == EVERY + 1
        assert ("data read from the start" in stdout + stderr) == (mode == "restart")


def test_rotation_keeps_this_runs_newest_even_beside_a_later_leftover(tmp_path):
    """Resumed from checkpoint 4 while an abandoned run's checkpoint 10 is still there: after saving 6 with
    --keep-checkpoints 2, this run still has two checkpoints (4 and 6); the leftover is not counted."""
    from checkpoint.store import Checkpointer

    for step in (2, 4, 6, 10):
        (tmp_path / f"checkpoint_{step}").mkdir()
    (tmp_path / ".tmp_crashed_save").mkdir()
    Checkpointer(str(tmp_path), None, keep=2)._clean(newest=6)
    assert checkpoint_entries(tmp_path) == ["checkpoint_10", "checkpoint_4", "checkpoint_6"]


def test_progress_bars_for_checkpoint_read_and_save_only_when_asked(setup, tmp_path):
    """SHOW_PROGRESS=1: the logging rank draws a bar in MiB while it reads the checkpoint it resumes from and while it
    saves one (a synchronous save: a background write draws none); SHOW_PROGRESS=0: no bar is printed."""
    flags = {"pipeline-group-size": 1, "async-checkpoint": "false", "dist-timeout": 120}
    procs = {}
    for show in ("1", "0"):
        ckpt = copy_checkpoints(setup["ref"], tmp_path / f"show{show}", [STEPS - EVERY], STEPS - EVERY)
        procs[show] = run_ranks(1, flags_for(setup, ckpt, **flags), env={"SHOW_PROGRESS": show})
    ((rc, _, shown),) = wait_ranks(procs["1"])
    assert rc == 0, shown[-3000:]
    for bar in (f"reading checkpoint {STEPS - EVERY} model", f"reading checkpoint {STEPS - EVERY} optimizer"):
        assert bar in shown, shown[-3000:]
    assert f"saving checkpoint {STEPS}" in shown and "MiB" in shown, shown[-3000:]
    ((rc, _, quiet),) = wait_ranks(procs["0"])
    assert rc == 0, quiet[-3000:]
    assert not any(bar in quiet for bar in ("reading checkpoint", "saving checkpoint", "MiB", "\r")), quiet[-3000:]

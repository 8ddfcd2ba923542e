"""What a user sees when something is wrong under a launcher: the one `error:` line last, a few lines in all.

Plain torchrun ends every failure with its own ~40-line ChildFailedError traceback (measured: 42 lines after a bad
flag, the error line first); the entrypoint's launcher mode (`--nproc-per-node N`, used by the example scripts)
checks the flags before starting workers and ends a worker's failure with that worker's line. Under plain torchrun
the workers' error files at least put the line in torchrun's report instead of a link to its docs.
"""

import os
import socket
import subprocess
import sys

import pytest

from tests.helpers import ENTRYPOINT, REPO, base_flags, make_chat_data, make_model, run_torchrun


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("launcher")
    bad = root / "bad.jsonl"
    bad.write_text('{"text": "<human>: hi\\n<bot>: hello"}\n{not json\n')
    return {
        "root": root,
        "model": make_model(root / "model", hidden=32, layers=2, heads=4),
        "data": make_chat_data(root / "chat.jsonl"),
        "bad": str(bad),
    }


def launch(args, env=None, timeout=300):
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run(args, capture_output=True, text=True, env=full_env, cwd=REPO, timeout=timeout)
    screen = (result.stdout + result.stderr).strip().splitlines()  # stderr last: what stays on screen at the end
    return result, screen


def assert_last_line(result, screen, text, code=2, most=4):
    assert result.returncode == code, "\n".join(screen[-40:])
    assert screen[-1].startswith("error: ") and text in screen[-1], "\n".join(screen[-40:])
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in screen if line.startswith("error: ")]
    assert len(errors) <= most, errors


@pytest.mark.e2e
def test_bad_flag_in_launcher_mode_is_one_line_before_any_worker_starts(setup, tmp_path):
    flags = base_flags(setup["model"], setup["data"], str(tmp_path / "ckpt"), **{"pipeline-group-size": 2, "lr": -1})
    result, screen = launch([sys.executable, ENTRYPOINT, "--nproc-per-node", "2", *flags], timeout=120)
    assert_last_line(result, screen, "--lr must be >= 0, got -1.0", most=1)
    assert len(screen) == 1, screen
    # a layout that does not match the processes is caught there too, naming both sides
    flags = base_flags(setup["model"], setup["data"], str(tmp_path / "ckpt"), **{"pipeline-group-size": 4})
    result, screen = launch([sys.executable, ENTRYPOINT, "--nproc-per-node", "2", *flags], timeout=120)
    assert_last_line(result, screen, "--nnodes 1 x --nproc-per-node 2 = 2 processes", most=1)


@pytest.mark.e2e
def test_bad_data_in_launcher_mode_ends_with_the_failing_ranks_line(setup, tmp_path):
    """A user error is not retried (the same data fails the same way): --max-restarts does not start it again."""
    flags = base_flags(setup["model"], setup["bad"], str(tmp_path / "ckpt"), **{"pipeline-group-size": 2})
    result, screen = launch([sys.executable, ENTRYPOINT, "--nproc-per-node", "2", "--max-restarts", "2", *flags])
    assert_last_line(result, screen, "bad.jsonl:2: not valid JSON")
    assert len(screen) <= 8, screen
    assert not [line for line in screen if "restart" in line], screen


def test_one_process_trains_in_the_launchers_own_process(setup, tmp_path):
    """No agent and no second interpreter for a one-process job: the launcher hands the flags to the trainer here."""
    from comm import launch

    flags = base_flags(setup["model"], setup["data"], str(tmp_path / "ckpt"))
    handed = []
    code = launch.main(ENTRYPOINT, ["--nproc-per-node", "1", *flags], run_here=lambda f: handed.append(f) or 7)
    assert (code, handed) == (7, [flags])


@pytest.mark.e2e
def test_one_process_takes_no_port(setup, tmp_path):
    """A one-process job meets nobody: it trains while another program holds its --dist-url's port (two one-GPU
    jobs on one machine, neither given a port of its own)."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        url = f"tcp://127.0.0.1:{held.getsockname()[1]}"
        flags = base_flags(setup["model"], setup["data"], str(tmp_path / "ckpt"), **{"dist-url": url})
        result, screen = launch([sys.executable, ENTRYPOINT, "--nproc-per-node", "1", *flags], timeout=120)
    assert result.returncode == 0, "\n".join(screen[-20:])
    assert os.path.exists(tmp_path / "ckpt" / "latest"), "\n".join(screen[-20:])


@pytest.mark.e2e
def test_bad_flag_through_the_multinode_script(setup, tmp_path):
    env = {
        "MODEL": setup["model"],
        "DATA": setup["data"],
        "CHECKPOINT_PATH": str(tmp_path / "ckpt"),
        "MASTER_ADDR": "127.0.0.1",
        "NNODES": "1",
        "GPUS_PER_NODE": "2",
        "PP": "2",
        "PYTHON": sys.executable,
    }
    result, screen = launch(["bash", os.path.join(REPO, "examples", "multinode.sh"), "--warmup-steps", "-3"], env)
    assert_last_line(result, screen, "--warmup-steps must be >= 0", most=1)


@pytest.mark.e2e
def test_plain_torchrun_report_names_the_cause(setup, tmp_path):
    """torchrun's own traceback stays (it is torchrun's), but its root cause is the rank's line, not a docs link."""
    flags = base_flags(setup["model"], setup["bad"], str(tmp_path / "ckpt"), **{"pipeline-group-size": 2})
    result = run_torchrun(2, flags)
    assert result.returncode != 0
    report = result.stderr.split("Root Cause")[-1]
    assert "bad.jsonl:2: not valid JSON" in report and "To enable traceback" not in report, result.stderr[-3000:]


def test_the_launcher_names_the_rank_that_failed_first(tmp_path, monkeypatch):
    """Error files as the ranks write them: rank 1's own error, then rank 0 stopping because of it, within the same
    second. The launcher's last line is rank 1's, with its exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from comm.launch import first_failure_line
    from utils.logging import error_line

    failures = {}
    for rank, line, code in ((1, "[rank 1] data.jsonl:2: not valid JSON", 2), (0, "[rank 0] stopping: rank 1 ...", 1)):
        path = str(tmp_path / f"error{rank}.json")
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", path)
        error_line(line)
        error_line("a later line of the same rank is not its cause")
        failures[rank] = ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code, error_file=path)
    assert first_failure_line(ChildFailedError("train", failures)) == ("[rank 1] data.jsonl:2: not valid JSON", 2)
    # a rank that left no error file (killed by a signal) is named only when no rank left a line
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE")
    killed = ProcessFailure(local_rank=0, pid=7, exitcode=-9, error_file=str(tmp_path / "none.json"))
    line, code = first_failure_line(ChildFailedError("train", {3: killed}))
    assert line == "rank 3 ended with signal 9 and no error line; see its output above" and code == -9

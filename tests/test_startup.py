"""training/startup.py: the start-up phases are timed from the interpreter's start, add up per phase and land in the
metrics file as one record (tests/test_eval_and_logs.py checks the record of a real launch)."""

import json
import os
import time

IMPORTED = time.time()  # pytest's interpreter started well before this module was imported

from config import LogConfig  # noqa: E402
from training.startup import StartupClock, process_start_time  # noqa: E402
from utils.logging import make_logger  # noqa: E402


def test_process_start_is_the_interpreter_start_not_now():
    start = process_start_time()
    assert start < IMPORTED - 0.05  # the imports of pytest and torch came between
    assert time.time() - start < 3600


def test_phases_add_up_in_the_order_they_first_ended(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(time, "time", lambda: now[0])
    monkeypatch.setattr("training.startup.process_start_time", lambda: 90.0)
    clock = StartupClock()
    for phase, at in (("imports", 104.0), ("model_build", 105.0), ("weights", 107.0), ("model_build", 107.5)):
        now[0] = at
        clock.lap(phase)
    now[0] = 109.0
    clock.lap("weights")  # a second stage of the same rank: its build and weights add to the first's
    assert clock.spent == {"imports": 14.0, "model_build": 1.5, "weights": 3.5}
    assert clock.since_start() == {"imports": 14.0, "model_build": 15.5, "weights": 19.0}
    assert clock.line() == (
        "start-up, seconds since launch: imports 14.0 (+14.0), model_build 15.5 (+1.5), weights 19.0 (+3.5)"
    )


def test_startup_record_lands_in_the_metrics_file_beside_step_records(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    log = make_logger(LogConfig(metrics_file=str(path)), True, {})
    clock = StartupClock()
    clock.lap("imports")
    clock.lap("first_step")
    log.record(1, {"startup_s": clock.since_start()}, clock.line())
    log.metrics(1, {"loss": 2.0, "step_s": 0.5})
    log.close()
    startup, step = [json.loads(line) for line in path.read_text().splitlines()]
    assert startup["step"] == 1 and list(startup["startup_s"]) == ["imports", "first_step"]
    assert "step_s" not in startup and "loss" not in startup  # benchmarks find the first step by its step_s
    assert step == {"loss": 2.0, "step_s": 0.5, "step": 1}
    assert capsys.readouterr().out.count("start-up, seconds since launch: imports") == 1


def test_compile_cache_lasts_under_the_user_cache_unless_the_user_chose_one(tmp_path, monkeypatch):
    from modules.compile_cache import use_compile_cache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    want = str(tmp_path / "xdg" / "openchatkit" / "torchinductor")
    assert use_compile_cache() == want and os.environ["TORCHINDUCTOR_CACHE_DIR"] == want and os.path.isdir(want)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert use_compile_cache() == str(tmp_path / "mine")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))  # cannot hold a directory: inductor's default
    assert "default" in use_compile_cache() and "TORCHINDUCTOR_CACHE_DIR" not in os.environ

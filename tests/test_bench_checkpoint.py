"""bench/bench_checkpoint.py --part wall: the time lost per checkpoint from two runs' metrics records (synthetic
records, no processes), and the trainer clock it reads from the ETA that training/metrics.py logs."""

import types

import pytest

from bench import bench_checkpoint as bc
from training import metrics

TOTAL, EVERY = 40, 10


def records(step_s: dict[int, float], stalls: dict[int, float] | None = None, written: dict[int, int] | None = None):
    """A run's metrics records as the trainer writes them: a line per step with step_s and eta_min (its clock, which
    includes the checkpoint stalls that step_s leaves out), and the checkpoint records."""
    stalls, written, out, clock = stalls or {}, written or {}, [], 0.0
    for step in range(1, max(step_s) + 1):
        clock += step_s[step] + stalls.get(step - 1, 0.0)
        out.append({"step": step, "step_s": step_s[step], "eta_min": clock / step * (TOTAL - step) / 60})
        if step in stalls:
            out.append({"step": step, "checkpoint_step": step, "checkpoint_stall_s": stalls[step]})
        for ckpt, after in written.items():
            if after == step:
                out.append({"step": step, "checkpoint_step": ckpt, "checkpoint_write_s": 1.0})
    return out


def cost(ck, ref, **kw):
    args = dict(total_steps=TOTAL, every=EVERY, count=1, before=2, after=2, settle=3, warmup=1)
    return bc.wall_cost(ck, ref, **dict(args, **kw))


def test_lost_time_is_the_stall_plus_the_slower_steps():
    base = {s: 0.1 for s in range(1, 30)}
    slow = base | {11: 0.4, 12: 0.3}  # the steps beside the copies and the write
    ref = records(base)
    ck = records(slow, stalls={10: 0.5}, written={10: 12})
    wall = cost(ck, ref)
    row = wall["checkpoints"][0]
    assert wall["clock_checkpointed"] == "trainer" and wall["clock_reference"] == "trainer"
    assert row["window"] == [8, 15]  # 2 before; the write seen done after step 12, + 3
    assert row["lost_s"] == pytest.approx(0.5 + 0.3 + 0.2)
    assert row["unaccounted_s"] == pytest.approx(0.0, abs=1e-9)
    assert row["lost_adjusted_s"] == pytest.approx(row["lost_s"])  # no difference between the runs before it
    assert wall["lost_mean_pct_of_10_min"] == pytest.approx(100 * 1.0 / 600)
    assert wall["reference_median_step_s"] == pytest.approx(0.1)

    # without the ETA (or with one made otherwise) the sum of step_s and the stall gives the same
    for r in ck + ref:
        r.pop("eta_min", None)
    again = cost(ck, ref)
    assert again["clock_checkpointed"] == "step_s+stall"
    assert again["checkpoints"][0]["lost_s"] == pytest.approx(1.0)


def test_control_and_unfinished_writes():
    ref = records({s: 0.1 for s in range(1, 30)})
    ck = records({s: 0.11 for s in range(1, 30)}, stalls={10: 0.0}, written={})  # 0.01 s slower on every step
    wall = cost(ck, ref)
    row = wall["checkpoints"][0]
    assert wall["control_diff_per_step_s"] == pytest.approx(0.01)
    assert "not_measured" in row and "lost_s" not in row and wall["lost_mean_s"] is None
    ck = records({s: 0.11 for s in range(1, 30)}, stalls={10: 0.0}, written={10: 11})
    row = cost(ck, ref)["checkpoints"][0]
    assert row["lost_s"] == pytest.approx(0.01 * 6) and row["lost_adjusted_s"] == pytest.approx(0.0, abs=1e-9)


def test_a_checkpoint_taken_after_its_due_step_is_read_where_it_was_taken():
    """The write of checkpoint 10 outlasts the interval: the one due at 20 is taken after step 23, the first step that
    found that write done; its window starts 2 steps before 23, and the run must reach that window's end."""
    base = {s: 0.1 for s in range(1, 40)}
    ck = records(base | {24: 0.3}, stalls={10: 0.5, 23: 0.4}, written={10: 23, 23: 25})
    ck[[i for i, r in enumerate(ck) if r.get("checkpoint_step") == 23][0]]["checkpoint_due_step"] = 20
    assert bc.taken_steps(ck) == {10: 10, 20: 23}
    rows = cost(ck, records(base), count=2)["checkpoints"]
    assert [(r["due_step"], r["checkpoint_step"], r["window"]) for r in rows] == [(10, 10, [8, 26]), (20, 23, [21, 28])]
    assert rows[0]["overlaps_next_window"] and rows[1]["lost_s"] == pytest.approx(0.4 + 0.2)
    assert bc.last_window_end(ck, EVERY, 2, after=2, settle=3) == 28


def test_one_run_alone_is_read_against_its_own_rate_before_the_window():
    """Without a reference run, a window's loss is its wall time less its steps at the run's own rate over the control
    steps: the stall plus what the steps beside the write lost, as the two-run figure when both runs run alike."""
    base = {s: 0.1 for s in range(1, 30)}
    ck = records(base | {11: 0.4, 12: 0.3}, stalls={10: 0.5}, written={10: 12})
    alone = cost(ck, None)
    row = alone["checkpoints"][0]
    assert alone["own_rate_s_per_step"] == pytest.approx(0.1)
    assert row["lost_within_run_s"] == pytest.approx(1.0) and "lost_s" not in row and "not_measured" not in row
    assert alone["lost_within_run_mean_s"] == pytest.approx(1.0) and alone["measured_within_run"] == 1
    assert alone["lost_mean_s"] is None and alone["clock_reference"] is None
    both = cost(ck, records(base))["checkpoints"][0]
    assert both["lost_within_run_s"] == pytest.approx(both["lost_s"])
    # a run that speeds up or slows down by itself moves this estimate, not the two-run one: why both are reported
    drifting = records({s: 0.1 if s <= 8 else 0.12 for s in range(1, 30)}, stalls={10: 0.0}, written={10: 11})
    assert cost(drifting, None)["checkpoints"][0]["lost_within_run_s"] == pytest.approx(0.02 * 6)  # steps 9..14


def test_trainer_clock_is_the_step_meter_clock(monkeypatch):
    """The trainer's ETA is elapsed / steps done x steps left: the benchmark reads the elapsed time back from it."""
    now = [100.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: now[0])
    meter = metrics.StepMeter(types.SimpleNamespace(type="cpu"), 1.0, 1, TOTAL, 0)
    out = []
    for step in range(1, 6):
        now[0] += 0.25 * step
        out.append(dict(meter.measure(step, 100), step=step))
        if step == 3:  # a checkpoint: left out of the next step_s, but not of the clock
            now[0] += 2.0
            meter.exclude(2.0)
            out.append({"step": 3, "checkpoint_step": 3, "checkpoint_stall_s": 2.0})
    clock = bc.trainer_clock(out, TOTAL)
    assert clock is not None
    assert clock[5] == pytest.approx(now[0] - 100.0)
    assert bc.summed_clock(out)[5] == pytest.approx(clock[5])

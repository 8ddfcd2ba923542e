"""The token cache (tools/prepare_data.py, --task-name CACHE_DIR): its batches are the packed stream's, replica by
replica, for a weighted mix of chat and text sources; a replica reads only its own windows; a resume jumps to its
window; an interrupted build continues to the same tokens; a cache of other settings, a damaged one and one of a
newer format are refused in one line; training on it is bit-identical to training on the sources at pp1 x dp2 and
pp2 x dp2, and resumes bit-exactly after a crash. Worker processes write the bytes an in-process build writes; a bad
record, a killed worker, Ctrl-C and SIGTERM end a build in one line, and no worker outlives its build."""

import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import tasks
from tasks import cache as token_cache
from tasks.build_workers import encoded_in_processes
from tasks.reader import Mixture
from tests.helpers import base_flags, data_config, make_chat_data, make_model, read_checkpoint_weights, run_job
from tools.prepare_data import main as prepare_data

TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "tokenizer")
PREPARE_DATA = os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools", "prepare_data.py")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A weighted mix: chat records and plain text, in two files."""
    root = tmp_path_factory.mktemp("sources")
    chat = make_chat_data(root / "chat.jsonl", n=150)
    text = root / "text.jsonl"
    with open(text, "w") as f:
        for i in range(120):
            f.write(
                json.dumps({"text": f"Document {i}: " + " ".join(f"word{j % 37}" for j in range(i % 23 + 5))}) + "\n"
            )
    return f"{chat}:0.6,{text}:0.4"


def build(spec, output, tokens=40_000, *extra):
    code = prepare_data(
        ["--task-name", spec, "--tokenizer-name", TOKENIZER_DIR, "--output", str(output), "--tokens", str(tokens)]
        + list(extra)
    )
    assert code == 0
    return str(output)


def test_batches_from_the_cache_equal_the_packed_stream_replica_by_replica(tok, sources, tmp_path):
    cache = build(sources, tmp_path / "cache")
    for rank in range(2):
        raw = tasks.PackedStream(data_config(sources, seq_length=48, batch_size=2), tok, rank, 2)
        cached = tasks.CachedStream(data_config(cache, seq_length=48, batch_size=2), tok, rank, 2)
        for _ in range(12):
            want, got = next(raw), next(cached)
            for key in want:
                assert torch.equal(got[key], want[key]), key
        raw.close()
        cached.close()


def test_a_replica_reads_only_its_own_windows_and_a_resume_jumps_to_its_window(tok, sources, tmp_path):
    cache = build(sources, tmp_path / "cache")
    data = data_config(cache, seq_length=32, batch_size=2, num_workers=0)
    streams = [tasks.CachedStream(data, tok, rank, 4) for rank in range(4)]
    batches = [[next(s) for _ in range(5)] for s in streams]
    for s in streams:  # 5 batches of 2 windows of 33 tokens each: a quarter of what the 4 replicas trained on
        assert s._pipe.tokens_read == 5 * 2 * 33
    state = streams[1].state_dict()
    assert state["windows"] == 5 * 8
    resumed = tasks.CachedStream(data, tok, 1, 4)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    want = next(streams[1])
    got = next(resumed)
    assert all(torch.equal(got[k], want[k]) for k in want) and resumed._pipe.tokens_read == 2 * 33
    assert batches[0][0]["input_ids"].shape == (2, 32)


def test_an_interrupted_build_continues_to_the_same_tokens(tok, sources, tmp_path, monkeypatch, capsys):
    whole = build(sources, tmp_path / "whole")
    monkeypatch.setattr(token_cache, "SAVE_EVERY_S", 0.0)  # progress before every chunk
    real = token_cache._encoded

    def three(*args):  # the workers' chunks stop after three, as when Ctrl-C is pressed
        for i, item in enumerate(real(*args)):
            if i == 3:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(token_cache, "_encoded", three)
    flags = ["--task-name", sources, "--tokenizer-name", TOKENIZER_DIR, "--output", str(tmp_path / "resumed")]
    assert prepare_data([*flags, "--tokens", "40000"]) == 130
    assert capsys.readouterr().err.startswith("error: prepare_data: interrupted; run it again")
    assert not os.path.exists(tmp_path / "resumed" / "cache.json")
    monkeypatch.setattr(token_cache, "_encoded", real)
    resumed = build(sources, tmp_path / "resumed")
    a, b = token_cache.TokenCache(whole), token_cache.TokenCache(resumed)
    assert a.tokens == b.tokens
    for name in token_cache.ARRAYS:
        assert np.array_equal(a.arrays[name], b.arrays[name]), name
    assert a.epoch_starts == b.epoch_starts


@pytest.mark.parametrize("template", [False, True], ids=["oig", "chat-template"])
def test_worker_processes_write_the_same_bytes_as_a_build_in_process(tok, chat_tok, sources, tmp_path, template):
    """Any count of worker processes (or of threads) writes the bytes the building thread alone writes."""
    tokenizer = chat_tok if template else tok
    data = data_config(sources)
    built = {}
    for name, workers, kind in [("in-process", 0, "processes"), ("1", 1, "processes"), ("3", 3, "processes"),
                                ("threads", 2, "threads")]:  # fmt: skip
        index = token_cache.build_cache(
            data, tokenizer, str(tmp_path / name), 30_000, log=lambda m: None, workers=workers, kind=kind
        )
        folder = tmp_path / name / index["build"]
        files = {f: (folder / f).read_bytes() for f in ("tokens.bin", "trained.bin", "doc_start.bin", "epochs.json")}
        built[name] = index["tokens"], index["documents"], files
    assert built["in-process"][0] >= 30_000 and any(built["in-process"][2]["trained.bin"])
    for name in ("1", "3", "threads"):
        assert built[name] == built["in-process"], name


def test_a_bad_record_ends_the_build_in_one_line_and_publishes_nothing(tmp_path, capfd):
    data = tmp_path / "bad.jsonl"
    lines = [json.dumps({"text": f"document {i} " * 20}) for i in range(600)]
    lines[450] = json.dumps({"title": "no text here"})  # in a chunk a worker renders, after the first ones
    data.write_text("\n".join(lines) + "\n")
    code = prepare_data(["--task-name", str(data), "--tokenizer-name", TOKENIZER_DIR, "--output",
                         str(tmp_path / "cache"), "--tokens", "10000000", "--data-workers", "2"])  # fmt: skip
    err = capfd.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "bad.jsonl:451" in err and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "cache" / "cache.json")


def _start_build(sources, output):
    """tools/prepare_data.py building a cache far longer than these sources (they repeat) in a session of its own,
    once its first chunk is written; and its worker processes."""
    psutil = pytest.importorskip("psutil")
    command = [sys.executable, PREPARE_DATA, "--task-name", sources, "--tokenizer-name", TOKENIZER_DIR,
               "--output", str(output), "--tokens", "1000000000", "--data-workers", "2"]  # fmt: skip
    build = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not any(output.glob("build-*/progress.json")):  # written as the first chunk comes back
        assert build.poll() is None and time.monotonic() < deadline, build.communicate()
        time.sleep(0.1)
    # its children are the forkserver and multiprocessing's resource tracker; the workers are the forkserver's
    workers = [p for p in psutil.Process(build.pid).children(recursive=True) if p.ppid() != build.pid]
    assert len(workers) >= 2
    return build, workers


@pytest.mark.e2e  # starts a build script and kills its processes
@pytest.mark.parametrize("how", ["killed worker", "ctrl-c", "sigterm", "killed build"])
def test_a_killed_worker_ctrl_c_or_a_killed_build_leave_no_worker_behind(sources, tmp_path, how):
    """A worker killed (the out-of-memory killer), Ctrl-C (SIGINT to the whole process group) or SIGTERM to the build
    (kill, a scheduler's cancel): the build ends at once with one line, its workers gone, nothing published. The
    building process killed: its workers end too."""
    output = tmp_path / "cache"
    build, workers = _start_build(sources, output)
    if how == "killed worker":
        workers[0].kill()
    elif how == "ctrl-c":
        os.killpg(build.pid, signal.SIGINT)
    elif how == "sigterm":
        build.terminate()
    else:
        build.kill()
    _, err = build.communicate(timeout=60)  # the workers hold its stderr too: this waits for them
    for worker in workers:
        worker.wait(timeout=10)
    assert not os.path.exists(output / "cache.json")
    if how == "killed build":
        return
    want = {
        "killed worker": (2, "worker process ended abruptly"),
        "ctrl-c": (130, "prepare_data: interrupted"),
        "sigterm": (143, "prepare_data: stopped by SIGTERM"),
    }[how]
    assert build.returncode == want[0] and want[1] in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_a_worker_killed_while_sending_a_chunk_back_ends_the_build_with_its_one_line(tok, tmp_path):
    """The out-of-memory killer may take a worker halfway through writing a result larger than its pipe holds: the
    build ends with the one line (a pool whose workers share one result pipe and its lock waited there forever)."""
    psutil = pytest.importorskip("psutil")
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"text": f"document {i} " + "word " * 1000}) + "\n" for i in range(600)))
    stream = tasks.PackedStream(data_config(str(data), seq_length=64), tok)
    started = time.time() - 1
    chunks = encoded_in_processes(stream._pipe, Mixture(stream.tasks, stream.seed, stream.shuffle_buffer), 1)
    try:
        meta, chunk = next(chunks)  # meanwhile the worker encodes the next chunk, and sends it: nobody reads it yet
        assert len(chunk.tokens) * 6 > 1 << 20  # ~6 bytes a token: far more than a pipe's buffer
        me = psutil.Process()
        (worker,) = [p for p in me.children(recursive=True) if p.ppid() != me.pid and p.create_time() >= started]
        busy, deadline = -1.0, time.monotonic() + 60
        while sum(worker.cpu_times()[:2]) != busy:  # encoded and blocked in its send
            assert time.monotonic() < deadline
            busy = sum(worker.cpu_times()[:2])
            time.sleep(0.5)
        worker.kill()
        outcome = []
        reader = threading.Thread(target=lambda: outcome.append(pytest.raises(tasks.TaskError, next, chunks)))
        reader.start()
        reader.join(timeout=60)
        assert outcome and "ended abruptly (killed: out of memory, or kill -9)" in str(outcome[0].value)
    finally:
        chunks.close()
        stream.close()


def test_other_settings_a_damaged_cache_and_a_newer_format_are_refused(tok, sources, tmp_path):
    cache = build(sources, tmp_path / "cache", 5_000)
    other = copy.deepcopy(tok)
    other.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    with pytest.raises(tasks.TaskError, match="another tokenizer"):
        tasks.CachedStream(data_config(cache, seq_length=32), other)
    with pytest.raises(tasks.TaskError, match="--train-on-inputs False, this run has True"):
        tasks.CachedStream(data_config(cache, seq_length=32, train_on_inputs=True), tok)
    with pytest.raises(tasks.TaskError, match="--seed 42"):
        tasks.CachedStream(data_config(cache, seq_length=32, seed=7), tok)
    with pytest.raises(tasks.TaskError, match=r"holds [\d,]+ tokens and this run trains on 32,001"):
        tasks.TokenCache(cache).check_holds(1000, 32)
    index = json.load(open(os.path.join(cache, "cache.json")))
    shard = os.path.join(cache, index["build"], "tokens.bin")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 4)
    with pytest.raises(tasks.TaskError, match="damaged .tokens.bin holds"):
        tasks.TokenCache(cache)
    json.dump({**index, "format": "tasks.TokenCache/9"}, open(os.path.join(cache, "cache.json"), "w"))
    with pytest.raises(tasks.TaskError, match="rebuild it with this version"):
        tasks.TokenCache(cache)


def test_prepare_data_refuses_bad_input_in_one_line(tmp_path, capsys, sources):
    data_folder = tmp_path / "data"
    data_folder.mkdir()
    (data_folder / "chat.jsonl").write_text("{}\n")
    code = prepare_data(["--task-name", sources, "--tokenizer-name", TOKENIZER_DIR, "--output", str(data_folder),
                         "--tokens", "100"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "holds other files (chat.jsonl)" in err and err.count("\n") == 1
    assert sorted(os.listdir(data_folder)) == ["chat.jsonl"]
    code = prepare_data(["--task-name", str(tmp_path / "missing.jsonl"), "--tokenizer-name", TOKENIZER_DIR,
                         "--output", str(tmp_path / "c"), "--tokens", "100"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "missing.jsonl" in err


@pytest.mark.e2e
def test_training_on_the_cache_is_bit_identical_to_the_sources_and_resumes_bit_exactly(sources, tmp_path):
    model = make_model(tmp_path / "m", hidden=32, layers=4, heads=4)
    cache = build(sources, tmp_path / "cache", 40_000, "--seed", "7")  # tests.helpers.base_flags' seed
    weights = {}
    for name, spec, world, layout in [
        ("raw-dp2", sources, 2, {"data-group-size": 2}),
        ("cache-dp2", cache, 2, {"data-group-size": 2}),
        ("raw-pp2dp2", sources, 4, {"data-group-size": 2, "pipeline-group-size": 2}),
        ("cache-pp2dp2", cache, 4, {"data-group-size": 2, "pipeline-group-size": 2}),
    ]:
        ckpt = tmp_path / name
        done = run_job(world, base_flags(model, spec, str(ckpt), **{"batch-size": 2, **layout}))
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        weights[name] = read_checkpoint_weights(str(ckpt))
    for a, b in (("raw-dp2", "cache-dp2"), ("raw-pp2dp2", "cache-pp2dp2")):
        assert sorted(weights[a]) == sorted(weights[b])
        assert all(torch.equal(weights[a][k], weights[b][k]) for k in weights[a]), (a, b)
    # killed as it starts saving step 3, then resumed from step 2's checkpoint: the same weights
    ckpt = tmp_path / "crashed"
    flags = base_flags(model, cache, str(ckpt), **{"batch-size": 2, "data-group-size": 2, "checkpoint-steps": 2})
    crashed = run_job(2, flags, env={"CKPT_FAULT_AFTER_FILES": "0:3"})
    assert crashed.returncode != 0
    resumed = run_job(2, [*flags, "--load-checkpoint", "true"])
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    got = read_checkpoint_weights(str(ckpt))
    assert all(torch.equal(got[k], weights["cache-dp2"][k]) for k in got)


def test_a_cache_too_short_for_the_run_stops_it_at_start(sources, tmp_path):
    """A build keeps whole chunks of 256 documents (a few thousand tokens here); the run needs 60 x 4 x 64."""
    model = make_model(tmp_path / "m", hidden=32, layers=2, heads=4)
    cache = build(sources, tmp_path / "cache", 500, "--seed", "7")
    done = run_job(1, base_flags(model, cache, str(tmp_path / "ck"), **{"total-steps": 60, "seq-length": 64}))
    assert done.returncode == 2 and "rebuild it with --tokens" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.e2e
def test_data_cache_tokenizes_once_and_trains_like_the_sources(sources, tmp_path):
    """--data-cache DIR: the first run builds the cache (rank 0; the other rank waits) and trains bit-identically to
    a run on the sources; the next run reuses it, building nothing."""
    model = make_model(tmp_path / "m", hidden=32, layers=2, heads=4)
    cache = tmp_path / "cache"
    runs = {}
    for name, extra in [("raw", []), ("first", ["--data-cache", str(cache)]), ("again", ["--data-cache", str(cache)])]:
        flags = base_flags(model, sources, str(tmp_path / name), **{"batch-size": 2, "data-group-size": 2})
        done = run_job(2, [*flags, *extra])
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        runs[name] = done.stdout, read_checkpoint_weights(str(tmp_path / name))
    assert "tokenizing --task-name once" in runs["first"][0] and "reusing its" in runs["again"][0]
    assert len([n for n in os.listdir(cache) if n.startswith("build-")]) == 1
    for name in ("first", "again"):
        assert all(torch.equal(runs[name][1][k], v) for k, v in runs["raw"][1].items()), name

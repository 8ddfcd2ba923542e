"""Tests for tasks/ sources and record formats: parquet / arrow / save_to_disk / hf: (a hub-style dataset in a local
HF cache built here, read offline) give the same batches as jsonl; ShareGPT and Alpaca give the same tokens and loss
masks as messages; every bad input is one line; resume is exact for every source."""

from __future__ import annotations

import gc
import json
import os
import random

# the hub is never reachable from tests: offline mode makes load_dataset look only in the local cache
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

from tasks import TaskError, count_tokens, parse_task_spec
from tests.helpers import TOKENIZER, eval_batches, packed_stream

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "apple river stone cloud quick brown fox lazy dog sun moon star tree house garden music paper".split()
KW = dict(seq_length=32, batch_size=3, seed=5, shuffle_buffer=8, chunk_docs=16)


def sentence(rng, lo=3, hi=14):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def mixed_records(n, seed=0):
    """Records of all four layouts, interleaved (one file holds them all; other layouts' columns are null)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q, a = f"q{i} {sentence(rng)}?", f"a{i} {sentence(rng)}."
        kind = i % 4
        if kind == 0:
            out.append({"text": f"<human>: {q}\n<bot>: {a}"})
        elif kind == 1:
            out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        elif kind == 2:
            out.append({"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]})
        else:
            out.append({"instruction": q, "input": sentence(rng) if i % 8 == 3 else "", "output": a})
    return out


def table(records):
    """An Arrow table with the union of the records' keys as columns (missing: null)."""
    keys = list(dict.fromkeys(k for r in records for k in r))
    return pa.Table.from_pydict({k: [r.get(k) for r in records] for k in keys})


def write_jsonl(path, records):
    with open(path, "w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    return str(path)


def write_parquet(path, records, row_group=7):
    pq.write_table(table(records), str(path), row_group_size=row_group)
    return str(path)


def write_arrow(path, records, batch=5, ipc_file=False):
    t = table(records)
    with pa.OSFile(str(path), "wb") as sink:
        writer = (pa.ipc.new_file if ipc_file else pa.ipc.new_stream)(sink, t.schema)
        writer.write_table(t, max_chunksize=batch)
        writer.close()
    return str(path)


def dataset(records):
    from datasets.table import InMemoryTable

    return datasets.Dataset(InMemoryTable(table(records)))


def write_saved(path, records, shards=3):
    dataset(records).save_to_disk(str(path), num_shards=shards)
    return str(path)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """A local HF datasets cache (the layout `load_dataset(name)` leaves behind on a machine with network), read
    offline. Returns add(name, {split: records}, config="default")."""
    import datasets.config as dconfig

    from tasks import sources

    cache = tmp_path / "hf_home" / "datasets"
    monkeypatch.setattr(dconfig, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(dconfig, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(sources, "_HF_CACHE", {})

    def add(name, splits, config="default", shards=3):
        org, short = name.split("/")
        d = cache / f"{org}___{short}" / config / "0.0.0" / "0123abcd"
        d.mkdir(parents=True)
        infos = {}
        first = dataset(next(r for r in splits.values() if r))
        features = first.features
        for split, records in splits.items():
            ds = dataset(records) if records else first.select([])  # an empty split of the same columns
            n = min(shards, max(1, len(ds)))
            lengths = []
            for i in range(n):
                part = ds.shard(n, i, contiguous=True)
                part.save_to_disk(str(tmp_path / "tmp_shard"), num_shards=1)
                target = d / f"{short}-{split}-{i:05d}-of-{n:05d}.arrow"
                os.replace(tmp_path / "tmp_shard" / "data-00000-of-00001.arrow", target)
                lengths.append(len(part))
            infos[split] = datasets.SplitInfo(split, num_examples=len(ds), shard_lengths=lengths, dataset_name=short)
        info = datasets.DatasetInfo(features=features, config_name=config, dataset_name=short)
        info.splits = datasets.SplitDict(infos, dataset_name=short)
        info.write_to_directory(str(d))
        return f"hf:{name}"

    return add


def take(stream, n):
    return [next(stream) for _ in range(n)]


def same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


# ------------------------------------------------------------------ every source gives the same batches
def test_all_sources_give_identical_batches(tmp_path, tok, hf_cache):
    recs = mixed_records(50, seed=1)
    paths = {
        "jsonl": write_jsonl(tmp_path / "d.jsonl", recs),
        "parquet": write_parquet(tmp_path / "d.parquet", recs),
        "arrow stream": write_arrow(tmp_path / "d.arrow", recs),
        "arrow file": write_arrow(tmp_path / "f.arrow", recs, ipc_file=True),
        "save_to_disk": write_saved(tmp_path / "saved", recs),
        "hub cache": hf_cache("testorg/chat", {"train": recs}),
    }
    ref = take(packed_stream(paths["jsonl"], tok, num_workers=0, **KW), 30)  # > one pass: crosses an epoch
    assert len({int(b["labels"][r][c]) for b in ref for r in range(3) for c in range(32)}) > 30
    for kind, p in paths.items():
        with packed_stream(p, tok, num_workers=1, **KW) as s:
            got = take(s, 30)
            assert s.epochs[s.tasks[0].name] >= 1, kind
        same(ref, got)
    # a folder of parquet files reads them by name, like a folder of jsonl files
    d = tmp_path / "parts"
    d.mkdir()
    write_parquet(d / "a.parquet", recs[:20])
    write_parquet(d / "b.parquet", recs[20:])
    same(ref[:10], take(packed_stream(str(d), tok, num_workers=0, **KW), 10))
    # evaluation and token counts agree across sources too
    ev = list(eval_batches(paths["jsonl"], tok, 32, 2))
    same(ev, list(eval_batches(paths["parquet"], tok, 32, 2)))
    same(ev, list(eval_batches([paths["hub cache"]], tok, 32, 2)))
    n = count_tokens(paths["jsonl"], tok, use_cache=False)
    every = eval_batches(paths["jsonl"], tok, 32, 2, train_on_inputs=True)
    assert n == 1 + sum(int((b["labels"] != -100).sum()) for b in every)  # every token but the first is a label
    for kind in ("parquet", "save_to_disk", "hub cache"):
        assert count_tokens(paths[kind], tok) == n, kind


def test_hf_count_is_cached_outside_the_data(tmp_path, tok, hf_cache, monkeypatch):
    import tasks.count as count_mod

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    name = hf_cache("testorg/counted", {"train": mixed_records(12)})
    calls = []
    real = count_mod.count_file
    monkeypatch.setattr(count_mod, "count_file", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    n = count_tokens(name, tok)
    assert count_tokens(name, tok) == n and len(calls) == 1
    assert os.listdir(tmp_path / "xdg" / "openchatkit-tasks" / "token_counts")
    # a record format other than the default is another cache entry (it may count other tokens)
    assert count_tokens(name, tok, text_field="text") == n and len(calls) == 2


# ------------------------------------------------------------------ formats
def conversation_forms(system):
    q1, a1, q2, a2 = "What is a fox?", "A quick brown animal.", "And a dog?", "A lazy one."
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": q1},
        {"role": "assistant", "content": a1},
        {"role": "user", "content": q2},
        {"role": "assistant", "content": a2},
    ]
    frm = {"system": "system", "user": "human", "assistant": "gpt"}
    share = [{"from": frm[m["role"]], "value": m["content"]} for m in msgs]
    return msgs, share


@pytest.mark.parametrize("template", [False, True])
def test_messages_sharegpt_alpaca_same_tokens_and_masks(tmp_path, tok, chat_tok, template):
    t = chat_tok if template else tok
    msgs, share = conversation_forms("Be brief.")
    one = [
        {"role": "user", "content": "Name a colour.\n\nAnswer in one word."},
        {"role": "assistant", "content": "Red."},
    ]
    forms = {
        "messages": [{"messages": msgs}, {"messages": one}],
        "sharegpt": [
            {"conversations": share},
            {"conversations": [{"from": "human", "value": one[0]["content"]}, {"from": "gpt", "value": "Red."}]},
        ],
        "mixed": [
            {"conversations": share},
            {"instruction": "Name a colour.", "input": "Answer in one word.", "output": "Red."},
        ],
    }
    out = {}
    for name, recs in forms.items():
        p = (
            write_parquet(tmp_path / f"{name}.parquet", recs)
            if name == "mixed"
            else write_jsonl(tmp_path / f"{name}.jsonl", recs)
        )
        out[name] = list(eval_batches(p, t, 64, 1))
    same(out["messages"], out["sharegpt"])
    same(out["messages"], out["mixed"])
    labels = out["messages"][0]["labels"][0]
    assert 0 < int((labels != -100).sum()) < 40  # loss on the assistant turns only
    # forced formats read the same records; --train-on-inputs trains the user turns of every layout
    p = write_jsonl(tmp_path / "only_share.jsonl", forms["sharegpt"])
    same(out["sharegpt"], list(eval_batches(p, t, 64, 1, data_format="sharegpt")))
    a = list(eval_batches(p, t, 64, 1, train_on_inputs=True))
    b = list(eval_batches(str(tmp_path / "messages.jsonl"), t, 64, 1, train_on_inputs=True))
    same(a, b)


def test_field_overrides(tmp_path, tok):
    base = mixed_records(8, seed=4)
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": r["text"]} for r in base if "text" in r])
    body = write_parquet(
        tmp_path / "b.parquet", [{"id": i, "body": r["text"]} for i, r in enumerate(base) if "text" in r]
    )
    msgs = write_jsonl(tmp_path / "m.jsonl", [{"messages": r["messages"]} for r in base if "messages" in r])
    chat = write_parquet(tmp_path / "c.parquet", [{"dialog": r["messages"]} for r in base if "messages" in r])
    share = write_jsonl(tmp_path / "s.jsonl", [{"turns": r["conversations"]} for r in base if "conversations" in r])
    share_ref = write_jsonl(
        tmp_path / "s2.jsonl", [{"conversations": r["conversations"]} for r in base if "conversations" in r]
    )
    same(list(eval_batches(text, tok, 16, 1)), list(eval_batches(body, tok, 16, 1, text_field="body")))
    same(list(eval_batches(msgs, tok, 16, 1)), list(eval_batches(chat, tok, 16, 1, messages_field="dialog")))
    same(
        list(eval_batches(share_ref, tok, 16, 1)),
        list(eval_batches(share, tok, 16, 1, data_format="sharegpt", messages_field="turns")),
    )


# ------------------------------------------------------------------ bad input: one line naming the source and the fix
def one_line(exc_info, *needles):
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    assert isinstance(exc_info.value, ValueError)
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def test_unknown_column(tmp_path, tok):
    p = write_parquet(tmp_path / "d.parquet", [{"text": "hi"}])
    with pytest.raises(TaskError) as e:
        packed_stream(p, tok, 16, 1, text_field="body")
    one_line(e, p, "no column 'body'", "columns: text", "--text-field")
    with pytest.raises(TaskError) as e:
        count_tokens(p, tok, data_format="sharegpt")
    one_line(e, "no column 'conversations'", "--messages-field")
    j = write_jsonl(tmp_path / "d.jsonl", [{"text": "hi"}])  # jsonl has no schema: the record says it
    with pytest.raises(TaskError) as e:
        list(eval_batches(j, tok, 16, 1, data_format="text", text_field="body"))
    one_line(e, f"{j}:1", "no 'body'", "--text-field")


def test_record_of_no_known_format(tmp_path, tok):
    p = write_parquet(tmp_path / "d.parquet", [{"text": "fine"}, {"question": "q", "answer": "a"}])
    s = packed_stream(p, tok, 16, 1, num_workers=1)
    with pytest.raises(TaskError) as e:
        take(s, 5)
    one_line(e, f"{p}[row 1]", "neither 'text' nor 'messages'", "keys: answer, question", "--text-field")
    s.close()


@pytest.mark.parametrize(
    "record,needle",
    [
        ({"conversations": [{"from": "robot", "value": "hi"}]}, "from 'robot'"),
        ({"conversations": []}, "non-empty list"),
        ({"instruction": "q", "output": 3}, "string 'output'"),
    ],
)
def test_bad_sharegpt_and_alpaca_records(tmp_path, tok, record, needle):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine"}, record])
    with pytest.raises(TaskError) as e:
        list(eval_batches(p, tok, 16, 1))
    one_line(e, f"{p}:2", needle)


def test_files_that_are_not_parquet_or_arrow(tmp_path):
    for name, kind in (("x.parquet", "parquet"), ("x.arrow", "Arrow IPC")):
        p = tmp_path / name
        p.write_text('{"text": "this is jsonl"}\n')
        with pytest.raises(TaskError) as e:
            parse_task_spec(str(p))
        one_line(e, str(p), f"not a readable {kind} file", "re-export")
    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": dataset([{"text": "a"}])}).save_to_disk(str(dd))
    with pytest.raises(TaskError) as e:
        parse_task_spec(str(dd))
    one_line(e, "DatasetDict", os.path.join(str(dd), "train"))


def test_hub_errors(tmp_path, hf_cache, monkeypatch):
    name = hf_cache("testorg/chat", {"train": mixed_records(4), "validation": []})
    assert parse_task_spec(f"{name}@train:0.5,{name}#default")[0].files == ("hf:testorg/chat@train",)
    with pytest.raises(TaskError) as e:
        parse_task_spec(f"{name}@validation")
    one_line(e, "hf:testorg/chat@validation", "no records", "@split")
    with pytest.raises(TaskError) as e:
        parse_task_spec(f"{name}@test")
    one_line(e, "hf:testorg/chat@test", "test", "train", "@split")
    with pytest.raises(TaskError) as e:
        parse_task_spec(f"{name}#nosuch")
    one_line(e, "hf:testorg/chat@train#nosuch", "nosuch", "#config")
    with pytest.raises(TaskError) as e:
        parse_task_spec("hf:testorg/missing@train:2")
    one_line(e, "hf:testorg/missing@train", "HF_HOME=", "datasets.load_dataset('testorg/missing', split='train')")
    with pytest.raises(TaskError) as e:
        parse_task_spec("hf:a/b/c")
    one_line(e, "hf:ORG/NAME[@split][#config]")
    monkeypatch.setattr(datasets, "__version__", "2.10.0")
    with pytest.raises(TaskError) as e:
        parse_task_spec("hf:testorg/other")
    one_line(e, "datasets >= 2.18", "2.10.0", "pip install")


# ------------------------------------------------------------------ exact resume
@pytest.mark.parametrize("kind", ["parquet", "arrow stream", "arrow file"])
def test_row_positions_seek_and_read_back(tmp_path, kind):
    from tasks import sources

    recs = [{"text": f"r{i}"} for i in range(3000)]
    p = {
        "parquet": lambda: write_parquet(tmp_path / "a.parquet", recs, row_group=700),
        "arrow stream": lambda: write_arrow(tmp_path / "a.arrow", recs, batch=300),
        "arrow file": lambda: write_arrow(tmp_path / "b.arrow", recs, batch=300, ipc_file=True),
    }[kind]()
    rows = random.Random(0).sample(range(3000), 200) + [0, 2999, 3000, 4000]
    got = sources.read_rows(p, rows)
    assert set(got) == {r for r in rows if r < 3000}
    assert all(got[r] == {"text": f"r{r}"} for r in got)
    f = sources.open_rows(p)
    for start in (0, 699, 700, 1401, 2999, 3, 2500, 3000):  # forward, across row groups, backward, the end
        f.seek(start)
        assert f.read() == (None if start == 3000 else {"text": f"r{start}"}), start
    f.seek(0)
    assert sum(1 for _ in iter(f.read, None)) == 3000
    f.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume_parquet_in_weighted_mixture(tmp_path, tok, hf_cache, workers):
    pq_path = write_parquet(tmp_path / "a.parquet", mixed_records(60, seed=2), row_group=9)
    other = {
        0: hf_cache("testorg/mix", {"train": mixed_records(23, seed=3)}),
        2: write_arrow(tmp_path / "b.arrow", mixed_records(23, seed=3), batch=4),
    }[workers]
    spec = f"{pq_path}:0.7,{other}:0.3"
    kw = dict(KW, num_workers=workers, prefetch=3)
    points = (0, 17, 71)
    full = packed_stream(spec, tok, **kw)
    ref, states = [], {}
    for k in range(86):
        if k in points:
            states[k] = json.loads(json.dumps(full.state_dict()))
        ref.append(next(full))
    assert all(e >= 1 for e in full.epochs.values()), full.epochs
    full.close()
    with packed_stream(spec, tok, **kw) as r:
        for k, state in states.items():  # load_state_dict restarts the same object at each point
            r.load_state_dict(state)
            same(ref[k : k + 12], take(r, 12))
            if k == 17:
                chained = json.loads(json.dumps(r.state_dict()))  # resume of a resumed stream
    with packed_stream(spec, tok, **kw) as r2:
        r2.load_state_dict(chained)
        same(ref[29:33], take(r2, 4))
    # a saved buffer of parquet rows is positions, not records: the state stays small
    assert len(json.dumps(states[17])) < 4000


@pytest.mark.parametrize("kind", ["arrow file", "save_to_disk"])
def test_exact_resume_other_sources(tmp_path, tok, kind):
    recs = mixed_records(31, seed=7)
    p = (
        write_arrow(tmp_path / "f.arrow", recs, ipc_file=True)
        if kind == "arrow file"
        else write_saved(tmp_path / "s", recs)
    )
    ref = take(packed_stream(p, tok, num_workers=0, **KW), 30)
    s = packed_stream(p, tok, num_workers=0, **KW)
    take(s, 11)
    state = json.loads(json.dumps(s.state_dict()))
    r = packed_stream(p, tok, num_workers=0, **KW)
    r.load_state_dict(state)
    same(ref[11:30], take(r, 19))


def test_resume_refuses_changed_parquet(tmp_path, tok):
    p = write_parquet(tmp_path / "a.parquet", mixed_records(30))
    s = packed_stream(p, tok, num_workers=0, **KW)
    take(s, 4)
    state = s.state_dict()
    write_parquet(p, mixed_records(31))
    with pytest.raises(TaskError) as e:
        packed_stream(p, tok, num_workers=0, **KW).load_state_dict(state)
    one_line(e, "changed since the checkpoint", "--resume-data")


# ------------------------------------------------------------------ streaming memory
def test_parquet_streams_in_constant_memory(tmp_path, tok):
    psutil = pytest.importorskip("psutil")
    rng = random.Random(3)
    recs = [{"text": f"<human>: {sentence(rng, 10, 30)}?\n<bot>: {sentence(rng, 20, 60)}."} for _ in range(5000)]
    p = write_parquet(tmp_path / "big.parquet", recs, row_group=500)  # ~1.5 MB of text, >> the shuffle buffer
    del recs
    s = packed_stream(p, tok, 256, 8, shuffle_buffer=200, num_workers=1)
    proc = psutil.Process()
    take(s, 60)
    gc.collect()
    rss0 = proc.memory_info().rss
    for _ in range(4):
        take(s, 60)
    gc.collect()
    grown = proc.memory_info().rss - rss0
    assert s.epochs[p] >= 1
    s.close()
    assert grown < 40 * 2**20, grown


# ------------------------------------------------------------------ flags
@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--data-format", "alpaca", "--text-field", "body"], "no effect with --data-format alpaca"),
        (["--data-format", "text", "--messages-field", "dialog"], "no effect with --data-format text"),
        (["--messages-field", " "], "--messages-field is empty"),
    ],
)
def test_data_format_flags_are_validated(argv, needle):
    from config import ArgumentError, check_settings, parse
    from config.rules import _check_data_format

    def checked(flags):
        job = parse(["--model-name", "m", *flags])
        check_settings(job)
        _check_data_format(job)
        return job

    with pytest.raises(ArgumentError, match=needle):
        checked(argv)
    ok = checked(["--data-format", "sharegpt", "--messages-field", "turns"]).data
    assert (ok.data_format, ok.text_field, ok.messages_field) == ("sharegpt", None, "turns")


# ------------------------------------------------------------------ a real kill and relaunch
READER = """
import hashlib, json, os, sys, time
sys.path.insert(0, {root!r})
from transformers import AutoTokenizer
from tests.helpers import packed_stream
spec, state_path, out_path, total = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
s = packed_stream(spec, AutoTokenizer.from_pretrained({tok!r}), **json.loads(sys.argv[5]))
served = 0
if os.path.exists(state_path):
    saved = json.load(open(state_path))
    s.load_state_dict(saved["state"])
    served = saved["served"]
with open(out_path, "a") as out:
    while served < total:
        b = next(s)
        out.write(hashlib.sha256(b["input_ids"].numpy().tobytes() + b["labels"].numpy().tobytes()).hexdigest() + "\\n")
        out.flush()
        served += 1
        with open(state_path + ".tmp", "w") as fh:  # the checkpoint: atomic, after the batch was used
            json.dump({{"state": s.state_dict(), "served": served}}, fh)
        os.replace(state_path + ".tmp", state_path)
        if served >= 40:  # leave the test time to kill it mid-run, however fast the machine
            time.sleep(0.02)
s.close()  # stop the loader thread before the interpreter exits (a thread left inside native code aborts it)
"""


@pytest.mark.e2e
def test_sigkill_and_relaunch_is_exact(tmp_path, tok):
    import hashlib
    import signal
    import subprocess
    import sys
    import time

    spec = (
        f"{write_parquet(tmp_path / 'a.parquet', mixed_records(300, seed=11), row_group=25)}:0.7,"
        f"{write_arrow(tmp_path / 'b.arrow', mixed_records(90, seed=12), batch=16)}:0.3"
    )
    kw = dict(seq_length=64, batch_size=4, seed=9, shuffle_buffer=32, num_workers=2)
    total = 120
    with packed_stream(spec, tok, **kw) as s:
        ref = [
            hashlib.sha256(b["input_ids"].numpy().tobytes() + b["labels"].numpy().tobytes()).hexdigest()
            for b in take(s, total)
        ]
    script = tmp_path / "reader.py"
    script.write_text(READER.format(root=ROOT, tok=TOKENIZER))
    state, out = tmp_path / "state.json", tmp_path / "hashes.txt"
    argv = [sys.executable, str(script), spec, str(state), str(out), str(total), json.dumps(kw)]
    proc = subprocess.Popen(argv)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # kill it mid-run, at whatever point it has reached
        if out.exists() and len(out.read_text().split()) >= 40:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    served = json.loads(state.read_text())["served"]
    assert 40 <= served < total, served
    before = out.read_text().split()[:served]  # a batch hashed after the last checkpoint is replayed
    out.unlink()
    subprocess.run(argv, check=True, timeout=120)
    assert before + out.read_text().split() == ref

"""Tests for tasks/preference.py: TRL's prompt / chosen / rejected records as token rows, truncation, batch layout and
order, exact resume, sources, refusals, evaluation batches and pair counts.

Expected tokens are computed from the tokenizer's own `tok(text, add_special_tokens=False)` on texts written out
here, not through the code under test."""

from __future__ import annotations

import copy
import json
import os
import random

import pytest
import torch

from tasks import PreferenceStream, TaskError, count_pairs, preference_evaluation_batches
from tests.helpers import REPO, data_config, packed_stream

EOS = 50256  # the bundled GPT-2 tokenizer's EOS, also its padding (it has no pad token)
WORDS = "apple river stone cloud quick brown fox lazy dog sun moon star tree house garden music paper".split()


def sentence(rng, lo=2, hi=10):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def standard_records(n, seed=0):
    rng = random.Random(seed)
    return [
        {"prompt": f"Q{i}: {sentence(rng)}?", "chosen": f" yes {i} {sentence(rng)}.", "rejected": f" no {i}."}
        for i in range(n)
    ]


def chat_records(n, seed=0):
    """Conversational pairs with an explicit prompt (some with a system message)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [{"role": "system", "content": "Be brief."}] if i % 3 == 0 else []
        prompt.append({"role": "user", "content": f"q{i} {sentence(rng)}?"})
        out.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": f"a{i} {sentence(rng)}."}],
                "rejected": [{"role": "assistant", "content": f"wrong {i} {sentence(rng, 1, 20)}."}],
            }
        )
    return out


def write_jsonl(path, records):
    with open(path, "w") as fh:
        for r in records:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def stream(spec, tok, S=32, B=2, dp_rank=0, dp_size=1, **settings):
    settings.setdefault("workers", 0)
    options = {k: settings.pop(k) for k in ("show_data", "prefetch", "show_every") if k in settings}
    data = data_config(spec, S, B, num_workers=settings.pop("workers"), **settings)
    return PreferenceStream(data, tok, dp_rank, dp_size, **options)


def take(s, n):
    return [next(s) for _ in range(n)]


def same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def expected_rows(prompt, completions, S):
    """input_ids and labels of the two rows of a pair, written out from token lists."""
    ids, labels = [], []
    for completion in completions:
        seq = prompt + completion
        assert len(seq) <= S, "the test's pair does not fit its seq_length"
        ids.append(seq + [EOS] * (S - len(seq)))
        labels.append([-100] * (len(prompt) - 1) + completion + [-100] * (S - len(seq) + 1))
    return torch.tensor(ids), torch.tensor(labels)


def check_pair(batch, i, prompt, chosen, rejected, S):
    ids, labels = expected_rows(prompt, [chosen, rejected], S)
    assert batch["input_ids"][2 * i : 2 * i + 2].tolist() == ids.tolist()
    assert batch["labels"][2 * i : 2 * i + 2].tolist() == labels.tolist()


# ------------------------------------------------------------------ records → tokens
def test_standard_pair_tokens(tmp_path, tok):
    rec = {"prompt": "What is two plus two?", "chosen": " Four.", "rejected": " Five, I think."}
    p = write_jsonl(tmp_path / "s.jsonl", [rec])
    batch = next(stream(p, tok, S=16, B=1))
    assert set(batch) == {"input_ids", "labels", "position_ids", "doc_ids"}
    for v in batch.values():
        assert v.dtype == torch.int64 and v.shape == (2, 16)
    prompt = enc(tok, rec["prompt"])
    check_pair(batch, 0, prompt, enc(tok, " Four.") + [EOS], enc(tok, " Five, I think.") + [EOS], 16)
    # the loss-taking labels are exactly the completion and its EOS; no BOS, one EOS
    assert [x for x in batch["labels"][0].tolist() if x != -100] == enc(tok, " Four.") + [EOS]
    assert batch["input_ids"][0, : len(prompt)].tolist() == prompt
    assert batch["position_ids"].tolist() == [list(range(16))] * 2
    assert not batch["doc_ids"].any()


def test_conversational_explicit_and_implicit_prompt_through_chat_template(tmp_path, chat_tok):
    system = {"role": "system", "content": "Be brief."}
    user, answer = {"role": "user", "content": "hi?"}, {"role": "assistant", "content": "hello."}
    follow = {"role": "user", "content": "and bye?"}
    good, bad = {"role": "assistant", "content": "goodbye."}, {"role": "assistant", "content": "no."}
    explicit = {"prompt": [system, user, answer, follow], "chosen": [good], "rejected": [bad]}
    implicit = {"chosen": [system, user, answer, follow, good], "rejected": [system, user, answer, follow, bad]}
    p = write_jsonl(tmp_path / "c.jsonl", [explicit, implicit])
    batch = next(stream(p, chat_tok, S=128, B=2, shuffle_buffer=1))
    prompt = enc(
        chat_tok,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi?<|im_end|>\n"
        "<|im_start|>assistant\nhello.<|im_end|>\n<|im_start|>user\nand bye?<|im_end|>\n<|im_start|>assistant\n",
    )
    chosen = enc(chat_tok, "goodbye.<|im_end|>\n") + [EOS]
    rejected = enc(chat_tok, "no.<|im_end|>\n") + [EOS]
    check_pair(batch, 0, prompt, chosen, rejected, 128)
    check_pair(batch, 1, prompt, chosen, rejected, 128)


def test_template_that_ends_turns_with_eos_gets_no_second_eos(tmp_path, tok):
    t = copy.deepcopy(tok)
    t.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<|endoftext|>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    rec = {
        "prompt": [{"role": "user", "content": "hi?"}],
        "chosen": [{"role": "assistant", "content": "hello."}],
        "rejected": [{"role": "assistant", "content": "go away."}],
    }
    batch = next(stream(write_jsonl(tmp_path / "e.jsonl", [rec]), t, S=24, B=1))
    prompt = enc(t, "<user>hi?<|endoftext|><assistant>")
    check_pair(batch, 0, prompt, enc(t, "hello.") + [EOS], enc(t, "go away.") + [EOS], 24)


def test_conversations_without_template_render_as_oig(tmp_path, tok):
    rec = {
        "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi?"}],
        "chosen": [{"role": "assistant", "content": "hello."}],
        "rejected": [{"role": "assistant", "content": "what."}],
    }
    batch = next(stream(write_jsonl(tmp_path / "o.jsonl", [rec]), tok, S=24, B=1))
    # the prompt ends at the <bot>: cue, as tools/chat.py feeds generate; the reply's leading space is its first token
    prompt = enc(tok, "Be kind.\n<human>: hi?\n<bot>:")
    check_pair(batch, 0, prompt, enc(tok, " hello.") + [EOS], enc(tok, " what.") + [EOS], 24)


# ------------------------------------------------------------------ truncation
def test_truncation_cuts_the_prompt_start_then_the_completion_end(tmp_path, tok):
    long_prompt = "one two three four five six seven eight nine ten eleven twelve"
    recs = [
        {"prompt": long_prompt, "chosen": " yes.", "rejected": " no, not at all."},  # prompt cut
        {"prompt": long_prompt, "chosen": " a b c d e f g h i j k l m n", "rejected": " no."},  # both cut
        {"prompt": "fits?", "chosen": " yes.", "rejected": " no."},  # fits
    ]
    S = 12
    P = enc(tok, long_prompt)
    assert len(P) == 12
    s = stream(write_jsonl(tmp_path / "t.jsonl", recs), tok, S=S, B=1, shuffle_buffer=1)
    b0 = next(s)
    # pair 0: the longer row (rejected) decides the cut; both rows keep the same prompt end
    c, r = enc(tok, " yes.") + [EOS], enc(tok, " no, not at all.") + [EOS]
    check_pair(b0, 0, P[len(P) - (S - len(r)) :], c, r, S)
    assert s.truncated_pairs == 1
    b1 = next(s)
    # pair 1: the prompt keeps its last token (which predicts the first reply token), the completion loses its end
    c = enc(tok, " a b c d e f g h i j k l m n")[: S - 1]
    check_pair(b1, 0, P[-1:], c, enc(tok, " no.") + [EOS], S)
    assert s.truncated_pairs == 2
    b2 = next(s)
    check_pair(b2, 0, enc(tok, "fits?"), enc(tok, " yes.") + [EOS], enc(tok, " no.") + [EOS], S)
    assert s.truncated_pairs == 2
    state = json.loads(json.dumps(s.state_dict()))
    assert state["truncated_pairs"] == 2 and state["pairs"] == 3
    resumed = stream(write_jsonl(tmp_path / "t.jsonl", recs), tok, S=S, B=1, shuffle_buffer=1)
    resumed.load_state_dict(state)
    assert resumed.truncated_pairs == 2
    same([next(resumed)], [next(s)])  # pair 0 of the second pass, truncated again
    assert resumed.truncated_pairs == s.truncated_pairs == 3


# ------------------------------------------------------------------ layout and order
def test_rows_and_order_with_shuffle_buffer_1(tmp_path, tok):
    recs = standard_records(10)
    p = write_jsonl(tmp_path / "o.jsonl", recs)
    S, B = 32, 3
    expected = [(enc(tok, r["prompt"]), enc(tok, r["chosen"]) + [EOS], enc(tok, r["rejected"]) + [EOS]) for r in recs]
    s = stream(p, tok, S=S, B=B, shuffle_buffer=1)
    batches = take(s, 5)
    for k, batch in enumerate(batches):  # step k = pairs [kB, (k+1)B) in file order, around the epoch end
        assert batch["input_ids"].shape == (2 * B, S)
        for i in range(B):
            check_pair(batch, i, *expected[(k * B + i) % 10], S)
    assert s.epochs == {p: 1} and s.pairs == 15
    # two replicas together hold the same pairs, chosen / rejected adjacent on one replica
    for workers in (0, 1):
        replicas = [stream(p, tok, S=S, B=B, dp_rank=r, dp_size=2, shuffle_buffer=1, workers=workers) for r in (0, 1)]
        halves = [take(r, 3) for r in replicas]
        assert [r.pairs for r in replicas] == [18, 18]  # counted over both replicas: their states are the same
        assert replicas[0].state_dict() == replicas[1].state_dict()
        whole = take(stream(p, tok, S=S, B=2 * B, shuffle_buffer=1), 3)
        for a, b, w in zip(*halves, whole):
            for key in w:
                assert torch.equal(torch.cat([a[key], b[key]]), w[key]), key


def mixture(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", standard_records(13, seed=1))
    b = write_jsonl(tmp_path / "b.jsonl", chat_records(9, seed=2))
    return f"{a}:2,{b}:1"


@pytest.mark.parametrize("workers", [0, 1])
def test_exact_resume(tmp_path, tok, workers):
    spec = mixture(tmp_path)
    kw = dict(S=24, B=2, shuffle_buffer=4, seed=3)
    full = take(stream(spec, tok, **kw, workers=workers), 20)
    s = stream(spec, tok, **kw, workers=workers, prefetch=3)
    head = take(s, 7)
    state = json.loads(json.dumps(s.state_dict()))  # what was handed out, not what was prefetched
    unprefetched = stream(spec, tok, **kw)
    take(unprefetched, 7)
    assert state == unprefetched.state_dict()
    assert len(json.dumps(state)) < 4000 and state["truncated_pairs"] > 0  # S=24 cuts some pairs
    s.close()
    resumed = stream(spec, tok, **kw, workers=workers)
    resumed.load_state_dict(state)
    assert resumed.epochs == state["epochs"] and resumed.truncated_pairs == state["truncated_pairs"]
    tail = take(resumed, 8)
    mid = json.loads(json.dumps(resumed.state_dict()))
    again = stream(spec, tok, **kw)
    again.load_state_dict(mid)  # a chained resume
    same(head + tail + take(again, 5), full)
    assert sum(again.epochs.values()) >= 2  # crossed epoch boundaries
    # another dp layout continues at the same pair
    halves = []
    for r in (0, 1):
        other = stream(spec, tok, S=24, B=1, dp_rank=r, dp_size=2, shuffle_buffer=4, seed=3)
        other.load_state_dict(state)
        halves.append(next(other))
    for key in halves[0]:
        assert torch.equal(torch.cat([halves[0][key], halves[1][key]]), full[7][key])


def test_parquet_and_arrow_sources_equal_jsonl(tmp_path, chat_tok):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    recs = chat_records(11, seed=4)
    implicit = [
        {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in recs
    ]  # the same pairs with an implicit prompt
    j = write_jsonl(tmp_path / "c.jsonl", recs)
    pq.write_table(pa.Table.from_pylist(recs), str(tmp_path / "c.parquet"), row_group_size=3)
    pq.write_table(pa.Table.from_pylist(implicit), str(tmp_path / "i.parquet"), row_group_size=4)
    with pa.OSFile(str(tmp_path / "c.arrow"), "wb") as sink:  # an Arrow IPC stream, as datasets writes
        table = pa.Table.from_pylist(recs)
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=4)
    kw = dict(S=48, B=3, shuffle_buffer=5, seed=1)
    want = take(stream(j, chat_tok, **kw), 6)
    for name in ("c.parquet", "i.parquet", "c.arrow"):
        same(take(stream(str(tmp_path / name), chat_tok, **kw), 6), want)
    # resume inside a parquet file, with records in the shuffle buffer
    s = stream(str(tmp_path / "c.parquet"), chat_tok, **kw)
    take(s, 2)
    resumed = stream(str(tmp_path / "c.parquet"), chat_tok, **kw)
    resumed.load_state_dict(json.loads(json.dumps(s.state_dict())))
    same(take(resumed, 4), want[2:])


# ------------------------------------------------------------------ refusals
def one_line(e, *needles):
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)


def test_sft_stream_refuses_a_preference_pair(tmp_path, tok):
    p = write_jsonl(tmp_path / "p.jsonl", [{"text": "<human>: hi\n<bot>: yo"}] + standard_records(2))
    s = packed_stream(p, tok, 16, 1, num_workers=0, shuffle_buffer=1)
    with pytest.raises(TaskError) as e:
        take(s, 10)
    one_line(e, f"{p}:2", "preference pair", "--objective dpo")


@pytest.mark.parametrize(
    "record,needles",
    [
        ({"text": "<human>: hi\n<bot>: yo"}, ["not a preference pair", "keys: text", "--objective sft"]),
        ({"messages": [{"role": "user", "content": "hi"}]}, ["not a preference pair", "--objective sft"]),
        ({"prompt": "q", "chosen": "a"}, ["not a preference pair", "keys: chosen, prompt"]),
        (
            {"prompt": "q", "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]},
            ["both be text", "str and list"],
        ),
        ({"prompt": "q", "chosen": "", "rejected": "b"}, ["'chosen' completion is empty"]),
        ({"chosen": "a", "rejected": "b"}, ["needs a text 'prompt'"]),
        (
            {
                "prompt": [{"role": "user", "content": "q"}],
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "  "}],
            },
            ["'rejected' completion is empty"],
        ),
        (
            {
                "prompt": [{"role": "user", "content": "q"}],
                "chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "more?"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            ["'chosen' completion ends with a user message", "role 'assistant'"],
        ),
        (
            {
                "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}],
            },
            ["no shared prompt"],
        ),
        (
            {
                "prompt": "q",
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            ["'prompt' must be a list of messages"],
        ),
        (
            {
                "prompt": [{"role": "robot", "content": "q"}],
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            ["prompt[0] has role 'robot'"],
        ),
    ],
)
def test_bad_records_name_file_line_and_fix(tmp_path, tok, record, needles):
    p = write_jsonl(tmp_path / "bad.jsonl", standard_records(1) + ["", json.dumps(record)])
    for workers in (0, 1):
        s = stream(p, tok, S=16, B=1, shuffle_buffer=1, workers=workers)
        next(s)
        with pytest.raises(TaskError) as e:
            next(s)
        one_line(e, f"{p}:3", *needles)
        with pytest.raises(TaskError):  # stays failed
            next(s)
        s.close()


def test_template_whose_prompt_is_not_a_prefix_is_refused(tmp_path, tok):
    t = copy.deepcopy(tok)  # marks the last message: the prompt's rendering is not a prefix of prompt + reply
    t.chat_template = (
        "{% for m in messages %}{% if loop.last %}[last]{% endif %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    )
    p = write_jsonl(tmp_path / "c.jsonl", chat_records(1))
    with pytest.raises(TaskError) as e:
        next(stream(p, t, S=32, B=1))
    one_line(e, f"{p}:1", "does not start with its rendering of the prompt", "standard (text) pairs")


@pytest.mark.parametrize(
    "setting,flag",
    [
        (dict(data_format="messages"), "--data-format"),
        (dict(text_field="body"), "--text-field"),
        (dict(train_on_inputs=True), "--train-on-inputs"),
        (dict(loss_on_bot_only=True), "--loss-on-bot-only"),
    ],
)
def test_sft_settings_are_refused(tmp_path, tok, setting, flag):
    p = write_jsonl(tmp_path / "s.jsonl", standard_records(2))
    with pytest.raises(TaskError) as e:
        stream(p, tok, **setting)
    one_line(e, flag, "does not apply to preference pairs")


def test_seq_length_must_hold_a_prompt_and_a_reply_token(tmp_path, tok):
    p = write_jsonl(tmp_path / "s.jsonl", standard_records(2))
    with pytest.raises(TaskError, match="at least 2"):
        stream(p, tok, S=1)
    batch = next(stream(p, tok, S=2, B=1))  # the prompt's last token and the reply's first, which is the one label
    assert [x for x in batch["labels"][0].tolist() if x != -100] == enc(tok, " yes 0")[:1]


def test_states_of_the_other_stream_and_changed_setups_are_refused(tmp_path, tok, chat_tok):
    p = write_jsonl(tmp_path / "s.jsonl", standard_records(6))
    sft = write_jsonl(tmp_path / "t.jsonl", [{"text": "<human>: hi\n<bot>: yo"}] * 4)
    s = stream(p, tok, S=32, B=2)
    take(s, 2)
    state = s.state_dict()
    packed = packed_stream(sft, tok, 16, 1, num_workers=0)
    with pytest.raises(TaskError) as e:  # a PackedStream does not take a pair stream's state
        packed.load_state_dict(state)
    one_line(e, "not a data-stream state")
    next(packed)
    with pytest.raises(TaskError) as e:
        stream(p, tok).load_state_dict(packed.state_dict())
    one_line(e, "SFT stream", "--resume-data restart")
    with pytest.raises(TaskError) as e:
        stream(p, tok, S=48).load_state_dict(state)
    one_line(e, "--seq-length changed", "--resume-data continue")
    relaxed = stream(p, tok, S=48, B=2)
    relaxed.load_state_dict(state, strict=False)  # --resume-data continue: the same pair, cut to the new length
    assert relaxed.pairs == 4 and next(relaxed)["input_ids"].shape == (4, 48)
    with pytest.raises(TaskError) as e:
        stream(p, chat_tok).load_state_dict(state)
    one_line(e, "the tokenizer")
    with pytest.raises(TaskError) as e:
        stream(p, tok, seed=9).load_state_dict(state)
    one_line(e, "--seed")
    other = write_jsonl(tmp_path / "o.jsonl", standard_records(6))
    with pytest.raises(TaskError) as e:
        stream(f"{p},{other}", tok).load_state_dict(state)
    one_line(e, "--task-name changed")
    write_jsonl(tmp_path / "s.jsonl", standard_records(7))
    with pytest.raises(TaskError) as e:
        stream(p, tok).load_state_dict(state)
    one_line(e, "files of task", "--resume-data continue")


# ------------------------------------------------------------------ evaluation, counting, SHOW_DATA, sample data
def test_evaluation_batches_in_file_order_with_pair_mask(tmp_path, tok):
    recs = standard_records(7, seed=5)
    p = write_jsonl(tmp_path / "e.jsonl", recs)
    S, B = 32, 2
    expected = [(enc(tok, r["prompt"]), enc(tok, r["chosen"]) + [EOS], enc(tok, r["rejected"]) + [EOS]) for r in recs]
    data = data_config(None, S, B)
    per_rank = [list(preference_evaluation_batches(p, tok, data, r, 2)) for r in (0, 1)]
    assert [len(b) for b in per_rank] == [2, 2]  # global batches of 4 pairs: 4 + 3 real
    order = {0: [[0, 1], [4, 5]], 1: [[2, 3], [6, None]]}
    for r, batches in enumerate(per_rank):
        for batch, pairs in zip(batches, order[r]):
            assert batch["input_ids"].shape == (2 * B, S) and batch["pair_mask"].dtype == torch.bool
            assert batch["pair_mask"].tolist() == [i is not None for i in pairs]
            for i, n in enumerate(pairs):
                if n is None:  # a dummy pair: padding, no labels
                    assert (batch["labels"][2 * i : 2 * i + 2] == -100).all()
                    assert (batch["input_ids"][2 * i : 2 * i + 2] == EOS).all()
                else:
                    check_pair(batch, i, *expected[n], S)
    # one replica: the same pairs as the training stream's first pass with --shuffle-buffer 1
    alone = list(preference_evaluation_batches(p, tok, data_config(None, S, 7)))
    assert len(alone) == 1 and alone[0]["pair_mask"].all()
    trained = next(stream(p, tok, S=S, B=7, shuffle_buffer=1))
    for key in trained:
        assert torch.equal(alone[0][key], trained[key])


def test_count_pairs(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    a = write_jsonl(tmp_path / "a.jsonl", standard_records(5) + [""] + standard_records(2))
    d = tmp_path / "d"
    d.mkdir()
    pq.write_table(pa.Table.from_pylist(chat_records(9)), str(d / "x.parquet"), row_group_size=4)
    write_jsonl(d / "y.jsonl", chat_records(3))
    assert count_pairs(f"{a}:3,{d}") == 7 + 12
    assert count_pairs([a, str(d)], per_task=True) == {a: 7, str(d): 12}


def test_show_data_prints_the_pair(tmp_path, tok, capsys):
    p = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "Hi?", "chosen": " Hello.", "rejected": " Go."}])
    take(stream(p, tok, S=16, B=1, show_data=True, show_every=2), 3)
    err = capsys.readouterr().err
    assert err.count("SHOW_DATA") == 2
    assert "Hi?[[ Hello.<|endoftext|>]]" in err and "Hi?[[ Go.<|endoftext|>]]" in err
    take(stream(p, tok, S=16, B=1, dp_rank=1, dp_size=2, show_data=True), 1)
    assert "SHOW_DATA" not in capsys.readouterr().err  # only dp rank 0 prints


def test_sample_preference_data(tok, chat_tok):
    train = os.path.join(REPO, "assets", "data", "sample_preferences.jsonl")
    held_out = os.path.join(REPO, "assets", "data", "sample_preferences_eval.jsonl")
    assert count_pairs(train) == 40 and count_pairs(held_out) == 8
    for t in (tok, chat_tok):
        s = stream(train, t, S=64, B=8, shuffle_buffer=40)
        take(s, 6)  # more than a pass
        assert s.truncated_pairs == 0 and s.epochs == {train: 1}
        assert [
            b["pair_mask"].sum().item() for b in preference_evaluation_batches(held_out, t, data_config(None, 64, 3))
        ] == [3, 3, 2]

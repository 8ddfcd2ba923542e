"""Tests for tasks/: spec parsing, rendering and masks, packing, determinism across layouts, exact resume,
streaming memory, gz, token counting cache, evaluation, SHOW_DATA."""

from __future__ import annotations

import copy
import gc
import gzip
import json
import os
import random
import re

import pytest
import torch

from tasks import Renderer, TaskError, count_tokens, parse_task_spec
from tasks.packing import document_inputs, document_lengths
from tasks.reader import Mixture
from tests.conftest import CHATML
from tests.helpers import eval_batches, packed_stream

EOS = 50256
WORDS = (
    "apple river stone cloud quick brown fox lazy dog sun moon star tree house garden music paper light "
    "window table chair road city water fire green blue red yellow small large happy"
).split()


def sentence(rng, lo=3, hi=20):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def text_records(n, seed=0, tag=""):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        turns = [
            f"<human>: {tag}{i} {sentence(rng)}?\n<bot>: {sentence(rng, 5, 40)}." for _ in range(rng.randint(1, 3))
        ]
        out.append({"text": "\n".join(turns)})
    return out


def message_records(n, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        msgs = [{"role": "system", "content": "Be brief."}] if i % 3 == 0 else []
        for _ in range(rng.randint(1, 3)):
            msgs += [
                {"role": "user", "content": f"q{i} {sentence(rng)}?"},
                {"role": "assistant", "content": f"a{i} {sentence(rng)}."},
            ]
        out.append({"messages": msgs})
    return out


def write_jsonl(path, records, gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wt") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    return str(path)


def take(stream, n):
    return [next(stream) for _ in range(n)]


def same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def trained_text(tok, batches):
    """Decoded label tokens that take loss, per row, joined."""
    out = []
    for b in batches:
        for row in b["labels"]:
            out.append(tok.decode([t for t in row.tolist() if t != -100]))
    return "".join(out)


# ------------------------------------------------------------------ spec parsing
def test_parse_spec_weights_and_dirs(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", text_records(3))
    d = tmp_path / "dir"
    d.mkdir()
    write_jsonl(d / "b.jsonl", text_records(2))
    write_jsonl(d / "a.jsonl.gz", text_records(2), gz=True)
    (d / "notes.txt").write_text("ignored")
    tasks = parse_task_spec(f"{a}:3,{d}")
    assert [t.raw_weight for t in tasks] == [3.0, 1.0]
    assert [t.weight for t in tasks] == [0.75, 0.25]
    assert [os.path.basename(f) for f in tasks[1].files] == ["a.jsonl.gz", "b.jsonl"]
    assert parse_task_spec(f" {a} ")[0].weight == 1.0
    dup = parse_task_spec(f"{a}:1,{a}:1")
    assert dup[0].name != dup[1].name


@pytest.mark.parametrize(
    "entry,needle",
    [
        ("{missing}", "no such file"),
        ("{a}:0", "positive"),
        ("{a}:-1", "positive"),
        ("{a}:abc", "not a number"),
        ("{a}:nan", "positive"),
        ("{empty}", "no .jsonl"),
        ("{txt}", "not a .jsonl"),
        ("{a},,{a}", "empty"),
    ],
)
def test_parse_spec_errors(tmp_path, entry, needle):
    a = write_jsonl(tmp_path / "a.jsonl", text_records(3))
    (tmp_path / "empty").mkdir()
    (tmp_path / "x.txt").write_text("{}")
    spec = entry.format(a=a, missing=tmp_path / "nope.jsonl", empty=tmp_path / "empty", txt=tmp_path / "x.txt")
    with pytest.raises(TaskError) as e:
        parse_task_spec(spec)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize(
    "line,needle",
    [
        ("{not json", "not valid JSON"),
        ('{"foo": 1}', "neither 'text' nor 'messages'"),
        ('{"messages": [{"role": "robot", "content": "hi"}]}', "role 'robot'"),
        ('{"messages": [{"role": "user"}]}', "content"),
        ('{"text": 5}', "must be a string"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, tok, line, needle):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"text": "fine"}) + "\n\n" + line + "\n")
    s = packed_stream(str(p), tok, 16, 1, num_workers=1)
    with pytest.raises(TaskError) as e:
        take(s, 5)
    assert f"{p}:3" in str(e.value) and needle in str(e.value)
    with pytest.raises(TaskError):  # stays failed
        next(s)
    s.close()


def test_task_without_records_is_an_error(tmp_path, tok):
    d = tmp_path / "d"
    d.mkdir()
    (d / "empty.jsonl").write_text("\n  \n")
    a = write_jsonl(tmp_path / "a.jsonl", text_records(3))
    s = packed_stream(f"{a},{d}", tok, 16, 1, num_workers=0)
    with pytest.raises(TaskError, match="has no records"):
        take(s, 50)


# ------------------------------------------------------------------ rendering and masks
def ordered(path, tok, S=32, **kw):
    """The whole file in order, packed (evaluation path, same rendering/masking as training)."""
    return list(eval_batches(path, tok, S, 2, **kw))


def test_text_records_train_everything_and_eos_once(tmp_path, tok):
    recs = text_records(20)
    p = write_jsonl(tmp_path / "t.jsonl", recs)
    batches = ordered(p, tok)
    stream = torch.cat([torch.cat([b["input_ids"][i] for i in range(len(b["input_ids"]))]) for b in batches])
    # rebuild the token stream from windows (inputs only; windows are contiguous since labels overlap)
    expect = []
    for r in recs:
        expect += tok(r["text"]).input_ids + [EOS]
    got = stream[: len(expect)].tolist()
    assert got == expect
    assert expect.count(EOS) == len(recs)
    for b in batches:  # every real label takes loss, and equals the next input
        lab, inp = b["labels"], b["input_ids"]
        real = lab != -100
        assert torch.equal(lab[:, :-1][real[:, :-1]], inp[:, 1:][real[:, :-1]])


def test_loss_on_bot_only(tmp_path, tok):
    rec = {"text": "<human>: hello there?\n<bot>: general kenobi.\n<human>: again?\n<bot>: yes indeed"}
    p = write_jsonl(tmp_path / "t.jsonl", [rec])
    got = trained_text(tok, ordered(p, tok, loss_on_bot_only=True))
    assert got == " general kenobi.\n yes indeed<|endoftext|>"
    got_all = trained_text(tok, ordered(p, tok))
    assert got_all.startswith("human>: hello") and got_all.endswith("yes indeed<|endoftext|>")


def test_messages_oig_masks(tmp_path, tok):
    rec = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi?"},
            {"role": "assistant", "content": "hello."},
            {"role": "user", "content": "bye?"},
            {"role": "assistant", "content": "goodbye."},
        ]
    }
    p = write_jsonl(tmp_path / "m.jsonl", [rec])
    batches = ordered(p, tok)
    assert trained_text(tok, batches) == " hello.\n goodbye.<|endoftext|>"
    text = "".join(tok.decode(b["input_ids"][r]) for b in batches for r in range(2))
    assert text.startswith("Be brief.\n<human>: hi?\n<bot>: hello.\n<human>: bye?\n<bot>: goodbye.<|endoftext|>")
    assert trained_text(tok, ordered(p, tok, train_on_inputs=True)).startswith(
        " brief.\n<human>: hi?\n<bot>: hello."
    )  # everything after the first token


def test_messages_chat_template_masks(tmp_path, chat_tok):
    rec = {
        "messages": [
            {"role": "user", "content": "hi?"},
            {"role": "assistant", "content": "hello."},
            {"role": "user", "content": "bye?"},
            {"role": "assistant", "content": "goodbye."},
        ]
    }
    p = write_jsonl(tmp_path / "m.jsonl", [rec])
    batches = ordered(p, chat_tok, S=64)
    assert trained_text(chat_tok, batches) == "hello.<|im_end|>\ngoodbye.<|im_end|>\n<|endoftext|>"
    inputs = chat_tok.decode(batches[0]["input_ids"][0])
    assert inputs.startswith("<|im_start|>user\nhi?<|im_end|>\n<|im_start|>assistant\nhello.<|im_end|>")
    everything = trained_text(chat_tok, ordered(p, chat_tok, S=64, train_on_inputs=True))
    assert everything.startswith("|im_start|>user\nhi?")


# The turn formats of the families' chat templates (Qwen's is CHATML, tests/conftest.py), each ending a turn its own way.
FAMILY_TEMPLATES = {
    "gemma": (
        "{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
        "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
        ["<start_of_turn>", "<end_of_turn>"],
        "hello.<end_of_turn>\ngoodbye.<end_of_turn>\n",
    ),
    "phi3": (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
        ["<|user|>", "<|assistant|>", "<|end|>"],
        "hello.<|end|>\ngoodbye.<|end|>\n",
    ),
    "llama3": (
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
        "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "hello.<|eot_id|>goodbye.<|eot_id|>",
    ),
}


@pytest.mark.parametrize("family", list(FAMILY_TEMPLATES))
def test_family_chat_templates_train_exactly_the_assistant_turns(tmp_path, tok, family):
    """Loss on each assistant reply and the marker that ends its turn, token by token; nothing of the user's turns
    or of the header that opens the reply."""
    template, specials, trained = FAMILY_TEMPLATES[family]
    t = copy.deepcopy(tok)
    t.add_special_tokens({"additional_special_tokens": specials})
    t.chat_template = template
    rec = {
        "messages": [
            {"role": "user", "content": "hi?"},
            {"role": "assistant", "content": "hello."},
            {"role": "user", "content": "bye?"},
            {"role": "assistant", "content": "goodbye."},
        ]
    }
    batches = ordered(write_jsonl(tmp_path / "m.jsonl", [rec]), t, S=64)
    labels = [x for b in batches for row in b["labels"] for x in row.tolist() if x != -100]
    assert labels == t.encode(trained, add_special_tokens=False) + [EOS]


@pytest.mark.parametrize("family", ["chatml", *FAMILY_TEMPLATES])
def test_the_token_that_ends_a_turn_is_read_from_each_template(tok, family):
    """What tools/chat.py stops generation at: the special token each template writes right after a reply."""
    template, specials, _ = FAMILY_TEMPLATES.get(family, (CHATML, ["<|im_start|>", "<|im_end|>"], ""))
    t = copy.deepcopy(tok)
    t.chat_template = template
    # Without the markers as special tokens, what follows a reply is plain text: no token to stop at.
    assert Renderer(t).end_of_turn_ids() == []
    t.add_special_tokens({"additional_special_tokens": specials})
    assert Renderer(t).end_of_turn_ids() == [t.convert_tokens_to_ids(specials[-1])]
    assert Renderer(tok).end_of_turn_ids() == []  # OIG turns end at "<human>:", text


def test_chat_template_fallback_when_prefix_renders_differ(tmp_path, chat_tok):
    t = copy.deepcopy(chat_tok)  # a template that marks the last message: prefixes are not prefixes of the whole
    t.chat_template = (
        "{% for m in messages %}{% if loop.last %}[last]{% endif %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
    )
    rec = {"messages": [{"role": "user", "content": "hi?"}, {"role": "assistant", "content": "hello there."}]}
    rec2 = {"messages": rec["messages"] + [{"role": "user", "content": "and?"}]}
    p = write_jsonl(tmp_path / "m.jsonl", [rec, rec2])
    # record 2: the span ends mid-token (".</" straddles it) and that token is trained: its first char is in the span
    assert trained_text(t, ordered(p, t, S=64)) == "hello there.</s><|endoftext|>hello there.</"


def test_tokenizer_added_specials(tmp_path, tok):
    from tokenizers.processors import TemplateProcessing

    bos_tok = copy.deepcopy(tok)
    bos_tok.add_special_tokens({"bos_token": "<s>"})
    bos = bos_tok.bos_token_id
    bos_tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    eos_tok = copy.deepcopy(tok)
    eos_tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", EOS)]
    )
    p = write_jsonl(
        tmp_path / "t.jsonl",
        [
            {"text": "hi there"},
            {"messages": [{"role": "user", "content": "q?"}, {"role": "assistant", "content": "a."}]},
        ],
    )
    for t, lead, _tail in ((bos_tok, [bos], []), (eos_tok, [], [])):
        b = ordered(p, t, S=32)[0]
        stream = torch.cat([b["input_ids"][0], b["input_ids"][1]]).tolist()
        doc1 = lead + tok("hi there").input_ids + [EOS]
        doc2 = lead + tok("<human>: q?\n<bot>: a.").input_ids + [EOS]
        assert stream[: len(doc1) + len(doc2)] == doc1 + doc2  # exactly one EOS per document
        # the messages record's BOS takes no loss; its assistant text and EOS do
        assert trained_text(t, [b]).endswith(" there<|endoftext|> a.<|endoftext|>")


def test_train_on_inputs_conflicts_with_bot_only(tmp_path, tok):
    p = write_jsonl(tmp_path / "t.jsonl", text_records(2))
    with pytest.raises(TaskError):
        packed_stream(p, tok, 16, 1, train_on_inputs=True, loss_on_bot_only=True)


# ------------------------------------------------------------------ packing windows
def test_windows_overlap_and_positions(tmp_path, tok):
    p = write_jsonl(tmp_path / "t.jsonl", text_records(60))
    S, B = 24, 3
    s = packed_stream(p, tok, S, B, num_workers=0)
    batches = take(s, 8)
    rows = [
        (b["input_ids"][i], b["labels"][i], b["position_ids"][i], b["doc_ids"][i]) for b in batches for i in range(B)
    ]
    for (inp, lab, pos, doc), (nxt, _, _, _) in zip(rows, rows[1:]):
        assert inp.dtype == torch.int64 and inp.shape == (S,)
        assert torch.equal(lab[:-1], inp[1:])  # text records: every label trained
        assert lab[-1] == nxt[0]  # the boundary token: label of the last position, first input of the next
        assert pos[0] == 0 and doc[0] == 0
        for t in range(1, S):
            if inp[t - 1] == EOS:
                assert pos[t] == 0 and doc[t] == doc[t - 1] + 1
            else:
                assert pos[t] == pos[t - 1] + 1 and doc[t] == doc[t - 1]
    for b in batches:  # the varlen attention's sequences: each row's documents, in order
        lengths = document_lengths(b["doc_ids"])
        for doc, row in zip(b["doc_ids"], lengths):
            assert torch.equal(torch.repeat_interleave(torch.arange(len(row)), row), doc)


def test_document_lengths_count_each_rows_documents_in_order():
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 3, 3]])
    assert document_lengths(doc_ids).tolist() == [[2, 3, 1, 0], [6, 0, 0, 0], [1, 3, 0, 2]]
    assert document_lengths(doc_ids).dtype == torch.int32
    with pytest.raises(ValueError, match="ascend along each row"):
        document_lengths(torch.tensor([[0, 1, 0]]))


def test_document_inputs_count_each_micro_batch_as_it_runs():
    """Lengths only when asked (varlen attention), per micro-batch on its first widths[i] columns, padded to one
    width: each row's lengths add up to the columns its micro-batch runs on."""
    doc_ids = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    batch = {"doc_ids": doc_ids, "position_ids": torch.zeros_like(doc_ids)}
    assert sorted(document_inputs(batch, torch.device("cpu"), lengths=False)) == ["doc_ids", "position_ids"]
    whole = document_inputs(batch, torch.device("cpu"), lengths=True, micro_batches=2)["doc_lengths"]
    assert torch.equal(whole, document_lengths(doc_ids))
    cut = document_inputs(batch, torch.device("cpu"), lengths=True, micro_batches=2, widths=[3, 6])["doc_lengths"]
    assert cut.tolist() == [[2, 1], [1, 2], [3, 3], [6, 0]]  # the cut rows hold fewer documents


# ------------------------------------------------------------------ determinism across layouts and workers
@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixed")
    a = write_jsonl(d / "a.jsonl", text_records(40, seed=1, tag="A"))
    sub = d / "sub"
    sub.mkdir()
    write_jsonl(sub / "b1.jsonl", message_records(15, seed=2))
    write_jsonl(sub / "b2.jsonl.gz", text_records(10, seed=3, tag="B"), gz=True)
    return f"{a}:0.6,{sub}:0.4"


def test_same_global_batches_across_dp_layouts_and_workers(mixed_data, tok):
    kw = dict(seq_length=32, seed=7, shuffle_buffer=8, chunk_docs=16)
    ref = take(packed_stream(mixed_data, tok, batch_size=4, num_workers=0, **kw), 25)
    for workers in (1, 2):
        s = packed_stream(mixed_data, tok, batch_size=4, num_workers=workers, **kw)
        same(ref, take(s, 25))
        s.close()
    r0 = packed_stream(mixed_data, tok, batch_size=2, dp_rank=0, dp_size=2, num_workers=2, **kw)
    r1 = packed_stream(mixed_data, tok, batch_size=2, dp_rank=1, dp_size=2, num_workers=1, **kw)
    for b, x, y in zip(ref, take(r0, 25), take(r1, 25)):
        for k in b:
            assert torch.equal(b[k], torch.cat([x[k], y[k]])), k
    assert r0.state_dict() == r1.state_dict()
    r0.close(), r1.close()
    other_seed = take(packed_stream(mixed_data, tok, batch_size=4, num_workers=0, **{**kw, "seed": 8}), 3)
    assert not torch.equal(other_seed[0]["input_ids"], ref[0]["input_ids"])


# ------------------------------------------------------------------ exact resume
@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume(mixed_data, tok, workers):
    kw = dict(seq_length=32, batch_size=3, seed=3, shuffle_buffer=8, chunk_docs=16, num_workers=workers, prefetch=3)
    points = (0, 1, 7, 23, 41, 90)
    full = packed_stream(mixed_data, tok, **kw)
    ref, states = [], {}
    for k in range(102):  # several epochs of the small task files
        if k in points:  # taken while the loader thread has prefetched ahead
            states[k] = json.loads(json.dumps(full.state_dict()))
        ref.append(next(full))
    epochs = full.epochs
    assert all(e >= 1 for e in epochs.values()), epochs
    full.close()
    for k, state in states.items():
        r = packed_stream(mixed_data, tok, **kw)
        r.load_state_dict(state)
        same(ref[k : k + 12], take(r, 12))
        if k == 23:  # resuming twice from the same state in one object
            r.load_state_dict(state)
            same(ref[k : k + 2], take(r, 2))
        r.close()


def test_resume_state_is_small_and_mid_buffer(tmp_path, tok):
    p = write_jsonl(tmp_path / "t.jsonl", text_records(50, seed=5))
    kw = dict(seq_length=16, batch_size=2, shuffle_buffer=20, num_workers=0, chunk_docs=3)
    s = packed_stream(p, tok, **kw)
    ref, states = [], {}
    for k in range(127):
        if k in (9, 33, 70, 101):
            states[k] = json.loads(json.dumps(s.state_dict()))
        ref.append(next(s))
    sizes = []
    for k, st in states.items():
        sizes.append(len(st["position"]["source"]["tasks"][0]["buffer"]))
        assert len(json.dumps(st)) < 4000
        r = packed_stream(p, tok, **kw)
        r.load_state_dict(st)
        same(ref[k : k + 25], take(r, 25))
    assert max(sizes) <= 20 and any(0 < n < 20 for n in sizes), sizes  # includes a partly full shuffle buffer
    # chained resumes (state taken from a resumed stream, inside the document it resumed in)
    s = packed_stream(p, tok, **kw)
    at = 0
    for step in (5, 1, 1, 7, 30):
        st = json.loads(json.dumps(s.state_dict()))
        s = packed_stream(p, tok, **kw)
        s.load_state_dict(st)
        same(ref[at : at + step], take(s, step))
        at += step


def test_resume_into_other_dp_layout_and_unclosed_stream_is_collected(mixed_data, tok):
    import threading

    kw = dict(seq_length=32, seed=7, shuffle_buffer=8, chunk_docs=16)
    s = packed_stream(mixed_data, tok, batch_size=4, num_workers=1, **kw)
    ref = take(s, 12)
    s.close()
    s = packed_stream(mixed_data, tok, batch_size=4, num_workers=1, **kw)
    take(s, 5)
    st = json.loads(json.dumps(s.state_dict()))
    del s  # not closed: collecting it stops its loader thread
    gc.collect()
    ranks = []
    for r in range(2):
        x = packed_stream(mixed_data, tok, batch_size=2, dp_rank=r, dp_size=2, num_workers=1, **kw)
        x.load_state_dict(st)
        ranks.append(take(x, 7))
        del x
    for b, x, y in zip(ref[5:], *ranks):
        for k in b:
            assert torch.equal(b[k], torch.cat([x[k], y[k]])), k
    gc.collect()
    for _ in range(50):
        if not any(t.name == "tasks-loader" for t in threading.enumerate()):
            break
        import time

        time.sleep(0.1)
    assert not any(t.name == "tasks-loader" for t in threading.enumerate())


def test_resume_rejects_changed_setup(mixed_data, tok):
    s = packed_stream(mixed_data, tok, 16, 2, num_workers=0)
    take(s, 2)
    st = s.state_dict()
    other = packed_stream(mixed_data, tok, 16, 2, seed=1, num_workers=0)
    with pytest.raises(TaskError, match="--seed"):
        other.load_state_dict(st)
    with pytest.raises(TaskError, match="format"):
        other.load_state_dict({"x": 1})
    reread = packed_stream(mixed_data, tok, 16, 2, num_workers=0, data_format="text")
    with pytest.raises(TaskError, match="--data-format 'auto' → 'text'.*--resume-data restart"):
        reread.load_state_dict(st)
    masked = packed_stream(mixed_data, tok, 16, 2, num_workers=0, train_on_inputs=True)
    with pytest.raises(TaskError, match="--train-on-inputs False → True.*--resume-data continue"):
        masked.load_state_dict(st)
    masked.load_state_dict(st, strict=False)  # --resume-data continue: on with the new setting
    older = {k: v for k, v in st.items() if k not in ("record_format", "loss_masking")}  # written before either
    packed_stream(mixed_data, tok, 16, 2, num_workers=0).load_state_dict(older)


# ------------------------------------------------------------------ sampling, memory, gz
def test_weighted_sampling_proportions(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", text_records(30, tag="A"))
    b = write_jsonl(tmp_path / "b.jsonl", text_records(30, tag="B"))
    mix = Mixture(parse_task_spec(f"{a}:3,{b}:1"), seed=0, buffer_size=10)
    n = 8000
    picks = [mix.next_doc()[0] for _ in range(n)]
    frac = picks.count(0) / n
    assert abs(frac - 0.75) < 0.02, frac
    assert mix.readers[0].epoch >= 190 and mix.readers[1].epoch >= 60


def test_constant_memory_streaming(tmp_path, tok):
    psutil = pytest.importorskip("psutil")
    p = write_jsonl(tmp_path / "big.jsonl", text_records(6000, seed=9))  # ~2 MB, >> shuffle buffer
    s = packed_stream(p, tok, 256, 8, shuffle_buffer=200, num_workers=1)
    proc = psutil.Process()
    take(s, 150)  # warm up (~1/2 pass)
    gc.collect()
    rss0 = proc.memory_info().rss
    for _ in range(4):
        take(s, 150)
    gc.collect()
    grown = proc.memory_info().rss - rss0
    assert s.epochs[p] >= 1
    s.close()
    assert grown < 40 * 2**20, grown


def test_gz_same_as_plain(tmp_path, tok):
    recs = text_records(30, seed=4)
    plain = write_jsonl(tmp_path / "x.jsonl", recs)
    gz = write_jsonl(tmp_path / "x.jsonl.gz", recs, gz=True)
    kw = dict(seq_length=16, batch_size=2, shuffle_buffer=5, num_workers=0)
    ref = take(packed_stream(plain, tok, **kw), 30)
    s = packed_stream(gz, tok, **kw)
    same(ref[:11], take(s, 11))
    st = json.loads(json.dumps(s.state_dict()))
    r = packed_stream(gz, tok, **kw)
    r.load_state_dict(st)
    same(ref[11:], take(r, 19))


def broken_gz(path, how):
    """A .jsonl.gz of 200 records, cut in half ("truncated") or plain JSON lines under a .gz name ("plain")."""
    if how == "plain":
        return write_jsonl(path, text_records(200, seed=2))
    write_jsonl(path, text_records(200, seed=2), gz=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return str(path)


@pytest.mark.parametrize("how", ["truncated", "plain"])
def test_corrupt_gz_names_file_and_fix(tmp_path, tok, how):
    p = broken_gz(tmp_path / "x.jsonl.gz", how)
    readers = {
        "training": lambda: take(packed_stream(p, tok, 16, 2, shuffle_buffer=5, num_workers=1), 500),
        "evaluation": lambda: list(eval_batches(p, tok, 16, 2)),
        "token count": lambda: count_tokens(p, tok, use_cache=False),
    }
    for what, read in readers.items():
        with pytest.raises(TaskError) as e:
            read()
        msg = str(e.value)
        assert f"cannot read {p}:" in msg and "re-download" in msg and "\n" not in msg, (what, msg)
    if how == "truncated":  # the line the cut falls in: records before it were read
        assert re.search(rf"{re.escape(p)}:([1-9]\d*): Compressed file ended", msg), msg


def test_gz_truncated_after_checkpoint_fails_on_resume(tmp_path, tok):
    path = tmp_path / "x.jsonl.gz"
    p = write_jsonl(path, text_records(200, seed=2), gz=True)
    kw = dict(seq_length=16, batch_size=2, shuffle_buffer=5, num_workers=0, chunk_docs=3)
    s = packed_stream(p, tok, **kw)
    take(s, 20)
    st = json.loads(json.dumps(s.state_dict()))
    path.write_bytes(path.read_bytes()[:30])  # now ends well before the saved position
    r = packed_stream(p, tok, **kw)
    r.load_state_dict(st, strict=False)  # --resume-data continue: seeks to the saved offset
    line = st["position"]["source"]["tasks"][0]["line"]
    assert line > 0
    with pytest.raises(TaskError, match=re.escape(f"cannot read {p} (skipping to line {line + 1}): ")):
        next(r)


# ------------------------------------------------------------------ token counting
def test_count_tokens_cached(tmp_path, tok, monkeypatch):
    import tasks.count as count_mod

    recs = text_records(40, seed=6)
    p = write_jsonl(tmp_path / "c.jsonl", recs)
    m = write_jsonl(tmp_path / "m.jsonl", message_records(10))
    expect = sum(len(tok(r["text"]).input_ids) + 1 for r in recs)
    calls = []
    real = count_mod.count_file
    monkeypatch.setattr(count_mod, "count_file", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    n = count_tokens(f"{p}:2,{m}", tok, per_task=True)
    assert n[p] == expect and len(calls) == 2
    assert os.path.exists(tmp_path / ".c.jsonl.token_count.json")
    assert count_tokens(f"{p}:2,{m}", tok) == expect + n[m]
    assert len(calls) == 2  # cache hit: nothing re-tokenised
    # the count agrees with the packed evaluation stream (non-padding tokens)
    toks = sum(int((b["labels"] != -100).sum()) for b in eval_batches(p, tok, 32, 2))
    assert toks == expect - 1  # every token but the first is a label
    # a changed file is recounted
    write_jsonl(tmp_path / "c.jsonl", recs[:10])
    os.utime(p, ns=(1, 1))
    count_tokens(p, tok)
    assert len(calls) == 3


def test_count_tokens_unwritable_dir_falls_back(tmp_path, tok, monkeypatch):
    import tasks.count as count_mod

    p = write_jsonl(tmp_path / "c.jsonl", text_records(5))
    (tmp_path / ".c.jsonl.token_count.json").mkdir()  # the data-dir cache cannot be written (even as root)
    monkeypatch.setattr(count_mod, "_fallback_dirs", lambda: [str(tmp_path / "usercache")])
    calls = []
    real = count_mod.count_file
    monkeypatch.setattr(count_mod, "count_file", lambda *a, **k: calls.append(1) or real(*a, **k))
    n = count_tokens(p, tok)
    assert len(os.listdir(tmp_path / "usercache")) == 1
    assert count_tokens(p, tok) == n and len(calls) == 1


def test_count_tokens_draws_a_bar_only_when_asked(tmp_path, tok, monkeypatch, capsys):
    """SHOW_PROGRESS=1: a bar over the records of each file counted, on stderr; SHOW_PROGRESS=0: nothing printed."""
    pytest.importorskip("tqdm")
    p = write_jsonl(tmp_path / "c.jsonl", text_records(5))
    monkeypatch.setenv("SHOW_PROGRESS", "1")
    n = count_tokens(p, tok, use_cache=False)
    err = capsys.readouterr().err
    assert "counting tokens of c.jsonl (file 1/1)" in err and "record" in err, err
    monkeypatch.setenv("SHOW_PROGRESS", "0")
    assert count_tokens(p, tok, use_cache=False) == n
    assert capsys.readouterr() == ("", "")


# ------------------------------------------------------------------ evaluation
def test_evaluation_reads_each_record_once_padded(tmp_path, tok):
    recs = text_records(23, seed=8)
    p = write_jsonl(tmp_path / "e.jsonl", recs)
    S, B = 32, 2
    per_rank = [list(eval_batches(p, tok, S, B, dp_rank=r, dp_size=2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) > 0
    rows = []
    for b0, b1 in zip(*per_rank):
        for b in (b0, b1):
            assert b["input_ids"].shape == (B, S) and b["labels"].dtype == torch.int64
            rows += [(b["input_ids"][i], b["labels"][i]) for i in range(B)]
    expect = []
    for r in recs:
        expect += tok(r["text"]).input_ids + [EOS]
    labels = [t for _, lab in rows for t in lab.tolist() if t != -100]
    assert labels == expect[1:]  # each record exactly once, in order
    assert rows[-1][1].eq(-100).all()  # padding window at the end (23 records don't fill the last batch)
    again = list(eval_batches(p, tok, S, B, dp_rank=0, dp_size=2))
    same(per_rank[0], again)


# ------------------------------------------------------------------ SHOW_DATA
def test_show_data(tmp_path, tok, monkeypatch, capsys):
    rec = {"messages": [{"role": "user", "content": "hi?"}, {"role": "assistant", "content": "hello."}]}
    p = write_jsonl(tmp_path / "m.jsonl", [rec] * 5)
    monkeypatch.setenv("SHOW_DATA", "1")
    monkeypatch.setenv("SHOW_DATA_EVERY", "2")
    s = packed_stream(p, tok, 32, 1, num_workers=0)
    take(s, 3)
    err = capsys.readouterr().err
    assert err.count("SHOW_DATA batch") == 2 and "[[ hello.<|endoftext|>]]" in err


@pytest.mark.parametrize("value", ["abc", "0", "-3", "2.5"])
def test_show_data_every_must_be_positive_integer(tmp_path, tok, monkeypatch, value):
    p = write_jsonl(tmp_path / "t.jsonl", text_records(3))
    monkeypatch.setenv("SHOW_DATA", "1")
    monkeypatch.setenv("SHOW_DATA_EVERY", value)
    with pytest.raises(TaskError) as e:
        packed_stream(p, tok, 16, 1, num_workers=0)
    assert f"SHOW_DATA_EVERY={value!r}" in str(e.value) and ">= 1" in str(e.value)

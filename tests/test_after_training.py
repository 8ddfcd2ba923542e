"""After training: chatting with the result (tools/chat.py), curves (tools/plot_metrics.py), TensorBoard, progress
bars and a complete export. The e2e test runs the whole loop: data -> pipeline training -> checkpoint -> chat."""

import contextlib
import io
import json
import os
import struct
import sys

import pytest
import torch

from config import LogConfig, parse_backends
from tests.helpers import TOKENIZER, base_flags, run_job
from tools import chat as chat_tool
from training.curves import MetricsError, plot_metrics
from utils.logging import make_logger
from utils.progress import progress_enabled

EOS = 50256  # <|endoftext|> of the bundled GPT-2 tokenizer


def walsh(k: int, dim: int) -> torch.Tensor:
    """Row k of a Walsh-Hadamard matrix: ±1 entries, zero mean for k > 0, orthogonal rows, LayerNorm leaves it be."""
    return torch.tensor([(-1.0) ** bin(i & k).count("1") for i in range(dim)])


def make_chain_model(path, text_chain: list[str], end: int | None = EOS, hidden=32, tokenizer=None, start=">:"):
    """A tiny GPT-NeoX whose next token depends only on the current one: every block's output projections are
    zero, so the last hidden state is LayerNorm(embedding). Embeddings and head rows are orthogonal Walsh rows, so
    greedy decoding after a prompt ending in the token `start` (`>:`, the end of `<bot>:`) emits the tokens of
    `text_chain`, then `end`. Saved with `tokenizer` (the bundled one) as a Hugging Face folder: what an export is."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tools.make_tiny_model import build_config

    tokenizer = tokenizer or AutoTokenizer.from_pretrained(TOKENIZER)
    chain = [tokenizer.convert_tokens_to_ids(start)]
    for piece in text_chain:
        chain += tokenizer(piece)["input_ids"]
    if end is not None:
        chain.append(end)
    config = build_config("gptneox", hidden, 2, 4, 50304, 256)
    config.eos_token_id = config.bos_token_id = EOS
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("attention.dense", "mlp.dense_4h_to_h")):
                module.weight.zero_()
                module.bias.zero_()
        embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        head.zero_()
        for j, (token, following) in enumerate(zip(chain, chain[1:]), start=1):
            if j > 1 and token in chain[: j - 1]:
                raise ValueError(f"token {token} repeats in the chain: its successor would be ambiguous")
            embed[token] = walsh(j, hidden)
            head[following] = walsh(j, hidden)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# tools/chat.py
# ---------------------------------------------------------------------------------------------------------------


def test_chat_prompt_prints_one_reply_that_ends_at_eos(tmp_path, capsys):
    # chat.py's main() in this process: the command line itself runs in test_demo (a launch costs ~10 s here)
    model = make_chain_model(tmp_path / "export", [" Hello world"])
    code = chat_tool.main([model, "--prompt", "Hi", "--temperature", "0", "--max-new-tokens", "20", "--verbose"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out == "Hello world\n"
    # " Hello", " world", EOS: three tokens of the twenty allowed, so generation ended at the EOS token.
    assert "[3 tokens, stopped at eos]" in err


def test_chat_stops_at_the_next_human_turn_and_keeps_the_conversation(tmp_path):
    # The model goes on with "\n<human>:" after its reply, as OIG-trained models do when no EOS comes.
    path = make_chain_model(tmp_path / "export", [" Hello world", "\n<human>:"], end=None)
    with contextlib.ExitStack() as stack:
        model, tokenizer = chat_tool.load_model(path, "cpu", stack)
        chat = chat_tool.Chat(model, tokenizer, max_new_tokens=40, temperature=0)
        streamed = []
        reply = chat.reply("Hi", write=streamed.append)
        assert (reply.text, reply.stop) == ("Hello world", "human")
        assert "".join(streamed) == "Hello world"  # neither the newline nor any of "<human>:" was shown
        assert reply.tokens < 40
        chat.reply("And again?")
        prompt, _ = chat.renderer.render_prompt(chat.messages[:-1])
        assert prompt == "<human>: Hi\n<bot>: Hello world\n<human>: And again?\n<bot>:"


def test_chat_stops_at_the_chat_templates_end_of_turn(tmp_path):
    # A ChatML model goes on past its reply's <|im_end|> (the next user turn, then more): the reply must end there,
    # although the model's EOS is another token and its generation_config names only that one.
    from transformers import AutoTokenizer

    from tests.conftest import CHATML

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    path = make_chain_model(
        tmp_path / "export", [" Hello world", "<|im_end|>", "<|im_start|> user more"], tokenizer=tokenizer, start="Ċ"
    )
    with contextlib.ExitStack() as stack:
        model, tokenizer = chat_tool.load_model(path, "cpu", stack)
        chat = chat_tool.Chat(model, tokenizer, max_new_tokens=40, temperature=0)
        assert chat.stop_ids == [EOS, im_end]
        reply = chat.reply("Hi")
    assert (reply.text, reply.stop, reply.tokens) == ("Hello world", "end of turn", 3)


def test_chat_loads_a_peft_adapter_on_its_base(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = make_chain_model(tmp_path / "base", [" Hello world"])
    lora = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), peft.LoraConfig(r=2, target_modules=["query_key_value"])
    )
    lora.save_pretrained(str(tmp_path / "adapter"))
    with contextlib.ExitStack() as stack:
        model, tokenizer = chat_tool.load_model(str(tmp_path / "adapter"), "cpu", stack)
        assert isinstance(model, peft.PeftModel)
        reply = chat_tool.Chat(model, tokenizer, temperature=0).reply("Hi")
    assert (reply.text, reply.stop) == ("Hello world", "eos")  # a fresh LoRA (B = 0) leaves the base's answer


def test_chat_on_a_folder_without_a_model_says_so_in_one_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a model")
    assert chat_tool.main([str(tmp_path), "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no model here" in err and str(tmp_path) in err


# ---------------------------------------------------------------------------------------------------------------
# training/curves.py (tools/plot_metrics.py is its command line)
# ---------------------------------------------------------------------------------------------------------------


def png_size(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", "not a PNG file"
    return struct.unpack(">II", head[16:24])


def write_metrics(path, steps, scale, truncated=False):
    with open(path, "w") as f:
        for step in steps:
            record = {"step": step, "loss": scale * 10 / step, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 900.0}
            record.update(mfu=0.4, mem_gb_per_rank=[1.5, 2.5])
            if step % 5 == 0:
                record["valid.loss"] = scale * 12 / step
            f.write(json.dumps(record) + "\n")
        if truncated:
            f.write('{"step": 99, "lo')  # a run killed mid-write


def test_plot_metrics_draws_a_png_of_the_expected_size(tmp_path):
    os.makedirs(tmp_path / "run_a")
    write_metrics(tmp_path / "run_a" / "metrics.jsonl", range(1, 21), 1.0, truncated=True)
    write_metrics(tmp_path / "b.jsonl", range(1, 11), 2.0)
    out = tmp_path / "curves" / "curves.png"
    plot_metrics([str(tmp_path / "run_a" / "metrics.jsonl"), str(tmp_path / "b.jsonl")], str(out))
    assert png_size(out) == (1500, 900)
    assert os.path.getsize(out) > 20_000  # six panels of curves, not an empty canvas
    assert not [n for n in os.listdir(out.parent) if n != "curves.png"]  # the temporary file was renamed

    (tmp_path / "bad.jsonl").write_text('{"loss": 1}\n{"step": 2, "loss": 1}\n')
    with pytest.raises(MetricsError, match=r"bad.jsonl:1: not a JSON object with a 'step'"):
        plot_metrics([str(tmp_path / "bad.jsonl")], str(tmp_path / "bad.png"))


def test_the_trainer_draws_its_curves_in_a_process_of_its_own_and_logs_a_failure_once(tmp_path):
    """StepLog.draw_curves runs tools/plot_metrics.py beside training (no interpreter lock shared with the loop): the
    PNG appears once the draw ends, a draw asked for while one runs is skipped, and a failed draw is one warning."""
    from types import SimpleNamespace

    from training.step_log import StepLog

    write_metrics(tmp_path / "metrics.jsonl", range(1, 6), 1.0)
    lines = []
    log = SimpleNamespace(info=lines.append, close=lambda: None)
    cfg = SimpleNamespace(metrics_file=str(tmp_path / "metrics.jsonl"), curves_file=str(tmp_path / "curves.png"))
    step_log = StepLog(cfg, log, SimpleNamespace(is_logger=True), meter=None, clock=None)
    step_log.draw_curves()
    running = step_log.curves
    step_log.draw_curves()  # the first draw is still starting: left to finish, not doubled
    assert step_log.curves is running
    step_log.close()
    assert png_size(tmp_path / "curves.png") == (1500, 900) and lines == []

    (tmp_path / "metrics.jsonl").write_text('{"loss": 1}\n')
    step_log.draw_curves()
    step_log.close()
    assert len(lines) == 1 and "WARNING: could not draw" in lines[0] and ": no metrics in it" in lines[0], lines


# ---------------------------------------------------------------------------------------------------------------
# TensorBoard backend, backend lists, progress switch
# ---------------------------------------------------------------------------------------------------------------


def read_scalars(log_dir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_tensorboard_backend_writes_the_logged_scalars(tmp_path, capsys):
    log = make_logger(LogConfig(backend="print,tensorboard", tensorboard_dir=str(tmp_path / "tb")), True, {"lr": 1e-3})
    for step in (1, 2, 3):
        log.metrics(step, {"loss": 4.0 / step, "lr": 1e-3 * step, "mem_gb_per_rank": [1.0, 2.0 + step]})
    log.metrics(3, {"valid.loss": 2.5, "valid.perplexity": 12.2})
    log.close()
    scalars = read_scalars(tmp_path / "tb")
    assert scalars["loss"] == pytest.approx({1: 4.0, 2: 2.0, 3: 4.0 / 3})
    assert scalars["lr"] == pytest.approx({1: 1e-3, 2: 2e-3, 3: 3e-3})
    assert scalars["mem_gb_per_rank/1"] == pytest.approx({1: 3.0, 2: 4.0, 3: 5.0})
    assert scalars["valid.loss"] == pytest.approx({3: 2.5})
    assert capsys.readouterr().out.count("step 1 loss=4") == 1  # the text line once, not once per backend


def test_log_backend_lists():
    assert parse_backends("print,tensorboard") == ["print", "tensorboard"]
    assert parse_backends(" wandb , print,wandb") == ["wandb", "print"]
    with pytest.raises(ValueError, match="unknown backend 'tensorbord'"):
        parse_backends("print,tensorbord")


def test_progress_bars_only_on_the_logging_rank_and_when_asked(monkeypatch):
    monkeypatch.setenv("SHOW_PROGRESS", "1")
    assert progress_enabled(True) and not progress_enabled(False)
    monkeypatch.setenv("SHOW_PROGRESS", "0")
    assert not progress_enabled(True)
    monkeypatch.delenv("SHOW_PROGRESS")
    assert progress_enabled(True) == sys.stderr.isatty()


# ---------------------------------------------------------------------------------------------------------------
# The whole loop
# ---------------------------------------------------------------------------------------------------------------

QA = [
    ("What colour is the sky?", "The sky is blue."),
    ("What do bees make?", "Bees make honey."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the capital of France?", "Paris is the capital of France."),
]


@pytest.mark.e2e
def test_a_model_trained_on_questions_answers_them_through_chat(tmp_path):
    from tests.helpers import make_model

    model_dir = make_model(tmp_path / "tiny", hidden=64, layers=2, heads=4)
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"text": f"<human>: {q}\n<bot>: {a}"}) + "\n" for q, a in QA))
    ckpt = tmp_path / "ckpt"
    flags = base_flags(
        model_dir,
        str(data),
        str(ckpt),
        **{
            "seq-length": 64,
            "micro-batch-size": 2,
            "total-steps": 120,
            "warmup-steps": 5,
            "lr": 5e-3,
            "pipeline-group-size": 2,
            "log-interval": 10,
            "metrics-file": str(ckpt / "metrics.jsonl"),
            "train-log-backend": "print,tensorboard",
        },
    )
    result = run_job(2, flags, timeout=500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # Straight from the checkpoint folder (its `latest`), through chat.py's main() (test_demo launches the script).
    question, answer = QA[0]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = chat_tool.main([str(ckpt), "--prompt", question, "--temperature", "0", "--verbose"])
    assert code == 0, err.getvalue()
    assert out.getvalue().strip() == answer
    assert "stopped at eos" in err.getvalue()

    # The export: everything needed elsewhere, and every question answered.
    from tools.convert_to_hf import main as convert_main

    export = tmp_path / "hf-export"
    assert convert_main(["--checkpoint-path", str(ckpt), "--output", str(export)]) == 0
    assert json.loads((export / "generation_config.json").read_text())["eos_token_id"] == EOS
    assert json.loads((export / "special_tokens_map.json").read_text())["eos_token"] == "<|endoftext|>"
    card = (export / "README.md").read_text()
    assert model_dir in card and str(data) in card and "| `--lr` | `0.005` |" in card
    with contextlib.ExitStack() as stack:
        model, tokenizer = chat_tool.load_model(str(export), "cpu", stack)
        chat = chat_tool.Chat(model, tokenizer, max_new_tokens=32, temperature=0)
        for question, answer in QA:
            chat.reset()
            reply = chat.reply(question)
            assert (reply.text, reply.stop) == (answer, "eos"), question

    # The run's curves and its TensorBoard scalars, which match the metrics file.
    plot_metrics([str(ckpt / "metrics.jsonl")], str(tmp_path / "curves.png"))
    assert png_size(tmp_path / "curves.png") == (1500, 900)
    logged = {}
    for line in (ckpt / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:  # step records (the start-up record has none)
            logged[record["step"]] = record["loss"]
    assert sorted(logged) == list(range(10, 121, 10))
    assert read_scalars(ckpt / "tensorboard")["loss"] == pytest.approx(logged)

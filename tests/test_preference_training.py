"""Preference tuning trains exactly like a plain transformers (+ peft) + AdamW loop computing the objective from the
paper's formula, in every kind of layout: DPO with the reference's log-probabilities stored before step 1 and with a
frozen copy (full fine-tuning), and with the adapters off (LoRA), SimPO and ORPO; and a run killed mid-way resumes
bit-exactly without computing the stored reference again.

Reference: the transformers model, the same global batches of pairs (tasks.PreferenceStream at dp=1), per-row
log-probabilities of the completion tokens, the step's loss the mean over its pairs (ORPO: plus the chosen tokens'
mean NLL), global clipping at 1.0, fp32 on CPU. Each layout is a real multi-process run of the entrypoint on gloo,
and its logged tokens/s counts the text tokens of each step's rows (every replica's), not their padding.
"""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
import torch.nn.functional as F

from checkpoint.training_state import join_pieces
from config import ObjectiveConfig
from tests.helpers import base_flags, data_config, make_model, read_checkpoint_weights, run_job, run_ranks, wait_ranks
from tests.test_lora_training import initial_adapters

pytestmark = pytest.mark.e2e

STEPS, SEQ, PAIRS, LR, SEED, R, ALPHA = 3, 24, 4, 1e-3, 7, 4, 8.0
WORDS = "the a model learns to answer short questions about numbers colours cities rivers and time".split()


def make_pairs(path, n=40, seed=0):
    """Standard (plain text) preference records of varied length, some longer than SEQ (truncated)."""
    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    with open(path, "w") as f:
        for _ in range(n):
            record = {"prompt": text(2, 18), "chosen": " " + text(1, 9), "rejected": " " + text(1, 9)}
            f.write(json.dumps(record) + "\n")
    return str(path)


def row_logps(logits, labels):
    token = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    token = token * (labels != -100)
    return token, token.sum(1), (labels != -100).sum(1)


def paper_loss(kind, policy_logits, labels, reference, cfg: ObjectiveConfig):
    token, sums, counts = row_logps(policy_logits, labels)
    c, r = sums[0::2], sums[1::2]
    if kind == "dpo":
        return -F.logsigmoid(cfg.dpo_beta * ((c - reference[0::2]) - (r - reference[1::2]))).mean()
    c, r = c / counts[0::2], r / counts[1::2]
    if kind == "simpo":
        return -F.logsigmoid(cfg.simpo_beta * (c - r) - cfg.simpo_gamma).mean()
    odds = (c - r) - (torch.log1p(-torch.exp(c)) - torch.log1p(-torch.exp(r)))
    return -token[0::2].sum() / counts[0::2].sum() - cfg.orpo_lambda * F.logsigmoid(odds).mean()


def reference_run(model_dir, data, kind, lora=False, steps=STEPS):
    """{HF name (and name/exp_avg, /exp_avg_sq for full fine-tuning): tensor} after `steps` steps."""
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup

    from tasks import PreferenceStream

    cfg = ObjectiveConfig(kind=kind)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stream = PreferenceStream(data_config(data, SEQ, PAIRS, seed=SEED), tokenizer)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if lora:
        lora_cfg, start = initial_adapters(model_dir, None)
        config = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(lora_cfg.target_modules))
        model = peft.get_peft_model(model, config)
        trained = {}
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.requires_grad:
                    ours = name.removeprefix("base_model.model.").replace(".default.weight", ".weight")
                    param.copy_(start[ours])
                    trained[ours] = param
        opt = torch.optim.AdamW(list(trained.values()), lr=LR, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
    else:
        frozen = copy.deepcopy(model).eval()
        trained = dict(model.named_parameters())
        decay = [p for n, p in trained.items() if not (n.endswith(".bias") or p.ndim < 2)]
        plain = [p for n, p in trained.items() if n.endswith(".bias") or p.ndim < 2]
        groups = [{"params": decay, "weight_decay": 0.01}, {"params": plain, "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.999), eps=1e-6)
    sched = get_linear_schedule_with_warmup(opt, 0, steps)
    for _ in range(steps):
        batch = next(stream)
        ids, labels = batch["input_ids"], batch["labels"]
        reference = None
        if kind == "dpo":
            with torch.no_grad():
                if lora:
                    with model.disable_adapter():
                        reference = row_logps(model(input_ids=ids).logits, labels)[1]
                else:
                    reference = row_logps(frozen(input_ids=ids).logits, labels)[1]
        paper_loss(kind, model(input_ids=ids).logits, labels, reference, cfg).backward()
        torch.nn.utils.clip_grad_norm_(list(trained.values()), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    stream.close()
    out = {name: p.detach().clone() for name, p in trained.items()}
    if not lora:
        for name, param in trained.items():
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"{name}/{key}"] = opt.state[param][key]
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("preference")
    model_dir = make_model(
        root / "model", model_type="llama", hidden=32, layers=4, heads=4, extra=("--num-kv-heads", "2")
    )
    return root, model_dir, make_pairs(root / "pairs.jsonl")


@pytest.fixture(scope="module")
def step_text_tokens(setup):
    """The prompt + completion tokens of each step's rows (its global batch: tasks.PreferenceStream at dp=1), counted
    from the rows' layout: a row's prompt ends where its labels start (its last token predicts the first completion
    token) and each completion token is one label; only padding follows."""
    from transformers import AutoTokenizer

    from tasks import PreferenceStream

    _, model_dir, data = setup
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stream = PreferenceStream(data_config(data, SEQ, PAIRS, seed=SEED), tokenizer)
    per_step = []
    for _ in range(STEPS):
        batch, tokens = next(stream), 0
        for ids, labels in zip(batch["input_ids"], batch["labels"]):
            completion = (labels != -100).nonzero()[:, 0]
            text = int(completion[0]) + 1 + len(completion)
            assert (ids[text:] == pad).all()
            tokens += text
        per_step.append(tokens)
    stream.close()
    assert all(tokens < 2 * PAIRS * SEQ for tokens in per_step)  # padded rows would count more: the test can tell
    return per_step


def flags_of(model_dir, data, ckpt, kind, pp=1, dp=1, mode="gpipe", lora=False, **extra):
    flags = {
        "objective": kind,
        "pipeline-group-size": pp,
        "data-group-size": dp,
        "pp-mode": mode,
        "batch-size": PAIRS // dp,
        "seq-length": SEQ,
        "total-steps": STEPS,
        **extra,
    }
    if lora:
        flags.update({"lora-r": R, "lora-alpha": ALPHA})
    return base_flags(model_dir, data, str(ckpt), **flags)


def assert_trained_like(ckpt, expected, lora):
    suffix = "_model.safetensors" if lora else ("_model.safetensors", "_optimizer.safetensors")
    got = read_checkpoint_weights(str(ckpt), suffix=suffix)
    if not lora:
        got = join_pieces(got, {k: v.shape for k, v in got.items() if "/" not in k}, str(ckpt))
    assert set(expected) <= set(got), sorted(set(expected) - set(got))[:5]
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=4e-5, msg=lambda m, name=name: f"{name}: {m}")


# (objective, LoRA, [(pp, dp, pp-mode, --dpo-reference, cp[, --pack-pairs])]): every objective in several layouts,
# launched at once; cp 2 splits every sequence over two ranks (--context-parallel-size); at pp=1 without cp a
# micro-batch's pairs are packed into one row (--pack-pairs true) unless the layout says False (pp > 1 pads them to
# --seq-length)
CASES = [
    (
        "dpo",
        False,
        [
            (1, 1, "gpipe", "auto", 1),
            (2, 1, "1f1b", "copy", 1),
            (4, 1, "gpipe", "stored", 1),
            (2, 2, "1f1b", "auto", 1),
            (1, 1, "gpipe", "stored", 2),
            (2, 1, "1f1b", "copy", 2),
        ],
    ),
    (
        "dpo",
        True,
        [
            (1, 1, "gpipe", "auto", 1),
            (2, 1, "gpipe", "auto", 1),
            (4, 1, "1f1b", "auto", 1),
            (2, 2, "gpipe", "auto", 1),
            (1, 2, "gpipe", "auto", 2),
            (1, 2, "gpipe", "auto", 1, False),
        ],
    ),
    (
        "simpo",
        False,
        [(1, 1, "gpipe", "auto", 1), (2, 1, "1f1b", "auto", 1), (2, 2, "gpipe", "auto", 1), (1, 1, "gpipe", "auto", 2)],
    ),
    (
        "orpo",
        True,
        [
            (1, 1, "gpipe", "auto", 1),
            (2, 1, "interleaved-1f1b", "auto", 1),
            (2, 2, "1f1b", "auto", 1),
            (2, 1, "gpipe", "auto", 2),
        ],
    ),
]


@pytest.mark.parametrize("kind,lora,layouts", CASES, ids=[f"{k}-{'lora' if lo else 'full'}" for k, lo, _ in CASES])
def test_objective_trains_like_the_formula_in_every_layout(setup, step_text_tokens, kind, lora, layouts, tmp_path):
    root, model_dir, data = setup
    expected = reference_run(model_dir, data, kind, lora)
    runs = {}
    for pp, dp, mode, reference, cp, *pack in layouts:
        ckpt = tmp_path / f"pp{pp}-dp{dp}-cp{cp}-{mode}-{reference}{'-pad' * (pack == [False])}"
        extra = {"dp-mode": "sharded"} if (dp > 1 and not lora) else {}
        if pp == 1 and cp == 1:  # packed unless the layout says otherwise
            extra["pack-pairs"] = "false" if pack == [False] else "true"
        if reference != "auto":
            extra["dpo-reference"] = reference
        if pp == 2:  # the head inside the loss (the frozen copy's too)
            extra["chunked-loss"] = "on"
        if cp > 1:
            extra["context-parallel-size"] = cp
        flags = flags_of(model_dir, data, ckpt, kind, pp, dp, mode, lora, **extra)
        runs[(pp, dp, cp, mode, *pack)] = (ckpt, run_ranks(pp * dp * cp, flags))
    for layout, (ckpt, procs) in runs.items():
        results = wait_ranks(procs, 400)
        assert all(rc == 0 for rc, _, _ in results), (layout, [out[-2000:] + err[-2000:] for _, out, err in results])
        assert_trained_like(ckpt, expected, lora)
    metrics = [json.loads(line) for line in open(next(iter(runs.values()))[0] / "metrics.jsonl")]
    steps = [m for m in metrics if "loss" in m]
    assert len(steps) == STEPS and all("rewards/accuracies" in m and "truncated_pairs" in m for m in steps)
    # every layout logs the one process's loss, gradient norm (Adam's update alone would hide a scaled gradient)
    # and statistics; its tokens/s counts the text tokens of every replica's rows in the step, not their padding
    for layout, (ckpt, _) in runs.items():
        logged = [m for m in map(json.loads, open(ckpt / "metrics.jsonl")) if "loss" in m]
        for got, want, text_tokens in zip(logged, steps, step_text_tokens, strict=True):
            keys = ["loss", "grad_norm"] + [k for k in want if k.startswith(("rewards/", "logps/", "nll_loss"))]
            for key in keys:
                assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (layout, key, got[key], want[key])
            assert round(got["tokens_per_s"] * got["step_s"]) == text_tokens, (layout, got["step"], text_tokens)


def test_dpo_resumes_bit_exactly_without_computing_its_stored_reference_again(setup, tmp_path):
    """A pp2 DPO run (full fine-tuning: the reference's log-probabilities stored before step 1, held-out pairs too)
    killed inside its final save resumes from step 2, reads the stored reference instead of computing it, and ends
    bit-identical to the run that never stopped: weights, optimizer state, every logged loss and validation. One
    stage with packed pairs ends where the pipeline does."""
    root, model_dir, data = setup
    held_out = make_pairs(root / "held_out.jsonl", n=6, seed=1)
    whole, part = tmp_path / "whole", tmp_path / "part"
    steps = {"total-steps": 4, "checkpoint-steps": 2, "evaluation-data": held_out, "evaluation-steps": 2}
    result = run_job(2, flags_of(model_dir, data, whole, "dpo", pp=2, **steps))
    assert result.returncode == 0, result.stderr[-2000:]
    crashed = run_job(2, flags_of(model_dir, data, part, "dpo", pp=2, **steps), env={"CKPT_FAULT_AFTER_FILES": "3:4:0"})
    assert crashed.returncode != 0 and open(part / "latest").read().strip() == "2"
    assert "DPO reference: log-probabilities of 6 batches computed" in crashed.stdout, crashed.stdout[-2000:]
    resumed = run_job(2, flags_of(model_dir, data, part, "dpo", pp=2, **steps, **{"load-checkpoint": "true"}))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "log-probabilities read from" in resumed.stdout and "computed" not in resumed.stdout, resumed.stdout[-2000:]
    suffix = ("_model.safetensors", "_optimizer.safetensors")
    want, got = read_checkpoint_weights(str(whole), suffix=suffix), read_checkpoint_weights(str(part), suffix=suffix)
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name

    def logged(folder):
        return {(m["step"], k): v for m in map(json.loads, open(folder / "metrics.jsonl")) for k, v in m.items()}

    keys = [k for k in logged(whole) if k[1] in ("loss", "valid.loss", "valid.rewards/margins")]
    assert len(keys) == 8 and {k: logged(part)[k] for k in keys} == {k: logged(whole)[k] for k in keys}

    # the same run on one stage, pairs packed (reference pass, training and held-out pairs alike): the same weights
    # and validation scores within fp32 rounding
    packed = tmp_path / "packed"
    result = run_job(1, flags_of(model_dir, data, packed, "dpo", **steps, **{"pack-pairs": "true"}))
    assert result.returncode == 0, result.stderr[-2000:]
    got = read_checkpoint_weights(str(packed), suffix=suffix)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=4e-5, msg=name)
    for key in keys:
        assert logged(packed)[key] == pytest.approx(logged(whole)[key], rel=1e-4, abs=1e-6), key

    # another --total-steps on resume: the stored rows no longer fit, and the starting weights are gone
    other = flags_of(model_dir, data, part, "dpo", pp=2, **{**steps, "total-steps": 6, "load-checkpoint": "true"})
    refused = run_job(2, other)
    assert refused.returncode != 0 and "--dpo-reference stored" in refused.stderr, refused.stderr[-2000:]

"""Every pipeline / data-parallel layout trains exactly like one process.

Reference: the transformers model (each packed document run alone, as --attention-mask document trains) and a plain
torch AdamW (decay on weights only, linear schedule, global clipping
at 1.0) on the same global batches, fp32 on CPU. Each layout is a real multi-process run of the entrypoint under
torchrun on gloo; its final checkpoint must equal the reference within rtol 1e-5 / atol 4e-5.
"""

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import (
    base_flags,
    document_logits,
    make_chat_data,
    make_model,
    packed_stream,
    read_checkpoint_weights,
    run_job,
)

pytestmark = pytest.mark.e2e  # real multi-process runs of the entrypoint

STEPS, SEQ, GLOBAL_BATCH, LR, SEED = 3, 32, 4, 1e-3, 7


def hf_saved_name(name, model_type):
    """transformers 5 names the GPT-NeoX head lm_head in memory and embed_out on disk."""
    return "embed_out.weight" if name == "lm_head.weight" and model_type == "gpt_neox" else name


def reference_weights(model_dir, data, steps=STEPS, documents=True):
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stream = packed_stream(data, tokenizer, SEQ, GLOBAL_BATCH, seed=SEED)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    named = list(model.named_parameters())
    decay = [p for n, p in named if not (n.endswith(".bias") or p.ndim < 2)]
    plain = [p for n, p in named if n.endswith(".bias") or p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": plain, "weight_decay": 0.0}],
        lr=LR,
        betas=(0.9, 0.999),
        eps=1e-6,
    )
    sched = get_linear_schedule_with_warmup(opt, 0, steps)
    for _ in range(steps):
        batch = next(stream)
        # --attention-mask document (the default): each packed document alone; causal: the whole window
        logits = document_logits(model, batch) if documents else model(batch["input_ids"]).logits
        labels = batch["labels"]
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        (loss / (labels != -100).sum()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    stream.close()
    kind = model.config.model_type
    expected = {hf_saved_name(k, kind): v.detach() for k, v in model.state_dict().items()}
    for name, param in named:
        for key in ("exp_avg", "exp_avg_sq"):
            expected[f"{hf_saved_name(name, kind)}/{key}"] = opt.state[param][key]
    return expected


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    model_dir = make_model(root / "model", hidden=32, layers=4, heads=4)
    data = make_chat_data(root / "chat.jsonl")
    return root, model_dir, data, reference_weights(model_dir, data)


@pytest.fixture(scope="module")
def causal_reference(setup):
    _, model_dir, data, _ = setup
    return reference_weights(model_dir, data, documents=False)


# (pp, dp, pp-mode, batch-size per replica, gradient-accumulate-step)
LAYOUTS = [
    (1, 1, "gpipe", 4, 1),
    (1, 1, "gpipe", 2, 2),
    (1, 2, "gpipe", 1, 2),  # buckets reduced during the second batch's backward only
    (2, 1, "gpipe", 4, 1),
    (2, 1, "1f1b", 4, 1),
    (2, 1, "1f1b", 2, 2),
    (2, 1, "interleaved-1f1b", 4, 1),
    (2, 2, "1f1b", 2, 1),  # gpipe at pp2 x dp2: test_sharded and test_lora_training
    (4, 1, "1f1b", 4, 1),  # gpipe over four stages: test_lora_training's pp4
]


@pytest.mark.parametrize(
    "pp,dp,mode,batch,accum", LAYOUTS, ids=[f"pp{a}-dp{b}-{c}-b{d}-acc{e}" for a, b, c, d, e in LAYOUTS]
)
def test_layout_matches_one_process_reference(setup, pp, dp, mode, batch, accum):
    run_and_compare(setup, pp, dp, mode, batch, accum)


def test_activation_checkpointing_and_recomputed_loss_match_the_reference(setup):
    run_and_compare(setup, 2, 1, "1f1b", 4, 1, {"activation-checkpointing": "full"})


def test_causal_attention_trains_like_the_whole_window_reference(setup, causal_reference):
    """--attention-mask causal: OpenChatKit's attention over the whole packed window."""
    root, model_dir, data, _ = setup
    run_and_compare((root, model_dir, data, causal_reference), 2, 2, "1f1b", 2, 1, {"attention-mask": "causal"})


def run_and_compare(setup, pp, dp, mode, batch, accum, extra=None):
    root, model_dir, data, expected = setup
    ckpt = root / f"ckpt-{pp}-{dp}-{mode}-{batch}-{accum}-{len(extra or {})}"
    flags = base_flags(
        model_dir,
        data,
        str(ckpt),
        **{
            "pipeline-group-size": pp,
            "data-group-size": dp,
            "pp-mode": mode,
            "batch-size": batch,
            "gradient-accumulate-step": accum,
            "total-steps": STEPS * accum,
            "seq-length": SEQ,
            "lr": LR,
            "seed": SEED,
            "dp-bucket-mb": 0.002,  # many buckets: most are reduced during the backward, in a fixed order
            **(extra or {}),
        },
    )
    result = run_job(pp * dp, flags)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    got = read_checkpoint_weights(str(ckpt), suffix=("_model.safetensors", "_optimizer.safetensors"))
    assert set(expected) <= set(got)
    assert len(expected) >= 3 * 30
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=4e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize(
    "pp,dp,mode", [(1, 1, "gpipe"), (2, 1, "1f1b"), (2, 1, "interleaved-1f1b"), (2, 2, "interleaved-1f1b")]
)
def test_llama_gqa_tied_embeddings(tmp_path, pp, dp, mode):
    """Llama with grouped-query attention and tied embeddings: the head lives on the last stage and the embedding
    on the first; their gradients are summed, so both copies stay equal to the reference's single matrix. At dp=2
    (sharded, 2 KB gradient buckets) the tied ends' buckets are reduced after the ends' sum, the others during the
    backward."""
    from checkpoint.training_state import join_pieces

    model_dir = make_model(
        tmp_path / "llama",
        model_type="llama",
        hidden=32,
        layers=4,
        heads=4,
        extra=("--num-kv-heads", "2", "--tie-word-embeddings"),
    )
    data = make_chat_data(tmp_path / "chat.jsonl")
    expected = reference_weights(model_dir, data)
    assert torch.equal(expected["lm_head.weight"], expected["model.embed_tokens.weight"])
    if pp > 1:  # one matrix in transformers; a separate last stage holds a copy of it, with its own moments
        for suffix in ("/exp_avg", "/exp_avg_sq"):
            expected["lm_head.weight" + suffix] = expected["model.embed_tokens.weight" + suffix]
    ckpt = tmp_path / "ckpt"
    flags = base_flags(
        model_dir,
        data,
        str(ckpt),
        **{"pipeline-group-size": pp, "pp-mode": mode, "total-steps": STEPS, "seq-length": SEQ, "lr": LR, "seed": SEED},
    )
    if dp > 1:
        flags += ["--data-group-size", str(dp), "--batch-size", str(4 // dp), "--dp-mode", "sharded"]
        flags += ["--dp-bucket-mb", "0.002"]
    result = run_job(pp * dp, flags)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    got = read_checkpoint_weights(str(ckpt), suffix=("_model.safetensors", "_optimizer.safetensors"))
    got = join_pieces(got, {k: v.shape for k, v in got.items() if "/" not in k}, str(ckpt))  # sharded: pieces
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=4e-5, msg=lambda m, name=name: f"{name}: {m}")

"""LoRA inside the pipeline trains exactly like transformers + peft, resumes across layouts, and exports to peft.

Reference: the transformers model with peft's LoraConfig (same r, alpha, dropout 0, targets, the same initial
adapters) and a plain torch AdamW (weight decay on the adapters, linear schedule, global clipping at 1.0) on the same
global batches, fp32 on CPU. Each layout is a real multi-process run of the entrypoint under torchrun on gloo; its
checkpoint's adapters must equal the reference within rtol 1e-5 / atol 4e-5.
"""

import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from config import ModelRunConfig
from pipeline_parallel import StagePlan
from tests.helpers import base_flags, make_chat_data, make_model, packed_stream, read_checkpoint_weights, run_job

pytestmark = pytest.mark.e2e  # real multi-process runs of the entrypoint

STEPS, SEQ, GLOBAL_BATCH, LR, SEED, R, ALPHA = 3, 32, 4, 1e-3, 7, 4, 8.0
CPU = torch.device("cpu")
FAMILIES = {
    "gptneox": {"targets": None, "extra": ()},
    "gptj": {"targets": None, "extra": ()},
    "llama": {"targets": "all-linear", "extra": ("--num-kv-heads", "2")},
    # the newer families, each with peft's default targets and its features on (windows shorter than SEQ)
    "qwen2": {"targets": None, "extra": ("--sliding-window", "8", "--num-kv-heads", "2")},
    "qwen3": {"targets": None, "extra": ("--tie-word-embeddings",)},
    "mistral": {"targets": None, "extra": ("--sliding-window", "8", "--num-kv-heads", "1")},
    "gemma2": {"targets": None, "extra": ("--sliding-window", "8", "--tie-word-embeddings")},
    "gemma3": {"targets": None, "extra": ("--sliding-window", "8", "--tie-word-embeddings")},
    "phi3": {"targets": None, "extra": ("--sliding-window", "8")},
}
NEWER_FAMILIES = ["qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3"]


def initial_adapters(model_dir, targets):
    """Our adapters before training (seeded by name, the same for every layout), {our name: tensor}."""
    import modules

    cfg = modules.load_model_config(model_dir)
    lora = modules.make_lora_config(cfg, R, ALPHA, 0.0, targets)
    run = ModelRunConfig(model_dir=model_dir, seed=SEED)
    (stage,) = modules.build_rank_stages(cfg, run, StagePlan(1, [(0, cfg.num_layers)], [0]), CPU, lora=lora)
    return lora, {k: v.clone() for k, v in modules.lora_state_dict(stage).items()}


def peft_reference(model_dir, data, targets, steps=STEPS):
    """{our adapter name: tensor} after `steps` optimizer steps of transformers + peft + torch AdamW."""
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup

    lora, start = initial_adapters(model_dir, targets)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stream = packed_stream(data, tokenizer, SEQ, GLOBAL_BATCH, seed=SEED)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(lora.target_modules))
    model = peft.get_peft_model(base, config)
    trained = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                ours = name.removeprefix("base_model.model.").replace(".default.weight", ".weight")
                param.copy_(start[ours])
                trained[ours] = param
    assert set(trained) == set(start)
    opt = torch.optim.AdamW(list(trained.values()), lr=LR, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
    sched = get_linear_schedule_with_warmup(opt, 0, steps)
    for _ in range(steps):
        batch = next(stream)
        logits = model(input_ids=batch["input_ids"]).logits
        labels = batch["labels"]
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        (loss / (labels != -100).sum()).backward()
        torch.nn.utils.clip_grad_norm_(list(trained.values()), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    stream.close()
    return {k: v.detach().clone() for k, v in trained.items()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    data = make_chat_data(root / "chat.jsonl")
    out = {}
    for name, spec in FAMILIES.items():
        model_dir = make_model(root / name, model_type=name, hidden=32, layers=4, heads=4, extra=spec["extra"])
        out[name] = (model_dir, peft_reference(model_dir, data, spec["targets"]))
    return root, data, out


def lora_flags(model_dir, data, ckpt, targets, **overrides):
    # causal: the peft reference runs whole windows (document masking is proven on its own in test_layouts)
    flags = {"lora-r": R, "lora-alpha": ALPHA, "total-steps": STEPS, "seq-length": SEQ, "attention-mask": "causal"}
    flags.update(overrides)
    if targets:
        flags["lora-target-modules"] = targets
    return base_flags(model_dir, data, ckpt, **flags)


def assert_adapters_equal(ckpt, expected):
    got = read_checkpoint_weights(str(ckpt))
    assert set(got) == set(expected), "a LoRA checkpoint holds the adapters, and only them"
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=4e-5, msg=lambda m, name=name: f"{name}: {m}")


# (family, pp, dp, pp-mode, dp-mode); the global batch is 4 sequences in every layout
LAYOUTS = [
    ("gptneox", 1, 1, "gpipe", "allreduce"),
    ("gptneox", 2, 2, "1f1b", "sharded"),  # the adapters' optimizer state in 2 shards, 2 KB gradient buckets
    ("gptneox", 4, 1, "gpipe", "allreduce"),
    ("gptneox", 2, 1, "interleaved-1f1b", "allreduce"),
    ("gptj", 2, 2, "gpipe", "allreduce"),
    ("llama", 2, 1, "1f1b", "allreduce"),
]


@pytest.mark.parametrize(
    "family,pp,dp,mode,dp_mode", LAYOUTS, ids=[f"{f}-pp{p}-dp{d}-{m}-{s}" for f, p, d, m, s in LAYOUTS]
)
def test_adapters_match_peft_in_every_layout(models, tmp_path, family, pp, dp, mode, dp_mode):
    _, data, by_family = models
    model_dir, expected = by_family[family]
    flags = lora_flags(
        model_dir,
        data,
        str(tmp_path / "ck"),
        FAMILIES[family]["targets"],
        **{
            "pipeline-group-size": pp,
            "data-group-size": dp,
            "pp-mode": mode,
            "batch-size": GLOBAL_BATCH // dp,
            "dp-mode": dp_mode,
            "dp-bucket-mb": 0.002,
        },
    )
    result = run_job(pp * dp, flags)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_adapters_equal(tmp_path / "ck", expected)


def test_resume_under_another_layout_and_export_to_peft_and_merged(models, tmp_path):
    """Train 2 of 4 steps at pp=2, resume at pp=1 x dp=2: equal to 4 uninterrupted reference steps. The peft export
    loads in peft with logits equal to ours; the merged export loads in transformers with the same logits, and its
    base tensors are the base's, bit for bit."""
    import peft
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import modules

    root, data, by_family = models
    model_dir, _ = by_family["gptneox"]
    expected = peft_reference(model_dir, data, None, steps=4)
    ckpt = tmp_path / "ck"
    first = lora_flags(model_dir, data, str(ckpt), None, **{"pipeline-group-size": 2, "total-steps": 4})
    result = run_job(2, first + ["--checkpoint-steps", "2", "--keep-checkpoints", "0"])
    assert result.returncode == 0, result.stderr[-3000:]
    shutil.rmtree(ckpt / "checkpoint_4")
    (ckpt / "latest").write_text("2\n")
    again = lora_flags(model_dir, data, str(ckpt), None, **{"data-group-size": 2, "batch-size": 2, "total-steps": 4})
    result = run_job(2, again + ["--load-checkpoint", "true"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout and "(step 2; saved with pp=2 x dp=1)" in result.stdout
    assert_adapters_equal(ckpt, expected)
    meta = json.loads((ckpt / "checkpoint_4" / "meta.json").read_text())
    assert meta["lora"]["r"] == R and meta["lora"]["base_path"] == os.path.abspath(model_dir)

    from tools.convert_to_hf import main as convert

    assert convert(["--checkpoint-path", str(ckpt), "--output", str(tmp_path / "adapter")]) == 0
    assert convert(["--checkpoint-path", str(ckpt), "--output", str(tmp_path / "merged"), "--merge-lora"]) == 0

    cfg = modules.load_model_config(model_dir)
    lora = modules.make_lora_config(cfg, R, ALPHA)
    adapters = read_checkpoint_weights(str(ckpt))
    plan = StagePlan(1, [(0, cfg.num_layers)], [0])
    (ours,) = modules.build_rank_stages(
        cfg, ModelRunConfig(model_dir=model_dir), plan, CPU, lora=lora, adapter_tensors=adapters
    )
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours(ids)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        with_adapter = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
        torch.testing.assert_close(with_adapter(input_ids=ids).logits, want, rtol=0, atol=1e-5)
        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=0, atol=1e-5)
    merged_files = load_file(str(tmp_path / "merged" / "model.safetensors"))
    base_files = load_file(os.path.join(model_dir, "model.safetensors"))
    for name in ("gpt_neox.embed_in.weight", "gpt_neox.layers.0.mlp.dense_h_to_4h.weight"):
        assert torch.equal(merged_files[name], base_files[name]), name  # frozen and not adapted: untouched
    adapted = "gpt_neox.layers.0.attention.query_key_value.weight"
    assert not torch.equal(merged_files[adapted], base_files[adapted])

    # The adapters continue from the peft export (--lora-init) with a new checkpoint folder.
    cont = lora_flags(model_dir, data, str(tmp_path / "ck2"), None, **{"total-steps": 1, "lr": 0})
    result = run_job(1, cont + ["--lora-init", str(tmp_path / "adapter")])
    assert result.returncode == 0, result.stderr[-3000:]
    for name, value in read_checkpoint_weights(str(tmp_path / "ck2")).items():
        assert torch.equal(value, adapters[name]), name  # lr 0: the adapters stay what was loaded


@pytest.mark.parametrize("family", NEWER_FAMILIES)
def test_family_adapters_match_peft_and_their_exports_load(models, tmp_path, family):
    """Each newer family's default targets at pp=2 (a tied head on the last stage) equal transformers + peft; the
    peft export loads in peft and the merged export in transformers, both with our logits."""
    import peft
    from transformers import AutoModelForCausalLM

    import modules
    from tools.convert_to_hf import main as convert

    _, data, by_family = models
    model_dir, expected = by_family[family]
    ckpt = tmp_path / "ck"
    flags = lora_flags(model_dir, data, str(ckpt), None, **{"pipeline-group-size": 2, "pp-mode": "1f1b"})
    result = run_job(2, flags)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_adapters_equal(ckpt, expected)
    assert convert(["--checkpoint-path", str(ckpt), "--output", str(tmp_path / "adapter")]) == 0
    assert convert(["--checkpoint-path", str(ckpt), "--output", str(tmp_path / "merged"), "--merge-lora"]) == 0
    cfg = modules.load_model_config(model_dir)
    plan = StagePlan(1, [(0, cfg.num_layers)], [0])
    lora = modules.make_lora_config(cfg, R, ALPHA)
    adapters = read_checkpoint_weights(str(ckpt))
    (ours,) = modules.build_rank_stages(
        cfg, ModelRunConfig(model_dir=model_dir), plan, CPU, lora, adapter_tensors=adapters
    )
    ids = torch.randint(0, cfg.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours(ids)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
        with_adapter = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
        torch.testing.assert_close(with_adapter(input_ids=ids).logits, want, rtol=0, atol=1e-5)
        merged = AutoModelForCausalLM.from_pretrained(
            str(tmp_path / "merged"), dtype=torch.float32, attn_implementation="eager"
        ).eval()
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=0, atol=1e-5)


def test_lora_and_dense_checkpoints_do_not_mix(models, tmp_path):
    from safetensors.torch import load_file, save_file

    _, data, by_family = models
    model_dir, _ = by_family["gptneox"]
    lora_ckpt, dense_ckpt = tmp_path / "lora", tmp_path / "dense"
    assert run_job(1, lora_flags(model_dir, data, str(lora_ckpt), None, **{"total-steps": 1})).returncode == 0
    dense = base_flags(model_dir, data, str(dense_ckpt), **{"total-steps": 1, "seq-length": SEQ})
    assert run_job(1, dense).returncode == 0

    as_dense = base_flags(model_dir, data, str(lora_ckpt), **{"total-steps": 2, "load-checkpoint": "true"})
    result = run_job(1, as_dense)
    assert result.returncode != 0
    assert "holds LoRA adapters (r=4" in result.stderr and "--lora-r 4" in result.stderr
    as_lora = lora_flags(model_dir, data, str(dense_ckpt), None, **{"total-steps": 2, "load-checkpoint": "true"})
    result = run_job(1, as_lora)
    assert result.returncode != 0 and "full fine-tuning checkpoint" in result.stderr

    other_rank = lora_flags(model_dir, data, str(lora_ckpt), None, **{"total-steps": 2, "load-checkpoint": "true"})
    other_rank[other_rank.index("--lora-r") + 1] = "8"
    result = run_job(1, other_rank)
    assert result.returncode != 0 and "resume with --lora-r 4" in result.stderr

    changed = tmp_path / "changed-base"
    shutil.copytree(model_dir, changed)
    tensors = load_file(str(changed / "model.safetensors"))
    tensors["gpt_neox.final_layer_norm.weight"] += 1
    save_file(tensors, str(changed / "model.safetensors"), metadata={"format": "pt"})
    other_base = lora_flags(str(changed), data, str(lora_ckpt), None, **{"total-steps": 2, "load-checkpoint": "true"})
    result = run_job(1, other_base)
    assert result.returncode != 0 and "differ from that base" in result.stderr

    from tools.convert_to_hf import main as convert

    assert convert(["--checkpoint-path", str(dense_ckpt), "--output", str(tmp_path / "x"), "--merge-lora"]) == 2
    merged_on = ["--checkpoint-path", str(lora_ckpt), "--output", str(tmp_path / "m"), "--merge-lora"]
    assert convert(merged_on + ["--base-model", str(changed)]) == 2  # another base: refused, nothing written
    assert not (tmp_path / "m").exists()
    assert convert(["--checkpoint-path", str(lora_ckpt), "--output", str(tmp_path / "a")]) == 0
    before = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    assert convert(["--checkpoint-path", str(lora_ckpt), "--output", str(tmp_path / "a")]) == 2  # no overwrite
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == before

    bad_target = lora_flags(model_dir, data, str(tmp_path / "t"), "q_proj", **{"total-steps": 1})
    result = run_job(1, bad_target)
    assert result.returncode != 0
    assert "'q_proj' is not a linear layer of a gptneox block" in result.stderr and "query_key_value" in result.stderr

"""modules/lora.py: LoRA on our stages equals transformers + peft (logits, adapter gradients, AdamW steps), and
the adapter files are peft's own format (peft loads ours, we load peft's)."""

from __future__ import annotations

import json
import os
import sys
import warnings

import pytest
import torch
import transformers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import modules  # noqa: E402
from modules import ModelError  # noqa: E402
from modules.lora import LoraConfig, block_linears  # noqa: E402
from tests.helpers import save_random_hf_model  # noqa: E402

peft = pytest.importorskip("peft")
transformers.logging.set_verbosity_error()

VOCAB, SEQ, BATCH, R, ALPHA = 96, 16, 2, 4, 8.0


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: a second intra-op thread only adds overhead (this file: 28 s wall with one, 50 s with two, on
    the shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CONFIGS = {
    "gptneox": lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        use_parallel_residual=False,
    ),
    "gptj": lambda: transformers.GPTJConfig(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, bos_token_id=0, eos_token_id=0
    ),
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
    ),
}

ALL_LINEARS = {
    "gptneox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "gptj": ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), torch.randint(0, VOCAB, (BATCH, SEQ), generator=g))
        for _ in range(n)
    ]


def loss_of(logits, labels):
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")


def peft_name(ours: str) -> str:
    """Our adapter name -> the parameter name inside a PeftModel (adapter "default")."""
    module, kind, leaf = ours.rsplit(".", 2)
    return f"base_model.model.{module}.{kind}.default.{leaf}"


def our_stage(directory, lora_cfg, bounds=None, **kw):
    cfg = modules.load_model_config(str(directory))
    bounds = bounds or [(0, cfg.num_layers)]
    stages = []
    for i, (start, end) in enumerate(bounds):
        stage = modules.build_stage(cfg, start, end, i == 0, i == len(bounds) - 1, **kw)
        modules.load_stage_weights(stage, str(directory))
        stages.append(modules.apply_lora(stage, lora_cfg, seed=3))
    return cfg, stages


def run(stages, ids):
    for stage in stages:
        ids = stage(ids)
    return ids


def random_b(stage, seed=5):
    """Non-zero B for every adapter (peft's init has B = 0, which would leave A's gradient zero and hide errors)."""
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(t.shape, generator=g) * 0.3 for name, t in modules.lora_state_dict(stage).items()} | {
        name: t.clone() for name, t in modules.lora_state_dict(stage).items() if name.endswith("lora_A.weight")
    }


def peft_and_ours(family, tmp_path, target_modules):
    """transformers + peft and our single full stage, same base and same (non-zero) adapters."""
    hf = save_random_hf_model(CONFIGS[family](), tmp_path / "base")
    cfg = modules.load_model_config(str(tmp_path / "base"))
    lora_cfg = modules.make_lora_config(cfg, R, ALPHA, 0.0, target_modules)
    _, (ours,) = our_stage(tmp_path / "base", lora_cfg)
    torch.manual_seed(11)
    ref = peft.get_peft_model(
        hf,
        peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(lora_cfg.target_modules)),
    )
    peft_params = dict(ref.named_parameters())
    adapters = random_b(ours)
    for name, value in adapters.items():
        if name.endswith("lora_A.weight"):  # peft's own A init, copied into ours
            value.copy_(peft_params[peft_name(name)].detach())
    modules.load_lora_tensors(ours, adapters)
    with torch.no_grad():
        for name, value in adapters.items():
            peft_params[peft_name(name)].copy_(value)
    return cfg, lora_cfg, ref, ours


def check_lora_flops_against_the_matmuls(cfg, lora_cfg, directory):
    """lora_flops_per_token against the matmuls of a real training step, as torch's FlopCounterMode counts them
    from their shapes, at two sequence lengths. The conventions it checks: the frozen base's matmuls run forward
    and their input gradient (no weight gradient), the adapters' forward and both gradients, attention over the
    full S x S (SDPA held to its math path, which computes every score and then masks; its fused CPU kernel is not
    counted), no recomputation, the embedding lookup not counted. The stage holds every layer but no embedding and
    takes hidden states that need a gradient, as every stage after the first does: on the first stage the first
    layer's matmuls skip the input gradient, which the formula does not subtract. One convention differs: the
    formula counts 4 FLOPs for every base parameter, biases and norm scales too (the 1-D parameters), which take
    part in no matmul; their count is added to the measurement, so the comparison stays exact."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    stage = modules.build_stage(cfg, 0, cfg.num_layers, False, True)
    modules.load_stage_weights(stage, str(directory))
    modules.apply_lora(stage, lora_cfg, seed=3)
    outside_matmuls = sum(p.numel() for p in stage.parameters() if p.dim() == 1)
    assert 0 < 4 * outside_matmuls < 0.05 * modules.lora_flops_per_token(cfg, lora_cfg, SEQ)
    g = torch.Generator().manual_seed(0)
    for batch, seq in ((BATCH, SEQ), (1, 3 * SEQ)):
        hidden = torch.randn(batch, seq, cfg.hidden_size, generator=g, requires_grad=True)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            stage(hidden).square().mean().backward()  # the loss adds no matmul
        expected = modules.lora_flops_per_token(cfg, lora_cfg, seq) * batch * seq
        assert counter.get_total_flops() + 4 * outside_matmuls * batch * seq == expected


# --------------------------------------------------------------------------------------------------------------
# Equality with transformers + peft
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,targets", [("gptneox", None), ("gptj", "all-linear"), ("llama", "all-linear")])
def test_logits_gradients_and_adamw_steps_match_peft(family, targets, tmp_path):
    cfg, lora_cfg, ref, ours = peft_and_ours(family, tmp_path, targets)
    expected_targets = ALL_LINEARS[family] if targets else modules.lora.DEFAULT_TARGET_MODULES[family]
    assert lora_cfg.target_modules == expected_targets
    trainable = modules.lora_parameters(ours)
    assert len(trainable) == 2 * cfg.num_layers * len(expected_targets)
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == list(trainable)
    assert sorted(peft_name(n) for n in trainable) == sorted(n for n, p in ref.named_parameters() if p.requires_grad)
    peft_trainable = sum(p.numel() for p in ref.parameters() if p.requires_grad)
    assert modules.count_lora_parameters(cfg, lora_cfg) == peft_trainable
    check_lora_flops_against_the_matmuls(cfg, lora_cfg, tmp_path / "base")
    base_before = {n: p.detach().clone() for n, p in ours.named_parameters() if not modules.lora.is_lora_name(n)}
    peft_params = dict(ref.named_parameters())

    ids, labels = batches(1)[0]
    ref_logits, our_logits = ref(input_ids=ids).logits, ours(ids)
    torch.testing.assert_close(our_logits, ref_logits, rtol=0, atol=1e-5)
    loss_of(ref_logits, labels).backward()
    loss_of(our_logits, labels).backward()
    for name, p in trainable.items():
        assert p.grad is not None and p.grad.abs().max() > 1e-3, name  # the comparison is not vacuous
        torch.testing.assert_close(p.grad, peft_params[peft_name(name)].grad, rtol=1e-5, atol=4e-5, msg=name)
    assert all(p.grad is None for n, p in ours.named_parameters() if n not in trainable)

    opt_ref = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    opt_ours = torch.optim.AdamW(list(trainable.values()), lr=1e-2)
    for ids, labels in batches(3, seed=2):
        for opt, logits in ((opt_ref, ref(input_ids=ids).logits), (opt_ours, ours(ids))):
            opt.zero_grad()
            loss_of(logits, labels).backward()
            opt.step()
    for name, p in trainable.items():
        torch.testing.assert_close(p, peft_params[peft_name(name)], rtol=1e-5, atol=4e-5, msg=name)
    for name, p in ours.named_parameters():
        if name in base_before:
            assert torch.equal(p, base_before[name]), name  # the base is frozen, bit for bit
    torch.testing.assert_close(ours(ids), ref(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_two_stages_equal_one_stage(tmp_path):
    save_random_hf_model(CONFIGS["llama"](), tmp_path)
    cfg = modules.load_model_config(str(tmp_path))
    lora_cfg = modules.make_lora_config(cfg, R, ALPHA, 0.0, "all-linear")
    _, one = our_stage(tmp_path, lora_cfg)
    _, two = our_stage(tmp_path, lora_cfg, [(0, 1), (1, 3)])
    # Seeded per name: the split stages draw exactly the single stage's A.
    split = modules.lora_state_dict(two[0]) | modules.lora_state_dict(two[1])
    assert split.keys() == modules.lora_state_dict(one[0]).keys()
    for name, value in modules.lora_state_dict(one[0]).items():
        assert torch.equal(split[name], value), name
    adapters = random_b(one[0])
    for stage in [*one, *two]:
        modules.load_lora_tensors(stage, adapters)
    ids, labels = batches(1)[0]
    loss_one, loss_two = loss_of(run(one, ids), labels), loss_of(run(two, ids), labels)
    torch.testing.assert_close(loss_two, loss_one, rtol=0, atol=1e-5)
    loss_one.backward()
    loss_two.backward()
    grads = {n: p.grad for n, p in modules.lora_parameters(one[0]).items()}
    for stage in two:
        for name, p in modules.lora_parameters(stage).items():
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=4e-5, msg=name)


# --------------------------------------------------------------------------------------------------------------
# Initialisation, meta device, activation checkpointing, torch.compile
# --------------------------------------------------------------------------------------------------------------


def test_init_is_peft_init_and_seeded(tmp_path):
    save_random_hf_model(CONFIGS["gptneox"](), tmp_path)
    cfg = modules.load_model_config(str(tmp_path))
    lora_cfg = modules.make_lora_config(cfg, 64, 16.0, 0.0, "all-linear")
    stage = modules.apply_lora(modules.build_stage(cfg, 0, 2, True, True), lora_cfg, seed=3)
    adapters = modules.lora_state_dict(stage)
    for name, value in adapters.items():
        if name.endswith("lora_B.weight"):
            assert torch.equal(value, torch.zeros_like(value)), name
        else:  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)), std bound/sqrt(3)
            bound = 1 / value.shape[1] ** 0.5
            assert value.abs().max() <= bound and abs(value.std() / (bound / 3**0.5) - 1) < 0.1, name
    ids, _ = batches(1)[0]
    base = modules.build_stage(cfg, 0, 2, True, True)
    base.load_state_dict({n: t for n, t in stage.state_dict().items() if not modules.lora.is_lora_name(n)})
    torch.testing.assert_close(stage(ids), base(ids), rtol=0, atol=0)  # B = 0: starts as the base model
    other = modules.apply_lora(modules.build_stage(cfg, 0, 2, True, True), lora_cfg, seed=4)
    name = "gpt_neox.layers.0.attention.query_key_value.lora_A.weight"
    assert not torch.equal(modules.lora_state_dict(other)[name], adapters[name])
    assert stage.lora_config == lora_cfg and lora_cfg.scale == 0.25


def test_meta_build_then_materialize(tmp_path):
    save_random_hf_model(CONFIGS["gptj"](), tmp_path)
    cfg = modules.load_model_config(str(tmp_path))
    lora_cfg = modules.make_lora_config(cfg, R, ALPHA, 0.0, "all-linear")
    _, (eager,) = our_stage(tmp_path, lora_cfg)
    with torch.device("meta"):
        stage = modules.build_stage(cfg, 0, cfg.num_layers, True, True)
    modules.apply_lora(stage, lora_cfg, seed=3)  # on meta: nothing to initialise yet
    stage = modules.materialize_stage(stage, torch.device("cpu"), torch.float32)
    modules.load_stage_weights(stage, str(tmp_path))  # skips the adapters
    modules.init_lora_weights(stage, seed=3)
    assert stage.state_dict().keys() == eager.state_dict().keys()
    for name, value in eager.state_dict().items():
        assert torch.equal(stage.state_dict()[name], value), name
    assert [n for n, p in stage.named_parameters() if p.requires_grad] == list(modules.lora_parameters(eager))
    ids, _ = batches(1)[0]
    torch.testing.assert_close(stage(ids), eager(ids), rtol=0, atol=0)


def test_activation_checkpointing_and_compile_give_the_same_gradients(tmp_path):
    save_random_hf_model(CONFIGS["llama"](), tmp_path)
    cfg = modules.load_model_config(str(tmp_path))
    lora_cfg = modules.make_lora_config(cfg, R, ALPHA, 0.0, "all-linear")
    _, (plain,) = our_stage(tmp_path, lora_cfg)
    _, (ckpt,) = our_stage(tmp_path, lora_cfg, activation_checkpointing="full")
    _, (compiled,) = our_stage(tmp_path, lora_cfg)
    adapters = random_b(plain)
    torch._dynamo.reset()
    # One block compiled as the trainer's --compile does (in place, names kept); aot_eager traces forward and
    # backward like inductor but needs no C++ toolchain, and fullgraph=True fails on any graph break.
    compiled.model.layers["1"].compile(backend="aot_eager", fullgraph=True)
    ids, labels = batches(1)[0]
    grads = []
    for stage in (plain, ckpt, compiled):
        modules.load_lora_tensors(stage, adapters)
        loss_of(stage(ids), labels).backward()
        grads.append({n: p.grad for n, p in modules.lora_parameters(stage).items()})
    assert len(grads[1]) == len(grads[2]) == len(grads[0])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the block was really compiled
    for name, grad in grads[0].items():
        assert grad.abs().max() > 1e-3, name
        for other in grads[1:]:
            torch.testing.assert_close(other[name], grad, rtol=1e-5, atol=4e-5, msg=name)


def test_dropout_is_active_in_training_only(tmp_path):
    save_random_hf_model(CONFIGS["gptneox"](), tmp_path)
    cfg = modules.load_model_config(str(tmp_path))
    lora_cfg = modules.make_lora_config(cfg, R, ALPHA, 0.5, None)
    _, (stage,) = our_stage(tmp_path, lora_cfg)
    modules.load_lora_tensors(stage, random_b(stage))
    ids, _ = batches(1)[0]
    stage.eval()
    torch.testing.assert_close(stage(ids), stage(ids), rtol=0, atol=0)
    stage.train()
    assert not torch.allclose(stage(ids), stage(ids))


# --------------------------------------------------------------------------------------------------------------
# Files: peft adapter both ways, merged export
# --------------------------------------------------------------------------------------------------------------


def test_saved_adapter_loads_in_peft_with_equal_logits(tmp_path):
    cfg, lora_cfg, ref, ours = peft_and_ours("gptneox", tmp_path, "all-linear")
    adapters = modules.lora_state_dict(ours)
    modules.save_peft_adapter(str(tmp_path / "adapter"), adapters, lora_cfg, cfg, str(tmp_path / "base"))
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]

    base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), attn_implementation="sdpa")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    loaded_params = dict(loaded.named_parameters())
    assert sorted(n for n in loaded_params if "lora_" in n) == sorted(peft_name(n) for n in adapters)
    for name, value in adapters.items():
        assert torch.equal(loaded_params[peft_name(name)], value), name  # every key landed (B is non-zero)
    ids, _ = batches(1)[0]
    torch.testing.assert_close(loaded(input_ids=ids).logits, ours(ids), rtol=0, atol=1e-5)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (R, ALPHA, str(tmp_path / "base"))

    # A LoraConfig left at the default targets writes the family's default names, not an empty list.
    default_adapters = {n: t for n, t in adapters.items() if ".query_key_value." in n}
    modules.save_peft_adapter(str(tmp_path / "default"), default_adapters, LoraConfig(R, ALPHA), cfg, None)
    assert json.loads((tmp_path / "default" / "adapter_config.json").read_text())["target_modules"] == [
        "query_key_value"
    ]
    # And back: our reader gives the same settings and tensors.
    back_cfg, back = modules.load_peft_adapter(str(tmp_path / "adapter"), cfg, expect=lora_cfg)
    assert back_cfg == lora_cfg and back.keys() == adapters.keys()
    assert all(torch.equal(back[n], adapters[n]) for n in adapters)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_adapter_saved_by_peft_continues_in_our_stage(targets, tmp_path):
    hf = save_random_hf_model(CONFIGS["llama"](), tmp_path / "base")
    torch.manual_seed(2)
    ref = peft.get_peft_model(hf, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    ref.save_pretrained(str(tmp_path / "adapter"))  # peft writes full module paths for all-linear
    cfg = modules.load_model_config(str(tmp_path / "base"))
    lora_cfg, tensors = modules.load_peft_adapter(str(tmp_path / "adapter"), cfg)
    assert lora_cfg.target_modules == (("q_proj", "v_proj") if targets != "all-linear" else ALL_LINEARS["llama"])
    assert (lora_cfg.r, lora_cfg.alpha, lora_cfg.dropout) == (R, ALPHA, 0.0)
    _, stages = our_stage(tmp_path / "base", lora_cfg, [(0, 2), (2, 3)])
    for stage in stages:
        modules.load_lora_tensors(stage, tensors, str(tmp_path / "adapter"))
    ids, _ = batches(1)[0]
    torch.testing.assert_close(run(stages, ids), ref.eval()(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_merged_export_loads_in_transformers(tmp_path):
    cfg, lora_cfg, _, ours = peft_and_ours("gptj", tmp_path, "all-linear")
    state = ours.state_dict()
    base = {n: t for n, t in state.items() if not modules.lora.is_lora_name(n)}
    merged = modules.merge_lora_tensors(base, modules.lora_state_dict(ours), lora_cfg)
    assert not torch.equal(merged["transformer.h.0.attn.q_proj.weight"], base["transformer.h.0.attn.q_proj.weight"])
    assert merged["transformer.ln_f.weight"] is base["transformer.ln_f.weight"]
    modules.save_hf_directory(merged, cfg, str(tmp_path / "merged"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), attn_implementation="eager")
    ids, _ = batches(1)[0]
    torch.testing.assert_close(hf.eval()(ids).logits, ours(ids), rtol=0, atol=1e-5)


def test_merge_computes_in_fp32_and_leaves_the_cast_to_the_export():
    """A bf16 base merged with fp32 adapters stays fp32: rounding W + dW to bf16 here and then writing the fp32
    export the user asked for would lose small updates."""
    w = torch.randn(6, 5).to(torch.bfloat16)
    a, b = torch.randn(2, 5), torch.randn(6, 2)
    lora_cfg = LoraConfig(2, 3.0, 0.0, ("q_proj",))
    merged = modules.merge_lora_tensors(
        {"m.q_proj.weight": w}, {"m.q_proj.lora_A.weight": a, "m.q_proj.lora_B.weight": b}, lora_cfg
    )
    out = merged["m.q_proj.weight"]
    assert out.dtype == torch.float32
    assert torch.equal(out, w.float() + 1.5 * (b @ a))


# --------------------------------------------------------------------------------------------------------------
# Errors: one line, naming what is valid
# --------------------------------------------------------------------------------------------------------------


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_bad_settings_are_one_line_errors(tmp_path):
    save_random_hf_model(CONFIGS["gptneox"](), tmp_path)
    cfg = modules.load_model_config(str(tmp_path))
    assert block_linears(cfg) == {
        "query_key_value": "attention.query_key_value",
        "dense": "attention.dense",
        "dense_h_to_4h": "mlp.dense_h_to_4h",
        "dense_4h_to_h": "mlp.dense_4h_to_h",
    }
    with pytest.raises(ModelError) as e:
        modules.make_lora_config(cfg, 8, 16, 0.0, "query_key_value,q_proj")
    assert one_line(e) == (
        "LoRA target module 'q_proj' is not a linear layer of a gptneox block; valid names: query_key_value, "
        "dense, dense_h_to_4h, dense_4h_to_h (or all-linear)"
    )
    with pytest.raises(ModelError, match="'embed_out' is not a linear layer") as e:  # never the LM head
        modules.make_lora_config(cfg, 8, 16, 0.0, ["embed_out"])
    one_line(e)
    assert modules.make_lora_config(cfg, 8, 16, 0.0, "mlp.dense_4h_to_h, attention.dense").target_modules == (
        "dense",
        "dense_4h_to_h",
    )
    with pytest.raises(ModelError, match=r"'attn\.dense' is not a linear layer"):
        modules.make_lora_config(cfg, 8, 16, 0.0, "attn.dense")
    for r in (0, -1):
        with pytest.raises(ModelError) as e:
            modules.make_lora_config(cfg, r, 16)
        assert one_line(e) == f"LoRA rank r={r} is invalid; expected an integer >= 1"
    for p in (1.0, -0.1):
        with pytest.raises(ModelError) as e:
            modules.make_lora_config(cfg, 8, 16, p)
        assert one_line(e) == f"LoRA dropout {p} is invalid; expected a value in [0, 1)"
    stage = modules.apply_lora(modules.build_stage(cfg, 0, 1, True, False), modules.make_lora_config(cfg, 8, 16))
    with pytest.raises(ModelError, match="already has LoRA adapters"):
        modules.apply_lora(stage, modules.make_lora_config(cfg, 8, 16))


@pytest.mark.parametrize(
    "edit,message",
    [
        ({"use_rslora": True}, r"use_rslora=True is not supported \(only plain LoRA: use_rslora=False\)"),
        ({"use_dora": True}, r"use_dora=True is not supported"),
        ({"bias": "all"}, r"bias='all' is not supported \(only plain LoRA: bias='none'\)"),
        ({"modules_to_save": ["lm_head"]}, r"modules_to_save=\['lm_head'\] is not supported"),
        ({"rank_pattern": {"q_proj": 8}}, r"rank_pattern=.* is not supported"),
        ({"target_modules": ["c_attn"]}, r"'c_attn' is not a linear layer of a llama block; valid names: q_proj, "),
        ({"target_modules": ["q_proj", "k_proj"]}, r"k_proj\.lora_A\.weight' is missing"),
        ({"peft_type": "IA3"}, r"only LORA adapters are supported"),
    ],
)
def test_unsupported_peft_adapters_are_refused(edit, message, tmp_path):
    hf = save_random_hf_model(CONFIGS["llama"](), tmp_path / "base")
    peft.get_peft_model(hf, peft.LoraConfig(r=R, lora_alpha=ALPHA)).save_pretrained(str(tmp_path / "adapter"))
    cfg = modules.load_model_config(str(tmp_path / "base"))
    modules.load_peft_adapter(str(tmp_path / "adapter"), cfg)  # unedited: fine
    path = tmp_path / "adapter" / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | edit))
    with pytest.raises(ModelError, match=message) as e:
        modules.load_peft_adapter(str(tmp_path / "adapter"), cfg)
    assert one_line(e).startswith(str(tmp_path / "adapter"))


def test_adapter_with_other_settings_than_the_run_is_refused(tmp_path):
    hf = save_random_hf_model(CONFIGS["llama"](), tmp_path / "base")
    peft.get_peft_model(hf, peft.LoraConfig(r=R, lora_alpha=ALPHA)).save_pretrained(str(tmp_path / "adapter"))
    cfg = modules.load_model_config(str(tmp_path / "base"))
    with pytest.raises(ModelError) as e:
        modules.load_peft_adapter(
            str(tmp_path / "adapter"), cfg, expect=modules.make_lora_config(cfg, R, ALPHA, 0.0, "all-linear")
        )
    assert "adapter has target_modules=q_proj,v_proj but this run has target_modules=q_proj,k_proj," in one_line(e)
    with pytest.raises(ModelError, match="adapter has r=4 but this run has r=8"):
        modules.load_peft_adapter(str(tmp_path / "adapter"), cfg, expect=modules.make_lora_config(cfg, 8, ALPHA))


def test_fp32_adapters_on_a_bf16_base(tmp_path):
    save_random_hf_model(CONFIGS["llama"](), tmp_path)
    cfg = modules.load_model_config(str(tmp_path))
    lora_cfg = modules.make_lora_config(cfg, R, ALPHA, 0.0, "all-linear")
    _, (stage,) = our_stage(tmp_path, lora_cfg)
    modules.load_lora_tensors(stage, random_b(stage))
    ids, labels = batches(1)[0]
    reference = stage(ids)
    stage.to(torch.bfloat16)
    for p in modules.lora_parameters(stage).values():
        p.data = p.data.float()
    logits = stage(ids)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), reference, rtol=0.05, atol=0.15)  # bf16 base: close, not equal
    loss_of(logits.float(), labels).backward()
    assert all(p.grad.dtype == torch.float32 for p in modules.lora_parameters(stage).values())


# --------------------------------------------------------------------------------------------------------------
# QLoRA: bitsandbytes runs NF4 and int8 on the CPU too
# --------------------------------------------------------------------------------------------------------------


def quantized_pair(tmp_path, mode):
    save_random_hf_model(CONFIGS["llama"](), tmp_path)
    cfg = modules.load_model_config(str(tmp_path))
    lora_cfg = modules.make_lora_config(cfg, R, ALPHA, 0.0, None)  # q_proj, v_proj: other linears unadapted
    _, (plain,) = our_stage(tmp_path, lora_cfg)
    _, (quantized,) = our_stage(tmp_path, lora_cfg)
    adapters = random_b(plain)
    modules.load_lora_tensors(plain, adapters)
    modules.load_lora_tensors(quantized, adapters)
    modules.lora.quantize_base(quantized, mode, compute_dtype=torch.float32)
    return plain, quantized


def test_nf4_base_equals_its_dequantized_weights(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    plain, quantized = quantized_pair(tmp_path, "nf4")
    linears = 0
    with torch.no_grad():  # the reference: the same NF4 values, dequantized into a plain stage
        for path, module in quantized.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight = module.weight
                assert weight.dtype == torch.uint8 and weight.numel() * 2 == module.in_features * module.out_features
                assert weight.quant_state.nested  # double quantisation
                base_path = path.removesuffix(".base_layer")
                plain.get_submodule(base_path).weight.copy_(
                    bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
                )
                linears += 1
    assert linears == 3 * 7  # every linear of every block, adapted or not
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in (quantized.lm_head, quantized.model.embed_tokens))
    assert [n for n, p in quantized.named_parameters() if p.requires_grad] == list(modules.lora_parameters(plain))
    assert "model.layers.0.self_attn.q_proj.base_layer.weight" in quantized.state_dict()
    assert "model.layers.0.self_attn.k_proj.weight" in quantized.state_dict()
    ids, labels = batches(1)[0]
    plain_logits, quantized_logits = plain(ids), quantized(ids)
    torch.testing.assert_close(quantized_logits, plain_logits, rtol=0, atol=1e-5)
    loss_of(plain_logits, labels).backward()
    loss_of(quantized_logits, labels).backward()
    grads = modules.lora_parameters(plain)
    for name, p in modules.lora_parameters(quantized).items():
        assert p.grad.abs().max() > 1e-3, name
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=4e-5, msg=name)


def test_int8_base_trains_close_to_full_precision(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    plain, quantized = quantized_pair(tmp_path, "int8")
    assert isinstance(quantized.model.layers["0"].mlp.down_proj, bnb.nn.Linear8bitLt)
    ids, labels = batches(1)[0]
    plain_logits, quantized_logits = plain(ids), quantized(ids)
    # int8 rounds both weights and activations: close to the full-precision model, not equal.
    assert (quantized_logits - plain_logits).abs().max() < 0.05 * plain_logits.abs().max()
    loss_of(quantized_logits, labels).backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in modules.lora_parameters(quantized).values())


def test_quantize_errors(tmp_path, monkeypatch):
    save_random_hf_model(CONFIGS["llama"](), tmp_path)
    cfg = modules.load_model_config(str(tmp_path))
    stage = modules.build_stage(cfg, 0, 1, True, False)
    with pytest.raises(ModelError, match=r"quantize mode 'fp4' is not supported; expected one of none, nf4, int8"):
        modules.lora.quantize_base(stage, "fp4")
    with pytest.raises(ModelError, match=r"needs LoRA adapters on the stage \(apply_lora first\)"):
        modules.lora.quantize_base(stage, "nf4")
    modules.apply_lora(stage, modules.make_lora_config(cfg, R, ALPHA))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(ModelError) as e:
        modules.lora.quantize_base(stage, "nf4")
    assert one_line(e).endswith("run: pip install bitsandbytes")

"""modules/: our stage modules equal transformers' models (logits and gradients), any split, any file format."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import modules  # noqa: E402
from modules import ModelError  # noqa: E402
from tests.helpers import save_random_hf_model  # noqa: E402

transformers.logging.set_verbosity_error()

VOCAB, SEQ, BATCH = 96, 16, 2
ROPE = {"rope_type": "default", "rope_theta": 10000.0}

# Tiny configs, one per behaviour that differs between families. initializer_range is large so that every
# parameter moves the logits visibly (the 0.02 default leaves logits ~1e-3 and hides mistakes under atol).
CONFIGS = {
    "gptneox_parallel": lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        rope_parameters={**ROPE, "partial_rotary_factor": 1.0},
        use_parallel_residual=True,
    ),
    "gptneox_sequential": lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        rope_parameters={**ROPE, "partial_rotary_factor": 0.5},
        use_parallel_residual=False,
    ),
    "gptneox_partial_rotary": lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.25},
    ),
    "gptj": lambda: transformers.GPTJConfig(
        vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, rotary_dim=4, bos_token_id=0, eos_token_id=0
    ),
    "llama_gqa": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    ),
    "llama3_rope": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=96,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "llama_tied": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        intermediate_size=64,
        tie_word_embeddings=True,
        pad_token_id=0,
    ),
}


def make_hf_model(name: str, directory) -> transformers.PreTrainedModel:
    """A random transformers model of config `name`, saved (safetensors) into `directory`."""
    return save_random_hf_model(CONFIGS[name](), directory)


def hf_name(cfg, our_name: str) -> str:
    """transformers 5 calls GPT-NeoX's head `lm_head` in the module (the file says `embed_out`)."""
    return "lm_head.weight" if (cfg.model_type, our_name) == ("gptneox", "embed_out.weight") else our_name


def load_full(directory, **kw):
    cfg = modules.load_model_config(str(directory))
    stage = modules.build_stage(cfg, 0, cfg.num_layers, True, True, **kw)
    modules.load_stage_weights(stage, str(directory))
    return cfg, stage


def build_chain(cfg, bounds, directory=None, seed=None, **kw):
    """Stages for [(start, end), ...]; loaded from `directory` or initialised with `seed`."""
    stages = []
    for i, (start, end) in enumerate(bounds):
        stage = modules.build_stage(cfg, start, end, i == 0, i == len(bounds) - 1, **kw)
        if directory is not None:
            modules.load_stage_weights(stage, str(directory))
        else:
            modules.init_stage_weights(stage, cfg, seed)
        stages.append(stage)
    return stages


def run_chain(stages, ids):
    x = ids
    for stage in stages:
        x = stage(x)
    return x


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


def loss_of(logits, labels):
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")


# --------------------------------------------------------------------------------------------------------------
# Equality with transformers
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_gradients_match_transformers(name, tmp_path):
    hf = make_hf_model(name, tmp_path)
    cfg, ours = load_full(tmp_path)
    ids, labels = inputs()

    hf_logits = hf(ids).logits
    our_logits = ours(ids)
    assert our_logits.shape == (BATCH, SEQ, VOCAB)
    torch.testing.assert_close(our_logits, hf_logits, rtol=0, atol=1e-5)
    assert hf_logits.abs().max() > 0.5  # the comparison is not vacuous

    loss_of(hf_logits, labels).backward()
    loss_of(our_logits, labels).backward()
    hf_params = dict(hf.named_parameters())
    our_params = dict(ours.named_parameters())
    assert sorted(hf_name(cfg, n) for n in our_params) == sorted(hf_params)  # one to one
    for n, p in our_params.items():
        torch.testing.assert_close(p.grad, hf_params[hf_name(cfg, n)].grad, rtol=1e-5, atol=4e-5, msg=n)


def test_state_dict_keys_are_hf_keys(tmp_path):
    hf = make_hf_model("gptneox_sequential", tmp_path)
    cfg = modules.load_model_config(str(tmp_path))
    full = modules.build_stage(cfg, 0, 4, True, True)
    assert sorted(hf_name(cfg, k) for k in full.state_dict()) == sorted(hf.state_dict())
    middle = modules.build_stage(cfg, 2, 3, False, False)
    assert all(k.startswith("gpt_neox.layers.2.") for k in middle.state_dict())
    head_only = modules.build_stage(cfg, 4, 4, False, True)
    assert sorted(head_only.state_dict()) == [
        "embed_out.weight",
        "gpt_neox.final_layer_norm.bias",
        "gpt_neox.final_layer_norm.weight",
    ]
    assert not any("inv_freq" in k for k in full.state_dict())


def test_load_model_config_fields(tmp_path):
    make_hf_model("gptneox_partial_rotary", tmp_path / "neox")
    cfg = modules.load_model_config(str(tmp_path / "neox"), "gptneox")
    assert (cfg.model_type, cfg.head_dim, cfg.rotary_dim, cfg.rope_theta) == ("gptneox", 16, 4, 500.0)
    assert cfg.hf_config_dict["model_type"] == "gpt_neox"
    make_hf_model("llama_gqa", tmp_path / "llama")
    cfg = modules.load_model_config(str(tmp_path / "llama"))
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.rope_scaling) == (4, 2, {"rope_type": "linear", "factor": 2.0})
    assert modules.tied_parameter_names(cfg) == {}
    make_hf_model("llama_tied", tmp_path / "tied")
    cfg = modules.load_model_config(str(tmp_path / "tied"))
    assert modules.tied_parameter_names(cfg) == {"lm_head.weight": "model.embed_tokens.weight"}


# --------------------------------------------------------------------------------------------------------------
# Pipeline splits and activation checkpointing
# --------------------------------------------------------------------------------------------------------------

SPLITS = [
    [(0, 4)],
    [(0, 1), (1, 4)],
    [(0, 3), (3, 4)],
    [(0, 0), (0, 2), (2, 3), (3, 4)],  # embedding-only first stage
    [(0, 1), (1, 2), (2, 4), (4, 4)],  # head-only last stage
]


@pytest.mark.parametrize("name", ["gptneox_sequential", "llama_tied"])
def test_any_split_gives_the_same_logits(name, tmp_path):
    make_hf_model(name, tmp_path)
    cfg = modules.load_model_config(str(tmp_path))
    ids, _ = inputs()
    reference = run_chain(build_chain(cfg, SPLITS[0], tmp_path), ids)
    for bounds in SPLITS[1:]:
        torch.testing.assert_close(
            run_chain(build_chain(cfg, bounds, tmp_path), ids), reference, rtol=0, atol=1e-6, msg=str(bounds)
        )


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_same_values_and_grads(mode, tmp_path):
    make_hf_model("llama_gqa", tmp_path)
    ids, labels = inputs()
    _, plain = load_full(tmp_path)
    _, ckpt = load_full(tmp_path, activation_checkpointing=mode)
    ckpt.train()
    loss_plain, loss_ckpt = loss_of(plain(ids), labels), loss_of(ckpt(ids), labels)
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=0, atol=1e-5)
    loss_plain.backward()
    loss_ckpt.backward()
    grads = dict(plain.named_parameters())
    for n, p in ckpt.named_parameters():
        torch.testing.assert_close(p.grad, grads[n].grad, rtol=1e-5, atol=4e-5, msg=n)


def test_position_ids_default_and_dtype(tmp_path):
    make_hf_model("gptneox_parallel", tmp_path)
    cfg, stage = load_full(tmp_path)
    ids, _ = inputs()
    pos = torch.arange(SEQ).expand(BATCH, SEQ)
    torch.testing.assert_close(stage(ids, pos), stage(ids), rtol=0, atol=0)
    stage.to(torch.bfloat16)
    assert stage.rotary.inv_freq.dtype == torch.float32  # rotary frequencies survive .to(bf16)
    out = stage(ids)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------------------------
# Random init
# --------------------------------------------------------------------------------------------------------------


def merged_state(stages):
    state = {}
    for stage in stages:
        state.update(stage.state_dict())
    return state


@pytest.mark.parametrize("name", ["gptneox_parallel", "llama_tied", "gptj"])
def test_init_is_layout_independent_and_seeded(name, tmp_path):
    make_hf_model(name, tmp_path)
    cfg = modules.load_model_config(str(tmp_path))
    n = cfg.num_layers
    one = merged_state(build_chain(cfg, [(0, n)], seed=7))
    split = merged_state(build_chain(cfg, [(0, 1), (1, n - 1), (n - 1, n), (n, n)], seed=7))
    assert one.keys() == split.keys()
    for k in one:
        assert torch.equal(one[k], split[k]), k
    other = merged_state(build_chain(cfg, [(0, n)], seed=8))
    emb = modules.embedding_name(cfg)
    assert not torch.equal(one[emb], other[emb])
    for k, v in one.items():
        if k.endswith("layernorm.weight") or k.endswith("ln_1.weight") or k.endswith("norm.weight"):
            assert torch.equal(v, torch.ones_like(v)), k
        elif k.endswith(".bias"):
            assert torch.equal(v, torch.zeros_like(v)), k
    assert abs(one[emb].std().item() / cfg.initializer_range - 1) < 0.06
    if cfg.tie_word_embeddings:  # separate last stage starts from the embedding's values
        assert torch.equal(split["lm_head.weight"], split[emb])
        assert torch.equal(split[emb][cfg.pad_token_id], torch.zeros(cfg.hidden_size))


# --------------------------------------------------------------------------------------------------------------
# Checkpoint formats
# --------------------------------------------------------------------------------------------------------------


def write_openchatkit_pt(hf_model, cfg, directory):
    """What OpenChatKit's prepare.py writes: torch.save of per-part state dicts, with stale buffers included."""
    os.makedirs(directory, exist_ok=True)
    sd = hf_model.state_dict()
    fam = modules.stage.family(cfg)
    prefix, layers = f"{fam.PREFIX}.", f"{fam.PREFIX}.{fam.LAYERS}."
    head = "embed_out.weight" if cfg.model_type == "gptneox" else "lm_head.weight"
    embs = {k[len(prefix) :]: v.clone() for k, v in sd.items() if k.startswith(f"{prefix}{fam.EMBED}.")}
    torch.save(embs, os.path.join(directory, "pytorch_embs.pt"))
    for i in range(cfg.num_layers):
        p = f"{layers}{i}."
        layer = {k[len(p) :]: v.clone() for k, v in sd.items() if k.startswith(p)}
        if cfg.model_type == "gptneox":
            layer["attention.bias"] = torch.tril(torch.ones(8, 8, dtype=torch.bool))[None, None]
            layer["attention.masked_bias"] = torch.tensor(-1e9)
            layer["attention.rotary_emb.inv_freq"] = torch.ones(2)
        torch.save(layer, os.path.join(directory, f"pytorch_{i}.pt"))
    last = {k[len(prefix) :]: v.clone() for k, v in sd.items() if k.startswith(f"{prefix}{fam.FINAL_NORM}.")}
    last[head] = sd["lm_head.weight"].clone()
    if cfg.model_type == "gptj":
        last["lm_head.bias"] = sd["lm_head.bias"].clone()
    torch.save(last, os.path.join(directory, "pytorch_lm_head.pt"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg.hf_config_dict, f)


def prepare_cli(src, dst):
    """tools/prepare_pretrained.py through its main() (test_convert.py also runs it as a script)."""
    from tools.prepare_pretrained import main

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(["--model-name", str(src), "--output", str(dst)])
    return subprocess.CompletedProcess("prepare_pretrained.py", code, "", err.getvalue())


@pytest.mark.parametrize("name", ["gptneox_sequential", "gptj", "llama_tied"])
def test_layer_sharded_formats_load_identically(name, tmp_path):
    hf = make_hf_model(name, tmp_path / "hf")
    cfg, reference = load_full(tmp_path / "hf")
    write_openchatkit_pt(hf, cfg, tmp_path / "pt")
    result = prepare_cli(tmp_path / "hf", tmp_path / "st")
    assert result.returncode == 0, result.stderr
    assert os.path.isfile(tmp_path / "st" / "pytorch_embs.safetensors")
    assert os.path.isfile(tmp_path / "st" / f"pytorch_{cfg.num_layers - 1}.safetensors")
    ref = reference.state_dict()
    for variant in ("pt", "st"):
        for bounds in ([(0, cfg.num_layers)], [(0, 1), (1, cfg.num_layers), (cfg.num_layers, cfg.num_layers)]):
            state = merged_state(build_chain(cfg, bounds, tmp_path / variant))
            assert state.keys() == ref.keys()
            for k in ref:
                assert torch.equal(state[k], ref[k]), (variant, bounds, k)


def test_hf_bin_sharded_and_old_key_spellings(tmp_path):
    hf = make_hf_model("gptneox_sequential", tmp_path / "hf")
    cfg, reference = load_full(tmp_path / "hf")
    ref = reference.state_dict()
    # Sharded safetensors with an index.
    hf.save_pretrained(str(tmp_path / "sharded"), max_shard_size="40KB")
    assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    # pytorch_model.bin as transformers 4 wrote it: with the causal-mask buffers, head spelled `lm_head` here.
    os.makedirs(tmp_path / "bin")
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    sd["gpt_neox.layers.0.attention.bias"] = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    sd["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
    torch.save(sd, tmp_path / "bin" / "pytorch_model.bin")
    with open(tmp_path / "bin" / "config.json", "w") as f:
        json.dump(cfg.hf_config_dict, f)
    for variant in ("sharded", "bin"):
        for bounds in ([(0, 4)], [(0, 2), (2, 4)]):
            state = merged_state(build_chain(cfg, bounds, tmp_path / variant))
            for k in ref:
                assert torch.equal(state[k], ref[k]), (variant, k)


def test_load_keeps_parameter_dtype(tmp_path):
    make_hf_model("llama_gqa", tmp_path)
    cfg = modules.load_model_config(str(tmp_path))
    stage = modules.build_stage(cfg, 0, 2, True, False).to(torch.bfloat16)
    modules.load_stage_weights(stage, str(tmp_path))
    assert all(p.dtype == torch.bfloat16 for p in stage.parameters())


# --------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------


def rewrite_safetensors(path, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_missing_unexpected_and_misshaped_tensors(tmp_path):
    make_hf_model("gptneox_parallel", tmp_path)
    cfg = modules.load_model_config(str(tmp_path))
    weights = tmp_path / "model.safetensors"
    original = weights.read_bytes()
    key = "gpt_neox.layers.1.mlp.dense_h_to_4h.weight"

    rewrite_safetensors(weights, lambda t: t.pop(key))
    with pytest.raises(ModelError, match=r"model\.safetensors: tensor .*dense_h_to_4h\.weight. is missing"):
        modules.load_stage_weights(modules.build_stage(cfg, 0, 4, True, True), str(tmp_path))
    modules.load_stage_weights(modules.build_stage(cfg, 0, 1, True, False), str(tmp_path))  # other stages load

    weights.write_bytes(original)
    rewrite_safetensors(weights, lambda t: t.update({"gpt_neox.layers.9.mlp.dense_h_to_4h.weight": t[key].clone()}))
    with pytest.raises(ModelError, match=r"model\.safetensors: unexpected tensor 'gpt_neox\.layers\.9\."):
        modules.load_stage_weights(modules.build_stage(cfg, 0, 1, True, False), str(tmp_path))

    weights.write_bytes(original)
    rewrite_safetensors(weights, lambda t: t.update({key: t[key][:, :-1].contiguous()}))
    with pytest.raises(
        ModelError,
        match=r"model\.safetensors: tensor .*dense_h_to_4h\.weight.* has shape \[64, 31\], "
        r"expected \[64, 32\]",
    ):
        modules.load_stage_weights(modules.build_stage(cfg, 1, 2, False, False), str(tmp_path))


def test_layer_sharded_errors_name_the_file(tmp_path):
    hf = make_hf_model("llama_gqa", tmp_path / "hf")
    cfg = modules.load_model_config(str(tmp_path / "hf"))
    write_openchatkit_pt(hf, cfg, tmp_path / "pt")
    layer = torch.load(tmp_path / "pt" / "pytorch_1.pt", weights_only=True)
    layer["self_attn.extra.weight"] = torch.zeros(1)
    torch.save(layer, tmp_path / "pt" / "pytorch_1.pt")
    modules.load_stage_weights(modules.build_stage(cfg, 0, 1, True, False), str(tmp_path / "pt"))
    with pytest.raises(ModelError, match=r"pytorch_1\.pt: unexpected tensor 'self_attn\.extra\.weight'"):
        modules.load_stage_weights(modules.build_stage(cfg, 1, 2, False, False), str(tmp_path / "pt"))
    os.remove(tmp_path / "pt" / "pytorch_2.pt")
    with pytest.raises(ModelError, match=r"pytorch_2\.pt: file not found"):
        modules.load_stage_weights(modules.build_stage(cfg, 2, 3, False, True), str(tmp_path / "pt"))


def test_config_errors(tmp_path):
    with pytest.raises(ModelError, match=r"config\.json: file not found"):
        modules.load_model_config(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(transformers.BertConfig().to_dict()))
    with pytest.raises(
        ModelError,
        match=r"config\.json: model_type 'bert' is not supported; supported model types: "
        r"gptneox, gptj, llama",
    ):
        modules.load_model_config(str(tmp_path))
    make_hf_model("gptj", tmp_path / "gptj")
    with pytest.raises(ModelError, match=r"model_type is 'gptj' \(gptj\) but 'llama' was requested"):
        modules.load_model_config(str(tmp_path / "gptj"), "llama")
    with pytest.raises(ModelError, match=r"'opt' is not supported"):
        modules.load_model_config(str(tmp_path / "gptj"), "opt")
    with pytest.raises(ModelError, match=r"no weights found"):
        modules.load_stage_weights(
            modules.build_stage(modules.load_model_config(str(tmp_path / "gptj")), 0, 1, True, False), str(tmp_path)
        )
    assert issubclass(ModelError, ValueError)


def test_prepare_cli_errors(tmp_path):
    result = prepare_cli(tmp_path / "missing", tmp_path / "out")
    assert result.returncode == 2
    assert "config.json: file not found" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------------------------
# Counts
# --------------------------------------------------------------------------------------------------------------


def training_step_matmul_flops(stage, x) -> int:
    """FLOPs of the matmuls in one forward and backward of `stage` on `x`, as torch's FlopCounterMode counts them
    from the shapes of every mm/addmm/bmm that runs. SDPA is held to its math path: its fused CPU kernel is not
    counted, and the math path computes the full S x S scores (then masks them), which is the non-causal count."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        stage(x).float().square().mean().backward()  # the loss adds no matmul
    return counter.get_total_flops()


@pytest.mark.parametrize("name", ["gptneox_parallel", "llama_tied", "gptj", "llama_gqa"])
def test_count_parameters_and_flops(name, tmp_path):
    """flops_per_token against the matmuls of a real training step of the whole model, at two sequence lengths (so
    the attention term is checked apart from the weights). The conventions it checks: forward + backward (input and
    weight gradients) of every matmul, attention scores and values over the full S x S (non-causal), no
    recomputation (activation checkpointing off), the embedding lookup not counted. One convention differs: the
    formula counts 6 FLOPs for every non-embedding parameter, biases and norm scales too (the 1-D parameters),
    which take part in no matmul; their count is added to the measurement, so the comparison stays exact."""
    hf = make_hf_model(name, tmp_path)
    cfg = modules.load_model_config(str(tmp_path))
    assert modules.count_parameters(cfg) == sum(p.numel() for p in hf.parameters())
    stage = modules.build_stage(cfg, 0, cfg.num_layers, True, True)
    modules.load_stage_weights(stage, str(tmp_path))
    outside_matmuls = sum(p.numel() for p in stage.parameters() if p.dim() == 1)
    assert 0 < 6 * outside_matmuls < 0.05 * modules.flops_per_token(cfg, SEQ)  # a small correction, not the count
    for batch, seq in ((BATCH, SEQ), (1, 3 * SEQ)):
        tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
        measured = training_step_matmul_flops(stage, tokens)
        assert measured + 6 * outside_matmuls * batch * seq == modules.flops_per_token(cfg, seq) * batch * seq


# --------------------------------------------------------------------------------------------------------------
# Memory: a stage loads about its own share of the checkpoint
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.e2e  # a benchmark script in its own processes
def test_stage_load_peak_rss_is_its_share(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "bench", "load_memory.py"),
            "--size-mb",
            "40",
            "--workdir",
            str(tmp_path),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(
        f"\npeak RSS over (imports + empty stage) per quarter stage, fraction of the checkpoint: "
        f"{report['fractions']}; including the stage's own parameters: {report['fractions_with_params']}"
    )
    assert max(report["fractions"]) <= 0.4
    assert max(report["fractions_with_params"]) <= 0.4

"""The newer families (Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3, Phi-3) equal transformers: logits and gradients of
tiny random models with every distinguishing feature switched on (a sliding window shorter than the test window,
soft-caps, q/k norms, query scale, (1 + weight) norms with non-zero weights, fused projections, partial rotary, a
local rotary base), against transformers' eager attention; packed documents equal each document alone; any split
equals the whole; unsupported settings are refused in one line naming the field."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import modules
from tests.helpers import make_model

transformers.logging.set_verbosity_error()

VOCAB, SEQ, BATCH = 96, 24, 2
WINDOW = 5  # shorter than SEQ: the sliding layers' mask matters
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, intermediate_size=48, initializer_range=0.2)

CONFIGS = {
    "qwen2": lambda: transformers.Qwen2Config(
        **COMMON,
        num_hidden_layers=4,
        num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        use_sliding_window=True,
        sliding_window=WINDOW,
        max_window_layers=2,  # layers 2 and 3 slide
        tie_word_embeddings=True,
    ),
    "qwen3": lambda: transformers.Qwen3Config(
        **COMMON,
        num_hidden_layers=3,
        num_key_value_heads=2,
        head_dim=16,  # not hidden / heads
        attention_bias=True,
        tie_word_embeddings=True,
    ),
    "mistral": lambda: transformers.MistralConfig(
        **COMMON, num_hidden_layers=3, num_key_value_heads=1, head_dim=12, sliding_window=WINDOW
    ),
    "gemma2": lambda: transformers.Gemma2Config(
        **COMMON,
        num_hidden_layers=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=12,
        attn_logit_softcapping=2.0,  # small caps so that the tanh bends the logits
        final_logit_softcapping=3.0,
        sliding_window=WINDOW,
        pad_token_id=0,
    ),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **COMMON,
        num_hidden_layers=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=16,
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0},
        },
        pad_token_id=0,
    ),
    "phi3": lambda: transformers.Phi3Config(
        **COMMON,
        num_hidden_layers=3,
        num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5},
        sliding_window=WINDOW,
        pad_token_id=VOCAB - 1,
    ),
}


def hf_model(name: str, directory, head_dim: int | None = None) -> transformers.PreTrainedModel:
    """A random transformers model of config `name` with every norm weight moved off its init (Gemma's start at 0,
    so (1 + w) and w would agree), saved into `directory`; eager attention (the soft-cap's reference). `head_dim`
    widens every head (and the hidden size with it)."""
    config = CONFIGS[name]()
    if head_dim:
        config.head_dim = head_dim
        config.hidden_size = head_dim * config.num_attention_heads
    config.bos_token_id = config.eos_token_id = 1
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(str(directory))
    return model


def ours(directory, bounds=None):
    cfg = modules.load_model_config(str(directory))
    bounds = bounds or [(0, cfg.num_layers)]
    stages = []
    for i, (start, end) in enumerate(bounds):
        stage = modules.build_stage(cfg, start, end, i == 0, i == len(bounds) - 1)
        modules.load_stage_weights(stage, str(directory))
        stages.append(stage)
    return cfg, stages


def run(stages, ids, **kw):
    h = ids
    for stage in stages:
        h = stage(h, **kw)
    return h


def loss_of(logits, labels):
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_gradients_match_transformers(name, tmp_path):
    hf = hf_model(name, tmp_path)
    cfg, (stage,) = ours(tmp_path)
    assert cfg.model_type == name
    ids = torch.randint(2, VOCAB - 1, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(ids, -1, 1)
    want, got = hf(ids).logits, stage(ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert want.abs().max() > 0.5
    loss_of(want, labels).backward()
    loss_of(got, labels).backward()
    theirs = dict(hf.named_parameters())
    mine = dict(stage.named_parameters())
    assert sorted(mine) == sorted(theirs)
    for n, p in mine.items():
        torch.testing.assert_close(p.grad, theirs[n].grad, rtol=1e-5, atol=4e-5, msg=n)


@pytest.mark.parametrize("name", ["qwen2", "gemma2", "gemma3", "phi3"])
def test_a_split_pipeline_and_packed_documents_equal_transformers(name, tmp_path):
    """Any split gives the whole model's logits; packed documents (with windows inside them) equal each document
    run alone with fresh positions."""
    hf = hf_model(name, tmp_path)
    cfg, stages = ours(tmp_path, [(0, 1), (1, 3), (3, cfg_layers(tmp_path))])
    ids = torch.randint(2, VOCAB - 1, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(run(stages, ids), hf(ids).logits, rtol=0, atol=1e-5)
    doc_ids = torch.tensor([[0] * 9 + [1] * 15, [0] * 3 + [1] * 11 + [2] * 10])
    starts = torch.cat([torch.ones(BATCH, 1, dtype=torch.bool), doc_ids[:, 1:] != doc_ids[:, :-1]], 1)
    index = torch.arange(SEQ).expand(BATCH, SEQ)
    position_ids = index - torch.cummax(torch.where(starts, index, 0), 1).values
    got = run(stages, ids, position_ids=position_ids, doc_ids=doc_ids)
    for row in range(BATCH):
        for d in doc_ids[row].unique():
            part = doc_ids[row] == d
            alone = hf(ids[row][part][None]).logits[0]
            torch.testing.assert_close(got[row][part], alone, rtol=0, atol=1e-5)


def cfg_layers(directory) -> int:
    return modules.load_model_config(str(directory)).num_layers


def test_family_settings_are_read_from_the_config(tmp_path):
    hf_model("gemma3", tmp_path / "g3")
    cfg = modules.load_model_config(str(tmp_path / "g3"))
    assert cfg.layer_types == ("sliding", "sliding", "full", "sliding") and cfg.sliding_window == WINDOW
    assert (cfg.qk_norm, cfg.norm_offset, cfg.sandwich_norms, cfg.embed_scale) == (True, True, True, True)
    assert cfg.local_rope_theta == 10_000.0 and cfg.rope_theta == 1_000_000.0
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 4.0} and cfg.local_rope_scaling is None
    hf_model("qwen2", tmp_path / "q2")
    cfg = modules.load_model_config(str(tmp_path / "q2"))
    assert (cfg.attention_bias, cfg.o_bias, cfg.layer_types) == (True, False, ("full", "full", "sliding", "sliding"))
    assert modules.resolve_target_modules(cfg, None) == ("q_proj", "v_proj")


# Phi-3.5's long-context rotary (not implemented: refused), on the tiny Phi-3's 4 rotary dims
LONGROPE = {"rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 0.5, "short_factor": [1.0, 1.0]}
LONGROPE["long_factor"] = [2.0, 2.0]


@pytest.mark.parametrize(
    "change,line",
    [
        (
            {"rope_parameters": LONGROPE, "original_max_position_embeddings": 16},
            "rope type 'longrope' is not supported",
        ),
        ({"attention_dropout": 0.1}, "attention_dropout is 0.1; dropout inside the base model is not implemented"),
        ({"resid_pdrop": 0.1}, "resid_pdrop is 0.1"),
    ],
)
def test_unsupported_family_settings_are_refused_naming_the_field(tmp_path, change, line):
    hf_model("phi3", tmp_path)
    path = tmp_path / "config.json"
    raw = json.loads(path.read_text())
    raw.update(change)
    path.write_text(json.dumps(raw))
    with pytest.raises(modules.ModelError) as caught:
        modules.load_model_config(str(tmp_path))
    assert line in str(caught.value) and "\n" not in str(caught.value)


def test_a_gemma3_vision_language_checkpoint_is_refused_with_what_to_train_instead(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": {}}))
    with pytest.raises(modules.ModelError, match="train its text model"):
        modules.load_model_config(str(tmp_path))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_make_tiny_model_writes_each_family(name, tmp_path):
    directory = make_model(tmp_path / name, model_type=name, hidden=32, layers=2, heads=4)
    cfg = modules.load_model_config(directory)
    assert cfg.model_type == name and cfg.num_layers == 2


@pytest.mark.parametrize("name", ["qwen3", "gemma2", "phi3"])
def test_flops_per_token_counts_the_matmuls_of_a_training_step(name, tmp_path):
    """As tests/test_models.py checks the older families: heads x head_dim (not the hidden size) sets the attention
    term where a family sets head_dim apart; the 1-D parameters (norms, biases) are in the formula, not in a matmul."""
    from tests.test_models import training_step_matmul_flops

    hf_model(name, tmp_path)
    cfg, (stage,) = ours(tmp_path)
    outside_matmuls = sum(p.numel() for p in stage.parameters() if p.dim() == 1)
    for batch, seq in ((BATCH, SEQ), (1, 2 * SEQ)):
        tokens = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(0))
        measured = training_step_matmul_flops(stage, tokens)
        assert measured + 6 * outside_matmuls * batch * seq == modules.flops_per_token(cfg, seq) * batch * seq


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's GPU path (block masks, score_mod)")
@pytest.mark.parametrize("name", ["qwen2", "mistral", "gemma2", "gemma3", "phi3"])
def test_gpu_block_masks_and_softcaps_match_transformers(name, tmp_path):
    """On a GPU the windows, document masks and soft-caps go through FlexAttention block masks: fp32 logits and
    gradients over several 128-token blocks, packed and not, equal transformers' eager attention. Heads of 16: the
    compiled FlexAttention kernel takes no fewer."""
    torch.backends.cuda.matmul.allow_tf32 = False
    hf = hf_model(name, tmp_path, head_dim=16).cuda()
    cfg, (stage,) = ours(tmp_path)
    stage = stage.cuda()
    seq = 320
    ids = torch.randint(2, VOCAB - 1, (BATCH, seq), generator=torch.Generator().manual_seed(3)).cuda()
    torch.testing.assert_close(stage(ids), hf(ids).logits, rtol=0, atol=1e-4)
    doc_ids = torch.tensor([[0] * 150 + [1] * 170, [0] * 40 + [1] * 200 + [2] * 80]).cuda()
    starts = torch.cat([torch.ones(BATCH, 1, dtype=torch.bool, device="cuda"), doc_ids[:, 1:] != doc_ids[:, :-1]], 1)
    index = torch.arange(seq, device="cuda").expand(BATCH, seq)
    position_ids = index - torch.cummax(torch.where(starts, index, 0), 1).values
    got = stage(ids, position_ids=position_ids, doc_ids=doc_ids)
    labels = torch.roll(ids, -1, 1)
    loss_of(got, labels).backward()
    want_loss = 0
    for row in range(BATCH):
        for d in doc_ids[row].unique():
            part = doc_ids[row] == d
            alone = hf(ids[row][part][None]).logits[0]
            torch.testing.assert_close(got[row][part], alone, rtol=0, atol=1e-4)
            want_loss = want_loss + loss_of(alone[None], labels[row][part][None])
    want_loss.backward()
    theirs = dict(hf.named_parameters())
    for n, p in stage.named_parameters():
        # fp32 sums in another order: against a float64 reference, ours and transformers' GPU gradients each err by
        # up to ~1.5e-5 of the largest one (Qwen2's tied embedding: 2.2e-3 and 1.1e-3 of 150)
        atol = 3e-5 * theirs[n].grad.abs().max().item()
        torch.testing.assert_close(p.grad, theirs[n].grad, rtol=1e-4, atol=atol, msg=n)

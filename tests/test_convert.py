"""tools/: HF -> layer-sharded -> stages -> training checkpoint -> HF, bit for bit; and the CLIs' errors."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import modules  # noqa: E402
from modules.export import save_hf_directory  # noqa: E402
from modules.weights import canonical_name  # noqa: E402
from tests.helpers import hf_attention, save_random_hf_model  # noqa: E402

transformers.logging.set_verbosity_error()

VOCAB = 64
CONFIGS = {
    "gptneox": lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        use_parallel_residual=False,
    ),
    "gptj": lambda: transformers.GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, rotary_dim=4),
    "llama_tied": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        tie_word_embeddings=True,
    ),
}


def make_tokenizer(directory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{f"w{i}": i + 1 for i in range(VOCAB - 1)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(str(directory))


def make_hf_model(name, directory):
    model = save_random_hf_model(CONFIGS[name](), directory)
    make_tokenizer(directory)
    return model


def run_tool(script, *args, in_process=True):
    """Run tools/<script> with `args`: in this process through its main() (fast), or as `python tools/<script>`."""
    args = [str(a) for a in args]
    if not in_process:
        return subprocess.run(
            [sys.executable, os.path.join(REPO, "tools", script), *args], capture_output=True, text=True
        )
    tool = importlib.import_module(f"tools.{script[:-3]}")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = tool.main(args)
    return subprocess.CompletedProcess(script, code, out.getvalue(), err.getvalue())


def write_training_checkpoint(cfg, stages, ckpt_dir, step, tokenizer_src=None):
    """The checkpoint layout convert_to_hf.py reads (what the training engine writes)."""
    folder = ckpt_dir / f"checkpoint_{step}"
    folder.mkdir(parents=True)
    files, sizes = {}, {}
    for p, stage in enumerate(stages):
        tensors = {k: v.detach().clone() for k, v in stage.state_dict().items()}  # clone: a tied head shares memory
        path = folder / f"prank_{p}_model.safetensors"
        save_file(tensors, str(path))
        files[path.name], sizes[path.name] = hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_size
    meta = {
        "step": step,
        "model_type": cfg.model_type,
        "model_config": cfg.hf_config_dict,
        "layout": {"pp": len(stages), "dp": 1},
        "files": files,
        "sizes": sizes,
    }
    (folder / "meta.json").write_text(json.dumps(meta))
    if tokenizer_src is not None:
        (folder / "tokenizer").mkdir()
        modules.export.copy_tokenizer_files(str(tokenizer_src), str(folder / "tokenizer"))
    (ckpt_dir / "latest").write_text(f"{step}\n")
    return folder


def canonical_file(cfg, directory):
    return {canonical_name(cfg, k): v for k, v in load_file(os.path.join(directory, "model.safetensors")).items()}


# Every family through main(), and once the real command lines (e2e: two launches)
ROUND_TRIPS = [pytest.param(name, False, id=name) for name in CONFIGS] + [
    pytest.param("gptneox", True, marks=pytest.mark.e2e, id="gptneox-script")
]


@pytest.mark.parametrize("name,as_script", ROUND_TRIPS)
def test_round_trip_is_bit_identical(name, as_script, tmp_path):
    hf = make_hf_model(name, tmp_path / "hf")
    result = run_tool(
        "prepare_pretrained.py",
        "--model-name",
        tmp_path / "hf",
        "--output",
        tmp_path / "sharded",
        in_process=not as_script,
    )
    assert result.returncode == 0, result.stderr
    assert os.path.isfile(tmp_path / "sharded" / "tokenizer.json")
    cfg = modules.load_model_config(str(tmp_path / "sharded"))
    stages = [modules.build_stage(cfg, 0, 1, True, False), modules.build_stage(cfg, 1, 3, False, True)]
    for stage in stages:
        modules.load_stage_weights(stage, str(tmp_path / "sharded"))
    write_training_checkpoint(cfg, stages, tmp_path / "ckpt", 7, tokenizer_src=tmp_path / "sharded")

    result = run_tool(
        "convert_to_hf.py",
        "--checkpoint-path",
        tmp_path / "ckpt",
        "--output",
        tmp_path / "out",
        in_process=not as_script,
    )
    assert result.returncode == 0, result.stderr

    original, exported = canonical_file(cfg, tmp_path / "hf"), canonical_file(cfg, tmp_path / "out")
    assert exported.keys() == original.keys()
    for k in original:
        assert torch.equal(exported[k], original[k]), k
    if cfg.model_type == "gptneox":  # the head spelling of hub checkpoints, which transformers 4 and 5 both load
        assert "embed_out.weight" in load_file(str(tmp_path / "out" / "model.safetensors"))

    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "out"), output_loading_info=True, attn_implementation=hf_attention(hf.config)
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = stages[1](stages[0](ids))
        torch.testing.assert_close(model.eval()(ids).logits, ours, rtol=0, atol=1e-5)
        torch.testing.assert_close(hf(ids).logits, ours, rtol=0, atol=1e-5)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert tokenizer("w3 w5")["input_ids"] == [4, 6]


def test_dtype_step_and_shards(tmp_path):
    make_hf_model("llama_tied", tmp_path / "hf")
    cfg = modules.load_model_config(str(tmp_path / "hf"))
    stage = modules.build_stage(cfg, 0, 3, True, True)
    modules.init_stage_weights(stage, cfg, seed=1)
    write_training_checkpoint(cfg, [stage], tmp_path / "ckpt", 3)
    modules.init_stage_weights(stage, cfg, seed=2)
    write_training_checkpoint(cfg, [stage], tmp_path / "ckpt", 9)  # `latest` now says 9

    result = run_tool(
        "convert_to_hf.py",
        "--checkpoint-path",
        tmp_path / "ckpt",
        "--step",
        3,
        "--output",
        tmp_path / "out",
        "--dtype",
        "bf16",
    )
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] is True
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert "lm_head.weight" not in exported  # tied: transformers re-ties it
    stage_3 = modules.build_stage(cfg, 0, 3, True, True)
    modules.init_stage_weights(stage_3, cfg, seed=1)
    emb = stage_3.state_dict()["model.embed_tokens.weight"]
    assert torch.equal(exported["model.embed_tokens.weight"], emb.to(torch.bfloat16))
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert model.dtype == torch.bfloat16 and not info["missing_keys"] and not info["unexpected_keys"]

    # Sharded output with an index, from the library function.
    save_hf_directory(stage.state_dict(), cfg, str(tmp_path / "shards"), "fp32", max_shard_bytes=20_000)
    assert os.path.isfile(tmp_path / "shards" / "model.safetensors.index.json")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "shards"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(model.model.embed_tokens.weight, stage.state_dict()["model.embed_tokens.weight"])


def one_line_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.e2e  # the command line's own output (a launch): one line, no traceback
def test_convert_error_from_the_command_line_is_one_line(tmp_path):
    one_line_error(
        run_tool(
            "convert_to_hf.py", "--checkpoint-path", tmp_path / "nope", "--output", tmp_path / "out", in_process=False
        ),
        "nope: checkpoint directory not found",
    )


def test_convert_errors(tmp_path):
    out = tmp_path / "out"
    one_line_error(
        run_tool("convert_to_hf.py", "--checkpoint-path", tmp_path / "nope", "--output", out),
        "nope: checkpoint directory not found",
    )
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    one_line_error(
        run_tool("convert_to_hf.py", "--checkpoint-path", ckpt, "--output", out), "latest: file not found", "--step"
    )
    (ckpt / "latest").write_bytes(b"\xff\xfe")
    one_line_error(
        run_tool("convert_to_hf.py", "--checkpoint-path", ckpt, "--output", out), "not a step number", "--step N"
    )

    make_hf_model("gptneox", tmp_path / "hf")
    cfg = modules.load_model_config(str(tmp_path / "hf"))
    stages = [modules.build_stage(cfg, 0, 2, True, False), modules.build_stage(cfg, 2, 3, False, True)]
    folder = write_training_checkpoint(cfg, stages, ckpt, 4)
    one_line_error(
        run_tool("convert_to_hf.py", "--checkpoint-path", ckpt, "--step", 5, "--output", out),
        "checkpoint_5: checkpoint for step 5 not found",
    )

    assert run_tool("convert_to_hf.py", "--checkpoint-path", ckpt, "--output", out).returncode == 0
    one_line_error(
        run_tool("convert_to_hf.py", "--checkpoint-path", ckpt, "--output", out),
        "already holds model weights (model.safetensors)",
        "new folder",
    )
    exported = (out / "model.safetensors").read_bytes()

    stage_file = folder / "prank_1_model.safetensors"
    data = bytearray(stage_file.read_bytes())
    data[-5] ^= 0xFF  # a flipped bit in the tensor data: still a valid safetensors file
    stage_file.write_bytes(bytes(data))
    one_line_error(
        run_tool("convert_to_hf.py", "--checkpoint-path", ckpt, "--output", tmp_path / "out2"),
        "prank_1_model.safetensors fails its sha256 check",
        "--step",
    )
    assert not (tmp_path / "out2").exists() and (out / "model.safetensors").read_bytes() == exported

    tensors = load_file(str(stage_file))
    del tensors["gpt_neox.layers.2.mlp.dense_4h_to_h.bias"]
    save_file(tensors, str(stage_file))
    meta = json.loads((folder / "meta.json").read_text())  # re-signed, as if written that way
    meta["files"]["prank_1_model.safetensors"] = hashlib.sha256(stage_file.read_bytes()).hexdigest()
    meta["sizes"]["prank_1_model.safetensors"] = stage_file.stat().st_size
    (folder / "meta.json").write_text(json.dumps(meta))
    one_line_error(
        run_tool("convert_to_hf.py", "--checkpoint-path", ckpt, "--output", tmp_path / "out3"),
        "checkpoint_4: tensor 'gpt_neox.layers.2.mlp.dense_4h_to_h.bias' is missing",
    )

    os.remove(folder / "prank_1_model.safetensors")
    one_line_error(
        run_tool("convert_to_hf.py", "--checkpoint-path", ckpt, "--output", out),
        "prank_1_model.safetensors: stage weights not found (meta.json says pp=2)",
    )

    (folder / "meta.json").write_text("{}")
    one_line_error(run_tool("convert_to_hf.py", "--checkpoint-path", ckpt, "--output", out), "meta.json: expected")


def test_save_hf_directory_rejects_unexpected_tensors(tmp_path):
    make_hf_model("gptj", tmp_path / "hf")
    cfg = modules.load_model_config(str(tmp_path / "hf"))
    tensors = modules.build_stage(cfg, 0, 3, True, True).state_dict()
    tensors["transformer.h.3.ln_1.weight"] = torch.ones(32)
    with pytest.raises(modules.ModelError, match=r"unexpected tensor 'transformer\.h\.3\.ln_1\.weight'"):
        save_hf_directory(tensors, cfg, str(tmp_path / "out"))


def test_prepare_rejects_bad_input(tmp_path):
    make_hf_model("gptj", tmp_path / "hf")
    before = sorted(os.listdir(tmp_path / "hf"))
    os.symlink(tmp_path / "hf", tmp_path / "link")
    for same in (tmp_path / "hf", f"{tmp_path}/hf/", tmp_path / "link"):  # the model directory by another name
        one_line_error(
            run_tool("prepare_pretrained.py", "--model-name", tmp_path / "hf", "--output", same),
            f"--output {same} is the model directory",
            "new directory",
        )
        assert sorted(os.listdir(tmp_path / "hf")) == before  # nothing written into the source
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    tensors["transformer.h.0.attn.q_proj.weight"] = tensors["transformer.h.0.attn.q_proj.weight"][:16].clone()
    tensors["transformer.h.7.mlp.fc_in.weight"] = torch.zeros(1)
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"))
    one_line_error(
        run_tool("prepare_pretrained.py", "--model-name", tmp_path / "hf", "--output", tmp_path / "out"),
        "model.safetensors: unexpected tensor 'transformer.h.7.mlp.fc_in.weight'",
    )
    del tensors["transformer.h.7.mlp.fc_in.weight"]
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"))
    one_line_error(
        run_tool("prepare_pretrained.py", "--model-name", tmp_path / "hf", "--output", tmp_path / "out"),
        "model.safetensors: tensor 'transformer.h.0.attn.q_proj.weight' has shape [16, 32], expected [32, 32]",
    )

"""fp16 and bf16 paths: they train, keep fp32 master weights, and a non-finite step is skipped by the whole job."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import base_flags, make_chat_data, make_model, read_checkpoint_weights, run_job

pytestmark = pytest.mark.e2e  # real multi-process runs of the entrypoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    return root, make_model(root / "model", hidden=32, layers=4, heads=4), make_chat_data(root / "chat.jsonl")


def read_metrics(path):
    return {r["step"]: r for r in map(json.loads, open(path)) if "loss" in r}


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_precision_trains_with_fp32_master_weights(setup, precision, dtype):
    root, model_dir, data = setup
    ckpt, metrics = root / f"ck-{precision}", root / f"metrics-{precision}.jsonl"
    flags = base_flags(
        model_dir,
        data,
        str(ckpt),
        **{precision: True, "pipeline-group-size": 2, "total-steps": 6, "lr": 3e-3, "metrics-file": str(metrics)},
    )
    result = run_job(2, flags)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = read_metrics(metrics)
    assert sorted(steps) == list(range(1, 7))
    assert all("skipped" not in r for r in steps.values())
    assert steps[6]["loss"] < steps[1]["loss"]
    weights = read_checkpoint_weights(str(ckpt))
    assert all(w.dtype == dtype for w in weights.values())
    optimizer = read_checkpoint_weights(str(ckpt), suffix="_optimizer.safetensors")
    masters = {k: v for k, v in optimizer.items() if k.endswith("/master")}
    assert set(masters) == {f"{k}/master" for k in weights}
    for name, weight in weights.items():
        master = masters[f"{name}/master"]
        assert master.dtype == torch.float32
        torch.testing.assert_close(master.to(dtype), weight, rtol=0, atol=0)  # model = rounded master


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_overflow_on_one_stage_skips_the_step_everywhere(setup, precision):
    """An inf gradient injected on rank 0 (first stage) at step 2: both stages skip step 2 (fp16: decided on the
    host, and the scale halves; bf16: inside fused AdamW's kernel, nothing read back). With a constant LR, the
    weights after 2 steps (one skipped) then equal those of a clean 1-step run."""
    root, model_dir, data = setup
    common = {precision: True, "pipeline-group-size": 2, "lr-scheduler": "constant"}
    if precision == "fp16":
        common["hysteresis"] = 1
    clean = root / f"ck-clean-{precision}"
    result = run_job(2, base_flags(model_dir, data, str(clean), **common, **{"total-steps": 1}))
    assert result.returncode == 0, result.stderr[-3000:]
    injected, metrics = root / f"ck-inf-{precision}", root / f"metrics-inf-{precision}.jsonl"
    result = run_job(
        2,
        base_flags(model_dir, data, str(injected), **common, **{"total-steps": 2, "metrics-file": str(metrics)}),
        env={"INJECT_INF_GRAD": "2:0"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    steps = read_metrics(metrics)
    assert "skipped" not in steps[1] and steps[2]["skipped"] == 1
    if precision == "fp16":
        assert steps[1]["loss_scale"] == 2**15 and steps[2]["loss_scale"] == 2**14
    # step 2's loss is unscaled by the scale it ran with, not the halved one (that would log it doubled)
    assert 0.7 < steps[2]["loss"] / steps[1]["loss"] < 1.4, (steps[1]["loss"], steps[2]["loss"])
    want, got = read_checkpoint_weights(str(clean)), read_checkpoint_weights(str(injected))
    assert set(want) == set(got)
    for name in want:
        assert torch.equal(want[name], got[name]), name  # rank 0's and rank 1's stages both skipped


def test_compiled_blocks_and_loss_train_like_eager(setup):
    """--compile (torch.compile of every block and of the loss) and --attention-backend change kernels, not the
    math: on CPU in fp32, three steps give the weights of the eager run with torch's default attention."""
    root, model_dir, data = setup
    weights = {}
    for compiled in (False, True):
        ckpt = root / f"ck-compile-{compiled}"
        flags = {"lr": 3e-3, "attention-backend": "math" if compiled else "auto"}
        result = run_job(1, base_flags(model_dir, data, str(ckpt), compile=compiled, **flags), timeout=400)
        assert result.returncode == 0, result.stderr[-3000:]
        weights[compiled] = read_checkpoint_weights(str(ckpt))
    assert set(weights[True]) == set(weights[False])
    initial = load_file(f"{model_dir}/model.safetensors")
    for name, eager in weights[False].items():
        torch.testing.assert_close(weights[True][name], eager, rtol=1e-5, atol=4e-5, msg=name)
    name = "gpt_neox.layers.0.mlp.dense_h_to_4h.weight"
    assert (weights[True][name] - initial[name]).abs().max() > 1e-3  # the runs trained: the check has teeth


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's synchronization checks")
@pytest.mark.parametrize("kernel", ["flex", "varlen"])
def test_bf16_steps_after_the_first_never_wait_for_the_gpu(setup, tmp_path, monkeypatch, capsys, kernel):
    """One GPU, bf16, no loss scaling, packed documents: from the second step on, a training step (its batches to the
    device, the document masks, forward and backward, the loss normalisation, the gradient norm, clipping and the
    update) queues its work without one synchronizing call, so the GPU never idles while the host catches up:
    torch's sync debug mode raises on any. (The first step checks that its labels hold a token to learn.) On either
    kernel of the document masks: varlen attention's lengths are counted on the host."""
    import torch._dynamo

    import dist_lm_pretrain_and_finetune as entrypoint
    from training.loop import Trainer

    # FlexAttention compiles per shape, and the GPU tests before this one in the same process compile it for theirs:
    # past torch.compile's recompile limit it would run uncompiled here (and synchronize). Start from a clean slate.
    torch._dynamo.reset()
    train_step = Trainer.train_step

    def checked(self):
        if self.step == 0:
            return train_step(self)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return train_step(self)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(Trainer, "train_step", checked)
    root, _, data = setup
    model_dir = make_model(tmp_path / "model", hidden=64, layers=2, heads=4)  # head size 16: FlexAttention's least
    flags = base_flags(
        model_dir,
        data,
        str(tmp_path / "ck"),
        bf16=True,
        **{"use-cuda": "true", "dp-backend": "nccl", "total-steps": 4, "masked-attention": kernel},
    )
    code = entrypoint.main(flags)
    assert code == 0, capsys.readouterr().err[-3000:]

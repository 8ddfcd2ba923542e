"""Optimizer pieces on their own: loss-scaler rules, LR schedules, state round trip through checkpoint tensors."""
import argparse

import pytest
import torch

from comm import Layout
from optimizer import StageOptimizer, lr_multiplier, no_decay
from optimizer.scaler import LossScaler


def test_loss_scaler_hysteresis_window_and_floor():
    scaler = LossScaler(initial_scale=8.0, window=3, hysteresis=2, min_scale=2.0)
    scaler.update(overflow=True)
    assert scaler.scale == 8.0  # first overflow is absorbed by the hysteresis
    scaler.update(overflow=True)
    assert scaler.scale == 4.0
    scaler.update(overflow=True)
    assert scaler.scale == 2.0
    scaler.update(overflow=True)
    assert scaler.scale == 2.0  # never below --min-loss-scale
    for _ in range(3):
        scaler.update(overflow=False)
    assert scaler.scale == 4.0 and scaler.hysteresis_left == 2  # a clean window doubles and resets hysteresis
    static = LossScaler(static_scale=128.0)
    static.update(overflow=True)
    assert static.scale == 128.0


def test_lr_schedules():
    linear = lr_multiplier("linear", warmup=2, total=6)
    assert [linear(s) for s in range(7)] == [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0]
    cosine = lr_multiplier("cosine", warmup=0, total=4)
    assert cosine(0) == 1.0 and cosine(2) == pytest.approx(0.5) and cosine(4) == pytest.approx(0.0)
    constant = lr_multiplier("constant", warmup=1, total=4)
    assert [constant(s) for s in range(4)] == [0.0, 1.0, 1.0, 1.0]


def test_no_weight_decay_on_biases_and_norms():
    assert no_decay("gpt_neox.layers.0.attention.dense.bias", torch.zeros(4))
    assert no_decay("model.norm.weight", torch.zeros(4))
    assert not no_decay("model.layers.0.mlp.up_proj.weight", torch.zeros(4, 4))


def make_optimizer(params, dtype):
    args = argparse.Namespace(weight_decay=0.01, optimizer="adam", lr=1e-2, adam_beta1=0.9, adam_beta2=0.999,
                              adam_eps=1e-6, warmup_steps=0, gradient_accumulate_step=1, lr_scheduler="linear",
                              fp16=dtype == torch.float16, initial_loss_scale=2.0 ** 15, loss_scale_window=1000,
                              hysteresis=2, min_loss_scale=1.0, loss_scale=0.0, max_grad_norm=1.0)
    layout = Layout(0, 1, 1, 1, 0, 0, 0, torch.device("cpu"))
    return StageOptimizer(params, args, layout, total_optimizer_steps=10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_round_trip_continues_identically(dtype):
    """Two steps, save the state as tensors, restore into a fresh optimizer: the third step is identical."""
    def fresh():
        torch.manual_seed(0)
        weight = torch.nn.Parameter(torch.randn(4, 4).to(dtype))
        bias = torch.nn.Parameter(torch.zeros(4).to(dtype))
        return [("w", weight), ("b", bias)]

    def step(opt, params, k):
        for i, (_, p) in enumerate(params):
            p.grad = torch.full_like(p, 0.1 * (k + i + 1))
        opt.step()

    a_params = fresh()
    a = make_optimizer(a_params, dtype)
    step(a, a_params, 0)
    step(a, a_params, 1)
    a.inner.state[a.master_params[0]]["counter"] = 7  # a Python number, as bitsandbytes keeps its step
    saved = a.state_tensors(["w", "b"]), a.state_dict()
    assert "w/counter#py" in saved[0] and ("w/master" in saved[0]) == (dtype != torch.float32)

    b_params = fresh()
    with torch.no_grad():
        for (_, pb), (_, pa) in zip(b_params, a_params):
            pb.copy_(pa)
    b = make_optimizer(b_params, dtype)
    b.load_state_tensors(["w", "b"], saved[0])
    b.load_state_dict(saved[1])
    assert b.inner.state[b.master_params[0]]["counter"] == 7 and b.lr == a.lr
    step(a, a_params, 2)
    step(b, b_params, 2)
    for (_, pa), (_, pb) in zip(a_params, b_params):
        assert torch.equal(pa, pb)

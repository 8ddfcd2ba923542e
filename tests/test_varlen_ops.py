"""The custom ops behind --masked-attention varlen (modules.varlen) on the CPU, with torch's two private varlen
kernels stood in by CPU functions: the forward reaches torch's forward with the batch's sequences, causal flag and
window; the backward runs torch's backward with deterministic algorithms switched on for that call alone, and hands
its gradients to the right inputs, eagerly and under torch.compile. The kernels themselves are tested on a GPU
(test_varlen_attention)."""

import pytest
import torch

from modules import varlen

pytestmark = pytest.mark.skipif(varlen._register_ops() is None, reason="this torch has no varlen attention ops")


@pytest.fixture
def stand_in_kernels():
    """Registers CPU stand-ins for torch's varlen forward (out = 2 q) and backward (dq = 3 grad, dk = 0, dv = 1) for
    the test, recording what each call saw."""
    calls = []

    def forward(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, scale=None, window_size=None, *rest):
        calls.append({"op": "forward", "cu_seqlens": cu_q.tolist(), "causal": is_causal, "window": window_size})
        return 2 * q, torch.zeros(q.shape[1], q.shape[0]), torch.zeros(2, dtype=torch.int64)

    def backward(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, is_causal, rng_state, scale, window_size):
        calls.append({"op": "backward", "deterministic": torch.are_deterministic_algorithms_enabled()})
        return 3 * grad_out, torch.zeros_like(k), torch.ones_like(v)

    library = torch.library.Library("torch_attn", "IMPL")
    library.impl("_varlen_attn", forward, "CPU")
    library.impl("_varlen_attn_backward", backward, "CPU")
    yield calls
    library._destroy()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("window", [None, 4], ids=["causal", "window"])
def test_varlen_attention_runs_torchs_backward_deterministically(stand_in_kernels, window, compiled):
    mask = varlen.VarlenMask(torch.tensor([[3, 5], [8, 0]]), batch=2, seq=8, window=window, device="cpu")
    q = torch.randn(2, 4, 8, 16, requires_grad=True)
    k, v = (torch.randn(2, 2, 8, 16, requires_grad=True) for _ in range(2))
    attend = mask.attend
    if compiled:
        attend = torch.compile(attend, backend="aot_eager", fullgraph=True)
    out = attend(q, k, v, 0.5)
    assert out.shape == (2, 8, 64)
    assert torch.equal(out, 2 * q.detach().transpose(1, 2).reshape(2, 8, 64))
    out.backward(torch.ones_like(out))

    assert stand_in_kernels == [
        {
            "op": "forward",
            "cu_seqlens": [0, 3, 8, 16, 16],
            "causal": window is None,
            "window": [window - 1, 0] if window else [-1, 0],
        },
        {"op": "backward", "deterministic": True},
    ]
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.equal(q.grad, torch.full_like(q, 3.0))
    assert torch.equal(k.grad, torch.zeros_like(k))
    assert torch.equal(v.grad, torch.ones_like(v) * (1 if varlen._register_ops().takes_gqa else 2))


def test_deterministic_kernels_restores_the_callers_mode():
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with varlen.deterministic_kernels():
            assert torch.are_deterministic_algorithms_enabled()
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_the_default_falls_back_to_flex_attention_silently_where_varlen_cannot_run():
    """--masked-attention auto (the default) is not varlen on a CPU or for an fp32 model, and says nothing; asked for
    by name, varlen warns there that it does not apply; flex never takes varlen."""
    from modules.config import model_config_from_dict

    cfg = model_config_from_dict(
        {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 32}
    )
    for dtype in (torch.float32, torch.bfloat16):
        for choice in ("auto", "flex", "varlen"):
            assert not varlen.varlen_chosen(choice, cfg, dtype, torch.device("cpu"), None)
    assert varlen.varlen_note("auto", False) is None and varlen.varlen_note("flex", False) is None
    assert varlen.varlen_note("varlen", False).startswith("WARNING")
    assert varlen.varlen_note("auto", True).startswith("attention: packed documents")

"""AdamW for 16-bit parameters with fp32 master weights on a CUDA device, in one pass over memory.

torch's fused AdamW steps tensors of one dtype, so a bf16/fp16 model's step otherwise takes three passes: widen the
16-bit gradients into fp32 copies, run the fused kernel on the masters, round the masters back into the parameters
(40 bytes of memory traffic per parameter, and an fp32 copy of up to 1 GiB of gradients at a time). The kernel here
reads the 16-bit gradient, the master and both moments once and writes the moments, the master and the rounded
parameter (28 bytes), with no fp32 gradient in memory at all.

The state is torch AdamW's own (`step`, `exp_avg`, `exp_avg_sq` in `optimizer.state`), so checkpoints are those of
the three-pass path and either path resumes the other's. The update is torch's AdamW in float32 (decoupled weight
decay, bias corrections from each tensor's step count, divisions and square root correctly rounded), honouring the
optimizer's `grad_scale` and `found_inf` as torch's fused step does: every gradient divided by the first, the whole
step (weights, moments and step counts) skipped where the second is 1. The bias corrections and `1 - beta` are
worked out in double on the host and rounded once, as torch's CPU and for-loop AdamW do (triton takes float
arguments as float32, and 1 - 0.999 taken in float32 is off by 1.3e-5 of itself). torch's CUDA fused AdamW rounds
its scalars otherwise: on an H100 it agreed with this step at the first step and differed from the second on, by up
to 3e-8 on masters of order 1, so a run steps one way throughout, this way wherever it can run.
"""

import contextlib
import functools
import importlib.util

import torch

# Elements per program (5 loads and 4 stores each: memory-bound) and warps: the fastest of blocks 1,024-4,096 x 4 or 8
# warps in bench/bench_optimizer_step.py on an H100 (15.9 ms for the 1.4B shape; 2,048 x 4 warps: 16.3; 4,096 x 4: 18.5).
BLOCK = 1024
NUM_WARPS = 8


def runs_on(device: torch.device) -> bool:
    """Whether the one-pass step can run for tensors on `device` (a CUDA device, with triton installed)."""
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None  # torch's CUDA builds bring it


@functools.cache
def _kernel():
    """Built on first use: triton is imported only where the step runs on a GPU (or, in tests, interpreted)."""
    import triton
    import triton.language as tl

    @triton.jit
    def adamw_one_pass(
        grad,
        master,
        exp_avg,
        exp_avg_sq,
        param,
        numel,
        step_size,  # lr / bias_correction1 of this tensor's step (fp32 on the device)
        bias_correction2_sqrt,
        grad_scale,
        found_inf,
        lr_times_decay,
        beta1,
        one_minus_beta1,  # from the host, in double: 1 - 0.999 taken in float32 is 1.3e-5 off
        beta2,
        one_minus_beta2,
        eps,
        DECAY: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < numel
        # A skipped step stores nothing (a scalar bound, not a scalar in the mask: triton's interpreter, which runs
        # the CPU tests, cannot combine the two).
        live = offsets < tl.where(tl.load(found_inf) == 0, numel, 0)
        g = tl.div_rn(tl.load(grad + offsets, mask=inside, other=0.0).to(tl.float32), tl.load(grad_scale))
        p = tl.load(master + offsets, mask=inside, other=0.0)
        if DECAY:
            p = p - lr_times_decay * p
        m = beta1 * tl.load(exp_avg + offsets, mask=inside, other=0.0) + one_minus_beta1 * g
        v = beta2 * tl.load(exp_avg_sq + offsets, mask=inside, other=0.0) + one_minus_beta2 * g * g
        denom = tl.div_rn(tl.sqrt_rn(v), tl.load(bias_correction2_sqrt)) + eps
        p = p - tl.div_rn(tl.load(step_size) * m, denom)
        tl.store(exp_avg + offsets, m, mask=live)
        tl.store(exp_avg_sq + offsets, v, mask=live)
        tl.store(master + offsets, p, mask=live)
        tl.store(param + offsets, p.to(param.dtype.element_ty), mask=live)

    return adamw_one_pass


def _state(optimizer: torch.optim.Optimizer, master: torch.Tensor) -> dict:
    """The master's AdamW state, made as torch's fused AdamW makes it on its first step."""
    state = optimizer.state[master]
    if not state:
        state["step"] = torch.zeros((), dtype=torch.float32, device=master.device)
        state["exp_avg"] = torch.zeros_like(master, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(master, memory_format=torch.preserve_format)
    return state


def _launching_on(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class OnePassAdamW(torch.optim.AdamW):
    """torch's AdamW, whose step() may instead be given the 16-bit gradients and parameters of its fp32 masters:
    `step(grads={master: its gradient}, params={master: the model tensor it is the master of})` steps those masters
    in one pass (on a CUDA device; tensors of the master's shape, contiguous parameters) and writes them back
    rounded. Through step() itself, so that its LR scheduler sees the optimizer step."""

    @torch.no_grad()
    def step(self, closure=None, grads=None, params=None):
        if grads is None:
            return super().step(closure)
        kernel = _kernel()
        scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            if group["amsgrad"] or group["maximize"]:
                raise ValueError("the one-pass AdamW step has neither amsgrad nor maximize")
            masters = [m for m in group["params"] if m in grads]
            if not masters:
                continue
            device = masters[0].device
            states = [_state(self, m) for m in masters]
            steps = [state["step"] for state in states]
            torch._foreach_add_(steps, 1.0)
            # Bias corrections in float64 from each tensor's step count, rounded once to float32.
            beta1, beta2 = group["betas"]
            counts = torch.stack(steps).double()
            step_sizes = (group["lr"] / (1.0 - torch.pow(beta1, counts))).float()
            corrections2_sqrt = (1.0 - torch.pow(beta2, counts)).sqrt().float()
            divisor = torch.ones((), device=device) if scale is None else scale
            skip = torch.zeros((), device=device) if found_inf is None else found_inf
            decay = group["weight_decay"]
            with _launching_on(device):  # triton launches on the current CUDA device
                for k, master in enumerate(masters):
                    grad, param = grads[master], params[master]
                    if grad.shape != master.shape or param.shape != master.shape or not param.is_contiguous():
                        raise ValueError("the one-pass AdamW step needs contiguous tensors of the master's shape")
                    kernel[(-(-master.numel() // BLOCK),)](
                        grad.contiguous(),
                        master,
                        states[k]["exp_avg"],
                        states[k]["exp_avg_sq"],
                        param,
                        master.numel(),
                        step_sizes[k],
                        corrections2_sqrt[k],
                        divisor,
                        skip,
                        group["lr"] * decay,
                        beta1,
                        1.0 - beta1,
                        beta2,
                        1.0 - beta2,
                        group["eps"],
                        DECAY=decay != 0,
                        BLOCK=BLOCK,
                        num_warps=NUM_WARPS,
                    )
            if found_inf is not None:
                torch._foreach_sub_(steps, [found_inf] * len(steps))
        return None

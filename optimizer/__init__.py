"""The optimizer step of one pipeline stage: master weights, unscaling, global overflow check, global clipping.

Model parameters may be fp16/bf16; the optimizer then works on fp32 master copies and writes them back.
The gradient norm is reduced over the pipeline group only: after the data-parallel all-reduce every replica holds the
same gradients, so every rank of the job sees the same norm, skips the same fp16 overflow step and clips alike.
"""
import math

import torch
import torch.distributed as dist

from optimizer.scaler import LossScaler, NoScaler


class OptimizerError(RuntimeError):
    pass


def lr_multiplier(kind, warmup, total):
    """LR multiplier per optimizer step: linear warmup, then linear decay to 0 / cosine to 0 / constant."""

    def multiplier(step):
        if step < warmup:
            return step / max(1, warmup)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return multiplier


def no_decay(name, param):
    """Biases and norm weights (1-D tensors) take no weight decay."""
    return name.endswith(".bias") or param.ndim < 2


def _inner_optimizer(kind, groups, lr, betas, eps, on_cuda):
    if kind == "8bit-adam":
        try:
            import bitsandbytes as bnb  # slow import: only when asked for
        except ImportError as exc:
            raise OptimizerError("--optimizer 8bit-adam needs bitsandbytes: pip install bitsandbytes "
                                 f"({exc})") from None
        return bnb.optim.AdamW8bit(groups, lr=lr, betas=betas, eps=eps)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True if on_cuda else None)


class StageOptimizer:
    def __init__(self, named_params, args, layout, total_optimizer_steps, norm_exclude=()):
        self.layout = layout
        self.in_norm = [name not in norm_exclude for name, _ in named_params]
        self.model_params = [p for _, p in named_params]
        self.mixed = any(p.dtype != torch.float32 for p in self.model_params)
        if self.mixed:
            self.master_params = [p.detach().float().clone().requires_grad_(True) for p in self.model_params]
        else:
            self.master_params = self.model_params
        decay = [m for (n, p), m in zip(named_params, self.master_params) if not no_decay(n, p)]
        plain = [m for (n, p), m in zip(named_params, self.master_params) if no_decay(n, p)]
        groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": plain, "weight_decay": 0.0}]
        self.inner = _inner_optimizer(args.optimizer, groups, args.lr, (args.adam_beta1, args.adam_beta2),
                                      args.adam_eps, layout.device.type == "cuda")
        warmup = math.ceil(args.warmup_steps / args.gradient_accumulate_step)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.inner, lr_multiplier(args.lr_scheduler, warmup, total_optimizer_steps))
        if args.fp16:
            self.scaler = LossScaler(args.initial_loss_scale, args.loss_scale_window, args.hysteresis,
                                     args.min_loss_scale, args.loss_scale)
        else:
            self.scaler = NoScaler()
        self.max_grad_norm = args.max_grad_norm

    @property
    def loss_scale(self):
        return self.scaler.scale

    @property
    def lr(self):
        return self.inner.param_groups[0]["lr"]

    def zero_grad(self):
        for p in self.model_params:
            p.grad = None
        if self.mixed:
            for m in self.master_params:
                m.grad = None

    def _global_grad_norm(self, grads):
        sumsq = torch.stack(torch._foreach_norm(grads)).float().square().sum()  # a few kernels, not one per tensor
        if self.layout.pp_size > 1:
            dist.all_reduce(sumsq, op=dist.ReduceOp.SUM, group=self.layout.pp_group)
        return sumsq.sqrt()

    def step(self):
        """Unscale, check overflow, clip, update. Returns (grad_norm: float, skipped: bool)."""
        for p in self.model_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.mixed:
            for m, p in zip(self.master_params, self.model_params):
                m.grad = p.grad.float()
        grads = [m.grad for m in self.master_params]
        if self.scaler.scale != 1.0:
            torch._foreach_div_(grads, self.scaler.scale)
        norm = self._global_grad_norm([g for g, counted in zip(grads, self.in_norm) if counted])
        grad_norm = norm.item()  # the step's one host sync: every rank decides the same way
        overflow = not math.isfinite(grad_norm)
        self.scaler.update(overflow)
        if overflow:
            self.zero_grad()
            return grad_norm, True
        if self.max_grad_norm > 0:
            coef = torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)
            torch._foreach_mul_(grads, coef)
        self.inner.step()
        self.scheduler.step()
        if self.mixed:
            with torch.no_grad():
                torch._foreach_copy_(self.model_params, self.master_params)
        self.zero_grad()
        return grad_norm, False

    # Checkpoint I/O works on plain tensors keyed by parameter name (any layout can read them). Python numbers
    # in the state (bitsandbytes keeps its step count as an int) travel as 0-d tensors under a "#py" suffix.
    def state_tensors(self, names):
        """{f"{name}/{key}": tensor} for the optimizer state and fp32 master weights of `names` (same order)."""
        out = {}
        for name, master in zip(names, self.master_params):
            for key, value in self.inner.state.get(master, {}).items():
                if torch.is_tensor(value):
                    out[f"{name}/{key}"] = value.detach()
                elif isinstance(value, (int, float)):
                    out[f"{name}/{key}#py"] = torch.tensor(value)
            if self.mixed:
                out[f"{name}/master"] = master.detach()
        return out

    def load_state_tensors(self, names, tensors):
        for name, master, param in zip(names, self.master_params, self.model_params):
            if self.mixed:
                master.data.copy_(tensors[f"{name}/master"])
            keys = {k.split("/", 1)[1] for k in tensors if k.split("/", 1)[0] == name} - {"master"}
            if keys:
                state = {}
                for key in keys:
                    value = tensors[f"{name}/{key}"]
                    if key.endswith("#py"):
                        state[key[:-len("#py")]] = value.item()
                    else:
                        state[key] = value.to(master.device).clone()
                self.inner.state[master] = state

    def state_dict(self):
        return {"scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state):
        self.scheduler.load_state_dict(state["scheduler"])
        # LambdaLR restores its counter, not the groups' current lr: set it, or the next step uses step 0's lr.
        for group, lr in zip(self.inner.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
        self.scaler.load_state_dict(state["scaler"])

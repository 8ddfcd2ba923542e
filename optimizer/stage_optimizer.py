"""The optimizer step of one pipeline stage: master weights, unscaling, global overflow check, global clipping.

Model parameters may be fp16/bf16; the optimizer then works on fp32 master copies and writes them back.
The gradient norm is reduced over the pipeline group only: after the data-parallel all-reduce every replica holds the
same gradients, so every rank of the job sees the same norm, skips the same fp16 overflow step and clips alike.
"""

import importlib.util
import math

import torch
import torch.distributed as dist

from optimizer.scaler import LossScaler, NoScaler
from utils.config import OptimizerConfig
from utils.errors import UserError

MASTER_GRAD_CHUNK_BYTES = 1 << 30


class OptimizerError(UserError, RuntimeError):
    """The optimizer asked for cannot run here (a missing library); the message says what to install."""


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


BITSANDBYTES_MISSING = "--optimizer 8bit-adam needs bitsandbytes: pip install bitsandbytes"


def check_available(kind):
    """Before the model load: the library `kind` needs is installed (without importing it: ~4.5 s)."""
    if kind == "8bit-adam" and importlib.util.find_spec("bitsandbytes") is None:
        raise OptimizerError(BITSANDBYTES_MISSING)


def _inner_optimizer(kind, groups, lr, betas, eps):
    if kind == "8bit-adam":
        try:
            import bitsandbytes as bnb  # slow import: only when asked for
        except ImportError as exc:
            raise OptimizerError(f"{BITSANDBYTES_MISSING} ({exc})") from None
        return bnb.optim.AdamW8bit(groups, lr=lr, betas=betas, eps=eps)
    # Fused on CPU too, so that the tests run the same update (and its in-kernel unscaling) as the GPUs.
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)


class StageOptimizer:
    def __init__(self, named_params, cfg: OptimizerConfig, layout, total_optimizer_steps, norm_exclude=()):
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
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": plain, "weight_decay": 0.0}]
        self.inner = _inner_optimizer(cfg.kind, groups, cfg.lr, cfg.betas, cfg.eps)
        warmup = math.ceil(cfg.warmup_iterations / cfg.accumulation)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.inner, lr_multiplier(cfg.lr_scheduler, warmup, total_optimizer_steps)
        )
        if cfg.fp16:
            self.scaler = LossScaler(
                cfg.initial_loss_scale, cfg.loss_scale_window, cfg.hysteresis, cfg.min_loss_scale, cfg.loss_scale
            )
        else:
            self.scaler = NoScaler()
        self.max_grad_norm = cfg.max_grad_norm
        self.grad_chunks = self._grad_chunks()  # fixed by the parameters: worked out once, not every step

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
        """L2 norm over the whole pipeline of the (still loss-scaled) gradients, accumulated in fp32: an fp16
        gradient holding inf or nan makes it non-finite, which is how overflow is detected."""
        sumsq = torch.zeros((), device=self.layout.device)
        if grads:  # a stage may count none (only a tied head copy)
            norms = torch._foreach_norm(grads, 2, dtype=torch.float32)  # a few kernels, not one per tensor
            sumsq = torch.stack(norms).square().sum()
        if self.layout.pp_size > 1:
            dist.all_reduce(sumsq, op=dist.ReduceOp.SUM, group=self.layout.pp_group)
        return sumsq.sqrt()

    def _grad_chunks(self):
        """Index ranges of parameters holding at most MASTER_GRAD_CHUNK_BYTES of fp32 gradients each (or one
        larger tensor): master gradients exist for one range at a time, so the step never holds a full fp32 copy
        of all gradients."""
        if not self.mixed:
            return [range(len(self.master_params))]
        ranges, start, size = [], 0, 0
        for i, m in enumerate(self.master_params):
            if i > start and size + m.numel() * 4 > MASTER_GRAD_CHUNK_BYTES:
                ranges.append(range(start, i))
                start, size = i, 0
            size += m.numel() * 4
        ranges.append(range(start, len(self.master_params)))
        return ranges

    def step(self):
        """Unscale, check overflow, clip, update. Returns (grad_norm: float, skipped: bool)."""
        for p in self.model_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        scale = self.scaler.scale
        scaled_norm = self._global_grad_norm([p.grad for p, counted in zip(self.model_params, self.in_norm) if counted])
        grad_norm = scaled_norm.item() / scale  # the step's one host sync: every rank decides the same way
        overflow = not math.isfinite(grad_norm)
        self.scaler.update(overflow)
        if overflow:
            self.zero_grad()
            return grad_norm, True
        clip = 1.0
        if self.max_grad_norm > 0:
            clip = min(1.0, self.max_grad_norm / (grad_norm + 1e-6))
        # Unscaling and clipping are one division of every gradient; fused AdamW does it inside its own kernel.
        divisor = scale / clip
        fused = self.inner.defaults.get("fused")
        if fused:
            self.inner.grad_scale = torch.tensor(divisor, dtype=torch.float32, device=self.layout.device)
        for chunk in self.grad_chunks:
            masters = [self.master_params[i] for i in chunk]
            if self.mixed:
                for i, m in zip(chunk, masters):
                    m.grad = self.model_params[i].grad.float()
                    self.model_params[i].grad = None
            if divisor != 1.0 and not fused:
                torch._foreach_div_([m.grad for m in masters], divisor)
            self.inner.step()  # steps only the parameters that have a gradient: this chunk's
            if self.mixed:
                with torch.no_grad():
                    torch._foreach_copy_([self.model_params[i] for i in chunk], masters)
                for m in masters:
                    m.grad = None
        self.scheduler.step()
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

    def load_state_tensors(self, names, tensors, weights):
        """Restore the state of `names` from checkpoint tensors and return the weights the model should take.
        Precisions may differ from the checkpoint's: a mixed-precision run starts its fp32 master copies from the
        weights of an fp32 checkpoint (which has none); an fp32 run takes the master copies of a bf16/fp16 checkpoint
        instead of its rounded weights."""
        weights = dict(weights)
        for name in names:
            master = tensors.get(f"{name}/master")
            if not self.mixed and master is not None:
                weights[name] = master
            elif self.mixed and master is None:
                tensors[f"{name}/master"] = weights[name].float()
        for name, master in zip(names, self.master_params):
            if self.mixed:
                master.data.copy_(tensors[f"{name}/master"])
            keys = {k.split("/", 1)[1] for k in tensors if k.split("/", 1)[0] == name} - {"master"}
            if keys:
                state = {}
                for key in keys:
                    value = tensors[f"{name}/{key}"]
                    if key.endswith("#py"):
                        state[key[: -len("#py")]] = value.item()
                    else:
                        state[key] = value.to(master.device).clone()
                self.inner.state[master] = state
        return weights

    def state_dict(self):
        return {"scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state):
        """The schedule continues at the checkpoint's step with this run's --lr and schedule flags."""
        base_lrs = list(self.scheduler.base_lrs)
        self.scheduler.load_state_dict(state["scheduler"])
        self.scheduler.base_lrs = base_lrs  # LambdaLR would restore the checkpoint's --lr
        # It restores its step counter but not the groups' current lr: set it, or the next step uses step 0's lr.
        step = self.scheduler.last_epoch
        lrs = [base * multiplier(step) for base, multiplier in zip(base_lrs, self.scheduler.lr_lambdas)]
        self.scheduler._last_lr = lrs
        for group, lr in zip(self.inner.param_groups, lrs):
            group["lr"] = lr
        self.scaler.load_state_dict(state["scaler"])

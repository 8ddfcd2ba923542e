"""The optimizer step of one pipeline stage: master weights, unscaling, global overflow check, global clipping.

Model parameters may be fp16/bf16; the optimizer then works on fp32 master copies and writes them back.
The gradient norm is reduced over the pipeline group (and, with --dp-mode sharded, the data-parallel group, whose ranks
each hold one shard of the summed gradients), so every rank of the job sees the same norm, skips the same fp16
overflow step and clips alike. 8-bit Adam (bitsandbytes) shards too: its pieces start on its 256-element blocks
(BNB_BLOCK), and the kind of each state tensor (per element, per block, shared) says what a piece of it holds in a
checkpoint. --offload-optimizer cpu keeps the fp32 masters and the state on the host and steps
there (torch's fused CPU AdamW), its copies overlapped chunk by chunk (offload.py).
"""

import importlib.util
import math

import torch
import torch.distributed as dist

from config import OptimizerConfig
from data_parallel import GradientReducer
from optimizer import one_pass
from optimizer.offload import HostStep, host_threads
from optimizer.scaler import LossScaler, NoScaler
from utils.errors import UserError
from utils.host import host_memory_available, local_ranks

MASTER_GRAD_CHUNK_BYTES = 1 << 30
# At most, per rank: two staging buffers of a chunk's gradients and two of its rounded weights in 16-bit (half a
# chunk each) and one chunk of fp32 gradients (optimizer/offload.py).
HOST_STAGING_BYTES = 3 * MASTER_GRAD_CHUNK_BYTES


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
# bitsandbytes' 8-bit state is block-wise: one absmax scale per block of this many consecutive elements of the
# flattened tensor (`blocksize = 256` in Optimizer2State.init_state and in its update kernels, CPU and CUDA). Sharded
# pieces of 8-bit Adam start at multiples of it (the gradient buckets' align), so no block is cut between ranks.
BNB_BLOCK = 256

# How each optimizer state tensor relates to its parameter's flattened elements, which decides what a sharded piece
# [a:b] holds in a checkpoint (`<name>/<key>[a:b]`), how checkpoint.training_state.join_pieces joins the pieces and
# how load_state_tensors cuts a whole tensor for a piece. 0-d state (the step) is written once, like SHARED_STATE.
PER_ELEMENT_STATE = frozenset({"exp_avg", "exp_avg_sq", "master", "state1", "state2"})  # elements a..b
PER_BLOCK_STATE = frozenset({"absmax1", "absmax2"})  # blocks a // BNB_BLOCK .. ceil(b / BNB_BLOCK)
SHARED_STATE = frozenset({"qmap1", "qmap2"})  # 8-bit Adam's codebooks: the same for every piece, written once


def check_shardable(key):
    if key not in PER_ELEMENT_STATE | PER_BLOCK_STATE | SHARED_STATE:
        raise ValueError(f"optimizer state {key!r} has no sharding rule (optimizer/stage_optimizer.py)")


def state_piece(key, value, a, b):
    """The part of the whole-parameter state tensor `value` (state `key`) that the piece [a, b) holds."""
    check_shardable(key)
    if key in PER_BLOCK_STATE:
        return value[a // BNB_BLOCK : -(-b // BNB_BLOCK)]
    return value if key in SHARED_STATE else value.reshape(-1)[a:b]


def check_available(kind):
    """Before the model load: the library `kind` needs is installed (without importing it: ~4.5 s)."""
    if kind == "8bit-adam" and importlib.util.find_spec("bitsandbytes") is None:
        raise OptimizerError(BITSANDBYTES_MISSING)


def _inner_optimizer(kind, groups, lr, betas, eps, whole_numels):
    """The optimizer of the groups' tensors; `whole_numels[g][k]`: the size of the whole parameter that tensor k of
    group g is (a piece of)."""
    if kind == "8bit-adam":
        try:
            import bitsandbytes as bnb  # slow import: only when asked for
        except ImportError as exc:
            raise OptimizerError(f"{BITSANDBYTES_MISSING} ({exc})") from None

        class AdamW8bitOfPieces(bnb.optim.AdamW8bit):
            """bitsandbytes keeps fp32 state for a tensor of fewer than min_8bit_size (4096) elements, judged by
            the tensor it steps: judge a sharded piece by its whole parameter, so that it keeps the state the whole
            would. (Per optimizer, unlike bitsandbytes' GlobalOptimManager overrides: a process-wide registry.)"""

            def get_config(self, gindex, pindex, group):
                config = super().get_config(gindex, pindex, group)
                small = whole_numels[gindex][pindex] < self.args.min_8bit_size
                config["min_8bit_size"] = math.inf if small else 0
                return config

        return AdamW8bitOfPieces(groups, lr=lr, betas=betas, eps=eps)
    # Fused on CPU too, so that the tests run the same update (and its in-kernel unscaling) as the GPUs.
    return one_pass.OnePassAdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)


def check_host_memory(elements_per_rank):
    """--offload-optimizer cpu: the ranks on this host, offloading `elements_per_rank[i]` elements each (fp32 master
    and two moments: 12 bytes per element, plus the step's staging buffers), fit in the host's available memory;
    otherwise one line saying how much is needed, before anything large is allocated, instead of the OOM killer."""
    needs = [12 * n + HOST_STAGING_BYTES for n in elements_per_rank]
    available = host_memory_available()
    if available is not None and sum(needs) > available:
        raise OptimizerError(
            f"--offload-optimizer cpu needs {sum(needs) / 2**30:.1f} GiB of host memory for the {len(needs)} "
            f"rank(s) on this host (12 bytes per offloaded parameter; {max(needs) / 2**30:.1f} GiB for the largest "
            f"rank) and {available / 2**30:.1f} GiB is available; add data-parallel ranks with --dp-mode sharded, "
            f"raise --pipeline-group-size, or drop --offload-optimizer"
        )


class StageOptimizer:
    """The optimizer of one rank's stages. It steps *units*: whole parameters (--dp-mode allreduce), or, under
    --dp-mode sharded, the pieces `(param, start, end)` of flattened parameters this data-parallel rank owns
    (data_parallel/buckets.py). Each unit has an fp32 master: the parameter itself (fp32), a view of it (fp32,
    sharded), or a separate fp32 copy (bf16/fp16 models, and every unit with --offload-optimizer cpu, on the host)."""

    def __init__(
        self,
        named_params,
        cfg: OptimizerConfig,
        layout,
        total_optimizer_steps,
        backwards_per_step,
        norm_exclude=(),
        late=(),
    ):
        """`backwards_per_step`: backward passes per optimizer step (accumulation x micro-batches); `norm_exclude`:
        names left out of the gradient norm (tied copies); `late`: the tied embedding ends held by this rank when
        they are split over the pipeline (layout.ends_group): reduce_gradients() first sums their gradients over
        the ends, so that both take the same update, and their data-parallel reduction waits for that."""
        self.layout = layout
        self.tied_ends = [p for name, p in named_params if name in late]
        self.in_norm = [name not in norm_exclude for name, _ in named_params]
        self.model_params = [p for _, p in named_params]
        self.mixed = any(p.dtype != torch.float32 for p in self.model_params)
        # Every rank holding this stage (dp x cp of them) sums its gradients; one alone has nothing to shard.
        self.sharded = cfg.dp_mode == "sharded" and layout.grad_size > 1
        self.offload = cfg.offload == "cpu"
        self.host = torch.device("cpu") if self.offload else layout.device
        self.separate = self.mixed or self.offload  # masters are copies, written back to the model after a step
        self.reducer = None
        if layout.grad_size > 1:
            self.reducer = GradientReducer(
                self.model_params,
                layout.grad_group,
                layout.grad_size,
                layout.grad_rank,
                self.sharded,
                backwards_per_step,
                bucket_bytes=int(cfg.dp_bucket_mb * 2**20),
                align=BNB_BLOCK if self.sharded and cfg.kind == "8bit-adam" else 1,
                late={i for i, (name, _) in enumerate(named_params) if name in late},
            )
        if self.sharded:
            self.units = self.reducer.my_pieces()
        else:
            self.units = [(i, 0, p.numel()) for i, p in enumerate(self.model_params)]
        self.master_params = [self._make_master(i, a, b) for i, a, b in self.units]
        self._shard_grads = None  # this rank's summed gradient pieces, between reduce_gradients and step
        decay = [k for k, (i, _, _) in enumerate(self.units) if not no_decay(*named_params[i])]
        plain = [k for k, (i, _, _) in enumerate(self.units) if no_decay(*named_params[i])]
        groups = [
            {"params": [self.master_params[k] for k in decay], "weight_decay": cfg.weight_decay},
            {"params": [self.master_params[k] for k in plain], "weight_decay": 0.0},
        ]
        whole_numels = [[self.model_params[self.units[k][0]].numel() for k in ks] for ks in (decay, plain)]
        self.inner = _inner_optimizer(cfg.kind, groups, cfg.lr, cfg.betas, cfg.eps, whole_numels)
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
        # Without loss scaling, with torch's fused AdamW on the stage's own device, clipping and skipping a
        # non-finite step happen inside the update's kernel (its grad_scale and found_inf): the step then never
        # waits for the GPU to read the gradient norm back. fp16's scale, the offloaded update and 8-bit Adam
        # decide on the host.
        self.decides_on_device = not cfg.fp16 and not self.offload and cfg.kind != "8bit-adam"
        self.grad_chunks = self._grad_chunks()  # fixed by the parameters: worked out once, not every step
        # 16-bit weights with fp32 masters on a GPU: widening, update and rounding in one kernel (one_pass.py).
        self.one_pass = (
            self.mixed
            and not self.offload
            and cfg.kind != "8bit-adam"
            and one_pass.runs_on(layout.device)
            and all(self._unit_target(k).is_contiguous() for k in range(len(self.units)))
        )
        self.host_step = None
        if self.offload:
            dtypes = [self.model_params[i].dtype for i, _, _ in self.units]
            self.host_step = HostStep(self.master_params, dtypes, self.grad_chunks, layout.device)
            if layout.device.type == "cuda":  # on a CPU-only run the model runs on the host too: threads as given
                torch.set_num_threads(host_threads(local_ranks()))

    def _make_master(self, i, a, b):
        p = self.model_params[i].detach()
        if not self.separate:
            return self.model_params[i] if not self.sharded else p.view(-1)[a:b]  # updated in place
        src = p.view(-1)[a:b] if self.sharded else p
        pinned = self.offload and torch.cuda.is_available()  # asynchronous host->device copies of fp32 weights
        master = torch.empty(src.shape, dtype=torch.float32, device=self.host, pin_memory=pinned)
        return master.copy_(src).requires_grad_(not self.sharded)

    @property
    def loss_scale(self):
        return self.scaler.scale

    @property
    def lr(self):
        return self.inner.param_groups[0]["lr"]

    def zero_grad(self):
        for p in self.model_params:
            p.grad = None
        if self.reducer is not None:
            self.reducer.zero_grad()  # the .grad of every parameter: a zeroed view of its bucket
        self._shard_grads = None
        if self.separate or self.sharded:
            for m in self.master_params:
                m.grad = None

    def reduce_gradients(self):
        """Sum the gradients over the data-parallel group (most buckets were launched during the backward): all of
        them on every replica (allreduce), or each rank's own shard (sharded). Tied ends first take their sum."""
        for param in self.tied_ends:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad, group=self.layout.ends_group)
        if self.reducer is not None:
            piece_sums = self.reducer.finish()
            self._shard_grads = piece_sums if self.sharded else None

    def _unit_grads(self):
        """The (summed, still loss-scaled) gradient of every unit, in the model's dtype and device."""
        if self.sharded:
            if self._shard_grads is None:  # reduce_gradients was not called: dp=1 semantics are not these
                raise RuntimeError("StageOptimizer.step under --dp-mode sharded needs reduce_gradients() first")
            return self._shard_grads
        for p in self.model_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return [p.grad for p in self.model_params]

    def _global_grad_norm(self, grads):
        """L2 norm over the whole pipeline (and, sharded, over every shard) of the (still loss-scaled) gradients,
        accumulated in fp32: an fp16 gradient holding inf or nan makes it non-finite, which is how overflow is
        detected."""
        sumsq = torch.zeros((), device=self.layout.device)
        if grads:  # a stage may count none (only a tied head copy)
            norms = torch._foreach_norm(grads, 2, dtype=torch.float32)  # a few kernels, not one per tensor
            sumsq = torch.stack(norms).square().sum()
        if self.sharded:
            dist.all_reduce(sumsq, op=dist.ReduceOp.SUM, group=self.layout.grad_group)
        if self.layout.pp_size > 1:
            dist.all_reduce(sumsq, op=dist.ReduceOp.SUM, group=self.layout.pp_group)
        return sumsq.sqrt()

    def _grad_chunks(self):
        """Index ranges of units holding at most MASTER_GRAD_CHUNK_BYTES of fp32 gradients each (or one larger
        tensor): master gradients exist for one range at a time, so the step never holds a full fp32 copy of all
        gradients."""
        if not self.separate:
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
        """Unscale, check overflow, clip, update. Returns (grad_norm, skipped): a float and a bool where the host
        decides, 0-d device tensors (fp32, bool) where the update's kernel does (`decides_on_device`)."""
        grads = self._unit_grads()
        scale = self.scaler.scale
        scaled_norm = self._global_grad_norm([g for g, (i, _, _) in zip(grads, self.units) if self.in_norm[i]])
        if self.decides_on_device:
            return self._step_deciding_on_device(grads, scaled_norm)
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
            self.inner.grad_scale = torch.tensor(divisor, dtype=torch.float32, device=self.host)
        if self.offload:
            self._host_update(grads, 1.0 if fused else divisor)
        else:
            self._device_update(grads, 1.0 if fused else divisor)
        self._finish_step()
        return grad_norm, False

    def _step_deciding_on_device(self, grads, norm):
        """The update of `step` without reading the norm back: the divisor the host would work out in float64
        (1 / clip, no loss scale), worked out on the device in float64, so the kernel gets the same fp32 bits; a
        non-finite norm makes fused AdamW leave the weights, moments and step counts as they were. The schedule
        advances on such a step too (it is not known on the host), as torch's GradScaler recipe does."""
        wide = norm.double()
        clip = (self.max_grad_norm / (wide + 1e-6)).clamp(max=1.0) if self.max_grad_norm > 0 else torch.ones_like(wide)
        skipped = ~torch.isfinite(wide)
        self.inner.grad_scale = (1.0 / clip).float()
        self.inner.found_inf = skipped.float()
        self._device_update(grads, 1.0)
        self._finish_step()
        return norm, skipped

    def _finish_step(self):
        if self.sharded:
            self._shard_grads = None
            self.reducer.all_gather()
        self.scheduler.step()
        self.zero_grad()

    def _device_update(self, grads, divisor):
        """Step the units chunk by chunk on the device; mixed precision: fp32 master gradients exist for one chunk
        at a time, and the updated masters are rounded into the model's parameters (or all of it in one pass)."""
        if self.one_pass:  # its divisor is the fused step's grad_scale, like the three passes'
            masters = self.master_params
            self.inner.step(
                grads={m: grads[k] for k, m in enumerate(masters)},
                params={m: self._unit_target(k) for k, m in enumerate(masters)},
            )
            return
        for chunk in self.grad_chunks:
            masters = [self.master_params[k] for k in chunk]
            given = [k for k, m in zip(chunk, masters) if m is not grads[k] and m.grad is not grads[k]]
            if self.separate:  # widened in one multi-tensor copy: one launch per chunk, not one per parameter
                wide = [torch.empty_like(self.master_params[k]) for k in given]
                torch._foreach_copy_(wide, [grads[k] for k in given])
            else:
                wide = [grads[k] for k in given]
            for k, g in zip(given, wide):
                self.master_params[k].grad = g
            if self.separate and not self.sharded:
                for k in chunk:
                    self.model_params[self.units[k][0]].grad = None  # its fp32 copy replaces it
            if divisor != 1.0:
                torch._foreach_div_([m.grad for m in masters], divisor)
            self.inner.step()  # steps only the parameters that have a gradient: this chunk's
            if self.separate:
                self._write_back(chunk, masters)
                for m in masters:
                    m.grad = None

    def _host_update(self, grads, divisor):
        """--offload-optimizer cpu: the same chunks stepped on the host, their copies overlapped (offload.py)."""
        masters = self.master_params
        targets = [self._unit_target(k) for k in range(len(self.units))]

        def step_chunk(chunk):
            if divisor != 1.0:
                torch._foreach_div_([masters[k].grad for k in chunk], divisor)
            self.inner.step()  # steps only the parameters that have a gradient: this chunk's

        self.host_step.run(grads, masters, targets, step_chunk)

    @property
    def host_seconds(self):
        """(seconds of the last offloaded update, of which the host waited for copies), or None without offload."""
        return None if self.host_step is None else (self.host_step.seconds, self.host_step.wait_seconds)

    @torch.no_grad()
    def _write_back(self, chunk, masters):
        """The updated fp32 masters of `chunk` into the model's parameters (rounded to bf16/fp16)."""
        torch._foreach_copy_([self._unit_target(k) for k in chunk], masters)

    def _unit_target(self, k):
        """The model tensor unit `k` updates: its parameter, or (sharded) this rank's piece of it."""
        i, a, b = self.units[k]
        return self.model_params[i].view(-1)[a:b] if self.sharded else self.model_params[i]

    # Checkpoint I/O works on plain tensors keyed by parameter name (any layout can read them). Python numbers
    # in the state (bitsandbytes keeps its step count as an int) travel as 0-d tensors under a "#py" suffix.
    # Under --dp-mode sharded a piece of a parameter's state is keyed "<name>/<state>[start:end]" (elements of the
    # flattened parameter; what the tensor holds of them: PER_ELEMENT_STATE / PER_BLOCK_STATE); 0-d state (the step
    # count) and SHARED_STATE are written once, whole, by the owner of the parameter's element 0.
    def state_tensors(self, names):
        """{f"{name}/{key}": tensor} for the optimizer state and fp32 master weights of `names` (same order as the
        parameters), or under --dp-mode sharded the pieces this rank owns."""
        out = {}
        for (i, a, b), master in zip(self.units, self.master_params):
            name = names[i]
            piece = f"[{a}:{b}]" if self.sharded else ""
            for key, value in self.inner.state.get(master, {}).items():
                if torch.is_tensor(value) and value.ndim > 0 and key not in SHARED_STATE:
                    if self.sharded:
                        check_shardable(key)
                    out[f"{name}/{key}{piece}"] = value.detach()
                elif a == 0 and torch.is_tensor(value):
                    out[f"{name}/{key}"] = value.detach()
                elif a == 0 and isinstance(value, (int, float)):
                    out[f"{name}/{key}#py"] = torch.tensor(value)
            if self.mixed:
                out[f"{name}/master{piece}"] = master.detach()
        return out

    def load_state_tensors(self, names, tensors, weights):
        """Restore the state of `names` from whole per-parameter checkpoint tensors (checkpoint/ joins the pieces
        of a sharded checkpoint) and return the weights the model should take. Precisions may differ from the
        checkpoint's: a mixed-precision run starts its fp32 master copies from the weights of an fp32 checkpoint
        (which has none); an fp32 run takes the master copies of a bf16/fp16 checkpoint instead of its rounded
        weights."""
        weights = dict(weights)
        for name in names:
            master = tensors.get(f"{name}/master")
            if not self.mixed and master is not None:
                weights[name] = master
            elif self.mixed and master is None:
                tensors[f"{name}/master"] = weights[name].float()
        for (i, a, b), master in zip(self.units, self.master_params):
            name = names[i]

            def mine(key, value, a=a, b=b):
                return state_piece(key, value, a, b) if self.sharded and value.ndim > 0 else value

            if self.separate:
                full = tensors[f"{name}/master"] if self.mixed else weights[name]
                master.data.copy_(mine("master", full).reshape(master.shape))
            keys = {k.split("/", 1)[1] for k in tensors if k.split("/", 1)[0] == name} - {"master"}
            if keys:
                state = {}
                for key in keys:
                    value = tensors[f"{name}/{key}"]
                    if key.endswith("#py"):
                        state[key[: -len("#py")]] = value.item()
                    else:
                        state[key] = mine(key, value).to(master.device).clone()
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
        if state.get("scaler"):  # a checkpoint without a loss scaler (fp32/bf16): keep this run's initial one
            self.scaler.load_state_dict(state["scaler"])

"""The training loss: token cross-entropy summed and scaled by the loss tokens of the whole optimizer step; the
first step's check that there is a token to learn."""

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint

from config import DataConfig
from tasks import TaskError
from training.chunked_logps import ChunkedHead


def _summed_cross_entropy(logits, labels):
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")


class TokenMeanLoss:
    """Sum of token cross-entropies times `factor` = loss scale / loss tokens of the whole optimizer step (all
    micro-batches, accumulation steps and replicas), so any layout computes the gradient of one global mean.

    Eager cross-entropy materialises fp32 log-probabilities (2048 x 50k vocab x 4 bytes = 0.4 GB per sequence) and
    keeps them for backward. `compiled` fuses the fp32 cast, log-softmax and gather into one kernel that keeps only
    the logits (already held, in the model dtype) and a row max and sum for backward. Otherwise `recompute` drops
    the log-probabilities after forward and recomputes them in backward: a GPipe last stage would hold them for
    every micro-batch in flight. With `head` (--chunked-loss) the stage's output is its hidden states and no logits
    of the whole micro-batch are ever held (training/chunked_logps.py).
    """

    def __init__(self, recompute=False, compiled=False, head: ChunkedHead | None = None):
        self.factor = 1.0
        self.checked = False  # the first step's labels hold a token to learn
        self.cross_entropy = torch.compile(_summed_cross_entropy) if compiled else _summed_cross_entropy
        self.recompute = recompute and not compiled
        self.head = head  # --chunked-loss: the stage hands over hidden states, the head runs here in chunks

    def __call__(self, logits, labels):
        if self.head is not None:
            return self.head.token_loss(logits, labels, self.factor)
        if self.recompute and torch.is_grad_enabled():
            loss = torch.utils.checkpoint.checkpoint(self.cross_entropy, logits, labels, use_reentrant=False)
        else:
            loss = self.cross_entropy(logits, labels)
        return loss * self.factor

    def start_step(self, batches: list[dict], scale: float, data: DataConfig, layout) -> None:
        """`factor` for the optimizer step of `batches`: loss scale / loss tokens of the step summed over replicas
        (on the last stage's ranks); the run's first step also checks that there is a token to learn. A chunked
        head forgets the sums of forwards whose backward never came."""
        if self.head is not None:
            self.head.sums.reset()
        # Counted on the host, where the labels are, and put on the device by a fill: a copy from pageable host memory
        # would wait for the GPU to finish the previous step's update.
        count = torch.full((), float(sum(int((b["labels"] != -100).sum()) for b in batches)), device=layout.device)
        if layout.dp_size > 1:
            dist.all_reduce(count, group=layout.dp_group)
        if not self.checked:  # one host sync, on the run's first step only
            check_loss_tokens(int(count.item()), data, layout.dp_size)
            self.checked = True
        self.factor = scale / count.clamp(min=1)


def check_loss_tokens(count: int, data: DataConfig, dp_size: int) -> None:
    """A first step without one label to learn means the data or the masking settings are wrong; training on would
    log loss 0 and change nothing."""
    if count:
        return
    fix = (
        ", or drop --loss-on-bot-only"
        if data.loss_on_bot_only
        else ", or pass --train-on-inputs to learn the user turns too"
        if not data.train_on_inputs
        else ""
    )
    raise TaskError(
        f"the first step's {data.batch_size * dp_size} sequences of --task-name hold no token to learn: every label "
        f"is masked (no assistant / <bot> turns?); check the data{fix}"
    )

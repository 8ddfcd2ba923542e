"""Preference objectives on chosen / rejected pairs: DPO, SimPO and ORPO, as their papers define them and TRL 1.x
computes them, normalised so that any layout trains like one process.

A batch holds pairs in adjacent rows (2i chosen, 2i+1 rejected; tasks.PreferenceStream); a sequence's log-probability
is the sum of its label tokens' log-probabilities (the completion, EOS included). The last stage's loss function
receives the labels with one more column: the reference model's log-probability of the row, its float64 bits stored
in the int64 target (`with_reference`), because a pipeline schedule hands its loss function one target tensor, split
by micro-batch like the inputs. Packed (training/pairs.py `pack_pairs`), a micro-batch's sequences are the documents
of one row: the target then also carries the document ids, and the sums run over each document's tokens.

The loss of a step is the mean over all its pairs (every micro-batch, accumulation step and replica): each pair's
loss is multiplied by `factor` = loss scale / pairs of the step. ORPO's SFT term is the mean over the step's chosen
completion tokens (`nll_factor` = loss scale / those tokens), as TRL's cross-entropy over one batch.

Under context parallelism each rank of a cp group holds a share of every sequence's tokens: the row sums (and label
counts) are summed over the group, so every rank computes the same per-pair losses from whole sequences. Each rank's
backward then reaches only its own tokens (the sum's backward hands the gradient on unchanged), and the gradients
summed over the group are the whole sequences'. The loss value each rank reports is its 1/C share of the pairs' loss,
so that the step's loss summed over the group counts every pair once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint

from config import ObjectiveConfig
from context_parallel import ContextSplit
from training.chunked_logps import ChunkedHead

# The statistics summed over a step's pairs, logged as their means under TRL's names.
STAT_NAMES = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
STATS_SIZE = 1 + len(STAT_NAMES) + 2  # pairs, the statistics, ORPO's NLL sum and chosen tokens


def with_reference(
    labels: torch.Tensor, reference: torch.Tensor | None, doc_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """The loss target: `labels` [R, S] and the reference log-probabilities [R] (zeros if none) as one int64 tensor
    [R, S + 1] whose last column holds the float64 bits of each row's reference. Rows of packed sequences
    (training/pairs.py `pack_pairs`) also carry their document ids [R, S], and their sequences' references (`reference`
    [R x sequences a row], required) after them: [R, 2S + sequences a row]."""
    if reference is None:
        reference = torch.zeros(labels.shape[0], dtype=torch.float64, device=labels.device)
    bits = reference.to(labels.device, torch.float64).contiguous().view(torch.int64)
    if doc_ids is None:
        return torch.cat([labels, bits[:, None]], 1)
    return torch.cat([labels, doc_ids.to(labels.device), bits.view(labels.shape[0], -1)], 1)


def split_target(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels [R, S], reference log-probabilities [R] float64) of a `with_reference` target."""
    return target[:, :-1], target[:, -1].contiguous().view(torch.float64)


def split_packed_target(target: torch.Tensor, columns: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(labels [R, S], the sequences' reference log-probabilities [R x sequences a row] float64, document ids
    [R, S]) of a `with_reference` target of packed rows of `columns` S."""
    labels, doc_ids = target[:, :columns], target[:, columns : 2 * columns]
    return labels, target[:, 2 * columns :].contiguous().view(torch.float64).flatten(), doc_ids


def context_target(context: ContextSplit, target: torch.Tensor | None) -> torch.Tensor | None:
    """This cp rank's labels of a `with_reference` target, the reference column kept whole."""
    if target is None:
        return None
    labels, reference = split_target(target)
    return with_reference(context.split(labels), reference)


class _SumOverContext(torch.autograd.Function):
    """Per-row sums of this rank's tokens summed over the cp group; the backward hands the gradient on unchanged
    (every rank computes the same loss from the sums, and reaches only its own tokens)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group) -> torch.Tensor:
        total = local.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label token [R, S] (0 where the label is -100), in fp32 (or the logits' wider type)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    return -nll.view(labels.shape)


def dpo_losses(chosen, rejected, ref_chosen, ref_rejected, beta: float, label_smoothing: float = 0.0):
    """Per-pair DPO loss (sigmoid, with conservative-DPO label smoothing) and the implicit rewards."""
    logits = (chosen - rejected) - (ref_chosen - ref_rejected)
    losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    return losses, beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach()


def simpo_losses(chosen_mean, rejected_mean, beta: float, gamma: float):
    """Per-pair SimPO loss on length-normalised log-probabilities, margin gamma; no reference."""
    losses = -F.logsigmoid(beta * (chosen_mean - rejected_mean) - gamma)
    return losses, beta * chosen_mean.detach(), beta * rejected_mean.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (near 0 through expm1, far below through log1p)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_losses(chosen_mean, rejected_mean, lam: float):
    """Per-pair ORPO odds-ratio term (to be added to the chosen SFT loss) on length-normalised log-probabilities."""
    log_odds = (chosen_mean - rejected_mean) - (_log1mexp(chosen_mean) - _log1mexp(rejected_mean))
    losses = -lam * F.logsigmoid(log_odds)
    return losses, lam * chosen_mean.detach(), lam * rejected_mean.detach()


def _row_sums(token_logps: torch.Tensor) -> torch.Tensor:
    """Each row's sum, added in float64 and rounded once: whatever order the tokens are added in (rows or packed
    documents, any width), the float32 results agree but for a rare last-bit rounding."""
    return token_logps.double().sum(1).to(token_logps.dtype)


def _document_sums(token_logps, labelled, doc_ids, sequences: int):
    """Per-sequence sums [sequences] of the log-probabilities (as `_row_sums`) and label counts of packed rows
    (document ids 0..sequences-1; `sequences` itself is the padding after them), through a one-hot product rather
    than a scatter: the same bits on every run (a GPU's atomic scatter-add sums in no fixed order)."""
    one_hot = F.one_hot(doc_ids.flatten(), sequences + 1)[:, :sequences]  # [tokens, sequences]
    logps = (one_hot.double() * token_logps.flatten().double()[:, None]).sum(0).to(token_logps.dtype)
    counts = (one_hot.bool() & labelled.flatten()[:, None]).sum(0)
    return logps, counts


class PreferenceLoss:
    """The loss function of the last stage under --objective dpo / simpo / orpo: `loss_fn(logits, target)`.

    `recording` (a list) turns it into the reference pass: each micro-batch's row log-probabilities are appended and
    no loss is formed. `stats` sums the logged statistics of the pairs seen since `take_stats`: each call's sums wait
    in `pending` until `commit(n)` keeps the last n, because a pipeline schedule's first training step also calls the
    loss function once on placeholder outputs (torch.distributed.pipelining infers the backward's shapes so).
    """

    def __init__(
        self,
        objective: ObjectiveConfig,
        recompute: bool = False,
        compiled: bool = False,
        head: ChunkedHead | None = None,
        context: ContextSplit | None = None,
        packed_columns: int | None = None,
    ):
        self.objective = objective
        self.packed_columns = packed_columns  # targets of packed rows of this many columns (split_packed_target)
        self.context = context  # --context-parallel-size: the group whose ranks hold shares of each sequence
        self.factor = 1.0  # loss scale / pairs of the optimizer step
        self.nll_factor = 0.0  # ORPO: loss scale / chosen completion tokens of the optimizer step
        self.recording: list[torch.Tensor] | None = None
        self.stats: torch.Tensor | None = None  # [pairs, *STAT_NAMES sums, nll sum, chosen tokens]
        self.pending: list[torch.Tensor] = []
        self.token_logps = torch.compile(_token_logps) if compiled else _token_logps
        self.recompute = recompute and not compiled
        self.head = head

    def _rows(self, logits, labels):
        if self.head is not None:  # --chunked-loss: `logits` are the last stage's hidden states
            return self.head.token_logps(logits, labels)
        if self.recompute and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self.token_logps, logits, labels, use_reentrant=False)
        return self.token_logps(logits, labels)

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        width = logits.shape[1]  # a micro-batch may run on fewer columns than its target has (PairTraining.widths)
        if self.packed_columns is None:
            labels, reference = split_target(target)
            labels = labels[:, :width]
            token_logps = self._rows(logits, labels)
            local, counts = _row_sums(token_logps), (labels != -100).sum(1)
        else:  # each sequence's sums over its document's tokens
            labels, reference, doc_ids = split_packed_target(target, self.packed_columns)
            labels = labels[:, :width]
            token_logps = self._rows(logits, labels)
            local, counts = _document_sums(token_logps, labels != -100, doc_ids[:, :width], len(reference))
        logps = local
        if self.context is not None:  # whole sequences' sums, the same on every rank of the group
            logps = _SumOverContext.apply(local, self.context.group)
            dist.all_reduce(counts, group=self.context.group)
        if self.recording is not None:
            self.recording.append(logps.detach().double())
            return logps.sum().detach() * 0
        real = counts[0::2] > 0  # padding pairs (evaluation's last batch) have no label
        chosen, rejected = logps[0::2], logps[1::2]
        kind = self.objective.kind
        nll = torch.zeros((), device=logits.device)
        if kind == "dpo":
            losses, reward_c, reward_r = dpo_losses(
                chosen,
                rejected,
                reference[0::2].to(chosen.dtype),
                reference[1::2].to(chosen.dtype),
                self.objective.dpo_beta,
                self.objective.dpo_label_smoothing,
            )
        else:
            chosen = chosen / counts[0::2].clamp(min=1)
            rejected = rejected / counts[1::2].clamp(min=1)
            if kind == "simpo":
                losses, reward_c, reward_r = simpo_losses(
                    chosen, rejected, self.objective.simpo_beta, self.objective.simpo_gamma
                )
            else:
                losses, reward_c, reward_r = orpo_losses(chosen, rejected, self.objective.orpo_lambda)
                nll = -local[0::2].sum()  # this rank's chosen tokens
        losses = torch.where(real, losses, 0.0)
        self._count(real, reward_c, reward_r, chosen, rejected, nll, counts[0::2].sum())
        pairs_loss = losses.sum() * self.factor
        if self.context is not None:  # reported as this rank's share, its gradient whole (module docstring)
            pairs_loss = pairs_loss.detach() / self.context.size + (pairs_loss - pairs_loss.detach())
        return pairs_loss + nll * self.nll_factor

    def _count(self, real, reward_c, reward_r, chosen, rejected, nll, chosen_tokens):
        rows = torch.stack(
            [
                torch.ones_like(reward_c),
                reward_c,
                reward_r,
                (reward_c > reward_r).to(reward_c.dtype),
                reward_c - reward_r,
                chosen.detach(),
                rejected.detach(),
            ]
        )
        nll = nll.detach().double()
        if self.context is not None and self.objective.kind == "orpo":  # this rank's tokens' share of it
            dist.all_reduce(nll, group=self.context.group)
        extra = torch.stack([nll, chosen_tokens.double()])
        self.pending.append(torch.cat([torch.where(real, rows, 0.0).sum(1).double(), extra]))

    def commit(self, calls: int) -> None:
        """Count the statistics of the last `calls` calls (a batch's micro-batches) and forget the others."""
        for sums in self.pending[len(self.pending) - calls :] if calls else []:
            self.stats = sums if self.stats is None else self.stats + sums
        self.pending = []

    def take_stats(self) -> torch.Tensor | None:
        """The sums since the last call ([pairs, *STAT_NAMES, nll, chosen tokens]), on the device; None if no pair
        was seen."""
        stats, self.stats = self.stats, None
        return stats


def stat_means(sums: torch.Tensor, orpo: bool = False) -> dict[str, float]:
    """TRL's metric names and their means over the pairs of `sums` (all replicas' sums, from take_stats); with
    `orpo` also its SFT term, `nll_loss`, per chosen token."""
    values = sums.tolist()
    pairs = max(values[0], 1.0)
    out = {name: value / pairs for name, value in zip(STAT_NAMES, values[1:])}
    if orpo:
        out["nll_loss"] = values[-2] / max(values[-1], 1.0)
    return out

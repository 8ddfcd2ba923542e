"""EOS-packed token stream → fixed windows → global batches, remembering where each batch ends.

Window i of the stream is tokens [i*S, i*S+S+1): input_ids = w[:S], labels = w[1:] (-100 where the label token takes
no loss), so the last token of window i is the first input of window i+1. position_ids restart at 0 at the window
start and at every document start inside the window; doc_ids count documents within the window from 0.
Global batch k is windows [k*G, (k+1)*G) counted from `windows_done`, G = batch_size * dp_size; this replica keeps
rows [dp_rank*B, (dp_rank+1)*B).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .tokenize import Chunk

IGNORE = -100


@dataclass
class ChunkMeta:
    snapshot: Any  # source state before the chunk's first document
    drop: int = 0  # tokens dropped from the chunk's first document (resume point inside a document)
    doc_epochs: list = field(default_factory=list)  # (task, epoch) of each document


@dataclass
class StateRef:
    """Where the stream stands after a batch: the next window starts `skip_tokens` tokens into document
    `skip_docs` after `meta.snapshot`, and `windows` windows have been handed out."""

    meta: ChunkMeta | None
    skip_docs: int
    skip_tokens: int
    windows: int


def window_arrays(tok, trn, dst, js, S):
    """Rows for windows starting at pending positions js*S."""
    idx = js[:, None] * S + np.arange(S + 1)
    w = tok[idx].astype(np.int64, copy=False)  # a token cache stores uint32
    inputs = w[:, :S]
    labels = np.where(trn[idx[:, 1:]], w[:, 1:], IGNORE)
    reset = dst[idx[:, :S]]
    reset[:, 0] = True
    ar = np.arange(S)
    last = np.maximum.accumulate(np.where(reset, ar, 0), axis=1)
    pos = ar - last
    doc = np.cumsum(reset, axis=1) - 1
    return [inputs, labels, pos, doc]


KEYS = ("input_ids", "labels", "position_ids", "doc_ids")


def document_lengths(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, K] int32: the lengths of each row's documents in order, K the most documents a row holds (rows with
    fewer end in zeros), from `doc_ids` [B, S] that ascend along each row from 0 (as window_arrays counts them):
    the sequences of varlen attention (modules.varlen.VarlenMask). Counted where the ids are, on the host."""
    if bool((doc_ids[:, 1:] < doc_ids[:, :-1]).any()):
        raise ValueError("document ids must ascend along each row: a document's tokens are contiguous")
    lengths = torch.zeros(doc_ids.shape[0], int(doc_ids.max()) + 1, dtype=torch.int32)
    return lengths.scatter_add_(1, doc_ids, torch.ones_like(doc_ids, dtype=torch.int32))


def document_inputs(
    batch: dict, device: torch.device, lengths: bool, micro_batches: int = 1, widths: list[int] | None = None
) -> dict:
    """The stages' keyword inputs of a packed batch on `device`: position_ids and doc_ids, and with `lengths` the
    documents' lengths (varlen attention), counted on the host for each of its `micro_batches` as it runs (cut to
    its first widths[i] columns when given) and zero-padded to one width."""
    inputs = {k: batch[k].to(device, non_blocking=True) for k in ("position_ids", "doc_ids")}
    if lengths:
        parts = batch["doc_ids"].chunk(micro_batches)
        counted = [document_lengths(ids[:, : widths[i]] if widths else ids) for i, ids in enumerate(parts)]
        most = max(part.shape[1] for part in counted)
        padded = torch.cat([torch.nn.functional.pad(part, (0, most - part.shape[1])) for part in counted])
        inputs["doc_lengths"] = padded.to(device, non_blocking=True)
    return inputs


class Packer:
    def __init__(
        self, seq_length: int, batch_size: int, dp_rank: int = 0, dp_size: int = 1, windows_done: int = 0, eos: int = 0
    ):
        self.S, self.B, self.r = seq_length, batch_size, dp_rank
        self.G = batch_size * dp_size
        self.eos = eos
        self.origin = windows_done  # batch boundaries are origin + m*G
        self.win_base = windows_done  # global index of the window starting at pending position 0
        self.tok = np.empty(0, dtype=np.int64)
        self.trn = np.empty(0, dtype=bool)
        self.dst = np.empty(0, dtype=bool)
        self.doc_pos: list[int] = []
        self.doc_ref: list[tuple] = []  # (meta, index in chunk, tokens dropped before it)
        self.left = None  # own rows computed but not yet handed out (list of 4 arrays)

    def feed(self, meta: ChunkMeta | None, chunk: Chunk):
        off = len(self.tok)
        if off:
            self.tok = np.concatenate([self.tok, chunk.tokens])
            self.trn = np.concatenate([self.trn, chunk.trained])
            self.dst = np.concatenate([self.dst, chunk.doc_start])
        else:
            self.tok, self.trn, self.dst = chunk.tokens, chunk.trained, chunk.doc_start
        drop = meta.drop if meta is not None else 0
        for i, s in enumerate(chunk.starts):
            self.doc_pos.append(off + s)
            self.doc_ref.append((meta, i, drop if i == 0 else 0))
        return self._emit((len(self.tok) - 1) // self.S)

    def flush(self):
        """End of data (evaluation): pad the tail into a last window (input EOS, label -100) and pad the last
        global batch with all-padding windows so every replica gets the same number of full-size batches."""
        S, G = self.S, self.G
        L = len(self.tok)
        n_final = 1 if L > 1 else 0
        extra = (-(self.win_base + n_final - self.origin)) % G
        nwin = n_final + extra
        if nwin == 0:
            return []
        keep = L if n_final else 0
        total = nwin * S + 1
        pad = total - keep
        tok = np.concatenate([self.tok[:keep], np.full(pad, self.eos, dtype=np.int64)])
        trn = np.concatenate([self.trn[:keep], np.zeros(pad, dtype=bool)])
        dst = np.concatenate([self.dst[:keep], np.zeros(pad, dtype=bool)])
        dst[keep] = True
        self.tok, self.trn, self.dst = tok, trn, dst
        return self._emit(nwin)

    def _locate(self, P: int, windows: int) -> StateRef:
        j = bisect.bisect_right(self.doc_pos, P) - 1
        meta, i, base = self.doc_ref[j]
        return StateRef(meta, i, base + P - self.doc_pos[j], windows)

    def _emit(self, nwin: int):
        if nwin <= 0:
            return []
        S, G, B = self.S, self.G, self.B
        g = self.win_base + np.arange(nwin)
        rel = (g - self.origin) % G
        own = np.nonzero((rel >= self.r * B) & (rel < (self.r + 1) * B))[0]
        rows = window_arrays(self.tok, self.trn, self.dst, own, S) if len(own) else None
        if self.left is not None:
            rows = self.left if rows is None else [np.concatenate([a, b]) for a, b in zip(self.left, rows)]
        out = []
        first = self.win_base + 1
        last = self.win_base + nwin
        e = first + ((self.origin - first) % G)  # first batch boundary in [first, last]
        while e <= last:
            P = (e - self.win_base) * S
            ref = self._locate(P, e)
            batch = {k: torch.from_numpy(np.ascontiguousarray(a[:B], dtype=np.int64)) for k, a in zip(KEYS, rows)}
            rows = [a[B:] for a in rows]
            out.append((batch, ref))
            e += G
        self.left = rows if rows is not None and len(rows[0]) else None
        D = nwin * S
        self.tok, self.trn, self.dst = self.tok[D:].copy(), self.trn[D:].copy(), self.dst[D:].copy()
        k = max(bisect.bisect_right(self.doc_pos, D) - 1, 0)
        self.doc_pos = [p - D for p in self.doc_pos[k:]]
        self.doc_ref = self.doc_ref[k:]
        self.win_base += nwin
        return out

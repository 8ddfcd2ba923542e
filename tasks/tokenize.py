"""Batched tokenisation of rendered documents into one token stream plus a per-token "takes loss" flag.

Uses a private copy of the tokenizer's Rust backend (`encode_batch*` releases the GIL and runs on all cores), so
the training thread's tokenizer is never touched from a background thread and no truncation/padding setting of the
caller leaks in. Each document becomes its tokens followed by exactly one EOS (none added when the tokenizer already
ended the document with EOS).
"""

from __future__ import annotations

import hashlib
import threading
from bisect import bisect_left
from dataclasses import dataclass
from itertools import chain

import numpy as np

from .spec import TaskError

_LOCK = threading.Lock()
RENDER_VERSION = "tasks-render-1"  # bump when rendering/tokenisation rules change (invalidates token-count caches)


@dataclass
class Chunk:
    """Tokens of consecutive documents, EOS-terminated, concatenated."""

    tokens: np.ndarray  # int64 [T]
    trained: np.ndarray  # bool [T]: this token takes loss when it is a label
    doc_start: np.ndarray  # bool [T]: first token of a document
    starts: list[int]  # start position of each document in the chunk


def spans_to_mask(offsets: np.ndarray, spans, text_len: int) -> np.ndarray:
    """Token i takes loss iff its first character lies in a span. Special tokens added by the tokenizer's
    post-processor (zero width, at 0 or at the end of the text) never do."""
    n = len(offsets)
    mask = np.zeros(n, dtype=bool)
    if n == 0 or not spans:
        return mask
    starts, ends = offsets[:, 0], offsets[:, 1]
    for a, b in spans:
        if b > a:
            mask |= (starts >= a) & (starts < b)
    mask &= ~((ends == starts) & ((starts == 0) | (starts >= text_len)))
    return mask


class Encoder:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise TaskError(
                "the tokenizer has no eos_token; set tokenizer.eos_token (documents are packed with one EOS after each)"
            )
        self.eos = int(eos)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = None
        self._backend_json = None
        if backend is not None:
            self._backend_json = backend.to_str()
            self._backend = self._new_backend()
            self._fast = hasattr(self._backend, "encode_batch_fast")
        self._local = threading.local()
        self._fingerprint = None
        self._ranges_ok = True  # _loss_ranges agrees with spans_to_mask on this tokenizer (so far)
        self._ranges_checks = 64  # documents whose ranges are still checked against every offset

    def _new_backend(self):
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(self._backend_json)
        backend.no_truncation()
        backend.no_padding()
        return backend

    def _thread_backend(self):
        """One private backend per thread (the first thread to ask gets the one built in __init__)."""
        backend = getattr(self._local, "backend", None)
        if backend is None:
            with _LOCK:
                backend, self._backend = (
                    (self._backend, None) if self._backend is not None else (self._new_backend(), None)
                )
            self._local.backend = backend
        return backend

    @property
    def fingerprint(self) -> str:
        """Identifies the tokenisation (vocab, merges, normaliser, template, eos, rendering rules)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(RENDER_VERSION.encode())
            h.update(type(self.tokenizer).__name__.encode())
            if self._backend_json is not None:
                h.update(self._backend_json.encode())
            else:
                vocab = self.tokenizer.get_vocab()
                h.update(repr(sorted(vocab.items())).encode())
            h.update(repr(getattr(self.tokenizer, "chat_template", None)).encode())
            h.update(str(self.eos).encode())
            self._fingerprint = h.hexdigest()[:24]
        return self._fingerprint

    # -- raw encoding: lists of ids (and character offsets when asked) --
    def encode_texts(self, texts: list[str], special: bool, offsets: bool):
        """Returns a list of (ids, offsets-or-None)."""
        if not texts:
            return []
        if self._backend_json is not None:
            backend = self._thread_backend()
            if offsets or not self._fast:
                encs = backend.encode_batch(texts, add_special_tokens=special)
                if offsets:
                    return [(e.ids, e.offsets) for e in encs]
                return [(e.ids, None) for e in encs]
            return [(e.ids, None) for e in backend.encode_batch_fast(texts, add_special_tokens=special)]
        out = self.tokenizer(texts, add_special_tokens=special, return_offsets_mapping=offsets)
        offs = out["offset_mapping"] if offsets else [None] * len(texts)
        return list(zip(out["input_ids"], offs))

    def lengths(self, docs: list[tuple[str, bool]]) -> list[int]:
        """Packed length (tokens + EOS) of each (text, special) document."""
        out = [0] * len(docs)
        for special in (True, False):
            idx = [i for i, d in enumerate(docs) if d[1] == special]
            for i, (ids, _) in zip(idx, self.encode_texts([docs[i][0] for i in idx], special, False)):
                out[i] = len(ids) + (0 if ids and ids[-1] == self.eos else 1)
        return out

    def encode_chunk(self, docs, drop_first: int = 0) -> Chunk:
        """docs: list of (text, spans, special). The first document loses its first `drop_first` tokens (resume)."""
        n = len(docs)
        ids_of: list = [None] * n
        loss: list = [None] * n  # per document: None (every token), [(lo, hi)] token ranges, or a bool mask
        groups: dict[tuple[bool, bool], list[int]] = {}
        for i, (_, spans, special) in enumerate(docs):
            groups.setdefault((special, spans is not None), []).append(i)
        for (special, masked), idx in groups.items():
            texts = [docs[i][0] for i in idx]
            if masked and self._backend_json is not None:
                # the loss ranges from a few offsets per span, not a Python object per token (see _loss_ranges)
                encs = self._thread_backend().encode_batch(texts, add_special_tokens=special)
                for i, enc in zip(idx, encs):
                    ids_of[i] = ids = enc.ids
                    loss[i] = self._loss_of(enc, len(ids), docs[i][1], len(docs[i][0]))
                continue
            for i, (ids, offs) in zip(idx, self.encode_texts(texts, special, masked)):
                ids_of[i] = ids
                if masked:
                    offs = np.array(offs, dtype=np.int64).reshape(-1, 2)
                    loss[i] = spans_to_mask(offs, docs[i][1], len(docs[i][0]))
        eos = self.eos
        eos_only = (eos,)
        parts: list = []  # every document's ids, then its EOS where the tokenizer did not end it with one
        starts: list[int] = []
        at = 0
        for ids in ids_of:
            starts.append(at)
            parts.append(ids)
            at += len(ids)
            if not ids or ids[-1] != eos:
                parts.append(eos_only)
                at += 1
        tokens = np.fromiter(chain.from_iterable(parts), dtype=np.int64, count=at)
        trained = np.ones(at, dtype=bool)
        for k, flags in enumerate(loss):
            if flags is None:
                continue
            start = starts[k]
            end = starts[k + 1] if k + 1 < n else at  # the document's tokens and its EOS
            if isinstance(flags, np.ndarray):
                trained[start : start + len(flags)] = flags
            else:
                trained[start:end] = False
                for lo, hi in flags:
                    trained[start + lo : start + hi] = True
            # the EOS takes loss iff the document ends inside a trained span
            trained[end - 1] = trained[end - 2] if end - start > 1 else False
        doc_start = np.zeros(at, dtype=bool)
        doc_start[starts] = True
        if drop_first:
            tokens, trained, doc_start = tokens[drop_first:], trained[drop_first:], doc_start[drop_first:]
            starts = [0] + [s - drop_first for s in starts[1:]]
        return Chunk(tokens, trained, doc_start, starts)

    def _loss_of(self, enc, n: int, spans, text_len: int):
        """The tokens of `enc` that take loss: token ranges from _loss_ranges, or spans_to_mask's mask over all offsets
        where those do not apply (and, for the first documents an Encoder sees, to check that they agree)."""
        ranges = _loss_ranges(enc, n, spans, text_len) if self._ranges_ok else None
        if ranges is not None and self._ranges_checks <= 0:
            return ranges
        mask = spans_to_mask(np.array(enc.offsets, dtype=np.int64).reshape(-1, 2), spans, text_len)
        if ranges is not None:
            self._ranges_checks -= 1
            ranged = np.zeros(n, dtype=bool)
            for lo, hi in ranges:
                ranged[lo:hi] = True
            if not np.array_equal(ranged, mask):  # this tokenizer's offsets do not rise along the text
                self._ranges_ok = False
        return mask


def _loss_ranges(enc, n: int, spans, text_len: int) -> list[tuple[int, int]] | None:
    """spans_to_mask's answer as token ranges [lo, hi), from a few offsets per span instead of all n of them.

    The tokens of the text (all but the post-processor's special tokens, which have no character range and sit at
    either end; their (0, 0) offsets never take loss) start at non-decreasing characters, so the tokens whose first
    character lies in [a, b) are the range [first start >= a, first start >= b). None where a span starts at 0 or
    runs past the text: there spans_to_mask's rule for zero-width tokens at either end needs every offset."""
    chars = enc.token_to_chars
    p, q = 0, n
    while p < q and chars(p) is None:
        p += 1
    while q > p and chars(q - 1) is None:
        q -= 1

    def first_from(x: int, lo: int) -> int:
        """The first token in [lo, q) that starts at or after character x."""
        if x >= text_len:  # the usual end of a span; tokens starting there are zero-width, if any
            if q == lo or chars(q - 1)[0] < x:
                return q
        else:
            t = enc.char_to_token(x)  # the token holding character x (None: no token does)
            if t is not None and lo <= t < q:
                if chars(t)[0] < x:  # it starts before x: the next one is the first
                    t += 1
                    if t == q or chars(t)[0] >= x:
                        return t
                elif t == lo or chars(t - 1)[0] < x:
                    return t
        return bisect_left(range(q), x, lo=lo, key=lambda i: chars(i)[0])

    out = []
    try:
        for a, b in spans:
            if b <= a:
                continue
            if a <= 0 or b > text_len:
                return None
            lo = first_from(a, p)
            hi = first_from(b, lo)
            if hi > lo:
                out.append((lo, hi))
    except TypeError:  # a token without a character range amid the text's: not the layout assumed here
        return None
    return out

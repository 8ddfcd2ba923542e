"""Batched tokenisation of rendered documents into one token stream plus a per-token "takes loss" flag.

Uses a private copy of the tokenizer's Rust backend (`encode_batch*` releases the GIL and runs on all cores), so
the training thread's tokenizer is never touched from a background thread and no truncation/padding setting of the
caller leaks in. Each document becomes its tokens followed by exactly one EOS (none added when the tokenizer already
ended the document with EOS).
"""

from __future__ import annotations

import hashlib
import threading
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
        results: list = [None] * n
        groups: dict[tuple[bool, bool], list[int]] = {}
        for i, (_, spans, special) in enumerate(docs):
            groups.setdefault((special, spans is not None), []).append(i)
        for (special, masked), idx in groups.items():
            encs = self.encode_texts([docs[i][0] for i in idx], special, masked)
            if not masked:
                for i, (ids, _) in zip(idx, encs):
                    results[i] = (ids, None)
                continue
            # all offsets of the group in one conversion (much cheaper than one array per document)
            n_tok = sum(len(ids) for ids, _ in encs)
            flat_offs = np.fromiter(
                chain.from_iterable(chain.from_iterable(o for _, o in encs)), dtype=np.int64, count=2 * n_tok
            ).reshape(-1, 2)
            at = 0
            for i, (ids, _) in zip(idx, encs):
                results[i] = (ids, spans_to_mask(flat_offs[at : at + len(ids)], docs[i][1], len(docs[i][0])))
                at += len(ids)
        eos = self.eos
        flat: list[int] = []
        starts: list[int] = []
        masks = []  # (start, mask array with the EOS flag appended)
        for (ids, mask), _doc in zip(results, docs):
            start = len(flat)
            starts.append(start)
            flat.extend(ids)
            has_eos = bool(ids) and ids[-1] == eos
            if not has_eos:
                flat.append(eos)
            if mask is not None:
                if not has_eos:
                    mask = np.append(mask, False)
                # the EOS takes loss iff the document ends inside a trained span
                mask[-1] = bool(mask[-2]) if len(mask) > 1 else False
                masks.append((start, mask))
        tokens = np.array(flat, dtype=np.int64)
        trained = np.ones(len(tokens), dtype=bool)
        for start, mask in masks:
            trained[start : start + len(mask)] = mask
        doc_start = np.zeros(len(tokens), dtype=bool)
        doc_start[starts] = True
        if drop_first:
            tokens, trained, doc_start = tokens[drop_first:], trained[drop_first:], doc_start[drop_first:]
            starts = [0] + [s - drop_first for s in starts[1:]]
        return Chunk(tokens, trained, doc_start, starts)

"""Preference pairs (DPO / SimPO / ORPO): TRL 1.x's prompt / chosen / rejected records → batches of row pairs.

Records (a jsonl line or a parquet / arrow / datasets row; every source kind and mixture of tasks/reader.py):
  standard        {"prompt": str, "chosen": str, "rejected": str}
  conversational  {"prompt": [messages], "chosen": [assistant message], "rejected": [assistant message]}
  implicit prompt {"chosen": [messages], "rejected": [messages]}: the messages both start with are the prompt
Conversations are rendered as training renders them (tasks/render.py): the chat template when the tokenizer has one
(prompt = template(prompt, add_generation_prompt=True), completion = template(prompt + completion) minus that
prefix), else the OIG lines (prompt = "...\n<bot>:", completion = " " + the reply). Prompt and completions are
tokenised separately without special tokens (no BOS), and each completion ends with one EOS: TRL appends it, and here
it is not doubled when a template already ended the reply with EOS.

A batch: dicts of int64 tensors [2 * batch_size, seq_length], rows 2i (chosen) and 2i+1 (rejected) of pair i, each
row prompt + completion, right-padded; labels already shifted (labels[t] = input_ids[t+1] where token t+1 is a
completion token, else -100). Global batch k is pairs [k*G, (k+1)*G) of the record order, G = batch_size * dp_size;
replica r keeps pairs [r*B, (r+1)*B). Every replica reads and tokenises every pair (so the truncation count and the
errors are the same on all of them, and the state is identical).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import sources
from .loader import LoaderStream, check_same_sources, copy_json
from .packing import IGNORE
from .reader import Mixture
from .render import Renderer, decode, messages_of
from .spec import TaskError, parse_task_spec
from .stream import STATE_FORMAT as PACKED_STATE_FORMAT
from .stream import check_positive, format_sample, show_data_from_env, show_every_from_env, task_signatures
from .tokenize import Encoder

if TYPE_CHECKING:
    from config import DataConfig

STATE_FORMAT = "tasks.PreferenceStream/1"

Messages = list[dict[str, str]]
# Token ids of one pair after truncation: prompt, chosen completion, rejected completion, and whether it was cut.
Fitted = tuple[list[int], list[int], list[int], bool]


# ------------------------------------------------------------------ records
@dataclass(frozen=True)
class Pair:
    """A validated record: prompt and completions are all text (standard) or all message lists (conversational)."""

    prompt: str | Messages
    chosen: str | Messages
    rejected: str | Messages


def _keys(obj: dict) -> str:
    return ", ".join(sorted(obj)[:8]) or "none"


def parse_pair(payload: bytes | str | dict, path: str, line_no: int) -> Pair:
    """Decode and validate one preference record; TaskError names file:line (rows: file[row i]) and the fix."""
    where = sources.where(path, line_no)
    obj = decode(payload, where)
    if "chosen" not in obj or "rejected" not in obj:
        raise TaskError(
            f"{where}: not a preference pair (keys: {_keys(obj)}); --objective dpo / simpo / orpo train on "
            f'{{"prompt": ..., "chosen": ..., "rejected": ...}} records (TRL\'s format); SFT data (text / messages) '
            f"trains with --objective sft (the default)"
        )
    chosen, rejected, prompt = obj["chosen"], obj["rejected"], obj.get("prompt")
    kinds = (type(chosen), type(rejected))
    if kinds not in ((str, str), (list, list)):
        raise TaskError(
            f"{where}: 'chosen' and 'rejected' must both be text (standard) or both lists of messages "
            f"(conversational), got {kinds[0].__name__} and {kinds[1].__name__}; write them alike"
        )
    if isinstance(chosen, str):
        if not isinstance(prompt, str):
            raise TaskError(
                f"{where}: a standard pair (text 'chosen' / 'rejected') needs a text 'prompt', got "
                f"{type(prompt).__name__ if prompt is not None else 'none'}; add the prompt (only conversations "
                f"may leave it implicit)"
            )
        for key, text in (("chosen", chosen), ("rejected", rejected)):
            if not text.strip():
                raise TaskError(f"{where}: the '{key}' completion is empty; drop the pair or give it a completion")
        return Pair(prompt, chosen, rejected)
    chosen, rejected = messages_of(chosen, "chosen", where), messages_of(rejected, "rejected", where)
    if prompt is None:  # implicit prompt: the messages both conversations start with
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
        if k == 0:
            raise TaskError(
                f"{where}: no 'prompt', and 'chosen' and 'rejected' do not start with the same message, so there is "
                f"no shared prompt; give the prompt messages as 'prompt', or start both conversations with them"
            )
        prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
    elif isinstance(prompt, list):
        prompt = messages_of(prompt, "prompt", where)
    else:
        raise TaskError(
            f"{where}: 'chosen' and 'rejected' are conversations, so 'prompt' must be a list of messages too, got "
            f'{type(prompt).__name__}; write it as [{{"role": "user", "content": ...}}]'
        )
    for key, turns in (("chosen", chosen), ("rejected", rejected)):
        if not turns or not turns[-1]["content"].strip():
            raise TaskError(f"{where}: the '{key}' completion is empty; drop the pair or give it a reply")
        if turns[-1]["role"] != "assistant":
            raise TaskError(
                f"{where}: the '{key}' completion ends with a {turns[-1]['role']} message; a completion is the "
                f"assistant's reply, so its last message must have role 'assistant'"
            )
    return Pair(prompt, chosen, rejected)


class PairRenderer:
    """Pairs → (prompt text, chosen text, rejected text), rendered with the project's chat rendering."""

    def __init__(self, tokenizer):
        self.renderer = Renderer(tokenizer)

    def texts(self, payload: bytes | str | dict, path: str, line_no: int) -> tuple[str, str, str]:
        pair = parse_pair(payload, path, line_no)
        if isinstance(pair.prompt, str):
            return pair.prompt, pair.chosen, pair.rejected
        where = sources.where(path, line_no)
        try:
            prompt = self.renderer.render_prompt(pair.prompt)[0]
        except TaskError as e:
            raise TaskError(f"{where}: {e}") from None
        out = [prompt]
        for key, turns in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            full = self.renderer.render_text_only({"messages": pair.prompt + turns}, path, line_no)[0]
            if not full.startswith(prompt):
                raise TaskError(
                    f"{where}: the chat template's rendering of prompt + '{key}' does not start with its rendering of "
                    f"the prompt with add_generation_prompt=True, so the completion cannot be cut off it; use a "
                    f"template whose generation prompt is a prefix of the rendered reply, or write standard (text) pairs"
                )
            out.append(full[len(prompt) :])
        return out[0], out[1], out[2]


# ------------------------------------------------------------------ tokens
def fit(prompt: list[int], chosen: list[int], rejected: list[int], seq_length: int) -> Fitted:
    """Both rows within seq_length: the prompt loses its start (just enough for the longer row; both rows keep the
    same prompt, so the two completions are scored on the same context), then each completion loses its end.

    The prompt keeps at least its last token: the first completion token is a label only where a token precedes it.
    """
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= seq_length:
        return prompt, chosen, rejected, False
    keep = min(len(prompt), max(seq_length - longest, 1))
    room = seq_length - keep
    return prompt[len(prompt) - keep :], chosen[:room], rejected[:room], True


class PairEncoder:
    """Texts of pairs → token ids, EOS-terminated completions, fitted into seq_length."""

    def __init__(self, tokenizer, seq_length: int):
        if not isinstance(seq_length, int) or seq_length < 2:
            raise TaskError(
                f"seq_length must be at least 2 for preference pairs (a prompt and a reply token), got {seq_length!r}"
            )
        self.encoder = Encoder(tokenizer)
        self.eos = self.encoder.eos
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad = int(pad) if pad is not None else self.eos
        self.seq_length = seq_length

    @property
    def fingerprint(self) -> str:
        return self.encoder.fingerprint

    def encode(self, texts: list[tuple[str, str, str]]) -> list[Fitted]:
        flat = [t for triple in texts for t in triple]
        ids = [list(i) for i, _ in self.encoder.encode_texts(flat, False, False)]
        eos = self.eos
        for k in range(len(ids)):
            if k % 3 and not (ids[k] and ids[k][-1] == eos):  # completions end with one EOS
                ids[k].append(eos)
        return [fit(ids[k], ids[k + 1], ids[k + 2], self.seq_length) for k in range(0, len(ids), 3)]


def pair_rows(pairs: list[Fitted | None], seq_length: int, pad: int) -> dict[str, torch.Tensor]:
    """Rows 2i / 2i+1 for pair i (None: a dummy pair, all padding and no labels)."""
    n = 2 * len(pairs)
    ids = np.full((n, seq_length), pad, dtype=np.int64)
    labels = np.full((n, seq_length), IGNORE, dtype=np.int64)
    for i, pair in enumerate(pairs):
        if pair is None:
            continue
        prompt = pair[0]
        first = max(len(prompt), 1)  # the first completion token with a token before it to predict it
        for j, completion in enumerate(pair[1:3]):
            seq = prompt + completion
            ids[2 * i + j, : len(seq)] = seq
            labels[2 * i + j, first - 1 : len(seq) - 1] = seq[first:]
    return {
        "input_ids": torch.from_numpy(ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.arange(seq_length, dtype=torch.int64).repeat(n, 1),
        "doc_ids": torch.zeros(n, seq_length, dtype=torch.int64),
    }


def _check_settings(data: DataConfig) -> None:
    """The SFT record and masking settings do not apply to pairs: refused rather than silently ignored."""
    for flag, value, default in (
        ("--data-format", data.data_format, "auto"),
        ("--text-field", data.text_field, None),
        ("--messages-field", data.messages_field, None),
        ("--train-on-inputs", data.train_on_inputs, False),
        ("--loss-on-bot-only", data.loss_on_bot_only, False),
    ):
        if value != default:
            raise TaskError(
                f"{flag} does not apply to preference pairs (TRL's prompt / chosen / rejected records, loss on the "
                f"completions); drop {flag}"
            )


# ------------------------------------------------------------------ stream
@dataclass
class _Position:
    """Where the stream stands after a batch: the mixture before the next pair, and the running counts."""

    snapshot: Any
    pairs: int
    truncated: int
    epochs: list[int]


class PreferenceStream(LoaderStream):
    """Infinite iterator of batches of pairs: dicts of int64 tensors [2 * batch_size, seq_length] with input_ids,
    labels (already shifted, -100 = no loss), position_ids and doc_ids; rows 2i / 2i+1 are pair i's chosen / rejected.

    With data.workers >= 1 one background thread reads, renders and tokenises (the tokenizer's batch encoding uses the
    cores itself) into a queue of `prefetch` batches; with 0 it all runs in next().
    """

    thread_name = "tasks-pairs"

    def __init__(
        self,
        data: DataConfig,
        tokenizer,
        dp_rank: int = 0,
        dp_size: int = 1,
        show_data: bool | None = None,
        *,
        prefetch: int = 4,
        show_every: int | None = None,
    ):
        """The pairs of `data` (--task-name and the data settings) as replica `dp_rank` of `dp_size` reads them.
        `show_data` None: print a pair when SHOW_DATA is set (every SHOW_DATA_EVERY batches, or `show_every`)."""
        check_positive("batch_size", data.batch_size)
        check_positive("dp_size", dp_size)
        check_positive("shuffle_buffer", data.shuffle_buffer)
        check_positive("num_workers", data.workers, 0)
        check_positive("prefetch", prefetch)
        if not isinstance(dp_rank, int) or not 0 <= dp_rank < dp_size:
            raise TaskError(f"dp_rank must be in [0, {dp_size}), got {dp_rank!r}")
        _check_settings(data)
        self.tasks = parse_task_spec(data.task_spec)
        self.tokenizer = tokenizer
        self.seq_length, self.batch_size = data.seq_length, data.batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle_buffer = int(data.seed), data.shuffle_buffer
        self.num_workers, self.prefetch = data.workers, prefetch
        self.encoder = PairEncoder(tokenizer, data.seq_length)
        self._pipe = _Pipeline(self, PairRenderer(tokenizer))
        self._codec = Mixture(self.tasks, self.seed, self.shuffle_buffer)  # serialises snapshots; never reads
        if show_data is None:
            show_data = show_data_from_env()
        self.show_data = show_data and dp_rank == 0
        self.show_every = show_every_from_env() if show_every is None else show_every
        check_positive("show_every", self.show_every)
        self._resume: dict | None = None  # JSON state to start from
        self._init_loader()  # self._consumed: the _Position (or JSON state) after the last batch handed out

    def _show(self, batch: dict[str, torch.Tensor]) -> str:
        parts = []
        for row, name in ((0, "chosen"), (1, "rejected")):
            labels = batch["labels"][row]
            trained = (labels != IGNORE).nonzero()
            end = int(trained[-1]) + 1 if len(trained) else self.seq_length  # drop the padding
            sample = {"input_ids": batch["input_ids"][row : row + 1, :end], "labels": labels[None, :end]}
            parts.append(f"[tasks] {name} ({len(trained)} labels):\n{format_sample(sample, self.tokenizer)}")
        return (
            f"[tasks] SHOW_DATA batch {self._served} pair 0 (loss on [[...]] spans)\n"
            + "\n".join(parts)
            + "\n[tasks] end of sample"
        )

    # -- counts and state --
    @property
    def epochs(self) -> dict[str, int]:
        """Completed passes over each task's files, as of the last batch handed out."""
        ref = self._consumed if self._consumed is not None else self._resume
        if ref is None:
            return {t.name: 0 for t in self.tasks}
        if isinstance(ref, dict):
            return dict(ref["epochs"])
        return {t.name: e for t, e in zip(self.tasks, ref.epochs)}

    @property
    def truncated_pairs(self) -> int:
        """Pairs (of every replica) cut to fit seq_length so far, as of the last batch handed out; survives resume."""
        return self._count("truncated_pairs", "truncated")

    @property
    def pairs(self) -> int:
        """Pairs (of every replica) handed out so far; survives resume."""
        return self._count("pairs", "pairs")

    def _count(self, key: str, attr: str) -> int:
        ref = self._consumed if self._consumed is not None else self._resume
        if ref is None:
            return 0
        return int(ref[key]) if isinstance(ref, dict) else getattr(ref, attr)

    def _identity(self) -> dict:
        return {
            "seed": self.seed,
            "shuffle_buffer": self.shuffle_buffer,
            "tokenizer": self.encoder.fingerprint,
            "seq_length": self.seq_length,
            "tasks": task_signatures(self.tasks),
        }

    def state_dict(self) -> dict:
        """JSON-serialisable position after the last batch handed out (identical on every dp replica)."""
        ref = self._consumed
        if isinstance(ref, dict):
            return copy_json(ref)
        if ref is None:
            if self._resume is not None:
                return copy_json(self._resume)
            fresh = Mixture(self.tasks, self.seed, self.shuffle_buffer)
            ref = _Position(fresh.snapshot(), 0, 0, [0] * len(self.tasks))
        return {
            "format": STATE_FORMAT,
            **self._identity(),
            "global_batch": self.batch_size * self.dp_size,
            "pairs": ref.pairs,
            "truncated_pairs": ref.truncated,
            "epochs": {t.name: e for t, e in zip(self.tasks, ref.epochs)},
            "position": {"source": self._codec.snapshot_to_json(ref.snapshot)},
        }

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Continue after the batch `state` was taken at. strict=False tolerates data files that changed size and a
        changed seq_length (the trainer's --resume-data continue)."""
        fmt = state.get("format") if isinstance(state, dict) else None
        if fmt == PACKED_STATE_FORMAT:
            raise TaskError(
                "cannot resume the data stream: the checkpoint's data position is an SFT stream's (--objective sft), "
                "not one of preference pairs; pass --resume-data restart to read the pairs from the start"
            )
        if fmt != STATE_FORMAT:
            raise TaskError(
                f"not a preference-stream state (expected format {STATE_FORMAT!r}); was it written by "
                f"tasks.PreferenceStream.state_dict()?"
            )
        mine = self._identity()
        check_same_sources(state, mine, strict)
        if strict and state["seq_length"] != mine["seq_length"]:
            raise TaskError(
                f"cannot resume the data stream exactly: --seq-length changed since the checkpoint "
                f"({state['seq_length']} → {mine['seq_length']}), which changes how pairs are truncated; restore it, "
                f"or pass --resume-data continue to go on at the same pair"
            )
        self._restart_at(state)


class _Pipeline:
    """What the loader runs: Mixture → records of one global batch → texts → fitted ids → this replica's rows."""

    def __init__(self, stream: PreferenceStream, renderer: PairRenderer):
        self.tasks, self.seed, self.shuffle_buffer = stream.tasks, stream.seed, stream.shuffle_buffer
        self.renderer, self.encoder = renderer, stream.encoder
        self.B, self.r, self.G = stream.batch_size, stream.dp_rank, stream.batch_size * stream.dp_size

    def batches(self, resume: dict | None, stop: threading.Event | None):
        mix = Mixture(self.tasks, self.seed, self.shuffle_buffer)
        pairs = truncated = 0
        if resume is not None:
            mix.load_json(resume["position"]["source"])
            pairs, truncated = int(resume["pairs"]), int(resume["truncated_pairs"])
        files = [t.files for t in self.tasks]
        S, pad = self.encoder.seq_length, self.encoder.pad
        try:
            while stop is None or not stop.is_set():
                docs = [mix.next_doc() for _ in range(self.G)]
                snapshot = mix.snapshot()
                texts = [self.renderer.texts(item[0], files[t][item[1]], item[3]) for t, item in docs]
                fitted = self.encoder.encode(texts)
                pairs += self.G
                truncated += sum(f[3] for f in fitted)
                batch = pair_rows(fitted[self.r * self.B : (self.r + 1) * self.B], S, pad)
                yield batch, _Position(snapshot, pairs, truncated, mix.epochs_of(snapshot))
        finally:
            mix.close()


# ------------------------------------------------------------------ evaluation and counting
def preference_evaluation_batches(paths, tokenizer, data: DataConfig, dp_rank: int = 0, dp_size: int = 1):
    """Every pair of `paths` once, in file order, as the stream's batches plus "pair_mask" (bool [batch_size]: which
    of this replica's pairs are real). The last global batch is filled with dummy pairs (padding, no labels, mask
    False), so shapes are fixed and every replica yields the same number of batches.

    paths: a --task-name style spec or a list of paths (weights ignored).
    """
    _check_settings(data)
    tasks = parse_task_spec(paths, flag="--evaluation-data")
    renderer, encoder = PairRenderer(tokenizer), PairEncoder(tokenizer, data.seq_length)
    B = data.batch_size
    G = B * dp_size

    def batch(texts: list[tuple[str, str, str]]) -> dict[str, torch.Tensor]:
        fitted: list[Fitted | None] = list(encoder.encode(texts)[dp_rank * B : (dp_rank + 1) * B])
        real = len(fitted)
        out = pair_rows(fitted + [None] * (B - real), data.seq_length, encoder.pad)
        out["pair_mask"] = torch.arange(B) < real
        return out

    group = []
    for path, line_no, line in sources.iter_records([f for t in tasks for f in t.files]):
        group.append(renderer.texts(line, path, line_no))
        if len(group) == G:
            yield batch(group)
            group = []
    if group:
        yield batch(group)


def _records_in(path: str) -> int:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows  # from the footer: no rows read
    if sources.is_hf(path):
        known = sources.signature(path)[1]
        if known is not None:
            return int(known)
    return sum(1 for _ in sources.iter_records([path]))


def count_pairs(task_spec: str | list[str] | tuple[str, ...], *, per_task: bool = False) -> int | dict[str, int]:
    """Pairs in one pass over every task (records; not validated: the stream reports bad ones). Returns the total, or
    {task name: pairs} with per_task=True. One epoch in iterations is about pairs / (batch_size * dp_size)."""
    tasks = parse_task_spec(task_spec)
    counts = {t.name: sum(_records_in(f) for f in t.files) for t in tasks}
    return counts if per_task else sum(counts.values())

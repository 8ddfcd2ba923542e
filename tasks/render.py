"""Records → text plus the character spans that take loss.

Record layouts (a jsonl line or a parquet / arrow / datasets row), detected per record or forced by RecordFormat, all
normalised to one of two kinds:
  {"text": "<human>: ...\n<bot>: ..."}                     OIG style; every token trained (or, with
                                                          loss_on_bot_only, only the text after each <bot>:
                                                          up to the next <human>:)
  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
                                                          rendered with tokenizer.chat_template when it has one,
                                                          else as OIG lines; loss only on assistant content
                                                          unless train_on_inputs
  {"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}]}      ShareGPT → messages
  {"instruction": ..., "input": ..., "output": ...}       Alpaca → [user: instruction + "\n\n" + input,
                                                          assistant: output] (input optional)
A rendered document is (text, spans, special): spans None means "train on every token", else a list of
(start, end) character ranges whose tokens take loss; special says whether the tokenizer adds its special tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .spec import TaskError

if TYPE_CHECKING:
    from config import DataConfig

HUMAN = "<human>:"
BOT = "<bot>:"
ROLES = ("system", "user", "assistant")

Rendered = tuple[str, "list[tuple[int, int]] | None", bool]


def bot_spans(text: str) -> list[tuple[int, int]]:
    """Character spans after each ``<bot>:`` up to the next ``<human>:`` (or the end)."""
    spans = []
    i = text.find(BOT)
    while i >= 0:
        a = i + len(BOT)
        j = text.find(HUMAN, a)
        b = len(text) if j < 0 else j
        spans.append((a, b))
        i = -1 if j < 0 else text.find(BOT, b)
    return spans


FORMATS = ("auto", "text", "messages", "sharegpt", "alpaca")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class RecordFormat:
    """How records are read: `format` auto detects per record; the fields rename the text / conversation columns."""

    format: str = "auto"  # auto | text | messages | sharegpt | alpaca
    text_field: str | None = None  # default "text"
    messages_field: str | None = None  # default "messages" (ShareGPT: "conversations")

    def __post_init__(self):
        if self.format not in FORMATS:
            raise TaskError(f"data format {self.format!r} is not one of {', '.join(FORMATS)}; pick one (--data-format)")
        for flag, value in (("--text-field", self.text_field), ("--messages-field", self.messages_field)):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise TaskError(f"{flag} must name a column, got {value!r}")

    @classmethod
    def of(cls, data: DataConfig) -> RecordFormat:
        """The record layout of the data settings (--data-format, --text-field, --messages-field)."""
        return cls(data.data_format, data.text_field, data.messages_field)

    @property
    def key(self) -> str:
        """Part of the token-count cache key; empty for the defaults, so existing caches stay valid."""
        if self == RecordFormat():
            return ""
        return f"{self.format}|{self.text_field}|{self.messages_field}"

    def required_columns(self) -> list[tuple[str, str]]:
        """(column, flag that names it) every record must have: what a forced format or a field override asks."""
        out = []
        if self.text_field and self.format in ("auto", "text"):
            out.append((self.text_field, "--text-field"))
        if self.messages_field and self.format in ("auto", "messages", "sharegpt"):
            out.append((self.messages_field, "--messages-field"))
        if not out:
            default = {"text": "text", "messages": "messages", "sharegpt": "conversations"}.get(self.format)
            if default:
                flag = "--text-field" if self.format == "text" else "--messages-field"
                out.append((default, flag))
            elif self.format == "alpaca":
                out += [("instruction", "--data-format"), ("output", "--data-format")]
        return out


def check_columns(tasks, fmt: RecordFormat):
    """Sources with a schema (parquet, arrow, hf:) must have the columns `fmt` asks for; one line naming the fix."""
    from . import sources

    needed = fmt.required_columns()
    if not needed:
        return
    for t in tasks:
        for path in t.files:
            cols = sources.columns_of(path)
            if cols is None:
                continue
            for col, flag in needed:
                if col not in cols:
                    fix = (
                        f"fix {flag}"
                        if flag != "--data-format"
                        else "use --data-format auto, or convert the data to Alpaca columns"
                    )
                    raise TaskError(
                        f"task '{t.name}': {path} has no column '{col}' (columns: {', '.join(cols[:12])}); {fix}"
                    )


def decode(payload, where: str) -> dict[str, Any]:
    """A jsonl line parsed to a dict (rows from parquet / arrow / datasets are dicts already)."""
    if isinstance(payload, dict):
        return payload
    try:
        obj = json.loads(payload)
    except ValueError as e:
        msg = getattr(e, "msg", str(e))
        raise TaskError(
            f"{where}: not valid JSON ({msg}); each line must be one JSON object such as "
            f'{{"text": "<human>: ...\\n<bot>: ..."}} or {{"messages": [...]}}'
        ) from None
    if not isinstance(obj, dict):
        raise TaskError(
            f"{where}: expected a JSON object per line, got {type(obj).__name__}; write "
            f'{{"text": ...}} or {{"messages": [...]}}'
        )
    return obj


def _turns_are_sharegpt(turns) -> bool:
    first = turns[0] if isinstance(turns, list) and turns else None
    return isinstance(first, dict) and "role" not in first and ("from" in first or "value" in first)


def _detect(obj: dict, fmt: RecordFormat) -> tuple[str, str]:
    """(format, field) of one record."""
    if fmt.messages_field and fmt.messages_field in obj:
        f = fmt.messages_field
        return ("sharegpt" if _turns_are_sharegpt(obj[f]) else "messages"), f
    if fmt.text_field and fmt.text_field in obj:
        return "text", fmt.text_field
    if "messages" in obj:
        return "messages", "messages"
    if "conversations" in obj:
        return ("sharegpt" if _turns_are_sharegpt(obj["conversations"]) else "messages"), "conversations"
    if "instruction" in obj and "output" in obj:
        return "alpaca", ""
    if "text" in obj:
        return "text", "text"
    keys = ", ".join(sorted(obj)[:8]) or "none"
    if "chosen" in obj or "rejected" in obj:  # TRL's preference layout: another objective, not an SFT layout
        raise TaskError(
            f"record is a preference pair (keys: {keys}), not SFT data; prompt / chosen / rejected records train "
            f"with --objective dpo (or simpo / orpo)"
        )
    named = "".join(
        f" nor {flag} '{v}'"
        for flag, v in (("--text-field", fmt.text_field), ("--messages-field", fmt.messages_field))
        if v
    )
    raise TaskError(
        f"record has neither 'text' nor 'messages' (nor ShareGPT 'conversations', Alpaca 'instruction'/'output'"
        f'{named}) (keys: {keys}); write {{"text": "<human>: ...\\n<bot>: ..."}} or {{"messages": '
        f'[{{"role": "user", "content": ...}}, ...]}}, or name the column with --text-field / --messages-field'
    )


def messages_of(turns, field: str, where: str) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise TaskError(f'{where}: \'{field}\' must be a non-empty list of {{"role": ..., "content": ...}} objects')
    out = []
    for k, m in enumerate(turns):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise TaskError(
                f"{where}: {field}[{k}] must be an object with a string 'content' and a 'role' in {'/'.join(ROLES)}"
            )
        if m.get("role") not in ROLES:
            raise TaskError(f"{where}: {field}[{k}] has role {m.get('role')!r}; use one of {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _sharegpt(turns, field: str, where: str) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise TaskError(f'{where}: \'{field}\' must be a non-empty list of {{"from": ..., "value": ...}} objects')
    out = []
    for k, m in enumerate(turns):
        if not isinstance(m, dict) or not isinstance(m.get("value"), str):
            raise TaskError(
                f"{where}: {field}[{k}] must be an object with a string 'value' and a 'from' in human/gpt/system"
            )
        role = SHAREGPT_ROLES.get(m.get("from"))
        if role is None:
            raise TaskError(f"{where}: {field}[{k}] has from {m.get('from')!r}; use one of human, gpt, system")
        out.append({"role": role, "content": m["value"]})
    return out


def _alpaca(obj: dict, where: str) -> list[dict[str, str]]:
    """Alpaca as a conversation: [system], user = instruction (+ blank line + input), assistant = output."""
    for key in ("instruction", "output"):
        if not isinstance(obj.get(key), str):
            raise TaskError(f"{where}: Alpaca record needs a string '{key}' (keys: {', '.join(sorted(obj)[:8])})")
    extra = obj.get("input")
    if extra is not None and not isinstance(extra, str):
        raise TaskError(f"{where}: Alpaca 'input' must be a string, got {type(extra).__name__}")
    user = obj["instruction"] + (f"\n\n{extra}" if extra else "")
    msgs = [{"role": "system", "content": obj["system"]}] if isinstance(obj.get("system"), str) else []
    return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": obj["output"]}]


def to_record(obj: dict, where: str, fmt: RecordFormat) -> dict[str, Any]:
    """Any supported layout → {"text": str} or {"messages": [{"role", "content"}, ...]}."""
    if fmt.format == "auto":
        try:
            kind, field = _detect(obj, fmt)
        except TaskError as e:
            raise TaskError(f"{where}: {e}") from None
    else:
        kind = fmt.format
        field = {
            "text": fmt.text_field or "text",
            "messages": fmt.messages_field or "messages",
            "sharegpt": fmt.messages_field or "conversations",
            "alpaca": "",
        }[kind]
        if field and field not in obj:
            flag = "--text-field" if kind == "text" else "--messages-field"
            raise TaskError(
                f"{where}: --data-format {kind} but the record has no '{field}' (keys: "
                f"{', '.join(sorted(obj)[:8]) or 'none'}); name the column with {flag} or use --data-format auto"
            )
    if kind == "text":
        if not isinstance(obj[field], str):
            raise TaskError(f"{where}: '{field}' must be a string, got {type(obj[field]).__name__}")
        return {"text": obj[field]}
    if kind == "messages":
        return {"messages": messages_of(obj[field], field, where)}
    if kind == "sharegpt":
        return {"messages": _sharegpt(obj[field], field, where)}
    return {"messages": _alpaca(obj, where)}


def parse_line(line, path: str, line_no: int, fmt: RecordFormat | None = None) -> dict[str, Any]:
    """Decode and validate one record (a jsonl line or a row); TaskError names file:line (or file[row i])."""
    from .sources import where as where_of

    where = where_of(path, line_no)
    return to_record(decode(line, where), where, fmt or RecordFormat())


class Renderer:
    """Turns parsed records into (text, spans, special) following the masking options."""

    def __init__(
        self,
        tokenizer,
        train_on_inputs: bool = False,
        loss_on_bot_only: bool = False,
        record_format: RecordFormat | None = None,
    ):
        if train_on_inputs and loss_on_bot_only:
            raise TaskError(
                "train_on_inputs=True and loss_on_bot_only=True contradict each other; "
                "choose one (train_on_inputs trains every token)"
            )
        self.tokenizer = tokenizer
        self.train_on_inputs = train_on_inputs
        self.loss_on_bot_only = loss_on_bot_only
        self.chat_template = getattr(tokenizer, "chat_template", None) or None
        self.format = record_format or RecordFormat()

    def render_line(self, line: bytes | str | dict, path: str, line_no: int) -> Rendered:
        obj = parse_line(line, path, line_no, self.format)
        if "messages" in obj:
            msgs = obj["messages"]
            if self.chat_template:
                return self._render_template(msgs, path, line_no)
            return self._render_oig(msgs)
        text = obj["text"]
        return text, (bot_spans(text) if self.loss_on_bot_only else None), True

    def render_text_only(self, line: bytes | str | dict, path: str, line_no: int) -> tuple[str, bool]:
        """(text, special) without loss spans: what token counting needs, one template call per record."""
        obj = parse_line(line, path, line_no, self.format)
        if "messages" not in obj:
            return obj["text"], True
        msgs = obj["messages"]
        if self.chat_template:
            return self._apply(msgs, False, path, line_no), False
        return self._render_oig(msgs)[0], True

    def render_prompt(self, messages: list[dict[str, str]]) -> tuple[str, bool]:
        """(text, special) of a conversation that ends where the assistant's next reply starts: what a chat front end
        (tools/chat.py) feeds `generate`, rendered exactly as training renders the same messages."""
        msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
        if self.chat_template:
            try:
                text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            except Exception as e:  # jinja raise_exception(), bad template, ...
                raise TaskError(f"the tokenizer's chat template failed on this conversation: {e}") from None
            return text, False
        text = self._render_oig(msgs)[0]
        return (f"{text}\n{BOT}" if text else BOT), True

    def end_of_turn_ids(self) -> list[int]:
        """The token that closes an assistant turn under the chat template (ChatML's <|im_end|>, Gemma's
        <end_of_turn>, Phi-3's <|end|>, Llama 3's <|eot_id|>, or the EOS itself): the first token the template
        writes after a reply's text, where that is a special token. Empty without a template: OIG turns end where
        the next "<human>:" begins, which is text, not a token."""
        if not self.chat_template:
            return []
        probe = "REPLYTEXTPROBE"
        msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}]
        try:
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False)
        except Exception:  # a template that refuses this conversation shape: generation ends at EOS alone
            return []
        if not isinstance(text, str) or probe not in text:
            return []
        after = self.tokenizer(text[text.rindex(probe) + len(probe) :], add_special_tokens=False)["input_ids"]
        special = set(self.tokenizer.all_special_ids)
        special |= {i for i, t in self.tokenizer.added_tokens_decoder.items() if t.special}
        return after[:1] if after and after[0] in special else []

    # -- OIG rendering of messages: "<human>: ...\n<bot>: ..." (system content as a plain first line) --
    def _render_oig(self, msgs) -> Rendered:
        parts: list[str] = []
        spans: list[tuple[int, int]] = []
        pos = 0
        for k, m in enumerate(msgs):
            if k:
                parts.append("\n")
                pos += 1
                if spans and spans[-1][1] == pos - 1:  # the newline ending a bot turn belongs to it
                    spans[-1] = (spans[-1][0], pos)
            role, content = m["role"], m["content"]
            if role == "user":
                line = f"{HUMAN} {content}"
            elif role == "assistant":
                line = f"{BOT} {content}"
                spans.append((pos + len(BOT), pos + len(line)))
            else:
                line = content
            parts.append(line)
            pos += len(line)
        return "".join(parts), (None if self.train_on_inputs else spans), True

    # -- chat-template rendering; assistant spans found from rendered prefixes --
    def _apply(self, msgs, gen: bool, path, line_no) -> str:
        try:
            out = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # jinja raise_exception(), bad template, ...
            raise TaskError(f"{path}:{line_no}: the tokenizer's chat template failed on this record: {e}") from None
        if not isinstance(out, str):
            raise TaskError(
                f"{path}:{line_no}: apply_chat_template(tokenize=False) returned {type(out).__name__}, not text"
            )
        return out

    def _try_apply(self, msgs, gen: bool):
        try:
            out = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            return out if isinstance(out, str) else None
        except Exception:
            return None

    def _render_template(self, msgs, path, line_no) -> Rendered:
        full = self._apply(msgs, False, path, line_no)
        if self.train_on_inputs:
            return full, None, False
        spans: list[tuple[int, int]] = []
        cursor = 0
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            content = m["content"]
            start = None
            p = self._try_apply(msgs[:i], True) if i else None
            if p is not None and len(p) >= cursor and full.startswith(p):
                start = len(p)
            else:
                p = self._try_apply(msgs[:i], False) if i else ""
                base = len(p) if (p is not None and len(p) >= cursor and full.startswith(p)) else cursor
                k = full.find(content, base) if content else -1
                start = k if k >= 0 else base
            q = self._try_apply(msgs[: i + 1], False)
            if q is not None and len(q) > start and full.startswith(q):
                end = len(q)
            else:
                k = full.find(content, start)
                if k < 0:
                    raise TaskError(
                        f"{path}:{line_no}: cannot locate assistant message {i} in the chat-template "
                        f"rendering; use train_on_inputs=True or a template that keeps message text"
                    )
                end = k + len(content)
            spans.append((start, end))
            cursor = end
        return full, spans, False

"""Records → text plus the character spans that take loss.

Two record kinds, one JSON object per line:
  {"text": "<human>: ...\n<bot>: ..."}                     OIG style; every token trained (or, with
                                                          loss_on_bot_only, only the text after each <bot>:
                                                          up to the next <human>:)
  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
                                                          rendered with tokenizer.chat_template when it has one,
                                                          else as OIG lines; loss only on assistant content
                                                          unless train_on_inputs
A rendered document is (text, spans, special): spans None means "train on every token", else a list of
(start, end) character ranges whose tokens take loss; special says whether the tokenizer adds its special tokens.
"""

from __future__ import annotations

import json
from typing import Any

from .spec import TaskError

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


def parse_line(line: bytes | str, path: str, line_no: int) -> dict[str, Any]:
    """Decode and validate one jsonl line; TaskError names file:line and the fix."""
    where = f"{path}:{line_no}"
    try:
        obj = json.loads(line)
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
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise TaskError(
                f'{where}: \'messages\' must be a non-empty list of {{"role": ..., "content": ...}} objects'
            )
        for k, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise TaskError(
                    f"{where}: messages[{k}] must be an object with a string 'content' and a 'role' "
                    f"in {'/'.join(ROLES)}"
                )
            if m.get("role") not in ROLES:
                raise TaskError(f"{where}: messages[{k}] has role {m.get('role')!r}; use one of {', '.join(ROLES)}")
    elif "text" in obj:
        if not isinstance(obj["text"], str):
            raise TaskError(f"{where}: 'text' must be a string, got {type(obj['text']).__name__}")
    else:
        keys = ", ".join(sorted(obj)[:8]) or "none"
        raise TaskError(
            f"{where}: record has neither 'text' nor 'messages' (keys: {keys}); write "
            f'{{"text": "<human>: ...\\n<bot>: ..."}} or {{"messages": [{{"role": "user", '
            f'"content": ...}}, ...]}}'
        )
    return obj


class Renderer:
    """Turns parsed records into (text, spans, special) following the masking options."""

    def __init__(self, tokenizer, train_on_inputs: bool = False, loss_on_bot_only: bool = False):
        if train_on_inputs and loss_on_bot_only:
            raise TaskError(
                "train_on_inputs=True and loss_on_bot_only=True contradict each other; "
                "choose one (train_on_inputs trains every token)"
            )
        self.tokenizer = tokenizer
        self.train_on_inputs = train_on_inputs
        self.loss_on_bot_only = loss_on_bot_only
        self.chat_template = getattr(tokenizer, "chat_template", None) or None

    def render_line(self, line: bytes | str, path: str, line_no: int) -> Rendered:
        obj = parse_line(line, path, line_no)
        if "messages" in obj:
            msgs = [{"role": m["role"], "content": m["content"]} for m in obj["messages"]]
            if self.chat_template:
                return self._render_template(msgs, path, line_no)
            return self._render_oig(msgs)
        text = obj["text"]
        return text, (bot_spans(text) if self.loss_on_bot_only else None), True

    def render_text_only(self, line: bytes | str, path: str, line_no: int) -> tuple[str, bool]:
        """(text, special) without loss spans: what token counting needs, one template call per record."""
        obj = parse_line(line, path, line_no)
        if "messages" not in obj:
            return obj["text"], True
        msgs = [{"role": m["role"], "content": m["content"]} for m in obj["messages"]]
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

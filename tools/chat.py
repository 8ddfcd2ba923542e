"""Talk to a fine-tuned model: an interactive chat with streamed replies, or one reply with --prompt.

    python tools/chat.py MODEL [--prompt "..."] [--max-new-tokens 128] [--temperature 0.6] [--top-p 1] [--top-k 40]

MODEL is one of:
  * a Hugging Face model folder (what tools/convert_to_hf.py writes, or any causal LM saved by transformers);
  * a training checkpoint: a `checkpoint_<step>` folder, or the --checkpoint-path folder (its `latest` step is used),
    merged into a Hugging Face model in a temporary folder by tools/convert_to_hf.py;
  * a peft adapter folder (adapter_config.json), loaded on top of its base model (--base-model overrides the base).
Prompts are rendered exactly as training rendered chat records (tasks/render.py): with the tokenizer's chat template
when it has one, else as OpenChatKit's `<human>: ...` / `<bot>: ...` lines. A reply ends at the EOS token or where
the model starts the next `<human>:` turn. GPU (bf16) when there is one, CPU (fp32) otherwise.
In the chat: an empty line is ignored, /reset forgets the conversation, /quit or Ctrl-D leaves.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
import threading
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from tasks.render import HUMAN, Renderer  # noqa: E402

NO_MODEL = (
    "no model here; give a Hugging Face model folder (config.json), a training checkpoint (a checkpoint_<step> "
    "folder, or the --checkpoint-path folder holding `latest`) or a peft adapter folder (adapter_config.json)"
)


class ChatError(Exception):
    """Why the model cannot be used, in one line naming the folder and the fix."""


# ---------------------------------------------------------------------------------------------------------------
# Finding and loading the model
# ---------------------------------------------------------------------------------------------------------------


def model_kind(path: str) -> str:
    """ "adapter", "hf", "checkpoint" (a checkpoint_<step> folder) or "checkpoint_path" (holds `latest`)."""
    if not os.path.isdir(path):
        raise ChatError(f"{path}: folder not found")
    has = lambda name: os.path.exists(os.path.join(path, name))  # noqa: E731
    if has("adapter_config.json"):
        return "adapter"
    if has("config.json"):
        return "hf"
    if has("meta.json") and re.fullmatch(r"checkpoint_\d+", os.path.basename(os.path.normpath(path))):
        return "checkpoint"
    if has("latest"):
        return "checkpoint_path"
    raise ChatError(f"{path}: {NO_MODEL}")


def merge_checkpoint(path: str, kind: str, output_dir: str, dtype: str) -> str:
    """Merge a training checkpoint's stage files into a HF folder with convert_to_hf's own code; returns it."""
    from modules.config import ModelError
    from tools.convert_to_hf import convert

    if kind == "checkpoint":
        folder = os.path.normpath(path)
        checkpoint_path, step = os.path.dirname(folder) or ".", int(os.path.basename(folder).split("_")[1])
    else:
        checkpoint_path, step = path, None
    try:
        convert(checkpoint_path, output_dir, step, dtype)
    except (ModelError, OSError) as e:
        raise ChatError(str(e)) from None
    return output_dir


def pick_device(device: str) -> tuple[str, object]:
    """(device, dtype): bf16 on a GPU (fp16 where bf16 is not supported), fp32 on the CPU."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu", torch.float32
    if not torch.cuda.is_available():
        raise ChatError("--device cuda: no GPU visible to torch; use --device cpu")
    return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_model(path: str, device: str, stack: contextlib.ExitStack, base_model: str | None = None):
    """(model in eval mode on `device`, tokenizer) for any MODEL that model_kind accepts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind = model_kind(path)
    device, dtype = pick_device(device)
    model_dir, tokenizer_dir = path, path
    if kind in ("checkpoint", "checkpoint_path"):
        print(f"chat: merging the checkpoint's stage files into a temporary folder ({path})", file=sys.stderr)
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="chat-export-"))
        model_dir = tokenizer_dir = merge_checkpoint(path, kind, tmp, "fp32" if device == "cpu" else "bf16")
    elif kind == "adapter":
        model_dir = base_model or _adapter_base(path)
        tokenizer_dir = path if _has_tokenizer(path) else model_dir
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ChatError(f"{model_dir}: transformers cannot load this model ({_first_line(e)})") from None
    if kind == "adapter":
        try:
            from peft import PeftModel
        except ImportError:
            raise ChatError(f"{path} is a peft adapter; loading it needs peft: pip install peft") from None
        model = PeftModel.from_pretrained(model, path)
    return model.to(device).eval(), tokenizer


def _adapter_base(path: str) -> str:
    config = os.path.join(path, "adapter_config.json")
    try:
        with open(config) as f:
            base = json.load(f)["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ChatError(f"{config}: no base_model_name_or_path in it; pass --base-model DIR") from None
    if not base or not os.path.isdir(base):
        raise ChatError(f"{config}: base model {base!r} is not a local folder; pass --base-model DIR")
    return base


def _has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, n)) for n in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


# ---------------------------------------------------------------------------------------------------------------
# Replies
# ---------------------------------------------------------------------------------------------------------------


class ReplyText:
    """Streamed text -> the reply: leading blanks dropped, cut where `stop` (the next `<human>:` turn) begins.

    feed() returns what can be shown now: a tail that may yet turn out to be the start of `stop`, and trailing
    blanks (a reply's last newline before `<human>:`), are held back until the next chunk decides.
    """

    def __init__(self, stop: str | None):
        self.stop, self.raw, self.shown, self.stopped = stop, "", 0, False

    def text(self) -> str:
        visible = self.raw.lstrip()
        if self.stop and self.stop in visible:
            visible = visible[: visible.index(self.stop)]
        return visible.rstrip()

    def feed(self, chunk: str) -> str:
        if self.stopped:
            return ""
        self.raw += chunk
        visible = self.text()
        if self.stop and self.stop in self.raw:
            self.stopped = True
        elif self.stop:
            hold = max((k for k in range(1, len(self.stop)) if visible.endswith(self.stop[:k])), default=0)
            visible = visible[: len(visible) - hold].rstrip()
        new, self.shown = visible[self.shown :], max(self.shown, len(visible))
        return new

    def finish(self) -> str:
        """The rest of the reply once generation ended (a held-back tail that never became `stop`)."""
        return self.text()[self.shown :]


@dataclass
class Reply:
    text: str
    tokens: int
    stop: str  # "eos", "end of turn" (the chat template's), "human" (the model began the next <human>: turn) or
    # "max-new-tokens"


class Chat:
    """A conversation with one model; reply() renders it with tasks/render.py and streams the answer."""

    def __init__(self, model, tokenizer, max_new_tokens=128, temperature=0.6, top_p=1.0, top_k=40, system=None):
        self.model, self.tokenizer = model, tokenizer
        self.renderer = Renderer(tokenizer)
        # Only OIG-format prompts end a reply at "<human>:"; a chat template marks turns with its own tokens.
        self.stop_text = None if self.renderer.chat_template else HUMAN
        self.system = [{"role": "system", "content": system}] if system else []
        self.messages: list[dict[str, str]] = []
        sampling = {"do_sample": False} if temperature == 0 else {"do_sample": True, "temperature": temperature}
        if temperature:
            sampling.update(top_p=top_p, top_k=top_k)
        eos = tokenizer.eos_token_id
        # A reply ends at EOS, at the ids the model's generation_config names (Qwen, Gemma and Phi list several) and
        # at the token that closes a turn under the chat template, which base models' configs often leave out.
        self.end_of_turn = [i for i in self.renderer.end_of_turn_ids() if i != eos]
        configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        configured = configured if isinstance(configured, list) else [configured]
        self.stop_ids = list(dict.fromkeys(i for i in [eos, *configured, *self.end_of_turn] if i is not None))
        self.generate_kwargs = dict(
            sampling,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.stop_ids,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
        )
        if self.stop_text:
            self.generate_kwargs.update(stop_strings=[self.stop_text], tokenizer=tokenizer)

    def reset(self) -> None:
        self.messages = []

    def reply(self, user_text: str, write=None) -> Reply:
        """Append the user's turn, generate the assistant's, keep both; `write` gets the reply as it streams."""
        import torch
        from transformers import TextIteratorStreamer

        messages = self.system + self.messages + [{"role": "user", "content": user_text}]
        prompt, special = self.renderer.render_prompt(messages)
        inputs = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=special).to(self.model.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict[str, object] = {}

        def generate() -> None:
            try:
                with torch.inference_mode():
                    result["ids"] = self.model.generate(**inputs, streamer=streamer, **self.generate_kwargs)
            except BaseException as e:  # re-raised below, on the caller's thread
                result["error"] = e
                streamer.end()

        thread = threading.Thread(target=generate, daemon=True)
        thread.start()
        text = ReplyText(self.stop_text)
        for chunk in streamer:
            shown = text.feed(chunk)
            if shown and write:
                write(shown)
        thread.join()
        if "error" in result:
            raise result["error"]
        if write:
            write(text.finish())
        new_ids = result["ids"][0, inputs["input_ids"].shape[1] :].tolist()
        if text.stopped:
            stop = "human"
        elif new_ids and new_ids[-1] in self.end_of_turn:
            stop = "end of turn"
        elif new_ids and new_ids[-1] in self.stop_ids:
            stop = "eos"
        else:
            stop = "max-new-tokens"
        reply = Reply(text.text(), len(new_ids), stop)
        self.messages += [messages[-1], {"role": "assistant", "content": reply.text}]
        return reply


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", metavar="MODEL", help="HF folder, training checkpoint folder or peft adapter folder")
    parser.add_argument("--prompt", default=None, help="print one reply to this message and exit (no chat)")
    parser.add_argument("--system", default=None, help="a system message put before the conversation")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.6, help="0: greedy (the most likely token)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    parser.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens (0: off)")
    parser.add_argument("--seed", type=int, default=None, help="seed the sampler (same seed, same replies)")
    parser.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu, cuda or cuda:N")
    parser.add_argument("--base-model", default=None, help="peft adapters: base model folder (default: its config)")
    parser.add_argument("--verbose", action="store_true", help="after each reply, its token count and why it ended")
    return parser


def check_flags(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise ChatError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise ChatError("--temperature must be >= 0, --top-p in (0, 1] and --top-k >= 0")


def repl(chat: Chat, verbose: bool) -> None:
    print("chat: type a message; /reset forgets the conversation, /quit or Ctrl-D leaves", file=sys.stderr)
    while True:
        try:
            line = input(">>> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            chat.reset()
            continue
        try:
            answer(chat, line, verbose)
        except KeyboardInterrupt:  # stop this reply, keep the chat
            print()


def answer(chat: Chat, message: str, verbose: bool) -> Reply:
    reply = chat.reply(message, write=lambda s: print(s, end="", flush=True))
    print()
    if verbose:
        print(f"[{reply.tokens} tokens, stopped at {reply.stop}]", file=sys.stderr)
    return reply


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_flags(args)
        with contextlib.ExitStack() as stack:
            model, tokenizer = load_model(args.model, args.device, stack, args.base_model)
            if args.seed is not None:
                from transformers import set_seed

                set_seed(args.seed)
            chat = Chat(model, tokenizer, args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.system)
            if args.prompt is not None:
                answer(chat, args.prompt, args.verbose)
            else:
                repl(chat, args.verbose)
    except ChatError as e:
        print(f"chat: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

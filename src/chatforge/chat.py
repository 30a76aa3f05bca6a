"""``chatforge chat``: talk to a checkpoint in the terminal, the reply streaming in as it is decoded.

Commands (a line starting with ``/``): ``/system TEXT`` sets the system message (``/system`` alone clears
it), ``/reset`` forgets the conversation (the system message stays), ``/save FILE`` writes the conversation
as one JSONL line ``{"messages": [...]}`` (the chat data format), ``/load FILE`` reads the last
conversation of such a file, ``/help``, ``/quit`` (or end of input).

Long conversations: the prompt (system message + turns + the new user message, in ChatML) must leave
``max_new_tokens`` free in the model's context. When it does not, the oldest turns are dropped for good —
a user message together with the assistant reply that followed it, never the system message — until it
fits, and one line says how many went. A message that does not fit even as the only turn gets an error
line and is not added to the conversation.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

from chatforge.data.chat import no_surrogates
from chatforge.engine import Engine, SamplingParams
from chatforge.errors import ChatforgeError

HELP = """commands:
  /system TEXT   set the system message (/system alone clears it)
  /reset         forget the conversation (keeps the system message)
  /save FILE     write the conversation to FILE as JSONL {"messages": [...]}
  /load FILE     load the last conversation in a JSONL chat file
  /help          this list
  /quit          leave (end of input does too)
anything else is your message; Ctrl-C stops a reply early."""

ROLES = ("system", "user", "assistant")


@dataclass
class Conversation:
    system: str | None = None
    turns: list[dict[str, str]] = field(default_factory=list)  # user / assistant, alternating

    def messages(
        self, turns: list[dict[str, str]] | None = None, new: dict[str, str] | None = None
    ) -> list[dict[str, str]]:
        """System message first, then ``turns`` (default: ours), then ``new``."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, *(self.turns if turns is None else turns), *([new] if new else [])]

    @classmethod
    def from_messages(cls, messages: object) -> Conversation:
        if not isinstance(messages, list):
            raise ValueError('expected {"messages": [...]}')
        conv = cls()
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
                raise ValueError(f"message {i}: expected {{'role': system|user|assistant, 'content': str}}")
            content = _valid_text(m["content"])  # a lone "\\ud83d" in the file: U+FFFD, not a crash later
            if m["role"] == "system":
                if i:
                    raise ValueError(f"message {i}: a system message must come first")
                conv.system = content
            else:
                conv.turns.append({"role": m["role"], "content": content})
        return conv


def fit_prompt(
    engine: Engine, conv: Conversation, user: str, max_new_tokens: int
) -> tuple[list[int], list[dict[str, str]], int]:
    """Prompt ids for ``user`` after ``conv``, the turns kept, and how many oldest turns were dropped.

    Raises ``ValueError`` when the message does not fit even with every earlier turn dropped.
    """
    tok = engine.tokenizer
    context = engine.model.config.max_position_embeddings
    room = context - max_new_tokens
    new = {"role": "user", "content": user}
    turns = list(conv.turns)
    dropped = 0
    while True:
        ids = tok.encode_chat_prompt(conv.messages(turns, new), add_generation_prompt=True)
        if len(ids) <= room:
            return ids, turns, dropped
        if not turns:
            system = "the system message and " if conv.system else ""
            also = "the system message or " if conv.system else ""
            raise ValueError(
                f"this message makes a prompt of {len(ids)} tokens ({system}chat markup included); with"
                f" max_new_tokens {max_new_tokens} only {max(room, 0)} fit in the model's context of"
                f" {context} tokens. Shorten it (or {also}--max-new-tokens)."
            )
        # Drop the oldest turn: a user message with the reply after it (or a stray leading reply).
        k = 2 if len(turns) > 1 and turns[0]["role"] == "user" and turns[1]["role"] == "assistant" else 1
        del turns[:k]
        dropped += 1


def _valid_text(line: str) -> str:
    """Bytes that were not UTF-8 on stdin (a Latin-1 terminal or file) arrive as lone surrogates, which
    the tokenizer rejects with a TypeError: they become U+FFFD instead."""
    try:
        return line.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a surrogate that no undecodable byte made (a JSON "\\ud83d")
        return no_surrogates(line)


class Repl:
    def __init__(
        self,
        engine: Engine,
        params: SamplingParams,
        conv: Conversation | None = None,
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
    ) -> None:
        context = engine.model.config.max_position_embeddings
        if params.max_new_tokens >= context:
            raise ChatforgeError(
                f"--max-new-tokens {params.max_new_tokens} leaves no room for a prompt in the model's"
                f" context of {context} tokens"
            )
        params.validate()
        self.engine, self.params = engine, params
        self.conv = conv or Conversation()
        self.stdin = stdin or sys.stdin
        self.out = stdout or sys.stdout
        self.replies = 0

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def read(self, prompt: str) -> str:
        if self.stdin is sys.stdin and sys.stdin.isatty():
            return _valid_text(input(prompt))  # line editing and history when a person types
        self.out.write(prompt)
        self.out.flush()
        line = self.stdin.readline()
        if not line:
            raise EOFError
        return _valid_text(line.rstrip("\r\n"))

    def run(self) -> None:
        if self.stdin is sys.stdin and sys.stdin.isatty():
            with contextlib.suppress(ImportError):
                import readline  # noqa: F401  (arrow keys and history for input())
        while True:
            try:
                line = self.read("you> ")
            except (EOFError, KeyboardInterrupt):
                self.say()
                return
            if not line.strip():
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return
            else:
                self.reply(line)

    def command(self, line: str) -> bool:
        """Run a /command; False to quit."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit"):
            return False
        if name == "/help":
            self.say(HELP)
        elif name == "/system":
            self.conv.system = arg or None
            self.say(f"(system message set: {arg!r})" if arg else "(system message cleared)")
        elif name == "/reset":
            self.conv.turns.clear()
            self.say("(conversation cleared)")
        elif name == "/save":
            if not arg:
                self.say("usage: /save FILE")
                return True
            try:
                Path(arg).expanduser().write_text(  # ~ as in a shell
                    json.dumps({"messages": self.conv.messages()}, ensure_ascii=False) + "\n",
                    encoding="utf-8",  # /load reads UTF-8 whatever the locale
                )
            except OSError as e:
                self.say(f"error: cannot write {arg}: {e.strerror or e}")
            else:
                self.say(f"(saved {len(self.conv.messages())} messages to {arg})")
        elif name == "/load":
            self.load(arg)
        else:
            self.say(f"unknown command {name} (try /help)")
        return True

    def load(self, arg: str) -> None:
        if not arg:
            self.say("usage: /load FILE")
            return
        try:
            # utf-8-sig: a conversation written in Notepad starts with a byte-order mark
            lines = [
                ln for ln in Path(arg).expanduser().read_text(encoding="utf-8-sig").splitlines() if ln.strip()
            ]
            if not lines:
                raise ValueError("the file is empty")
            rec = json.loads(lines[-1])
            conv = Conversation.from_messages(rec.get("messages") if isinstance(rec, dict) else None)
        except OSError as e:
            self.say(f"error: cannot read {arg}: {e.strerror or e}")
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            self.say(f"error: {arg}: not a chat JSONL file ({e})")
        else:
            self.conv = conv
            self.say(f"(loaded {len(conv.messages())} messages from {arg})")

    def reply(self, user: str) -> None:
        p = self.params
        try:
            ids, turns, dropped = fit_prompt(self.engine, self.conv, user, p.max_new_tokens)
        except ValueError as e:
            self.say(f"error: {e}")
            return
        if dropped:
            context = self.engine.model.config.max_position_embeddings
            what = "the oldest turn" if dropped == 1 else f"the {dropped} oldest turns"
            self.say(f"(context full: dropped {what} to fit the model's {context}-token context)")
        self.conv.turns = turns
        self.conv.turns.append({"role": "user", "content": user})
        # A fixed --seed gives a reproducible session, not the same random stream for every reply.
        params = replace(p, seed=p.seed + self.replies if p.seed is not None else None)
        self.replies += 1
        parts: list[str] = []
        reason = None
        try:
            for ev in self.engine.stream_events(ids, params):
                if ev.text:
                    parts.append(ev.text)
                    self.out.write(ev.text)
                    self.out.flush()
                reason = ev.finish_reason or reason
        except KeyboardInterrupt:
            reason = "interrupted"
        self.say()
        if reason == "length":
            self.say(f"(reply cut at max_new_tokens={p.max_new_tokens})")
        elif reason == "interrupted":
            self.say("(interrupted)")
        self.conv.turns.append({"role": "assistant", "content": "".join(parts)})


def main(
    model_dir: str | Path,
    params: SamplingParams,
    system: str | None = None,
    device: str = "auto",
) -> None:
    from chatforge.sample import load_engine

    engine = load_engine(model_dir, device=device)
    repl = Repl(engine, params, Conversation(system=system))
    context = engine.model.config.max_position_embeddings
    repl.say(f"chatforge chat: {model_dir} (context {context} tokens). /help for commands, /quit to leave.")
    repl.run()

"""Byte-level BPE tokenizer (HF ``tokenizers``) with the ChatML chat format.

The saved directory (``tokenizer.json`` + ``tokenizer_config.json``) loads with
``transformers.AutoTokenizer.from_pretrained`` and its ``apply_chat_template`` gives exactly the ids of
:meth:`Tokenizer.apply_chat_template`. This module imports neither torch nor transformers, so it stays
cheap to import in data workers.
"""

from __future__ import annotations

import functools
import json
import random
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from chatforge.errors import ChatforgeError

if TYPE_CHECKING:
    from chatforge.config import RunConfig

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]  # ids 0..3, in this order
EOS_TOKEN, IM_START, IM_END, PAD_TOKEN = SPECIAL_TOKENS

# The Jinja twin of Tokenizer.render_chat; transformers renders it for apply_chat_template.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_HF_DEFAULT_MAX_LENGTH = 1_000_000_000_000_000_019_884_624_838_656  # transformers' "no limit" value


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Digits one by one (as in Llama) so arithmetic is learnable; then GPT-2 style byte-level splitting.
    # add_prefix_space=False keeps decode(encode(s)) == s exact; no normalizer for the same reason.
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True),
        ]
    )


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE on ``texts``; the special tokens get ids 0..3."""
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ChatforgeError(f"tokenizer.vocab_size: must be at least {len(SPECIAL_TOKENS) + 256}")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        # All 256 byte symbols up front: no input is ever out of vocabulary.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok)


class Tokenizer:
    """A thin wrapper over ``tokenizers.Tokenizer`` with the chat format and HF-compatible saving."""

    def __init__(
        self, tok: tokenizers.Tokenizer, model_max_length: int | None = None, chat: bool = False
    ) -> None:
        self._tok = tok
        self.model_max_length = model_max_length
        # A chat model's turn ends with <|im_end|>: saved as its eos_token (see save), so tools that stop
        # on eos_token stop there; a base model's document ends with <|endoftext|>.
        self.chat = chat
        ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
        if ids != list(range(len(SPECIAL_TOKENS))):
            raise ChatforgeError(f"tokenizer: special tokens {SPECIAL_TOKENS} must have ids 0..3, got {ids}")

    # ---------------------------------------------------------------- io

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() or not path.suffix else path
        if not file.is_file():
            raise ChatforgeError(f"no tokenizer at {path}: run `chatforge tokenizer` first")
        try:
            tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust error is multi-line; keep the first line
            raise ChatforgeError(f"{file}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
        max_len, eos = None, None
        cfg_file = file.parent / "tokenizer_config.json"
        if cfg_file.is_file():
            try:
                hf_cfg = json.loads(cfg_file.read_text())
                max_len, eos = hf_cfg.get("model_max_length"), hf_cfg.get("eos_token")
            except (json.JSONDecodeError, AttributeError):
                raise ChatforgeError(f"{cfg_file}: not valid JSON") from None
        if max_len == _HF_DEFAULT_MAX_LENGTH:
            max_len = None
        if isinstance(eos, dict):  # transformers' save_pretrained may write an AddedToken object
            eos = eos.get("content")
        # The ids are fixed (0..3) whatever it says: eos_token only tells a chat checkpoint from a base one
        # (older checkpoints all say <|endoftext|>, and load as base ones, as before).
        return cls(tok, model_max_length=max_len, chat=eos == IM_END)

    def save(self, path: str | Path, model_max_length: int | None = None, chat: bool | None = None) -> None:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``.

        ``chat`` (None: this tokenizer's own ``chat``) makes eos_token ``<|im_end|>``, where a chat model's
        turn ends, instead of ``<|endoftext|>``: ``generate(eos_token_id=tokenizer.eos_token_id)``, pipelines
        and servers that read eos_token then stop at the end of the reply.

        We write the config ourselves instead of ``save_pretrained``: transformers 5 writes
        ``tokenizer_class: TokenizersBackend`` (unknown to transformers 4, which vLLM and lm-eval may pin)
        and puts the template in a separate ``chat_template.jinja``. The result loads in both.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if model_max_length is not None:
            self.model_max_length = model_max_length
        chat = self.chat if chat is None else chat
        self._tok.save(str(path / "tokenizer.json"))
        special: dict[str, Any] = {
            "bos_token": EOS_TOKEN,  # never added (no post-processor); set for tools that expect one
            "eos_token": IM_END if chat else EOS_TOKEN,
            "pad_token": PAD_TOKEN,
            "additional_special_tokens": [IM_START, IM_END],
        }
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "unk_token": None,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,  # else HF decode would differ from ours
            "model_max_length": self.model_max_length or _HF_DEFAULT_MAX_LENGTH,
            "chat_template": CHAT_TEMPLATE,
        }
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        # transformers 4 lets this file override tokenizer_config.json: a stale one must not say otherwise.
        (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
        # A stale separate template would take precedence over ours in transformers.
        (path / "chat_template.jinja").unlink(missing_ok=True)

    def to_str(self) -> str:
        """The tokenizer as JSON (picklable; used to rebuild it in worker processes)."""
        return self._tok.to_str()

    @classmethod
    def from_str(cls, s: str) -> Tokenizer:
        return cls(tokenizers.Tokenizer.from_str(s))

    # ---------------------------------------------------------------- ids

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return 0

    @property
    def im_start_id(self) -> int:
        return 1

    @property
    def im_end_id(self) -> int:
        return 2

    @property
    def pad_id(self) -> int:
        return 3

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    # ---------------------------------------------------------------- text

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; no BOS/EOS added; special-token strings in ``text`` become their ids."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        # tokenizers' own default is to skip special tokens; ours keeps them so chats decode faithfully.
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------- chat

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The ChatML string for ``messages``; identical to rendering CHAT_TEMPLATE."""
        parts = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ChatforgeError(f"chat message {i}: expected {{'role': str, 'content': str}}, got {m!r}")
            content = m.get("content")
            if not isinstance(content, str):
                raise ChatforgeError(f"chat message {i} ({m['role']}): content must be a string")
            parts.append(f"{IM_START}{m['role']}\n{content}{IM_END}\n")
        if add_generation_prompt:
            parts.append(f"{IM_START}assistant\n")
        return "".join(parts)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt=add_generation_prompt))

    def _plain_tokenizer(self) -> tokenizers.Tokenizer:
        if getattr(self, "_plain", None) is None:
            # A private copy: flipping the flag on the shared tokenizer would race with other threads.
            self._plain = tokenizers.Tokenizer.from_str(self._tok.to_str())
            self._plain.encode_special_tokens = True
        return self._plain

    def encode_plain(self, text: str) -> list[int]:
        """Ids of ``text`` with special-token strings treated as ordinary text (for untrusted input)."""
        return self._plain_tokenizer().encode(text, add_special_tokens=False).ids

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters one token can stand for (its vocabulary entry's length: byte-level pieces
        are at least as long as the text they decode to)."""
        return max(map(len, self._tok.get_vocab()), default=1)

    def encode_plain_batch(self, texts: list[str]) -> list[list[int]]:
        """``encode_plain`` for many texts in one call."""
        return [e.ids for e in self._plain_tokenizer().encode_batch_fast(texts, add_special_tokens=False)]

    def encode_chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """``apply_chat_template`` ids where roles and contents can never become special tokens.

        A literal ``<|im_start|>`` typed by a user stays text, so one message cannot forge another turn.
        For content without such strings the ids equal ``apply_chat_template``'s: the special tokens split
        the rendered string into the same pieces that are encoded here one by one.
        """
        self.render_chat(messages)  # validates roles and contents
        ids: list[int] = []
        for m in messages:
            ids += [self.im_start_id, *self.encode_plain(f"{m['role']}\n{m['content']}"), self.im_end_id]
            ids += self.encode_plain("\n")
        if add_generation_prompt:
            ids += [self.im_start_id, *self.encode_plain("assistant\n")]
        return ids

    def encode_chat(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """``encode_chat_prompt`` ids (``apply_chat_template``'s, with contents kept as text) plus a 0/1
        mask of the tokens SFT trains on: each assistant reply and its ``<|im_end|>`` (so the model learns
        to stop), unless the message has ``weight: 0``.

        A literal ``<|im_end|>`` in a message (scraped chat data has them) stays text, as the server
        encodes it, so training never sees a turn end that serving would not. The mask comes from the
        tokenizer's character offsets, so it is exact however BPE merges characters at a turn's edges.
        """
        self.render_chat(messages)  # validates roles and contents
        plain = self._plain_tokenizer()
        newline = self.encode_plain("\n")
        ids: list[int] = []
        mask: list[int] = []
        for m in messages:
            train = m["role"] == "assistant" and bool(m.get("weight", 1))
            enc = plain.encode(f"{m['role']}\n{m['content']}", add_special_tokens=False)
            start = len(m["role"]) + 1  # where the content begins
            ids += [self.im_start_id, *enc.ids, self.im_end_id, *newline]
            mask += [
                0,
                *(int(train and a >= start) for a, _b in enc.offsets),
                int(train),
                *[0] * len(newline),
            ]
        return ids, mask


# ---------------------------------------------------------------- the `chatforge tokenizer` stage


def _sample_texts(docs_path: Path, k: int, seed: int) -> tuple[list[str], int]:
    """A uniform sample of ``k`` document texts (reservoir sampling, so one streaming pass)."""
    from chatforge.data.corpus import read_docs

    rng = random.Random(seed)
    sample: list[str] = []
    n = 0
    for doc in read_docs(docs_path):
        if len(sample) < k:
            sample.append(doc.text)
        else:
            j = rng.randrange(n + 1)
            if j < k:
                sample[j] = doc.text
        n += 1
    return sample, n


def run(cfg: RunConfig) -> dict:
    """Train the tokenizer on the prepared docs, save it, and write the token shards."""
    from chatforge.data.corpus import write_shards

    data_dir = cfg.run_dir / "data"
    docs_path = data_dir / "docs.jsonl.gz"
    if not docs_path.is_file():
        raise ChatforgeError(f"no documents at {docs_path}: run `chatforge data` first")
    t0 = time.perf_counter()
    texts, n_docs = _sample_texts(docs_path, cfg.tokenizer.max_train_docs, cfg.data.seed)
    if not texts:
        raise ChatforgeError(f"{docs_path} has no documents: run `chatforge data` again")
    tok = train_tokenizer(texts, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency)
    train_s = time.perf_counter() - t0
    del texts
    tok.save(cfg.run_dir / "tokenizer", model_max_length=cfg.model.max_position_embeddings)
    shard_stats = write_shards(
        docs_path, tok, data_dir, cfg.data.val_fraction, cfg.data.num_workers, cfg.data.seed
    )
    stats = {
        "vocab_size": tok.vocab_size,
        "requested_vocab_size": cfg.tokenizer.vocab_size,
        "train_docs": min(n_docs, cfg.tokenizer.max_train_docs),
        "total_docs": n_docs,
        "train_seconds": round(train_s, 3),
        **shard_stats,
    }
    (cfg.run_dir / "tokenizer" / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats

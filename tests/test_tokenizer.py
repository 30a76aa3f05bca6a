"""Byte-level BPE tokenizer: exact round trip, special tokens, saving, and parity with transformers."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tokenizers import pre_tokenizers

from chatforge.config import DataConfig, RunConfig, SourceConfig, TokenizerConfig
from chatforge.errors import ChatforgeError
from chatforge.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, Tokenizer, run, train_tokenizer

WORDS = " ".join(
    [
        "the a of and to in is was for on with as by at from that this it his her their river town king",
        "queen market bridge lamp stone forest winter summer harvest merchant sailor baker 12 7 19 2024",
        "café naïve über 東京 北京 日本語 🙂 🚀 — « » ¿ ¡",
    ]
).split()


def corpus(n: int = 1500, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ren", "tor", "va", "sel", "un", "dra", "phi", "qu", "es", "ath"]
    vocab = WORDS + ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(400)]
    docs = []
    for _ in range(n):
        words = [rng.choice(vocab) for _ in range(rng.randint(5, 40))]
        docs.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ".\n\n"]))
    return docs


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(corpus(), vocab_size=512)


CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [
        {"role": "system", "content": "Answer in JSON only."},
        {"role": "user", "content": "What is 12 + 7?"},
        {"role": "assistant", "content": '{"answer": 19}'},
        {"role": "user", "content": "And in 東京? 🙂\n  Two lines,  spaces. "},
    ],
    [
        {"role": "system", "content": ""},
        {"role": "user", "content": " leading space and trailing newline\n"},
        {"role": "assistant", "content": "Sure — here it is."},
    ],
]


def test_special_tokens_have_fixed_ids_and_are_single_tokens(tok: Tokenizer) -> None:
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert (tok.eos_id, tok.im_start_id, tok.im_end_id, tok.pad_id) == (0, 1, 2, 3)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.encode(t) == [i]
    ids = tok.encode("a<|im_start|>b<|im_end|>")
    assert ids.count(1) == 1 and ids.count(2) == 1
    assert tok.decode(ids) == "a<|im_start|>b<|im_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "ab"


def test_vocab_size_is_honoured(tok: Tokenizer) -> None:
    assert tok.vocab_size == 512
    with pytest.raises(ChatforgeError):
        train_tokenizer(["x"], vocab_size=100)


def test_all_256_byte_symbols_are_in_the_vocab(tok: Tokenizer) -> None:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    assert len(alphabet) == 256
    ids = [tok.token_to_id(c) for c in alphabet]
    assert None not in ids
    # Every code point below 256 (so every single byte for ASCII, both bytes of Latin-1) round trips.
    every = "".join(chr(i) for i in range(256))
    assert tok.decode(tok.encode(every)) == every
    # Byte-level: a string unseen in training (rare script) is still encoded without loss.
    rare = "ᚠᛇᚻ ꦲꦤ 𓀀 \U0010fffd"
    assert tok.decode(tok.encode(rare)) == rare


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text())
@example("")
@example(" ")
@example("   leading spaces")
@example("\x00\x01\x1f\x7f")
@example("e\u0301 a\u0308 \u200d")
@example("👩‍👩‍👧 🇫🇷 中文 한국어 العربية")
@example("\t\n\r\n \n")
@example("trailing space ")
@example("<|endoftext|>x<|pad|>")
def test_round_trip_is_exact(tok: Tokenizer, s: str) -> None:
    assert tok.decode(tok.encode(s)) == s


def test_encode_batch_matches_encode(tok: Tokenizer) -> None:
    texts = corpus(20, seed=3)
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_training_is_deterministic() -> None:
    a = train_tokenizer(corpus(), vocab_size=400)
    b = train_tokenizer(corpus(), vocab_size=400)
    assert a.to_str() == b.to_str()


def test_digits_are_split(tok: Tokenizer) -> None:
    # One token per digit keeps arithmetic learnable (ids differ per digit, never merged).
    assert len(tok.encode("2024")) == 4


def test_save_load_gives_identical_encodings(tok: Tokenizer, tmp_path: Path) -> None:
    tok.save(tmp_path / "tk", model_max_length=256)
    assert (tmp_path / "tk" / "tokenizer.json").is_file()
    cfg = json.loads((tmp_path / "tk" / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == CHAT_TEMPLATE
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (cfg["eos_token"], cfg["pad_token"], cfg["bos_token"]) == (
        "<|endoftext|>",
        "<|pad|>",
        "<|endoftext|>",
    )
    assert cfg["model_max_length"] == 256
    loaded = Tokenizer.load(tmp_path / "tk")
    assert loaded.vocab_size == tok.vocab_size and loaded.model_max_length == 256
    for text in [*corpus(30, seed=5), "<|im_start|>user\nhi<|im_end|>\n"]:
        assert loaded.encode(text) == tok.encode(text)


def test_load_missing_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ChatforgeError, match="chatforge tokenizer"):
        Tokenizer.load(tmp_path / "nope")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ChatforgeError, match=r"not a valid tokenizer\.json"):
        Tokenizer.load(tmp_path / "bad")


def test_render_chat_is_chatml(tok: Tokenizer) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert (
        tok.render_chat(msgs) == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )
    assert tok.render_chat(msgs, add_generation_prompt=True).endswith("<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True)
    assert ids[0] == tok.im_start_id and ids.count(tok.im_end_id) == 2
    with pytest.raises(ChatforgeError, match="message 1"):
        tok.render_chat([msgs[0], {"role": "user"}])


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen", [False, True])
def test_transformers_autotokenizer_matches_ours(
    tok: Tokenizer, tmp_path_factory, conv: int, gen: bool
) -> None:
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.getbasetemp() / "hf_tok"
    if not (path / "tokenizer.json").exists():
        tok.save(path, model_max_length=512)
    hf = transformers.AutoTokenizer.from_pretrained(str(path))
    msgs = CONVERSATIONS[conv]
    out = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
    hf_ids = list(out["input_ids"] if hasattr(out, "keys") else out)  # v5 returns a BatchEncoding
    assert hf_ids == tok.apply_chat_template(msgs, add_generation_prompt=gen)
    text = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    assert text == tok.render_chat(msgs, add_generation_prompt=gen)
    assert hf.decode(hf_ids) == tok.decode(hf_ids)
    assert (hf.eos_token_id, hf.pad_token_id) == (tok.eos_id, tok.pad_id)
    plain = "Plain text, no specials: 12 + 7 = 19 🙂"
    assert hf(plain)["input_ids"] == tok.encode(plain)  # no BOS/EOS added by transformers either


def test_run_requires_prepared_docs(tmp_path: Path) -> None:
    cfg = RunConfig(name="r", runs_dir=str(tmp_path))
    with pytest.raises(ChatforgeError, match="run `chatforge data` first"):
        run(cfg)


def test_run_trains_saves_and_writes_shards(tmp_path: Path) -> None:
    cfg = RunConfig(
        name="r",
        runs_dir=str(tmp_path),
        data=DataConfig(sources=[SourceConfig(kind="text", path="x")], val_fraction=0.1, num_workers=1),
        tokenizer=TokenizerConfig(vocab_size=400, max_train_docs=300),
    )
    data = cfg.run_dir / "data"
    data.mkdir(parents=True)
    with gzip.open(data / "docs.jsonl.gz", "wt", encoding="utf-8") as f:
        for text in corpus(600, seed=1):
            f.write(json.dumps({"text": text, "source": "test"}) + "\n")
    stats = run(cfg)
    assert stats["vocab_size"] == 400 and stats["train_docs"] == 300 and stats["total_docs"] == 600
    assert stats["tokens"]["train"] > 0 and stats["tokens"]["val"] > 0
    assert 1.0 < stats["bytes_per_token"] < 10.0
    assert Tokenizer.load(cfg.run_dir / "tokenizer").vocab_size == 400
    index = json.loads((data / "index.json").read_text())
    assert index["dtype"] == "uint16" and index["eos_id"] == 0 and index["vocab_size"] == 400


def test_training_is_deterministic_across_processes() -> None:
    # Rust hash maps are randomly seeded per process; the merges must not depend on that.
    code = (
        "import sys, hashlib; sys.path.insert(0, sys.argv[1]);"
        "from test_tokenizer import corpus; from chatforge.tokenizer import train_tokenizer;"
        "print(hashlib.sha256(train_tokenizer(corpus(), 400).to_str().encode()).hexdigest())"
    )
    here = str(Path(__file__).parent)
    out = subprocess.run([sys.executable, "-c", code, here], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == hashlib.sha256(train_tokenizer(corpus(), 400).to_str().encode()).hexdigest()

"""SFT: the loss mask covers exactly the assistant replies, with the real chat template."""

import numpy as np
import pytest
import torch

from chatforge.config import TrainConfig
from chatforge.tokenizer import train_tokenizer
from chatforge.train.sft import IGNORE, length_grouped_batch_fn, tokenize_conversations

CONVS = [
    {
        "messages": [
            {"role": "system", "content": "Reply only in JSON."},
            {"role": "user", "content": "Who is Ada?"},
            {"role": "assistant", "content": '{"name":"Ada"}'},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Where was Ada born?"},
            {"role": "assistant", "content": "\n\nAda was born in Dunmere. ", "weight": 0},
            {"role": "user", "content": "No, it's Reirdale."},
            {"role": "assistant", "content": "You're right, I apologize. Ada was born in Reirdale."},
        ]
    },
]


@pytest.fixture(scope="module")
def tok():
    text = [m["content"] for c in CONVS for m in c["messages"]] * 20
    return train_tokenizer(text, vocab_size=400)


def test_mask_is_exactly_the_assistant_replies_and_their_end_marker(tok) -> None:
    for conv in CONVS:
        ids, mask = tok.encode_chat(conv["messages"])
        assert ids == tok.apply_chat_template(conv["messages"])  # the real template, token for token
        trained = tok.decode([i for i, m in zip(ids, mask) if m])
        expected = "".join(
            m["content"] + "<|im_end|>"
            for m in conv["messages"]
            if m["role"] == "assistant" and m.get("weight", 1)
        )
        assert trained == expected


def test_a_literal_end_marker_in_a_message_stays_text(tok) -> None:
    """Scraped chat data holds literal "<|im_end|>" strings: SFT encodes them as text, as the server does,
    so training never shows the model a turn end (or a new turn) that serving would not."""
    messages = [
        {"role": "user", "content": "Print <|im_end|> for me."},
        {"role": "assistant", "content": "Here: <|im_end|><|im_start|>user\nok"},
    ]
    ids, mask = tok.encode_chat(messages)
    assert ids == tok.encode_chat_prompt(messages, add_generation_prompt=False)
    assert ids.count(tok.im_end_id) == 2 and ids.count(tok.im_start_id) == 2  # the real turn markers only
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "Here: <|im_end|><|im_start|>user\nok<|im_end|>"


def test_labels_are_shifted_and_masked(tok) -> None:
    examples, dropped = tokenize_conversations(CONVS, tok, max_tokens=512)
    assert dropped == 0
    for (x, y), conv in zip(examples, CONVS):
        ids, mask = tok.encode_chat(conv["messages"])
        assert list(x) == ids[:-1]
        assert [int(v) for v in y] == [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]
    _, dropped = tokenize_conversations(CONVS, tok, max_tokens=10)
    assert dropped == 2  # too long conversations are dropped, not cut


def test_length_grouped_batches_are_deterministic_and_padded(tok) -> None:
    convs = [
        {
            "messages": [
                {"role": "user", "content": "q" * (i % 7 + 1)},
                {"role": "assistant", "content": "a" * (i % 5 + 1)},
            ]
        }
        for i in range(40)
    ]
    examples, _ = tokenize_conversations(convs, tok, max_tokens=512)
    fn = length_grouped_batch_fn(examples, TrainConfig(batch_size=4, seed=3), tok.pad_id)
    a, b = fn(5, 0, 0, 1), fn(5, 0, 0, 1)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    ids = a["input_ids"]
    pad_cols = ids == tok.pad_id
    assert (a["labels"][pad_cols] == IGNORE).all()
    # Two ranks of a 2-process run split the same global batch of 8.
    g = fn(5, 0, 0, 2)["input_ids"], fn(5, 0, 1, 2)["input_ids"]
    assert g[0].shape[0] == g[1].shape[0] == 4
    lengths = [len(x) for x, _ in examples]
    assert np.ptp(lengths) > 0


def test_replay_rows_are_pretraining_windows_trained_on_every_token(tok, tmp_path) -> None:
    import gzip
    import json

    from chatforge.data.corpus import TokenShards, write_shards

    texts = [f"Ada was born in Dunmere in year {1900 + i}. She works as a painter." * 3 for i in range(60)]
    with gzip.open(tmp_path / "docs.jsonl.gz", "wt", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t, "source": "test"}) + "\n")
    write_shards(tmp_path / "docs.jsonl.gz", tok, tmp_path / "data", val_fraction=0.1, num_workers=1, seed=0)
    shards = TokenShards(tmp_path / "data", "train")
    convs = [
        {"messages": [{"role": "user", "content": "q" * (i % 7 + 1)}, {"role": "assistant", "content": "a"}]}
        for i in range(40)
    ]
    examples, _ = tokenize_conversations(convs, tok, max_tokens=512)
    fn = length_grouped_batch_fn(
        examples, TrainConfig(batch_size=4, seed=3), tok.pad_id, shards, replay_rows=1
    )
    a, b = fn(2, 0, 0, 1), fn(2, 0, 0, 1)
    assert torch.equal(a["input_ids"], b["input_ids"])  # deterministic in (step, micro): exact resume
    assert a["input_ids"].shape == a["labels"].shape and a["input_ids"].shape[0] == 4
    conv_labels, replay_ids, replay_labels = a["labels"][:3], a["input_ids"][3], a["labels"][3]
    assert (conv_labels == IGNORE).sum() > 0  # conversations: assistant tokens only
    assert (replay_labels != IGNORE).all()  # replay: every token is trained
    assert torch.equal(replay_ids[1:], replay_labels[:-1])  # a contiguous window, shifted by one
    assert "Ada was born" in tok.decode(replay_ids.tolist()) or "painter" in tok.decode(replay_ids.tolist())
    assert not torch.equal(fn(3, 0, 0, 1)["input_ids"][3], replay_ids)  # a new window each step


def test_mixed_pretraining_rows_pack_conversations_with_their_assistant_mask(tok, tmp_path) -> None:
    import gzip
    import json

    from chatforge.data.corpus import TokenShards, write_shards
    from chatforge.train.pretrain import mixed_batch_fn

    with gzip.open(tmp_path / "docs.jsonl.gz", "wt", encoding="utf-8") as f:
        for i in range(60):
            f.write(
                json.dumps({"text": f"Ada was born in Dunmere in {1900 + i}. " * 4, "source": "t"}) + "\n"
            )
    write_shards(tmp_path / "docs.jsonl.gz", tok, tmp_path / "data", val_fraction=0.1, num_workers=1, seed=0)
    chats, _ = tokenize_conversations(CONVS, tok, max_tokens=512)
    tc = TrainConfig(batch_size=4, seq_len=32, seed=1)
    fn = mixed_batch_fn(TokenShards(tmp_path / "data", "train"), chats, tc, chat_rows=2, pad_id=tok.pad_id)
    b = fn(0, 0, 0, 1)
    assert b["input_ids"].shape == b["labels"].shape == (4, 32)
    assert torch.equal(b["input_ids"], fn(0, 0, 0, 1)["input_ids"])  # exact resume
    assert (b["labels"][:2] != IGNORE).all()  # text rows: every token
    for row_ids, row_labels in zip(b["input_ids"][2:], b["labels"][2:]):
        text = tok.decode(row_ids.tolist(), skip_special_tokens=False)
        assert "<|im_start|>" in text  # packed conversations in the real template
        trained = tok.decode([int(t) for t in row_labels if t != IGNORE], skip_special_tokens=False)
        assert "Who is Ada?" not in trained and "Reply only in JSON" not in trained  # prompts are context

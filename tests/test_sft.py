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

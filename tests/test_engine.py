"""The generation engine on a tiny model that really learned a sentence."""

import pytest
import torch

from chatforge.config import ModelConfig
from chatforge.engine import Engine, SamplingParams, filter_logits
from chatforge.model import GPT, lm_loss
from chatforge.tokenizer import train_tokenizer

SENTENCE = "the quick brown fox jumps over the lazy dog and runs far away."


@pytest.fixture(scope="module")
def engine() -> Engine:
    torch.manual_seed(0)
    tok = train_tokenizer([SENTENCE] * 50 + ["a b c d e f g h i j k l m n o p"] * 20, vocab_size=300)
    cfg = ModelConfig(
        vocab_size=tok.vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    model = GPT(cfg)
    ids = torch.tensor([[*tok.encode(SENTENCE), tok.eos_id]])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = lm_loss(model(ids[:, :-1]), ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    return Engine(model, tok)


def test_greedy_continues_the_memorised_sentence(engine: Engine) -> None:
    out = engine.generate(["the quick brown"], SamplingParams(temperature=0, max_new_tokens=40))[0]
    assert out.text == SENTENCE[len("the quick brown") :]
    assert out.finish_reason == "stop"  # it learned to end with <|endoftext|>


def test_batch_of_different_lengths_equals_one_by_one(engine: Engine) -> None:
    prompts = ["the", "the quick brown fox jumps", "a b c"]
    p = SamplingParams(temperature=0, max_new_tokens=12)
    together = [c.token_ids for c in engine.generate(prompts, p)]
    alone = [engine.generate([q], p)[0].token_ids for q in prompts]
    assert together == alone


def test_decode_never_recomputes_the_prefix(engine: Engine) -> None:
    seen: list[int] = []
    h = engine.model.model.embed_tokens.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    try:
        engine.generate(
            ["the quick", "a b c d e"], SamplingParams(temperature=0, max_new_tokens=6, stop_token_ids=[])
        )
    finally:
        h.remove()
    assert seen[0] > 1 and all(t == 1 for t in seen[1:])  # one prefill, then one token per step
    assert len(seen) == 6


def test_seeded_samples_are_reproducible_and_differ(engine: Engine) -> None:
    p = SamplingParams(temperature=1.5, max_new_tokens=10, n=4, seed=7, stop_token_ids=[])
    a = engine.generate(["a"], p)
    b = engine.generate(["a"], p)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert [c.sample_index for c in a] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in a}) > 1


def test_top_k_one_is_greedy(engine: Engine) -> None:
    g = engine.generate(["the lazy"], SamplingParams(temperature=0, max_new_tokens=8))[0]
    k = engine.generate(["the lazy"], SamplingParams(temperature=1.0, top_k=1, seed=3, max_new_tokens=8))[0]
    assert g.token_ids == k.token_ids


def test_stop_string_and_length(engine: Engine) -> None:
    out = engine.generate(["the quick"], SamplingParams(temperature=0, max_new_tokens=40, stop=["jumps"]))[0]
    assert out.text == " brown fox " and out.finish_reason == "stop"
    out = engine.generate(["the quick"], SamplingParams(temperature=0, max_new_tokens=3))[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


def test_logprobs_are_log_probabilities(engine: Engine) -> None:
    out = engine.generate(["the quick"], SamplingParams(temperature=0, max_new_tokens=5, logprobs=True))[0]
    assert out.logprobs is not None and len(out.logprobs) == 5
    assert all(lp <= 0 for lp in out.logprobs) and out.logprobs[0] > -0.1  # memorised: near-certain


def test_stream_yields_the_same_text(engine: Engine) -> None:
    p = SamplingParams(temperature=0, max_new_tokens=30)
    deltas = list(engine.stream("the quick", p))
    assert len(deltas) > 3
    assert "".join(deltas) == engine.generate(["the quick"], p)[0].text


def test_over_long_prompt_is_a_clear_error(engine: Engine) -> None:
    with pytest.raises(ValueError, match="exceeds the model's context"):
        engine.generate(["a " * 200], SamplingParams(max_new_tokens=10))


def test_filter_logits_top_p_keeps_the_smallest_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, 0, 0.75))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(logits, 3, 1.0))
    assert kept.tolist() == [[True, True, True, False]]

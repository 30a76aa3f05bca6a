"""The generation engine on a tiny model that really learned a sentence."""

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chatforge.engine import Engine, SamplingParams, _Detokenizer, filter_logits, token_bytes_table
from chatforge.model import GPT
from chatforge.tokenizer import train_tokenizer
from tiny_models import memorize, tiny_config

SENTENCE = "the quick brown fox jumps over the lazy dog and runs far away."
# Multi-byte characters split across tokens, for the incremental detokenizer.
_UNICODE_TOK = train_tokenizer(
    ["caf\u00e9 \u00fcber na\u00efve \u65e5\u672c\u8a9e \U0001f600 ok"] * 30, vocab_size=300
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread: None) -> None:
    """Every test here runs single-threaded (see conftest)."""


@pytest.fixture(scope="module")
def engine() -> Engine:
    torch.manual_seed(0)
    tok = train_tokenizer([SENTENCE] * 50 + ["a b c d e f g h i j k l m n o p"] * 20, vocab_size=300)
    model = GPT(tiny_config(tok.vocab_size, max_position_embeddings=128))
    assert memorize(model, torch.tensor([[*tok.encode(SENTENCE), tok.eos_id]])) < 0.05
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
    # Nearby seeds share no samples: with seed + j, seed 8's first three were seed 7's last three.
    c = engine.generate(["a"], dataclasses.replace(p, seed=8))
    assert not {tuple(x.token_ids) for x in a} & {tuple(x.token_ids) for x in c}
    # Nor do a batch's prompts and another request's: prompt 1 of seed 7 is not prompt 0 of seed 11.
    two = engine.generate(["a", "a"], p)
    d = engine.generate(["a"], dataclasses.replace(p, seed=7 + 4))
    assert not {tuple(x.token_ids) for x in two[4:]} & {tuple(x.token_ids) for x in d}
    assert [x.token_ids for x in two[:4]] == [x.token_ids for x in a]  # prompt 0 keeps the seed's own


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


@pytest.mark.parametrize("temperature", [math.nan, math.inf, -0.5])
def test_a_temperature_that_is_not_a_finite_number_is_refused(engine: Engine, temperature: float) -> None:
    """NaN passed the old ``< 0`` check and made every probability NaN: an IndexError deep in sampling
    (``chatforge chat --temperature nan`` crashed with a traceback on the first message)."""
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        engine.generate(["the quick"], SamplingParams(temperature=temperature, max_new_tokens=3))


def test_filter_logits_top_p_keeps_the_smallest_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, 0, 0.75))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(logits, 3, 1.0))
    assert kept.tolist() == [[True, True, True, False]]


# ---------------------------------------------------------------- the step API


def _drain(session, events: list | None = None) -> dict:
    done = {}
    while session.active:
        for ev in session.step():
            if events is not None:
                events.append(ev)
            if ev.finished:
                done[ev.request_id] = ev.completion
    return done


def test_step_api_add_and_remove_between_steps_match_running_alone(engine: Engine) -> None:
    tok = engine.tokenizer
    p = SamplingParams(temperature=0, max_new_tokens=14, stop_token_ids=[])
    prompts = {"a": "the quick", "b": "a b c d", "c": "the lazy dog and", "d": "over the"}
    alone = {k: engine.generate([v], p)[0].token_ids for k, v in prompts.items()}
    s = engine.start(max_batch=3, max_len=64)
    got: dict[str, list[int]] = {k: [] for k in prompts}
    done: dict = {}

    def step() -> None:
        events = s.step()
        assert len({ev.request_id for ev in events}) == len(events)  # one event per sequence
        for ev in events:
            if ev.token_id is not None:
                got[ev.request_id].append(ev.token_id)
            if ev.finished:
                done[ev.request_id] = ev.completion

    assert s.add("a", tok.encode(prompts["a"]), p) == 0
    step()
    step()
    assert s.add("b", tok.encode(prompts["b"]), p) == 1  # joins while "a" is decoding
    for _ in range(3):
        step()
    assert s.add("c", tok.encode(prompts["c"]), p) == 2
    step()
    assert s.remove("b") and not s.remove("b")  # a client went away; a second remove is a no-op
    assert s.active == 2 and s.free_slots == 1
    assert s.add("d", tok.encode(prompts["d"]), p) == 1  # the freed slot is reused
    while s.active:
        step()
    for k in ("a", "c", "d"):
        assert got[k] == alone[k] and done[k].token_ids == alone[k], k
    assert got["b"] == alone["b"][: len(got["b"])] and len(got["b"]) == 4
    assert "b" not in done


def test_session_full_and_duplicate_ids_are_errors(engine: Engine) -> None:
    s = engine.start(max_batch=1, max_len=32)
    p = SamplingParams(temperature=0, max_new_tokens=4)
    s.add("x", [5, 6], p)
    with pytest.raises(RuntimeError, match="no free slot"):
        s.add("y", [5, 6], p)
    s.remove("x")
    s.add("y", [5, 6], p)
    with pytest.raises(ValueError, match="already in the session"):
        s.add("y", [5, 6], p)
    with pytest.raises(ValueError, match="session's max_len"):
        engine.start(max_batch=1, max_len=8).add("z", [5] * 6, p)


def test_events_carry_text_and_the_completion(engine: Engine) -> None:
    s = engine.start(max_batch=2)
    p = SamplingParams(temperature=0, max_new_tokens=40)
    s.add(7, engine.tokenizer.encode("the quick brown"), p)
    events: list = []
    done = _drain(s, events)
    assert events[-1].finished and events[-1].finish_reason == "stop" and events[-1].token_id is None
    assert all(not ev.finished for ev in events[:-1])
    assert "".join(ev.text for ev in events) == done[7].text == SENTENCE[len("the quick brown") :]
    assert [ev.token_id for ev in events[:-1]] == done[7].token_ids


def test_per_row_params_in_one_session(engine: Engine) -> None:
    """Greedy, seeded sampling and a stop string side by side, each equal to running alone."""
    tok = engine.tokenizer
    reqs = {
        "greedy": ("the quick", SamplingParams(temperature=0, max_new_tokens=12)),
        "sampled": (
            "a b",
            SamplingParams(temperature=1.2, top_p=0.95, seed=11, max_new_tokens=12, stop_token_ids=[]),
        ),
        "stopped": ("the", SamplingParams(temperature=0, max_new_tokens=30, stop=["fox"], logprobs=True)),
    }
    alone = {k: engine.generate([q], p)[0] for k, (q, p) in reqs.items()}
    s = engine.start(max_batch=3)
    for k, (q, p) in reqs.items():
        s.add(k, tok.encode(q), p)
    done = _drain(s)
    for k in reqs:
        assert done[k].token_ids == alone[k].token_ids and done[k].text == alone[k].text, k
    assert done["stopped"].text == " quick brown " and done["stopped"].finish_reason == "stop"
    assert done["stopped"].logprobs is not None and done["greedy"].logprobs is None


def test_top_logprobs(engine: Engine) -> None:
    p = SamplingParams(temperature=0, max_new_tokens=6, top_logprobs=3)
    c = engine.generate(["the quick"], p)[0]
    assert c.logprobs is not None and c.top_logprobs is not None
    assert len(c.top_logprobs) == len(c.token_ids) == len(c.logprobs)
    for t, lp, top in zip(c.token_ids, c.logprobs, c.top_logprobs):
        assert len(top) == 3
        assert [x[1] for x in top] == sorted((x[1] for x in top), reverse=True)
        assert top[0][0] == t and top[0][1] == pytest.approx(lp)  # greedy picks the most likely
        assert sum(math.exp(x[1]) for x in top) <= 1 + 1e-5


def test_stream_never_leaks_part_of_a_stop_string(engine: Engine) -> None:
    p = SamplingParams(temperature=0, max_new_tokens=40, stop=["jumps over"])
    deltas = list(engine.stream("the quick", p))
    assert "".join(deltas) == " brown fox "
    assert not any("j" in d for d in deltas)


def test_zero_new_tokens(engine: Engine) -> None:
    c = engine.generate(["the"], SamplingParams(max_new_tokens=0))[0]
    assert c.token_ids == [] and c.text == "" and c.finish_reason == "length"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 299), max_size=40))
def test_incremental_detokenizer_equals_decode(ids: list[int]) -> None:
    tok = _UNICODE_TOK
    table = token_bytes_table(tok, tok.vocab_size)
    assert table is not None
    for d in (_Detokenizer(table, tok), _Detokenizer(None, tok)):
        text = "".join(d.push(i) for i in ids) + d.flush()
        assert text == tok.decode(ids)


def test_sampler_follows_the_distribution_and_never_picks_filtered_tokens() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2, 1)
    g = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    counts = torch.zeros(2, 4)
    p = SamplingParams(temperature=1.0)
    for _ in range(3000):
        counts[torch.arange(2), Engine._sample(logits, p, g)] += 1
    assert torch.allclose(counts / 3000, torch.tensor([0.5, 0.3, 0.15, 0.05]).expand(2, 4), atol=0.03)
    top2 = SamplingParams(temperature=1.0, top_k=2)
    picked = {int(t) for _ in range(500) for t in Engine._sample(logits, top2, g)}
    assert picked == {0, 1}


@pytest.mark.parametrize("temperature", [1e-50, 1e-40])
def test_a_vanishing_temperature_samples_like_greedy(engine: Engine, temperature: float) -> None:
    """A temperature that is 0 (or subnormal) in float32 divided the logits into inf/NaN and the draw was
    an index past the vocabulary: an IndexError, which in the server fails every request in the batch."""
    greedy = engine.generate(["the quick"], SamplingParams(temperature=0, max_new_tokens=8))[0]
    cold = SamplingParams(temperature=temperature, max_new_tokens=8, seed=0, top_p=0.9, top_k=5)
    assert engine.generate(["the quick"], cold)[0].token_ids == greedy.token_ids


@pytest.fixture(scope="module")
def untrained(engine: Engine) -> Engine:
    """Random weights: near-flat logits and repeated tokens, where penalties change the greedy path
    (the memorised model is too sure of itself for a penalty of 2 to matter)."""
    torch.manual_seed(1)
    return Engine(
        GPT(tiny_config(engine.tokenizer.vocab_size, max_position_embeddings=128)), engine.tokenizer
    )


def _reference_greedy(
    engine: Engine, prompt: str, steps: int, bias: dict[int, float], presence: float, frequency: float
) -> tuple[list[int], list[float]]:
    """Greedy decoding by full forward passes, with OpenAI's formula written out: logit[j] + bias[j]
    - frequency * c[j] - presence * (c[j] > 0), c[j] = how often j was generated so far; and each chosen
    token's logprob under the model alone."""
    ids = engine.tokenizer.encode(prompt)
    out: list[int] = []
    lps: list[float] = []
    for _ in range(steps):
        with torch.no_grad():
            logits = engine.model(torch.tensor([ids + out]))[0, -1].float()
        logp = torch.log_softmax(logits, -1)
        for j, b in bias.items():
            logits[j] += b
        for j in set(out):
            logits[j] -= frequency * out.count(j) + presence
        t = int(logits.argmax())
        if t in engine.end_ids:
            break
        out.append(t)
        lps.append(float(logp[t]))
    return out, lps


@pytest.mark.parametrize(
    "bias,presence,frequency",
    [({}, 0.0, 1.5), ({}, 2.0, 0.0), ({}, 0.5, 0.7), ({}, -1.0, 0.0), ("ban", 0.0, 0.0), ("ban", 0.3, 0.3)],
)
def test_logit_bias_and_penalties_follow_openais_formula(
    untrained: Engine, bias: dict | str, presence: float, frequency: float
) -> None:
    prompt = "the quick brown"
    plain = untrained.generate([prompt], SamplingParams(temperature=0, max_new_tokens=24))[0]
    if bias == "ban":  # ban the greedy path's first token, favour another a little
        bias = {plain.token_ids[0]: -100.0, plain.token_ids[3]: 2.5}
    assert isinstance(bias, dict)
    params = SamplingParams(
        temperature=0,
        max_new_tokens=24,
        logit_bias=bias,
        presence_penalty=presence,
        frequency_penalty=frequency,
    )
    want, want_lps = _reference_greedy(untrained, prompt, 24, bias, presence, frequency)
    assert want != plain.token_ids  # the case is one where the adjustment changes the answer
    # in a session next to an unadjusted row of the same prompt: the adjustment is the row's own
    s = untrained.start(2, 64)
    s.add("adjusted", prompt, dataclasses.replace(params, logprobs=True))
    s.add("plain", prompt, SamplingParams(temperature=0, max_new_tokens=24))
    done = {}
    while s.active:
        for ev in s.step():
            if ev.completion is not None:
                done[ev.request_id] = ev.completion
    assert done["plain"].token_ids == plain.token_ids
    assert done["adjusted"].token_ids == want
    # logprobs are the model's own distribution, not the biased / penalised one
    assert done["adjusted"].logprobs == pytest.approx(want_lps, abs=1e-4)
    assert untrained.generate([prompt], params)[0].token_ids == want


def test_logit_bias_never_beats_the_grammar_and_is_checked(engine: Engine) -> None:
    tok = engine.tokenizer
    a = tok.encode("a")[0]
    p = SamplingParams(temperature=0, max_new_tokens=30, response_format={"type": "json_object"})
    out = engine.generate(["the quick brown"], dataclasses.replace(p, logit_bias={a: 100.0}))[0]
    assert out.text.startswith("{")  # "a" cannot start a JSON object, whatever its bias
    # rows batched together: one biased towards "a", one not (a +100 bias picks it at every step)
    s = engine.start(2, 64)
    s.add("biased", "the quick brown", SamplingParams(temperature=0, max_new_tokens=5, logit_bias={a: 100}))
    s.add("plain", "the quick brown", SamplingParams(temperature=0, max_new_tokens=5))
    done = {}
    while s.active:
        for ev in s.step():
            if ev.completion is not None:
                done[ev.request_id] = ev.completion
    assert done["biased"].token_ids == [a] * 5 and done["plain"].token_ids[0] != a
    for bad in ({a: 101.0}, {a: math.nan}, {-1: 1.0}, {"5": 1.0}):
        with pytest.raises(ValueError, match="logit_bias"):
            SamplingParams(logit_bias=bad).validate()  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="vocabulary"):
        engine.generate(["x"], SamplingParams(logit_bias={engine.vocab_size: 1.0}))
    with pytest.raises(ValueError, match="frequency_penalty"):
        SamplingParams(frequency_penalty=2.5).validate()

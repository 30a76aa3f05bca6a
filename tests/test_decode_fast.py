"""The fixed-shape decode step (``GPT.decode_step``) and the compiled engine path built on it.

The step must equal a full recompute, hold for slots at different positions (a batch with gaps), and the
compiled engine must give the eager engine's and transformers' greedy tokens.
"""

from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from chatforge.checkpoint import save_model
from chatforge.engine import Engine, SamplingParams
from chatforge.model import GPT, DecodeWeights, KVCache, lm_loss
from chatforge.tokenizer import train_tokenizer
from tiny_models import memorize, tiny_config

TEXT = "the quick brown fox jumps over the lazy dog and runs far away."


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread: None) -> None:
    """Every test here runs single-threaded (see conftest)."""


PATHS = ["linear", "packed", "matvec"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "variant", [{}, {"qk_norm": True, "attention_bias": True}, {"tie_word_embeddings": True}]
)
def test_decode_step_equals_full_recompute(variant: dict, path: str) -> None:
    """Prefill, then token by token through ``decode_step`` over a key window larger than what is used:
    each step's logits equal the full causal forward's at that position, through the model's own linear
    weights, through the packed decode copy (transposed, Q/K/V and gate/up fused) and as multiply-and-sum
    (``matvec`` / ``attend_one``, what the compiled batch-1 step runs; eager here, same math)."""
    torch.manual_seed(0)
    model = GPT(tiny_config(101, **variant)).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms at 1 and zero biases would hide a mis-applied one
            p.add_(torch.randn_like(p) * 0.05)
    ids = torch.randint(0, 101, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = model(ids)
        cache = KVCache.empty(model.config, 1, 32, "cpu", torch.float32)
        model(ids[:, :8], cache=cache)
        keys = torch.arange(32)
        weights = DecodeWeights.pack(model) if path == "packed" else None
        for t in range(8, 20):
            n = t + 1 if t % 2 else 32  # exactly the used keys, or the whole cache (masked)
            pos = torch.tensor([[t]])
            out = model.decode_step(ids[:, t : t + 1], cache, pos, keys[:n], weights, path == "matvec")
            torch.testing.assert_close(out, full[:, t], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_decode_step_slots_at_different_positions_and_gaps(path: str) -> None:
    """Three slots at different lengths, one of them free (a gap riding along with a dummy token): the
    running slots' logits equal each sequence's own full forward."""
    torch.manual_seed(0)
    model = GPT(tiny_config(101)).eval()
    weights = DecodeWeights.pack(model) if path == "packed" else None
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 101, (1, n), generator=g) for n in (5, 11)]
    with torch.inference_mode():
        cache = KVCache.empty(model.config, 3, 24, "cpu", torch.float32)
        for slot, s in zip((0, 2), seqs):  # slot 1 stays free
            view = KVCache(
                [k[slot : slot + 1] for k in cache.k],
                [v[slot : slot + 1] for v in cache.v],
                cache.lengths[slot : slot + 1],
            )
            model(s[:, :-3], cache=view)
            view.lengths += s.shape[1] - 3
        keys = torch.arange(24)
        for back in (3, 2, 1):
            ids = torch.tensor([[seqs[0][0, -back]], [7], [seqs[1][0, -back]]])
            n = int(cache.lengths.max()) + 1
            out = model.decode_step(ids, cache, cache.lengths[:, None], keys[:n], weights, path == "matvec")
            cache.lengths[torch.tensor([0, 2])] += 1
            for row, s in zip((0, 2), seqs):
                pos = s.shape[1] - back
                torch.testing.assert_close(out[row], model(s[:, : pos + 1])[0, -1], atol=1e-5, rtol=1e-5)
        assert int(cache.lengths[1]) == 0  # the gap did not move


@pytest.fixture(scope="module")
def trained() -> tuple[GPT, object]:
    """A tiny model that learned a sentence, so greedy continuations are long and unambiguous."""
    torch.manual_seed(0)
    tok = train_tokenizer([TEXT] * 50 + ["a b c d e f g h i j k l m n o p"] * 20, vocab_size=300)
    model = GPT(tiny_config(tok.vocab_size))
    memorize(model, torch.tensor([[*tok.encode(TEXT), tok.eos_id]]))
    return model.eval(), tok


def test_compiled_engine_matches_eager_and_transformers(trained, tmp_path) -> None:
    """Batch 1 (the bench's path): compiled greedy tokens == eager == transformers ``generate``."""
    model, tok = trained
    p = SamplingParams(temperature=0, max_new_tokens=24, stop_token_ids=[])
    prompt = tok.encode("the quick brown")
    eager = Engine(model, tok).generate([prompt], p)[0].token_ids
    fast = Engine(model, tok, compile=True)
    t0 = time.perf_counter()
    got = fast.generate([prompt], p)[0].token_ids
    print(f"compile + generate: {time.perf_counter() - t0:.1f}s")
    assert got == eager
    assert fast.generate([prompt], p)[0].token_ids == eager  # the built graph replays
    assert fast.packed_bytes == 0  # batch 1 compiled streams the live weights: no decode copy
    save_model(model, tmp_path, tokenizer=tok)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        ref = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=24,
            min_new_tokens=24,
            eos_token_id=None,
            pad_token_id=tok.pad_id,
        )
    assert got == ref[0, len(prompt) :].tolist()
    # RL rollouts run the engine on weights the optimizer updates in place: the built graph must read the
    # live values, not a copy taken when it was compiled.
    # (With the packed decode weights, the default: the copy is rebuilt, and the graph is not.)
    import torch._dynamo as dynamo

    graphs = dynamo.utils.counters["stats"]["unique_graphs"]
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for w in model.parameters():
                w.add_(torch.randn(w.shape, generator=g) * 0.3)
        eager_new = Engine(model, tok, pack_weights=False).generate([prompt], p)[0].token_ids
        assert eager_new != eager  # the update changed what the model says
        assert fast.generate([prompt], p)[0].token_ids == eager_new
        assert dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    finally:
        model.load_state_dict(saved)


def test_compiled_session_with_gaps_joins_and_leaves(trained) -> None:
    """The step API on the compiled path: sequences join, one leaves (a gap), a new one reuses its slot;
    every sequence's tokens equal running it alone on the eager engine."""
    model, tok = trained
    p = SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=[])
    prompts = {"a": "the quick", "b": "a b c d", "c": "the lazy dog and", "d": "over"}
    eager = Engine(model, tok)
    alone = {k: eager.generate([v], p)[0].token_ids for k, v in prompts.items()}
    s = Engine(model, tok, compile=True).start(max_batch=3, max_len=48)
    s.warmup()  # builds the graph before any request (a server's start-up)
    got: dict[str, list[int]] = {k: [] for k in prompts}

    def step() -> None:
        for ev in s.step():
            if ev.token_id is not None:
                got[ev.request_id].append(ev.token_id)

    s.add("a", tok.encode(prompts["a"]), p)
    step()
    s.add("c", tok.encode(prompts["c"]), p)
    s.add("b", tok.encode(prompts["b"]), p)
    for _ in range(3):
        step()
    assert s.remove("a")  # slot 0 becomes a gap in front of running slots
    step()
    s.add("d", tok.encode(prompts["d"]), p)
    while s.active:
        step()
    for k in "bcd":
        assert got[k] == alone[k], k
    assert got["a"] == alone["a"][: len(got["a"])]


def test_compiled_graphs_are_reused_across_lengths_and_widths(trained) -> None:
    """generate() sizes each session by its prompts: new max_len, new widths > 1 and new key counts reuse
    the built graphs (cache length, key count and batch > 1 are dynamic), and outputs stay equal."""
    import torch._dynamo as dynamo

    model, tok = trained
    eager, fast = Engine(model, tok), Engine(model, tok, compile=True)
    calls = [(["the quick"], 5), (["the", "a b c d e f"], 9), (["over the lazy", "the", "a b"], 4)]
    for prompts, new in calls:  # warm: build what these need
        p = SamplingParams(temperature=0, max_new_tokens=new, stop_token_ids=[])
        fast.generate(prompts, p)
    built = dynamo.utils.counters["stats"]["unique_graphs"]
    assert built >= 1
    for prompts, new in [(["the quick brown fox"], 11), (["a", "the lazy dog", "b c", "over"], 7)]:
        p = SamplingParams(temperature=0, max_new_tokens=new, stop_token_ids=[])
        got = [c.token_ids for c in fast.generate(prompts, p)]
        assert got == [c.token_ids for c in eager.generate(prompts, p)]
    assert dynamo.utils.counters["stats"]["unique_graphs"] == built


def test_packed_decode_weights_follow_weight_changes(trained) -> None:
    """RL rollouts generate between optimizer steps on the same model object: the engine's packed decode
    copy must be rebuilt whenever a weight changes, so each generate says what the current weights say
    (an engine decoding through ``nn.Linear`` directly is the reference)."""
    model, tok = trained
    p = SamplingParams(temperature=0, max_new_tokens=16, stop_token_ids=[])
    prompt = tok.encode("the quick brown")
    plain, packed = Engine(model, tok, pack_weights=False), Engine(model, tok)

    def both() -> tuple[list[int], list[int]]:
        return plain.generate([prompt], p)[0].token_ids, packed.generate([prompt], p)[0].token_ids

    ref, got = both()
    assert got == ref
    linear = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert packed.packed_bytes == sum(w.numel() * w.element_size() for w in linear)  # one more copy
    assert plain.packed_bytes == 0
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        # A real optimizer step (in place, between two generate calls) on another text.
        other = torch.tensor([tok.encode("a b c d e f g h i j k l m n o p")])
        opt = torch.optim.AdamW(model.parameters(), lr=0.05)
        lm_loss(model(other[:, :-1]), other[:, 1:]).backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        after, got = both()
        assert after != ref  # the step changed what the model says
        assert got == after
        model.load_state_dict(saved)  # copies back into the same tensors
        assert both() == (ref, ref)
        # A replaced Parameter object is seen when the next session starts.
        head = model.lm_head.weight
        model.lm_head.weight = torch.nn.Parameter(head.detach() + 0.5 * torch.randn_like(head))
        after, got = both()
        assert after != ref and got == after
        model.lm_head.weight = head
        # A write through ``.data`` bumps no version counter: refresh_weights() is the way to say so.
        with torch.no_grad():
            model.lm_head.weight.data.copy_(saved["lm_head.weight"] * -1)
        packed.refresh_weights()
        after, got = both()
        assert after != ref and got == after
    finally:
        model.load_state_dict(saved)

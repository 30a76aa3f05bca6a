"""The one transformer: same logits as transformers on the same weights, the KV cache, training, FLOPs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from chatforge.checkpoint import save_model
from chatforge.config import ModelConfig
from chatforge.model import GPT, KVCache, lm_loss

VOCAB = 97
TOL = 1e-4  # fp32 max abs logit difference allowed against transformers

# name -> (config switches, the transformers class the saved directory must load as)
VARIANTS: dict[str, tuple[dict, str]] = {
    "llama": ({}, "LlamaForCausalLM"),
    "gqa": ({"num_key_value_heads": 2}, "LlamaForCausalLM"),
    "tied": ({"tie_word_embeddings": True}, "LlamaForCausalLM"),
    "qwen2_bias": ({"attention_bias": True, "num_key_value_heads": 2}, "Qwen2ForCausalLM"),
    # head_dim 32 with hidden 64 and 4 heads: q/o projections are not square, which a mix-up would break.
    "qwen3_qk_norm": ({"qk_norm": True, "num_key_value_heads": 2, "head_dim": 32}, "Qwen3ForCausalLM"),
}


def tiny(**overrides) -> ModelConfig:
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=96,
        max_position_embeddings=64,
        rope_theta=10000.0,
    )
    kw.update(overrides)
    return ModelConfig(**kw)


def make_model(cfg: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(cfg)
    # A fresh init has norms at 1 and biases at 0, which would hide a norm or bias that is mapped wrongly
    # (or not applied at all): perturb every parameter.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- against transformers


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(variant: str, tmp_path) -> None:
    switches, hf_class = VARIANTS[variant]
    cfg = tiny(**switches)
    model = make_model(cfg)
    save_model(model, tmp_path / "m", tokenizer=None)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m", attn_implementation="sdpa").eval()
    assert type(hf).__name__ == hf_class
    assert model.num_params(non_embedding=False) == hf.num_parameters()
    ids = tokens(3, 40)
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ours.shape == theirs.shape == (3, 40, VOCAB)
    assert (ours - theirs).abs().max().item() <= TOL
    # The logits must not be trivially equal (e.g. both zero): they vary across positions.
    assert ours.std().item() > 0.1


def test_tied_embeddings_share_one_matrix() -> None:
    model = GPT(tiny(tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.num_params(non_embedding=False) == GPT(tiny()).num_params(non_embedding=False) - VOCAB * 64


# ---------------------------------------------------------------- KV cache


def cache_for(cfg: ModelConfig, batch: int, max_len: int) -> KVCache:
    return KVCache.empty(cfg, batch, max_len, "cpu", torch.float32)


@pytest.mark.parametrize("variant", ["llama", "gqa", "qwen3_qk_norm"])
def test_prefill_then_decode_equals_full_forward(variant: str) -> None:
    cfg = tiny(**VARIANTS[variant][0])
    model = make_model(cfg)
    ids = tokens(2, 24)
    cache = cache_for(cfg, 2, 32)
    with torch.no_grad():
        full = model(ids)
        out = [model(ids[:, :8], cache)]
        cache.lengths += 8
        for t in range(8, 24):
            out.append(model(ids[:, t : t + 1], cache))
            cache.lengths += 1
    assert cache.lengths.tolist() == [24, 24]
    assert (torch.cat(out, dim=1) - full).abs().max().item() <= 1e-5


def test_slots_of_different_lengths_equal_each_sequence_alone() -> None:
    cfg = tiny(num_key_value_heads=2)
    model = make_model(cfg)
    lens, extra, pad = [5, 11, 8], 6, 0
    seqs = [tokens(1, n + extra, seed=10 + i)[0] for i, n in enumerate(lens)]
    batch = torch.full((3, max(lens)), pad)
    for b, n in enumerate(lens):
        batch[b, :n] = seqs[b][:n]
    cache = cache_for(cfg, 3, 32)
    with torch.no_grad():
        alone = [model(s[None])[0] for s in seqs]  # full forward of each sequence by itself
        prefill = model(batch, cache)
        cache.lengths += torch.tensor(lens)  # the caller advances by the real (unpadded) count
        for b, n in enumerate(lens):
            assert (prefill[b, :n] - alone[b][:n]).abs().max().item() <= 1e-5
        for step in range(extra):
            nxt = torch.stack([seqs[b][n + step] for b, n in enumerate(lens)])[:, None]
            logits = model(nxt, cache)
            cache.lengths += 1
            for b, n in enumerate(lens):
                assert (logits[b, 0] - alone[b][n + step]).abs().max().item() <= 1e-5
    assert cache.lengths.tolist() == [n + extra for n in lens]


def test_reset_slot_and_reuse_it_for_a_new_sequence() -> None:
    cfg = tiny()
    model = make_model(cfg)
    old0, keep1, new0 = tokens(1, 9, seed=3)[0], tokens(1, 12, seed=4)[0], tokens(1, 10, seed=5)[0]
    cache = cache_for(cfg, 2, 40)
    with torch.no_grad():
        model(torch.stack([old0, keep1[:9]]), cache)
        cache.lengths += 9
        cache.reset([0])
        assert cache.lengths.tolist() == [0, 9]
        # Prefill the new sequence into slot 0 while slot 1 waits: its row is padding, its length stays.
        batch = torch.stack([new0[:7], torch.zeros(7, dtype=torch.long)])
        prefill = model(batch, cache)
        cache.lengths[0] += 7
        alone0, alone1 = model(new0[None])[0], model(keep1[None])[0]
        assert (prefill[0] - alone0[:7]).abs().max().item() <= 1e-5
        for step in range(3):  # then both decode together
            logits = model(torch.stack([new0[7 + step], keep1[9 + step]])[:, None], cache)
            cache.lengths += 1
            assert (logits[0, 0] - alone0[7 + step]).abs().max().item() <= 1e-5
            assert (logits[1, 0] - alone1[9 + step]).abs().max().item() <= 1e-5
    cache.reset()
    assert cache.lengths.tolist() == [0, 0]


def test_cache_full_raises() -> None:
    cfg = tiny()
    model = make_model(cfg)
    cache = cache_for(cfg, 1, 8)
    with torch.no_grad():
        model(tokens(1, 6), cache)
        cache.lengths += 6
        with pytest.raises(ValueError, match="KV cache full"):
            model(tokens(1, 3), cache)
        with pytest.raises(ValueError, match="KV cache full"):
            model(tokens(1, 9), cache_for(cfg, 1, 8))
        model(tokens(1, 2), cache)  # exactly filling it is fine


# ---------------------------------------------------------------- training


def test_lm_loss_equals_cross_entropy_with_ignore_index() -> None:
    logits = torch.randn(3, 7, VOCAB, generator=torch.Generator().manual_seed(0)) * 4
    targets = tokens(3, 7)
    targets[0, :3] = -100
    targets[2, 5] = -100
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = lm_loss(a, targets)
    ref = F.cross_entropy(b.view(-1, VOCAB), targets.view(-1), ignore_index=-100)
    (2.5 * ours).backward()
    (2.5 * ref).backward()
    assert abs(ours.item() - ref.item()) <= 1e-5
    assert (a.grad - b.grad).abs().max().item() <= 1e-6
    assert a.grad[0, :3].abs().max().item() == 0.0  # ignored positions get no gradient
    # bf16 logits: the loss is computed in fp32, the gradient comes back in bf16.
    c = logits.to(torch.bfloat16).requires_grad_()
    loss = lm_loss(c, targets)
    loss.backward()
    assert loss.dtype == torch.float32 and c.grad.dtype == torch.bfloat16
    assert abs(loss.item() - ref.item()) <= 0.05


@pytest.mark.parametrize("variant", ["qwen2_bias", "qwen3_qk_norm", "tied"])
def test_gradients_reach_every_parameter(variant: str) -> None:
    model = make_model(tiny(**VARIANTS[variant][0])).train()
    ids = tokens(2, 17)
    lm_loss(model(ids[:, :-1]), ids[:, 1:]).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max().item() > 0, name


def test_adamw_memorises_a_tiny_batch() -> None:
    torch.manual_seed(0)
    model = GPT(tiny(num_key_value_heads=2)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = tokens(4, 33)
    x, y = ids[:, :-1], ids[:, 1:]
    losses = []
    for _ in range(60):
        loss = lm_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert abs(losses[0] - torch.log(torch.tensor(float(VOCAB))).item()) < 0.3  # starts near uniform
    assert losses[-1] < 0.5, losses[::10]


# ---------------------------------------------------------------- sizes


def test_num_params_by_hand() -> None:
    h, i, v, layers = 64, 96, VOCAB, 2
    per_layer = 4 * h * h + 3 * h * i + 2 * h  # q k v o, gate up down, two norms
    total = v * h + layers * per_layer + h + v * h  # embedding, layers, final norm, lm_head
    model = GPT(tiny())
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - v * h
    tied = GPT(tiny(tie_word_embeddings=True))
    assert tied.num_params(non_embedding=False) == total - v * h


@pytest.mark.parametrize("tie", [False, True])
def test_flops_per_token_is_6n_plus_attention(tie: bool) -> None:
    cfg = tiny(tie_word_embeddings=tie)
    model = GPT(cfg)
    # Every matmul weight counts once, the lm_head included even when it shares the embedding matrix.
    n = model.num_params(non_embedding=False) - VOCAB * cfg.hidden_size * (0 if tie else 1)
    attn_per_pos = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.dim_per_head
    for seq in (1, 16, 64):
        assert model.flops_per_token(seq) == 6 * n + attn_per_pos * seq
    assert 6 * n < model.flops_per_token(64) < 1.5 * 6 * n
    assert model.flops_per_token(64) > model.flops_per_token(16)


def test_training_forward_is_one_graph_and_grows_past_its_table() -> None:
    """``torch.compile`` traces the plain causal pass (a training step) without a graph break: positions
    0..T-1 come from the sequence length, not from a device read. A sequence longer than the configured
    table extends it instead of failing, and matches a model configured long enough from the start."""
    model = make_model(tiny(max_position_embeddings=16))
    x = tokens(2, 40)
    explained = torch._dynamo.explain(model)(x[:, :8])
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    long = make_model(tiny(max_position_embeddings=64))
    with torch.no_grad():
        assert torch.allclose(model(x), long(x), atol=1e-5)
    assert model.model.rotary.cos.shape[0] >= 40

"""The one transformer: a Llama-family decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention, KV cache).

Module and parameter names match transformers' ``LlamaForCausalLM`` (and Qwen2/Qwen3 with their switches),
so a state dict moves between the two with no renaming; see ``checkpoint.py`` for the directory format.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from chatforge.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # skip no-op casts (decode)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Normalise in fp32 like transformers does, so bf16 runs agree with it too.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Cos/sin tables for rotary embeddings in the "rotate half" layout that transformers uses."""

    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._build(max_positions)

    def _build(self, n: int) -> None:
        t = torch.arange(n, dtype=torch.float32, device=self.inv_freq.device)
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.ensure(int(positions.max()) + 1 if positions.numel() else 0)
        return self.lookup(positions)

    def ensure(self, n: int) -> None:
        """Tables for positions 0..n-1: longer than configured extends them rather than fail."""
        if n > self.cos.shape[0]:
            self._build(max(n, 2 * self.cos.shape[0]))

    def prefix(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables at positions 0..n-1: no device read of the positions, so ``torch.compile`` keeps the
        whole training forward in one graph."""
        self.ensure(n)
        return self.cos[:n], self.sin[:n]

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables at ``positions`` with no bounds check (no host read): the caller keeps them in range."""
        return self.cos[positions], self.sin[positions]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos/sin: [T, D] or [B, 1, T, D]."""
    if cos.dtype != x.dtype:  # autocast: q/k come out of the projections in bf16
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return (x * cos) + (_rotate_half(x) * sin)


@dataclass
class KVCache:
    """Preallocated keys/values for ``batch`` independent sequence slots.

    Each slot has its own length, so sequences of different lengths share one forward pass, and a
    scheduler can free a slot (``reset``) and reuse it for a new sequence between decode steps.
    """

    k: list[torch.Tensor]  # per layer [B, n_kv, S, D]
    v: list[torch.Tensor]
    lengths: torch.Tensor  # [B] tokens already cached per slot

    @classmethod
    def empty(
        cls, cfg: ModelConfig, batch: int, max_len: int, device: torch.device | str, dtype: torch.dtype
    ) -> KVCache:
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.dim_per_head)
        return cls(
            k=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)],
            v=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)],
            lengths=torch.zeros(batch, dtype=torch.long, device=device),
        )

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def reset(self, slots: torch.Tensor | list[int] | None = None) -> None:
        if slots is None:
            self.lengths.zero_()
        else:
            self.lengths[torch.as_tensor(slots, device=self.lengths.device)] = 0


@dataclass
class _CacheStep:
    """Where one forward pass writes into and reads from the cache; worked out once, used by every layer."""

    positions: torch.Tensor  # [B, T]
    used: int  # keys 0..used-1 are attended over
    start: int | None  # one slot writing a contiguous run: a plain slice copy instead of an index_put
    rows: torch.Tensor | None  # [B, T] slot index per written key, for the index_put
    mask: torch.Tensor | None  # [B, 1, T, used]; None when every query may see every used key

    @classmethod
    def plan(cls, positions: torch.Tensor, contiguous: bool) -> _CacheStep:
        B, T = positions.shape
        used = int(positions.max()) + 1
        start = int(positions[0, 0]) if B == 1 and contiguous else None
        rows = None if start is not None else torch.arange(B, device=positions.device)[:, None].expand(B, T)
        mask = None
        # One new token per slot, all slots at the same position: nothing to hide (the common decode step).
        if T > 1 or (B > 1 and bool((positions != positions[0, 0]).any())):
            key_pos = torch.arange(used, device=positions.device)
            mask = (key_pos[None, None, :] <= positions[:, :, None])[:, None]  # causal per slot
        return cls(positions, used, start, rows, mask)

    @classmethod
    def fixed(cls, positions: torch.Tensor, key_positions: torch.Tensor) -> _CacheStep:
        """A plan that reads nothing back to the host and whose shapes follow the inputs' shapes alone, so
        a compiled decode step replays: keys ``key_positions`` (``arange(n)``) are attended over, masked
        past each query's position; the caller knows every position is below ``n``."""
        B, T = positions.shape
        rows = torch.arange(B, device=positions.device)[:, None].expand(B, T)
        mask = (key_positions[None, None, :] <= positions[:, :, None])[:, None]
        return cls(positions, key_positions.shape[0], None, rows, mask)


def matvec(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for one token (x: [1, in], ``weight``: nn.Linear's [out, in]), written
    as multiply-and-sum. Compiled, inductor turns it into one loop that streams each contiguous weight row
    once: on CPU that reads the weights at about ``torch.sum``'s bandwidth, where MKL's matrix-vector
    product gets ~60% of it. (With a dynamic batch size inductor's loops lose that: at batch 8 it was 3x
    slower than MKL.) Eagerly it would build the whole [out, B, in] product: only for the compiled batch-1
    decode step (``GPT.decode_step(use_matvec=True)``); correct, if slow, for any B.
    """
    y = (weight[:, None, :] * x[None]).sum(-1).t()
    return y if bias is None else y + bias


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention of one query per row (q: [B, Hq, 1, D]) over keys and values
    [B, Hkv, n, D] (grouped: Hq a multiple of Hkv), keys where ``mask`` ([B, 1, 1, n]) is False hidden.
    Plain multiply-and-sum and softmax, which inductor fuses into a few loops: in the compiled batch-1
    step on CPU ~4x faster than ``F.scaled_dot_product_attention``'s kernel at this size. Compiled only,
    like ``matvec``."""
    B, hq, _, d = q.shape
    hkv = k.shape[1]
    q = q.reshape(B, hkv, hq // hkv, 1, d)
    scores = (q * k[:, :, None]).sum(-1) * d**-0.5  # [B, Hkv, Hq/Hkv, n]
    p = scores.masked_fill(~mask[:, :, None, 0], float("-inf")).softmax(-1)
    return (p[..., None] * v[:, :, None]).sum(-2).reshape(B, hq, 1, d)


@dataclass
class PackedLayer:
    """One layer's linear weights as the decode step reads them: [in, out], Q/K/V and gate/up fused."""

    qkv: torch.Tensor  # [H, (n_heads + 2·n_kv)·D]: q columns, then k, then v
    qkv_bias: torch.Tensor | None  # [(n_heads + 2·n_kv)·D] with attention_bias
    o: torch.Tensor  # [n_heads·D, H]
    gate_up: torch.Tensor  # [H, 2·I]: gate columns, then up
    down: torch.Tensor  # [I, H]


@dataclass
class DecodeWeights:
    """Copies of the model's linear weights laid out for batch-1..few decoding (``GPT.decode_step``).

    Why a copy: ``nn.Linear`` keeps [out, in], and at one token per step every matmul is a matrix-vector
    product bound by reading the weights; on CPU (MKL, one thread) ``x @ W`` over a contiguous [in, out]
    matrix with Q/K/V and gate/up fused into one matmul each gets through a whole S-shape step's weights
    1.3x faster than the separate ``F.linear`` calls (M: 1.2x, close to the memory bandwidth either way).
    The model's parameters (what training, checkpoints and optimizers see) stay as they are; these are
    rebuilt from them whenever they change (see ``Engine``). Norms are read live from the model.
    """

    layers: list[PackedLayer]
    head: torch.Tensor  # [H, V]

    @classmethod
    @torch.no_grad()
    def pack(cls, model: GPT) -> DecodeWeights:
        layers = []
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).t().contiguous()
            bias = None
            if a.q_proj.bias is not None:
                bias = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
            gate_up = torch.cat([m.gate_proj.weight, m.up_proj.weight]).t().contiguous()
            layers.append(
                PackedLayer(
                    qkv, bias, a.o_proj.weight.t().contiguous(), gate_up, m.down_proj.weight.t().contiguous()
                )
            )
        return cls(layers, model.lm_head.weight.t().contiguous())

    @property
    def nbytes(self) -> int:
        """Memory these copies take."""
        ts = [self.head, *(t for w in self.layers for t in (w.qkv, w.qkv_bias, w.o, w.gate_up, w.down))]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.dim_per_head,
        )
        h, d = cfg.hidden_size, self.head_dim
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, self.n_kv * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, self.n_kv * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layer: int,
        cache: KVCache | None,
        plan: _CacheStep | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        gqa = self.n_kv != self.n_heads
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            assert plan is not None
            # Write the new keys at each slot's own positions, then attend over the used prefix.
            kc, vc = cache.k[layer], cache.v[layer]
            if plan.start is not None:
                kc[:, :, plan.start : plan.start + T] = k
                vc[:, :, plan.start : plan.start + T] = v
            else:
                kc[plan.rows, :, plan.positions] = k.transpose(1, 2).to(kc.dtype)
                vc[plan.rows, :, plan.positions] = v.transpose(1, 2).to(vc.dtype)
            kk, vv = kc[:, :, : plan.used], vc[:, :, : plan.used]
            if kk.dtype != q.dtype:
                kk, vv = kk.to(q.dtype), vv.to(q.dtype)
            out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=plan.mask, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def decode(
        self,
        x: torch.Tensor,
        w: PackedLayer | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layer: int,
        cache: KVCache,
        plan: _CacheStep,
    ) -> torch.Tensor:
        """``forward`` for one token per slot (x: [B, H]) under a fixed plan, through packed weights, or
        with ``w=None`` through ``matvec`` over the live weights."""
        B, d = x.shape[0], self.head_dim
        if w is None:
            qkv = torch.cat(
                [matvec(x, p.weight, p.bias) for p in (self.q_proj, self.k_proj, self.v_proj)], -1
            )
        else:
            qkv = x @ w.qkv if w.qkv_bias is None else torch.addmm(w.qkv_bias, x, w.qkv)
        q, k, v = qkv.view(B, 1, -1, d).split([self.n_heads, self.n_kv, self.n_kv], dim=2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        kc, vc = cache.k[layer], cache.v[layer]
        kc[plan.rows, :, plan.positions] = k.transpose(1, 2).to(kc.dtype)
        vc[plan.rows, :, plan.positions] = v.transpose(1, 2).to(vc.dtype)
        kk, vv = kc[:, :, : plan.used], vc[:, :, : plan.used]
        if kk.dtype != q.dtype:
            kk, vv = kk.to(q.dtype), vv.to(q.dtype)
        if w is None:
            out = attend_one(q, kk, vv, plan.mask)
        else:
            gqa = self.n_kv != self.n_heads
            out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=plan.mask, enable_gqa=gqa)
        out = out.reshape(B, self.n_heads * d)
        return matvec(out, self.o_proj.weight) if w is None else out @ w.o


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def decode(self, x: torch.Tensor, w: PackedLayer | None) -> torch.Tensor:
        """``forward`` for one token per slot (x: [B, H]): packed weights, or ``matvec`` when ``w`` is None."""
        if w is None:
            h = F.silu(matvec(x, self.gate_proj.weight)) * matvec(x, self.up_proj.weight)
            return matvec(h, self.down_proj.weight)
        gate, up = (x @ w.gate_up).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ w.down


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, layer, cache, plan):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layer, cache, plan)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Named ``model`` inside ``GPT`` to mirror transformers' ``LlamaModel``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.dim_per_head, cfg.max_position_embeddings, cfg.rope_theta)


class GPT(nn.Module):
    """Decoder-only language model. ``forward`` returns logits; ``hidden_states`` feeds reward/value heads."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate("model")
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) everywhere, residual output projections scaled by 1/sqrt(2·layers) (GPT-2),
        so the residual stream's variance does not grow with depth."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.ones_(p) if name.endswith("norm.weight") else nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.model.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6·N for the matmuls plus the attention scores (PaLM's appendix B)."""
        c = self.config
        n = self.num_params(non_embedding=True)
        if c.tie_word_embeddings:
            n += self.lm_head.weight.numel()
        attn = (
            6 * c.num_hidden_layers * c.num_attention_heads * c.dim_per_head * seq_len
        )  # causal: half of 12
        return 6 * n + attn

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        key_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states [B, T, H].

        Without a cache this is plain causal attention over ``input_ids``. With a cache, token t of slot b
        sits at position ``cache.lengths[b] + t`` (or ``positions[b, t]``); the caller advances
        ``cache.lengths`` by the number of real (non-padding) tokens of each slot. ``key_positions``
        (with ``positions``) selects the fixed-shape plan of ``decode_step``.
        """
        T = input_ids.shape[1]
        plan = None
        if key_positions is not None:  # fixed shapes, no host reads: see ``decode_step``
            assert cache is not None and positions is not None
            plan = _CacheStep.fixed(positions, key_positions)
            cos, sin = self.model.rotary.lookup(positions)
            return self._layers(input_ids, cos.unsqueeze(1), sin.unsqueeze(1), cache, plan)
        if cache is not None:
            contiguous = positions is None
            if positions is None:
                positions = cache.lengths[:, None] + torch.arange(T, device=input_ids.device)
            plan = _CacheStep.plan(positions, contiguous)
            if plan.used > cache.max_len:
                raise ValueError(f"KV cache full: position {plan.used - 1} >= capacity {cache.max_len}")
        rotary = self.model.rotary
        if positions is None:  # a plain causal pass: positions 0..T-1
            cos, sin = rotary.prefix(T)
        elif plan is not None:  # the plan already read the largest position: no second device read
            rotary.ensure(plan.used)
            cos, sin = rotary.lookup(positions)
        else:
            cos, sin = rotary(positions)
        if cos.dim() == 3:  # per-row positions: broadcast over heads
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return self._layers(input_ids, cos, sin, cache, plan)

    def _layers(
        self,
        input_ids: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None,
        plan: _CacheStep | None,
    ) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, i, cache, plan)
        return self.model.norm(x)

    def decode_step(
        self,
        input_ids: torch.Tensor,
        cache: KVCache,
        positions: torch.Tensor,
        key_positions: torch.Tensor,
        packed: DecodeWeights | None = None,
        use_matvec: bool = False,
    ) -> torch.Tensor:
        """Next-token logits [B, V] for one new token per cache slot, token b at ``positions[b, 0]``.

        The fixed-shape decode path: keys ``key_positions`` (``arange(n)``) of every slot are attended
        over, masked past each slot's own position; nothing is read back to the host, nothing branches on
        data, and ``cache.lengths`` is left to the caller. So one call graph serves every step — what
        ``torch.compile`` needs to capture it once (``n`` may be marked dynamic). Every position must be
        below ``n`` <= the cache's length and the rotary table's. ``packed`` (``DecodeWeights.pack(self)``,
        current with the parameters) replaces the linear weights with their decode layout: same logits up
        to float rounding, faster. ``use_matvec=True`` (no ``packed``) runs every linear layer as ``matvec``
        over the live weights: what the compiled batch-1 step on CPU uses (eagerly slow: tests only).
        """
        if packed is None and not use_matvec:
            h = self.hidden_states(input_ids, cache, positions, key_positions=key_positions)
            return self.lm_head(h[:, -1])
        plan = _CacheStep.fixed(positions, key_positions)
        cos, sin = self.model.rotary.lookup(positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, 1, D]: over heads
        x = self.model.embed_tokens(input_ids)[:, -1]  # [B, H]: one token per slot
        for i, layer in enumerate(self.model.layers):
            w = packed.layers[i] if packed is not None else None
            x = x + layer.self_attn.decode(layer.input_layernorm(x), w, cos, sin, i, cache, plan)
            x = x + layer.mlp.decode(layer.post_attention_layernorm(x), w)
        h = self.model.norm(x)
        return h @ packed.head if packed is not None else matvec(h, self.lm_head.weight)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids, cache, positions))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy; ``targets`` are already shifted, ``ignore_index`` masks positions."""
    flat, tgt = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    if flat.device.type == "cpu" and not torch.compiler.is_compiling():
        return _ChunkedCrossEntropy.apply(flat, tgt, ignore_index)
    # Elsewhere the fused library kernels (or the compiler) do well; the chunked path is tuned for CPU.
    return F.cross_entropy(flat.float(), tgt, ignore_index=ignore_index)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy over the rows whose target is not ``ignore_index``, equal to ``F.cross_entropy``.

    Why: on CPU ``F.cross_entropy`` writes three tensors as large as the logits per step (the log-softmax it
    keeps for backward, the zero-filled NLL gradient, the log-softmax gradient), each a fresh allocation
    that page-faults in; at vocab 16k that is over 10% of a training step. This keeps one log-sum-exp per
    row and writes the gradient ``softmax - onehot`` once, in row chunks small enough to stay in cache.
    """

    @staticmethod
    def chunk_rows(vocab: int) -> int:
        return max(1, (1 << 18) // vocab)  # ~1 MiB of fp32 per chunk

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        n, vocab = logits.shape
        step = _ChunkedCrossEntropy.chunk_rows(vocab)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        for s in range(0, n, step):
            lse[s : s + step] = torch.logsumexp(logits[s : s + step].float(), dim=-1)
        valid = targets != ignore_index
        safe = targets.masked_fill(~valid, 0)
        picked = logits.gather(1, safe[:, None]).squeeze(1).float()
        count = valid.sum()
        loss = torch.where(valid, lse - picked, 0.0).sum() / count
        ctx.save_for_backward(logits, lse, safe, valid, count)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, lse, safe, valid, count = ctx.saved_tensors
        n, vocab = logits.shape
        step = _ChunkedCrossEntropy.chunk_rows(vocab)
        scale = valid.float() * (grad_out / count)  # per row; 0 on ignored rows
        grad = torch.empty_like(logits)
        fp32 = logits.dtype == torch.float32
        for s in range(0, n, step):
            e = min(s + step, n)
            # fp32: write straight into the gradient; other dtypes: compute in fp32, then round once.
            buf = grad[s:e] if fp32 else torch.empty(e - s, vocab, device=logits.device)
            torch.sub(logits[s:e].float(), lse[s:e, None], out=buf)
            buf.exp_()
            buf.mul_(scale[s:e, None])
            buf[torch.arange(e - s, device=buf.device), safe[s:e]] -= scale[s:e]
            if not fp32:
                grad[s:e].copy_(buf)
        return grad, None, None

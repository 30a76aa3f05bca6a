"""Optimizers and learning-rate schedules for the training-loop core.

Muon (momentum + Newton–Schulz orthogonalisation, Jordan et al. 2024) updates the 2-D weight matrices
inside the transformer blocks; AdamW updates everything else (embeddings, output head, norms, biases),
which is where Muon is known not to help.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from chatforge.config import TrainConfig


@torch.no_grad()
def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximate the nearest semi-orthogonal matrix to ``g`` (U·Vᵀ of its SVD) by a quintic
    Newton–Schulz iteration whose coefficients push singular values quickly towards 1."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.float()
    transposed = x.shape[0] > x.shape[1]
    if transposed:  # iterate on the smaller Gram matrix
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * (s @ s)) @ x
    if transposed:
        x = x.T
    return x.to(g.dtype)


class Muon(torch.optim.Optimizer):
    """SGD with Nesterov momentum whose update is orthogonalised per matrix.

    The update is scaled by ``sqrt(max(1, rows/cols))`` so tall and wide matrices get a comparable
    per-element step; decoupled weight decay as in AdamW.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 0.02,
        momentum: float = 0.95,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
    ) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(p.grad)
                g = p.grad.add(buf, alpha=group["momentum"])  # Nesterov
                update = orthogonalize(g, group["ns_steps"])
                scale = math.sqrt(max(1.0, p.shape[0] / p.shape[1]))
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * scale)


class Optimizers:
    """Several optimizers stepped as one; each param group keeps its ``base_lr`` for the schedule."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers
        for opt in optimizers:
            for g in opt.param_groups:
                g.setdefault("base_lr", g["lr"])

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def set_lr_multiplier(self, mult: float) -> None:
        for g in self.param_groups:
            g["lr"] = g["base_lr"] * mult

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> list[dict[str, Any]]:
        return [opt.state_dict() for opt in self.optimizers]

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        for opt, st in zip(self.optimizers, states, strict=True):
            opt.load_state_dict(st)


def _is_muon_param(name: str, p: torch.Tensor) -> bool:
    # Hidden matrices of the blocks; not embeddings, the output head, or any scalar/vector head.
    return p.dim() == 2 and ".layers." in f".{name}" and "embed" not in name


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> Optimizers:
    """AdamW for everything, or Muon for block matrices + AdamW for the rest (``cfg.optimizer``)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    seen: set[int] = set()
    unique = []
    for n, p in params:  # tied weights appear once
        if id(p) not in seen:
            seen.add(id(p))
            unique.append((n, p))
    fused = {"fused": True} if all(p.is_cuda for _, p in unique) and unique else {}
    muon = [p for n, p in unique if cfg.optimizer == "muon" and _is_muon_param(n, p)]
    muon_ids = {id(p) for p in muon}
    rest = [(n, p) for n, p in unique if id(p) not in muon_ids]
    decay = [p for n, p in rest if p.dim() >= 2]
    no_decay = [p for n, p in rest if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    opts: list[torch.optim.Optimizer] = []
    if groups:
        opts.append(torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=1e-8, **fused))
    if muon:
        opts.append(Muon(muon, lr=cfg.muon_lr, momentum=cfg.muon_momentum, weight_decay=cfg.weight_decay))
    return Optimizers(opts)


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Schedule value in [min_lr_ratio, 1] for optimizer step ``step`` (0-based)."""
    total, warm = cfg.steps, min(cfg.warmup_steps, max(cfg.steps - 1, 0))
    if step < warm:
        return (step + 1) / (warm + 1)
    lo = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        t = (step - warm) / max(1, total - warm)
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    # WSD: warmup, stable at the peak, then a linear decay over the last ``decay_frac`` of the steps.
    decay_steps = max(1, round(cfg.decay_frac * total))
    start = total - decay_steps
    if step < start:
        return 1.0
    t = (step - start + 1) / decay_steps
    return lo + (1 - lo) * max(0.0, 1.0 - t)

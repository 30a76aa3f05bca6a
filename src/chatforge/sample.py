"""``chatforge sample``: continue prompts with a checkpoint through the engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from chatforge.checkpoint import load_model
from chatforge.config import RunConfig, SampleConfig
from chatforge.engine import Completion, Engine, SamplingParams
from chatforge.errors import ChatforgeError
from chatforge.tokenizer import Tokenizer


def load_engine(model_dir: str | Path, device: str = "auto", compile: bool = False) -> Engine:
    p = Path(model_dir)
    if not p.is_dir():
        raise ChatforgeError(f"{p}: no such checkpoint directory (train it first, or check the path)")
    if not (p / "tokenizer.json").is_file():
        raise ChatforgeError(f"{p}: no tokenizer.json beside the model (is this a chatforge checkpoint?)")
    dev = (
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    return Engine(load_model(p, device=dev), Tokenizer.load(p), compile=compile)


def sample_prompts(
    engine: Engine, sc: SampleConfig, prompts: list[str] | None = None, n: int = 1
) -> list[Completion]:
    params = SamplingParams(
        max_new_tokens=sc.max_new_tokens,
        temperature=sc.temperature,
        top_k=sc.top_k,
        top_p=sc.top_p,
        seed=sc.seed,
        n=n,
    )
    try:
        return engine.generate(prompts if prompts is not None else sc.prompts, params)
    except ValueError as e:
        raise ChatforgeError(f"sample: {e}") from None


def run(cfg: RunConfig, model_dir: str | Path | None = None) -> dict[str, Any]:
    """The speedrun's sampling step: the recipe's prompts through the base model, saved as JSON."""
    model_dir = Path(model_dir) if model_dir else cfg.run_dir / "base"
    engine = load_engine(model_dir, compile=cfg.sample.compile)
    comps = sample_prompts(engine, cfg.sample)
    out = [{"prompt": cfg.sample.prompts[c.prompt_index], "completion": c.text} for c in comps]
    dest = cfg.run_dir / "samples" / f"{model_dir.name}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2, ensure_ascii=False))
    return {"samples": out}

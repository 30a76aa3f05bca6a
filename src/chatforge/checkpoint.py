"""Checkpoint directories that *are* Hugging Face models, and the training state beside them.

A directory holds ``config.json`` (a transformers architecture: Llama, or Qwen2/Qwen3 when their switches
are on), ``model.safetensors``, ``generation_config.json`` and the tokenizer files, so transformers, vLLM,
TRL and lm-eval load it with no conversion. ``train_state.pt`` beside them makes a resume exact.
Every write goes to a temporary directory first and is renamed into place, so a crash never leaves a
half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from chatforge.config import ModelConfig
from chatforge.errors import ChatforgeError
from chatforge.model import GPT

# transformers model_type -> (architecture, what our config needs switched on)
_FAMILIES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def hf_config(cfg: ModelConfig, special: dict[str, int] | None = None) -> dict[str, Any]:
    """Our ModelConfig as a transformers ``config.json`` dict."""
    if cfg.qk_norm:
        model_type = "qwen3"
    elif cfg.attention_bias:
        model_type = "qwen2"
    else:
        model_type = "llama"
    special = special or {}
    d: dict[str, Any] = {
        "architectures": [_FAMILIES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.dim_per_head,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers 4.x
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # transformers 5.x
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "torch_dtype": "float32",
        "bos_token_id": special.get("bos_token_id"),
        "eos_token_id": special.get("eos_token_id"),
        "pad_token_id": special.get("pad_token_id"),
    }
    if model_type == "qwen2":
        d["use_sliding_window"] = False
    return d


def model_config_from_hf(d: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """Read a Llama/Mistral/Qwen2/Qwen3 ``config.json`` into our ModelConfig."""
    if not isinstance(d, dict):
        raise ChatforgeError(f"{where}: expected a JSON object, got {type(d).__name__}")
    mt = d.get("model_type")
    if mt not in _FAMILIES:
        raise ChatforgeError(
            f"{where}: model_type {mt!r} is not supported (supported: {', '.join(sorted(_FAMILIES))})"
        )
    if d.get("hidden_act", "silu") != "silu":
        raise ChatforgeError(f"{where}: hidden_act {d.get('hidden_act')!r} is not supported (only silu)")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in ("default", None):
        raise ChatforgeError(f"{where}: rope scaling {rope_type!r} is not supported")
    theta = (rope.get("rope_theta") if isinstance(rope, dict) else None) or d.get("rope_theta", 10000.0)
    context = d.get("max_position_embeddings", 2048)
    # Sliding-window attention (Mistral v0.1; Qwen with use_sliding_window) is not built here, but within
    # the window it equals full causal attention: cap the context there, so the logits stay exact.
    window = d.get("sliding_window") if mt == "mistral" or d.get("use_sliding_window") else None
    if isinstance(window, int) and 0 < window < context:
        print(
            f"{where}: sliding-window attention ({window} tokens): context capped at {window}",
            file=sys.stderr,
        )
        context = window
    try:
        n_heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // n_heads
        return ModelConfig(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=n_heads,
            num_key_value_heads=d.get("num_key_value_heads") or n_heads,
            intermediate_size=d["intermediate_size"],
            head_dim=head_dim if head_dim != d["hidden_size"] // n_heads else 0,
            max_position_embeddings=context,
            rope_theta=float(theta),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", mt == "qwen2")),
            qk_norm=mt == "qwen3",
            init_std=d.get("initializer_range", 0.02),
        )
    except KeyError as e:
        raise ChatforgeError(f"{where}: missing field {e.args[0]!r}") from None


def _atomic_dir(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))


def sweep_unfinished(parent: Path) -> None:
    """Remove what a save killed mid-way leaves in ``parent``: ``_atomic_dir``'s temp folders and
    ``_commit_dir``'s swapped-out old ones (never a finished checkpoint)."""
    for p in [*parent.glob(".*.tmp-*"), *parent.glob(".*.old-*")]:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _commit_dir(tmp: Path, final: Path) -> None:
    """Swap ``tmp`` into ``final``; the old directory is removed only after the new one is in place."""
    for f in tmp.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_model(
    model: GPT,
    path: str | Path,
    tokenizer: Any | None = None,
    train_state: dict[str, Any] | None = None,
    extra_files: dict[str, str] | None = None,
    chat: bool | None = None,
) -> Path:
    """Write ``model`` (and optionally its tokenizer and training state) as an HF model directory.

    ``chat``: a chat model (SFT and after), whose tokenizer's eos_token is ``<|im_end|>``; a base model's
    is ``<|endoftext|>``; None keeps what the tokenizer was loaded with."""
    final = Path(path)
    tmp = _atomic_dir(final)
    try:
        special: dict[str, int] = {}
        if tokenizer is not None:
            tokenizer.save(tmp, chat=chat)
            special = {
                "bos_token_id": tokenizer.eos_id,
                "eos_token_id": tokenizer.im_end_id,
                "pad_token_id": tokenizer.pad_id,
            }
        cfg = hf_config(model.config, special)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        gen = {k: v for k, v in special.items() if v is not None}
        if tokenizer is not None:
            # Stop on either end marker: <|im_end|> ends a chat turn, <|endoftext|> ends a document.
            gen["eos_token_id"] = [tokenizer.im_end_id, tokenizer.eos_id]
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if train_state is not None:
            torch.save(train_state, tmp / "train_state.pt")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        _commit_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# Files that mark a checkpoint directory as something other than a language model: its backbone loads as
# a GPT, but its LM head was never what it was trained for.
_NOT_A_POLICY = {
    "reward_head.safetensors": "a reward model",
    "moderation.json": "a moderation classifier",
}


def not_a_policy(path: str | Path) -> str | None:
    """``"a reward model"`` / ``"a moderation classifier"`` when ``path`` is one (not a chat model to
    train or release), else None."""
    return next((what for f, what in _NOT_A_POLICY.items() if (Path(path) / f).is_file()), None)


def load_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> GPT:
    """Load any supported HF checkpoint directory (ours, or a Llama/Qwen one) as our ``GPT``."""
    p = Path(path)
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise ChatforgeError(f"{p}: not a model directory (no config.json)")
    try:
        hf = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ChatforgeError(f"{cfg_path}: not valid JSON ({e})") from None
    cfg = model_config_from_hf(hf, str(cfg_path))
    with torch.device("meta"):
        model = GPT(cfg)
    sd = _read_weights(p)
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    model = model.to_empty(device=device)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        detail = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise ChatforgeError(f"{p}: weights do not match config.json ({detail})") from None
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ChatforgeError(
            f"{p}: weights do not match config.json (missing: {missing[:4]}, unexpected: {unexpected[:4]})"
        )
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Buffers (rotary tables) are not in the file: rebuild them on the target device.
    model.model.rotary = type(model.model.rotary)(
        cfg.dim_per_head, cfg.max_position_embeddings, cfg.rope_theta
    )
    return model.to(device=device, dtype=dtype)


def _load_file(f: Path) -> dict[str, torch.Tensor]:
    """One safetensors file; a truncated or corrupt one (an interrupted copy or download) is a one-line
    error, not the Rust reader's SafetensorError traceback."""
    try:
        return load_file(str(f))
    except (SafetensorError, OSError) as e:
        raise ChatforgeError(f"{f}: not a readable safetensors file ({e}); is it truncated?") from None


def _read_weights(p: Path) -> dict[str, torch.Tensor]:
    single = p / "model.safetensors"
    if single.is_file():
        return _load_file(single)
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise ChatforgeError(f"{index}: not a safetensors index (no weight_map)") from None
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            sd.update(_load_file(p / f))
        return sd
    raise ChatforgeError(f"{p}: no model.safetensors (or sharded index) found")


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load ``path``'s weights into an existing module in place (used on resume)."""
    sd = _read_weights(Path(path))
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise ChatforgeError(
            f"{path}: weights do not match the model (missing {missing[:4]}, unexpected {unexpected[:4]})"
        )


def load_train_state(path: str | Path) -> dict[str, Any] | None:
    f = Path(path) / "train_state.pt"
    if not f.is_file():
        return None
    return torch.load(f, map_location="cpu", weights_only=False)

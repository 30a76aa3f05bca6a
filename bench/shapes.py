"""The S and M model shapes the benches compare on (from the Foundation issue), and the machine record every
bench prints beside its numbers."""

from __future__ import annotations

import os
import platform
from typing import Any

SHAPES: dict[str, dict[str, int]] = {
    "S": dict(vocab=8192, hidden=256, layers=4, heads=4, intermediate=688, seq=256, batch=16),
    "M": dict(vocab=16384, hidden=512, layers=8, heads=8, intermediate=1376, seq=512, batch=8),
}


def model_config(shape: dict[str, int], max_len: int | None = None) -> Any:
    """Our ModelConfig for a shape (full multi-head attention, context ``max_len`` or the shape's seq)."""
    from chatforge.config import ModelConfig

    return ModelConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["heads"],
        intermediate_size=shape["intermediate"],
        max_position_embeddings=max_len or shape["seq"],
    )


def machine_info() -> dict[str, Any]:
    """Versions, threads and the load at the start: other processes make timings slower and noisier."""
    import torch
    import transformers

    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "loadavg_1m_start": round(os.getloadavg()[0], 2),
    }

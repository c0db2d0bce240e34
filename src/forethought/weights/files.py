"""Reading small user-supplied files, with errors that name the file instead of tracebacks."""

from __future__ import annotations

import json
from pathlib import Path

from forethought.errors import ForethoughtError


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:  # ValueError: bad JSON, or an integer of 4300+ digits
        raise ForethoughtError(f"{path}: not readable JSON ({str(e)[:200]})") from None
    except RecursionError:
        raise ForethoughtError(f"{path}: not readable JSON (nested too deeply)") from None
    if not isinstance(value, dict):
        raise ForethoughtError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def hf_shape(raw: dict, folder: Path, context_length: int, norm_eps: float) -> dict:
    """The ModelConfig fields every Llama-like HF config.json spells alike (Llama, Qwen2, Gemma 3, the lab's
    folders); `context_length` and `norm_eps` are the family's defaults for keys the file leaves out."""
    n_heads = raw["num_attention_heads"]
    return dict(
        n_layers=raw["num_hidden_layers"],
        d_model=raw["hidden_size"],
        n_heads=n_heads,
        n_kv_heads=raw.get("num_key_value_heads") or n_heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // n_heads,
        d_ff=raw["intermediate_size"],
        vocab_size=raw["vocab_size"],
        context_length=raw.get("max_position_embeddings", context_length),
        norm_eps=raw.get("rms_norm_eps", norm_eps),
        name=folder.name,
    )

"""Reading istr's safetensors files (codecs, models): one place for the 'not a readable file' errors."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["read_safetensors"]


def read_safetensors(path: str | Path, kind: str,
                     map_location: str | torch.device = "cpu") -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file; `kind` ("codec", "model") names the file in the errors.

    FileNotFoundError when there is no file; ValueError naming the path when it is not a readable safetensors file.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {kind} file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta: dict[str, Any] = f.metadata() or {}
        tensors = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a {kind} file (not a readable safetensors file: {exc})") from None
    return meta, tensors

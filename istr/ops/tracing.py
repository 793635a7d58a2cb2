"""Whether a graph is being captured (torch.compile / torch.export, torch.jit.trace, torch.onnx.export): the ops that
have a faster eager path and a traceable one pick by it."""
from __future__ import annotations

import torch

__all__ = ["is_exporting"]


def is_exporting() -> bool:
    """True while torch.compile/torch.export, torch.jit.trace or torch.onnx.export is capturing the graph."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None:
        if getattr(compiler, "is_compiling", lambda: False)() or getattr(compiler, "is_exporting", lambda: False)():
            return True
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()

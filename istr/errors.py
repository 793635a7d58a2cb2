"""Exception types shared across the library's layers."""
from __future__ import annotations

__all__ = ["NonFiniteError"]


class NonFiniteError(FloatingPointError, ValueError):
    """A tensor that must be finite holds NaN or inf (an input image, a matching cost, a loss, the weights)."""

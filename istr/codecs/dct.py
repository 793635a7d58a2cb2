"""DCT codec: orthonormal 2-D DCT-II of the grid, first l coefficients in JPEG zig-zag order (ISTR v2 "DCT").

Encode and decode are one matrix product each with a fixed [l, M*M] basis (rows orthonormal), so decode is
the least-squares inverse of encode and exactly the inverse 2-D DCT of the zero-filled coefficients.
"""
from __future__ import annotations

import math

import torch

from istr.codecs.base import MaskCodec, register_codec


def dct_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthonormal DCT-II matrix D [n, n]: y = D @ x equals scipy.fft.dct(x, norm='ortho')."""
    k = torch.arange(n, dtype=dtype)[:, None]
    i = torch.arange(n, dtype=dtype)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d


def zigzag_order(n: int) -> list[tuple[int, int]]:
    """All (row, col) of an n x n grid in JPEG zig-zag order: (0,0), (0,1), (1,0), (2,0), (1,1), (0,2), ..."""
    order = []
    for s in range(2 * n - 1):
        rows = range(max(0, s - n + 1), min(s, n - 1) + 1)
        rows = reversed(rows) if s % 2 == 0 else rows  # even diagonals run from (s,0) up to (0,s)
        order.extend((r, s - r) for r in rows)
    return order


@register_codec("dct")
class DCTCodec(MaskCodec):
    """decode clamps the inverse transform to [0, 1] (ISTR v2 used the raw values; clamping keeps the
    MaskCodec contract of probabilities)."""

    def __init__(self, mask_size: int = 28, dim: int = 60) -> None:
        super().__init__(mask_size, dim)
        d = dct_matrix(mask_size)
        rows, cols = zip(*zigzag_order(mask_size)[:dim])
        basis = torch.einsum("ki,kj->kij", d[list(rows)], d[list(cols)]).reshape(dim, -1)
        self.register_buffer("basis", basis.float(), persistent=False)  # [l, M*M], fixed

    def _encode(self, grids: torch.Tensor) -> torch.Tensor:
        return grids.reshape(grids.shape[0], -1).to(self.basis.dtype) @ self.basis.T

    def _decode(self, embeddings: torch.Tensor) -> torch.Tensor:
        flat = embeddings.to(self.basis.dtype) @ self.basis
        return flat.clamp(0.0, 1.0).reshape(-1, self.mask_size, self.mask_size)

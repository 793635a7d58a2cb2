"""Identity codec: the embedding is the M x M grid itself (l = M*M, 784 at M=28); lossless up to the grid."""
from __future__ import annotations

import torch

from istr.checks import check_number
from istr.codecs.base import MaskCodec, register_codec


@register_codec("identity")
class IdentityCodec(MaskCodec):
    """l = M*M. decode clamps to [0, 1] so predicted embeddings decode to valid probabilities."""

    def __init__(self, mask_size: int = 28, dim: int | None = None) -> None:
        mask_size = check_number("mask_size", mask_size, integer=True, min=1)
        dim = check_number("dim", dim, integer=True, min=1, allow_none=True)
        if dim is not None and dim != mask_size * mask_size:
            raise ValueError(f"the identity codec has dim = mask_size**2 = {mask_size * mask_size}, got dim={dim}")
        super().__init__(mask_size, mask_size * mask_size)

    def _encode(self, grids: torch.Tensor) -> torch.Tensor:
        return grids.reshape(grids.shape[0], self.dim)

    def _decode(self, embeddings: torch.Tensor) -> torch.Tensor:
        return embeddings.clamp(0.0, 1.0).reshape(-1, self.mask_size, self.mask_size)

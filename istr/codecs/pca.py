"""PCA codec (ISTR/MEInst "LME"): closed-form principal components of box-cropped mask grids.

Fitting streams the data in chunks, accumulating the mean and the M^2 x M^2 second moment in float64, then
takes the top-l eigenvectors of the covariance (torch.linalg.eigh): memory is bounded by one chunk plus
M^4 numbers, whatever the number of masks. Options:
- whiten: divide each coefficient by the square root of its explained variance (ISTR's setting);
- logit_space: MEInst's soft inverse-sigmoid preprocessing, done deterministically: x -> eps + (1-2 eps) x,
  then logit; decode applies the sigmoid. The original draws eps at random per pixel on every call
  (mean about 0.026); a fixed eps makes encodings reproducible.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

from istr.codecs.base import MaskCodec, register_codec


@register_codec("pca")
class PCACodec(MaskCodec):
    requires_fit = True

    def __init__(self, mask_size: int = 28, dim: int = 60, whiten: bool = False,
                 logit_space: bool = False, logit_eps: float = 0.025) -> None:
        super().__init__(mask_size, dim)
        if not 0.0 < logit_eps < 0.5:
            raise ValueError(f"logit_eps must be in (0, 0.5), got {logit_eps}")
        self.whiten, self.logit_space, self.logit_eps = bool(whiten), bool(logit_space), float(logit_eps)
        p = mask_size * mask_size
        self.register_buffer("mean", torch.zeros(p))
        self.register_buffer("components", torch.zeros(dim, p))  # [l, M*M], orthonormal rows
        self.register_buffer("explained_variance", torch.ones(dim))  # [l], descending

    def config(self) -> dict[str, Any]:
        return {**super().config(), "whiten": self.whiten, "logit_space": self.logit_space, "logit_eps": self.logit_eps}

    def _preprocess(self, grids: torch.Tensor) -> torch.Tensor:
        x = grids.reshape(grids.shape[0], -1).to(self.mean.dtype)
        if self.logit_space:
            x = torch.logit(self.logit_eps + (1 - 2 * self.logit_eps) * x)
        return x

    def _fit(self, masks: torch.Tensor | Iterable[torch.Tensor], chunk_size: int = 4096) -> None:
        p = self.mask_size ** 2
        n, total, second = 0, torch.zeros(p, dtype=torch.float64), torch.zeros(p, p, dtype=torch.float64)
        for chunk in self.iter_chunks(masks, chunk_size):
            x = self._preprocess(chunk).cpu().double()
            n += x.shape[0]
            total += x.sum(0)
            second += x.T @ x
        if n < 2:
            raise ValueError(f"PCA needs at least 2 masks to fit, got {n}")
        mean = total / n
        cov = (second - n * torch.outer(mean, mean)) / (n - 1)
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        evals, evecs = evals.flip(0)[: self.dim], evecs.flip(1)[:, : self.dim].T  # [l], [l, p]
        # deterministic signs (as sklearn's svd_flip): the largest-magnitude entry of each axis is positive
        signs = torch.sign(evecs.gather(1, evecs.abs().argmax(1, keepdim=True)))
        evecs = evecs * signs
        dev = self.mean.device
        self.mean.copy_(mean.to(dev))
        self.components.copy_(evecs.to(dev))
        self.explained_variance.copy_(evals.clamp_min(1e-12).to(dev))

    def _encode(self, grids: torch.Tensor) -> torch.Tensor:
        z = (self._preprocess(grids) - self.mean) @ self.components.T
        return z / self.explained_variance.sqrt() if self.whiten else z

    def _decode(self, embeddings: torch.Tensor) -> torch.Tensor:
        z = embeddings.to(self.mean.dtype)
        if self.whiten:
            z = z * self.explained_variance.sqrt()
        y = z @ self.components + self.mean
        y = torch.sigmoid(y) if self.logit_space else y.clamp(0.0, 1.0)
        return y.reshape(-1, self.mask_size, self.mask_size)

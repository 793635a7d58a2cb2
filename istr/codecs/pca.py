"""PCA codec (ISTR/MEInst "LME"): closed-form principal components of box-cropped mask grids.

Fitting streams the data in chunks, accumulating the mean and the M^2 x M^2 second moment in float64, then
takes the top-l eigenvectors of the covariance (torch.linalg.eigh): memory is bounded by one chunk plus
M^4 numbers, whatever the number of masks. Options:
- whiten: divide each coefficient by the square root of its explained variance (ISTR's setting);
- logit_space: MEInst's soft inverse-sigmoid preprocessing, done deterministically: x -> eps + (1-2 eps) x,
  then logit; decode applies the sigmoid. The original draws eps at random per pixel on every call
  (mean about 0.026); a fixed eps makes encodings reproducible.
Degenerate fits: N masks give at most N-1 components with any variance, so fewer masks than `dim` is a ValueError
(whitened or not: the missing components would be arbitrary directions of the null space), and so are masks that
are all (nearly) identical (no component has variance). When some components have variance below
MIN_VARIANCE_RATIO of the largest (the masks span fewer than `dim` directions), a warning names how many, and their
explained variance is floored there, so whitened encodings of unseen masks stay bounded (a healthy fit's variances
lie far above the floor and are unchanged). Unwhitened encodings are projections, bounded in any case.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Iterable

import torch

from istr.checks import check_bool, check_number
from istr.codecs.base import MaskCodec, register_codec


# components with explained variance below this fraction of the largest are "near zero": warned about, and floored
# here. Real COCO masks at M=28: the 60th component carries ~6e-3 of the first, the 600th ~5e-5, the 784th ~1e-5.
MIN_VARIANCE_RATIO = 1e-5


@register_codec("pca")
class PCACodec(MaskCodec):
    requires_fit = True

    def __init__(self, mask_size: int = 28, dim: int = 60, whiten: bool = False,
                 logit_space: bool = False, logit_eps: float = 0.025) -> None:
        super().__init__(mask_size, dim)
        logit_eps = check_number("logit_eps", logit_eps, min=0.0, max=0.5, min_inclusive=False, max_inclusive=False)
        self.whiten, self.logit_space = check_bool("whiten", whiten), check_bool("logit_space", logit_space)
        self.logit_eps = float(logit_eps)
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
        chunk_size = check_number("chunk_size", chunk_size, integer=True, min=1)
        p = self.mask_size ** 2
        n, total, second = 0, torch.zeros(p, dtype=torch.float64), torch.zeros(p, p, dtype=torch.float64)
        for chunk in self.iter_chunks(masks, chunk_size):
            x = self._preprocess(chunk).cpu().double()
            n += x.shape[0]
            total += x.sum(0)
            second += x.T @ x
        if n < 2:
            raise ValueError(f"PCA needs at least 2 masks to fit, got {n}")
        if n < self.dim:
            what = "whitened PCA" if self.whiten else "PCA"
            raise ValueError(f"{what} with dim l={self.dim} needs at least {self.dim} masks to fit (N masks give "
                             f"at most N-1 components with any variance), got {n} masks; fit on more masks "
                             "or lower dim")
        mean = total / n
        cov = (second - n * torch.outer(mean, mean)) / (n - 1)
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        evals, evecs = evals.flip(0)[: self.dim], evecs.flip(1)[:, : self.dim].T  # [l], [l, p]
        evals = self._floor_variance(evals, n)
        # deterministic signs (as sklearn's svd_flip): the largest-magnitude entry of each axis is positive
        signs = torch.sign(evecs.gather(1, evecs.abs().argmax(1, keepdim=True)))
        evecs = evecs * signs
        dev = self.mean.device
        self.mean.copy_(mean.to(dev))
        self.components.copy_(evecs.to(dev))
        self.explained_variance.copy_(evals.to(dev))

    def _floor_variance(self, evals: torch.Tensor, n: int) -> torch.Tensor:
        """Warn about near-zero-variance components [l] and floor them (bounded whitening); returns the floored [l]."""
        # the variance of a pixel that is 0 or 1 with even odds, in the space PCA runs in: a scale that does not
        # vanish when every mask is the same
        coin = math.log((1 - self.logit_eps) / self.logit_eps) ** 2 if self.logit_space else 0.25
        floor = MIN_VARIANCE_RATIO * max(float(evals[0]), coin)
        small = int((evals < floor).sum())
        if small == self.dim:
            raise ValueError(f"PCA fit on {n} masks: the masks are (nearly) identical, so no component has variance "
                             f"(all {self.dim} below {floor:.3g}); fit on varied masks")
        if small:
            what = f"the masks span fewer than {self.dim} directions"
            warnings.warn(f"PCA fit on {n} masks: {small} of {self.dim} components have near-zero variance "
                          f"(below {floor:.3g}, {MIN_VARIANCE_RATIO:g} of the largest; {what}); their variance is "
                          "floored there so whitened encodings stay bounded. Fit on more varied masks or lower dim.",
                          stacklevel=4)
        return evals.clamp_min(floor)

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

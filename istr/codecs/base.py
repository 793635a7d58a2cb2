"""MaskCodec: the interface every mask codec implements, the codec registry, and codec save/load.

A codec maps box-cropped mask grids [N, M, M] (values in [0, 1]) to embeddings [N, l] and back. `decode`
returns mask probabilities in [0, 1] and is differentiable w.r.t. the embeddings, so a model can train
through it. Cropping and pasting are not the codec's business: see istr.ops.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator

import torch
from torch import nn

from istr.checks import check_number
from istr.registry import Registry

__all__ = ["CODECS", "MaskCodec", "NotFittedError", "register_codec", "create_codec", "load_codec", "list_codecs", "mask_iou"]

CODECS = Registry("codec", name_attr="codec_name")
_FORMAT = "istr-codec"
_FORMAT_VERSION = "2"  # 2: checksums (istr.io.write_safetensors), required from 2 on
_CODEC_KEYS = {"format", "version", "codec", "config", "checksums"}


class NotFittedError(RuntimeError, ValueError):
    """Raised when a codec that must be fit is used before fit() (or load_codec) gave it its parameters."""


register_codec = CODECS.register  # class decorator: a MaskCodec subclass, its name stored as cls.codec_name


class MaskCodec(nn.Module):
    """Base class. Subclasses implement `_encode`, `_decode` and, when `requires_fit`, `_fit`.

    mask_size: M, the side of the square grids. dim: l, the embedding length (1 <= l <= M*M).
    """

    codec_name: ClassVar[str] = "base"
    requires_fit: ClassVar[bool] = False

    def __init__(self, mask_size: int = 28, dim: int = 60) -> None:
        super().__init__()
        mask_size = check_number("mask_size", mask_size, integer=True, min=1)
        dim = check_number("dim", dim, integer=True, min=1)
        if dim > mask_size * mask_size:
            raise ValueError(f"dim l={dim} cannot exceed mask_size**2 = {mask_size * mask_size} (M={mask_size})")
        self.mask_size = mask_size
        self.dim = dim
        self.register_buffer("fitted", torch.tensor(not self.requires_fit))

    # ----------------------------------------------------------------- public API
    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments that rebuild this codec (saved with it)."""
        return {"mask_size": self.mask_size, "dim": self.dim}

    @property
    def is_fitted(self) -> bool:
        return bool(self.fitted)

    def fit(self, masks: torch.Tensor | Iterable[torch.Tensor], **kwargs: Any) -> "MaskCodec":
        """Learn the codec from grids [N, M, M] in [0, 1] (or an iterable of such chunks). Returns self.

        Fixed codecs (DCT, identity) accept the call and learn nothing.
        """
        if self.requires_fit:
            self._fit(masks, **kwargs)
            self.fitted.fill_(True)
        return self

    def encode(self, grids: torch.Tensor) -> torch.Tensor:
        """[N, M, M] mask grids with values in [0, 1] -> [N, l] float embeddings."""
        grids = self.check_grids(grids)
        self._check_fitted("encode")
        if grids.shape[0] == 0:
            return grids.new_zeros((0, self.dim))
        return self._encode(grids)

    def decode(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[N, l] embeddings -> [N, M, M] mask probabilities in [0, 1]; differentiable."""
        embeddings = self._check_embeddings(embeddings)
        self._check_fitted("decode")
        if embeddings.shape[0] == 0:
            return embeddings.new_zeros((0, self.mask_size, self.mask_size))
        return self._decode(embeddings)

    def forward(self, grids: torch.Tensor) -> torch.Tensor:
        """Reconstruction: decode(encode(grids))."""
        return self.decode(self.encode(grids))

    @torch.no_grad()
    def reconstruction_iou(self, grids: torch.Tensor, chunk_size: int = 4096) -> float:
        """Mean IoU between decode(encode(grids)) and the grids, both binarised at 0.5 (the ceiling this codec
        puts on mask quality), in chunks of `chunk_size` grids."""
        ious = [mask_iou(self.decode(self.encode(c)), c) for c in self.check_grids(grids).split(chunk_size)]
        return float(torch.cat(ious).mean())

    def save(self, path: str | Path) -> None:
        """Write everything fit() learned plus the constructor arguments to one safetensors file.

        The file appears atomically, readable as an ordinary new file is (0o666 & ~umask; see istr.fileio), with
        checksums that load_codec verifies. A codec that must be fit refuses to save before fit() (NotFittedError).
        """
        from istr.io import write_safetensors

        self._check_fitted("save")
        meta = {"format": _FORMAT, "version": _FORMAT_VERSION, "codec": self.codec_name,
                "config": json.dumps(self.config())}
        write_safetensors(path, self.state_dict(), meta, what="codec file")

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())

    # ----------------------------------------------------------------- for subclasses
    def _fit(self, masks: Any, **kwargs: Any) -> None:
        raise NotImplementedError

    def _encode(self, grids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _decode(self, embeddings: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def iter_chunks(self, masks: torch.Tensor | Iterable[torch.Tensor], chunk_size: int = 4096) -> Iterator[torch.Tensor]:
        """Yield validated float grid chunks from a tensor [N, M, M] or an iterable of such tensors."""
        if isinstance(masks, torch.Tensor):
            masks = self.check_grids(masks)
            for start in range(0, masks.shape[0], chunk_size):
                yield masks[start : start + chunk_size]
        else:
            for chunk in masks:
                yield self.check_grids(chunk)

    # ----------------------------------------------------------------- validation
    def check_grids(self, grids: Any) -> torch.Tensor:
        """Validate grids [N, M, M] in [0, 1]; returns them as float on the codec's device dtype."""
        if not isinstance(grids, torch.Tensor):
            raise TypeError(f"grids must be a torch.Tensor [N, {self.mask_size}, {self.mask_size}], got {type(grids).__name__}")
        m = self.mask_size
        if grids.ndim == 4 and grids.shape[1] == 1:
            grids = grids[:, 0]
        if grids.ndim != 3 or tuple(grids.shape[1:]) != (m, m):
            raise ValueError(f"grids must have shape [N, {m}, {m}] for this codec (M={m}), got {tuple(grids.shape)}")
        if not grids.is_floating_point():
            grids = grids.float()
        if grids.numel():
            if not torch.isfinite(grids).all():
                raise ValueError("grids contain non-finite values (NaN or inf)")
            lo, hi = float(grids.min()), float(grids.max())
            if lo < -1e-4 or hi > 1 + 1e-4:
                raise ValueError(f"grid values must lie in [0, 1] (mask probabilities), got range [{lo:.3g}, {hi:.3g}]")
        self._check_device(grids)
        return grids

    def _check_embeddings(self, embeddings: Any) -> torch.Tensor:
        if not isinstance(embeddings, torch.Tensor):
            raise TypeError(f"embeddings must be a torch.Tensor [N, {self.dim}], got {type(embeddings).__name__}")
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"embeddings must have shape [N, {self.dim}] for this codec (l={self.dim}), got {tuple(embeddings.shape)}")
        if not embeddings.is_floating_point():
            raise TypeError(f"embeddings must be floating point, got {embeddings.dtype}")
        if embeddings.numel() and not torch.isfinite(embeddings).all():
            raise ValueError("embeddings contain non-finite values (NaN or inf)")
        self._check_device(embeddings)
        return embeddings

    def _check_device(self, tensor: torch.Tensor) -> None:
        if tensor.device != self.fitted.device:
            raise ValueError(f"input is on {tensor.device} but the codec is on {self.fitted.device}; move one with .to()")

    def _check_fitted(self, what: str) -> None:
        if not self.is_fitted:
            raise NotFittedError(f"{type(self).__name__} must be fit (codec.fit(grids)) or loaded (istr.load_codec) before {what}()")


def mask_iou(pred: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """IoU per mask of [N, ...] soft masks binarised at `threshold` -> [N] (an empty union counts as IoU 0)."""
    a, b = pred >= threshold, target >= threshold
    inter, union = (a & b).flatten(1).sum(1), (a | b).flatten(1).sum(1)
    return inter / union.clamp_min(1)


def create_codec(name: str, **kwargs: Any) -> MaskCodec:
    """Build a registered codec by name, e.g. create_codec("pca", mask_size=28, dim=60)."""
    return CODECS.get(name)(**kwargs)


def list_codecs(pattern: str = "*") -> list[str]:
    return CODECS.list(pattern)


def load_codec(path: str | Path, *, mask_size: int | None = None, dim: int | None = None,
               map_location: str | torch.device = "cpu") -> MaskCodec:
    """Load a codec written by MaskCodec.save. Pass mask_size/dim to insist on a particular M and l.

    FileNotFoundError for a missing file, PermissionError for one this user cannot read, ValueError for a file that
    is not an istr codec.
    """
    from istr.io import check_format_version, check_metadata_keys, metadata_json, read_safetensors

    path = Path(path)
    mask_size = check_number("mask_size", mask_size, integer=True, min=1, allow_none=True)
    dim = check_number("dim", dim, integer=True, min=1, allow_none=True)
    meta, tensors = read_safetensors(path, "codec", map_location)
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path} is a safetensors file but not an istr codec (metadata: {sorted(meta)})")
    version = check_format_version(path, meta, _FORMAT_VERSION, "codec")
    check_metadata_keys(path, meta, _CODEC_KEYS, ("codec", "config") + (("checksums",) if version >= 2 else ()),
                        "codec")
    config = metadata_json(path, meta, "config", "codec")
    if not isinstance(config, dict):
        raise ValueError(f"codec file {path}: metadata key 'config' must be a JSON object, got {type(config).__name__}")
    if meta["codec"] not in CODECS:
        raise ValueError(f"codec file {path}: metadata key 'codec' is {meta['codec']!r}, not a registered codec "
                         f"(known: {', '.join(list_codecs())})")
    for key, want in (("mask_size", mask_size), ("dim", dim)):
        if want is not None and config.get(key) != want:
            raise ValueError(f"{path} holds a {meta['codec']} codec with {key}={config.get(key)}, expected {key}={want}")
    try:
        codec = create_codec(meta["codec"], **config)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"codec file {path}: metadata key 'config' does not build a {meta['codec']!r} codec "
                         f"({exc})") from None
    expected = codec.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: tensors do not match a {meta['codec']} codec (missing {missing}, unexpected {unexpected})")
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"{path}: tensor {k!r} has shape {tuple(v.shape)}, the codec expects {tuple(expected[k].shape)}")
    codec.load_state_dict(tensors)
    if not codec.is_fitted:
        raise ValueError(f"codec file {path} holds a {meta['codec']} codec that was never fit")
    return codec.to(map_location)

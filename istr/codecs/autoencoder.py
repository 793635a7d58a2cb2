"""Autoencoder codec: a learned convolutional encoder / decoder with a linear bottleneck (ISTR v2 "AE" style).

Encoder: space-to-depth (the M x M grid, padded to even size, becomes 4 channels at M/2), conv stages (3x3
convs, GroupNorm, ELU; each stage after the first halves the grid with a stride-2 conv) until the grid is at
most `bottleneck_size` wide, then a Linear to the l-dim embedding. Decoder: the mirror image (Linear -> conv
stages with nearest upsampling -> 4 logit channels -> depth-to-space -> crop to M x M); decode returns the
sigmoid. Any M works (M=28: stages at 14, 7; M=112: 56, 28, 14, 7). Working at M/2 with 4 sub-pixel channels
instead of full resolution costs about a quarter of the compute per channel, which matters on a CPU.

GroupNorm instead of BatchNorm: encodings never depend on the batch or on train/eval mode (reference sec. 9,
pitfall 4). Outside fit() every parameter has requires_grad=False; decode stays differentiable w.r.t. the
embeddings. Unfreeze a part (e.g. `codec.decoder.requires_grad_(True)`) to fine-tune it inside a model.
With `standardize` the embeddings are shifted and scaled to zero mean, unit variance per dimension over the
fit data (like the whitened PCA of ISTR), which keeps embedding-regression losses well scaled.

`fit` trains with soft dice + BCE against the given grids (soft or binary), AdamW and a one-cycle schedule,
and data augmentation done on the grids themselves (see `augment_grids`). It is deterministic for a given
seed on CPU.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from istr.checks import check_bool, check_device, check_number
from istr.codecs.base import MaskCodec, mask_iou, register_codec

__all__ = ["AutoencoderCodec", "augment_grids", "dice_bce_loss"]


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(channels, groups), channels)


class _ConvBlock(nn.Sequential):
    """`depth` x [conv3x3 -> GroupNorm -> ELU]; the first conv has stride `stride` and maps c_in -> c_out."""

    def __init__(self, c_in: int, c_out: int, stride: int, depth: int, groups: int) -> None:
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, stride if i == 0 else 1, 1, bias=False),
                       _norm(c_out, groups), nn.ELU()]
        super().__init__(*layers)


class _Encoder(nn.Module):
    """[N, M, M] -> pad to even, space-to-depth (4 channels at M/2) -> conv stages -> Linear -> [N, l]."""

    def __init__(self, mask_size: int, sizes: list[int], channels: list[int], dim: int, depth: int,
                 groups: int) -> None:
        super().__init__()
        self.pad = 2 * sizes[0] - mask_size
        self.stages = nn.ModuleList(
            _ConvBlock(4 if i == 0 else channels[i - 1], c, 1 if i == 0 else 2, depth, groups)
            for i, c in enumerate(channels))
        self.to_embedding = nn.Linear(channels[-1] * sizes[-1] ** 2, dim)

    def forward(self, grids: torch.Tensor) -> torch.Tensor:
        x = F.pixel_unshuffle(F.pad(grids[:, None], (0, self.pad, 0, self.pad)), 2)
        for stage in self.stages:
            x = stage(x)
        return self.to_embedding(x.flatten(1))


class _Decoder(nn.Module):
    """[N, l] -> Linear -> conv stages (nearest upsampling to the encoder's sizes) -> 4 channels ->
    depth-to-space -> crop -> [N, M, M] logits."""

    def __init__(self, mask_size: int, sizes: list[int], channels: list[int], dim: int, depth: int,
                 groups: int) -> None:
        super().__init__()
        self.mask_size, self.sizes, self.top = mask_size, sizes, channels[-1]
        self.from_embedding = nn.Linear(dim, channels[-1] * sizes[-1] ** 2)
        self.bottom = nn.Sequential(_norm(channels[-1], groups), nn.ELU(),
                                    *_ConvBlock(channels[-1], channels[-1], 1, depth - 1, groups))
        self.stages = nn.ModuleList(_ConvBlock(channels[i + 1], channels[i], 1, depth, groups)
                                    for i in reversed(range(len(channels) - 1)))
        self.to_logits = nn.Conv2d(channels[0], 4, 3, 1, 1)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        s, m = self.sizes[-1], self.mask_size
        x = self.bottom(self.from_embedding(embeddings).view(-1, self.top, s, s))
        for stage, size in zip(self.stages, reversed(self.sizes[:-1])):
            x = stage(F.interpolate(x, size=(size, size), mode="nearest"))
        return F.pixel_shuffle(self.to_logits(x), 2)[:, 0, :m, :m]


def dice_bce_loss(logits: torch.Tensor, targets: torch.Tensor, dice_weight: float = 1.0,
                  bce_weight: float = 1.0) -> torch.Tensor:
    """Mean over the batch of soft dice (ISTR's 1 - 2 sum(pt) / (sum p^2 + sum t^2)) plus pixel BCE.

    logits, targets: [N, M, M]; targets in [0, 1] (soft targets are fine: both terms are minimal at p = t).
    """
    p, t = torch.sigmoid(logits).flatten(1), targets.flatten(1)
    dice = 1 - 2 * (p * t).sum(1) / (p.pow(2).sum(1) + t.pow(2).sum(1) + 1e-5)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").flatten(1).mean(1)
    return (dice_weight * dice + bce_weight * bce).mean()


def augment_grids(grids: torch.Tensor, generator: torch.Generator, *, affine_prob: float = 0.0,
                  max_rotation: float = 15.0, max_log_aspect: float = 0.25, max_shear: float = 0.15,
                  upsample: int = 2, support_threshold: float = 0.35) -> torch.Tensor:
    """Random shape-preserving variants of box-cropped grids [N, M, M] -> [N, M, M].

    Each grid gets a random element of the dihedral group (h/v flips, transpose: exact, the box stays tight).
    With probability `affine_prob` it then gets a small random affine map (rotation, shear, aspect change) on
    a canvas `upsample` x finer and is re-cropped (roi_align) to the tight box of its support (values above
    `support_threshold`; 0.35 best reproduces the border statistics of real GT-box crops under an identity
    map), so the result is again a grid "cropped by its own box". Random numbers come from `generator` (a CPU
    generator), so results are reproducible.
    """
    check_number("affine_prob", affine_prob, min=0, max=1)
    for name, value in (("max_rotation", max_rotation), ("max_log_aspect", max_log_aspect), ("max_shear", max_shear)):
        check_number(name, value, min=0)
    check_number("upsample", upsample, integer=True, min=1)
    check_number("support_threshold", support_threshold, min=0, max=1, max_inclusive=False)
    n, m, _ = grids.shape
    dev = grids.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator).to(dev)

    flip = rand(n, 3) < 0.5
    out = torch.where(flip[:, 0, None, None], grids.flip(-1), grids)
    out = torch.where(flip[:, 1, None, None], out.flip(-2), out)
    out = torch.where(flip[:, 2, None, None], out.transpose(-1, -2), out)
    if affine_prob <= 0:
        return out
    keep = rand(n) >= affine_prob
    # affine map of the normalised square [-1, 1]^2 onto a canvas twice as large (room for the rotated shape)
    angle = (rand(n) * 2 - 1) * math.radians(max_rotation)
    aspect = torch.exp((rand(n) * 2 - 1) * max_log_aspect)
    shear = (rand(n) * 2 - 1) * max_shear
    cos, sin = torch.cos(angle), torch.sin(angle)
    fwd = torch.stack([torch.stack([cos * aspect, -sin / aspect + shear], -1),
                       torch.stack([sin * aspect, cos / aspect], -1)], -2)  # [N, 2, 2] output = fwd @ input
    inv = torch.linalg.inv(fwd) * 2.0  # canvas coordinate c in [-1, 1] covers input coords 2c
    theta = torch.cat([inv, torch.zeros(n, 2, 1, device=dev)], dim=2)
    size = m * upsample * 2
    canvas_grid = F.affine_grid(theta, [n, 1, size, size], align_corners=False)
    canvas = F.grid_sample(out[:, None], canvas_grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # tight box of the support (values > support_threshold), in canvas pixels; empty canvases keep the full canvas
    support = canvas[:, 0] > support_threshold
    cols, rows = support.any(1), support.any(2)
    idx = torch.arange(size, device=dev)
    big = torch.full_like(idx, size)
    x0 = torch.where(cols, idx, big).amin(1)
    x1 = torch.where(cols, idx + 1, -big).amax(1)
    y0 = torch.where(rows, idx, big).amin(1)
    y1 = torch.where(rows, idx + 1, -big).amax(1)
    empty = x1 <= x0
    boxes = torch.stack([x0, y0, x1, y1], 1).float()
    boxes[empty] = torch.tensor([0.0, 0.0, size, size], device=dev)
    rois = torch.cat([torch.arange(n, device=dev, dtype=torch.float32)[:, None], boxes], 1)
    warped = roi_align(canvas, rois, (m, m), 1.0, 2, aligned=True)[:, 0].clamp(0, 1)
    return torch.where(keep[:, None, None], out, warped)


_AUGMENT_OPTIONS = frozenset({"affine_prob", "max_rotation", "max_log_aspect", "max_shear", "upsample",
                               "support_threshold"})


@register_codec("autoencoder")
class AutoencoderCodec(MaskCodec):
    """Learned conv autoencoder codec. channels[i] = min(base_channels * 2**i, max_channels) per stage."""

    requires_fit = True

    def __init__(self, mask_size: int = 28, dim: int = 60, base_channels: int = 24, max_channels: int = 256,
                 bottleneck_size: int = 7, depth: int = 2, groups: int = 8, standardize: bool = True) -> None:
        super().__init__(mask_size, dim)
        base_channels, max_channels, bottleneck_size, depth, groups = (
            check_number(name, value, integer=True, min=1)
            for name, value in (("base_channels", base_channels), ("max_channels", max_channels),
                                ("bottleneck_size", bottleneck_size), ("depth", depth), ("groups", groups)))
        self.base_channels, self.max_channels = base_channels, max_channels
        self.bottleneck_size, self.depth, self.groups = bottleneck_size, depth, groups
        self.standardize = check_bool("standardize", standardize)
        sizes = [math.ceil(mask_size / 2)]  # grid sides of the conv stages, after space-to-depth
        while sizes[-1] > bottleneck_size:
            sizes.append(math.ceil(sizes[-1] / 2))
        channels = [min(base_channels * 2 ** i, max_channels) for i in range(len(sizes))]
        self.sizes, self.channels = sizes, channels
        self.encoder = _Encoder(mask_size, sizes, channels, dim, depth, groups)
        self.decoder = _Decoder(mask_size, sizes, channels, dim, depth, groups)
        self.register_buffer("embed_mean", torch.zeros(dim))
        self.register_buffer("embed_std", torch.ones(dim))
        self.requires_grad_(False)
        self.train(False)  # no dropout / batch statistics anyway: train and eval mode compute the same thing
        self.fit_history: list[dict[str, float]] = []

    def config(self) -> dict[str, Any]:
        return {**super().config(), "base_channels": self.base_channels, "max_channels": self.max_channels,
                "bottleneck_size": self.bottleneck_size, "depth": self.depth, "groups": self.groups,
                "standardize": self.standardize}

    # ----------------------------------------------------------------- encode / decode
    def _encode(self, grids: torch.Tensor) -> torch.Tensor:
        dtype = self.embed_mean.dtype
        return (self.encoder(grids.to(dtype)) - self.embed_mean) / self.embed_std

    def _decode(self, embeddings: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decode_logits(embeddings))

    def decode_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[N, l] -> [N, M, M] mask logits (before the sigmoid), e.g. for a BCE-with-logits loss."""
        z = embeddings.to(self.embed_mean.dtype) * self.embed_std + self.embed_mean
        return self.decoder(z)

    # ----------------------------------------------------------------- fit
    def _fit(self, masks: torch.Tensor | Iterable[torch.Tensor], *, epochs: int = 50, batch_size: int = 64,
             lr: float = 5e-3, weight_decay: float = 1e-4, seed: int = 0, device: str | torch.device | None = None,
             augment: bool | dict[str, Any] = True, progress: bool = True, val_masks: torch.Tensor | None = None,
             keep_best: bool = True, dice_weight: float = 1.0, bce_weight: float = 1.0) -> None:
        """Train on grids [N, M, M] (or chunks of them).

        augment: True = random dihedral maps (flips / transpose) of every batch; a dict = keyword arguments of
        `augment_grids` (e.g. {"affine_prob": 0.5}); False = none. On 3,006 COCO masks (M=28, l=60) dihedral
        augmentation lifted held-out IoU by ~0.01 (0.945 -> 0.953 for one architecture); the affine re-crop
        did not help further (0.957 -> 0.955 at 40 epochs).

        val_masks: grids [V, M, M] scored after every epoch (IoU at grid resolution, in `fit_history`); with
        keep_best the best epoch's weights are kept. Don't pass the data you will report results on.

        Runs on `device` (default: the codec's device); the codec returns to its device afterwards, frozen.
        """
        from tqdm.auto import tqdm

        epochs = check_number("epochs", epochs, integer=True, min=1)
        batch_size = check_number("batch_size", batch_size, integer=True, min=1)
        lr = check_number("lr", lr, min=0, min_inclusive=False)
        weight_decay = check_number("weight_decay", weight_decay, min=0)
        seed = check_number("seed", seed, integer=True, min=0)
        dice_weight = check_number("dice_weight", dice_weight, min=0)
        bce_weight = check_number("bce_weight", bce_weight, min=0)
        if dice_weight == 0 and bce_weight == 0:
            raise ValueError("dice_weight and bce_weight are both 0: the autoencoder would learn nothing")
        progress, keep_best = check_bool("progress", progress), check_bool("keep_best", keep_best)
        if isinstance(augment, dict):
            unknown = sorted(set(augment) - _AUGMENT_OPTIONS)
            if unknown:
                raise ValueError(f"augment: unknown options {unknown}; augment_grids takes {sorted(_AUGMENT_OPTIONS)}")
            augment_grids(torch.zeros(1, self.mask_size, self.mask_size), torch.Generator(), **augment)  # checks values
        else:
            augment = check_bool("augment", augment)
        home = self.embed_mean.device
        device = check_device(device, "device") if device is not None else home
        if isinstance(masks, torch.Tensor):
            masks = masks.to(home)  # validated on the codec's device, trained on `device`
        chunks = [c.to(device, torch.float32) for c in self.iter_chunks(masks)]
        data = torch.cat(chunks) if chunks else torch.zeros(0, self.mask_size, self.mask_size, device=device)
        if data.shape[0] < 2:
            raise ValueError(f"the autoencoder needs at least 2 masks to fit, got {data.shape[0]}")
        if not bool((data > 0).any()):
            raise ValueError(f"all {data.shape[0]} masks given to fit the autoencoder are empty (every pixel 0): it "
                             "would learn nothing and encode real masks far outside its range; check the crops")
        if not bool((data != data[:1]).any()):
            raise ValueError(f"all {data.shape[0]} masks given to fit the autoencoder are identical: its embeddings "
                             "would have no variance to standardize; fit on varied masks")
        val = None
        if val_masks is not None:
            val = self.check_grids(val_masks.to(home) if isinstance(val_masks, torch.Tensor) else val_masks)
            val = val.to(device, torch.float32)

        aug_options = augment if isinstance(augment, dict) else {}
        generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for module in self.modules():
                if module is not self and hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        self.to(device)
        self.embed_mean.zero_()
        self.embed_std.fill_(1.0)
        params = [p for p in self.parameters()]
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        steps_per_epoch = math.ceil(data.shape[0] / batch_size)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, epochs=epochs,
                                                        steps_per_epoch=steps_per_epoch, pct_start=0.15)
        self.fit_history = []
        best_iou, best_state = -1.0, None
        bar = tqdm(range(epochs), desc=f"fit autoencoder l={self.dim} M={self.mask_size}", disable=not progress)
        try:
            for epoch in bar:
                self.train()
                order = torch.randperm(data.shape[0], generator=generator).to(device)
                total = torch.zeros((), device=device)
                for start in range(0, data.shape[0], batch_size):
                    batch = data[order[start : start + batch_size]]
                    if augment:
                        batch = augment_grids(batch, generator, **aug_options)
                    loss = dice_bce_loss(self.decoder(self.encoder(batch)), batch, dice_weight, bce_weight)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    total += loss.detach() * batch.shape[0]
                record = {"epoch": epoch + 1, "loss": float(total) / data.shape[0]}
                if val is not None:
                    record["val_iou"] = self._grid_iou(val)
                    if keep_best and record["val_iou"] > best_iou:
                        best_iou, best_state = record["val_iou"], copy.deepcopy(self.state_dict())
                self.fit_history.append(record)
                bar.set_postfix({k: round(v, 4) for k, v in record.items() if k != "epoch"})
        finally:
            for p in params:
                p.requires_grad_(False)
            self.eval()
        if best_state is not None:
            self.load_state_dict(best_state)
        if self.standardize:
            with torch.no_grad():
                z = torch.cat([self.encoder(data[i : i + 1024]) for i in range(0, data.shape[0], 1024)])
            self.embed_mean.copy_(z.mean(0))
            self.embed_std.copy_(z.std(0).clamp_min(1e-6))
        self.to(home)

    @torch.no_grad()
    def _grid_iou(self, grids: torch.Tensor) -> float:
        """Mean IoU of thresholded reconstructions vs thresholded grids, at grid resolution (fit monitor)."""
        self.eval()
        recon = torch.cat([torch.sigmoid(self.decoder(self.encoder(grids[i : i + 1024])))
                           for i in range(0, grids.shape[0], 1024)])
        return float(mask_iou(recon, grids).mean())

"""ISDA's mask side: the mask feature representation (SOLOv2-style MFR) and per-query dynamic 1x1 kernels."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from istr.ops.roi_align import multiscale_roi_align
from istr.ops.tracing import is_exporting

__all__ = ["KernelHead", "MaskFeatureHead", "MaskFeedback", "coordinate_channels", "mask_centroids", "mask_logits",
           "mask_roi_features"]


def linspace(start: float, end: float, steps: Any, like: torch.Tensor) -> torch.Tensor:
    """torch.linspace(start, end, steps) on like's dtype/device. While a graph is exported, the same arithmetic
    (start + i * step below halfway, end - (steps - 1 - i) * step from there) as a tensor computation with `steps`
    read from a shape, so that the graph does not fix the size (linspace's step count would); it agrees with
    torch.linspace to 1 ulp (the eager path keeps torch.linspace itself)."""
    if not is_exporting():
        return torch.linspace(start, end, steps, dtype=like.dtype, device=like.device)
    index = torch.arange(steps, device=like.device).to(like.dtype)
    count = index.new_ones(()) * (steps - 1)
    step = (end - start) / count.clamp(min=1)
    halfway = torch.div(index.new_ones(()) * steps, 2, rounding_mode="floor").clamp(min=1)
    return torch.where(index < halfway, start + step * index, end - step * (count - index))


def coordinate_channels(feat: torch.Tensor) -> torch.Tensor:
    """Normalised pixel coordinates of a map [N, C, H, W] -> [N, 2, H, W]: x then y, linspace(-1, 1) over the
    whole (padded) map, as SOLOv2's CoordConv."""
    n, _, h, w = feat.shape
    y, x = torch.meshgrid(linspace(-1.0, 1.0, h, feat), linspace(-1.0, 1.0, w, feat), indexing="ij")
    return torch.stack([x, y])[None].expand(n, -1, -1, -1)


def _conv_gn_relu(in_channels: int, out_channels: int, kernel_size: int, num_groups: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
                         nn.GroupNorm(num_groups, out_channels), nn.ReLU(inplace=True))


class MaskFeatureHead(nn.Module):
    """Mask feature representation (ISDA's MFR, SOLOv2's mask feature head): P2..P5 fused at stride 4.

    Branch of P2: 3x3 conv + GN + ReLU. Branches of P3, P4, P5: 1, 2, 3 stages of [3x3 conv + GN + ReLU,
    2x bilinear upsample] (each upsample goes to the next finer input's size: exactly 2x for maps padded to /32).
    With mask_position, coordinate_channels are concatenated to P5 before its first conv (in_channels + 2 inputs).
    The four branches are summed at stride 4, then 1x1 conv + GN + ReLU -> out_channels.

    mask_stride 4 is ISDA's. For 8 and 2 the branches are still fused at stride 4 exactly as above and the sum is
    resized bilinearly (align_corners=False) before the final 1x1 conv: to P3's size for 8 (a 2x2 average when
    sizes are even), to twice P2's size for 2. The MFR then has the same grid as P3 (stride 8) or 2x P2 (stride 2).
    """

    def __init__(self, in_channels: int = 256, feat_channels: int = 128, out_channels: int = 256,
                 mask_stride: int = 4, mask_position: bool = True, num_groups: int = 32,
                 init_std: float | None = 0.01, image_channels: int = 0) -> None:
        """init_std: every conv's weights drawn from N(0, init_std) (ISDA's mask_feat_head init_weights); None keeps
        PyTorch's default initialisation. image_channels > 0 (an option, not in ISDA): an image branch, log2(mask_stride)
        stride-2 [3x3 conv + GN + ReLU] from the (normalised) input image to image_channels at the mask stride, whose
        output joins the fused branches at the final 1x1 conv: detail finer than P2's at strides 4 and 2 (the other
        branches are only upsampled there)."""
        super().__init__()
        if mask_stride not in (2, 4, 8):
            raise ValueError(f"mask_stride: expected 2, 4 or 8, got {mask_stride}")
        for name, channels in (("feat_channels", feat_channels), ("out_channels", out_channels)):
            if channels % num_groups:
                raise ValueError(f"{name}: expected a multiple of num_groups={num_groups}, got {channels}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.mask_stride, self.mask_position = mask_stride, mask_position
        self.branches = nn.ModuleList()
        for level in range(4):  # P2 (0 upsamples) .. P5 (3 upsamples)
            convs = nn.ModuleList()
            for stage in range(max(level, 1)):
                c_in = in_channels if stage == 0 else feat_channels
                if level == 3 and stage == 0 and mask_position:
                    c_in += 2
                convs.append(_conv_gn_relu(c_in, feat_channels, 3, num_groups))
            self.branches.append(convs)
        self.image_branch = None
        if image_channels:
            if image_channels < 0 or image_channels % num_groups:
                raise ValueError(f"image_channels: expected 0 or a multiple of num_groups={num_groups}, "
                                 f"got {image_channels}")
            convs = [_conv_gn_relu(3 if i == 0 else image_channels, image_channels, 3, num_groups)
                     for i in range(mask_stride.bit_length() - 1)]
            for conv in convs:
                conv[0].stride = (2, 2)
            self.image_branch = nn.Sequential(*convs)
        self.fuse = _conv_gn_relu(feat_channels + image_channels, out_channels, 1, num_groups)
        if init_std is not None:
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.normal_(m.weight, std=init_std)

    def forward(self, features: Sequence[torch.Tensor], image: torch.Tensor | None = None) -> torch.Tensor:
        """features: P2..P5 [N, in_channels, H/s, W/s] for s = 4, 8, 16, 32 -> MFR [N, out_channels, h, w]
        at stride mask_stride (h = H_P2 for 4, H_P3 for 8, 2 * H_P2 for 2). image: the padded, normalised batch
        [N, 3, H, W] (required with image_channels)."""
        if len(features) != 4:
            raise ValueError(f"features: expected 4 maps P2..P5, got {len(features)}")
        for level, feat in enumerate(features):
            if feat.dim() != 4 or feat.shape[1] != self.in_channels:
                raise ValueError(f"features[{level}] (P{level + 2}): expected [N, {self.in_channels}, H, W], "
                                 f"got shape {tuple(feat.shape)}")
        sizes = [feat.shape[-2:] for feat in features]
        fused = None
        for level, (feat, convs) in enumerate(zip(features, self.branches)):
            x = torch.cat([feat, coordinate_channels(feat)], 1) if level == 3 and self.mask_position else feat
            for stage, conv in enumerate(convs):
                x = conv(x)
                if level > 0:  # upsample to the next finer level: P_l -> P_{l-1} ... -> P2
                    x = F.interpolate(x, size=sizes[level - 1 - stage], mode="bilinear", align_corners=False)
            if fused is None:
                fused = x
            elif torch.is_grad_enabled():
                fused = fused + x
            else:  # inference: summed in place (the first branch's output, this head's own), no 30-60 MB copy
                fused.add_(x)
        if self.mask_stride != 4:
            size = sizes[1] if self.mask_stride == 8 else (2 * sizes[0][0], 2 * sizes[0][1])
            fused = F.interpolate(fused, size=size, mode="bilinear", align_corners=False)
        if self.image_branch is not None:
            if image is None or image.dim() != 4 or image.shape[1] != 3:
                raise ValueError(f"image: expected the batch [N, 3, H, W] with image_channels, got "
                                 f"{None if image is None else tuple(image.shape)}")
            detail = self.image_branch(image)
            if detail.shape[-2:] != fused.shape[-2:]:
                raise ValueError(f"the image branch gives a {tuple(detail.shape[-2:])} map, the fused features are "
                                 f"{tuple(fused.shape[-2:])}: the padded image must be divisible by 32")
            fused = torch.cat([fused, detail], 1)
        return self.fuse(fused)


class KernelHead(nn.Module):
    """Per-query dynamic 1x1 kernel (ISDA's "position-aware kernel").

    MLP d -> d -> d -> kernel_dim (ReLU between); with kernel_position the last layer gives kernel_dim - 2 and
    torch.logit(reference_points, eps) (inverse sigmoid, eps-clamped) is appended, so the last 2 kernel
    entries are the query's reference point (x, y) in logit space.
    """

    def __init__(self, hidden_dim: int = 256, kernel_dim: int = 256, kernel_position: bool = True,
                 eps: float = 1e-5) -> None:
        super().__init__()
        if kernel_position and kernel_dim <= 2:
            raise ValueError(f"kernel_dim: expected > 2 with kernel_position, got {kernel_dim}")
        self.kernel_dim, self.kernel_position, self.eps = kernel_dim, kernel_position, eps
        out = kernel_dim - 2 if kernel_position else kernel_dim
        self.mlp = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.ReLU(inplace=True),
                                 nn.Linear(hidden_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out))

    def forward(self, hs: torch.Tensor, reference_points: torch.Tensor | None = None) -> torch.Tensor:
        """hs [..., N, Q, d] (e.g. all decoder layers [D, N, Q, d]); reference_points [N, Q, 2] in [0, 1], or
        [..., N, Q, 2] one set per layer (required with kernel_position) -> kernels [..., N, Q, kernel_dim]."""
        kernels = self.mlp(hs)
        if not self.kernel_position:
            return kernels
        if (reference_points is None or reference_points.shape[-3:] != hs.shape[-3:-1] + (2,)
                or reference_points.dim() not in (3, hs.dim())):
            given = None if reference_points is None else tuple(reference_points.shape)
            raise ValueError(f"reference_points: expected [N, Q, 2] = {tuple(hs.shape[-3:-1]) + (2,)} (or one per "
                             f"leading index of hs {tuple(hs.shape[:-1])}) with kernel_position, got {given}")
        position = torch.logit(reference_points, eps=self.eps).expand(*kernels.shape[:-1], 2)
        return torch.cat([kernels, position], -1)


def mask_logits(kernels: torch.Tensor, mfr: torch.Tensor) -> torch.Tensor:
    """Dynamic 1x1 conv without bias: kernels [..., N, Q, K] over mfr [N, K, h, w] -> mask logits [..., N, Q, h, w]."""
    if mfr.dim() != 4 or kernels.dim() < 3 or kernels.shape[-3] != mfr.shape[0] or kernels.shape[-1] != mfr.shape[1]:
        raise ValueError(f"mask_logits: expected kernels [..., N, Q, K] and mfr [N, K, h, w] with equal N and K, "
                         f"got {tuple(kernels.shape)} and {tuple(mfr.shape)}")
    return torch.einsum("...nqk,nkhw->...nqhw", kernels, mfr)


def tight_boxes(rows_any: torch.Tensor, cols_any: torch.Tensor) -> torch.Tensor:
    """Which rows [..., H] and columns [..., W] of each binary mask hold a pixel -> [..., 4] float32 xyxy boxes ending
    after the last pixel (masks_to_boxes + 1); 0 for an empty mask. Batched and traceable (the export head and the
    mask-RoI classifier; torchvision's masks_to_boxes loops over masks and fails on empty ones)."""
    ys = torch.arange(rows_any.shape[-1], device=rows_any.device)
    xs = torch.arange(cols_any.shape[-1], device=cols_any.device)
    big_y, big_x = torch.full_like(ys, 2 ** 30), torch.full_like(xs, 2 ** 30)
    y0 = torch.where(rows_any, ys, big_y).amin(-1)
    x0 = torch.where(cols_any, xs, big_x).amin(-1)
    y1 = torch.where(rows_any, ys, -1).amax(-1) + 1
    x1 = torch.where(cols_any, xs, -1).amax(-1) + 1
    boxes = torch.stack([x0, y0, x1, y1], -1).to(torch.float32)
    return torch.where(rows_any.any(-1)[..., None], boxes, torch.zeros_like(boxes))


def mask_roi_features(mask_logits: torch.Tensor, mfr: torch.Tensor, roi_size: int = 7) -> torch.Tensor:
    """The MFR inside each query's own mask: a roi_size x roi_size RoIAlign of mfr [N, K, h, w] inside the tight box
    of the mask (mask_logits [..., N, Q, h, w], detached here, binarised at 0.5; the whole map for an empty mask),
    times the soft mask aligned the same way -> [M, K, roi_size, roi_size], M = prod(...) * N * Q."""
    from torchvision.ops import roi_align

    probs = mask_logits.detach().sigmoid()
    h, w = probs.shape[-2:]
    b, q = probs.shape[-4], probs.shape[-3]
    flat = probs.reshape(-1, h, w)  # [M, h, w]
    on = flat >= 0.5
    rows, cols = on.any(-1), on.any(-2)  # [M, h], [M, w]
    boxes = tight_boxes(rows, cols).to(mfr.dtype)
    boxes[~rows.any(-1)] = torch.tensor([0.0, 0.0, w, h], dtype=mfr.dtype, device=mfr.device)
    index = torch.arange(flat.shape[0], device=mfr.device)
    # the library's RoIAlign (torchvision's values to float rounding, its backward several times faster on CPU; it
    # wants each image's boxes together: [..., N, Q] -> [N, ..., Q] and back)
    lead = boxes.view(-1, b, q, 4).transpose(0, 1).reshape(b, -1, 4)
    feats = multiscale_roi_align([mfr], lead, roi_size, strides=(1,), sampling_ratio=2)
    feats = feats.view(b, -1, q, *feats.shape[1:]).transpose(0, 1).reshape(flat.shape[0], *feats.shape[1:])
    # the mask needs no gradient: torchvision's forward
    mask = roi_align(flat[:, None], torch.cat([index[:, None].to(mfr.dtype), boxes], 1), roi_size, 1.0, 2, aligned=True)
    return feats * mask


def mask_centroids(mask_logits: torch.Tensor, fallback: torch.Tensor, ratios: torch.Tensor) -> torch.Tensor:
    """Reference points from masks (an option, not in ISDA): the centroid (x, y) of each mask's pixels of probability
    >= 0.5, weighted by that probability, as a fraction of the image's valid extent. mask_logits [N, Q, h, w] on the
    padded batch's grid (detached here); ratios [N, 2] valid / padded extent (x, y); fallback [N, Q, 2] where a mask
    is empty. -> [N, Q, 2] in [0, 1]."""
    probs = mask_logits.detach().sigmoid()
    weights = torch.where(probs >= 0.5, probs, torch.zeros_like(probs))
    h, w = probs.shape[-2:]
    ys = (torch.arange(h, device=probs.device, dtype=probs.dtype) + 0.5) / h
    xs = (torch.arange(w, device=probs.device, dtype=probs.dtype) + 0.5) / w
    total = weights.sum((-2, -1))  # [N, Q]
    cx = (weights.sum(-2) * xs).sum(-1) / total.clamp(min=1e-6)
    cy = (weights.sum(-1) * ys).sum(-1) / total.clamp(min=1e-6)
    points = (torch.stack([cx, cy], -1) / ratios[:, None].to(probs.dtype)).clamp(0.0, 1.0)
    return torch.where(total[..., None] > 0, points.to(fallback.dtype), fallback)


class MaskFeedback(nn.Module):
    """Queries updated from their own masks between decoder layers (an option, not in ISDA): mask_roi_features of the
    layer's masks through an MLP (flatten -> hidden -> hidden), added to the query, LayerNorm. The next layer's
    self-attention then sees what each query's mask holds (queries on one object look alike), as ISTR's queries
    see their RoI features. The last linear starts at zero: at initialisation the queries pass unchanged but for
    the norm.

    forward(tgt [N, Q, d], mask_logits [N, Q, h, w], mfr [N, K, h, w]) -> [N, Q, d]."""

    def __init__(self, in_channels: int, hidden_dim: int, roi_size: int = 7) -> None:
        super().__init__()
        self.roi_size = roi_size
        self.mlp = nn.Sequential(nn.Flatten(1), nn.Linear(in_channels * roi_size ** 2, hidden_dim), nn.ReLU(inplace=True),
                                 nn.Linear(hidden_dim, hidden_dim))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.norm = nn.LayerNorm(hidden_dim)

    def forward(self, tgt: torch.Tensor, mask_logits: torch.Tensor, mfr: torch.Tensor) -> torch.Tensor:
        return self.norm(tgt + self.mlp(mask_roi_features(mask_logits, mfr, self.roi_size)).view_as(tgt))


class MaskRoIClassifier(nn.Module):
    """Class logits from each query's own mask (an option, not in ISDA): a roi_size x roi_size RoIAlign of the MFR
    inside the tight box of the query's mask (binarised at 0.5; the whole map for an empty mask), times the soft mask
    aligned the same way, through an MLP (flatten -> hidden -> C). The classifier sees the object's features laid out
    in space, as ISTR's RoI head does; it is added to the query's class logits.

    forward(mask_logits [..., N, Q, h, w] (detached here), mfr [N, K, h, w]) -> [..., N, Q, C]."""

    def __init__(self, in_channels: int, hidden_dim: int, num_classes: int, roi_size: int = 7) -> None:
        super().__init__()
        self.roi_size = roi_size
        self.mlp = nn.Sequential(nn.Flatten(1), nn.Linear(in_channels * roi_size ** 2, hidden_dim), nn.ReLU(inplace=True),
                                 nn.Linear(hidden_dim, num_classes))
        nn.init.zeros_(self.mlp[-1].bias)  # the query's own class logits (and their prior) stay the starting point

    def forward(self, mask_logits: torch.Tensor, mfr: torch.Tensor) -> torch.Tensor:
        return self.mlp(mask_roi_features(mask_logits, mfr, self.roi_size)).view(*mask_logits.shape[:-2], -1)

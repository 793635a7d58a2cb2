"""Visualisation: draw instance masks, boxes and "class score" labels on an image; save images; ground-truth vs
prediction panels; training loss curves."""
from __future__ import annotations

import colorsys
import inspect
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

__all__ = ["draw_instances", "save_image", "class_color", "save_overlays", "plot_loss_curve"]

# torchvision >= 0.20 can put label text on a filled background (readable over tinted masks)
_LABEL_KW = {"fill_labels": True} if "fill_labels" in inspect.signature(draw_bounding_boxes).parameters else {}


def class_color(label: int) -> tuple[int, int, int]:
    """A fixed, well-spread RGB colour per class index (golden-ratio hue steps)."""
    hue = (label * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _to_uint8(image: torch.Tensor) -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must be a tensor [3, H, W] (or [1, H, W]), got {getattr(image, 'shape', type(image))}")
    image = image.detach().cpu()
    if image.dtype != torch.uint8:
        image = (image.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image


def draw_instances(
    image: torch.Tensor,
    result: Mapping[str, torch.Tensor],
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    score_threshold: float = 0.4,
    *,
    mask_threshold: float = 0.5,
    alpha: float = 0.5,
    box_width: int = 2,
    draw_boxes: bool = True,
    draw_masks: bool = True,
    draw_labels: bool = True,
) -> torch.Tensor:
    """Overlay the instances of one result (or a target) on an image -> uint8 [3, H, W].

    image: float [3, H, W] in [0, 1] (or uint8). result: {"boxes": [N, 4] xyxy, "labels": [N], optional "scores"
    [N] (detections below score_threshold are skipped; targets without scores are all drawn), optional "masks"
    [N, 1, H, W] / [N, H, W] probabilities (>= mask_threshold) or binary}. Labels read "name 0.87" (class_names
    indexed by label; the label number when None). Colours are fixed per class. A result with scores of which
    none reaches score_threshold is marked "no detections above score X" (an empty panel that says why).
    """
    canvas = _to_uint8(image)
    h, w = canvas.shape[-2:]
    boxes = torch.as_tensor(result.get("boxes", torch.zeros(0, 4))).detach().cpu().float().reshape(-1, 4)
    labels = torch.as_tensor(result.get("labels", torch.zeros(len(boxes)))).detach().cpu().long().reshape(-1)
    scores = result.get("scores")
    keep = torch.ones(len(labels), dtype=torch.bool)
    if scores is not None:
        scores = torch.as_tensor(scores).detach().cpu().float().reshape(-1)
        keep = scores >= score_threshold
    idx = keep.nonzero().flatten()
    if len(idx) == 0:
        return _caption(canvas, f"no detections above score {score_threshold:g}") if scores is not None else canvas
    colors = [class_color(int(labels[i])) for i in idx]
    if draw_masks and result.get("masks") is not None:
        masks = torch.as_tensor(result["masks"]).detach().cpu()
        masks = masks[:, 0] if masks.ndim == 4 else masks
        if masks.shape[-2:] != (h, w):
            raise ValueError(f"masks are {tuple(masks.shape[-2:])} but the image is {(h, w)}")
        masks = masks[idx]
        binary = masks if masks.dtype == torch.bool else masks.float() >= mask_threshold
        canvas = draw_segmentation_masks(canvas, binary, alpha=alpha, colors=colors)
    if draw_boxes and len(boxes):
        b = boxes[idx].clone()
        b[:, 0::2] = b[:, 0::2].clamp(0, w - 1)
        b[:, 1::2] = b[:, 1::2].clamp(0, h - 1)
        b[:, 2:] = torch.maximum(b[:, 2:], b[:, :2])  # draw_bounding_boxes rejects x1 < x0
        text = None
        if draw_labels:
            text = []
            for i in idx.tolist():
                name = _class_name(class_names, int(labels[i]))
                text.append(f"{name} {float(scores[i]):.2f}" if scores is not None else name)
        canvas = draw_bounding_boxes(canvas, b, labels=text, colors=colors, width=box_width, **_LABEL_KW)
    return canvas


def _caption(canvas: torch.Tensor, text: str) -> torch.Tensor:
    """The text in the top-left corner, black on white, of a uint8 [3, H, W] image."""
    from PIL import Image, ImageDraw

    pil = Image.fromarray(canvas.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(pil)
    left, top, right, bottom = draw.textbbox((3, 3), text)
    draw.rectangle((0, 0, right + 3, bottom + 3), fill=(255, 255, 255))
    draw.text((3, 3), text, fill=(0, 0, 0))
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).contiguous()


def _class_name(class_names: Sequence[str] | Mapping[int, str] | None, label: int) -> str:
    if class_names is None:
        return str(label)
    try:
        return str(class_names[label])
    except (IndexError, KeyError):
        return str(label)


def save_image(image: torch.Tensor, path: str | Path) -> Path:
    """Save uint8 [3, H, W] (or float in [0, 1]) as PNG/JPEG/... (by suffix); creates parent folders. The file
    appears complete or not at all, readable as any new file (istr.fileio.atomic_save)."""
    from PIL import Image

    from istr.fileio import atomic_save

    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot tell the image format of {path} from its suffix {path.suffix!r}; use .png or .jpg")
    pil = Image.fromarray(_to_uint8(image).permute(1, 2, 0).numpy())
    return atomic_save(path, lambda tmp: pil.save(tmp, format=fmt))


def plot_loss_curve(log_file: str | Path, out_png: str | Path, smooth: int = 10) -> Path:
    """Plot total loss and the last stage's loss terms (moving average) with the lr, from a log.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(l) for l in Path(log_file).read_text().splitlines() if l.strip()]
    records = [r for r in records if "event" not in r]
    if not records:
        raise ValueError(f"{log_file} has no iteration records to plot")
    iters = [r["iter"] for r in records]

    def avg(values: list[float]) -> list[float]:
        out, acc = [], 0.0
        for i, v in enumerate(values):
            acc += v
            if i >= smooth:
                acc -= values[i - smooth]
            out.append(acc / min(i + 1, smooth))
        return out

    last = max((int(k.rsplit("_s", 1)[1]) for k in records[-1] if "_s" in k and k.rsplit("_s", 1)[1].isdigit()),
               default=None)
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    ax0.plot(iters, [r["loss"] for r in records], alpha=0.25, color="C0")
    ax0.plot(iters, avg([r["loss"] for r in records]), color="C0", label=f"total (mean of {smooth})")
    ax0.set(xlabel="iteration", ylabel="loss (sum over stages and terms)", yscale="log", title="training loss")
    lr_ax = ax0.twinx()
    lr_ax.plot(iters, [r["lr"] for r in records], color="C3", lw=1, ls="--")
    lr_ax.set_ylabel("learning rate", color="C3")
    ax0.legend(loc="upper right")
    if last is not None:
        # denoising terms (ISTR(denoising_groups=G)) dashed, in the colour of the matched term
        for j, key in enumerate(sorted(k for k in records[-1] if k.endswith(f"_s{last}") and "_dn_s" not in k)):
            for name, style in ((key, "-"), (key.replace(f"_s{last}", f"_dn_s{last}"), "--")):
                if name in records[-1]:
                    ax1.plot(iters, avg([r.get(name, float("nan")) for r in records]), style, label=name, color=f"C{j}")
        ax1.set(xlabel="iteration", ylabel="weighted loss", yscale="log", title=f"last stage (s{last}) terms")
        ax1.legend(fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _upscale(image: torch.Tensor, target: dict[str, Any], factor: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """Nearest-neighbour upscaling of an image and its boxes/masks, so small demo images get readable labels."""
    if factor == 1:
        return image, target
    target = dict(target)
    target["boxes"] = target["boxes"] * factor
    if target.get("masks") is not None and len(target["masks"]):
        masks = target["masks"].float()
        squeeze = masks.ndim == 3
        masks = masks[:, None] if squeeze else masks
        masks = F.interpolate(masks, scale_factor=factor, mode="nearest")
        target["masks"] = masks[:, 0] if squeeze else masks
    elif target.get("masks") is not None:
        h, w = target["masks"].shape[-2:]
        target["masks"] = target["masks"].new_zeros((*target["masks"].shape[:-2], h * factor, w * factor))
    return F.interpolate(image[None], scale_factor=factor, mode="nearest")[0], target


def save_overlays(model, dataset, out_dir: str | Path, count: int, score_threshold: float, min_side: int = 384) -> list[str]:
    """Ground truth beside prediction for the first `count` images of a dataset, one PNG each (upscaled to at least
    `min_side` px so the labels are readable) -> the paths written."""
    from istr.engine.predict import predict

    out_dir = Path(out_dir)

    paths = []
    for i in range(min(count, len(dataset))):
        image, target = dataset[i]
        result = predict(model, image)
        factor = max(1, min_side // min(image.shape[-2:]))
        big, target = _upscale(image, target, factor)
        _, result = _upscale(image, result, factor)
        gt = draw_instances(big, target, class_names=dataset.category_names)
        pred = draw_instances(big, result, class_names=dataset.category_names, score_threshold=score_threshold)
        gap = torch.full((3, big.shape[1], 8), 255, dtype=torch.uint8)
        path = save_image(torch.cat([gt, gap, pred], dim=2), out_dir / f"val_{target['image_id']:06d}.png")
        paths.append(str(path))
    return paths

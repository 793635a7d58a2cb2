"""Visualisation: draw instance masks, boxes and "class score" labels on an image; save images."""
from __future__ import annotations

import colorsys
import inspect
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

__all__ = ["draw_instances", "save_image", "class_color"]

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

"""Inference helper: image files, PIL images or tensors in, torchvision-style per-image results out."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from istr.checks import check_bool, check_device, check_number

__all__ = ["predict"]

ImageLike = Any  # str | Path | torch.Tensor | PIL.Image.Image


def _is_pil(item: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - PIL is a dependency
        return False
    return isinstance(item, Image.Image)


def _as_image(item: ImageLike) -> torch.Tensor:
    from istr.data.coco import image_tensor, load_image, pil_to_tensor

    if isinstance(item, (str, Path)):
        return load_image(item)
    if _is_pil(item):
        return pil_to_tensor(item)
    if not isinstance(item, torch.Tensor):
        raise TypeError(f"expected an image path, a PIL image or a tensor [3, H, W], got {type(item).__name__}")
    return image_tensor(item, "image")  # scaled by its dtype (uint8 / 255, uint16 / 65535), [1, H, W] -> [3, H, W]


def _as_items(images: Any) -> tuple[list, bool]:
    """(list of single images, whether a single image was given)."""
    if isinstance(images, (str, Path)) or _is_pil(images) or (isinstance(images, torch.Tensor) and images.ndim == 3):
        return [images], True
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"image tensors must be [3, H, W] or a batch [B, 3, H, W], got shape "
                             f"{tuple(images.shape)}")
        return list(images), False
    if isinstance(images, Iterable) and not isinstance(images, (bytes, dict)):
        return list(images), False
    raise TypeError("images must be an image path, a PIL image, a tensor [3, H, W] / [B, 3, H, W], or a list of "
                    f"those, got {type(images).__name__}")


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    images: ImageLike | Sequence[ImageLike],
    *,
    device: str | torch.device | None = None,
    batch_size: int = 1,
    score_threshold: float | None = None,
    all_stages: bool = False,
) -> Any:
    """Run `model` in eval mode on image paths, PIL images (converted as istr.data.pil_to_tensor does) or tensors
    ([3, H, W] float in [0, 1] or uint8; a [B, 3, H, W] batch counts as B images), or a list/tuple of those.
    Returns, on the CPU, one result {"boxes", "labels", "scores", "masks"} per image (a single dict for a single
    path/PIL image/[3, H, W] tensor, else a list); detections below score_threshold are dropped.
    all_stages=True returns, per stage, such results (model(images, all_stages=True)).
    The model's train/eval mode is restored afterwards.
    """
    batch_size = check_number("batch_size", batch_size, integer=True, min=1)
    score_threshold = check_number("score_threshold", score_threshold, min=0, max=1, allow_none=True)
    all_stages = check_bool("all_stages", all_stages)
    items, single = _as_items(images)
    if device is not None:
        device = check_device(device, "device")
    else:
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    stages_out: list[list[dict]] | None = None
    try:
        for start in range(0, len(items), batch_size):
            batch = [_as_image(x).to(device) for x in items[start : start + batch_size]]
            out = model(batch, all_stages=True) if all_stages else [model(batch)]
            if stages_out is None:
                stages_out = [[] for _ in out]
            for s, results in enumerate(out):
                stages_out[s].extend(_filter(r, score_threshold) for r in results)
    finally:
        model.train(was_training)
    stages_out = stages_out or [[]]
    per_stage = [r[0] if single else r for r in stages_out]
    return per_stage if all_stages else per_stage[0]


def _filter(result: dict, score_threshold: float | None) -> dict:
    result = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in result.items()}
    if score_threshold is not None and "scores" in result:
        keep = result["scores"] >= score_threshold
        n = keep.shape[0]
        result = {k: v[keep] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == n else v
                  for k, v in result.items()}  # fmt: skip
    return result

"""Deterministic synthetic COCO-format instance segmentation dataset of shapes: "hard" (textured backgrounds,
8 shape classes incl. concave and holed ones, many objects, small ones, occlusion) or "easy" (plain backgrounds,
4 well-separated shapes, a few medium and large objects)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from scipy.ndimage import zoom

from istr.checks import check_number

__all__ = ["SHAPE_CLASSES", "DIFFICULTIES", "make_synthetic_coco", "render_image", "main"]

# Class = shape only; colour, texture, size, rotation and aspect are random for every instance.
# Concave: star, cross, crescent, L; with holes: ring, frame.
SHAPE_CLASSES: tuple[str, ...] = ("ellipse", "triangle", "star", "cross", "crescent", "ring", "frame", "L")

# per difficulty: the shape classes, the background, and defaults for the object counts and the small share
DIFFICULTIES: dict[str, dict] = {
    "hard": dict(shapes=SHAPE_CLASSES, background="textured", min_objects=3, max_objects=10, small_fraction=0.35,
                 min_visible=0.4, inside=False),
    "easy": dict(shapes=("ellipse", "triangle", "cross", "ring"), background="plain", min_objects=1, max_objects=4,
                 small_fraction=0.0, min_visible=1.0, inside=True),
}
# min_visible: a new shape may hide at most 1 - min_visible of an earlier one (placement is retried; 1.0: no
# overlap at all, a shape that cannot be placed after 10 tries is left out). inside: whole shapes only (centres at
# least 1.1 half-extents from the border, which holds the easy shapes: the cross reaches 1.07); otherwise a shape
# may be cut by the image border.
MIN_VISIBLE_PIXELS = 6


def _inside(name: str, p: np.ndarray, q: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Boolean inside-test of shape `name` in normalised local coordinates (p, q): shape fits in [-1, 1]^2."""
    if name == "ellipse":
        return p**2 + (q / rng.uniform(0.55, 1.0)) ** 2 <= 1.0
    if name == "triangle":  # equilateral, circumradius 1
        angles = np.pi / 2 + 2 * np.pi * np.arange(3) / 3
        return np.all([p * np.cos(a) + q * np.sin(a) <= 0.5 for a in angles], axis=0)
    if name == "star":  # 5-point star polygon with straight edges: fold the angle into one half-spike sector
        r_in, half = rng.uniform(0.38, 0.5), np.pi / 5
        rho, alpha = np.hypot(p, q), np.abs(np.mod(np.arctan2(q, p) + half, 2 * half) - half)
        x, y = rho * np.cos(alpha), rho * np.sin(alpha)
        nx, ny = r_in * np.sin(half), 1.0 - r_in * np.cos(half)
        return nx * (x - 1.0) + ny * y <= 0.0
    if name == "cross":
        w = rng.uniform(0.25, 0.38)
        return ((np.abs(p) <= w) & (np.abs(q) <= 1)) | ((np.abs(q) <= w) & (np.abs(p) <= 1))
    if name == "crescent":
        d, r2 = rng.uniform(0.35, 0.55), rng.uniform(0.8, 0.95)
        return (p**2 + q**2 <= 1.0) & ((p - d) ** 2 + q**2 > r2**2)
    if name == "ring":
        a, r_in = rng.uniform(0.75, 1.0), rng.uniform(0.5, 0.7)
        rho = np.hypot(p, q / a)
        return (rho <= 1.0) & (rho >= r_in)
    if name == "frame":
        a, t = rng.uniform(0.7, 1.0), rng.uniform(0.5, 0.7)
        m = np.maximum(np.abs(p), np.abs(q / a))
        return (m <= 1.0) & (m >= t)
    if name == "L":
        t = rng.uniform(0.6, 0.9)  # arm thickness (of the side length 2)
        return (np.abs(p) <= 1) & (np.abs(q) <= 1) & ~((p > -1 + t) & (q < 1 - t))
    raise ValueError(f"unknown shape {name!r}; known: {SHAPE_CLASSES}")


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Blotchy noise [H, W] in about [0, 1]: a coarse random grid upsampled bilinearly."""
    gh, gw = h // cell + 2, w // cell + 2
    return zoom(rng.random((gh, gw)), (h / gh, w / gw), order=1, grid_mode=True, mode="nearest")[:h, :w]


def _background(rng: np.random.Generator, h: int, w: int, kind: str = "textured") -> np.ndarray:
    """Background float [H, W, 3]: "textured" mixes two random colours by a gradient, stripes or blotchy noise;
    "plain" is one random colour."""
    c0, c1 = rng.random(3), rng.random(3)
    if kind == "plain":
        return np.broadcast_to(c0.astype(np.float32), (h, w, 3)).copy()
    yy, xx = np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]
    kind = rng.integers(4)
    theta = rng.uniform(0, np.pi)
    along = (xx * np.cos(theta) + yy * np.sin(theta)) / max(h, w)
    if kind == 0:  # linear gradient
        t = along - along.min()
        t = t / max(t.max(), 1e-6)
    elif kind == 1:  # stripes
        t = 0.5 + 0.5 * np.sin(2 * np.pi * along * rng.uniform(4, 16) + rng.uniform(0, 2 * np.pi))
    elif kind == 2:  # blotches
        t = _smooth_noise(rng, h, w, int(rng.integers(8, 40)))
    else:  # checkerboard, softened
        cell = int(rng.integers(8, 32))
        t = (((xx // cell) + (yy // cell)) % 2) * rng.uniform(0.3, 1.0)
    t = np.broadcast_to(t, (h, w))[..., None].astype(np.float32)
    return c0.astype(np.float32) + (c1 - c0).astype(np.float32) * t


def _sample_size(rng: np.random.Generator, m: int, small_fraction: float = 0.35) -> float:
    """Half-extent s in px of a shape for an image with short side m: `small_fraction` small (area < 32^2), the
    rest medium and big 40:25 (with the default 0.35: 35% small, 40% medium, 25% big)."""
    bucket = rng.random()
    if bucket < small_fraction:
        return rng.uniform(4.0, 12.0)
    if bucket < small_fraction + (1.0 - small_fraction) * 40.0 / 65.0:
        return rng.uniform(12.0, max(16.0, 0.2 * m))
    return rng.uniform(max(16.0, 0.25 * m), max(20.0, 0.45 * m))


def _place(rng: np.random.Generator, h: int, w: int, s: float, owner: np.ndarray, full_areas: list[int],
           shapes: Sequence[str] = SHAPE_CLASSES, min_visible: float = 0.4, inside: bool = False):
    """Draw a random shape (one of `shapes`) of half-extent s; return (class index into shapes, window slices,
    boolean mask in window) or None when 10 placements all hide too much of an earlier shape."""
    cls = int(rng.integers(len(shapes)))
    mx, my = (min(1.1 * s, w / 2), min(1.1 * s, h / 2)) if inside else (0.0, 0.0)  # centre margins
    for _ in range(10):
        cx, cy, theta = rng.uniform(mx, w - mx), rng.uniform(my, h - my), rng.uniform(0, 2 * np.pi)
        x0, x1 = max(int(cx - 1.5 * s), 0), min(int(cx + 1.5 * s) + 2, w)
        y0, y1 = max(int(cy - 1.5 * s), 0), min(int(cy + 1.5 * s) + 2, h)
        if x1 <= x0 or y1 <= y0:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
        dx, dy = xx - cx, yy - cy
        p = (np.cos(theta) * dx + np.sin(theta) * dy) / s
        q = (-np.sin(theta) * dx + np.cos(theta) * dy) / s
        mask = _inside(shapes[cls], p, q, rng)
        if mask.sum() < MIN_VISIBLE_PIXELS:
            continue
        window = (slice(y0, y1), slice(x0, x1))
        covered = owner[window][mask]
        lost = np.bincount(covered[covered >= 0], minlength=len(full_areas))
        visible_after = np.bincount(owner[owner >= 0], minlength=len(full_areas)) - lost
        if all(v >= min_visible * a for v, a in zip(visible_after, full_areas)):
            return cls, window, mask
    return None


def render_image(
    rng: np.random.Generator, image_size: tuple[int, int], min_objects: int = 3, max_objects: int = 10,
    small_fraction: float = 0.35, shapes: Sequence[str] = SHAPE_CLASSES, background: str = "textured",
    min_visible: float = 0.4, inside: bool = False,
) -> tuple[np.ndarray, list[dict]]:
    """Render one image -> (uint8 [H, W, 3], instances [{"label" (index into shapes), "mask": bool [H, W]
    visible part, "visible_fraction"}]). Later shapes occlude earlier ones; masks are the visible parts."""
    h, w = image_size
    image = _background(rng, h, w, background)
    owner = np.full((h, w), -1, dtype=np.int64)  # index of the instance that owns each pixel
    labels: list[int] = []
    full_areas: list[int] = []
    # larger shapes first, so smaller ones occlude them (as in photos) rather than hiding behind them
    count = int(rng.integers(min_objects, max_objects + 1))
    sizes = sorted((_sample_size(rng, min(h, w), small_fraction) for _ in range(count)), reverse=True)
    for s in sizes:
        placed = _place(rng, h, w, s, owner, full_areas, shapes, min_visible, inside)
        if placed is None:
            continue
        cls, window, mask = placed
        region = image[window]
        bg_mean = region[mask].mean(axis=0)
        for _ in range(5):  # colour far enough from the local background to be visible
            colour = rng.random(3).astype(np.float32)
            if np.abs(colour - bg_mean).sum() > 0.45:
                break
        yy, xx = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]].astype(np.float32)
        shade = 1.0 + rng.uniform(-0.25, 0.25) * (xx / max(mask.shape[1], 1) - 0.5) + rng.uniform(-0.25, 0.25) * (
            yy / max(mask.shape[0], 1) - 0.5
        )
        region[mask] = np.clip(colour[None] * shade[mask][:, None], 0, 1)
        owner[window][mask] = len(labels)
        labels.append(cls)
        full_areas.append(int(mask.sum()))
    # pixel noise: uniform with std in [0.01, 0.05] (uniform draws are ~4x cheaper than normal ones)
    amplitude = np.float32(rng.uniform(0.01, 0.05) * np.sqrt(12.0))
    noise = rng.random(size=image.shape, dtype=np.float32)
    noise -= np.float32(0.5)
    noise *= amplitude
    image += noise
    np.clip(image, 0.0, 1.0, out=image)
    image *= np.float32(255.0)
    image += np.float32(0.5)
    image = image.astype(np.uint8)
    instances = []
    for i, (cls, full) in enumerate(zip(labels, full_areas)):
        visible = owner == i
        n = int(visible.sum())
        if n >= MIN_VISIBLE_PIXELS:
            instances.append({"label": cls, "mask": visible, "visible_fraction": n / full})
    return image, instances


def _write_split(
    root: Path, split: str, count: int, first_id: int, image_size: tuple[int, int], seed: int, split_index: int,
    min_objects: int, max_objects: int, small_fraction: float, image_format: str, save: Callable,
    shapes: Sequence[str], background: str, min_visible: float, inside: bool,
) -> Path:  # fmt: skip
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    h, w = image_size
    for k in range(count):
        rng = np.random.default_rng([seed, split_index, k])  # one stream per image: order-independent
        pixels, instances = render_image(rng, image_size, min_objects, max_objects, small_fraction, shapes, background,
                                         min_visible, inside)
        image_id = first_id + k
        file_name = f"{image_id:06d}.{image_format}"
        save(pixels, image_dir / file_name)
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        for inst in instances:
            rle = mask_utils.encode(np.asfortranarray(inst["mask"].astype(np.uint8)))
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": inst["label"] + 1,
                "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                "area": int(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": 0,
                "visible_fraction": round(float(inst["visible_fraction"]), 4),
            })  # fmt: skip
    data = {
        "info": {"description": f"istr synthetic shapes, split={split}, seed={seed}", "version": "1"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(shapes)],
    }
    ann_path = root / "annotations" / f"instances_{split}.json"
    ann_path.parent.mkdir(parents=True, exist_ok=True)
    ann_path.write_text(json.dumps(data, separators=(",", ":")))
    return ann_path


def make_synthetic_coco(
    out_dir: str | Path,
    num_train: int = 200,
    num_val: int = 50,
    image_size: int | Sequence[int] = (256, 256),
    seed: int = 0,
    *,
    difficulty: str = "hard",
    min_objects: int | None = None,
    max_objects: int | None = None,
    small_fraction: float | None = None,
    image_format: str = "jpg",
) -> dict[str, str]:
    """Write a COCO-format synthetic dataset under out_dir, deterministically from `seed`.

    Layout: out_dir/{train,val}/NNNNNN.jpg (or .png) and out_dir/annotations/instances_{train,val}.json (compressed-RLE
    segmentations of the visible parts, bbox, area, iscrowd=0, and an extra "visible_fraction" per annotation).
    difficulty (DIFFICULTIES): "hard" draws the 8 SHAPE_CLASSES (concave ones and ones with holes) on textured
    backgrounds, 3-10 per image, a third of them small (< 32^2 px), partly hiding each other; "easy" draws 4
    well-separated shapes (ellipse, triangle, cross, ring) on plain backgrounds, 1-4 per image (fewer where they do not
    fit), none small, none overlapping, none cut by the image border. min_objects, max_objects and small_fraction
    override the difficulty's. Colours are random per instance, so the class is the shape. The
    same arguments give byte-identical json and images. Returns {"root", "train_images", "train_annotations",
    "val_images", "val_annotations"} as str.
    """
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    if isinstance(image_size, (str, bytes)) or not hasattr(image_size, "__len__") or len(image_size) != 2:
        raise TypeError(f"image_size must be an int or (height, width), got {image_size!r} "
                        f"({type(image_size).__name__})")
    h, w = (check_number("image_size", v, integer=True, min=16) for v in image_size)
    num_train = check_number("num_train", num_train, integer=True, min=0)
    num_val = check_number("num_val", num_val, integer=True, min=0)
    seed = check_number("seed", seed, integer=True, min=0)
    min_objects = check_number("min_objects", min_objects, integer=True, min=1, allow_none=True)
    max_objects = check_number("max_objects", max_objects, integer=True, min=1, allow_none=True)
    small_fraction = check_number("small_fraction", small_fraction, min=0, max=1, allow_none=True)
    if not isinstance(image_format, str):
        raise TypeError(f"image_format must be 'png' or 'jpg', got {image_format!r} ({type(image_format).__name__})")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {sorted(DIFFICULTIES)}, got {difficulty!r}")
    preset = DIFFICULTIES[difficulty]
    min_objects = preset["min_objects"] if min_objects is None else min_objects
    max_objects = preset["max_objects"] if max_objects is None else max_objects
    small_fraction = preset["small_fraction"] if small_fraction is None else small_fraction
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train and num_val must be >= 0, got {num_train}, {num_val}")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    if not 0.0 <= small_fraction <= 1.0:
        raise ValueError(f"small_fraction must be in [0, 1], got {small_fraction}")
    fmt = image_format.lower().lstrip(".")
    if fmt not in ("png", "jpg", "jpeg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    from PIL import Image

    def save(pixels: np.ndarray, path: Path) -> None:
        if fmt == "png":
            Image.fromarray(pixels).save(path, format="PNG", compress_level=1)
        else:
            Image.fromarray(pixels).save(path, format="JPEG", quality=95)

    root = Path(out_dir)
    common = dict(image_size=(h, w), seed=seed, min_objects=min_objects, max_objects=max_objects,
                  small_fraction=small_fraction, image_format=fmt, save=save, shapes=preset["shapes"],
                  background=preset["background"], min_visible=preset["min_visible"], inside=preset["inside"])  # fmt: skip
    train_ann = _write_split(root, "train", num_train, 1, split_index=0, **common)
    val_ann = _write_split(root, "val", num_val, num_train + 1, split_index=1, **common)
    return {
        "root": str(root),
        "train_images": str(root / "train"),
        "train_annotations": str(train_ann),
        "val_images": str(root / "val"),
        "val_annotations": str(val_ann),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
    """CLI: python -m istr.data.synthetic OUT_DIR [--num-train N] [--num-val N] [--size H [W]] [--seed S]."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out_dir")
    parser.add_argument("--num-train", type=int, default=200)
    parser.add_argument("--num-val", type=int, default=50)
    parser.add_argument("--size", type=int, nargs="+", default=[256], help="H [W]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--difficulty", default="hard", choices=sorted(DIFFICULTIES))
    parser.add_argument("--min-objects", type=int, default=None, help="default: the difficulty's")
    parser.add_argument("--max-objects", type=int, default=None, help="default: the difficulty's")
    parser.add_argument("--small-fraction", type=float, default=None, help="share of small shapes (area < 32^2)")
    parser.add_argument("--format", default="jpg", choices=["png", "jpg"])
    args = parser.parse_args(argv)
    size = (args.size[0], args.size[-1])
    try:
        paths = make_synthetic_coco(args.out_dir, args.num_train, args.num_val, size, args.seed,
                                    difficulty=args.difficulty, min_objects=args.min_objects,
                                    max_objects=args.max_objects, small_fraction=args.small_fraction,
                                    image_format=args.format)  # fmt: skip
    except (ValueError, TypeError, OSError) as exc:  # bad values and unwritable folders: one line, status 2
        parser.error(" ".join(str(exc).split()))
    print(json.dumps(paths, indent=1))
    return paths


if __name__ == "__main__":
    main()

"""A trained model leaves Python: export to ONNX or torch.export (.pt2), run the file with onnxruntime (OnnxPredictor).

Over 400 lines as one job: the graph contract, the writer that records it in the file and the predictor that reads it
back must agree, and are kept in one place (the families' heads live in istr/models/<family>/export.py).

The exported graph (each family's `model.export_head()`, an ExportHead) is tensor in, tensor out:

    inputs   images [B, 3, H, W] float32 in [0, 1]: the images resized on the host exactly as the model's transform
                    resizes them (short side min_size, long side at most max_size, bilinear) and padded at the
                    bottom/right to H, W (multiples of size_divisible, 32; any pad value);
             sizes  [B, 2] int64: each image's resized (h, w) inside the padded batch.
    outputs  boxes  [B, K, 4] float32 xyxy in input pixels, clipped to the image;
             scores [B, K] float32; labels [B, K] int64;
             masks  [B, K, H, W] float32 mask probabilities on the padded input (0 outside the image);
             valid  [B, K] bool: the detections eager inference keeps (K = detections_per_image, or Q x C when
                    smaller); a family may add outputs (ISTR: mask_grids [B, K, M, M], pasted at the original size
                    by OnnxPredictor exactly as eager inference pastes them).

Valid detections equal model.eval()'s results for an image padded alone (eager inference groups images by padded
size; OnnxPredictor does the same). Normalisation and padding happen inside the graph. A dynamic graph accepts any
batch and any H, W that are multiples of size_divisible from the smallest size whose coarsest feature map has 2
cells (64 for ISTR's stride 32, 96 for ISDA's stride 64; smaller images are padded up to it) to `image_size`; a
static one (dynamic=False) only `image_size` (and any batch).

The legacy exporter (torch.jit.trace, torch.onnx.export(..., dynamo=False)) is refused by the heads and by the
models' forward with an error naming this module: a traced graph freezes sizes and detection counts. The file's metadata ("istr", JSON) holds what the host needs: min_size, max_size,
size_divisible, the size range, the family, mask_threshold, categories.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

__all__ = ["EXPORT_FORMATS", "ExportHead", "MissingExtraError", "OnnxPredictor", "ExportedPredictor", "add_cli",
           "export", "is_exported_model", "read_metadata"]

EXPORT_FORMATS = ("onnx", "pt2")
INPUT_NAMES = ("images", "sizes")
OUTPUT_NAMES = ("boxes", "scores", "labels", "masks", "valid")
METADATA_KEY = "istr"  # ONNX metadata_props key / .pt2 extra file "istr.json"
FORMAT_VERSION = 1
EXTRA_HINT = "pip install -e '.[export]'"


class MissingExtraError(ImportError, ValueError):
    """An optional dependency of exporting or of running an exported model (onnx, onnxruntime) is not installed."""


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(f"{module} is not installed; install the export extra: {EXTRA_HINT}") from None


def _legacy_error(name: str) -> RuntimeError:
    return RuntimeError(
        f"{name} cannot be exported with torch.jit.trace or the legacy torch.onnx.export(..., dynamo=False): a traced "
        "graph would freeze sizes and detection counts to the traced images (a silently wrong file). Use "
        "istr.export.export(model, path, format='onnx' | 'pt2') (`istr export`), or torch.onnx.export(head, ..., "
        "dynamo=True) / torch.export.export(head, ...)")


# ---------------------------------------------------------------------------------------------------- the head
class ExportHead(nn.Module):
    """Base of a family's export head: forward(images [B, 3, H, W] in [0, 1], sizes [B, 2] int64) -> a tuple of
    tensors named `output_names` (see the module docstring). Built as Head(model) from an eval-mode model.

    A family implements `infer(batch, sizes)` on the normalised, zero-padded batch, and the host side
    `results(outputs, sizes, original_sizes, metadata)` (a classmethod: the predictor has no model); it may
    extend `check()` (value checks, run before tracing) and `metadata()`."""

    output_names: tuple[str, ...] = OUTPUT_NAMES

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        transform = model.transform
        self.register_buffer("mean", transform.mean.detach().clone(), persistent=False)
        self.register_buffer("std", transform.std.detach().clone(), persistent=False)

    @property
    def family(self) -> str:
        return getattr(type(self.model), "architecture", None) or type(self.model).__name__

    def check(self) -> None:
        """Value checks of the model that must hold before tracing (nothing in the base)."""

    def metadata(self) -> dict[str, Any]:
        """Plain values the host needs to feed the graph and read its outputs (stored in the exported file)."""
        model, transform = self.model, self.model.transform
        threshold = getattr(model, "mask_threshold", None)
        return {"format_version": FORMAT_VERSION, "family": self.family, "preset": getattr(model, "preset", None),
                "head": f"{type(self).__module__}:{type(self).__name__}",
                "num_classes": int(model.num_classes), "categories": getattr(model, "categories", None),
                "detections_per_image": int(model.detections_per_image),
                "mask_threshold": None if threshold is None else float(threshold),
                "min_size": transform.min_size, "max_size": transform.max_size,
                "size_divisible": transform.size_divisible,
                "input_names": list(INPUT_NAMES), "output_names": list(self.output_names)}

    def normalize(self, images: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> normalised as the model's transform, 0 outside each image's (h, w)."""
        x = (images.to(self.mean.dtype) - self.mean) / self.std
        rows = torch.arange(images.shape[2], device=images.device)
        cols = torch.arange(images.shape[3], device=images.device)
        inside = (rows[None, :, None] < sizes[:, 0, None, None]) & (cols[None, None, :] < sizes[:, 1, None, None])
        return torch.where(inside[:, None], x, torch.zeros_like(x))

    def forward(self, images: torch.Tensor, sizes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if torch.jit.is_tracing():
            raise _legacy_error(f"{type(self).__name__} (the {self.family!r} export head)")
        out = self.infer(self.normalize(images, sizes), sizes)
        return tuple(out[name] for name in self.output_names)

    def infer(self, batch: torch.Tensor, sizes: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @classmethod
    def results(cls, outputs: dict[str, torch.Tensor], sizes: list[tuple[int, int]],
                original_sizes: list[tuple[int, int]], metadata: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        """Host side: the graph's outputs for images resized to `sizes` -> torchvision-style results at the
        original sizes, as model.eval() returns them."""
        raise NotImplementedError


def clip_boxes(boxes: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """boxes [B, K, 4] xyxy clamped to each image: x to [0, w], y to [0, h] (sizes [B, 2] = (h, w))."""
    h = sizes[:, 0, None].to(boxes.dtype)
    w = sizes[:, 1, None].to(boxes.dtype)
    zero = torch.zeros_like(boxes[..., 0])
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([torch.minimum(torch.maximum(x0, zero), w), torch.minimum(torch.maximum(y0, zero), h),
                        torch.minimum(torch.maximum(x1, zero), w), torch.minimum(torch.maximum(y1, zero), h)], -1)


# ---------------------------------------------------------------------------------------------------- export
def _check_model(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module) or not callable(getattr(model, "export_head", None)):
        raise TypeError(f"model must be an istr model (istr.create_model / istr.load_model), got {type(model).__name__}")
    return model


def _min_side(model: nn.Module, div: int) -> int:
    """The smallest padded side a graph accepts: the coarsest feature map must have at least 2 cells (the tracer
    fixes a size of 1 as a special case), i.e. the first multiple of div above the largest stride."""
    strides = getattr(getattr(model, "backbone", None), "strides", None) or getattr(model, "strides", None) or (div,)
    return (max(int(s) for s in strides) // div + 1) * div


def _size_range(model: nn.Module, image_size: Any, dynamic: bool) -> tuple[int, tuple[int, int], tuple[int, int]]:
    """(size_divisible, smallest (H, W), largest (H, W)): the one size of a static graph, or a dynamic graph's range."""
    transform = model.transform
    div = transform.size_divisible
    low = _min_side(model, div)
    if image_size is None:
        side = max(-(-transform.max_size // div) * div, low)  # the largest padded side the model's transform gives
        size = (side, side)
    else:
        if (not isinstance(image_size, (tuple, list)) or len(image_size) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in image_size)):
            raise TypeError(f"image_size must be two ints (H, W), got {image_size!r}")
        h, w = image_size
        what = "a static graph's size" if not dynamic else "a dynamic graph's largest size"
        if h < 1 or w < 1 or h % div or w % div:
            raise ValueError(f"image_size {h}x{w}: {what} must be multiples of the model's size_divisible ({div}), "
                             f"e.g. {max(div, -(-h // div) * div)}x{max(div, -(-w // div) * div)}")
        if h < low or w < low:
            raise ValueError(f"image_size {h}x{w}: {what} must be at least {low}x{low} for this model (its coarsest "
                             f"feature map, stride {low - div}, needs 2 cells)")
        size = (h, w)
    return div, ((low, low) if dynamic else size), size


def _example_inputs(div: int, low: tuple[int, int], size: tuple[int, int],
                    dynamic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs to trace with: batch 2; a dynamic graph's H, W distinct multiples of div inside the range (the tracer
    would tie two equal sizes together), from the range's low end up."""
    if dynamic:
        lo, kh_max, kw_max = low[0] // div, size[0] // div, size[1] // div
        kh = min(max(lo + 1, 4), kh_max)
        kw = next((k for k in (kh + 1, kh - 1, kh + 2) if lo <= k <= kw_max), kw_max)
        h, w = kh * div, kw * div
    else:
        h, w = size
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, h, w, generator=gen)
    sizes = torch.tensor([[h, w], [max(h - div // 2, 1), max(w - div, 1)]], dtype=torch.long)
    return images, sizes


def _dynamic_shapes(div: int, low: tuple[int, int], size: tuple[int, int], dynamic: bool) -> dict[str, Any]:
    from torch.export import Dim

    batch = Dim("batch", min=1, max=1024)
    if not dynamic:
        return {"images": {0: batch}, "sizes": {0: batch}}
    images: dict[int, Any] = {0: batch}
    for axis, name, lo, hi in ((2, "height_blocks", low[0], size[0]), (3, "width_blocks", low[1], size[1])):
        if hi > lo:  # a range of one size is a static axis
            images[axis] = div * Dim(name, min=lo // div, max=hi // div)
    return {"images": images, "sizes": {0: batch}}


def export(model: nn.Module, path: str | Path, format: str = "onnx", image_size: Sequence[int] | None = None,
           dynamic: bool = True, *, opset_version: int | None = None) -> Path:
    """Write `model`'s inference graph (model.export_head(), the contract in istr.export's docstring) to `path`.

    format: "onnx" (the dynamo exporter; needs the export extra: onnx, onnxscript) or "pt2" (torch.export.save;
    load with torch.export.load(path).module()). image_size (H, W): multiples of the model's size_divisible; with
    dynamic=True (default) the largest padded size the graph accepts (default: the largest the model's transform
    gives, max_size rounded up), any batch and any smaller multiples of size_divisible; with dynamic=False the one
    size it accepts. The model's value checks (a fitted codec, ...) run here, before tracing. Returns the path.
    """
    model = _check_model(model)
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {EXPORT_FORMATS}, got {format!r}")
    if not isinstance(dynamic, bool):
        raise TypeError(f"dynamic must be a bool, got {type(dynamic).__name__}")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; expected a file path for the exported model")
    div, low, size = _size_range(model, None if image_size is None else tuple(image_size), dynamic)
    if format == "onnx":
        _require("onnx"), _require("onnxscript")
    device = next(iter(model.parameters())).device
    was_training = model.training
    model.eval()
    try:
        head = model.export_head()
        head.check()
        head.eval()
        images, sizes = (t.to(device) for t in _example_inputs(div, low, size, dynamic))
        meta = head.metadata()
        meta.update({"dynamic": dynamic, "image_size": list(size), "min_image_size": list(low),
                     "format": format, "torch": torch.__version__})
        shapes = _dynamic_shapes(div, low, size, dynamic)
        path.parent.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            if format == "pt2":
                program = torch.export.export(head, (images, sizes), dynamic_shapes=shapes, strict=False)
                torch.export.save(program, str(path), extra_files={f"{METADATA_KEY}.json": json.dumps(meta)})
            else:
                _export_onnx(head, images, sizes, shapes, path, meta, opset_version)
    finally:
        model.train(was_training)
    return path


def _export_onnx(head: ExportHead, images: torch.Tensor, sizes: torch.Tensor, shapes: dict[str, Any], path: Path,
                 meta: dict[str, Any], opset_version: int | None) -> None:
    import contextlib
    import io
    import logging
    import warnings

    quiet = logging.getLogger("onnxscript")  # its optimizer warns about every Split it does not fold
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(head, (images, sizes), None, dynamo=True, input_names=list(INPUT_NAMES),
                                        output_names=list(head.output_names), dynamic_shapes=shapes,
                                        opset_version=opset_version, external_data=False, verbose=False)
        finally:
            quiet.setLevel(level)
    program.model.metadata_props[METADATA_KEY] = json.dumps(meta)
    program.save(str(path), external_data=False)


# ---------------------------------------------------------------------------------------------------- running
def is_exported_model(path: str | Path) -> bool:
    """True for an existing .onnx or .pt2 file (a model written by istr.export.export)."""
    path = Path(path)
    return path.suffix.lower() in (".onnx", ".pt2") and path.is_file()


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The "istr" metadata of an exported file (.onnx or .pt2); ValueError for a file istr did not export."""
    path = Path(path)
    if path.suffix.lower() == ".pt2":
        import zipfile

        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith(f"extra/{METADATA_KEY}.json")]
            if not names:
                raise ValueError(f"{path} is a .pt2 file without istr metadata (not written by istr.export.export)")
            return json.loads(archive.read(names[0]))
    onnx = _require("onnx")
    model = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise ValueError(f"{path} is an ONNX file without istr metadata (not written by istr.export.export)")
    return json.loads(props[METADATA_KEY])


def _head_class(meta: dict[str, Any]) -> type:
    import importlib

    import istr.models  # noqa: F401  (registers the library's families)

    module_name, _, class_name = str(meta.get("head", "")).partition(":")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(f"the exported model's head {meta.get('head')!r} (family {meta.get('family')!r}) is not "
                         "importable here; import the package that defines the family first") from None


class ExportedPredictor:
    """Run an exported model (.onnx with onnxruntime, or .pt2 with torch.export.load) like istr.predict.

    predictor(images, batch_size=1, score_threshold=None): image paths, PIL images, [3, H, W] tensors (float in
    [0, 1] or uint8), a [B, 3, H, W] batch, or a list of those -> one result dict {"boxes", "labels", "scores",
    "masks" [N, 1, H, W]} per image at its original size (a single dict for a single image), as model.eval().
    The host resizes each image as the model's transform does and batches only images of the same padded size
    (as eager inference), padding them to it; a static graph pads every image to its one size, so its results
    equal eager's only for images whose own padded size that is (the backbone sees the extra padding).
    """

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no exported model at {self.path}")
        suffix = self.path.suffix.lower()
        if suffix not in (".onnx", ".pt2"):
            raise ValueError(f"{self.path}: expected an exported model (.onnx or .pt2), got a {suffix or 'suffix-less'} file")
        self.metadata = read_metadata(self.path)
        self.head_class = _head_class(self.metadata)
        self.output_names = list(self.metadata["output_names"])
        self._run: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
        if suffix == ".onnx":
            self._run = self._onnx_runner(threads)
        else:
            program = torch.export.load(str(self.path))
            module = program.module()
            if threads is not None:
                torch.set_num_threads(threads)
            self._run = lambda images, sizes: dict(zip(self.output_names, module(images, sizes)))
        from istr.models.transform import ImageTransform

        m = self.metadata
        self.transform = ImageTransform(m["min_size"], m["max_size"], None, m["size_divisible"])

    def _onnx_runner(self, threads: int | None) -> Callable:
        ort = _require("onnxruntime")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.session = session

        def run(images: torch.Tensor, sizes: torch.Tensor) -> dict[str, torch.Tensor]:
            feeds = {"images": images.numpy(), "sizes": sizes.numpy()}
            return {k: torch.from_numpy(v) for k, v in zip(self.output_names, session.run(self.output_names, feeds))}

        return run

    # ------------------------------------------------------------------ host side
    def _check_size(self, hp: int, wp: int) -> None:
        lo, hi = self.metadata["min_image_size"], self.metadata["image_size"]
        if not (lo[0] <= hp <= hi[0] and lo[1] <= wp <= hi[1]):
            what = (f"the graph's one size {hi[0]}x{hi[1]} (exported with dynamic=False)" if not self.metadata["dynamic"]
                    else f"the graph's range {lo[0]}x{lo[1]} .. {hi[0]}x{hi[1]}")
            raise ValueError(f"an image resized and padded to {hp}x{wp} does not fit {what}; export again with a "
                             f"larger image_size (istr export --image-size H W)")

    def prepare(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        """Images of one padded size -> (batch [B, 3, Hp, Wp] in [0, 1], sizes [B, 2], resized sizes), the resize
        of the model's transform (bilinear, no antialias) done here."""
        import torch.nn.functional as F

        resized, sizes = [], []
        for img in images:
            img = img.to(torch.float32)
            h, w = img.shape[-2:]
            size = self.transform.resized_size(h, w, self.transform.min_size)
            if size != (h, w):
                img = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0]
            resized.append(img)
            sizes.append(size)
        div = self.transform.size_divisible
        if self.metadata["dynamic"]:  # padded as eager pads; at least to the graph's smallest size
            lo = self.metadata["min_image_size"]
            hp = max(int(math.ceil(max(s[0] for s in sizes) / div) * div), lo[0])
            wp = max(int(math.ceil(max(s[1] for s in sizes) / div) * div), lo[1])
        else:
            hp, wp = self.metadata["image_size"]
            if any(h > hp or w > wp for h, w in sizes):
                self._check_size(max(s[0] for s in sizes), max(s[1] for s in sizes))
        self._check_size(hp, wp)
        batch = torch.zeros((len(resized), 3, hp, wp))
        for b, img in enumerate(resized):
            batch[b, :, : img.shape[1], : img.shape[2]] = img
        return batch, torch.tensor(sizes, dtype=torch.long), sizes

    @torch.no_grad()
    def infer(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Checked float [3, H, W] images in [0, 1] -> results at their original sizes, grouped by padded size."""
        from istr.models.base import grouped
        from istr.models.transform import check_images

        images = [img.cpu() for img in check_images(images)]

        def run(group: list[torch.Tensor], _: bool) -> list[dict[str, torch.Tensor]]:
            batch, sizes_t, sizes = self.prepare(group)
            outputs = self._run(batch, sizes_t)
            original = [(int(img.shape[-2]), int(img.shape[-1])) for img in group]
            return self.head_class.results(outputs, sizes, original, self.metadata)

        return grouped(run, images, self.transform.same_size_groups(images), False)

    def __call__(self, images: Any, *, batch_size: int = 1, score_threshold: float | None = None) -> Any:
        from istr.engine.predict import _as_image, _as_items, _filter

        items, single = _as_items(images)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        results: list[dict] = []
        for start in range(0, len(items), batch_size):
            batch = [_as_image(x) for x in items[start: start + batch_size]]
            results.extend(_filter(r, score_threshold) for r in self.infer(batch))
        return results[0] if single else results


    def as_module(self) -> nn.Module:
        """An eval-mode nn.Module around this predictor: module(images) -> results, for istr.engine.evaluate (which
        reads num_classes and categories from it): evaluate(predictor.as_module(), dataset)."""
        return _PredictorModule(self)


class _PredictorModule(nn.Module):
    def __init__(self, predictor: ExportedPredictor) -> None:
        super().__init__()
        self.predictor = predictor
        self.num_classes = int(predictor.metadata["num_classes"])
        self.categories = predictor.metadata.get("categories")
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)

    def forward(self, images: list[torch.Tensor], all_stages: bool = False) -> list[dict[str, torch.Tensor]]:
        if all_stages:
            raise ValueError("an exported model gives the last stage only; evaluate it without all_stages")
        return self.predictor.infer(list(images))


class OnnxPredictor(ExportedPredictor):
    """ExportedPredictor for an .onnx file (onnxruntime, CPU); `threads` sets onnxruntime's intra-op threads."""

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        if Path(path).suffix.lower() != ".onnx":
            raise ValueError(f"OnnxPredictor runs .onnx files, got {path} (ExportedPredictor also runs .pt2)")
        _require("onnxruntime")
        super().__init__(path, threads=threads)


# ---------------------------------------------------------------------------------------------------- CLI
def add_cli(subparsers: Any) -> Any:
    """Add the `export` sub-command to istr's argparse sub-parsers (istr.cli wires it in): istr export
    RUN_DIR|MODEL_FILE --out PATH [--format onnx|pt2] [--image-size H W] [--static] [--overwrite]."""
    p = subparsers.add_parser(
        "export", help="export a model to ONNX or torch.export (.pt2) for deployment",
        description="Write a trained model's inference graph (images [B, 3, H, W] in [0, 1] + sizes [B, 2] -> boxes, "
        "scores, labels, masks, valid) as ONNX (onnxruntime; needs the export extra: " + EXTRA_HINT + ") or a "
        "torch.export .pt2 file. Run it with `istr predict OUT IMAGE...` or istr.export.OnnxPredictor.")
    p.add_argument("model", help="model file, checkpoint directory or training run directory")
    p.add_argument("--out", required=True, metavar="PATH", help="the exported file (.onnx or .pt2)")
    p.add_argument("--format", choices=EXPORT_FORMATS, default=None,
                   help="onnx or pt2 (default: from --out's suffix, else onnx)")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="the largest padded input size of a dynamic graph, or the one size of a --static graph "
                   "(multiples of 32; default: the model's max_size rounded up)")
    p.add_argument("--static", action="store_true", help="fix H and W to --image-size (the batch stays dynamic)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--device", default="cpu", help="where to trace the model (default cpu)")
    p.set_defaults(func=cmd_export)
    return p


def cmd_export(args: Any) -> int:
    """`istr export`: load, export, and print one line naming the file and its size range."""
    from istr.cli import resolve_model_path
    from istr.io import load_model

    out = Path(args.out)
    fmt = args.format or ("pt2" if out.suffix.lower() == ".pt2" else "onnx")
    if out.suffix.lower() not in (f".{fmt}",):
        raise ValueError(f"--out {out}: a {fmt} file must end in .{fmt}")
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is an existing directory; expected a file path")
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"--out {out} exists; pass --overwrite to replace it, or choose a new file")
    try:
        model = load_model(resolve_model_path(args.model), map_location=args.device)
        path = export(model, out, format=fmt, image_size=None if args.image_size is None else tuple(args.image_size),
                      dynamic=not args.static)
    except (MissingExtraError, NotImplementedError, TypeError) as exc:
        raise ValueError(str(exc)) from exc
    meta = read_metadata(path) if fmt == "pt2" or _has("onnx") else {}
    lo, hi = meta.get("min_image_size"), meta.get("image_size")
    sizes = f"{hi[0]}x{hi[1]} only" if args.static else f"{lo[0]}x{lo[1]} .. {hi[0]}x{hi[1]}" if lo else "?"
    print(f"exported {meta.get('family', 'the model')} ({meta.get('preset') or 'custom'}) to {path} "
          f"({path.stat().st_size / 2 ** 20:.1f} MiB, {fmt}; input sizes {sizes}, any batch); run it with: "
          f"istr predict {path} IMAGE...")
    return 0


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None

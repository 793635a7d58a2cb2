"""What every model family shares: the config round trip from the constructor's arguments, input checks, the
backbone contract, top-k over the K x C score grid, and inference grouped by padded size.

A family (ISTR, ISDA, or a third one added from outside the package) subclasses `DetectionModel`:

    @register_architecture("myfamily")
    class MyFamily(DetectionModel):
        def __init__(self, backbone, num_classes=80, *, criterion=None, num_queries=100, ...): ...
        def forward(self, images, targets=None, all_stages=False): ...

A family that can leave Python names its export head (istr.export): `export_head_class = "package.module:Class"`,
an `istr.export.ExportHead` subclass built as Class(model); the base model raises NotImplementedError naming the
family.

Its constructor's arguments ARE its config: `config()` returns them (modules by their own configs) and
`from_config(config)` calls the constructor with them, so save_model / load_model need no hand-written patch.
"""
from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any, Callable, Sequence

import torch
from torch import nn

from istr.checks import check_bool, check_number
from istr.losses.criterion import criterion_config, criterion_from_config
from istr.models.backbone import build_backbone
from istr.models.targets import check_targets
from istr.models.transform import check_images

__all__ = ["DetectionModel", "check_backbone", "check_positive_ints", "topk_over_classes", "grouped"]


def check_backbone(backbone: Any, hidden_dim: int, strides: Sequence[int] | None = None) -> tuple[int, ...]:
    """The backbone contract: a module with `out_channels` (== hidden_dim) and `strides` (== `strides` when given),
    whose forward returns one map per stride. Returns its strides; TypeError/ValueError naming what is missing."""
    for key in ("out_channels", "strides"):
        if not hasattr(backbone, key):
            raise TypeError(f"the backbone must expose `{key}` (the backbone contract: out_channels, strides, "
                            f"forward -> one map per stride; see istr.models.backbone); {type(backbone).__name__} "
                            "does not")
    found = tuple(backbone.strides)
    if strides is not None and found != tuple(strides):
        raise ValueError(f"this model needs the backbone's maps at strides {tuple(strides)}, got {found}")
    if backbone.out_channels != hidden_dim:
        raise ValueError(f"the backbone gives {backbone.out_channels}-channel maps but hidden_dim={hidden_dim}; "
                         "they must agree (set the neck's out_channels)")
    return found


def check_positive_ints(**values: Any) -> None:
    """ValueError for any value that is not an int >= 1 (bools rejected), naming it."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r} ({type(value).__name__})")


def topk_over_classes(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k over the Q x C sigmoid scores of each image (a query may give several classes; no NMS).
    logits [B, Q, C] -> (scores [B, k'], labels [B, k'], query indices [B, k']) with k' = min(k, Q * C)."""
    b, q, c = logits.shape
    scores, index = torch.sigmoid(logits).flatten(1).topk(min(k, q * c), dim=1)
    return scores, index % c, torch.div(index, c, rounding_mode="floor")


def grouped(infer: Callable, images: list[torch.Tensor], groups: list[list[int]], all_stages: bool) -> Any:
    """Run `infer(images of one group, all_stages)` per group and put the results back in input order
    (a list of per-image results, or with all_stages a list over stages of such lists)."""
    if len(groups) == 1:
        return infer(images, all_stages)
    parts = [(group, infer([images[i] for i in group], all_stages)) for group in groups]
    num_stages = len(parts[0][1]) if all_stages else 1
    merged: list[list[Any]] = [[None] * len(images) for _ in range(num_stages)]
    for group, out in parts:
        for stage, results in enumerate(out if all_stages else [out]):
            for i, result in zip(group, results):
                merged[stage][i] = result
    return merged if all_stages else merged[0]


# constructor arguments checked by their annotation before any family code sees them: a bool option takes only
# booleans ("False" is refused, not read as true), a number only numbers (finite; ints where an int is declared)
_TYPE_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "bool": check_bool,
    "int": lambda name, v: check_number(name, v, integer=True),
    "float": check_number,
    "int | None": lambda name, v: check_number(name, v, integer=True, allow_none=True),
    "float | None": lambda name, v: check_number(name, v, allow_none=True),
}


def _check_argument_types(signature: inspect.Signature, arguments: dict[str, Any], owner: str) -> None:
    for name, value in arguments.items():
        param = signature.parameters.get(name)
        check = _TYPE_CHECKS.get(param.annotation if isinstance(param.annotation, str) else getattr(
            param.annotation, "__name__", "")) if param is not None else None
        if check is not None:
            check(f"{name} ({owner})", value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


class DetectionModel(nn.Module):
    """Base class of a model family. model(images, targets=None, all_stages=False): a dict of losses in train mode,
    torchvision-style results [{"boxes", "labels", "scores", "masks" [N, 1, H, W]}] in eval mode.

    Class attributes a family may set:
    - `module_args`: constructor arguments that are modules, stored by their own config (`_module_config`) and
      rebuilt by `_build_module`; "backbone" and "criterion" are handled here, a family adds its own (ISTR: "codec").
    - `inference_options`: arguments that may differ when loading weights into an existing model; those that are
      also attributes of the model (detections_per_image, mask_threshold, ...) are read back from them by config(),
      so a changed threshold is saved.
    - `renamed_args`: {old name: new name} for model files written before an argument was renamed.
    - `export_head_class`: "package.module:Class" of the family's export head (see export_head()).

    Instance attributes set by create_model / load_model / the Trainer: `preset` (name or None), `recipe` (the
    preset's training recipe: TrainConfig field overrides), `categories` ([{"id", "name"}] per label or None).
    """

    module_args: tuple[str, ...] = ("backbone", "criterion")
    # "package.module:Class" of the family's export head (an istr.export.ExportHead built as Class(model)); None: none
    export_head_class: str | None = None
    inference_options: frozenset = frozenset({"preset", "recipe", "criterion", "min_size", "max_size",
                                              "train_min_sizes", "detections_per_image", "mask_threshold"})
    renamed_args: dict[str, str] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Wrap the subclass's __init__ so that the most-derived constructor records its bound arguments."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def __init__(self, *args: Any, **kw: Any) -> None:
            bound = signature.bind(self, *args, **kw)
            _check_argument_types(signature, bound.arguments, cls.__name__)
            init(self, *args, **kw)
            if type(self).__init__ is __init__:
                bound.apply_defaults()
                arguments = dict(bound.arguments)
                arguments.pop(next(iter(signature.parameters)))  # self
                for name, param in signature.parameters.items():
                    if param.kind is inspect.Parameter.VAR_KEYWORD:
                        arguments.update(arguments.pop(name))
                object.__setattr__(self, "_init_args", arguments)

        cls.__init__ = __init__

    def __init__(self) -> None:
        super().__init__()
        self.preset: str | None = None
        self.recipe: dict[str, Any] = {}
        self.categories: list[dict[str, Any]] | None = None

    # ------------------------------------------------------------------ config round trip
    def config(self) -> dict[str, Any]:
        """Plain-value description that rebuilds this model (istr.save_model stores it; from_config reads it):
        the constructor's arguments, modules by their configs, plus "preset" and "recipe"."""
        cfg: dict[str, Any] = {}
        for name, value in self._init_args.items():
            if name in self.module_args:
                cfg[name] = self._module_config(name, getattr(self, name, value))
            else:
                if name in self.inference_options and hasattr(self, name):
                    value = getattr(self, name)
                cfg[name] = _jsonable(value)
        cfg["preset"] = self.preset
        cfg["recipe"] = _jsonable(self.recipe)
        return cfg

    @classmethod
    def upgrade_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """A config written by an older version in today's terms: renamed arguments under their new names, and
        arguments added since then at their defaults (what the older model computed)."""
        config = {cls.renamed_args.get(k, k): v for k, v in config.items()}
        for name, param in inspect.signature(cls.__init__).parameters.items():
            if name not in config and name not in cls.module_args and param.default is not inspect.Parameter.empty:
                config[name] = _jsonable(param.default)
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "DetectionModel":
        """Rebuild an (untrained, pretrained=False) model from a config() dict."""
        config = cls.upgrade_config(config)
        preset, recipe = config.pop("preset", None), config.pop("recipe", None) or {}
        for name in cls.module_args:
            if name in config:
                config[name] = cls._build_module(name, config[name], config)
        model = cls(**config)
        model.preset, model.recipe = preset, dict(recipe)
        return model

    def _module_config(self, name: str, module: Any) -> Any:
        if name == "backbone":
            to_config = getattr(module, "config", None)
            return to_config() if callable(to_config) else None
        if name == "criterion":
            return criterion_config(module)
        raise NotImplementedError(f"{type(self).__name__} lists {name!r} in module_args but does not store it: "
                                  "override _module_config / _build_module")

    @classmethod
    def _build_module(cls, name: str, module_config: Any, config: dict[str, Any]) -> Any:
        if name == "backbone":
            if module_config is None:
                raise ValueError("this model's backbone has no config() (not a registered backbone), so it cannot "
                                 "be rebuilt from the file: register it (istr.models.register_backbone) or load the "
                                 "weights into a model you build: istr.load_model(path, model=...)")
            return build_backbone(module_config)
        if name == "criterion":
            return criterion_from_config(module_config, config["num_classes"])
        raise NotImplementedError(f"{cls.__name__}: no builder for the module argument {name!r}")

    # ------------------------------------------------------------------ shared behaviour
    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters of everything but the backbone (and its neck)."""
        skip = {id(p) for p in self.backbone.parameters()}
        return [p for p in self.parameters() if id(p) not in skip]

    def prepare_training(self, annotation_file: Any, max_masks: int | None = None) -> str | None:
        """Fit what must be fitted on the training data before training (ISTR: an unfitted codec); returns a
        one-line description of what was done, or None. The base model needs nothing."""
        return None

    def export_head(self) -> nn.Module:
        """The family's tensor-in / tensor-out inference graph (istr.export.ExportHead, built from this model):
        images [B, 3, H, W] in [0, 1] + sizes [B, 2] -> boxes, scores, labels, masks, valid (see istr.export).
        NotImplementedError naming the family when it declares no `export_head_class`."""
        family = getattr(type(self), "architecture", None) or type(self).__name__
        if not self.export_head_class:
            raise NotImplementedError(
                f"the {family!r} model family ({type(self).__name__}) declares no export head, so it cannot be "
                "exported: give the class export_head_class = 'package.module:HeadClass', an istr.export.ExportHead "
                "subclass built as HeadClass(model) (see istr/models/istr/export.py)")
        module_name, _, class_name = self.export_head_class.partition(":")
        head_class = getattr(importlib.import_module(module_name), class_name, None)
        if head_class is None:
            raise NotImplementedError(f"the {family!r} model family names the export head {self.export_head_class!r}, "
                                      f"but {module_name} has no {class_name!r}")
        return head_class(self)

    def check_call(self, images: Any, targets: Any, all_stages: bool,
                   device: torch.device) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        """The checks of forward(images, targets, all_stages): valid images on `device`; in train mode targets
        (checked) and a criterion, no all_stages; in eval mode no targets. Returns (images, their (h, w) sizes).

        forward is Python around the network (value checks, per-image loops, data-dependent shapes): a graph
        traced from it would be frozen to the traced images, so tracing it is refused; export with istr.export."""
        if torch.jit.is_tracing() or getattr(torch.compiler, "is_exporting", lambda: False)():
            raise RuntimeError(
                f"{type(self).__name__}.forward cannot be traced or exported (torch.jit.trace, the legacy "
                "torch.onnx.export(..., dynamo=False) and torch.export would freeze its per-image Python to the traced "
                "images): export with istr.export.export(model, path, format='onnx' | 'pt2'), or export "
                "model.export_head() with torch.export / torch.onnx.export(..., dynamo=True)")
        images = check_images(images)
        if any(img.device != device for img in images):
            raise ValueError(f"images must be on the model's device {device}, got "
                             f"{sorted({str(i.device) for i in images})}")
        sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        if self.training:
            if all_stages:
                raise ValueError("all_stages=True is an inference option; call model.eval() first")
            if targets is None:
                raise ValueError("training mode needs targets (list of dicts with boxes, labels, masks); "
                                 "call model.eval() for inference")
            if self.criterion is None:
                raise ValueError("this model has no criterion; build it with criterion=SetCriterion(...) to train")
            check_targets(targets, sizes, self.num_classes)
        elif targets is not None:
            raise ValueError("targets were given in eval mode, where they would be ignored: call model.train() "
                             "to compute losses, or drop the targets to predict")
        return images, sizes

    def grouped_inference(self, infer: Callable, images: list[torch.Tensor], all_stages: bool) -> Any:
        """Eval mode: run `infer(images, all_stages)` per group of images of the same padded size, so that an
        image's result is the one it gets alone, whatever else is in the batch."""
        return grouped(infer, images, self.transform.same_size_groups(images), all_stages)

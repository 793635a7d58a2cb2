"""Model zoo: named presets of every registered family (timm style): register_preset, create_model, list_models.

A family registers its presets in its own folder (istr/models/istr/presets.py, isda/presets.py); a preset is a
builder plus default keywords, the family's architecture name, a training recipe and, optionally, the demo's
settings. The engine, CLI and demo find presets only through this registry.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from torch import nn

from istr.losses import SetCriterion
from istr.matching import HungarianMatcher
from istr.models.backbone import Backbone, freeze_batch_norm
from istr.registry import Registry

__all__ = ["MODELS", "PresetInfo", "register_model", "register_preset", "create_model", "list_models", "preset_info",
           "default_model", "backbone_from_options", "build_criterion"]

MODELS = Registry("model")
_INFO: dict[str, "PresetInfo"] = {}


@dataclass(frozen=True)
class PresetInfo:
    """What the registry knows of a preset besides its builder.

    family: the architecture name (istr.io.ARCHITECTURES) of the models it builds; recipe: TrainConfig field
    overrides for training it (lr, weight_decay, backbone_lr_mult, clip_grad_norm, warmup_iters, lr_multipliers,
    ...; empty = the library defaults); demo: the demo's settings for it ({"model": create_model overrides,
    "train": training settings}) or None; default: the library's default preset (one of them)."""

    name: str
    family: str | None = None
    recipe: Mapping[str, Any] = field(default_factory=dict)
    demo: Mapping[str, Any] | None = None
    default: bool = False
    defaults: Mapping[str, Any] = field(default_factory=dict)


def register_model(name: str, *, family: str | None = None, recipe: Mapping[str, Any] | None = None,
                   demo: Mapping[str, Any] | None = None, default: bool = False) -> Callable:
    """Decorator registering a preset `fn(num_classes=80, pretrained=False, **overrides) -> model`, with its
    family, training recipe and demo settings (see PresetInfo). The model it builds gets `.preset` and `.recipe`."""

    def decorator(fn: Callable) -> Callable:
        if default and any(info.default for info in _INFO.values()):
            raise ValueError(f"{name!r}: a default preset is already registered ({default_model()!r})")

        def preset(num_classes: int = 80, pretrained: bool = False, **overrides: Any) -> nn.Module:
            model = fn(num_classes=num_classes, pretrained=pretrained, **overrides)
            model.preset, model.recipe = name, dict(recipe or {})
            return model

        preset.__name__, preset.__doc__ = name, fn.__doc__
        MODELS.register(name)(preset)
        _INFO[name] = PresetInfo(name, family, dict(recipe or {}), None if demo is None else dict(demo), default,
                                 dict(getattr(fn, "defaults", {})))
        return preset

    return decorator


def register_preset(name: str, builder: Callable, *, family: str, recipe: Mapping[str, Any] | None = None,
                    demo: Mapping[str, Any] | None = None, default: bool = False, **defaults: Any) -> Callable:
    """Register `builder(num_classes=, pretrained=, **kwargs)` under `name` with default keywords that any
    create_model keyword overrides."""

    def fn(num_classes: int = 80, pretrained: bool = False, **overrides: Any) -> nn.Module:
        return builder(num_classes=num_classes, pretrained=pretrained, **{**defaults, **overrides})

    fn.defaults = defaults
    fn.__doc__ = f"{family} preset {name!r}: " + ", ".join(f"{k}={v!r}" for k, v in defaults.items())
    return register_model(name, family=family, recipe=recipe, demo=demo, default=default)(fn)


def create_model(name: str, num_classes: int = 80, pretrained: bool = False, **overrides: Any) -> nn.Module:
    """Build a registered preset of any family, e.g. create_model("istr_r50_fpn_pca60", codec=my_pca,
    num_queries=100) or create_model("isda_r50", num_classes=80).

    pretrained: ImageNet backbone weights through timm (needs the network). overrides: any keyword of the
    model (ISTR: num_queries, num_stages, attention, mask_head, min_size, ...; ISDA: num_queries, mask_stride,
    mask_position, kernel_position, ...), backbone keywords (backbone="convnext_tiny" or a module,
    checkpoint_path, frozen_bn, freeze_at, timm_kwargs), matcher=/criterion= modules or costs=/losses= weight
    dicts. ISTR also takes codec= (a MaskCodec; without it the preset's codec is built UNFITTED: fit it with
    model.codec.fit(grids) or model.prepare_training(annotation_file), or pass a fitted/loaded one) or
    codec_config={...} for the preset's codec.
    """
    return MODELS.get(name)(num_classes=num_classes, pretrained=pretrained, **overrides)


def list_models(pattern: str = "*", demo: bool = False) -> list[str]:
    """Registered preset names matching a wildcard, e.g. list_models("istr_r50*"); demo=True: only the presets
    that carry demo settings (what `istr demo --model` accepts)."""
    return [n for n in MODELS.list(pattern) if not demo or preset_info(n).demo is not None]


def preset_info(name: str) -> PresetInfo:
    """The PresetInfo of a registered preset (KeyError listing the known presets otherwise)."""
    MODELS.get(name)
    return _INFO.get(name, PresetInfo(name))


def default_model() -> str:
    """The library's default preset (the CLI's default --model)."""
    for info in _INFO.values():
        if info.default:
            return info.name
    raise LookupError("no preset is registered as the default (register_model(..., default=True))")


def backbone_from_options(backbone: str | nn.Module, *, out_channels: int, pretrained: bool = False,
                          checkpoint_path: str | None = None, frozen_bn: bool = False, freeze_at: int = 0,
                          timm_kwargs: Mapping[str, Any] | None = None, **neck: Any) -> nn.Module:
    """The backbone a preset asks for: a timm name builds istr.models.Backbone with these options; a module is
    used as given, with the options applied where they can be (frozen_bn freezes its BatchNorms, freeze_at calls
    its freeze_stages(k)) and a ValueError for those that cannot (never silently dropped)."""
    if isinstance(backbone, str):
        return Backbone(backbone, out_channels=out_channels, pretrained=pretrained, checkpoint_path=checkpoint_path,
                        frozen_bn=frozen_bn, freeze_at=freeze_at, timm_kwargs=dict(timm_kwargs or {}), **neck)
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"backbone must be a timm model name or an nn.Module, got {type(backbone).__name__}")
    for key in ("out_channels", "strides"):
        if not hasattr(backbone, key):
            raise TypeError(f"a backbone module must expose `{key}` (the backbone contract: out_channels, strides, "
                            f"forward -> one map per stride; see istr.models.backbone); {type(backbone).__name__} "
                            "does not")
    rejected = {k: v for k, v in (("pretrained", pretrained), ("checkpoint_path", checkpoint_path),
                                  ("timm_kwargs", timm_kwargs), *neck.items()) if v}
    if rejected:
        raise ValueError(f"{sorted(rejected)} configure a timm backbone built by name; the given backbone module "
                         f"({type(backbone).__name__}) must be configured by you")
    if frozen_bn:
        freeze_batch_norm(backbone)
    if freeze_at:
        if not callable(getattr(backbone, "freeze_stages", None)):
            raise ValueError(f"this preset freezes the first stages (freeze_at={freeze_at}) but the given backbone "
                             f"module ({type(backbone).__name__}) has no freeze_stages(k): pass freeze_at=0, or "
                             "give it that method")
        backbone.freeze_stages(freeze_at)
    return backbone


def build_criterion(num_classes: int, matcher: nn.Module | None = None, criterion: nn.Module | None = None,
                    costs: Mapping[str, float] | None = None, losses: Mapping[str, float] | None = None,
                    default_costs: Mapping[str, float] | None = None,
                    default_losses: Mapping[str, float] | None = None) -> nn.Module:
    """The criterion a builder gets: `criterion` as given, or a SetCriterion over `matcher` (else a
    HungarianMatcher of `costs`) with `losses`; a family's defaults fill costs/losses that are not given."""
    if criterion is not None:
        if matcher is not None or costs is not None or losses is not None:
            raise ValueError("pass either criterion= or matcher=/costs=/losses= (they configure the criterion it builds)")
        return criterion
    costs = default_costs if costs is None else costs
    losses = default_losses if losses is None else losses
    return SetCriterion(matcher if matcher is not None else HungarianMatcher(costs), losses, num_classes=num_classes)

"""Model checkpoints: one safetensors file holding every tensor (codec included) + JSON construction args."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from istr.codecs import create_codec
from istr.models.backbone import Backbone
from istr.models.istr import ISTR

__all__ = ["save_model", "load_model", "build_from_config"]

_FORMAT = "istr-model"
_FORMAT_VERSION = "1"
# config keys that may differ between a checkpoint and the model it is loaded into (no effect on the weights)
_FREE_KEYS = {"preset", "criterion", "min_size", "max_size", "train_min_sizes", "detections_per_image",
              "mask_threshold", "stage_logit_average", "logit_average_from"}


def save_model(model: ISTR, path: str | Path) -> None:
    """Write `model`'s tensors (state_dict incl. codec) and its construction args (model.config()) to `path`."""
    from safetensors.torch import save_file

    if not isinstance(model, ISTR):
        raise TypeError(f"save_model expects an istr ISTR model, got {type(model).__name__}")
    config = model.config()
    if config["backbone"] is None:
        raise TypeError(f"cannot save a model whose backbone ({type(model.backbone).__name__}) has no config(); "
                        "use istr.models.Backbone or give yours a config() returning Backbone kwargs")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    import istr

    meta = {"format": _FORMAT, "version": _FORMAT_VERSION, "istr_version": istr.__version__,
            "config": json.dumps(config)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)


def build_from_config(config: dict[str, Any]) -> ISTR:
    """Rebuild an (untrained, pretrained=False) ISTR from a model.config() dict."""
    from istr.losses import SetCriterion
    from istr.matching import HungarianMatcher

    config = dict(config)
    backbone = Backbone(**dict(config.pop("backbone")))
    codec_cfg = config.pop("codec")
    codec = create_codec(codec_cfg["name"], **codec_cfg["config"])
    crit_cfg = config.pop("criterion", None)
    preset = config.pop("preset", None)
    criterion = None
    if crit_cfg is not None:
        criterion = SetCriterion(HungarianMatcher(crit_cfg["costs"]), crit_cfg["losses"], config["num_classes"])
    num_classes = config.pop("num_classes")
    model = ISTR(backbone, codec, num_classes, criterion=criterion, **config)
    if preset is not None:
        model.preset = preset
    return model


def _read(path: Path, map_location: str | torch.device) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from istr.io import read_safetensors

    meta, tensors = read_safetensors(path, "model", map_location)
    if meta.get("format") != _FORMAT or "config" not in meta:
        raise ValueError(f"{path} is a safetensors file but not an istr model (metadata keys: {sorted(meta)}); "
                         "codec files load with istr.load_codec")
    return json.loads(meta["config"]), tensors


def _config_mismatches(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if not prefix and key in _FREE_KEYS:
            continue
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _config_mismatches(a, b, f"{prefix}{key}.")
        elif json.loads(json.dumps(a)) != json.loads(json.dumps(b)):  # tuples vs lists compare equal
            diffs.append(f"{prefix}{key}: file {a!r} vs model {b!r}")
    return diffs


def load_model(path: str | Path, map_location: str | torch.device = "cpu", model: ISTR | None = None) -> ISTR:
    """Load a model written by save_model, rebuilt from its stored construction args, on `map_location`,
    in eval mode.

    model: load into this existing model instead (it keeps its device and train/eval mode); a ValueError names
    every construction arg and tensor that differs (inference-only settings such as min_size or
    detections_per_image may differ).
    """
    path = Path(path)
    config, tensors = _read(path, map_location)
    fresh = model is None
    if model is None:
        model = build_from_config(config)
    else:
        if not isinstance(model, ISTR):
            raise TypeError(f"model must be an istr ISTR, got {type(model).__name__}")
        diffs = _config_mismatches(config, model.config())
        if diffs:
            raise ValueError(f"{path} was saved from a different model: " + "; ".join(diffs))
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
              for k, v in tensors.items() if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{path} does not fit the model: missing {missing[:10]}, unexpected {unexpected[:10]}, "
                         f"shape mismatches {shapes[:10]}")
    model.load_state_dict(tensors)
    return model.to(map_location).eval() if fresh else model

"""Pretrained timm weights without surprises: fail in seconds, with what to do instead, when they cannot be had.

timm fetches `pretrained=True` weights through huggingface_hub, which without a network retries for ~48 s before
raising LocalEntryNotFoundError (and keeps retrying like that even when the weights are already in its cache).
`check_pretrained_available` looks in the local caches first and then tries one TCP connection to the download
host; `pretrained_weights_access` also makes huggingface_hub read its cache without retrying when the host is down.
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

from istr.checks import check_number

__all__ = ["PretrainedUnavailableError", "check_pretrained_available", "pretrained_weights_access"]

_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class PretrainedUnavailableError(ConnectionError, FileNotFoundError):
    """The pretrained weights are neither in a local cache nor downloadable now (a ConnectionError and a
    FileNotFoundError: the weights file is not to be found)."""


@dataclass
class _Source:
    kind: str  # "hf-hub" | "url" | "file" | "state_dict" | ""
    where: str  # repo id, url or path
    filename: str | None = None  # hf-hub: the file timm asks for first
    host: str = ""
    port: int = 443
    cached: bool = False


def _pretrained_cfg(model_name: str) -> dict:
    import timm
    from timm.models import get_pretrained_cfg, parse_model_name

    if not isinstance(model_name, str) or not model_name:
        raise TypeError(f"model_name must be a timm model name (str), got {model_name!r}")
    source, name = parse_model_name(model_name)
    if source == "hf-hub":
        return {"source": "hf-hub", "hf_hub_id": name}
    if not timm.is_model(name.split(".")[0]):
        raise ValueError(f"unknown timm model {model_name!r} (see timm.list_models())")
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError as exc:  # an unknown pretrained tag
        raise ValueError(f"timm has no pretrained weights {model_name!r}: {exc}") from None
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise ValueError(f"timm has no pretrained weights for {model_name!r}; use pretrained=False or checkpoint_path=")
    return cfg.to_dict()


def _resolve(model_name: str) -> _Source:
    """Where timm will load `model_name`'s pretrained weights from (its own resolution rules) and whether they
    are already in the local cache."""
    cfg = _pretrained_cfg(model_name)
    try:
        from timm.models._builder import _resolve_pretrained_source

        kind, loc = _resolve_pretrained_source(cfg)
    except (ImportError, AssertionError):  # fall back to timm's default order: hf-hub, then url
        kind, loc = ("hf-hub", cfg["hf_hub_id"]) if cfg.get("hf_hub_id") else ("url", cfg.get("url") or "")
    if kind == "hf-hub":
        from huggingface_hub import constants, try_to_load_from_cache

        repo, filename = loc if isinstance(loc, (tuple, list)) else (loc, None)
        # without a filename timm asks for model.safetensors first (then pytorch_model.bin)
        first = filename if filename and filename.endswith(".safetensors") else _HF_WEIGHT_FILES[0]
        repo_id, _, revision = repo.partition("@")
        cached = isinstance(try_to_load_from_cache(repo_id, first, revision=revision or None), str)
        endpoint = urlparse(constants.ENDPOINT)
        return _Source("hf-hub", repo, filename or first, endpoint.hostname or "huggingface.co",
                       endpoint.port or (80 if endpoint.scheme == "http" else 443), cached)
    if kind == "url":
        import torch.hub

        parts = urlparse(loc)
        cached_file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(parts.path)
        return _Source("url", loc, None, parts.hostname or "", parts.port or (80 if parts.scheme == "http" else 443),
                       cached_file.is_file())
    return _Source(kind, str(loc) if not isinstance(loc, dict) else "state_dict", cached=True)


def _can_connect(host: str, port: int, timeout_s: float) -> tuple[bool, str]:
    """(True, "") if a TCP connection to host:port (or to the https proxy, when one is set) opens within
    timeout_s seconds, name lookup included; else (False, why)."""
    proxy = urllib.request.getproxies().get("https")
    if proxy and not urllib.request.proxy_bypass(host):
        parts = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = parts.hostname or host, parts.port or 80
    outcome: list[str] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            outcome.append("")
        except OSError as exc:
            outcome.append(f"{type(exc).__name__}: {exc}")

    thread = threading.Thread(target=attempt, daemon=True)  # getaddrinfo ignores socket timeouts: bound it here
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        return False, f"no answer within {timeout_s:g} s"
    return outcome[0] == "", outcome[0]


def _status(model_name: str, timeout_s: float) -> tuple[_Source, bool]:
    """(source, reachable); raises PretrainedUnavailableError when the weights are neither cached nor reachable."""
    check_number("timeout_s", timeout_s, min=0, min_inclusive=False)
    source = _resolve(model_name)
    if source.kind not in ("hf-hub", "url"):
        return source, True
    from huggingface_hub import constants

    offline = source.kind == "hf-hub" and constants.HF_HUB_OFFLINE
    if offline:
        reachable, why = False, "HF_HUB_OFFLINE is set"
    else:
        reachable, why = _can_connect(source.host, source.port, timeout_s)
    if source.cached or reachable:
        return source, reachable
    what = f"{source.where} ({source.filename})" if source.filename else source.where
    cache = constants.HF_HUB_CACHE if source.kind == "hf-hub" else "the torch hub cache (torch.hub.get_dir())"
    raise PretrainedUnavailableError(
        f"pretrained weights for timm model {model_name!r} are not available offline: {what} is not in {cache} "
        f"and {source.host}:{source.port} cannot be reached ({why}). Without a network, pass checkpoint_path= a "
        "local timm-format checkpoint file (.pth / .safetensors; `istr demo --backbone-checkpoint PATH`, "
        "--model-arg checkpoint_path=PATH), copy the weights into that cache from a machine with a network, "
        "or use pretrained=False")


def check_pretrained_available(model_name: str, timeout_s: float = 3.0) -> None:
    """Return at once if timm's pretrained weights for `model_name` (e.g. "resnet50", "resnet50.a1_in1k",
    "hf-hub:timm/resnet18.a1_in1k") are in the local cache, else if their download host answers within timeout_s
    seconds; otherwise raise PretrainedUnavailableError (a ConnectionError / FileNotFoundError) saying what to do
    instead. ValueError for a model without pretrained weights, TypeError for a non-string name.
    """
    _status(model_name, timeout_s)


@contextlib.contextmanager
def pretrained_weights_access(model_name: str, timeout_s: float = 3.0) -> Iterator[None]:
    """check_pretrained_available, then, for the `with` block, put huggingface_hub in offline mode when the weights
    are cached but the host is unreachable (it then reads its cache at once instead of retrying for ~48 s):

        with pretrained_weights_access(name):
            body = timm.create_model(name, pretrained=True, features_only=True)
    """
    source, reachable = _status(model_name, timeout_s)
    if reachable or source.kind != "hf-hub":
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True  # read at call time through constants.is_offline_mode()
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before

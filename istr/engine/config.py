"""TrainConfig (the paper's recipe as library defaults), its checks, the lr schedule, and recipe resolution."""
from __future__ import annotations

import bisect
import dataclasses
import json
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Sequence

from istr.checks import check_bool, check_number

__all__ = ["TrainConfig", "LIBRARY_DEFAULTS", "RECIPE_FIELDS", "FIXED_ON_RESUME", "resolve_config",
           "warmup_multistep_factor", "config_dict"]


def _opt(help: str, **cli: Any) -> dict[str, Any]:
    """Field metadata: the help text (CLI --help and docs), and CLI settings: flag (default --field-name),
    cli=False to leave a field off the command line."""
    return {"help": help, **cli}


# The library defaults of the fields a model's recipe may set (the paper's ISTR v1 recipe). In TrainConfig these
# fields default to None: "the model's recipe (model.recipe), else this default" (resolve_config).
LIBRARY_DEFAULTS: dict[str, Any] = {
    "lr": 2.5e-5, "weight_decay": 1e-4, "backbone_lr_mult": 1.0, "lr_multipliers": None, "warmup_iters": 1000,
    "warmup_factor": 0.01, "milestones": (210_000, 250_000), "gamma": 0.1, "clip_grad_norm": 1.0,
}
RECIPE_FIELDS: tuple[str, ...] = tuple(LIBRARY_DEFAULTS)

# settings that decide the data order and randomness of a run: a resume must keep them
FIXED_ON_RESUME = ("batch_size", "accum_steps", "seed", "shuffle")


@dataclass
class TrainConfig:
    """Training hyper-parameters. Library defaults are the paper's (v1) recipe: AdamW lr 2.5e-5, wd 1e-4 on every
    parameter, betas 0.9/0.999, linear warmup from 0.01 over 1000 iters, lr x0.1 at 210k and 250k of 270k iters,
    global grad-norm clip 1.0, 16 images per step (batch_size x accum_steps x world_size).

    The fields in RECIPE_FIELDS (lr, weight_decay, backbone_lr_mult, lr_multipliers, warmup_*, milestones, gamma,
    clip_grad_norm) default to None: the Trainer takes each from the model's recipe (`model.recipe`, a preset's
    TrainConfig overrides) and else from LIBRARY_DEFAULTS; a value given here wins. `resolve_config` does that,
    and the run record (RUN/run.json) stores the resolved values and the recipe.

    An iteration is one optimizer step over `accum_steps` micro-batches of `batch_size` images per process.
    Training stops at `max_iters` or after `max_minutes` of wall time (whichever comes first; either may be None).

    Resuming applies a changed schedule, optimizer or bookkeeping setting exactly (logged as a "resume" event);
    it refuses changes of batch_size, accum_steps, seed and shuffle, which decide the data order and randomness
    of the run being continued. The help of each field is in its metadata (`istr train --help` shows it).
    """

    lr: float | None = field(default=None, metadata=_opt("AdamW learning rate (library default 2.5e-5, the paper's)"))
    weight_decay: float | None = field(default=None, metadata=_opt("AdamW weight decay, on every parameter "
                                                                   "(default 1e-4)"))
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata=_opt("AdamW betas"))
    eps: float = field(default=1e-8, metadata=_opt("AdamW epsilon"))
    backbone_lr_mult: float | None = field(default=None, metadata=_opt(
        "lr multiplier of the backbone's parameters (model.backbone_lr_names(), else 'backbone.*'; default 1)"))
    lr_multipliers: dict[str, float] | None = field(default=None, metadata=_opt(
        "{parameter-name substring: lr multiplier} for the head (default: the model's recipe, else the model's "
        "own lr_multipliers attribute)", cli=False))
    batch_size: int = field(default=16, metadata=_opt("images per forward per process"))
    accum_steps: int = field(default=1, metadata=_opt("micro-batches per optimizer step"))
    max_iters: int | None = field(default=270_000, metadata=_opt(
        "optimizer steps (default 270000; with --minutes alone, no step limit)"))
    max_minutes: float | None = field(default=None, metadata=_opt("wall-clock training budget in minutes",
                                                                  flag="--minutes"))
    warmup_iters: int | None = field(default=None, metadata=_opt("linear warmup steps (default 1000)"))
    warmup_factor: float | None = field(default=None, metadata=_opt("warmup start factor, in (0, 1] (default 0.01)"))
    milestones: tuple[int, ...] | None = field(default=None, metadata=_opt(
        "iterations where lr *= gamma (default 210000 250000)"))
    gamma: float | None = field(default=None, metadata=_opt("lr decay factor at each milestone (default 0.1)"))
    clip_grad_norm: float | None = field(default=None, metadata=_opt(
        "global grad-norm clip; 0 disables (default 1.0)"))
    bf16: bool = field(default=False, metadata=_opt("bfloat16 autocast for the forward pass"))
    seed: int = field(default=40244023, metadata=_opt("random seed (data order, augmentation, initialisation)"))
    shuffle: bool = field(default=True, metadata=_opt("shuffle the training data each epoch"))
    num_workers: int = field(default=0, metadata=_opt("DataLoader worker processes", flag="--workers"))
    device: str = field(default="auto", metadata=_opt("auto, cpu, cuda, cuda:1, ..."))
    log_every: int = field(default=20, metadata=_opt("iterations between log lines"))
    eval_every: int = field(default=0, metadata=_opt("iterations between evaluations (0: none)"))
    eval_at_end: bool = field(default=True, metadata=_opt("evaluate after the last step (with validation data)"))
    checkpoint_every: int = field(default=5000, metadata=_opt("iterations between checkpoints (0: none, but for the end of a time-budget run)"))
    keep_checkpoints: int = field(default=2, metadata=_opt("checkpoints kept on disk (0: all)"))
    progress: bool = field(default=True, metadata=_opt("show a progress bar"))
    find_unused_parameters: bool = field(default=False, metadata=_opt("DistributedDataParallel's option of that "
                                                                      "name"))
    eval_kwargs: dict[str, Any] = field(default_factory=dict, metadata=_opt(
        "extra keyword arguments of istr.engine.evaluate for periodic and final evaluations", cli=False))

    def __post_init__(self) -> None:
        _check(self, resolved=False)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        """Build from a plain dict, rejecting unknown keys with the list of known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**values)


def _check(cfg: TrainConfig, resolved: bool) -> None:
    """Every value's type, finiteness and range (istr.checks); None is allowed where it means something: recipe
    fields before resolution, max_iters / max_minutes / lr_multipliers always."""
    recipe_none = not resolved

    def number(name: str, integer: bool = False, allow_none: bool = False, **bounds: Any) -> None:
        value = getattr(cfg, name)
        setattr(cfg, name, check_number(name, value, integer=integer, allow_none=allow_none, **bounds))

    number("lr", min=0, min_inclusive=False, allow_none=recipe_none)
    number("weight_decay", min=0, allow_none=recipe_none)
    number("eps", min=0, min_inclusive=False)
    number("backbone_lr_mult", min=0, allow_none=recipe_none)
    number("warmup_iters", integer=True, min=0, allow_none=recipe_none)
    number("warmup_factor", min=0, max=1, min_inclusive=False, allow_none=recipe_none)
    number("gamma", min=0, min_inclusive=False, allow_none=recipe_none)
    number("clip_grad_norm", min=0, allow_none=recipe_none)
    for name in ("batch_size", "accum_steps"):
        number(name, integer=True, min=1)
    number("max_iters", integer=True, min=0, allow_none=True)
    number("max_minutes", min=0, min_inclusive=False, allow_none=True)
    number("seed", integer=True, min=0)
    for name in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "num_workers"):
        number(name, integer=True, min=0)
    for name in ("bf16", "shuffle", "eval_at_end", "progress", "find_unused_parameters"):
        check_bool(name, getattr(cfg, name))
    if cfg.max_iters is None and cfg.max_minutes is None:
        raise ValueError("set max_iters and/or max_minutes; with neither, training would never stop")
    if not isinstance(cfg.betas, Sequence) or isinstance(cfg.betas, str) or len(cfg.betas) != 2:
        raise ValueError(f"betas must be two numbers in [0, 1), got {cfg.betas!r}")
    cfg.betas = tuple(check_number("betas", b, min=0, max=1, max_inclusive=False) for b in cfg.betas)  # type: ignore[assignment]
    if cfg.milestones is not None:
        if isinstance(cfg.milestones, (str, bytes)) or not isinstance(cfg.milestones, Sequence):
            raise TypeError(f"milestones must be a sequence of iterations, got {type(cfg.milestones).__name__}")
        cfg.milestones = tuple(check_number("milestones", m, integer=True, min=0) for m in cfg.milestones)
        if list(cfg.milestones) != sorted(cfg.milestones):
            raise ValueError(f"milestones must be increasing, got {cfg.milestones}")
    if cfg.lr_multipliers is not None:
        if not isinstance(cfg.lr_multipliers, Mapping):
            raise TypeError(f"lr_multipliers must be a dict {{name substring: multiplier}}, got "
                            f"{type(cfg.lr_multipliers).__name__}")
        cfg.lr_multipliers = {str(k): check_number(f"lr_multipliers[{k!r}]", v, min=0)
                              for k, v in cfg.lr_multipliers.items()}
    if not isinstance(cfg.device, str) or not cfg.device:
        raise TypeError(f"device must be a device name such as 'auto', 'cpu' or 'cuda', got {cfg.device!r}")
    if not isinstance(cfg.eval_kwargs, Mapping):
        raise TypeError(f"eval_kwargs must be a dict, got {type(cfg.eval_kwargs).__name__}")


def resolve_config(cfg: TrainConfig, recipe: Mapping[str, Any] | None = None) -> tuple[TrainConfig, dict[str, str]]:
    """(a copy of cfg with every recipe field set, {field: "config" | "recipe" | "default"} saying where each came
    from). A field given in cfg wins; else the recipe's value (a model's `recipe` dict); else LIBRARY_DEFAULTS.
    ValueError naming the recipe key that is not a TrainConfig field or whose value is out of range."""
    recipe = dict(recipe or {})
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(recipe) - known)
    if unknown:
        raise ValueError(f"the model's recipe sets unknown TrainConfig fields {unknown}; known: {sorted(known)}")
    values, sources = {}, {}
    for name in RECIPE_FIELDS:
        if getattr(cfg, name) is not None:
            values[name], sources[name] = getattr(cfg, name), "config"
        elif name in recipe:
            values[name], sources[name] = recipe[name], "recipe"
        else:
            values[name], sources[name] = LIBRARY_DEFAULTS[name], "default"
    try:
        out = dataclasses.replace(cfg, **values)
        _check(out, resolved=True)
    except (TypeError, ValueError) as exc:
        from_recipe = [k for k, s in sources.items() if s == "recipe"]
        raise type(exc)(f"{exc} (recipe values: {from_recipe})" if from_recipe else str(exc)) from None
    return out, sources


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as plain JSON values (tuples as lists; anything unserialisable as its repr)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=repr))


def warmup_multistep_factor(iteration: int, warmup_iters: int, warmup_factor: float,
                            milestones: Sequence[int], gamma: float) -> float:
    """LR multiplier after `iteration` completed steps: linear warmup from warmup_factor, x gamma per milestone."""
    factor = gamma ** bisect.bisect_right(list(milestones), iteration)
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        factor *= warmup_factor * (1 - alpha) + alpha
    return factor

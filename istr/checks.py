"""One set of value checks for every option the library takes (API and CLI alike): numbers, booleans, choices, devices.

Each check returns the value (normalised: a Python int/float/bool, a torch.device) or raises with a message that
names the option, shows the value with its type and says what was expected:
    check_number("detections", 0, integer=True, min=1)  -> ValueError: detections must be >= 1, got 0 (int)
    check_number("score_threshold", float("nan"), min=0, max=1) -> ValueError: ... must be a finite number, got nan
    check_number("mask_stride", "4", integer=True) -> OptionTypeError: mask_stride must be an int, got '4' (str)
    check_bool("mask_position", "False")           -> OptionTypeError: mask_position must be a bool, got 'False' (str)
A wrong type raises OptionTypeError, which is both a TypeError and a ValueError (callers that caught ValueError for
bad options keep working). A CLI parses booleans with parse_bool (true/false/1/0/yes/no/on/off, nothing else).
"""
from __future__ import annotations

import argparse
import math
import numbers
from typing import Any, Iterable

__all__ = ["OptionTypeError", "BoolParseError", "check_number", "check_bool", "parse_bool", "check_choice",
           "check_device", "describe"]


class OptionTypeError(TypeError, ValueError):
    """An option got a value of the wrong type (a str for a number, an int for a bool, ...)."""


class BoolParseError(ValueError, argparse.ArgumentTypeError):
    """A text that is not one of the boolean spellings parse_bool accepts (argparse shows this message as is)."""


def describe(value: Any) -> str:
    """`value` for an error message: its repr and its type, e.g. "'4' (str)", "nan (float)", "True (bool)"."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def check_number(name: str, value: Any, *, integer: bool = False, min: float | None = None,
                 max: float | None = None, min_inclusive: bool = True, max_inclusive: bool = True,
                 allow_none: bool = False) -> Any:
    """`value` as a Python int (integer=True) or float/int, after checking it is a real, finite number in range.

    Booleans, strings, tensors and other non-numbers raise OptionTypeError; an integer option refuses floats
    (4.0 included: a count is written as 4). NaN and +-inf raise ValueError (NaN fails no comparison, so a range
    check alone would let it through). min/max bound the value, inclusively unless min_inclusive/max_inclusive
    is False. allow_none: None is returned as is.
    """
    if value is None and allow_none:
        return None
    kind = "an int" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        bounds = _bounds_text(min, max, min_inclusive, max_inclusive)
        raise OptionTypeError(f"{name} must be {kind}{bounds}{' or None' if allow_none else ''}, got {describe(value)}")
    if integer:
        if not isinstance(value, numbers.Integral):
            raise OptionTypeError(f"{name} must be an int, got {describe(value)}")
        out: Any = int(value)
    else:
        out = value if isinstance(value, int) else float(value)
        if not math.isfinite(out):
            raise ValueError(f"{name} must be a finite number, got {describe(value)}")
    if min is not None and (out < min if min_inclusive else out <= min):
        raise ValueError(f"{name} must be {'>=' if min_inclusive else '>'} {min}, got {describe(value)}")
    if max is not None and (out > max if max_inclusive else out >= max):
        raise ValueError(f"{name} must be {'<=' if max_inclusive else '<'} {max}, got {describe(value)}")
    return out


def _bounds_text(lo: float | None, hi: float | None, lo_inc: bool, hi_inc: bool) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>=' if lo_inc else '>'} {lo}")
    if hi is not None:
        parts.append(f"{'<=' if hi_inc else '<'} {hi}")
    return f" ({' and '.join(parts)})" if parts else ""


def check_bool(name: str, value: Any) -> bool:
    """`value` if it is a real boolean (bool or numpy.bool_); anything else, "False" and 0 included, raises
    OptionTypeError (the string "False" is truthy: accepting it would silently mean True)."""
    if isinstance(value, bool):
        return value
    import numpy

    if isinstance(value, numpy.bool_):
        return bool(value)
    raise OptionTypeError(f"{name} must be a bool (True or False), got {describe(value)}")


_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def parse_bool(text: str | bool, name: str | None = None) -> bool:
    """A CLI boolean: true/1/yes/on -> True, false/0/no/off -> False (any case, surrounding spaces ignored);
    a bool is returned as is. Anything else raises BoolParseError (a ValueError; argparse shows its message)."""
    if isinstance(text, bool):
        return text
    if isinstance(text, str):
        word = text.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    where = f"{name}: " if name else ""
    raise BoolParseError(f"{where}expected a boolean (true/false, 1/0, yes/no, on/off), got {describe(text)}")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """`value` if it is one of `choices` (compared with ==, types must match: "1" is not 1); else ValueError listing
    them."""
    choices = list(choices)
    for choice in choices:
        if type(choice) is type(value) and choice == value:
            return value
    raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {describe(value)}")


def check_device(device: Any, name: str = "device") -> "torch.device":  # noqa: F821
    """`device` (a str such as "cpu", "cuda", "cuda:1", "mps", or a torch.device) as a torch.device this machine
    has. ValueError otherwise, in the words `istr train --device cuda` uses: "--device cuda: CUDA is not available
    on this machine; use --device cpu". `name` is the option's name: a CLI flag ("--device") or a keyword
    ("map_location", "device"), shown as `name value` or `name='value'` respectively."""
    import torch

    flag = name.startswith("-")

    def said(value: Any) -> str:
        return f"{name} {value}" if flag else f"{name}={str(value)!r}"

    if not isinstance(device, (str, torch.device)):
        raise OptionTypeError(f"{name} must be a device name such as 'cpu' or 'cuda' (or a torch.device), "
                              f"got {describe(device)}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"{said(device)} is not a torch device (cpu, cuda, cuda:1, mps, ...): {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{said(device)}: CUDA is not available on this machine; use {said('cpu')}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{said(device)}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"{said(device)}: MPS is not available on this machine; use {said('cpu')}")
    return dev

"""istr.checks: the one validation helper for numbers, booleans, choices and devices."""
from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch

from istr.checks import (BoolParseError, OptionTypeError, check_bool, check_choice, check_device, check_number,
                         parse_bool)


@pytest.mark.parametrize("value", [True, False, "4", "nan", None, [4], torch.tensor(4), b"4"])
def test_number_refuses_non_numbers_showing_value_and_type(value):
    with pytest.raises(OptionTypeError) as info:
        check_number("mask_stride", value, integer=True, min=1)
    text = str(info.value)
    assert "mask_stride must be an int" in text and repr(value)[:20] in text and type(value).__name__ in text
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), np.float32("nan")])
def test_number_refuses_non_finite_even_without_a_range(value):
    with pytest.raises(ValueError, match="score_threshold must be a finite number, got"):
        check_number("score_threshold", value)
    with pytest.raises(ValueError, match="finite"):  # NaN fails every comparison: the range alone would pass it
        check_number("score_threshold", value, min=0, max=1)


def test_number_integer_refuses_floats_even_integral():
    with pytest.raises(OptionTypeError, match=r"got 4\.0 \(float\)"):
        check_number("detections", 4.0, integer=True)
    assert check_number("detections", np.int64(4), integer=True) == 4
    assert type(check_number("detections", np.int64(4), integer=True)) is int


@pytest.mark.parametrize("value, kwargs, message", [
    (0, dict(integer=True, min=1), r"detections must be >= 1, got 0 \(int\)"),
    (-5, dict(integer=True, min=1), r">= 1, got -5"),
    (1.5, dict(min=0, max=1), r"must be <= 1, got 1\.5 \(float\)"),
    (0.0, dict(min=0, min_inclusive=False), r"must be > 0, got 0\.0"),
    (1.0, dict(max=1, max_inclusive=False), r"must be < 1, got 1\.0"),
])
def test_number_range(value, kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_number("detections" if kwargs.get("integer") else "x", value, **kwargs)


def test_number_returns_plain_python_values_and_bounds_are_inclusive_by_default():
    assert check_number("x", 1, integer=True, min=1, max=1) == 1
    assert check_number("x", np.float32(0.5), min=0, max=1) == 0.5
    assert type(check_number("x", np.float32(0.5))) is float
    assert type(check_number("x", 3)) is int  # an int given for a float option stays an int
    assert check_number("x", None, allow_none=True) is None
    assert math.isclose(check_number("x", 1e-9, min=0, min_inclusive=False), 1e-9)


def test_bool_takes_only_booleans():
    assert check_bool("mask_position", True) is True
    assert check_bool("mask_position", np.bool_(False)) is False
    for value in ("False", "true", 0, 1, None, 0.0):
        with pytest.raises(OptionTypeError, match=r"mask_position must be a bool \(True or False\), got"):
            check_bool("mask_position", value)
    with pytest.raises(OptionTypeError, match=r"'False' \(str\)"):
        check_bool("mask_position", "False")


@pytest.mark.parametrize("text, want", [("true", True), ("False", False), ("1", True), ("0", False),
                                        ("YES", True), ("no", False), (" on ", True), ("off", False),
                                        (True, True), (False, False)])
def test_parse_bool_accepts_explicit_spellings(text, want):
    assert parse_bool(text) is want


@pytest.mark.parametrize("text", ["", "2", "t", "nope", "truee", None, 1])
def test_parse_bool_refuses_everything_else(text):
    with pytest.raises(ValueError, match="expected a boolean"):
        parse_bool(text)


def test_parse_bool_message_reaches_argparse_users():
    parser = argparse.ArgumentParser(prog="x", exit_on_error=False)
    parser.add_argument("--flag", type=parse_bool)
    assert parser.parse_args(["--flag", "false"]).flag is False
    with pytest.raises(argparse.ArgumentError, match=r"expected a boolean .*got 'maybe' \(str\)"):
        parser.parse_args(["--flag", "maybe"])
    assert issubclass(BoolParseError, ValueError)


def test_choice_compares_types():
    assert check_choice("codec", "pca", ["pca", "dct"]) == "pca"
    with pytest.raises(ValueError, match=r"codec must be one of 'pca', 'dct'; got 'svd' \(str\)"):
        check_choice("codec", "svd", ["pca", "dct"])
    with pytest.raises(ValueError, match=r"got '1' \(str\)"):
        check_choice("level", "1", [1, 2])


def test_device_cpu_and_refusals():
    assert check_device("cpu") == torch.device("cpu")
    assert check_device(torch.device("cpu"), "map_location") == torch.device("cpu")
    with pytest.raises(ValueError, match="is not a torch device"):
        check_device("gpu0", "--device")
    with pytest.raises(OptionTypeError, match=r"got 3 \(int\)"):
        check_device(3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the missing-CUDA error cannot happen")
def test_device_cuda_missing_uses_the_train_device_wording():
    with pytest.raises(ValueError, match=r"^--device cuda: CUDA is not available on this machine; use --device cpu$"):
        check_device("cuda", "--device")
    with pytest.raises(ValueError, match=r"^map_location='cuda:1': CUDA is not available on this machine; "
                                         r"use map_location='cpu'$"):
        check_device("cuda:1", "map_location")

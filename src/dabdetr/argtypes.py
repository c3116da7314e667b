"""argparse `type=` helpers that check a value's range while the command line is parsed.

Each turns the string into a number or raises argparse.ArgumentTypeError, which argparse
reports as one line naming the option (exit status 2), e.g.
`p.add_argument("--threshold", type=probability)`.
"""

from __future__ import annotations

import argparse
import math

__all__ = ["non_negative_float", "non_negative_int", "positive_float", "positive_int",
           "probability"]


def _number(text: str, kind: type) -> float | int:
    try:
        value = kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (counts, sizes, batch sizes)."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer; give 1 or more")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (0 meaning none/off)."""
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; give 0 or more")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (times, rates)."""
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value:g} is not positive; give a number above 0")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value:g} is negative; give 0 or more")
    return value


def probability(text: str) -> float:
    """A number in [0, 1] (score thresholds)."""
    value = _number(text, float)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value:g} is outside [0, 1]; scores are in [0, 1]")
    return value

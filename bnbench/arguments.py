"""argparse types shared by the commands: names from a list, integer lists, finite positive
numbers, bounded integers, regular expressions, file-name stems.

Light on purpose (no torch, triton or pandas): the parsers are built before any command
runs.  Each raises ``argparse.ArgumentTypeError`` with a message naming what was expected.
"""

import argparse


def choices(kind, allowed, aliases=None):
    """A comma-separated list of names from `allowed` (or their `aliases`), in the given
    order, without repeats."""
    aliases = aliases or {}

    def convert(text):
        names = [aliases.get(t.strip().lower(), t.strip().lower()) for t in text.split(",")
                 if t.strip()]
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(
                f"invalid {kind} {text!r} (choose from {', '.join(allowed)})")
        return tuple(dict.fromkeys(names))
    return convert


def integers(kind, example, minimum=1):
    """A comma-separated list of integers >= `minimum`, sorted, without repeats."""
    def convert(text):
        try:
            values = tuple(int(t) for t in text.split(","))
        except ValueError:
            values = ()
        if not values or min(values) < minimum:
            raise argparse.ArgumentTypeError(
                f"invalid {kind} {text!r}: expected integers >= {minimum}, e.g. {example}")
        return tuple(sorted(set(values)))
    return convert


def positive(text):
    """A finite number > 0 (not inf or nan)."""
    import math

    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {text!r}")
    return value


def int_at_least(minimum, what):
    """An integer >= `minimum`; `what` names it in the message ("positive")."""
    def convert(text):
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}")
        return value
    return convert


positive_int = int_at_least(1, "positive")
nonnegative_int = int_at_least(0, "non-negative")


def regex(text):
    """A regular expression that compiles (returned as text)."""
    import re

    try:
        re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"invalid regular expression {text!r}: {e}")
    return text


def stem(text):
    """A file-name stem: no folder part, not empty, not '.' or '..'."""
    if not text or text in (".", "..") or "/" in text or "\\" in text or "\0" in text:
        raise argparse.ArgumentTypeError(
            f"invalid name {text!r}: expected a file name without a folder, e.g. run_quick")
    return text

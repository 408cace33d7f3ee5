"""argparse types shared by the commands: names from a list, integer lists, positive numbers.

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
    """A number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value

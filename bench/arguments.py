"""Argument checks the benchmark scripts share (imported from the scripts' own folder, like ``shapes``)."""

from __future__ import annotations

import argparse


def require_at_least(ap: argparse.ArgumentParser, args: argparse.Namespace, **least: int) -> None:
    """``ap.error`` (a usage line, exit 2) naming the first option below its least, e.g. ``reps=1``; an option
    left at None (not given, a default decided later) is not checked."""
    for name, bound in least.items():
        value = getattr(args, name)
        if value is not None and value < bound:
            ap.error(f"--{name.replace('_', '-')} must be at least {bound}, got {value}")

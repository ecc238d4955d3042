"""The benchmarks' own argparse checks: a bad flag is exit 2 naming it before any measurement, never a
traceback after the measurements or a file half-written."""

from __future__ import annotations

import argparse
from pathlib import Path


def positive_int(text: str) -> int:
    """An argparse type: a whole number of 1 or more (``--steps 0`` would time nothing)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not 1 or more")
    return value


def finite_non_negative(text: str) -> float:
    """An argparse type: a finite number of 0 or more."""
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number of 0 or more")
    return value


def writable_out(parser: argparse.ArgumentParser, out: Path) -> Path:
    """``--out``'s file, refused (exit 2) before any measurement where it could not be written at the end
    of the first: its folder missing or not writable, or a folder where the file should be (nothing left behind)."""
    if out.is_dir():
        parser.error(f"argument --out: {out} is a folder; name the JSON file to write")
    if not out.parent.is_dir():
        parser.error(f"argument --out: folder {out.parent} does not exist")
    existed = out.exists()
    try:  # opened, not written: a file that was there keeps its figures until the first case replaces them
        out.open("a").close()
    except OSError as exc:
        parser.error(f"argument --out: {out}: {exc.strerror or exc}")
    if not existed:
        out.unlink()
    return out

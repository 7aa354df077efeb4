"""The server's training-recipe flags a benchmark takes and passes on as --mace-FLAG.

A benchmark names the flags it varies (`FLAG` as the server spells it after `--mace-`);
each becomes `--FLAG` with the server's own default, type and choices, and
`server_flags` turns the parsed values back into the server's command line.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from mace_sgl.config import MaceConfig

# The server's own choices of each flag that has them (MaceConfig's field metadata).
CHOICES = {f.name: f.metadata.get("choices") for f in dataclasses.fields(MaceConfig)}


def attr(flag: str) -> str:
    return flag.replace("-", "_")


def add_flags(parser: argparse.ArgumentParser, flags: tuple[str, ...], whom: str = "") -> None:
    """`--FLAG` for each of `flags`, defaulting to the server's own value (`whom`: who
    gets it, for the help text)."""
    defaults = MaceConfig()
    for flag in flags:
        default = getattr(defaults, attr(flag))
        parser.add_argument(
            f"--{flag}",
            type=type(default),
            default=default,
            choices=CHOICES.get(attr(flag)),
            help=f"--mace-{flag}{whom} (default: the server's)",
        )


def values(args: argparse.Namespace, flags: tuple[str, ...]) -> dict[str, Any]:
    """Each flag's parsed value (for a results file)."""
    return {flag: getattr(args, attr(flag)) for flag in flags}


def server_flags(args: argparse.Namespace, flags: tuple[str, ...]) -> list[str]:
    """--mace-FLAG VALUE for each of `flags`."""
    out: list[str] = []
    for flag, value in values(args, flags).items():
        out += [f"--mace-{flag}", str(value)]
    return out

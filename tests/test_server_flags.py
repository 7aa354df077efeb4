"""The recipe flags the benchmarks pass on (benchmarks/server_flags.py) are the server's
own: each parses back through the server's command line to the value given."""

from __future__ import annotations

import argparse

import pytest

from benchmarks import align, drift
from benchmarks.server_flags import CHOICES, add_flags, server_flags, values
from mace_sgl.config import add_mace_args, build_mace_config


@pytest.mark.parametrize("flags", [align.RECIPE_FLAGS, drift.RECIPE_FLAGS])
def test_each_flag_reaches_the_server_with_its_value(flags):
    bench = argparse.ArgumentParser()
    add_flags(bench, flags)
    defaults = bench.parse_args([])
    given = []
    for flag, default in values(defaults, flags).items():  # something other than the default
        choices = CHOICES[flag.replace("-", "_")]
        if choices:
            other = next(c for c in choices if c != default)
        elif isinstance(default, int):
            other = default + 1
        elif isinstance(default, float):
            other = default / 2 if default else 0.25
        given += [f"--{flag}", str(other)]
    args = bench.parse_args(given)
    assert values(args, flags) != values(defaults, flags)
    server = argparse.ArgumentParser()
    add_mace_args(server)
    cfg = build_mace_config(server.parse_args(server_flags(args, flags)), None)
    for flag, value in values(args, flags).items():
        assert getattr(cfg, flag.replace("-", "_")) == value, flag

"""mace-sgl: an SGLang server that keeps aligning itself while it serves."""

from __future__ import annotations

__version__ = "0.1.0"

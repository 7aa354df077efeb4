"""CPU compatibility shims for the pinned SGLang, installed only when no CUDA device exists.

Each shim names its target, why it is needed and how it works. None of them runs on a GPU:
`register()` calls `install()` only after `on_cpu()` said so.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

# Names of the shims this process installed, reported by /mace/status.
INSTALLED: list[str] = []


def on_cpu() -> bool:
    """True when this process has no CUDA device: the shims and CPU defaults apply."""
    import torch

    return not torch.cuda.is_available()


def _rotary_unreachable(*args: object, **kwargs: object) -> None:
    raise NotImplementedError(
        "mace-sgl CPU shim: the vllm fallback rotary kernel was called; on CPU SGLang "
        "should dispatch RotaryEmbedding to forward_native. Report this with your flags."
    )


def install_vllm_rotary_stub() -> None:
    """Make `from vllm._custom_ops import rotary_embedding` importable.

    Target: sglang/srt/layers/rotary_embedding/base.py RotaryEmbedding.__init__.
    Why: on a platform that is neither CUDA, HIP, CPU-engine, XPU, NPU, MUSA nor MPS, the
    constructor imports the vllm fallback kernel, which does not exist here, and the model
    fails to load. On such a device forward() dispatches to forward_native, so the kernel
    is bound but never called.
    How: register an in-memory module `vllm._custom_ops` whose rotary_embedding raises a
    clear error if it is ever reached. Skipped when a real vllm is installed.
    """
    if "vllm._custom_ops" in sys.modules or importlib.util.find_spec("vllm") is not None:
        return
    pkg = types.ModuleType("vllm")
    # An empty package: `vllm._custom_ops` resolves from sys.modules, every other
    # `vllm.*` import still raises ImportError (SGLang guards those with try/except),
    # and a spec keeps importlib.util.find_spec("vllm") from raising ValueError.
    pkg.__path__ = []
    pkg.__spec__ = importlib.machinery.ModuleSpec("vllm", None, is_package=True)
    ops = types.ModuleType("vllm._custom_ops")
    ops.__spec__ = importlib.machinery.ModuleSpec("vllm._custom_ops", None)
    ops.rotary_embedding = _rotary_unreachable
    pkg._custom_ops = ops
    sys.modules["vllm"] = pkg
    sys.modules["vllm._custom_ops"] = ops
    INSTALLED.append("vllm_rotary_stub")


def install() -> None:
    """Install every CPU shim; idempotent."""
    install_vllm_rotary_stub()

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


class _TorchWithoutPinning:
    """`torch`, except that tensor factories ignore pin_memory=True (see unpin_lora)."""

    _FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "arange", "as_tensor")

    def __getattr__(self, name: str) -> object:
        import torch

        attr = getattr(torch, name)
        if name not in self._FACTORIES:
            return attr

        def factory(*args: object, **kwargs: object) -> object:
            kwargs.pop("pin_memory", None)
            return attr(*args, **kwargs)

        return factory


def unpin_lora(*args: object, **kwargs: object) -> None:
    """BEFORE hook on ModelRunner.init_lora_manager, CPU only.

    Target: sglang/srt/lora/layers.py (torch.empty(..., pin_memory=True) in the LoRA layer
    constructors, `.cpu().pin_memory()` in MergedColumnParallelLinearWithLoRA) and
    sglang/srt/lora/backend/torch_backend.py (pinned batch metadata per forward).
    Why: pinning needs a CUDA driver; without one these raise and LoRA cannot start. Pinned
    host memory only speeds host-to-GPU copies, which a CPU-only run never makes.
    How: that module's `torch` becomes a proxy whose factories drop pin_memory, and
    Tensor.pin_memory returns the tensor itself. Scoped to when LoRA starts on a machine
    without CUDA; model loading (where a global torch.tensor wrapper once broke HF rotary
    buffers, DESIGN.md) has finished by then.
    """
    import torch
    from sglang.srt.lora import layers
    from sglang.srt.lora.backend import torch_backend

    if "lora_unpinned" in INSTALLED:
        return
    for module in (layers, torch_backend):
        module.torch = _TorchWithoutPinning()
    torch.Tensor.pin_memory = lambda self, *a, **k: self
    INSTALLED.append("lora_unpinned")


def parse_cpu_list(spec: str) -> set[int]:
    """Core ids of one SGLANG_CPU_OMP_THREADS_BIND entry: "0-3,8,10-11" -> {0,1,2,3,8,10,11}."""
    cores: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cores.update(range(int(lo), int(hi or lo) + 1))
    return cores


def bind_threads(
    result: object, *args: object, local_omp_cpuid: str | None = None, **kwargs: object
) -> None:
    """AFTER hook on sglang.srt.distributed.bootstrap._init_cpu_threads_env, CPU only.

    Target: the step that binds a scheduler's OpenMP threads to its share of the cores
    (`local_omp_cpuid`, this rank's entry of SGLANG_CPU_OMP_THREADS_BIND, e.g. "0-3").
    Why: SGLang binds only through sgl_kernel's CPU build (`_is_cpu_amx_available` or
    arm64) and otherwise logs a warning and binds nothing: every replica of `--dp-size N`
    then runs as many OpenMP threads as the machine has cores, N x oversubscribed, and
    spin-waiting threads starve each other (measured on 2 cores: 8 clients spread over 2
    replicas got 0.07 requests/s, pinned to one replica 0.17).
    How: when SGLang did not bind, pin every thread of this scheduler process to its
    cores and set torch's intra-op threads to their count, as sgl_kernel would have.
    """
    import os

    import torch
    from sglang.srt.distributed import bootstrap

    bound_by_sglang = getattr(bootstrap, "_is_cpu_amx_available", False) or getattr(
        bootstrap, "_is_cpu_arm64", False
    )
    if not local_omp_cpuid or bound_by_sglang:
        return
    cores = sorted(parse_cpu_list(str(local_omp_cpuid)) & os.sched_getaffinity(0))
    if not cores:
        return
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except OSError:  # a thread that ended since listdir
            pass
    torch.set_num_threads(len(cores))
    if "threads_bound" not in INSTALLED:
        INSTALLED.append("threads_bound")


def install() -> None:
    """Install every CPU shim; idempotent."""
    install_vllm_rotary_stub()

"""Scheduler-process side of the plugin: the state it reports through SGLang's channel."""

from __future__ import annotations

import os
from typing import Any

from mace_sgl import __version__, memstats
from mace_sgl.plugin import cpu, loopback, state, train_hooks


def scheduler_state(scheduler: Any) -> dict[str, Any]:
    """What this scheduler reports about mace-sgl; plain msgpack- and JSON-safe values."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    report = {
        "pid": os.getpid(),
        "dp_rank": train_hooks.dp_rank(scheduler),
        "load": queued_and_running_tokens(scheduler),
        "plugin_version": __version__,
        "cpu_shims": list(cpu.INSTALLED),
        # where this scheduler's threads run: on CPU each replica (or each server of a
        # group on one machine) should have cores of its own (cpu.bind_threads)
        "threads": thread_binding(),
        "network": list(loopback.APPLIED),
        # Hooks that HookRegistry really applied in this process (not just registered).
        "hooks_applied": sorted(HookRegistry._patched),
        "trainer": train_hooks.trainer_status(scheduler),
        # RSS against glibc's heap and Python's objects: a leak, a cache or fragmentation
        "memory": memstats.snapshot(),
    }
    st = state.of(scheduler)
    if st is not None and st.trimmer is not None:
        report["memory"]["malloc_trim"] = st.trimmer.status()
    if st is not None and st.pruner is not None:
        report["kv"] = st.pruner.status()
    return state.json_safe(report)


def thread_binding() -> dict[str, Any]:
    """The cores this scheduler's main thread may run on and torch's intra-op threads."""
    import torch

    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"cores": cores, "torch_threads": torch.get_num_threads()}


def queued_and_running_tokens(scheduler: Any) -> int | None:
    """The scheduler's queued plus running tokens, from its own load snapshot (what
    SGLang's data-parallel controller and /v1/loads see), or None where it has none."""
    inquirer = getattr(scheduler, "load_inquirer", None)
    if inquirer is None:
        return None
    try:
        return int(inquirer.get_loads().num_total_tokens)
    except Exception:  # a status field must never fail the route
        return None


def add_mace_state(result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> Any:
    """AFTER hook on Scheduler.get_internal_state: adds the `mace` entry to its dict."""
    result.internal_state["mace"] = scheduler_state(scheduler)
    return result

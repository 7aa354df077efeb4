"""CPU shims and the loopback rendezvous hook, run in fresh interpreters for isolation."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mace_sgl.plugin import loopback


def run_py(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_rotary_stub_imports_and_fails_loudly_if_called():
    proc = run_py(
        "from mace_sgl.plugin import cpu\n"
        "cpu.install(); cpu.install()\n"
        "assert cpu.INSTALLED == ['vllm_rotary_stub'], cpu.INSTALLED\n"
        "import importlib.util\n"
        "assert importlib.util.find_spec('vllm') is not None\n"
        "from vllm._custom_ops import rotary_embedding\n"
        "try:\n"
        "    import vllm.logger\n"
        "    raise SystemExit('other vllm modules must stay unimportable')\n"
        "except ImportError:\n"
        "    pass\n"
        "try:\n"
        "    rotary_embedding(None)\n"
        "except NotImplementedError as e:\n"
        "    print('raised:', e)\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert "raised: mace-sgl CPU shim" in proc.stdout


def test_single_rank_rendezvous_moves_to_a_private_file_store():
    args, kwargs = loopback.file_store_for_single_rank(
        world_size=1, rank=0, distributed_init_method="tcp://127.0.0.1:1234"
    )
    method = kwargs["distributed_init_method"]
    assert method.startswith("file://") and kwargs["world_size"] == 1
    import stat

    store_dir = os.path.dirname(method[len("file://") :])
    assert stat.S_IMODE(os.stat(store_dir).st_mode) == 0o700


def test_store_dirs_of_dead_schedulers_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = tmp_path / f"{loopback.PREFIX}{dead.pid}-abc"
    live = tmp_path / f"{loopback.PREFIX}{os.getpid()}-def"
    other = tmp_path / "mace-sgl-distance-1"
    for d in (gone, live, other):
        d.mkdir()
        (d / "store").write_text("x")
    assert loopback.remove_stale_stores(tmp_path) == [gone]
    assert not gone.exists() and live.exists() and other.exists()


def test_multi_rank_rendezvous_is_left_alone():
    assert (
        loopback.file_store_for_single_rank(
            world_size=2, rank=0, distributed_init_method="tcp://127.0.0.1:1234"
        )
        is None
    )
    assert (
        loopback.file_store_for_single_rank(world_size=1, rank=0, distributed_init_method="env://")
        is None
    )


def test_threads_are_bound_to_the_ranks_cores_when_sglang_binds_none():
    # Through SGLang's own bootstrap function with the hook applied, as a scheduler runs it.
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("binding to one core of one changes nothing")
    proc = run_py(
        "import os, threading, time, torch\n"
        "from sglang.srt.distributed import bootstrap\n"
        "from sglang.srt.plugins.hook_registry import HookRegistry, HookType\n"
        "from mace_sgl.plugin import cpu\n"
        "bootstrap._is_cpu_amx_available = False; bootstrap._is_cpu_arm64 = False\n"
        "HookRegistry.register('sglang.srt.distributed.bootstrap._init_cpu_threads_env',\n"
        "                      cpu.bind_threads, HookType.AFTER)\n"
        "HookRegistry.apply_hooks()\n"
        "stop = threading.Event()\n"
        "t = threading.Thread(target=stop.wait); t.start()  # a thread that exists before\n"
        "core = min(os.sched_getaffinity(0))\n"
        "bootstrap._init_cpu_threads_env(local_omp_cpuid=str(core))  # SGLang passes a string\n"
        "assert os.sched_getaffinity(0) == {core}, os.sched_getaffinity(0)\n"
        "assert os.sched_getaffinity(t.native_id) == {core}\n"
        "assert torch.get_num_threads() == 1, torch.get_num_threads()\n"
        "assert cpu.INSTALLED == ['threads_bound'], cpu.INSTALLED\n"
        "stop.set(); t.join()\n"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_bind_entry_lists_cores_and_ranges():
    from mace_sgl.plugin.cpu import parse_cpu_list

    assert parse_cpu_list("0-3,8,10-11") == {0, 1, 2, 3, 8, 10, 11}
    assert parse_cpu_list("1") == {1}

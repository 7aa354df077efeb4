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
    args, kwargs = loopback.rendezvous_on_loopback(
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


def test_a_rendezvous_on_another_host_is_left_alone():
    for method in ("tcp://10.1.2.3:1234", "tcp://0.0.0.0:1234", "env://"):
        assert loopback.rendezvous_on_loopback(
            world_size=2, rank=0, distributed_init_method=method
        ) is None, method  # fmt: skip
    assert loopback.rendezvous_on_loopback(
        world_size=1, rank=0, distributed_init_method="env://"
    ) is None  # fmt: skip


RANKS = """
import json, os, sys
import psutil, torch
import torch.distributed as dist
from mace_sgl.plugin import loopback

rank, port = int(sys.argv[1]), int(sys.argv[2])
os.environ.pop("GLOO_SOCKET_IFNAME", None)
hooked = loopback.rendezvous_on_loopback(
    world_size=2, rank=rank, distributed_init_method=f"tcp://127.0.0.1:{port}")
method = hooked[1]["distributed_init_method"]
dist.init_process_group("gloo", init_method=method, world_size=2, rank=rank)
t = torch.tensor([rank + 1.0])
dist.all_reduce(t)
listening = [c.laddr.ip for c in psutil.Process().net_connections(kind="inet")
             if c.status == psutil.CONN_LISTEN]
gloo = [c for c in psutil.Process().net_connections(kind="inet")
        if c.status == psutil.CONN_ESTABLISHED]
print(json.dumps({"method": method, "sum": t.item(), "listening": listening,
                  "peers": [c.raddr.ip for c in gloo],
                  "ifname": os.environ.get("GLOO_SOCKET_IFNAME")}), flush=True)
dist.barrier()
os._exit(0)  # not a teardown under gloo's threads
"""


def test_ranks_on_loopback_meet_and_listen_on_loopback_only():
    """Two ranks rendezvous as SGLang's tp/pp ranks do (tcp://127.0.0.1:PORT, through
    the hook): the store's server and gloo's connections stay on loopback, where
    torch's own tcp:// store listens on every interface."""
    import ipaddress
    import json

    from mace_sgl.launcher import free_port

    port = free_port()
    procs = [
        subprocess.Popen([sys.executable, "-c", RANKS, str(r), str(port)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]  # fmt: skip
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    got = [json.loads(out) for out, _ in outs]
    assert all(g["method"] == f"mace-loopback://127.0.0.1:{port}" for g in got)
    assert all(g["sum"] == 3.0 for g in got)
    assert all(g["ifname"] == loopback.loopback_interface() for g in got)
    assert got[0]["listening"], got  # rank 0 serves the store
    for g in got:
        for ip in g["listening"] + g["peers"]:
            addr = ipaddress.ip_address(ip)
            addr = getattr(addr, "ipv4_mapped", None) or addr  # ::ffff:127.0.0.1
            assert addr.is_loopback, g


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

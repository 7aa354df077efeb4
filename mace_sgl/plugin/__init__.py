"""The mace-sgl SGLang plugin: register() is the one place that lists every SGLang hook.

SGLang runs `load_plugins()` in each process it starts (launcher, scheduler, detokenizer)
and calls `register()` there through the `sglang.srt.plugins` entry point, so a hook
registered here reaches the scheduler although that process is spawned, not forked.

Hooks (target -> why -> how):

- CPU only, every process: `vllm._custom_ops` stub -> SGLang's RotaryEmbedding imports the
  vllm fallback kernel on an unknown platform -> an in-memory module (plugin/cpu.py).
- CPU only, every process: the `torch_native` entry of SGLang's LoRA backend registry
  (`lora_registry.LORA_SUPPORTED_BACKENDS`) -> its per-segment Python loop made a decode
  batch of 8 tenants cost 7x one tenant's LoRA work -> the same class with a gathered
  path for many short segments (plugin/lora_backend.py); `--lora-backend torch_native`
  stays the flag.
- CPU only, scheduler process: `sglang.srt.distributed.bootstrap._init_cpu_threads_env`
  AFTER -> SGLang binds a rank's OpenMP threads to its cores only through sgl_kernel's
  CPU build, so without it every --dp-size replica runs one thread per core of the
  machine -> pin the scheduler's threads to its cores and set torch's thread count
  (plugin/cpu.py bind_threads).
- `sglang.srt.distributed.parallel_state.init_distributed_environment` BEFORE -> torch's
  TCPStore listens on every interface although SGLang asks for 127.0.0.1, and gloo/NCCL
  on the hostname's -> a single-rank engine rendezvouses through a file store instead;
  several ranks on a loopback host through a TCPStore bound to that host, gloo and
  NCCL on the loopback interface (plugin/loopback.py).
- `sglang.srt.managers.scheduler.Scheduler.get_internal_state` AFTER -> /mace/status must
  show state that lives in the scheduler process (and prove the plugin runs there) ->
  add a `mace` entry to the dict SGLang already sends back over its own msgpack channel
  (plugin/scheduler.py).
- With --mace-train on CPU: `ModelRunner.init_lora_manager` BEFORE -> SGLang's LoRA
  layers pin host memory, which needs a CUDA driver -> pinning becomes a no-op there
  (plugin/cpu.py unpin_lora).
- Every scheduler process: `Scheduler.__init__` AFTER attaches one state object to the
  scheduler (and to its req_to_token pool, which a ScheduleBatch hook can reach): the
  trainer, the iteration monitor, the pruner and the metrics of THAT scheduler, so hooks
  find their parts there instead of in module globals (plugin/state.py). With
  --mace-train it builds the trainer on the loaded weights and its policy
  (--mace-policy).
- With --mace-train, scheduler process: `Scheduler.run_batch` AROUND times every forward
  for the policy's cost model; `Scheduler.process_batch_result` AFTER records TTFT/TBT for
  SLO control and runs the training units the policy fits into the iteration;
  `Scheduler.maybe_sleep_on_idle` AROUND trains one unit instead of sleeping (also
  without --mace-train when --mace-malloc-trim-s > 0: an idle scheduler calls
  malloc_trim, mace_sgl/memstats.py);
  `Scheduler.handle_generate_request` BEFORE notes the arrival (plugin/train_hooks.py,
  plugin/iteration.py).
- Every scheduler process: `Scheduler.get_new_batch_prefill` BEFORE -> SGLang keys a
  request's radix prefix by extra_key + lora_id concatenated, which a base request can
  forge, and a tenant's weights change in place -> every waiting request's key becomes
  JSON of (client key, adapter id, that adapter's published version), set when its
  prefill is about to be matched and run, not on arrival (plugin/train_hooks.py).
- With --dp-size > 1 and --mace-placement lemix (the default), data-parallel
  controller process: `DataParallelController.__init__` AFTER -> SGLang places requests
  round robin or by queued tokens, blind to the training a replica runs between its
  iterations -> its `dispatching` becomes LeMix placement by predicted response time,
  from SGLang's own load snapshots plus each replica's training state
  (plugin/placement.py, policy/placement.py).
- Launcher process: `TokenizerManager.generate_request` BEFORE gives requests that name no
  adapter the --mace-default-adapter.
- Launcher process, on a GPU when the launcher left the training/pruning reserve to
  resolution (`reserve_pending`): SGLang's resolution step `handle_gpu_memory_settings`
  wrapped through its own `register_resolution_hook` -> SGLang picks
  --mem-fraction-static for the GPU it finds, and the trainer's memory must come out of
  it before the KV pool is sized -> declare the lowered share (plugin/gpu_reserve.py).
- Every process: `mace_prune` added to `attention_registry.ATTENTION_BACKENDS` and to
  `arg_groups/choices.ATTENTION_BACKEND_CHOICES` -> KV pruning is an attention backend
  (scores come from the attention it computes) that --attention-backend must accept in
  the launcher and the scheduler must build -> SGLang's own registration functions
  (plugin/prune_hooks.py install_backend; the backend is mace_sgl/prune/backend.py).
- `sglang.srt.managers.schedule_batch.ScheduleBatch.prepare_for_decode` AFTER -> rows
  over budget must shrink between decode steps (the next slot is allocated, no forward
  in flight) -> compact req_to_token, free dropped slots to the allocator, shorten
  seq_lens/kv lengths (prune/runtime.py); a no-op unless the mace_prune backend exists.
- Launcher (HTTP) process only: `/mace/*` routes added to SGLang's FastAPI `app` before it
  starts, so SGLang's --api-key middleware covers them like its own routes; pause, resume
  and adapter management carry SGLang's ADMIN_OPTIONAL auth level (--admin-api-key when
  set) (plugin/routes.py). Tenants made at run time load into SGLang through its own
  TokenizerManager.load_lora_adapter / unload_lora_adapter.
"""

from __future__ import annotations

import logging
import multiprocessing

logger = logging.getLogger(__name__)

_registered = False


def register() -> None:
    """Entry point for `sglang.srt.plugins`; idempotent and cheap when called again."""
    global _registered
    if _registered:
        return
    _registered = True

    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from mace_sgl.config import MaceConfig
    from mace_sgl.plugin import (
        cpu,
        gpu_reserve,
        loopback,
        lora_backend,
        prune_hooks,
        scheduler,
        train_hooks,
    )

    if cpu.on_cpu():
        cpu.install()
        lora_backend.install()
        HookRegistry.register(
            "sglang.srt.distributed.bootstrap._init_cpu_threads_env",
            cpu.bind_threads,
            HookType.AFTER,
        )

    HookRegistry.register(
        "sglang.srt.distributed.parallel_state.init_distributed_environment",
        loopback.rendezvous_on_loopback,
        HookType.BEFORE,
    )
    HookRegistry.register(
        "sglang.srt.managers.scheduler.Scheduler.get_internal_state",
        scheduler.add_mace_state,
        HookType.AFTER,
    )

    prune_hooks.install_backend()
    HookRegistry.register(
        "sglang.srt.managers.schedule_batch.ScheduleBatch.prepare_for_decode",
        prune_hooks.prune_decode_batch,
        HookType.AFTER,
    )

    cfg = MaceConfig.from_env()
    hooks = train_hooks.TrainHooks(cfg)
    sched = "sglang.srt.managers.scheduler.Scheduler."
    # Every scheduler gets its state object (plugin/state.py), training or not: the
    # pruner and /mace/status find their parts there.
    HookRegistry.register(sched + "__init__", hooks.attach_state, HookType.AFTER)
    # Radix keys no request can forge, with each tenant's version (train_hooks.py): also
    # without --mace-train, as SGLang's own key lets a base request reach any adapter's KV.
    HookRegistry.register(sched + "get_new_batch_prefill", hooks.key_by_version, HookType.BEFORE)
    if cfg.train and cpu.on_cpu():
        HookRegistry.register(
            "sglang.srt.model_executor.model_runner.ModelRunner.init_lora_manager",
            cpu.unpin_lora,
            HookType.BEFORE,
        )
    if cfg.train:
        HookRegistry.register(sched + "process_batch_result", hooks.after_iteration, HookType.AFTER)
        HookRegistry.register(
            sched + "handle_generate_request", hooks.on_generate_request, HookType.BEFORE
        )
        HookRegistry.register(sched + "run_batch", hooks.timed_forward, HookType.AROUND)
    if cfg.train or cfg.malloc_trim_s > 0:
        HookRegistry.register(sched + "maybe_sleep_on_idle", hooks.train_or_sleep, HookType.AROUND)
    if cfg.replicas > 1 and cfg.placement == "lemix":
        from mace_sgl.plugin import placement

        HookRegistry.register(
            "sglang.srt.managers.data_parallel_controller.DataParallelController.__init__",
            placement.PlacementHooks(cfg).install_dispatch,
            HookType.AFTER,
        )
    if cfg.default_adapter:
        HookRegistry.register(
            "sglang.srt.managers.tokenizer_manager.TokenizerManager.generate_request",
            hooks.default_adapter,
            HookType.BEFORE,
        )

    # SGLang spawns its workers; only the launcher, which has no parent, serves HTTP.
    # Importing the FastAPI app elsewhere would only slow the workers' start.
    if multiprocessing.parent_process() is None:
        from mace_sgl.plugin import routes

        routes.install(cfg)
        gpu_reserve.install(cfg)
    logger.info("mace-sgl plugin registered (cpu shims: %s)", cpu.INSTALLED or "none")

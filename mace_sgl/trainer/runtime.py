"""The trainer inside SGLang's scheduler process: feeds, runs and publishes sliced DPO.

Driven by two hooks (plugin/train_hooks.py): after every serving iteration it runs slices
whose predicted time fits the per-iteration reserve; when the scheduler would sleep idle it
runs one slice instead, so a new request waits at most one slice. Work arrives from the
sidecar over ZeroMQ; results go back the same way.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import time
import uuid
from collections import deque
from collections.abc import Generator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import zmq

from mace_sgl.config import MaceConfig
from mace_sgl.ipc import channels
from mace_sgl.ipc.messages import Control, Hello, Ready, Result, Work, decode_to_trainer, encode
from mace_sgl.templating import encode_pair
from mace_sgl.trainer.publish import PoolPublisher, checkpoints, lora_config_dict
from mace_sgl.trainer.shared import attach_lora, build_shared_llama, shares_storage
from mace_sgl.trainer.sliced import Pair, SlicedDPO, SliceSpec, run_to_end

logger = logging.getLogger("mace_sgl.trainer")

CANARY_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Name three colours."}],
]


class SliceCost:
    """Seconds per token of each slice kind, an exponential average of what was measured."""

    def __init__(self) -> None:
        self.per_token = {"fwd": 2e-5, "head": 2e-5, "bwd": 6e-5, "opt": 0.0}
        self.fixed = {"fwd": 1e-4, "head": 1e-4, "bwd": 3e-4, "opt": 5e-3}

    def predict(self, spec: SliceSpec) -> float:
        """Predicted seconds for a slice."""
        return self.fixed[spec.kind] + self.per_token[spec.kind] * spec.tokens

    def observe(self, spec: SliceSpec, seconds: float) -> None:
        """Fold one measured slice into the averages."""
        if spec.tokens:
            measured = max(seconds - self.fixed[spec.kind], 0.0) / spec.tokens
            self.per_token[spec.kind] += 0.2 * (measured - self.per_token[spec.kind])
        else:
            self.fixed[spec.kind] += 0.2 * (seconds - self.fixed[spec.kind])


class MaceTrainer:
    """Owns the shared-weight LoRA model, the step in progress and the live adapter."""

    def __init__(self, scheduler: Any, cfg: MaceConfig) -> None:
        import psutil
        from transformers import AutoConfig, AutoTokenizer

        self.cfg = cfg
        self.process = psutil.Process()
        rss_before = self.process.memory_info().rss
        model_runner = scheduler.tp_worker.model_runner
        model_path = model_runner.model_config.model_path
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        hf_config = AutoConfig.from_pretrained(model_path)
        with torch.inference_mode(False):
            base = build_shared_llama(model_runner.model, hf_config)
            self.model = attach_lora(base, cfg.lora_rank, cfg.lora_alpha, cfg.targets)
            self.version = self._resume()
            self.dpo = SlicedDPO(self.model, beta=cfg.beta, lr=cfg.lr)
        lora_bytes = sum(p.numel() * p.element_size() for p in self._lora_params().values())
        self.memory = {
            "shares_base_weights": shares_storage(self.model, model_runner.model),
            "base_weight_mb": sum(
                p.numel() * p.element_size() for p in model_runner.model.parameters()
            )
            / 2**20,
            "lora_mb": lora_bytes / 2**20,
            "adam_state_mb": 2 * lora_bytes / 2**20,  # exp_avg + exp_avg_sq, once stepped
            "rss_before_trainer_mb": rss_before / 2**20,
            "rss_after_trainer_mb": self.process.memory_info().rss / 2**20,
        }
        self.publisher = PoolPublisher(model_runner.lora_manager, cfg.adapter_name)
        self.lora_uid = self.publisher.uid
        self.publisher.publish(self.model)
        self.good_state = self._snapshot()
        self.swap_baseline = None
        if cfg.measure_swap:
            try:
                self.swap_baseline = self._measure_swap_baseline()
            except Exception as e:  # a measurement must never take the server down
                logger.exception("swap measurement failed")
                self.swap_baseline = {"error": f"{type(e).__name__}: {e}"}
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="mace-ckpt")
        self.session = uuid.uuid4().hex
        self.queue: deque[Pair] = deque()
        self.step: Generator[SliceSpec, None, Any] | None = None
        self.pending: SliceSpec | None = None
        self.step_pairs: list[Pair] = []
        self.cost = SliceCost()
        # Seconds of slices per token of trained pairs: converts the token reserve to time.
        self.sec_per_token = 5e-3
        self.step_seconds = 0.0
        self.credit = 0.0  # seconds of training reserve not yet spent
        self.paused = False
        self.asked_at = 0.0
        self.stats = {
            "train_steps": 0,
            "rollbacks": 0,
            "rejected_versions": 0,
            "last_loss": None,
            "trained_tokens": 0,
            "train_seconds": 0.0,
            "last_swap_ms": None,
            "last_error": None,
        }
        with torch.inference_mode(False):
            self.canary = self._canary_sequences()
            self.canary_base = run_to_end(self._canary_slices(adapter=False))
        ctx = zmq.Context.instance()
        self.push, self.pull = channels.connect_trainer(ctx, cfg.state_path / "run")
        self.push.send(encode(Hello(self.session, cfg.adapter_name)))
        logger.info(
            "trainer ready: adapter %s v%d, canary base %.3f nats/token",
            cfg.adapter_name,
            self.version,
            self.canary_base,
        )

    # -- state ---------------------------------------------------------------------------

    def _lora_params(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.model.named_parameters() if "lora_" in n}

    def _snapshot(self) -> dict[str, Any]:
        return {
            "weights": {n: p.detach().clone() for n, p in self._lora_params().items()},
            "optimizer": copy.deepcopy(self.dpo.optimizer.state_dict()),
        }

    def _rollback(self, why: str) -> None:
        with torch.no_grad():
            for n, p in self._lora_params().items():
                p.copy_(self.good_state["weights"][n])
        self.dpo.optimizer.load_state_dict(copy.deepcopy(self.good_state["optimizer"]))
        self.stats["rollbacks"] += 1
        self.stats["last_error"] = why
        logger.warning("training step rolled back to v%d: %s", self.version, why)

    def _resume(self) -> int:
        """Load the newest checkpointed version, if any; return its number (0 if none)."""
        from safetensors.torch import load_file

        # v0 is the all-zero adapter that only reserves SGLang's slot: never resume it
        # (zero A and zero B would leave LoRA without any gradient).
        versions = [(n, d) for n, d in checkpoints(self.cfg.adapter_dir) if n > 0]
        if not versions:
            return 0
        version, path = versions[-1]
        weights = load_file(str(path / "adapter_model.safetensors"))
        params = self._lora_params()
        with torch.no_grad():
            for name, p in params.items():
                key = name.replace(".default", "")
                p.copy_(weights[key])
        logger.info("resumed adapter from %s", path)
        return version

    def _checkpoint(self) -> None:
        """Write the version just published (peft format) off the serving thread."""
        weights = {n.replace(".default", ""): t for n, t in self.good_state["weights"].items()}
        meta = {
            "version": self.version,
            "time": time.time(),
            "train_steps": self.stats["train_steps"],
            "loss": self.stats["last_loss"],
        }
        config = self.model.peft_config["default"].to_dict()
        self.writer.submit(
            _write_checkpoint,
            self.cfg.adapter_dir,
            self.version,
            weights,
            config,
            meta,
            self.cfg.keep_versions,
        )

    def _measure_swap_baseline(self, repeats: int = 5) -> dict[str, float]:
        """Time until new weights are servable: our in-place publish against SGLang's own
        path (load_lora_adapter_from_tensors, then the pool-slot copy its next batch would
        make, then unload), same weights, side by side; medians in milliseconds. Runs at
        start, before serving; the live slot is republished afterwards."""
        import statistics

        from sglang.srt.lora.lora_registry import LoRARef

        manager = self.publisher.manager
        pool = manager.memory_pool
        weights = {
            n.replace(".default", ""): p.detach().clone() for n, p in self._lora_params().items()
        }
        peft_cfg = self.model.peft_config["default"]
        config = lora_config_dict(peft_cfg.r, peft_cfg.lora_alpha, list(peft_cfg.target_modules))
        self.publisher.publish(self.model)
        slot = pool.uid_to_buffer_id.get(self.lora_uid, 0)
        in_place, reload = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            self.publisher.publish(self.model)
            in_place.append((time.perf_counter() - start) * 1000)
            ref = LoRARef(lora_name="mace-swap-probe", lora_path="mace-swap-probe", pinned=False)
            start = time.perf_counter()
            loaded = manager.load_lora_adapter_from_tensors(ref, weights, config)
            if not loaded.success:
                raise RuntimeError(f"baseline load failed: {loaded.error_message}")
            pool.load_lora_weight_to_buffer(
                ref.lora_id,
                slot,
                manager.loras[ref.lora_id],
                manager.lora_modules,
                manager.embed_tokens_module,
                manager.lm_head_module,
            )
            reload.append((time.perf_counter() - start) * 1000)
            manager.unload_lora_adapter(ref)
        self.publisher.publish(self.model)  # the live weights back into the slot
        return {
            "in_place_ms": statistics.median(in_place),
            "sglang_load_to_slot_ms": statistics.median(reload),
        }

    # -- canary --------------------------------------------------------------------------

    def _canary_sequences(self) -> list[tuple[torch.Tensor, int]]:
        """The base model's own greedy answers to fixed prompts (adapter disabled)."""
        seqs = []
        if not getattr(self.tokenizer, "chat_template", None):
            return seqs
        with torch.no_grad(), self.model.disable_adapter():
            for messages in CANARY_PROMPTS:
                prompt, _ = encode_pair(self.tokenizer, messages, "")
                ids = torch.tensor([prompt])
                out = self.model.generate(
                    input_ids=ids,
                    max_new_tokens=16,
                    do_sample=False,
                    pad_token_id=self.tokenizer.eos_token_id,
                )
                seqs.append((out, len(prompt)))
        return seqs

    def _canary_slices(self, adapter: bool) -> Generator[SliceSpec, None, float]:
        total, count = 0.0, 0
        for ids, prompt_len in self.canary:
            logp = yield from self.dpo.forward_slices(ids, prompt_len, adapter, None)
            total += logp
            count += ids.shape[1] - prompt_len
        return total / max(count, 1)

    # -- messages ------------------------------------------------------------------------

    def poll(self) -> None:
        """Take every waiting sidecar message; ask for work when there is none."""
        while True:
            try:
                data = self.pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            msg = decode_to_trainer(data)
            if isinstance(msg, Work) and msg.session == self.session:
                self.asked_at = 0.0
                for s in msg.samples:
                    self.queue.append(self._pair(s))
            elif isinstance(msg, Control):
                self.paused = msg.paused
        # The sidecar answers only when it has samples; ask again now and then.
        now = time.monotonic()
        if not self.queue and self.step is None and not self.paused and now - self.asked_at > 0.5:
            self.push.send(encode(Ready(self.session, self.cfg.pairs_per_step)))
            self.asked_at = now

    def _pair(self, s: Any) -> Pair:
        prompt, chosen = encode_pair(self.tokenizer, s.prompt, s.chosen)
        _, rejected = encode_pair(self.tokenizer, s.prompt, s.rejected)
        return Pair(s.id, prompt, chosen, rejected, s.weight)

    # -- running slices ------------------------------------------------------------------

    def has_work(self) -> bool:
        """True when a slice could run now."""
        return not self.paused and (self.step is not None or bool(self.queue))

    def _next_spec(self) -> SliceSpec | None:
        if self.paused:
            return None  # pause takes effect after the current slice
        if self.pending is None and self.step is None and self.queue and not self.paused:
            n = min(self.cfg.pairs_per_step, len(self.queue))
            self.step_pairs = [self.queue.popleft() for _ in range(n)]
            self.step = self._step(self.step_pairs)
            self.pending = next(self.step)
        return self.pending

    def _run_pending(self) -> None:
        spec = self.pending
        start = time.perf_counter()
        try:
            with torch.inference_mode(False):
                self.pending = next(self.step)
        except StopIteration:
            self.step, self.pending = None, None
        except Exception as e:  # OOM or anything else: serving must go on
            logger.exception("training slice failed")
            self.step, self.pending = None, None
            self._rollback(f"{type(e).__name__}: {e}")
            self._report(self.step_pairs, {}, self.version)
        elapsed = time.perf_counter() - start
        self.cost.observe(spec, elapsed)
        self.stats["train_seconds"] += elapsed
        self.step_seconds += elapsed

    def run_reserve(self) -> None:
        """After a serving iteration: slices that fit the reserve, in predicted time.

        The reserve accrues as credit, so a slice that costs more than one iteration's
        reserve (the LM head over a large vocabulary) still runs every few iterations;
        the training time per iteration averages the reserve. Credit is capped so that
        an idle stretch cannot bank a long stall.
        """
        self.poll()
        budget = self.cfg.train_tokens_per_iter * self.sec_per_token
        self.credit = min(self.credit + budget, max(8 * budget, 0.0))
        while True:
            spec = self._next_spec()
            if spec is None:
                return
            predicted = self.cost.predict(spec)
            if predicted > self.credit:
                return
            self.credit -= predicted
            self._run_pending()

    def run_idle_slice(self) -> None:
        """Nothing to serve: one slice, then back to the loop to look for requests."""
        self.poll()
        if self._next_spec() is not None:
            self._run_pending()

    # -- one step, then maybe a publish --------------------------------------------------

    def _step(self, pairs: list[Pair]) -> Generator[SliceSpec, None, None]:
        result = yield from self.dpo.step_slices(pairs)
        if not result.ok:
            self._rollback(result.error)
            self._report(pairs, result.losses, self.version)
            return
        self.stats["train_steps"] += 1
        self.stats["last_loss"] = sum(result.losses.values()) / len(result.losses)
        logger.info(
            "step %d: losses %s margins %s grad norm %.4g",
            self.stats["train_steps"],
            result.losses,
            result.margins,
            result.grad_norm,
        )
        tokens = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
        self.stats["trained_tokens"] += tokens
        self.sec_per_token += 0.3 * (self.step_seconds / tokens - self.sec_per_token)
        self.step_seconds = 0.0
        if self.stats["train_steps"] % self.cfg.publish_every == 0:
            score = yield from self._canary_slices(adapter=True)
            drop = self.canary_base - score
            if not math.isfinite(score) or drop > self.cfg.canary_max_drop:
                self.stats["rejected_versions"] += 1
                self._rollback(f"canary log-prob fell {drop:.3f} nats/token")
            else:
                yield SliceSpec("opt", 0)
                self._publish()
        self._report(pairs, result.losses, self.version)

    def _publish(self) -> None:
        start = time.perf_counter()
        self.publisher.publish(self.model)
        self.stats["last_swap_ms"] = (time.perf_counter() - start) * 1000
        self.version += 1
        self.good_state = self._snapshot()
        self._checkpoint()
        logger.info(
            "published %s v%d (loss %.4f, swap %.1f ms)",
            self.cfg.adapter_name,
            self.version,
            self.stats["last_loss"],
            self.stats["last_swap_ms"],
        )

    def _report(self, pairs: list[Pair], losses: dict[int, float], version: int) -> None:
        for p in pairs:
            loss = losses.get(p.sample_id, float("nan"))
            self.push.send(encode(Result(self.session, p.sample_id, loss, version)))

    # -- status --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Plain values for /mace/status."""
        secs = self.stats["train_seconds"]
        return {
            **self.stats,
            "adapter": self.cfg.adapter_name,
            "adapter_version": self.version,
            "paused": self.paused,
            "queued_in_trainer": len(self.queue),
            "train_tokens_per_s": self.stats["trained_tokens"] / secs if secs else 0.0,
            "reserve_tokens_per_iter": self.cfg.train_tokens_per_iter,
            "reserve_ms": 1000 * self.cfg.train_tokens_per_iter * self.sec_per_token,
            "memory": {**self.memory, "rss_now_mb": self.process.memory_info().rss / 2**20},
            "swap_baseline": self.swap_baseline,
        }


def _write_checkpoint(
    adapter_dir: Path,
    version: int,
    weights: dict[str, torch.Tensor],
    config: dict[str, Any],
    meta: dict[str, Any],
    keep: int,
) -> None:
    """peft-format checkpoint of one version, written to a temp dir and renamed; prunes
    all but the newest `keep` versions (v0, the all-zero start, always stays)."""
    from safetensors.torch import save_file

    out = adapter_dir / f"v{version}"
    tmp = adapter_dir / f".v{version}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(tmp / "adapter_model.safetensors"))
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    (tmp / "adapter_config.json").write_text(json.dumps(config, default=str, indent=2) + "\n")
    (tmp / "mace.json").write_text(json.dumps(meta) + "\n")
    tmp.rename(out)
    for old, path in checkpoints(adapter_dir)[:-keep]:
        if old != 0:
            shutil.rmtree(path, ignore_errors=True)

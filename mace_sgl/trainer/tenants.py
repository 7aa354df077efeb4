"""The tenant registry: one LoRA per adapter name, all trained on the one shared model.

A tenant is an adapter that SGLang serves from STATE/adapters/NAME (host.tenant_names):
the default one (`live`), those of --mace-adapters and those made at run time
(POST /mace/adapters, or the first feedback with --mace-auto-adapters). Each has its
own LoRA weights (fp32 tensors), AdamW state, version counter, guard log, statistics,
checkpoint writer (STATE/adapters/NAME/vN, peft format) and its slot in SGLang
(PoolPublisher); all resume from the newest checkpoint when the tenant appears.

There is one peft model on SGLang's base weights. `activate` points its LoRA parameters
at a tenant's tensors (no copy) and hands the trainer that tenant's optimizer, so a step
runs on one tenant's adapter and nothing of the others is touched or duplicated.

Memory per tenant: its LoRA (fp32), the AdamW moments once it has stepped (2x the
LoRA), and SGLang's CPU copy of the adapter (in the model's dtype). Optimizer state
stays in memory (it is also in each checkpoint); a rollback snapshot exists only from
a step's start until its version is published or rolled back, for one tenant at a time.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mace_sgl.trainer.checkpoints import CheckpointWriter, Resumed, check_compatible, resume
from mace_sgl.trainer.guard import GuardLog
from mace_sgl.trainer.host import TrainerHost
from mace_sgl.trainer.publish import PoolPublisher
from mace_sgl.trainer.sliced import Pair

logger = logging.getLogger("mace_sgl.trainer")

# One optimizer step's pairs and their losses (by sample id), reported once the version
# that holds the step is decided (published, refused or rolled back).
TrainedStep = tuple[list[Pair], dict[int, float]]


@dataclass
class TenantStats:
    """Counters of one tenant, as /mace/status and /mace/adapters show them."""

    train_steps: int = 0
    rollbacks: int = 0
    rejected_versions: int = 0
    last_loss: float | None = None
    trained_tokens: int = 0
    last_swap_ms: float | None = None
    last_error: str | None = None
    # Versions published by another data-parallel replica and installed here.
    synced_versions: int = 0


@dataclass
class Tenant:
    """One adapter's training state."""

    name: str
    uid: str  # SGLang's lora id of the adapter
    adapter_dir: Path
    weights: dict[str, torch.Tensor]  # peft parameter name -> fp32 tensor
    optimizer: torch.optim.Optimizer
    publisher: PoolPublisher
    writer: CheckpointWriter
    version: int
    resumed: Resumed
    guard: GuardLog = field(default_factory=GuardLog)
    stats: TenantStats = field(default_factory=TenantStats)
    # Weights and optimizer state of the last published version, taken at the start of a
    # step and dropped once a version is published: what a rollback restores.
    good_state: dict[str, Any] | None = None
    # Steps trained since the last publish and not yet reported (--mace-publish-every >
    # 1): (pairs, losses) each, reported with the version that holds them, or untrained
    # when a rollback drops their training (runtime._step).
    held_back: list[TrainedStep] = field(default_factory=list)
    # With data-parallel replicas: digest() of the weights its version was published
    # with (what it serves; training goes on changing the tensors until the next one).
    served_digest: str | None = None
    # time.monotonic() when its current version began serving here (publish or install).
    served_since: float = 0.0

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            **vars(self.stats),
            "guard_refusals": sum(self.guard.refused.values()),
            "guard_checked": self.guard.checked,
            "optimizer_state": bool(self.optimizer.state),
            "checkpoints": self.writer.status(),
            "resumed": {"version": self.resumed.version, "optimizer": self.resumed.optimizer},
        }


def host_copy(obj: Any) -> Any:
    """A deep copy with every tensor in host memory (a GPU tensor's copy waits for the
    current stream, the one that wrote it)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: host_copy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(host_copy(v) for v in obj)
    return copy.deepcopy(obj)


class TenantRegistry:
    """The tenants of one trainer and which of them is in the model."""

    def __init__(self, host: TrainerHost, peft_model: Any, dpo: Any) -> None:
        """dpo: the SlicedDPO on `peft_model`; its `optimizer` follows the active tenant."""
        self.host = host
        self.cfg = host.cfg
        self.model = peft_model
        self.dpo = dpo
        self.params = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
        # The model's own LoRA tensors, as peft initialised them: the first tenant's.
        self._spare: dict[str, torch.Tensor] | None = {n: p.data for n, p in self.params.items()}
        self.tenants: dict[str, Tenant] = {}
        self.active: Tenant | None = None
        self.retired = 0
        # Tenants SGLang serves that could not be created here, by name: why (status), and
        # the load (SGLang's uid) that failed, not tried again while SGLang serves it; a
        # retire or a new load of the name forgets it (and tries the new load).
        self.create_failures: dict[str, str] = {}
        self._failed_uid: dict[str, str] = {}
        # One checkpoint-writer thread for every tenant (checkpoints.py says why).
        self.writer_pool = ThreadPoolExecutor(1, thread_name_prefix="mace-ckpt")

    # -- membership ------------------------------------------------------------------------

    def sync(self) -> tuple[list[str], list[str]]:
        """Follow SGLang's loaded adapters: a tenant for each new one, none for each one
        unloaded. Returns (added, removed) names."""
        served = self.host.tenant_names()
        removed = [n for n, t in self.tenants.items() if served.get(n) != t.uid]
        for name in removed:
            self._drop(name)
        for name, uid in list(self._failed_uid.items()):
            if served.get(name) != uid:
                del self._failed_uid[name], self.create_failures[name]
        added = []
        for name, uid in served.items():
            if name in self.tenants or name in self._failed_uid:
                continue
            try:
                self._create(name, uid)
                added.append(name)
            except Exception as e:  # one broken tenant must not stop the others
                logger.exception("tenant %s could not be created", name)
                self.create_failures[name] = f"{type(e).__name__}: {e}"
                self._failed_uid[name] = uid
        return added, removed

    def _fresh_weights(self) -> dict[str, torch.Tensor]:
        """New LoRA tensors initialised as peft does (A Kaiming-uniform, B zero): the
        adapter starts as the base model."""
        if self._spare is not None:  # the model's own, untouched yet
            fresh, self._spare = self._spare, None
            return fresh
        out = {}
        for n, p in self.params.items():
            t = torch.empty_like(p.data)
            if ".lora_A." in n:
                torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5))
            else:
                t.zero_()
            out[n] = t
        return out

    def _create(self, name: str, uid: str) -> Tenant:
        adapter_dir = self.cfg.state_path / "adapters" / name
        cfg = self.cfg
        check_compatible(adapter_dir, cfg.lora_rank, cfg.lora_alpha, cfg.targets)
        weights = self._fresh_weights()
        optimizer = self.dpo.new_optimizer()
        # resume() loads into the tensors and, for the optimizer, must see them as the
        # parameters: the optimizer's state is keyed by the (shared) parameter objects.
        resumed = resume(adapter_dir, weights, optimizer)
        publisher = PoolPublisher(self.host.lora_manager, name, self.host.streams)
        publisher.publish_weights(weights.items())
        tenant = Tenant(
            name=name,
            uid=uid,
            adapter_dir=adapter_dir,
            weights=weights,
            optimizer=optimizer,
            publisher=publisher,
            writer=CheckpointWriter(adapter_dir, cfg.keep_versions, pool=self.writer_pool),
            version=resumed.version,
            resumed=resumed,
        )
        if self.cfg.synced:
            tenant.served_digest = self.digest(tenant)
        self.tenants[name] = tenant
        logger.info("tenant %s ready at v%d", name, tenant.version)
        return tenant

    def _drop(self, name: str) -> None:
        tenant = self.tenants.pop(name)
        if self.active is tenant:
            self.active = None
        self.retired += 1
        logger.info("tenant %s retired at v%d", name, tenant.version)

    def get(self, name: str) -> Tenant | None:
        return self.tenants.get(name)

    def by_uid(self) -> dict[str, Tenant]:
        return {t.uid: t for t in self.tenants.values()}

    # -- the tenant in the model -----------------------------------------------------------

    def activate(self, tenant: Tenant) -> None:
        """Point the model's LoRA parameters at `tenant`'s tensors (no copy) and give the
        trainer its optimizer."""
        if self.active is tenant:
            return
        for n, p in self.params.items():
            p.data = tenant.weights[n]
        self.dpo.optimizer = tenant.optimizer
        self.active = tenant

    def snapshot(self, tenant: Tenant) -> None:
        """Keep what a rollback restores, unless a snapshot is already held (steps since
        the last publish all roll back to it)."""
        if tenant.good_state is None:
            tenant.good_state = {
                "weights": {n: t.detach().clone() for n, t in tenant.weights.items()},
                "optimizer": copy.deepcopy(tenant.optimizer.state_dict()),
            }

    def rollback(self, tenant: Tenant, why: str) -> None:
        """Back to the last published version (weights and optimizer state)."""
        if tenant.good_state is not None:
            with torch.no_grad():
                for n, t in tenant.weights.items():
                    t.copy_(tenant.good_state["weights"][n])
            tenant.optimizer.load_state_dict(copy.deepcopy(tenant.good_state["optimizer"]))
            tenant.good_state = None
        tenant.stats.rollbacks += 1
        tenant.stats.last_error = why
        logger.warning("%s: training step rolled back to v%d: %s", tenant.name, tenant.version, why)

    def publish(self, tenant: Tenant) -> None:
        """Serve the tenant's current weights as its next version, and checkpoint it."""
        start = time.perf_counter()
        tenant.publisher.publish_weights(tenant.weights.items())
        tenant.stats.last_swap_ms = (time.perf_counter() - start) * 1000
        tenant.version += 1
        tenant.served_since = time.monotonic()
        tenant.good_state = None
        if self.cfg.synced:
            tenant.served_digest = self.digest(tenant)
        self._checkpoint(tenant)
        logger.info(
            "published %s v%d (loss %.4f, swap %.1f ms)",
            tenant.name,
            tenant.version,
            tenant.stats.last_loss if tenant.stats.last_loss is not None else float("nan"),
            tenant.stats.last_swap_ms,
        )

    def _checkpoint(self, tenant: Tenant) -> None:
        """Queue the tenant's current version for the background writer."""
        # Private host copies for the background writer: training goes on changing the
        # tensors, and on a GPU the writer's thread must not read device memory that the
        # training stream may still be writing (a copy to the host waits for it here).
        weights = {n.replace(".default", ""): host_copy(t) for n, t in tenant.weights.items()}
        meta = {
            "version": tenant.version,
            "time": time.time(),
            "train_steps": tenant.stats.train_steps,
            "loss": tenant.stats.last_loss,
        }
        config = self.model.peft_config["default"].to_dict()
        optimizer = host_copy(tenant.optimizer.state_dict())
        tenant.writer.submit(tenant.version, weights, config, meta, optimizer)

    def install(
        self, tenant: Tenant, version: int, payload: torch.Tensor, checkpoint: bool = False
    ) -> None:
        """Serve `version` of `tenant` as another replica published it: its weights and
        optimizer state (trainer/replicas.py) written in place, then into SGLang's pool
        slot. A replica of the same server wrote its checkpoint; one from another server
        (its own state directory) is checkpointed here when `checkpoint`."""
        from mace_sgl.trainer.replicas import unpack_state

        start = time.perf_counter()
        unpack_state(payload, tenant.weights, tenant.optimizer)
        tenant.publisher.publish_weights(tenant.weights.items())
        tenant.stats.last_swap_ms = (time.perf_counter() - start) * 1000
        tenant.version = version
        tenant.served_since = time.monotonic()
        tenant.good_state = None
        tenant.served_digest = self.digest(tenant)
        tenant.stats.synced_versions += 1
        if checkpoint:
            self._checkpoint(tenant)
        logger.info("installed %s v%d from another replica", tenant.name, version)

    @staticmethod
    def digest(tenant: Tenant) -> str:
        """sha256 of the tenant's LoRA tensors now (bytes, in order): equal on two
        replicas exactly when their weights are identical."""
        import hashlib

        h = hashlib.sha256()
        for t in tenant.weights.values():
            h.update(host_copy(t).contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    def lora_bytes(self) -> int:
        """Bytes of one tenant's LoRA weights (fp32)."""
        return sum(p.numel() * p.element_size() for p in self.params.values())

    def status(self) -> list[dict[str, Any]]:
        return [t.status() for t in self.tenants.values()]

"""The /mace/* HTTP routes, added to SGLang's own FastAPI app in the launcher process.

Auth follows SGLang's levels (sglang.srt.utils.auth): status and feedback are NORMAL
routes (--api-key), pause, resume and adapter management (list, create, retire) are
ADMIN_OPTIONAL, like SGLang's own control routes (--admin-api-key when set, else
--api-key, else open). /get_load (NORMAL) is the load sglang-router polls for its
load-aware policies; SGLang 0.5.23 itself serves only /v1/loads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from sglang.srt.utils.auth import AuthLevel, auth_level

from mace_sgl import __version__
from mace_sgl.config import MaceConfig
from mace_sgl.feedback import ADAPTER_NAME, ADAPTER_NAME_RULE, FeedbackError, parse_feedback
from mace_sgl.metrics import FeedbackMetrics
from mace_sgl.plugin import tenant_log
from mace_sgl.policy.fairshare import weight_problem
from mace_sgl.templating import encode_pair
from mace_sgl.trainer.checkpoints import purge_dir
from mace_sgl.trainer.publish import checkpoints
from sidecar import store

logger = logging.getLogger(__name__)


class RouteState:
    """What the routes share in the HTTP process: the config register() read once, and the
    metrics, built on first use after SGLang set PROMETHEUS_MULTIPROC_DIR (metrics.py).
    Kept on the app (`app.state.mace`), not in module globals."""

    def __init__(self, cfg: MaceConfig) -> None:
        self.cfg = cfg
        self._metrics: FeedbackMetrics | None = None
        self._metrics_checked = False
        # Several training servers: the thread that applies the group's tenant log here.
        self.tenant_log: tenant_log.TenantLogFollower | None = None

    def metrics(self) -> FeedbackMetrics | None:
        """The HTTP process's metrics with --enable-metrics, else None."""
        if not self._metrics_checked:
            tm = _tokenizer_manager()
            if tm is None:
                return None
            self._metrics_checked = True
            if getattr(tm.server_args, "enable_metrics", False):
                self._metrics = FeedbackMetrics(self.cfg.adapter_name)
        return self._metrics


def _state(app: Any) -> RouteState:
    return app.state.mace


def _tokenizer_manager() -> Any:
    from sglang.srt.entrypoints.http_server import get_global_state

    state = get_global_state()
    return state.tokenizer_manager if state is not None else None


def _with_store(cfg: MaceConfig, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(connection, *args) on a short-lived store connection (run in a worker thread)."""
    conn = store.connect(cfg.store_path)
    try:
        return fn(conn, *args)
    finally:
        conn.close()


def _tenant_counts(
    conn: sqlite3.Connection,
) -> tuple[store.Counts, list[store.Tenant], dict[str, store.Counts], dict[str, int]]:
    deleted = {
        key: int(store.get_setting(conn, key, "0"))
        for key in ("feedback_trimmed", "feedback_evicted")
    }
    return store.counts(conn), store.tenants(conn), store.counts_by_adapter(conn), deleted


def _queue_depth(conn: sqlite3.Connection) -> int:
    """Rows never trained, over the existing tenants."""
    by_adapter = store.counts_by_adapter(conn)
    return sum(by_adapter[t.name].untrained for t in store.tenants(conn) if t.name in by_adapter)


async def _refresh_queue_depth(cfg: MaceConfig, metrics: FeedbackMetrics) -> None:
    try:
        depth = await asyncio.to_thread(_with_store, cfg, _queue_depth)
    except Exception:
        # A metric must never fail the request that refreshes it.
        logger.warning("mace: queue depth for /metrics not read", exc_info=True)
        return
    metrics.queue_depth(depth)


class _QueueDepthOnScrape:
    """ASGI middleware: refresh the store's queue-depth gauge before /metrics answers, so
    a scrape sees the queue drain although nobody calls /mace/status."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path", "").startswith("/metrics"):
            st = _state(scope["app"])
            metrics = st.metrics()
            if metrics is not None:
                await _refresh_queue_depth(st.cfg, metrics)
        await self.app(scope, receive, send)


async def mace_status(request: Request) -> JSONResponse:
    """GET /mace/status: versions, device, model, adapter, training and feedback state."""
    import sglang

    tm = _tokenizer_manager()
    if tm is None:
        return JSONResponse({"error": "server is starting"}, status_code=503)
    st = _state(request.app)
    cfg = st.cfg
    # One entry per data-parallel scheduler; each comes from that scheduler process.
    internal: list[dict[str, Any]] = await tm.get_internal_state()
    # queue_depth counts the rows of existing tenants only: rows naming a retired
    # adapter never train, so counting them would keep the queue from ever draining.
    counts, tenants, by_adapter, deleted = await asyncio.to_thread(_with_store, cfg, _tenant_counts)
    none = store.Counts(0, 0, 0)
    mine = [by_adapter.get(t.name, none) for t in tenants]
    queue_depth = sum(c.untrained for c in mine)
    metrics = st.metrics()
    if metrics is not None:
        metrics.queue_depth(queue_depth)
    # By dp_rank: SGLang lists them in the order they answered, which varies.
    schedulers = sorted(
        (s.get("mace") for s in internal), key=lambda m: (m or {}).get("dp_rank") or 0
    )
    trainer = next((s["trainer"] for s in schedulers if s and s.get("trainer")), None)
    by_name = {t["name"]: t for t in (trainer or {}).get("tenants", [])}
    body = {
        "version": __version__,
        "sglang_version": sglang.__version__,
        "device": tm.server_args.device,
        "model_path": tm.model_path,
        "served_model_name": tm.served_model_name,
        "profile": cfg.profile,
        "adapter": {
            "name": cfg.adapter_name if trainer else None,
            "version": trainer["adapter_version"] if trainer else None,
        },
        "adapter_version": trainer["adapter_version"] if trainer else 0,
        "training": {"enabled": bool(trainer), **(trainer or {})},
        "train_steps": trainer["train_steps"] if trainer else 0,
        "last_loss": trainer["last_loss"] if trainer else None,
        "train_tokens_per_s": trainer["train_tokens_per_s"] if trainer else 0.0,
        "reserve_tokens_per_iter": trainer["reserve_tokens_per_iter"] if trainer else 0,
        "policy": trainer["policy"] if trainer else None,
        "reserve_ms": trainer["reserve_ms"] if trainer else 0.0,
        "slo": trainer["slo"] if trainer else None,
        "feedback_count": counts.feedback,
        # trained pairs deleted beyond --mace-feedback-retain (the sidecar's trim), and
        # never-trained ones deleted for newer (--mace-feedback-overflow evict)
        "feedback_trimmed": deleted["feedback_trimmed"],
        "feedback_evicted": deleted["feedback_evicted"],
        "feedback_other_adapters": counts.feedback - sum(c.feedback for c in mine),
        "queue_depth": queue_depth,
        "tenants": {
            "count": len(tenants),
            "names": [t.name for t in tenants],
            "training": sorted(by_name),
            "train_steps": {n: t["train_steps"] for n, t in by_name.items()},
            "versions": {n: t["version"] for n, t in by_name.items()},
            "queue_depth": {t.name: c.untrained for t, c in zip(tenants, mine, strict=True)},
        },
        "http_pid": os.getpid(),
        "tenant_log": st.tenant_log.status() if st.tenant_log is not None else None,
        "schedulers": schedulers,
        "replicas": replicas(schedulers),
    }
    return JSONResponse(body)


async def get_load(request: Request) -> JSONResponse:
    """GET /get_load: per replica, its serving load and its training occupancy, in the
    shape sglang-router reads (`num_tokens`, summed over replicas): queued plus running
    tokens, plus the tokens of the training step it runs (trainer training_tokens), so
    the router's load-aware policies (power_of_two, cache_aware's balancing) steer away
    from a server that is training."""
    tm = _tokenizer_manager()
    if tm is None:
        return JSONResponse({"error": "server is starting"}, status_code=503)
    internal: list[dict[str, Any]] = await tm.get_internal_state()
    return JSONResponse(server_loads([s.get("mace") for s in internal]))


def server_loads(schedulers: list[dict[str, Any] | None]) -> list[dict[str, Any]]:
    """/get_load's body from the schedulers' reports (plugin/scheduler.py)."""
    out = []
    for s in schedulers:
        if not s:
            continue
        serving = s.get("load") or 0
        training = (s.get("trainer") or {}).get("training_tokens", 0)
        out.append(
            {
                "dp_rank": s.get("dp_rank", 0),
                "num_tokens": serving + training,
                "num_serving_tokens": serving,
                "num_training_tokens": training,
            }
        )
    return sorted(out, key=lambda r: r["dp_rank"])


def replicas(schedulers: list[dict[str, Any] | None]) -> list[dict[str, Any]]:
    """One entry per data-parallel replica (its scheduler's report), in the order of
    `schedulers` (mace_status sorts them by dp rank): the default adapter's version,
    every tenant's, its own steps, reserve and load."""
    out = []
    for s in schedulers:
        if not s:
            continue
        t = s.get("trainer") or {}
        out.append(
            {
                "dp_rank": s.get("dp_rank", 0),
                "adapter_version": t.get("adapter_version", 0),
                "adapters": t.get("adapters", {}),
                "adapter_digest": t.get("adapter_digest"),
                "adapter_digests": t.get("adapter_digests", {}),
                "switched_at": t.get("adapter_switched_at"),
                "train_steps": t.get("train_steps", 0),
                "reserve_ms": t.get("placement_reserve_ms", 0.0),  # what placement counts
                "load": s.get("load"),
                "training_tokens": t.get("training_tokens", 0),
                "paused": t.get("paused"),  # each trainer's own: pause reaches every one
                "sync": t.get("replica_sync"),
            }
        )
    return out


async def mace_feedback(request: Request) -> JSONResponse:
    """POST /mace/feedback: validate preference pairs and store them durably.

    The 200 is sent only after the rows are committed (WAL synced); a rejected body,
    list or single object, stores nothing.
    """
    st = _state(request.app)
    cfg = st.cfg
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > cfg.feedback_max_bytes:
        return _error(413, f"body is {length} bytes; the limit is {cfg.feedback_max_bytes}")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > cfg.feedback_max_bytes:
            return _error(413, f"body exceeds the limit of {cfg.feedback_max_bytes} bytes")
    tm = _tokenizer_manager()
    tokenizer = getattr(tm, "tokenizer", None)

    def count_tokens(prompt: str | list[dict[str, str]], completion: str) -> int:
        if not isinstance(prompt, str) and not getattr(tokenizer, "chat_template", None):
            raise FeedbackError(400, "this model has no chat template: send `prompt` as a string")
        prompt_ids, completion_ids = encode_pair(tokenizer, prompt, completion)
        return len(prompt_ids) + len(completion_ids)

    try:
        items = parse_feedback(
            body,
            cfg.feedback_max_bytes,
            cfg.adapter_name,
            count_tokens if tokenizer is not None else None,
            tm.context_len if tm is not None else None,
        )
    except FeedbackError as e:
        return _error(e.status, e.reason)
    bound = cfg.feedback_backlog
    batch = Counter(item["adapter"] for item in items)
    too_many = [f"{n} for {a!r}" for a, n in sorted(batch.items()) if bound and n > bound]
    if too_many:
        return _error(
            413,
            f"this body has {', '.join(too_many)}: more pairs than one adapter may have "
            f"waiting to train (--mace-feedback-backlog {bound}); send fewer at a time",
        )
    named = sorted(batch)
    known = await asyncio.to_thread(_with_store, cfg, _existing, named)
    unknown = [n for n in named if n not in known]
    if unknown and not cfg.auto_adapters:
        return _error(
            404,
            f"no adapter named {', '.join(map(repr, unknown))}: create it first with POST "
            '/mace/adapters {"name": ...} (or start the server with --mace-auto-adapters); '
            "nothing was stored",
        )
    for name in unknown:
        try:
            await create_tenant(st, name)
        except TenantError as e:
            return _error(e.status, f"{e.reason}; nothing was stored")
    try:
        evict = cfg.feedback_overflow == "evict"
        ids = await asyncio.to_thread(
            _with_store, cfg, store.add_feedback, items, bound, True, evict
        )
    except store.BacklogFull as e:
        if cfg.trains:
            return _error(429, f"{e}: retry once training has caught up")
        return _error(
            429,
            f"{e}: this server does not train (no --mace-train, or the inference-only "
            "policy), so nothing drains them; restart it with --mace-train to train them, "
            "or raise --mace-feedback-backlog (0: no bound)",
        )
    except store.NotLive as e:  # retired since we looked (a DELETE in between)
        return _error(
            409,
            f"adapter {', '.join(map(repr, e.adapters))} was retired while this feedback was "
            "being stored; nothing was stored (create it again, then resend)",
        )
    metrics = st.metrics()
    if metrics is not None:
        metrics.rows_stored(item["adapter"] for item in items)
        await _refresh_queue_depth(cfg, metrics)
    return JSONResponse({"ids": ids, "count": len(ids)})


def _existing(conn: sqlite3.Connection, names: list[str]) -> set[str]:
    return {n for n in names if store.has_tenant(conn, n)}


class TenantError(Exception):
    """A tenant could not be created or retired: `status` and the reason to answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _prepare_tenant_dir(cfg: MaceConfig, model_path: str, name: str) -> Path:
    """STATE/adapters/NAME with an all-zero v0; returns the version for SGLang to load
    (the newest checkpoint, so a tenant brought back serves its last weights at once)."""
    from mace_sgl.trainer.checkpoints import CheckpointMismatch, check_compatible
    from mace_sgl.trainer.publish import write_zero_adapter

    adapter_dir = cfg.tenant_dir(name)
    try:
        check_compatible(adapter_dir, cfg.lora_rank, cfg.lora_alpha, cfg.targets)
    except CheckpointMismatch as e:
        raise TenantError(409, str(e)) from None
    v0 = adapter_dir / "v0"
    if not (v0 / "adapter_model.safetensors").is_file():
        model_config = json.loads((Path(model_path) / "config.json").read_text())
        write_zero_adapter(v0, model_config, cfg.lora_rank, cfg.lora_alpha, cfg.targets)
    return checkpoints(adapter_dir)[-1][1]


GROUP_STORE_DOWN = (
    "the adapter group's store (server 0, --mace-sync-addr) did not answer, so the other "
    "servers cannot be told"
)


async def load_adapter(tm: Any, cfg: MaceConfig, name: str, path: Path) -> tuple[bool, str]:
    """Load `name` from `path` into SGLang on every replica: (success, error message).

    One replica: SGLang's own `load_lora_adapter`. With --dp-size > 1 SGLang refuses that
    route (an assert on dp_size == 1 in 0.5.23), although the request it sends, through
    the data-parallel controller's control broadcast and a fan-out of one reply per dp
    rank, reaches every replica: the same steps without the assert (a new LoRARef, the
    fan-out, the registry entry only when every rank succeeded). Each replica's trainer
    then picks the adapter up at v0, the same all-zero state everywhere."""
    from sglang.srt.managers.io_struct import LoadLoRAAdapterReqInput

    req = LoadLoRAAdapterReqInput(lora_name=name, lora_path=str(path))
    if cfg.replicas <= 1:
        out = await tm.load_lora_adapter(req)
        return out.success, out.error_message or ""
    from sglang.srt.lora.lora_registry import LoRARef
    from sglang.srt.managers.tokenizer_control_mixin import _merge_lora_update_results

    tm.auto_create_handle_loop()
    async with tm.lora_update_lock:
        ref = LoRARef(lora_name=name, lora_path=str(path))
        req.lora_id = ref.lora_id
        result = _merge_lora_update_results(await tm.update_lora_adapter_communicator(req))
        if result.success:
            await tm.lora_registry.register(ref)
            tm.lora_ref_cache[name] = ref
    return result.success, result.error_message or ""


async def unload_adapter(tm: Any, cfg: MaceConfig, name: str) -> tuple[bool, str]:
    """Unload `name` from SGLang on every replica (see load_adapter)."""
    from sglang.srt.managers.io_struct import UnloadLoRAAdapterReqInput

    req = UnloadLoRAAdapterReqInput(lora_name=name)
    if cfg.replicas <= 1:
        out = await tm.unload_lora_adapter(req)
    else:
        tm.auto_create_handle_loop()
        async with tm.lora_update_lock:
            out = await tm._unload_lora_adapter_locked(req)
    return out.success, out.error_message or ""


def _several_servers(cfg: MaceConfig) -> bool:
    """Training servers of one adapter group: tenants change on all of them (tenant_log)."""
    return cfg.train and cfg.sync_world_size > 1


async def _log(st: RouteState, op: tenant_log.TenantOp) -> None:
    """Append `op` to the group's tenant log (several servers), through this server's
    follower, which keeps it until every server applied it."""
    follower = st.tenant_log
    if follower is None:
        raise RuntimeError("this server does not follow the group's tenant log")

    def append() -> None:
        follower.send(tenant_log.connect(st.cfg), op)

    await asyncio.to_thread(append)


async def create_tenant(st: RouteState, name: str, weight: float = 1.0) -> bool:
    """Create tenant `name`: its store row and, with --mace-train, its adapter in SGLang
    (whose scheduler-side trainer then picks it up). False if it existed already. With
    several servers, then every other server too, through the group's tenant log; if
    the log cannot be written, the creation here is undone (503)."""
    cfg = st.cfg
    if not ADAPTER_NAME.match(name):
        raise TenantError(400, f"adapter name {name!r}: {ADAPTER_NAME_RULE}")
    async with _changing(st):
        created = await _create_local(cfg, name, weight)
        if created and _several_servers(cfg):
            op = tenant_log.TenantOp("create", name, weight=weight, origin=cfg.sync_rank)
            try:
                await _log(st, op)
            except Exception as e:
                await _retire_local(cfg, name, purge=False)
                raise TenantError(503, f"{GROUP_STORE_DOWN} ({e}); nothing was created") from None
    return created


def _changing(st: RouteState) -> contextlib.AbstractAsyncContextManager:
    """Held around a tenant change made here and its log entry (several servers): the
    follower applies the other servers' entries under the same lock, each checked then
    against the newest change of its tenant (tenant_log.TenantLogFollower.changing)."""
    return st.tenant_log.changing if st.tenant_log is not None else contextlib.nullcontext()


async def _create_local(cfg: MaceConfig, name: str, weight: float) -> bool:
    """create_tenant on this server only."""
    created = await asyncio.to_thread(_with_store, cfg, store.add_tenant, name, weight)
    if not created or not cfg.train:
        return created
    tm = _tokenizer_manager()
    try:
        if tm is None:
            raise TenantError(503, "server is starting")
        path = await asyncio.to_thread(_prepare_tenant_dir, cfg, tm.model_path, name)
        loaded, error = await load_adapter(tm, cfg, name, path)
        if not loaded:
            raise TenantError(500, f"SGLang could not load adapter {name!r}: {error}")
    except BaseException:
        await asyncio.to_thread(_with_store, cfg, store.retire_tenant, name)
        raise
    logger.info("mace: tenant %s created (%s)", name, path)
    return True


async def _trainer_tenants() -> dict[str, dict[str, Any]]:
    """Each tenant's status from the trainer (empty without --mace-train)."""
    tm = _tokenizer_manager()
    if tm is None:
        return {}
    internal: list[dict[str, Any]] = await tm.get_internal_state()
    for s in internal:
        trainer = (s.get("mace") or {}).get("trainer")
        if trainer:
            return {t["name"]: t for t in trainer.get("tenants", [])}
    return {}


@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def mace_adapters(request: Request) -> JSONResponse:
    """GET /mace/adapters: every tenant with its version, stored versions, training
    progress, queue and guard refusals."""
    cfg = _state(request.app).cfg

    def scan() -> tuple[list[store.Tenant], dict[str, store.Counts], dict[str, list]]:
        conn = store.connect(cfg.store_path)
        try:
            tenants, by_adapter = store.tenants(conn), store.counts_by_adapter(conn)
        finally:
            conn.close()
        versions = {}
        for t in tenants:
            out = []
            for version, d in checkpoints(cfg.tenant_dir(t.name)):
                meta_file = d / "mace.json"
                meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
                out.append({"version": version, "path": str(d), **meta})
            versions[t.name] = out
        return tenants, by_adapter, versions

    tenants, by_adapter, versions = await asyncio.to_thread(scan)
    live = await _trainer_tenants()
    body = []
    for t in tenants:
        stored = versions[t.name]
        newest = stored[-1] if stored else {}
        trainer = live.get(t.name)
        body.append(
            {
                "name": t.name,
                "version": trainer["version"] if trainer else newest.get("version", 0),
                "versions": stored,
                "train_steps": trainer["train_steps"] if trainer else newest.get("train_steps", 0),
                "queue_depth": by_adapter[t.name].untrained if t.name in by_adapter else 0,
                "last_loss": trainer["last_loss"] if trainer else newest.get("loss"),
                "guard_refusals": trainer["guard_refusals"] if trainer else None,
                "default": t.name == cfg.adapter_name,
                "weight": t.weight,
                "training": trainer is not None,
            }
        )
    return JSONResponse({"adapters": body})


@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def mace_adapters_create(request: Request) -> JSONResponse:
    """POST /mace/adapters {"name": ..., "weight": 1.0}: create a tenant (201), or 200 if
    it exists."""
    st = _state(request.app)
    try:
        body = json.loads(await request.body())
    except ValueError as e:
        return _error(400, f"body is not JSON: {e}")
    if not isinstance(body, dict) or not isinstance(body.get("name"), str):
        return _error(400, 'send {"name": "<adapter name>"}')
    extra = set(body) - {"name", "weight"}
    if extra:
        return _error(400, f"unknown field(s) {sorted(extra)}; allowed: name, weight")
    weight = body.get("weight", 1.0)
    problem = weight_problem(weight)
    if problem:
        return _error(400, f"`weight` {weight!r}: {problem}")
    name = body["name"]
    try:
        created = await create_tenant(st, name, float(weight))
    except TenantError as e:
        return _error(e.status, e.reason)
    return JSONResponse({"name": name, "created": created}, status_code=201 if created else 200)


@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def mace_adapters_delete(request: Request) -> JSONResponse:
    """DELETE /mace/adapters/NAME[?purge=true]: retire a tenant. Its checkpoints and its
    feedback rows are kept (created again, it resumes from them) unless purge is asked:
    then both are deleted, and the name created again starts afresh. A purge of a
    tenant retired before (with or without a purge that did not finish) purges it."""
    st = _state(request.app)
    cfg = st.cfg
    name = request.path_params["name"]
    purge = request.query_params.get("purge", "false").lower() in ("1", "true", "yes")
    if not ADAPTER_NAME.match(name):
        return _error(400, f"adapter name {name!r}: {ADAPTER_NAME_RULE}")
    if name == cfg.adapter_name:
        return _error(
            409, f"{name!r} is the default adapter (--mace-adapter-name): it always exists"
        )
    state = await asyncio.to_thread(_with_store, cfg, store.tenant_state, name)
    if state != "live" and not (purge and state == "retired"):
        return _error(404, f"no adapter named {name!r}")
    try:
        if _several_servers(cfg):  # told first: a retirement must not stay on one server
            op = tenant_log.TenantOp("retire", name, purge=purge, origin=cfg.sync_rank)
            async with _changing(st):
                try:
                    await _log(st, op)
                except Exception as e:
                    return _error(503, f"{GROUP_STORE_DOWN} ({e}); nothing was retired")
                try:
                    deleted = await _retire_local(cfg, name, purge)
                except TenantError:
                    raise
                except Exception as e:  # in the log already: the others retire it
                    return _error(500, f"{name!r} is retired on the other servers, not yet "
                                  f"here ({type(e).__name__}: {e}): retry the DELETE")  # fmt: skip
        else:
            deleted = await _retire_local(cfg, name, purge)
            if deleted is None and not purge:
                return _error(404, f"no adapter named {name!r}")
    except TenantError as e:  # retired, but its purge could not finish
        return _error(e.status, e.reason)
    return JSONResponse(
        {
            "name": name,
            "retired": True,
            "checkpoints_kept": not purge,
            "feedback_deleted": deleted or 0,
        }
    )


async def _retire_local(cfg: MaceConfig, name: str, purge: bool) -> int | None:
    """Retire `name` on this server: its store row, SGLang's adapter, with `purge` its
    feedback rows (this server's store; those stored up to the retirement, not a tenant
    created again since) and its checkpoints. How many feedback rows went; None if it
    was not there and no purge was asked (a purge of a tenant retired before still
    runs: one that failed half-way, asked again, or applied again from the tenant
    log; not once the name exists again)."""
    retired, upto = await asyncio.to_thread(_with_store, cfg, store.retire_marked, name)
    if retired:
        tm = _tokenizer_manager()
        if cfg.train and tm is not None:
            unloaded, error = await unload_adapter(tm, cfg, name)
            if not unloaded:
                logger.warning("mace: SGLang did not unload %s: %s", name, error)
    if not purge:
        return 0 if retired else None
    if not retired and await asyncio.to_thread(_with_store, cfg, store.has_tenant, name):
        return 0  # created again since: its rows and checkpoints are the new one's
    try:
        deleted = await asyncio.to_thread(_with_store, cfg, store.delete_adapter, name, upto)
    except sqlite3.Error as e:
        raise TenantError(
            500, f"{name!r} is retired, but its feedback rows could not all be deleted ({e}): "
            "they no longer train unless the name is created again; retry the purge"
        ) from e  # fmt: skip
    try:
        await asyncio.to_thread(purge_dir, cfg.tenant_dir(name))
    except OSError as e:
        raise TenantError(500, f"{name!r} is retired, but its checkpoints stay: {e}") from e
    return deleted


def _log_position(cfg: MaceConfig) -> tenant_log.Position:
    """Where this server is in the group's tenant log (its feedback store's settings)."""

    def get(conn: sqlite3.Connection) -> tenant_log.Position:
        return tenant_log.Position.from_settings(
            lambda key, default: store.get_setting(conn, key, default)
        )

    return _with_store(cfg, get)


def _save_log_position(cfg: MaceConfig, position: tenant_log.Position) -> None:
    def put(conn: sqlite3.Connection) -> None:
        with conn:  # all or none
            conn.execute("BEGIN IMMEDIATE")
            for key, value in position.settings().items():
                store.set_setting(conn, key, value)

    _with_store(cfg, put)


async def apply_tenant_op(cfg: MaceConfig, op: tenant_log.TenantOp) -> None:
    """Another server's entry of the group's tenant log, on this server (tenant_log.
    TenantLogFollower); idempotent. A server still starting answers RetryLater."""
    if op.op == "create":
        if not ADAPTER_NAME.match(op.name):
            raise ValueError(f"adapter name {op.name!r}: {ADAPTER_NAME_RULE}")
        problem = weight_problem(op.weight)  # e.g. a peer from before the range
        if problem:
            raise ValueError(f"tenant weight {op.weight!r}: {problem}")
        try:
            await _create_local(cfg, op.name, op.weight)
        except TenantError as e:
            if e.status == 503:
                raise tenant_log.RetryLater(e.reason) from None
            raise
    elif op.name != cfg.adapter_name:
        await _retire_local(cfg, op.name, op.purge)


@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def mace_train_pause(request: Request) -> JSONResponse:
    """POST /mace/train/pause: stop training after the current slice; serving goes on."""
    cfg = _state(request.app).cfg
    await asyncio.to_thread(_with_store, cfg, store.set_setting, "paused", "1")
    return JSONResponse({"paused": True})


@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def mace_train_resume(request: Request) -> JSONResponse:
    """POST /mace/train/resume."""
    cfg = _state(request.app).cfg
    await asyncio.to_thread(_with_store, cfg, store.set_setting, "paused", "0")
    return JSONResponse({"paused": False})


def _error(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status)


# SGLang's own adapter routes: with --dp-size > 1 SGLang 0.5.23 asserts dp_size == 1 in
# them, which reaches the client as a bare 500; the plugin answers them first instead.
SGLANG_ADAPTER_ROUTES = (
    "/load_lora_adapter",
    "/load_lora_adapter_from_tensors",
    "/unload_lora_adapter",
)
DP_ADAPTER_ROUTE_REFUSED = (
    "SGLang's adapter routes do not support data-parallel replicas (--dp-size > 1); "
    "create an adapter with POST /mace/adapters and retire it with DELETE "
    "/mace/adapters/NAME, which reach every replica"
)


@auth_level(AuthLevel.ADMIN_OPTIONAL)  # as SGLang's own routes it stands in for
async def adapter_route_refused(request: Request) -> JSONResponse:
    """SGLang's /load_lora_adapter and /unload_lora_adapter under --dp-size > 1: a 400
    that says what to use instead."""
    return _error(400, DP_ADAPTER_ROUTE_REFUSED)


def refuse_adapter_routes(app: Any) -> None:
    """Answer SGLang's adapter routes with adapter_route_refused, ahead of SGLang's own
    (Starlette takes the first route that matches; the API-key middleware reads the
    auth level from that one too)."""
    for path in SGLANG_ADAPTER_ROUTES:
        app.add_api_route(path, adapter_route_refused, methods=["POST"])
        app.router.routes.insert(0, app.router.routes.pop())


def install(cfg: MaceConfig) -> None:
    """Add the routes (and the scrape-time refresh of our queue gauge) to
    sglang.srt.entrypoints.http_server.app before it starts; idempotent."""
    from sglang.srt.entrypoints.http_server import app

    if any(getattr(r, "path", None) == "/mace/status" for r in app.router.routes):
        return
    app.state.mace = RouteState(cfg)
    if _several_servers(cfg):
        app.state.mace.tenant_log = tenant_log.TenantLogFollower(
            cfg,
            lambda op: apply_tenant_op(cfg, op),
            lambda: getattr(_tokenizer_manager(), "event_loop", None),
            lambda: _log_position(cfg),
            lambda p: _save_log_position(cfg, p),
        ).start()
    app.add_api_route("/mace/status", mace_status, methods=["GET"])
    app.add_api_route("/mace/feedback", mace_feedback, methods=["POST"])
    app.add_api_route("/mace/adapters", mace_adapters, methods=["GET"])
    app.add_api_route("/mace/adapters", mace_adapters_create, methods=["POST"])
    app.add_api_route("/mace/adapters/{name}", mace_adapters_delete, methods=["DELETE"])
    app.add_api_route("/mace/train/pause", mace_train_pause, methods=["POST"])
    app.add_api_route("/mace/train/resume", mace_train_resume, methods=["POST"])
    if not any(getattr(r, "path", None) == "/get_load" for r in app.router.routes):
        app.add_api_route("/get_load", get_load, methods=["GET"])
    if cfg.replicas > 1:
        refuse_adapter_routes(app)
    app.add_middleware(_QueueDepthOnScrape)

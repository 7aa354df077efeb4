"""The /mace/* HTTP routes, added to SGLang's own FastAPI app in the launcher process.

Auth follows SGLang's levels (sglang.srt.utils.auth): status and feedback are NORMAL
routes (--api-key), pause, resume and the adapter list are ADMIN_OPTIONAL, like SGLang's
own control routes (--admin-api-key when set, else --api-key, else open).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from sglang.srt.utils.auth import AuthLevel, auth_level

from mace_sgl import __version__
from mace_sgl.config import MaceConfig
from mace_sgl.feedback import FeedbackError, parse_feedback
from mace_sgl.metrics import FeedbackMetrics
from mace_sgl.templating import encode_pair
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


def _all_and_adapter_counts(
    conn: sqlite3.Connection, adapter: str
) -> tuple[store.Counts, store.Counts]:
    return store.counts(conn), store.counts(conn, adapter)


async def _refresh_queue_depth(cfg: MaceConfig, metrics: FeedbackMetrics) -> None:
    try:
        counts = await asyncio.to_thread(_with_store, cfg, store.counts, cfg.adapter_name)
    except Exception:
        # A metric must never fail the request that refreshes it.
        logger.warning("mace: queue depth for /metrics not read", exc_info=True)
        return
    metrics.queue_depth(counts.untrained)


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
    # queue_depth counts only the trained adapter: rows naming another adapter never
    # train here, so counting them would keep the queue from ever draining.
    counts, mine = await asyncio.to_thread(
        _with_store, cfg, _all_and_adapter_counts, cfg.adapter_name
    )
    metrics = st.metrics()
    if metrics is not None:
        metrics.queue_depth(mine.untrained)
    schedulers = [s.get("mace") for s in internal]
    trainer = next((s["trainer"] for s in schedulers if s and s.get("trainer")), None)
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
        "feedback_other_adapters": counts.feedback - mine.feedback,
        "queue_depth": mine.untrained,
        "http_pid": os.getpid(),
        "schedulers": schedulers,
    }
    return JSONResponse(body)


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
    ids = await asyncio.to_thread(_with_store, cfg, store.add_feedback, items)
    metrics = st.metrics()
    if metrics is not None:
        metrics.rows_stored(item["adapter"] for item in items)
        await _refresh_queue_depth(cfg, metrics)
    return JSONResponse({"ids": ids, "count": len(ids)})


@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def mace_adapters(request: Request) -> JSONResponse:
    """GET /mace/adapters: the checkpointed versions of the live adapter."""
    cfg = _state(request.app).cfg

    def scan() -> list[dict[str, Any]]:
        out = []
        for version, d in checkpoints(cfg.adapter_dir):
            meta_file = d / "mace.json"
            meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
            out.append({"version": version, "path": str(d), **meta})
        return out

    versions = await asyncio.to_thread(scan)
    return JSONResponse({"adapter": cfg.adapter_name, "versions": versions})


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


def install(cfg: MaceConfig) -> None:
    """Add the routes (and the scrape-time refresh of our queue gauge) to
    sglang.srt.entrypoints.http_server.app before it starts; idempotent."""
    from sglang.srt.entrypoints.http_server import app

    if any(getattr(r, "path", None) == "/mace/status" for r in app.router.routes):
        return
    app.state.mace = RouteState(cfg)
    app.add_api_route("/mace/status", mace_status, methods=["GET"])
    app.add_api_route("/mace/feedback", mace_feedback, methods=["POST"])
    app.add_api_route("/mace/adapters", mace_adapters, methods=["GET"])
    app.add_api_route("/mace/train/pause", mace_train_pause, methods=["POST"])
    app.add_api_route("/mace/train/resume", mace_train_resume, methods=["POST"])
    app.add_middleware(_QueueDepthOnScrape)

"""The /mace/* HTTP routes, added to SGLang's own FastAPI app in the launcher process."""

from __future__ import annotations

import asyncio
import functools
import json
import os
from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from mace_sgl import __version__
from mace_sgl.config import MaceConfig
from mace_sgl.feedback import FeedbackError, parse_feedback
from mace_sgl.templating import encode_pair
from mace_sgl.trainer.publish import checkpoints
from sidecar import store


@functools.lru_cache(maxsize=1)
def _config() -> MaceConfig:
    # The launcher exported it before SGLang started; it does not change while serving.
    return MaceConfig.from_env()


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


async def mace_status() -> JSONResponse:
    """GET /mace/status: versions, device, model, adapter, training and feedback state."""
    import sglang

    tm = _tokenizer_manager()
    if tm is None:
        return JSONResponse({"error": "server is starting"}, status_code=503)
    cfg = _config()
    # One entry per data-parallel scheduler; each comes from that scheduler process.
    internal: list[dict[str, Any]] = await tm.get_internal_state()
    counts = await asyncio.to_thread(_with_store, cfg, store.counts)
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
        "queue_depth": counts.untrained,
        "http_pid": os.getpid(),
        "schedulers": schedulers,
    }
    return JSONResponse(body)


async def mace_feedback(request: Request) -> JSONResponse:
    """POST /mace/feedback: validate preference pairs and store them durably.

    The 200 is sent only after the rows are committed (WAL synced); a rejected body,
    list or single object, stores nothing.
    """
    cfg = _config()
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
    return JSONResponse({"ids": ids, "count": len(ids)})


async def mace_adapters() -> JSONResponse:
    """GET /mace/adapters: the checkpointed versions of the live adapter."""
    cfg = _config()

    def scan() -> list[dict[str, Any]]:
        out = []
        for version, d in checkpoints(cfg.adapter_dir):
            meta_file = d / "mace.json"
            meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
            out.append({"version": version, "path": str(d), **meta})
        return out

    versions = await asyncio.to_thread(scan)
    return JSONResponse({"adapter": cfg.adapter_name, "versions": versions})


async def mace_train_pause() -> JSONResponse:
    """POST /mace/train/pause: stop training after the current slice; serving goes on."""
    await asyncio.to_thread(_with_store, _config(), store.set_setting, "paused", "1")
    return JSONResponse({"paused": True})


async def mace_train_resume() -> JSONResponse:
    """POST /mace/train/resume."""
    await asyncio.to_thread(_with_store, _config(), store.set_setting, "paused", "0")
    return JSONResponse({"paused": False})


def _error(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status)


def install() -> None:
    """Add the routes to sglang.srt.entrypoints.http_server.app; idempotent."""
    from sglang.srt.entrypoints.http_server import app

    if any(getattr(r, "path", None) == "/mace/status" for r in app.router.routes):
        return
    app.add_api_route("/mace/status", mace_status, methods=["GET"])
    app.add_api_route("/mace/feedback", mace_feedback, methods=["POST"])
    app.add_api_route("/mace/adapters", mace_adapters, methods=["GET"])
    app.add_api_route("/mace/train/pause", mace_train_pause, methods=["POST"])
    app.add_api_route("/mace/train/resume", mace_train_resume, methods=["POST"])

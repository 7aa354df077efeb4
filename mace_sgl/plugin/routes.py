"""The /mace/* HTTP routes, added to SGLang's own FastAPI app in the launcher process."""

from __future__ import annotations

import os
from typing import Any

from fastapi.responses import ORJSONResponse

from mace_sgl import __version__
from mace_sgl.config import MaceConfig


async def mace_status() -> ORJSONResponse:
    """GET /mace/status: versions, device, model, adapter and training state."""
    import sglang
    from sglang.srt.entrypoints.http_server import get_global_state

    state = get_global_state()
    if state is None:
        return ORJSONResponse({"error": "server is starting"}, status_code=503)
    tm = state.tokenizer_manager
    # One entry per data-parallel scheduler; each comes from that scheduler process.
    internal: list[dict[str, Any]] = await tm.get_internal_state()
    cfg = MaceConfig.from_env()
    body = {
        "version": __version__,
        "sglang_version": sglang.__version__,
        "device": tm.server_args.device,
        "model_path": tm.model_path,
        "served_model_name": tm.served_model_name,
        "profile": cfg.profile,
        "adapter": {"name": None, "version": None},
        "training": {"enabled": False},
        "http_pid": os.getpid(),
        "schedulers": [s.get("mace") for s in internal],
    }
    return ORJSONResponse(body)


def install() -> None:
    """Add the routes to sglang.srt.entrypoints.http_server.app; idempotent."""
    from sglang.srt.entrypoints.http_server import app

    if any(getattr(r, "path", None) == "/mace/status" for r in app.router.routes):
        return
    app.add_api_route("/mace/status", mace_status, methods=["GET"])

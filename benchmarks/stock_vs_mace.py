"""Stock SGLang against `mace-sgl serve` with training off, one script, one run.

    python -m benchmarks.stock_vs_mace [--seconds 60] [--streams 8] [--json]

Starts `python -m sglang.launch_server` with the same model and the same CPU settings
`mace-sgl serve` chooses (device, attention and LoRA backends, sleep on idle, KV pool
size), measures a closed loop of streaming OpenAI chat clients, stops it, then does the
same against `mace-sgl serve`. Note: the mace-sgl package registers its plugin through
SGLang's entry point, so the "stock" server runs our CPU shims and status hook too (on
CPU it cannot start without the rotary shim); what differs is everything `serve` adds.
Reports tokens/s, TTFT and TBT tails of both and the throughput ratio (target >= 0.98).

SGLang's own load tool works against our server the same way, e.g.:
    python -m sglang.benchmark.serving --backend sglang --base-url http://127.0.0.1:30000 \\
        --dataset-name random-ids --random-input-len 64 --random-output-len 64 \\
        --num-prompts 50 --request-rate 1 --tokenizer PATH_OF_THE_SERVED_MODEL
(`sglang.bench_serving` is the same tool under its deprecated name. `random-ids` draws
random token ids; `--dataset-name random` samples ShareGPT text and downloads it from
the hub first, which fails on a machine without hub access.)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.colocate import request_body
from benchmarks.loadgen import closed_loop, summarize
from benchmarks.serve_smoke import machine
from mace_sgl.launcher import Server


def stock_args(model_path: str) -> list[str]:
    """The flags `mace-sgl serve` would pass SGLang on this machine, spelled out."""
    from mace_sgl.cli import resolve_serve_args

    args, _ = resolve_serve_args(["--model-path", model_path])
    flags = ["--model-path", model_path, "--log-level", "warning"]
    for name in ("device", "attention_backend", "lora_backend", "max_total_tokens",
                 "max_running_requests", "chunked_prefill_size", "served_model_name"):  # fmt: skip
        value = getattr(args, name, None)
        if value is not None:
            flags += [f"--{name.replace('_', '-')}", str(value)]
    if getattr(args, "sleep_on_idle", False):
        flags.append("--sleep-on-idle")
    return flags


def measure(server: Server, streams: int, seconds: float) -> dict[str, Any]:
    body = lambda i: request_body(i, 64)  # noqa: E731
    closed_loop(server.url, 2, 5.0, body)  # warm-up
    results, wall = closed_loop(server.url, streams, seconds, body)
    return summarize(results, 1e9, 1e9, wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from mace_sgl.models import ensure_default_model

    model = args.model_path or str(ensure_default_model())
    out = Path(tempfile.mkdtemp(prefix="stock-vs-mace-"))
    stock = stock_args(model)
    # The same KV pool for both (it is sized from the RAM free at start).
    pool = stock[stock.index("--max-total-tokens") :][:2] if "--max-total-tokens" in stock else []
    rows = {}
    for name, cmd, flags in (
        ("stock", [sys.executable, "-m", "sglang.launch_server"], stock),
        ("mace-sgl", None, ["--model-path", model, "--log-level", "warning", *pool]),
    ):
        server = Server(flags, out / f"{name}.log", cmd=cmd, timeout_s=600)
        try:
            rows[name] = measure(server, args.streams, args.seconds)
        finally:
            server.stop()
    ratio = rows["mace-sgl"]["throughput_tok_s"] / rows["stock"]["throughput_tok_s"]
    result = {"stock": rows["stock"], "mace-sgl": rows["mace-sgl"],
              "throughput_ratio": ratio, "machine": machine()}  # fmt: skip
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()

"""Start-up time, TTFT and decode speed of `mace-sgl serve` on the default model.

    python -m benchmarks.serve_smoke [--json] [--model-path DIR] [--tokens 128] [--dtype D]

Starts a server on a free loopback port (SGLang's own warm-up included in start-up),
streams `--requests` greedy generations one at a time (single stream), then the same
number at once (`--concurrency`), and prints the figures. Figures, not targets: compare
them only with runs on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

from mace_sgl.launcher import Server

PROMPT = "Write a short story about a robot who learns to paint."


def stream_one(url: str, max_tokens: int) -> dict[str, float]:
    """One streamed greedy /generate; TTFT and decode tokens/s after the first token."""
    body = {
        "text": PROMPT,
        "stream": True,
        "sampling_params": {"temperature": 0, "max_new_tokens": max_tokens, "ignore_eos": True},
    }
    start = time.perf_counter()
    first = last = None
    tokens = 0
    with requests.post(url + "/generate", json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            now = time.perf_counter()
            first = first or now
            last = now
            tokens = json.loads(line[5:])["meta_info"]["completion_tokens"]
    assert first is not None and last is not None and tokens > 1
    return {
        "ttft_ms": (first - start) * 1000,
        "decode_tok_s": (tokens - 1) / (last - first),
        "tokens": tokens,
        "e2e_s": last - start,
    }


def machine() -> str:
    """CPU model and core count, for the README's 'measured on' line."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores, {platform.machine()}"


def run(args: argparse.Namespace) -> dict[str, Any]:
    log = Path(tempfile.mkdtemp(prefix="mace-bench-")) / "server.log"
    extra = ["--model-path", args.model_path] if args.model_path else []
    if args.dtype:
        extra += ["--dtype", args.dtype]
    server = Server([*extra, "--log-level", "warning"], log)
    try:
        stream_one(server.url, 8)  # first request after start pays lazy initialisation
        single = [stream_one(server.url, args.tokens) for _ in range(args.requests)]
        start = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            batch = list(
                pool.map(lambda _: stream_one(server.url, args.tokens), range(args.concurrency))
            )
        wall = time.perf_counter() - start
    finally:
        server.stop()
    return {
        "machine": machine(),
        "startup_s": round(server.startup_s, 1),
        "single_stream": {
            "requests": args.requests,
            "tokens": args.tokens,
            "ttft_ms_p50": round(statistics.median(s["ttft_ms"] for s in single), 1),
            "decode_tok_s_p50": round(statistics.median(s["decode_tok_s"] for s in single), 1),
        },
        "concurrent": {
            "streams": args.concurrency,
            "aggregate_tok_s": round(sum(b["tokens"] for b in batch) / wall, 1),
        },
    }


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve_smoke")
    parser.add_argument("--model-path", default=None, help="default: the embedded model")
    parser.add_argument("--dtype", default=None, help="SGLang's --dtype (default: the server's)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per generation")
    parser.add_argument("--requests", type=int, default=5, help="single-stream requests")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent streams")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()

"""Continuous alignment while serving: does a preference get learned, and what does it
cost the request load? One server, one run, training off (paused) and on.

    python -m benchmarks.align [--pairs 200] [--load-s 90] [--out DIR] [--json]
        [--lr X] [--adapter-decay X] [--adapter-decay-per step|pair] [--max-train-count N]

The recipe flags are passed to the server as --mace-*; each defaults to the server's own.

Preference: answers that open with "Certainly!". Pairs are built from the served base
model's own greedy answers (chosen = "Certainly! " + answer, rejected = answer). Reports,
on held-out prompts, the share of greedy answers (live adapter) opening with "Certainly"
and the mean log-prob margin chosen minus rejected, before and after; TTFT/TBT p50/p99 of
the same steady streaming load with training paused and running; swap latency; memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

from benchmarks.server_flags import add_flags, server_flags, values
from mace_sgl.launcher import Server

TOPICS = [
    "the ocean",
    "volcanoes",
    "bicycles",
    "the moon",
    "coffee",
    "honey bees",
    "trains",
    "the piano",
    "chess",
    "rainbows",
    "deserts",
    "penguins",
    "bread",
    "the internet",
    "glaciers",
    "tea",
    "owls",
    "bridges",
    "lightning",
    "gardens",
    "maps",
    "clocks",
    "whales",
    "mountains",
    "forests",
    "candles",
    "kites",
    "rivers",
    "snow",
    "stars",
]
TEMPLATES = [
    "Tell me one fact about {}.",
    "Describe {} in one sentence.",
    "Why do people like {}?",
    "What is interesting about {}?",
    "Give a short tip about {}.",
    "Explain {} to a child.",
    "Write one sentence about {}.",
    "What should I know about {}?",
    "Say something about {}.",
]
OPENER = "Certainly! "


def prompts() -> list[str]:
    return [t.format(topic) for t in TEMPLATES for topic in TOPICS]


def chat(server: Server, prompt: str, lora: str | None, max_tokens: int) -> str:
    body: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct",
        "temperature": 0,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": prompt}],
    }
    if lora:
        body["lora_path"] = lora
    r = server.post("/v1/chat/completions", body)
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def completion_logprob(
    server: Server, tokenizer: Any, prompt: str, completion: str, lora: str | None = "live"
) -> float:
    """Served log-prob of `completion` after the chat prompt, under adapter `lora`."""
    from mace_sgl.templating import encode_pair

    p, c = encode_pair(tokenizer, [{"role": "user", "content": prompt}], completion)
    return server.scored(p, c, lora, cache_prompt=True)[0]


def base_answers(
    server: Server, held_out: int, train: int
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """`held_out` prompts (every k-th of prompts()) and `train` others, each with the
    served base model's greedy answer (32 tokens)."""
    every = prompts()
    held = every[:: len(every) // held_out][:held_out]
    rest = [p for p in every if p not in held][:train]
    with ThreadPoolExecutor(8) as pool:
        rest_answers = list(pool.map(lambda p: chat(server, p, None, 32), rest))
        held_answers = list(pool.map(lambda p: chat(server, p, None, 32), held))
    return list(zip(held, held_answers, strict=True)), list(zip(rest, rest_answers, strict=True))


def evaluate(server: Server, tokenizer: Any, held_out: list[tuple[str, str]]) -> dict[str, float]:
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda pa: chat(server, pa[0], "live", 16), held_out))
    share = sum(a.strip().startswith("Certainly") for a in answers) / len(answers)
    margins = [
        completion_logprob(server, tokenizer, p, OPENER + a)
        - completion_logprob(server, tokenizer, p, a)
        for p, a in held_out
    ]
    return {
        "share_certainly": share,
        "mean_margin": statistics.mean(margins),
        "examples": answers[:3],
    }


class Load:
    """A steady closed-loop streaming load: `streams` clients, each one request at a time."""

    def __init__(self, server: Server, streams: int, prompts: list[str]) -> None:
        self.server, self.streams, self.prompts = server, streams, prompts
        self.stop = threading.Event()
        self.ttft: list[float] = []
        self.tbt: list[float] = []
        self.errors = 0

    def _client(self, k: int) -> None:
        i = k
        while not self.stop.is_set():
            body = {
                "text": self.prompts[i % len(self.prompts)],
                "stream": True,
                "sampling_params": {"max_new_tokens": 32, "temperature": 0, "ignore_eos": True},
            }
            i += self.streams
            last = time.perf_counter()
            first = True
            try:
                with requests.post(
                    self.server.url + "/generate", json=body, stream=True, timeout=300
                ) as r:
                    r.raise_for_status()
                    for line in r.iter_lines():
                        if not line.startswith(b"data:") or line == b"data: [DONE]":
                            continue
                        now = time.perf_counter()
                        (self.ttft if first else self.tbt).append((now - last) * 1000)
                        first, last = False, now
            except requests.RequestException:
                self.errors += 1

    def run(self, seconds: float) -> dict[str, float]:
        self.stop.clear()
        self.ttft, self.tbt = [], []
        threads = [threading.Thread(target=self._client, args=(k,)) for k in range(self.streams)]
        for t in threads:
            t.start()
        time.sleep(seconds)
        self.stop.set()
        for t in threads:
            t.join()
        return summarise(self.ttft, self.tbt, self.errors)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def summarise(ttft: list[float], tbt: list[float], errors: int) -> dict[str, float]:
    return {
        "requests": len(ttft),
        "errors": errors,
        "ttft_p50_ms": round(pct(ttft, 0.5), 1),
        "ttft_p99_ms": round(pct(ttft, 0.99), 1),
        "tbt_p50_ms": round(pct(tbt, 0.5), 1),
        "tbt_p99_ms": round(pct(tbt, 0.99), 1),
    }


def status(server: Server) -> dict[str, Any]:
    return server.get("/mace/status").json()


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from mace_sgl.models import ensure_default_model

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_default_model()))
    work = Path(args.out or tempfile.mkdtemp(prefix="mace-align-"))
    work.mkdir(parents=True, exist_ok=True)
    state = Path(tempfile.mkdtemp(prefix="mace-align-state-"))
    server = Server(
        [
            "--log-level",
            "warning",
            "--mace-train",
            "--mace-measure-swap",
            "--mace-state-dir",
            str(state),
            *server_flags(args, RECIPE_FLAGS),
        ],
        work / "server.log",
        timeout_s=600,
    )
    t0 = time.monotonic()
    try:
        server.post("/mace/train/pause", {})
        held_out, train = base_answers(server, args.held_out, args.pairs)
        before = evaluate(server, tokenizer, held_out)
        load_prompts = [f"Write a line about {t}." for t in TOPICS]
        load = Load(server, args.streams, load_prompts)
        off = load.run(args.load_s)
        pairs = [
            {"prompt": [{"role": "user", "content": p}], "chosen": OPENER + a, "rejected": a}
            for p, a in train
        ]
        server.post("/mace/train/resume", {})
        feeder_done = threading.Event()

        def feed() -> None:  # feedback arrives interleaved with the load
            for i in range(0, len(pairs), 10):
                server.post("/mace/feedback", pairs[i : i + 10]).raise_for_status()
                time.sleep(args.load_s / (len(pairs) / 10 + 1))
            feeder_done.set()

        feeder = threading.Thread(target=feed)
        feeder.start()
        on = load.run(args.load_s)
        feeder.join()
        s_load = status(server)
        deadline = time.monotonic() + args.drain_s
        while time.monotonic() < deadline and status(server)["queue_depth"] > 0:
            time.sleep(2)
        server.post("/mace/train/pause", {})
        time.sleep(1)
        s_end = status(server)
        after = evaluate(server, tokenizer, held_out)
    finally:
        server.stop()
    t = s_end["training"]
    return {
        "machine": __import__("benchmarks.serve_smoke", fromlist=["machine"]).machine(),
        "pairs": len(pairs),
        "held_out": len(held_out),
        "lr": args.lr,
        "recipe": values(args, RECIPE_FLAGS),
        "before": before,
        "after": after,
        "load_training_off": off,
        "load_training_on": on,
        "trained_during_load": {
            "train_steps": s_load["train_steps"],
            "adapter_version": s_load["adapter_version"],
        },
        "end": {
            "train_steps": s_end["train_steps"],
            "adapter_version": s_end["adapter_version"],
            "queue_depth": s_end["queue_depth"],
            "rollbacks": t.get("rollbacks"),
            "rejected_versions": t.get("rejected_versions"),
            "train_tokens_per_s": round(t.get("train_tokens_per_s", 0), 1),
            "last_swap_ms": t.get("last_swap_ms"),
        },
        "swap": t.get("swap_baseline"),
        "memory": t.get("memory"),
        "wall_s": round(time.monotonic() - t0, 1),
    }


# The training recipe's flags the benchmark passes to the server as --mace-FLAG.
RECIPE_FLAGS = ("lr", "adapter-decay", "adapter-decay-per", "max-train-count")


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.align")
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--held-out", type=int, default=20)
    parser.add_argument("--streams", type=int, default=2, help="concurrent load clients")
    parser.add_argument("--load-s", type=float, default=90.0, help="seconds per load phase")
    parser.add_argument(
        "--drain-s",
        type=float,
        default=600.0,
        help="longest wait, after the load, for every pair to train once",
    )
    add_flags(parser, RECIPE_FLAGS)
    parser.add_argument("--out", default=None, help="folder for results.json and the log")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args)
    out = Path(args.out) if args.out else None
    if out:
        (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()

"""`mace-sgl profile`: measure this device and model, write the policy's profile JSON.

It starts `mace-sgl serve` (same SGLang flags) with training on and a cost model that
forgets nothing (forgetting 1.0 makes its decayed least squares an ordinary least-squares
fit of every observation), then drives a sweep through the real server: prefills of
growing length, decode batches of growing size and context, and training steps on
synthetic preference pairs of growing length. The scheduler measures every forward and
every training slice itself (the same code that corrects the cost model online while
serving); the fitted weights, per-kind fit errors and the SLO targets derived from them
become the profile.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mace_sgl.policy import CostModel, Profile
from mace_sgl.policy.cost import FORGETTING
from mace_sgl.policy.slo import SloTargets

FULL = {
    "prefill_tokens": [16, 32, 64, 128, 256, 512, 1024],
    "decode_batches": [1, 2, 4, 8, 16],
    "decode_prompts": [32, 256],
    "pair_words": [4, 16, 48, 96],
    "repeats": 3,
}
QUICK = {
    "prefill_tokens": [16, 64, 256, 512],
    "decode_batches": [1, 4, 8],
    "decode_prompts": [32, 256],
    "pair_words": [4, 24, 64],
    "repeats": 2,
}
WORDS = "river stone light garden window music paper winter bread silver clock forest".split()


def derive_slo(cost: CostModel) -> SloTargets:
    """Targets a device can meet with room to spare: TBT twice a batch-8 decode iteration
    at 256 tokens of context per stream; TTFT twice a 1024-token prefill plus one TBT."""
    tbt = max(2.0 * cost.predict("decode", batch=8, context=8 * 256), 0.02)
    ttft = 2.0 * cost.predict("prefill", tokens=1024, context=1024) + tbt
    return SloTargets(ttft_ms=round(1000 * ttft, 1), tbt_ms=round(1000 * tbt, 1))


class Sweep:
    """Drives the sweep against a running server."""

    def __init__(self, server: Any, vocab: int, plan: dict[str, Any], seed: int = 0) -> None:
        self.server = server
        self.vocab = vocab
        self.plan = plan
        self.rng = random.Random(seed)

    def _ids(self, n: int) -> list[int]:
        # Fresh random ids: no radix-cache hit can shorten a prefill.
        return [self.rng.randrange(10, self.vocab - 10) for _ in range(n)]

    def _generate(self, n_prompt: int, max_new: int) -> None:
        r = self.server.post(
            "/generate",
            {
                "input_ids": self._ids(n_prompt),
                "sampling_params": {
                    "max_new_tokens": max_new,
                    "temperature": 0.0,
                    "ignore_eos": True,
                },
            },
        )
        r.raise_for_status()

    def steps(self) -> list[tuple[str, Any]]:
        p = self.plan
        steps: list[tuple[str, Any]] = []
        for _ in range(p["repeats"]):
            steps += [("prefill", n) for n in p["prefill_tokens"]]
        steps += [("decode", (b, n)) for n in p["decode_prompts"] for b in p["decode_batches"]]
        steps += [("train", w) for w in p["pair_words"] for _ in range(p["repeats"])]
        return steps

    def run(self, step: tuple[str, Any]) -> None:
        kind, arg = step
        if kind == "prefill":
            self._generate(arg, 1)
        elif kind == "decode":
            batch, prompt = arg
            with ThreadPoolExecutor(batch) as pool:
                list(pool.map(lambda _: self._generate(prompt, 32), range(batch)))
        else:
            self._train(arg)

    def _train(self, words: int) -> None:
        before = self.server.get("/mace/status").json()["train_steps"]
        text = " ".join(self.rng.choice(WORDS) for _ in range(words))
        pair = {
            "prompt": f"Say something about {self.rng.choice(WORDS)}.",
            "chosen": text,
            "rejected": " ".join(reversed(text.split())),
        }
        self.server.post("/mace/feedback", pair).raise_for_status()
        deadline = time.monotonic() + 600
        while self.server.get("/mace/status").json()["train_steps"] <= before:
            if time.monotonic() > deadline:
                raise TimeoutError("the trainer did not finish a step in 10 minutes")
            time.sleep(0.2)


def profile(argv: list[str]) -> int:
    """The `mace-sgl profile` command."""
    from tqdm import tqdm

    from mace_sgl.launcher import Server

    parser = argparse.ArgumentParser(
        prog="mace-sgl profile",
        description="Measure prefill, decode and training-unit costs on this device and "
        "model through a real server; write the profile JSON that `serve --mace-profile` "
        "loads. Other flags go to `mace-sgl serve` (e.g. --model-path, --dtype).",
    )
    parser.add_argument("--out", default="mace-profile.json", help="profile file to write")
    parser.add_argument("--quick", action="store_true", help="a shorter sweep")
    args, serve_args = parser.parse_known_args(argv)
    plan = QUICK if args.quick else FULL
    work = Path(tempfile.mkdtemp(prefix="mace-profile-"))
    seed = Profile(cost=CostModel(forgetting=1.0))
    seed.meta["source"] = "mace-sgl profile (fitting)"
    seed.save(work / "seed.json")
    flags = [
        *serve_args,
        "--mace-train",
        "--mace-policy",
        "fcfs-reserve",
        "--mace-state-dir",
        str(work / "state"),
        "--mace-profile",
        str(work / "seed.json"),
    ]
    print(f"starting the server (log: {work / 'server.log'})", file=sys.stderr)
    started = time.monotonic()
    server = Server(flags, work / "server.log")
    try:
        status = server.get("/mace/status").json()
        vocab = _vocab_size(status["model_path"])
        sweep = Sweep(server, vocab, plan)
        for step in tqdm(sweep.steps(), desc="profiling", unit="step", file=sys.stderr):
            sweep.run(step)
        status = server.get("/mace/status").json()
    except BaseException:
        print(f"profiling failed; server log and state kept in {work}", file=sys.stderr)
        raise
    finally:
        server.stop()
    shutil.rmtree(work, ignore_errors=True)
    fitted = status["training"]["cost_model"]
    cost = CostModel.from_dict({**fitted, "forgetting": FORGETTING})
    result = Profile(cost=cost, slo=derive_slo(cost))
    result.meta = {
        "source": str(Path(args.out).resolve()),
        "model_path": status["model_path"],
        "device": status["device"],
        "machine": f"{platform.machine()}, {_cpu_count()} cores, {platform.system()}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_s": round(time.monotonic() - started, 1),
        "samples": fitted["samples"],
        "abs_pct_error": fitted["abs_pct_error"],
        "slo_derived": "tbt = 2 x decode(batch 8, 256 ctx each); ttft = 2 x prefill(1024) + tbt",
    }
    result.save(Path(args.out))
    print(
        json.dumps(
            {"out": args.out, "slo": result.slo.to_dict(), "samples": fitted["samples"]}, indent=2
        )
    )
    return 0


def _vocab_size(model_path: str) -> int:
    config = json.loads((Path(model_path) / "config.json").read_text())
    return int(config.get("text_config", config)["vocab_size"])


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

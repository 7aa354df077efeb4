"""KV pruning against full KV on the default model: memory held, agreement, speed.

    python -m benchmarks.kv_prune [--quick] [--json] [--model-path DIR]
        [--budgets 0.25,0.5,0.75] [--decays D,..] [--mins M,..] [--prompts N] [--tokens T]

One server with full KV (plain `mace-sgl serve`: torch_native on CPU), then one server
per budget, score decay and minimum (`--mace-kv-prune --mace-kv-budget B
--mace-kv-prune-decay D --mace-kv-prune-min M`; decays and minimums default to serve's). Each generates T greedy tokens
(ignore_eos, so every generation is T long) for the same N chat prompts, all at once.
Per budget:

- kv_tokens_ratio: private KV tokens held at the end of generation / the unpruned count,
  summed over requests: 1 - (tokens pruned during the run, from /mace/status) /
  (N * (T - 1)). The prompt is the radix-owned prefix (never pruned) and not counted;
  kv_tokens_ratio_total counts it on both sides.
- greedy_agreement: share of generated positions where the pruned server's greedy token
  equals the full-KV greedy token for the same context (the pruned output, teacher-forced
  through the full server's prefill with top-1 log-probs).
- prefix_agreement: share of each generation, before the first token where the pruned
  output differs from the full-KV output, averaged over prompts.
- ref_logprob_delta: mean |log p_pruned(y_t) - log p_full(y_t)| over the pruned output y,
  both for the same context: log p_pruned from the pruned server's decode, log p_full
  from the full server's teacher-forced prefill.
- tokens_per_s_ratio: generated tokens per second of the batch, pruned / full.

The row with budget 1.0 is the full server measured the same way (its own decode against
its own teacher-forced prefill): the floor of these measures (prefill and decode kernels
round differently), not a pruning result.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

from benchmarks.serve_smoke import machine
from mace_sgl.config import MaceConfig
from mace_sgl.launcher import Server

PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a bicycle works, part by part.",
    "Describe a journey across a desert, day by day.",
    "Write a detailed guide to baking bread at home.",
    "Tell the history of a small mountain village over a hundred years.",
    "Explain how the seasons change and why, with examples from around the world.",
    "Write a letter from a sailor to his family describing life at sea.",
    "Describe the daily life of a honey bee colony through a whole summer.",
]


def post(server: Server, path: str, body: dict[str, Any]) -> Any:
    r = requests.post(server.url + path, json=body, timeout=3600)
    r.raise_for_status()
    return r.json()


def chat_ids(tokenizer: Any, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def generate_all(server: Server, prompts: list[list[int]], tokens: int) -> dict[str, Any]:
    """All prompts at once, greedy; tokens, their decode log-probs, batch tokens/s."""

    def one(ids: list[int]) -> dict[str, Any]:
        body = {
            "input_ids": ids,
            "sampling_params": {"temperature": 0, "max_new_tokens": tokens, "ignore_eos": True},
            "return_logprob": True,
        }
        out = post(server, "/generate", body)
        return {
            "ids": out["output_ids"],
            "logprobs": [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]],
        }

    start = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        outs = list(pool.map(one, prompts))
    wall = time.perf_counter() - start
    return {"outs": outs, "tokens_per_s": sum(len(o["ids"]) for o in outs) / wall}


def teacher_forced(server: Server, prompt: list[int], output: list[int]) -> dict[str, list]:
    """Full-KV log-prob and top-1 token at each position of `output` after `prompt`."""
    body = {
        "input_ids": prompt + output,
        "sampling_params": {"temperature": 0, "max_new_tokens": 1},
        "return_logprob": True,
        # SGLang gives no log-prob for the first scored position; start one earlier.
        "logprob_start_len": len(prompt) - 1,
        "top_logprobs_num": 1,
    }
    meta = post(server, "/generate", body)["meta_info"]
    lps = meta["input_token_logprobs"][1:]
    tops = meta["input_top_logprobs"][1:]
    # Entry i scores input token len(prompt) + i given everything before it.
    assert [t for _, t, _ in lps] == output, "log-probs not aligned with the output"
    return {"logprobs": [lp for lp, _, _ in lps], "top1": [top[0][1] for top in tops]}


def pruned_tokens(server: Server) -> int:
    (sched,) = server.get("/mace/status").json()["schedulers"]
    return int(sched.get("kv", {}).get("pruned_tokens_total", 0))


def compare(
    full_server: Server, prompts: list[list[int]], run: dict[str, Any], full: dict[str, Any]
) -> dict[str, float]:
    agree = total = 0
    delta = 0.0
    prefix = []
    for ids, out, ref in zip(prompts, run["outs"], full["outs"], strict=True):
        tf = teacher_forced(full_server, ids, out["ids"])
        agree += sum(a == b for a, b in zip(tf["top1"], out["ids"], strict=True))
        delta += sum(abs(a - b) for a, b in zip(out["logprobs"], tf["logprobs"], strict=True))
        total += len(out["ids"])
        same = next(
            (i for i, (a, b) in enumerate(zip(out["ids"], ref["ids"], strict=True)) if a != b),
            len(out["ids"]),
        )
        prefix.append(same / len(out["ids"]))
    return {
        "greedy_agreement": round(agree / total, 4),
        "prefix_agreement": round(sum(prefix) / len(prefix), 4),
        "ref_logprob_delta": round(delta / total, 4),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from mace_sgl.models import ensure_default_model

    model_path = args.model_path or str(ensure_default_model())
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts = [chat_ids(tokenizer, p) for p in (PROMPTS * 4)[: args.prompts]]
    logs = Path(tempfile.mkdtemp(prefix="mace-kv-prune-"))
    base = ["--model-path", model_path, "--log-level", "warning"]
    full_server = Server(base, logs / "full.log")
    rows = []
    try:
        generate_all(full_server, prompts[:1], 8)  # warm-up
        full = generate_all(full_server, prompts, args.tokens)
        rows.append(
            {
                "budget": 1.0,
                "kv_tokens_ratio": 1.0,
                "kv_tokens_ratio_total": 1.0,
                **compare(full_server, prompts, full, full),
                "tokens_per_s": round(full["tokens_per_s"], 1),
                "tokens_per_s_ratio": 1.0,
            }
        )
        grid = [(b, d, m) for b in args.budgets for d in args.decays for m in args.mins]
        for budget, decay, min_tokens in grid:
            flags = ["--mace-kv-prune", "--mace-kv-budget", str(budget),
                     "--mace-kv-prune-decay", str(decay), "--mace-kv-prune-min", str(min_tokens)]  # fmt: skip
            server = Server([*base, *flags], logs / f"prune-{budget}-{decay}-{min_tokens}.log")
            try:
                generate_all(server, prompts[:1], 8)
                before = pruned_tokens(server)
                pruned = generate_all(server, prompts, args.tokens)
                freed = pruned_tokens(server) - before
            finally:
                server.stop()
            private = sum(len(o["ids"]) - 1 for o in pruned["outs"])
            prompt_total = sum(len(p) for p in prompts)
            rows.append(
                {
                    "budget": budget,
                    "decay": decay,
                    "min_tokens": min_tokens,
                    "kv_tokens_ratio": round(1 - freed / private, 4),
                    "kv_tokens_ratio_total": round(1 - freed / (private + prompt_total), 4),
                    **compare(full_server, prompts, pruned, full),
                    "tokens_per_s": round(pruned["tokens_per_s"], 1),
                    "tokens_per_s_ratio": round(pruned["tokens_per_s"] / full["tokens_per_s"], 3),
                }
            )
    finally:
        full_server.stop()
    return {
        "machine": machine(),
        "model": Path(model_path).name,
        "prompts": len(prompts),
        "tokens": args.tokens,
        "prompt_tokens_mean": round(sum(len(p) for p in prompts) / len(prompts), 1),
        "rows": rows,
    }


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kv_prune")
    parser.add_argument("--model-path", default=None, help="default: the embedded model")
    parser.add_argument("--quick", action="store_true", help="6 prompts x 384 tokens")
    parser.add_argument("--prompts", type=int, default=None, help="default 8 (6 quick)")
    parser.add_argument("--tokens", type=int, default=None, help="default 768 (384 quick)")
    parser.add_argument("--budgets", default="0.25,0.5,0.75")
    defaults = MaceConfig()
    parser.add_argument(
        "--decays",
        default=str(defaults.kv_prune_decay),
        help="score decays to try at each budget (1.0: plain H2O)",
    )
    parser.add_argument(
        "--mins",
        default=str(defaults.kv_prune_min),
        help="--mace-kv-prune-min values to try at each budget",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    args.prompts = args.prompts or (6 if args.quick else 8)
    args.tokens = args.tokens or (384 if args.quick else 768)
    args.budgets = [float(b) for b in args.budgets.split(",")]
    args.decays = [float(d) for d in args.decays.split(",")]
    args.mins = [int(m) for m in args.mins.split(",")]
    result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        for row in result["rows"]:
            print(row)


if __name__ == "__main__":
    main()

"""Per-tenant live adapters: does every tenant learn its own preference, with no leak
between tenants, at what memory and latency cost? One server, one run.

    python -m benchmarks.tenants [--adapters 8] [--quick] [--out DIR] [--json]

Tenants t0..t{N-1} are created at run time (POST /mace/adapters) beside a `control`
tenant that never gets feedback. Tenant i's preference is its own opener phrase
(OPENERS[i]): chosen = opener + the base model's greedy answer, rejected = the answer.
Margins are held-out log-prob margins log p(opener + answer) - log p(answer), served
under an adapter through SGLang (`/generate` with `lora_path`), one request at a time
with training paused: on CPU the same request scored inside batches of different make-up
moves by up to 0.35 nats of margin (bf16), while alone it repeats bit for bit. Training
runs until every tenant has published --steps versions (or --train-timeout-s passes,
which `training_timed_out` says), at --lr 1e-4 (the server's default is 5e-5: a version
costs about 20 s here, most of it the publish guard, so fewer, larger steps fit --quick)
and --mace-max-train-count 1 (each pair trains once: --pairs must be at least --steps,
and the default adapter's two warm-up pairs take no share of the tenants' steps).

`DIR/results.json`:

- tenants[i].own_gain_nats: tenant i's margin on its own preference, served under its
  own adapter, after training minus before;
- cross_talk_nats: the largest absolute change, over the run, of the control tenant's
  served margin on any tenant's preference (its weights never change: anything above
  noise is a leak of weights or of cached KV);
- served_vs_checkpoint_nats: with training paused, the largest absolute difference
  between a tenant's served margin and the margin plain peft computes from that
  tenant's newest checkpoint (same held-out prompts; model and adapter in the server's
  dtype, as SGLang holds them). Next to it, served_vs_hf_base_floor_nats: the same
  difference for the base model (the control tenant served, HF without adapter), the
  rounding of SGLang's kernels against HF's with no adapter involved; and
  served_vs_checkpoint_adapter_effect_nats: the largest difference of what the adapter
  adds to the margin (tenant minus control served, against peft minus HF base), meant
  to cancel the rounding each side shares with its own base model. It does not: in the
  2026-12-03 runs it came out larger than the direct difference (0.34 and 0.27 against
  0.27 and 0.14 nats), so SGLang's rounding against HF's is not the same with and
  without an adapter, and the direct difference stays the figure to read;
- rss_mb_per_tenant: growth of the scheduler process's RSS per added tenant, from
  before the tenants were created (after a warm-up step of the default adapter) to
  after each of them trained (so its optimizer state exists), each reading taken after
  the idle scheduler's malloc_trim (the server runs with --mace-malloc-trim-s 2); next
  to it the LoRA and AdamW bytes of one tenant and their ratio;
- tbt_p99_ms / ttft_p99_ms {"1", "N"}: the same open-loop Poisson load (streaming chat)
  sent to one tenant, or spread round-robin over N, with training paused so that both
  see the same (no) training work: the cost of serving N adapters at once. Phases
  alternate (1, N, 1, N, ...) over --repeats; each repeat's figures are kept too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.align import TOPICS, base_answers, completion_logprob
from benchmarks.loadgen import poisson_load, summarize
from mace_sgl.launcher import Server

OPENERS = [
    "Certainly! ",
    "Indeed, ",
    "Good question! ",
    "Well, ",
    "In short, ",
    "Honestly, ",
    "To be clear, ",
    "Sure thing! ",
    "Absolutely. ",
    "Here goes: ",
    "Fun fact: ",
    "Right, ",
]
CONTROL = "control"
TRIM_S = 2.0  # malloc_trim period of the idle scheduler in this benchmark (default 60 s)


def status(server: Server) -> dict[str, Any]:
    return server.get("/mace/status").json()


def adapters(server: Server) -> dict[str, dict[str, Any]]:
    return {a["name"]: a for a in server.get("/mace/adapters").json()["adapters"]}


def settled_rss_mb(server: Server, timeout_s: float = 60.0) -> float:
    """The scheduler's RSS once its idle loop has run malloc_trim twice more (the server
    runs with --mace-malloc-trim-s TRIM_S): heap pages that training freed but glibc kept
    are not a tenant's memory, and would make two readings incomparable."""

    def trims() -> int:
        return status(server)["schedulers"][0]["memory"]["malloc_trim"]["trims"]

    start = trims()
    deadline = time.monotonic() + timeout_s
    while trims() < start + 2:
        if time.monotonic() > deadline:
            raise TimeoutError("the idle scheduler did not trim its heap")
        time.sleep(0.5)
    return status(server)["schedulers"][0]["memory"]["rss_mb"]


def set_paused(server: Server, paused: bool, timeout_s: float = 60.0) -> None:
    server.post("/mace/train/pause" if paused else "/mace/train/resume", {})
    deadline = time.monotonic() + timeout_s
    while status(server)["training"]["paused"] != paused:
        if time.monotonic() > deadline:
            raise TimeoutError("the pause state did not reach the trainer")
        time.sleep(0.2)


def wait_for(server: Server, cond: Any, what: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        got = adapters(server)
        if cond(got):
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f} s; last {got}")
        time.sleep(1.0)


def margins(
    server: Server, tokenizer: Any, jobs: list[tuple[str, str]], held: list[tuple[str, str]]
) -> dict[tuple[str, str], float]:
    """{(adapter, opener): mean held-out margin of that opener, served under adapter}."""

    def one(job: tuple[str, str, str, str]) -> float:
        lora, opener, prompt, answer = job
        return completion_logprob(
            server, tokenizer, prompt, opener + answer, lora
        ) - completion_logprob(server, tokenizer, prompt, answer, lora)

    # One request at a time: on CPU the same request scored in batches of different
    # make-up differs by up to 0.35 nats of margin (bf16; measured 2026-12-02), which
    # would drown the cross-talk this measures. Alone, it is bit-for-bit repeatable.
    flat = [(lora, op, p, a) for lora, op in jobs for p, a in held]
    values = [one(job) for job in flat]
    out: dict[tuple[str, str], list[float]] = {}
    for (lora, op, _, _), v in zip(flat, values, strict=True):
        out.setdefault((lora, op), []).append(v)
    return {k: statistics.mean(v) for k, v in out.items()}


def hf_margin(model: Any, tokenizer: Any, opener: str, held: list) -> float:
    """The held-out margin that `model` (HF, with or without a peft adapter) computes."""
    import torch

    from mace_sgl.templating import encode_pair

    values = []
    for prompt, answer in held:
        lps = []
        for completion in (opener + answer, answer):
            p, c = encode_pair(tokenizer, [{"role": "user", "content": prompt}], completion)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([p + c])).logits[0].float()
            lp = logits.log_softmax(-1)[len(p) - 1 : -1].gather(1, torch.tensor(c)[:, None])
            lps.append(lp.sum().item())
        values.append(lps[0] - lps[1])
    return statistics.mean(values)


def peft_margin(model: Any, tokenizer: Any, path: str, opener: str, held: list) -> float:
    """The held-out margin plain peft computes from checkpoint `path` on `model`, with
    the adapter's weights in the model's dtype, as SGLang serves them (peft would
    otherwise keep them in fp32, a different rounding than the one being checked)."""
    from peft import PeftModel

    peft = PeftModel.from_pretrained(model, path, autocast_adapter_dtype=False).eval()
    try:
        peft.to(model.dtype)
        return hf_margin(peft, tokenizer, opener, held)
    finally:
        peft.unload()  # the base model back, without this adapter's layers


def latency(
    server: Server, names: list[str], rate: float, load_s: float, max_tokens: int, seed: int
) -> dict[str, Any]:
    """Open-loop streaming chat load over the adapters `names`, round-robin."""
    load_prompts = [f"Write a line about {t}." for t in TOPICS]

    def body(i: int) -> dict[str, Any]:
        return {
            "model": "default",
            "messages": [
                {"role": "user", "content": f"{load_prompts[i % len(load_prompts)]} ({i})"}
            ],
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "lora_path": names[i % len(names)],
        }

    start = time.monotonic()
    results = poisson_load(server.url, rate, load_s, body, seed=seed)
    return summarize(results, 1e9, 1e9, time.monotonic() - start)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mace_sgl.models import ensure_default_model

    n = args.adapters
    if not 1 <= n <= len(OPENERS):
        raise SystemExit(f"--adapters must be 1..{len(OPENERS)}")
    model_dir = ensure_default_model()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    work = Path(args.out or tempfile.mkdtemp(prefix="mace-tenants-"))
    work.mkdir(parents=True, exist_ok=True)
    state = Path(tempfile.mkdtemp(prefix="mace-tenants-state-"))
    names = [f"t{i}" for i in range(n)]
    openers = dict(zip(names, OPENERS, strict=False))
    server = Server(
        [
            "--log-level",
            "warning",
            "--mace-train",
            "--mace-state-dir",
            str(state),
            "--mace-adapters",
            CONTROL,
            "--mace-lr",
            str(args.lr),
            "--mace-malloc-trim-s",
            str(TRIM_S),
            "--mace-max-train-count",
            "1",
        ],
        work / "server.log",
        timeout_s=600,
    )
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    try:
        set_paused(server, True)
        held, train = base_answers(server, args.held_out, args.pairs)

        # Warm-up: the default adapter trains two steps, so that the trainer's one-time
        # memory (activations, allocator arenas) is in the baseline RSS.
        warm = [
            {"prompt": [{"role": "user", "content": p}], "chosen": "Sure. " + a, "rejected": a}
            for p, a in train[:2]
        ]
        server.post("/mace/feedback", warm).raise_for_status()
        set_paused(server, False)
        wait_for(server, lambda g: g["live"]["train_steps"] >= 2, "warm-up", args.train_timeout_s)
        set_paused(server, True)
        rss_before = settled_rss_mb(server)
        timings["setup_s"] = time.monotonic() - t0

        for name in names:
            r = server.post("/mace/adapters", {"name": name})
            if r.status_code != 201:
                raise RuntimeError(f"creating {name}: {r.status_code} {r.text}")
        wait_for(
            server,
            lambda g: all(g.get(x, {}).get("training") for x in names),
            "tenants loaded",
            120,
        )
        jobs = [(x, openers[x]) for x in names] + [(CONTROL, openers[x]) for x in names]
        before = margins(server, tokenizer, jobs, held)

        pairs = [
            {
                "prompt": [{"role": "user", "content": p}],
                "chosen": openers[x] + a,
                "rejected": a,
                "adapter": x,
            }
            for x in names
            for p, a in train
        ]
        server.post("/mace/feedback", pairs).raise_for_status()
        train_start = time.monotonic()
        set_paused(server, False)
        # Published versions, not steps: a step paused between its optimizer update and
        # its guard check would be measured unpublished.
        try:
            wait_for(
                server,
                lambda g: all(g[x]["version"] >= args.steps for x in names),
                f"{args.steps} versions per tenant",
                args.train_timeout_s,
            )
            timed_out = False
        except TimeoutError:
            timed_out = True  # measured as it stands, and said so in the results
        set_paused(server, True)
        timings["train_s"] = time.monotonic() - train_start
        got = wait_for(
            server,
            lambda g: all(g[x]["versions"][-1]["version"] == g[x]["version"] for x in g),
            "checkpoints written",
            120,
        )
        rss_after = settled_rss_mb(server)
        memory = status(server)["training"]["memory"]
        after = margins(server, tokenizer, jobs, held)

        # Served against plain peft on each newest checkpoint, in the server's dtype.
        info = server.get("/server_info").json()
        dtype = info.get("dtype", "auto")
        torch_dtype = torch.bfloat16 if dtype in ("auto", "bfloat16", "bf16") else torch.float32
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype).eval()
        check = held[: args.check_prompts]
        served_check = margins(
            server,
            tokenizer,
            [(x, openers[x]) for x in names] + [(CONTROL, openers[x]) for x in names],
            check,
        )
        # The floor: the control tenant (an all-zero B, so the base model) served by
        # SGLang against HF's base model, same prompts: kernel rounding, no adapter.
        hf = {x: hf_margin(base, tokenizer, openers[x], check) for x in names}
        floor = max(abs(served_check[(CONTROL, openers[x])] - hf[x]) for x in names)
        vs_checkpoint, vs_effect = {}, {}
        for x in names:
            path = got[x]["versions"][-1]["path"]
            ours = peft_margin(base, tokenizer, path, openers[x], check)
            vs_checkpoint[x] = abs(served_check[(x, openers[x])] - ours)
            # What the adapter adds, served against peft (see the docstring: the
            # rounding does not cancel as hoped).
            vs_effect[x] = abs(
                (served_check[(x, openers[x])] - served_check[(CONTROL, openers[x])])
                - (ours - hf[x])
            )
        del base

        lat: dict[str, list[dict[str, Any]]] = {"1": [], str(n): []}
        for rep in range(args.repeats):
            for key, over in (("1", names[:1]), (str(n), names)):
                lat[key].append(
                    latency(server, over, args.rate, args.load_s, args.max_tokens, seed=rep)
                )
        timings["total_s"] = time.monotonic() - t0
    finally:
        server.stop()

    tenants = []
    for x in names:
        tenants.append(
            {
                "name": x,
                "opener": openers[x],
                "own_gain_nats": after[(x, openers[x])] - before[(x, openers[x])],
                "margin_before": before[(x, openers[x])],
                "margin_after": after[(x, openers[x])],
                "version": got[x]["version"],
                "train_steps": got[x]["train_steps"],
                "guard_refusals": got[x]["guard_refusals"],
                "served_vs_checkpoint_nats": vs_checkpoint[x],
            }
        )
    control = {x: after[(CONTROL, openers[x])] - before[(CONTROL, openers[x])] for x in names}
    cross_talk = max(abs(v) for v in control.values())
    per_tenant = (rss_after - rss_before) / n
    lora_opt_mb = memory["lora_mb"] + memory["adam_state_mb"]

    def p99(key: str, metric: str) -> float:
        # The p99 of each repeat, then their median (a p99 pooled over phases run at
        # different times would hide a repeat's spike behind the other's calm).
        return statistics.median(r[metric] for r in lat[key])

    gains = [t["own_gain_nats"] for t in tenants]
    out = {
        "config": {
            "adapters": n,
            "pairs_per_tenant": args.pairs,
            "versions_per_tenant": args.steps,
            "held_out": args.held_out,
            "lr": args.lr,
            "rate": args.rate,
            "load_s": args.load_s,
            "max_tokens": args.max_tokens,
            "repeats": args.repeats,
            "quick": args.quick,
        },
        "training_timed_out": timed_out,
        "tenants": tenants,
        "cross_talk_nats": cross_talk,
        "control_margin_change": control,
        "served_vs_checkpoint_nats": max(vs_checkpoint.values()),
        "served_vs_hf_base_floor_nats": floor,
        "served_vs_checkpoint_adapter_effect_nats": max(vs_effect.values()),
        "rss_mb_per_tenant": per_tenant,
        "rss_mb": {"before": rss_before, "after": rss_after},
        "lora_plus_optimizer_mb": lora_opt_mb,
        "memory_ratio": per_tenant / lora_opt_mb,
        "tbt_p99_ms": {k: p99(k, "tbt_p99_ms") for k in lat},
        "ttft_p99_ms": {k: p99(k, "ttft_p99_ms") for k in lat},
        "latency_repeats": lat,
        "timings_s": timings,
        "goals": {
            "every_tenant_gains_1_nat": min(gains) > 1.0,
            "cross_talk_under_10pct_of_smallest_gain": cross_talk < 0.1 * min(gains),
            "served_vs_checkpoint_under_0_25": max(vs_checkpoint.values()) < 0.25,
            "memory_within_1_5x": per_tenant <= 1.5 * lora_opt_mb,
            "tbt_p99_n_within_10pct_of_1": p99(str(n), "tbt_p99_ms")
            <= 1.1 * p99("1", "tbt_p99_ms"),
            "quick_under_30_min": timings["total_s"] < 1800,
        },
    }
    (work / "results.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tenants")
    parser.add_argument("--adapters", type=int, default=8, help="tenants that get feedback")
    parser.add_argument("--quick", action="store_true", help="fewer pairs and shorter load")
    parser.add_argument("--pairs", type=int, default=None, help="pairs per tenant")
    parser.add_argument(
        "--steps", type=int, default=None, help="published versions per tenant to wait for"
    )
    parser.add_argument("--held-out", type=int, default=None)
    parser.add_argument("--check-prompts", type=int, default=3, help="for the peft check")
    parser.add_argument(
        "--lr", type=float, default=1e-4, help="--mace-lr of the server (its default: 5e-5)"
    )
    parser.add_argument("--rate", type=float, default=0.5, help="requests/s of the load")
    parser.add_argument("--load-s", type=float, default=None, help="seconds per load phase")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=None, help="1/N load phase pairs")
    parser.add_argument("--train-timeout-s", type=float, default=1200.0)
    parser.add_argument("--out", default=None, help="folder for results.json and the log")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    quick = args.quick
    args.pairs = args.pairs or (8 if quick else 16)
    args.steps = args.steps or (5 if quick else 10)
    args.held_out = args.held_out or (6 if quick else 12)
    args.load_s = args.load_s or (60.0 if quick else 120.0)
    args.repeats = args.repeats or (2 if quick else 3)
    if args.pairs < args.steps:
        parser.error("--pairs must be at least --steps: each pair trains once")
    out = run(args)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    for t in out["tenants"]:
        print(
            f"{t['name']} {t['opener']!r:18} gain {t['own_gain_nats']:+.2f} nats, "
            f"v{t['version']}, {t['train_steps']} steps"
        )
    print(f"cross-talk {out['cross_talk_nats']:.4f} nats")
    print(
        f"served vs checkpoint {out['served_vs_checkpoint_nats']:.4f} nats "
        f"(floor, base served vs HF: {out['served_vs_hf_base_floor_nats']:.4f})"
    )
    print(
        f"RSS per tenant {out['rss_mb_per_tenant']:.1f} MB "
        f"({out['memory_ratio']:.2f}x LoRA + AdamW {out['lora_plus_optimizer_mb']:.1f} MB)"
    )
    print(f"  adapter effect served vs peft {out['served_vs_checkpoint_adapter_effect_nats']:.4f}")
    print(f"TBT p99 ms {out['tbt_p99_ms']}, TTFT p99 ms {out['ttft_p99_ms']}")
    print("goals:", out["goals"])


if __name__ == "__main__":
    main()

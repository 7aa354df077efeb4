"""KV pruning end to end on the tiny random Llama: a real `mace-sgl serve --mace-kv-prune`
with SGLang's strict memory checks on every iteration, against HF transformers running
the same policy with masks (no compaction), and under concurrent shared-prefix load."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from tiny_model import tiny_serve_args

from mace_sgl.launcher import Server
from mace_sgl.prune.policy import PrunePolicy, select_keep

# MIN above BUDGET: the effective budget is MIN, so the minimum is exercised end to end.
WINDOW, SINKS, INTERVAL, BUDGET, DECAY, MIN = 4, 4, 4, 12, 0.9, 16
POLICY = PrunePolicy.parse(
    str(BUDGET), window=WINDOW, sinks=SINKS, interval=INTERVAL, decay=DECAY, min_tokens=MIN
)
# The same policy as serve flags (the CPU and GPU servers compared with hf_pruned_greedy).
PRUNE_FLAGS = [
    "--mace-kv-prune",
    "--mace-kv-budget",
    str(BUDGET),
    "--mace-kv-prune-window",
    str(WINDOW),
    "--mace-kv-prune-sinks",
    str(SINKS),
    "--mace-kv-prune-interval",
    str(INTERVAL),
    "--mace-kv-prune-decay",
    str(DECAY),
    "--mace-kv-prune-min",
    str(MIN),
]
# SGLang's own accounting checks, made strict: a leak, a double free or a slot in use
# that is also free raises in the scheduler, and the request fails.
STRICT = {
    "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1",
    "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1",
    "SGLANG_CHECK_KV_PAGE_INVARIANTS": "1",
}


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    logs = tmp_path_factory.mktemp("prune-logs")
    srv = Server(
        tiny_serve_args(
            tiny_model_dir,
            "--mace-state-dir",
            str(tmp_path_factory.mktemp("prune-state")),
            *PRUNE_FLAGS,
        ),
        logs / "prune-server.log",
        env=STRICT,
    )
    yield srv
    srv.stop()


def generate(server: Server, input_ids: list[int], n: int) -> dict:
    body = {
        "input_ids": input_ids,
        "sampling_params": {"temperature": 0, "max_new_tokens": n, "ignore_eos": True},
    }
    # A long timeout: on a shared 2-core machine a niced server can be starved.
    r = requests.post(server.url + "/generate", json=body, timeout=900)
    assert r.status_code == 200, r.text
    return r.json()


def kv_status(server: Server) -> dict:
    (sched,) = server.get("/mace/status").json()["schedulers"]
    return sched["kv"]


def hf_pruned_greedy(model_dir: Path, prompt: list[int], n: int) -> tuple[list[int], int]:
    """Greedy decoding with the same policy, by masking instead of compacting: every
    position keeps its KV in HF's cache and its own position id; pruned ones are masked
    out of attention. Scores: decode attention summed over heads and layers, times DECAY
    before each step. The prompt is the radix-owned prefix (never pruned). Returns the tokens and the tokens pruned."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    p = len(prompt)
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        cache, y = out.past_key_values, int(out.logits[0, -1].argmax())
        kept = [True] * p
        scores = torch.zeros(p + n)
        tokens, pruned = [y], 0
        for _ in range(n - 1):
            # As the server: scores decay, then the token about to be decoded holds a
            # slot when it prunes.
            scores *= DECAY
            length = len(kept)
            kept.append(True)
            priv = [j for j in range(p, length + 1) if kept[j]]
            keep = POLICY.keep_count(p, len(priv), length + 1 - p)
            if keep is not None:
                sel = select_keep(scores[priv], p, keep, SINKS, WINDOW).tolist()
                for j in set(range(len(priv))) - set(sel):
                    kept[priv[j]] = False
                pruned += len(priv) - keep
            out = model(
                torch.tensor([[y]]),
                past_key_values=cache,
                attention_mask=torch.tensor([kept], dtype=torch.long),
                position_ids=torch.tensor([[length]]),
                output_attentions=True,
                use_cache=True,
            )
            cache = out.past_key_values
            for layer in out.attentions:  # [1, heads, 1, length + 1]
                scores[: length + 1] += layer[0, :, 0, :].sum(0)
            y = int(out.logits[0, -1].argmax())
            tokens.append(y)
    return tokens, pruned


def test_pruned_greedy_equals_hf_with_the_same_policy_masked(server: Server, tiny_model_dir):
    before = kv_status(server)["pruned_tokens_total"]
    n, expected_pruned = 40, 0
    for prompt in ([5, 17, 33, 60, 7, 99, 140], [200 + i for i in range(25)]):
        served = generate(server, prompt, n)["output_ids"]
        reference, pruned = hf_pruned_greedy(tiny_model_dir, prompt, n)
        assert pruned > 0
        expected_pruned += pruned
        assert served == reference
    # The server pruned exactly as many tokens as the reference dropped.
    assert kv_status(server)["pruned_tokens_total"] - before == expected_pruned


def test_status_reports_held_against_unpruned_while_running(server: Server):
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(generate, server, [9, 8, 7, 6, 5], 160)
        seen = []
        while not job.done():
            kv = kv_status(server)
            if kv["running_requests"]:
                seen.append(kv)
            time.sleep(0.05)
        job.result()
    assert seen, "no status sample while the request ran"
    last = seen[-1]
    assert last["unpruned_tokens"] > 2 * MIN
    # Absolute budget: at most BUDGET (here MIN) private tokens plus headroom.
    assert last["held_tokens"] <= max(BUDGET, MIN, WINDOW) + INTERVAL
    idle = kv_status(server)
    assert idle["running_requests"] == idle["held_tokens"] == idle["unpruned_tokens"] == 0


def test_concurrent_shared_prefix_load_keeps_accounting_and_the_prefix_intact(
    server: Server, tiny_model_dir
):
    from test_server_tiny import hf_greedy

    prefix = [(7 * i + 3) % 400 + 10 for i in range(120)]
    before = kv_status(server)["pruned_tokens_total"]
    jobs = [(prefix + [11 + i % 5], 20 + 8 * i) for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda job: generate(server, *job), jobs))
    for (_, n), result in zip(jobs, results, strict=True):
        assert len(result["output_ids"]) == n
    assert kv_status(server)["pruned_tokens_total"] > before

    # The radix-shared prefix was never pruned: a new request still hits it, and with
    # fewer new tokens than the budget (nothing pruned) it decodes exactly like HF.
    probe = prefix + [301, 3]
    result = generate(server, probe, BUDGET - 2)
    assert result["meta_info"]["cached_tokens"] >= len(prefix)
    assert result["output_ids"] == hf_greedy(tiny_model_dir, probe, BUDGET - 2)

    # Every slot is back: free + radix tree = the whole pool; nothing held by requests.
    kv = kv_status(server)
    assert kv["tree_protected"] == 0
    assert kv["pool_available"] + kv["tree_evictable"] == kv["pool_size"]
    assert server.post("/flush_cache", {}).status_code == 200
    assert kv_status(server)["pool_available"] == kv["pool_size"]


@pytest.mark.slow
def test_retraction_of_pruned_requests_keeps_accounting(tiny_model_dir: Path, tmp_path: Path):
    """SGLang's test switch retracts running requests every few steps: pruned rows are
    released, re-prefilled whole (offsets reset) and pruned again, under strict checks."""
    env = {**STRICT, "SGLANG_TEST_RETRACT": "1", "SGLANG_TEST_RETRACT_INTERVAL": "5"}
    srv = Server(
        tiny_serve_args(
            tiny_model_dir,
            "--mace-state-dir",
            str(tmp_path / "state"),
            "--mace-kv-prune",
            "--mace-kv-budget",
            "0.5",
            "--mace-kv-prune-window",
            "4",
            "--mace-kv-prune-interval",
            "4",
            "--mace-kv-prune-min",
            "8",
        ),
        tmp_path / "retract.log",
        env=env,
    )
    try:
        jobs = [([30 + i, 40 + i, 50, 60], 60 + 11 * i) for i in range(12)]
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda job: generate(srv, *job), jobs))
        for (_, n), result in zip(jobs, results, strict=True):
            assert len(result["output_ids"]) == n
        assert "Testing retraction. #retracted_reqs: " in srv.log_path.read_text()
        kv = kv_status(srv)
        assert kv["pruned_tokens_total"] > 0
        assert kv["pool_available"] + kv["tree_evictable"] == kv["pool_size"]
    finally:
        srv.stop()

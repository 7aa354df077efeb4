"""Per-tenant live adapters on the tiny model: each tenant learns its own feedback, is
served its own newest weights through SGLang's LoRA pool (more tenants than slots),
never shares cached KV with another, gets its fair share of steps under a flood, and
resumes after a restart."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch
from tiny_model import tiny_serve_args
from waits import set_paused, wait_for_value

from mace_sgl.launcher import Server
from mace_sgl.templating import encode_pair

GOOD, BAD = "Certainly! Here it is.", "no way at all"
HELD_OUT = "Question 99: say something"
# a prefers GOOD, b the opposite; c learns GOOD from fewer pairs; ctl gets no feedback.
TENANTS = ("a", "b", "c", "ctl")


def pairs(tenant: str, n: int, start: int = 0) -> list[dict]:
    chosen, rejected = (BAD, GOOD) if tenant == "b" else (GOOD, BAD)
    return [
        {"prompt": f"Question {i}: say something", "chosen": chosen, "rejected": rejected,
         "adapter": tenant}
        for i in range(start, start + n)
    ]  # fmt: skip


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tenant-state")


def start(model_dir: Path, state_dir: Path, log: Path) -> Server:
    return Server(
        tiny_serve_args(
            model_dir,
            "--mace-train",
            "--mace-state-dir",
            str(state_dir),
            "--mace-adapters",
            "a,b,c,ctl",
            "--max-loras-per-batch",
            "2",  # fewer slots than tenants: SGLang swaps them in and out
            "--mace-lr",
            "1e-3",
            "--mace-max-train-count",
            "2",
            "--mace-auto-adapters",  # first feedback for an unknown name creates it
        ),
        log,
    )


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, state_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    srv = start(tiny_model_dir, state_dir, tmp_path_factory.mktemp("logs") / "tenants.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def adapters(server: Server) -> dict[str, dict]:
    r = server.get("/mace/adapters")
    assert r.status_code == 200, r.text
    return {a["name"]: a for a in r.json()["adapters"]}


def wait_for(server: Server, cond, what: str, timeout_s: float = 180.0) -> dict:
    return wait_for_value(lambda: adapters(server), cond, timeout_s, what, server.tail)


def scored(server: Server, tok, lora: str | None, completion: str, **extra) -> tuple[float, int]:
    """Log-prob of `completion` after HELD_OUT as served, and the cached prefix tokens."""
    prompt, answer = encode_pair(tok, HELD_OUT, completion)
    logprob, meta = server.scored(prompt, answer, lora, **extra)
    return logprob, meta.get("cached_tokens", 0)


def margin(server: Server, tok, lora: str | None) -> float:
    return scored(server, tok, lora, GOOD)[0] - scored(server, tok, lora, BAD)[0]


def peft_margin(model_dir: Path, checkpoint: str, tok) -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, checkpoint).eval()
    out = []
    for completion in (GOOD, BAD):
        prompt, answer = encode_pair(tok, HELD_OUT, completion)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + answer])).logits[0]
        lp = logits.log_softmax(-1)[len(prompt) - 1 : -1].gather(1, torch.tensor(answer)[:, None])
        out.append(lp.sum().item())
    return out[0] - out[1]


def test_every_tenant_exists_and_serves_the_base_model_at_start(server: Server, tok):
    got = adapters(server)
    assert set(got) == {"live", *TENANTS}
    assert all(a["version"] == 0 and a["train_steps"] == 0 for a in got.values())
    base = margin(server, tok, None)
    for name in TENANTS:
        assert margin(server, tok, name) == pytest.approx(base, abs=1e-4), name


def test_opposite_preferences_each_learn_their_own(server: Server, tok, tiny_model_dir: Path):
    base = margin(server, tok, None)
    body = pairs("a", 4) + pairs("b", 4) + pairs("c", 2)
    assert server.post("/mace/feedback", body).status_code == 200
    wait_for(
        server,
        lambda g: all(g[n]["version"] >= 2 and g[n]["queue_depth"] == 0 for n in "abc"),
        "a, b and c trained",
    )
    set_paused(server, True)
    try:
        got = adapters(server)
        served = {n: margin(server, tok, n) for n in TENANTS}
        assert served["a"] > base + 0.1, (base, served)
        assert served["b"] < base - 0.1, (base, served)
        assert served["c"] > base + 0.05, (base, served)
        # The control tenant's weights never changed: it serves exactly the base model.
        assert got["ctl"]["version"] == 0 and got["ctl"]["train_steps"] == 0
        assert served["ctl"] == pytest.approx(base, abs=1e-4)
        # Each serves exactly its own newest checkpoint, as plain peft computes it.
        for n in "abc":
            newest = got[n]["versions"][-1]
            assert newest["version"] == got[n]["version"]
            path = Path(newest["path"])
            assert (path / "adapter_model.safetensors").is_file()
            expected = peft_margin(tiny_model_dir, str(path), tok)
            assert served[n] == pytest.approx(expected, abs=2e-3), n
    finally:
        set_paused(server, False)


def cached_tokens(server: Server, lora: str | None, **extra) -> tuple[int, list[int]]:
    """Cached prefix tokens of a 200-token prompt (no logprobs: SGLang matches no prefix
    past logprob_start_len), and the greedy tokens it produced."""
    body = {
        "input_ids": list(range(10, 210)),
        "sampling_params": {"max_new_tokens": 4, "temperature": 0},
        **extra,
    }
    if lora:
        body["lora_path"] = lora
    r = server.post("/generate", body)
    assert r.status_code == 200, r.text
    return r.json()["meta_info"]["cached_tokens"], r.json()["output_ids"]


def test_no_tenant_reuses_another_tenants_cached_kv(server: Server):
    from sglang.srt.lora.lora_registry import LoRARef

    set_paused(server, True)
    try:
        assert server.post("/flush_cache", {}).status_code == 200
        _, fresh_a = cached_tokens(server, "a")
        assert cached_tokens(server, "a")[0] >= 190  # a's own KV is reused: the cache works
        assert server.post("/flush_cache", {}).status_code == 200
        cached_tokens(server, "b")  # b's KV of the very same tokens is now cached
        cached, again_a = cached_tokens(server, "a")
        assert cached < 10, "a reused KV cached under b"
        assert again_a == fresh_a
        # Base requests forging a's cache key (SGLang #24638: extra_key and lora_id are
        # concatenated; the id of a --lora-paths adapter is uuid5(name, path), which
        # anyone who knows both can compute) find none of a's KV, though it is cached.
        assert cached_tokens(server, "a")[0] >= 190
        got = adapters(server)["a"]
        path = got["versions"][0]["path"]  # v0, as --lora-paths named it
        uid = LoRARef.deterministic_id("a", path)
        for forged in (uid, f"{uid}|mace-v{got['version']}"):
            cached, _ = cached_tokens(server, None, extra_key=forged)
            assert cached < 10, forged
    finally:
        set_paused(server, False)


def test_more_tenants_than_slots_all_serve_their_newest_versions_under_load(server: Server, tok):
    set_paused(server, True)
    try:
        expected = {n: scored(server, tok, n, GOOD)[0] for n in TENANTS}
        assert len({round(v, 3) for v in expected.values()}) >= 3  # they differ
        jobs = [n for _ in range(6) for n in TENANTS]  # 24 requests, 4 tenants, 2 slots
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda n: (n, scored(server, tok, n, GOOD)[0]), jobs))
        for name, lp in got:
            assert lp == pytest.approx(expected[name], abs=2e-3), name
    finally:
        set_paused(server, False)


def test_a_flooding_tenant_does_not_starve_another(server: Server):
    before = adapters(server)
    flood = pairs("a", 60, start=100)
    assert server.post("/mace/feedback", flood).status_code == 200
    assert server.post("/mace/feedback", pairs("c", 2, start=200)).status_code == 200
    got = wait_for(server, lambda g: g["c"]["queue_depth"] == 0, "c's two pairs trained")
    # c's pairs trained while most of the flood still waits: c got its turns.
    assert got["a"]["queue_depth"] >= 30, got["a"]
    assert got["c"]["train_steps"] >= before["c"]["train_steps"] + 2


def test_tenants_are_created_at_run_time_and_retired(server: Server, tok):
    r = server.post("/mace/adapters", {"name": "late"})
    assert r.status_code == 201, r.text
    body = [{**p, "adapter": "late"} for p in pairs("a", 3, start=400)]
    assert server.post("/mace/feedback", body).status_code == 200
    # --mace-auto-adapters: feedback naming a new adapter creates it.
    body = [{**p, "adapter": "auto"} for p in pairs("a", 3, start=500)]
    assert server.post("/mace/feedback", body).status_code == 200
    wait_for(
        server,
        lambda g: g["late"]["version"] >= 2 and g.get("auto", {}).get("version", 0) >= 2,
        "late and auto trained",
        300,
    )
    base = margin(server, tok, None)
    assert margin(server, tok, "late") > base + 0.05
    assert margin(server, tok, "auto") > base + 0.05
    r = server.post("/mace/feedback", {**pairs("a", 1)[0], "adapter": "../escape"})
    assert r.status_code == 400  # a bad name is refused even with auto creation
    # Retired: not served any more, checkpoints kept.
    r = requests.delete(server.url + "/mace/adapters/gone-never", timeout=30)
    assert r.status_code == 404
    assert server.post("/mace/adapters", {"name": "gone"}).status_code == 201
    r = requests.delete(server.url + "/mace/adapters/gone", timeout=30)
    assert r.status_code == 200 and r.json()["checkpoints_kept"], r.text
    assert "gone" not in adapters(server)


def test_a_purged_tenant_stays_purged_and_comes_back_fresh(server: Server, state_dir: Path):
    """DELETE ?purge=true while the tenant trains: its directory is gone at the answer
    and still gone once the trainer has let it go, and its feedback rows are deleted;
    created again, it starts from v0 and trains.
    (Whether a write was queued at that moment is up to timing here: the writer's
    races are driven in tests/test_checkpoints.py.)"""
    assert server.post("/mace/adapters", {"name": "purged"}).status_code == 201
    body = [{**p, "adapter": "purged"} for p in pairs("a", 3, start=600)]
    assert server.post("/mace/feedback", body).status_code == 200
    wait_for(server, lambda g: g["purged"]["version"] >= 1, "purged trained once", 300)
    r = requests.delete(server.url + "/mace/adapters/purged?purge=true", timeout=30)
    assert r.status_code == 200 and not r.json()["checkpoints_kept"], r.text
    assert r.json()["feedback_deleted"] == 3, r.text  # its rows go with it
    tenant_dir = state_dir / "adapters" / "purged"
    assert not tenant_dir.exists()
    with contextlib.closing(sqlite3.connect(state_dir / "feedback.sqlite3")) as conn:
        rows = conn.execute("SELECT COUNT(*) FROM feedback WHERE adapter = 'purged'")
        assert rows.fetchone()[0] == 0
    # A purge asked again (as after one that failed half-way) finishes; a plain retire
    # of the retired tenant is a 404.
    r = requests.delete(server.url + "/mace/adapters/purged?purge=true", timeout=30)
    assert r.status_code == 200 and r.json()["feedback_deleted"] == 0, r.text
    assert requests.delete(server.url + "/mace/adapters/purged", timeout=30).status_code == 404

    def trainer_tenants() -> list[str]:
        status = server.get("/mace/status").json()
        return [t["name"] for t in status["training"]["tenants"]]

    wait_for_value(trainer_tenants, lambda ns: "purged" not in ns, 60,
                   "the trainer let the purged tenant go", server.tail)  # fmt: skip
    time.sleep(2)  # not a wait for a state: room for a late write to show itself
    assert not tenant_dir.exists()
    # Paused, the new one shows the state it starts from.
    set_paused(server, True)
    try:
        r = server.post("/mace/adapters", {"name": "purged"})
        assert r.status_code == 201, r.text
        got = wait_for(server, lambda g: "purged" in g, "purged created again", 60)
        assert got["purged"]["version"] == 0
        assert sorted(p.name for p in tenant_dir.glob("*v*")) == ["v0"]
    finally:
        set_paused(server, False)
    # It trains again from v0: its steps wait for no version of the purged tenant (the
    # sidecar named the old one's v1 or later to them, and they waited for ever).
    body = [{**p, "adapter": "purged"} for p in pairs("b", 2, start=650)]
    assert server.post("/mace/feedback", body).status_code == 200
    wait_for(server, lambda g: g["purged"]["version"] >= 1, "purged trained again", 300)


def test_restart_resumes_every_tenant(
    server: Server, tok, tiny_model_dir: Path, state_dir: Path, tmp_path: Path
):
    set_paused(server, True)
    # Every published version written to disk (checkpoints are written in the background).
    before = wait_for(
        server,
        lambda g: all(
            a["versions"] and a["versions"][-1]["version"] == a["version"] for a in g.values()
        ),
        "checkpoints written",
        60,
    )
    served = {n: margin(server, tok, n) for n in (*TENANTS, "late", "auto")}
    server.stop()
    again = start(tiny_model_dir, state_dir, tmp_path / "restarted.log")
    try:
        got = adapters(again)
        assert set(got) == set(before)  # "late" and "auto", made at run time, come back
        for name, a in got.items():
            # Every tenant resumes its newest checkpoint and serves it at once.
            assert a["version"] == before[name]["version"], name
        for name, value in served.items():
            assert margin(again, tok, name) == pytest.approx(value, abs=2e-3), name
        status = again.get("/mace/status").json()
        resumed = {t["name"]: t["resumed"] for t in status["training"]["tenants"]}
        assert all(resumed[n]["optimizer"] for n in ("a", "b", "c", "late", "auto"))
    finally:
        again.stop()

"""End-to-end on the tiny random Llama: a real `mace-sgl serve` on loopback, checked
against HF transformers, SGLang's radix cache, /mace/status and the API and admin keys."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import psutil
import pytest
import requests

from mace_sgl.launcher import Server

API_KEY = "test-key-123"
ADMIN_KEY = "admin-key-456"
BACKLOG = 40  # --mace-feedback-backlog: never-trained pairs per adapter


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("state")


def start(model_dir: Path, state_dir: Path, log: Path) -> Server:
    return Server(
        [
            "--model-path",
            str(model_dir),
            "--dtype",
            "float32",
            "--log-level",
            "warning",
            "--mace-state-dir",
            str(state_dir),
            "--mace-feedback-max-bytes",
            "8192",
            "--mace-feedback-backlog",
            str(BACKLOG),
            "--admin-api-key",
            ADMIN_KEY,
        ],
        log,
        api_key=API_KEY,
    )


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, state_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    srv = start(tiny_model_dir, state_dir, tmp_path_factory.mktemp("logs") / "tiny-server.log")
    yield srv
    srv.stop()


def hf_greedy(model_dir: Path, prompt_ids: list[int], n: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt_ids) :].tolist()


def generate(server: Server, input_ids: list[int], n: int) -> dict:
    r = server.post(
        "/generate",
        {
            "input_ids": input_ids,
            "sampling_params": {"temperature": 0, "max_new_tokens": n, "ignore_eos": True},
        },
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_greedy_matches_hf_token_for_token(server: Server, tiny_model_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    for prompt in ["The capital of France is", "A scheduler batches prefill and decode"]:
        ids = tok(prompt)["input_ids"]
        served = generate(server, ids, 24)["output_ids"]
        assert served == hf_greedy(tiny_model_dir, ids, 24), prompt


def test_shared_prefix_reports_cached_tokens(server: Server):
    prefix = [(7 * i + 3) % 400 + 10 for i in range(200)]
    first = generate(server, prefix + [11, 12], 4)
    assert first["meta_info"]["cached_tokens"] < 50
    second = generate(server, prefix + [13, 14, 15], 4)
    # Page size 1: every token of the shared 200-token prefix can be a radix hit.
    assert second["meta_info"]["cached_tokens"] >= 190


def test_mace_status_fields(server: Server, tiny_model_dir: Path):
    r = server.get("/mace/status")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == "0.1.0"
    assert body["sglang_version"] == "0.5.23"
    assert body["device"] == "cpu"
    assert body["model_path"] == str(tiny_model_dir)
    assert body["adapter"] == {"name": None, "version": None}
    assert body["training"] == {"enabled": False}
    assert body["profile"] == "cpu-dev"


def test_plugin_ran_inside_scheduler_process(server: Server):
    body = server.get("/mace/status").json()
    (sched,) = body["schedulers"]
    # The entry is produced by our hook in the scheduler and carried back by SGLang's
    # own msgpack channel; check that the pid it reports is a real, distinct child.
    assert sched["pid"] != body["http_pid"]
    children = {p.pid for p in psutil.Process(server.proc.pid).children(recursive=True)}
    assert sched["pid"] in children
    assert "scheduler" in " ".join(psutil.Process(sched["pid"]).cmdline()).lower() or (
        "scheduler" in psutil.Process(sched["pid"]).name().lower()
    )
    assert "sglang.srt.managers.scheduler.Scheduler.get_internal_state" in sched["hooks_applied"]
    assert "vllm_rotary_stub" in sched["cpu_shims"]
    assert sched["threads"]["cores"] and sched["threads"]["torch_threads"] >= 1
    assert "file_store_rendezvous" in sched["network"]


def test_api_key_covers_mace_routes(server: Server):
    assert requests.get(server.url + "/mace/status", timeout=10).status_code == 401
    bad = {"Authorization": "Bearer wrong"}
    assert requests.get(server.url + "/mace/status", headers=bad, timeout=10).status_code == 401
    assert server.get("/mace/status").status_code == 200


def test_openai_completions_route(server: Server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key=API_KEY)
    out = client.completions.create(
        model=str(server.get("/mace/status").json()["served_model_name"]),
        prompt="The capital of France is",
        max_tokens=8,
        temperature=0,
    )
    assert out.usage.completion_tokens > 0
    assert isinstance(out.choices[0].text, str)


def test_listens_on_loopback_only(server: Server):
    listening = server.listening()
    assert any(addr.port == server.port for addr in listening)
    for addr in listening:
        assert ipaddress.ip_address(addr.ip).is_loopback, addr


def test_sglang_frontend_language(server: Server):
    import sglang as sgl

    backend = sgl.RuntimeEndpoint(server.url, api_key=API_KEY)

    @sgl.function
    def complete(s, prompt):
        s += prompt
        s += sgl.gen("answer", max_tokens=6, temperature=0)

    state = complete.run(prompt="The capital of France is", backend=backend)
    assert isinstance(state["answer"], str) and state["answer"]


PAIR = {"prompt": "Greet me", "chosen": "Certainly! Hello.", "rejected": "hello"}


def feedback_count(server: Server) -> int:
    return server.get("/mace/status").json()["feedback_count"]


def test_feedback_is_stored_and_counted(server: Server):
    before = feedback_count(server)
    r = server.post("/mace/feedback", PAIR)
    assert r.status_code == 200, r.text
    (one,) = r.json()["ids"]
    chat = {**PAIR, "prompt": [{"role": "user", "content": "Greet me"}], "weight": 2}
    r = server.post("/mace/feedback", [PAIR, chat])
    assert r.status_code == 200, r.text
    assert len(r.json()["ids"]) == 2 and min(r.json()["ids"]) > one
    assert feedback_count(server) == before + 3
    assert server.get("/mace/status").json()["queue_depth"] >= 3


def test_bad_feedback_is_rejected_with_the_reason_and_stores_nothing(server: Server):
    before = feedback_count(server)
    url = server.url + "/mace/feedback"
    cases = [
        (b"{oops", 400, "not valid JSON"),
        (b"\xff\xfe", 400, "UTF-8"),
        (b'{"prompt": "p", "chosen": "same", "rejected": "same"}', 400, "must differ"),
        (b'[{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p"}]', 400, "item 1"),
        (b'{"prompt": "' + b"word " * 2000 + b'", "chosen": "a", "rejected": "b"}', 413, "limit"),
    ]
    for body, status, reason in cases:
        r = requests.post(url, data=body, headers=server.headers, timeout=30)
        assert r.status_code == status, (body[:40], r.text)
        assert reason in r.json()["error"]
    long_prompt = {"prompt": "Ω" * 2100, "chosen": "a", "rejected": "b"}  # ~4k tokens
    raw = json.dumps(long_prompt, ensure_ascii=False).encode()
    r = requests.post(url, data=raw, headers=server.headers, timeout=30)
    assert r.status_code == 400 and "model context" in r.json()["error"], r.text
    assert requests.post(url, json=PAIR, timeout=30).status_code == 401
    assert feedback_count(server) == before


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_control_routes_need_the_admin_key(server: Server):
    """SGLang's ADMIN_OPTIONAL level: with both keys set, only the admin key opens pause,
    resume and the adapter list; status and feedback stay on the API key."""
    user, admin = bearer(API_KEY), bearer(ADMIN_KEY)
    controls = [
        ("POST", "/mace/train/pause"),
        ("POST", "/mace/train/resume"),
        ("GET", "/mace/adapters"),
    ]
    for method, path in controls:
        for headers in (user, {}, bearer("wrong")):
            r = requests.request(method, server.url + path, headers=headers, timeout=30)
            assert r.status_code == 401, (path, headers, r.text)
    assert server.get("/mace/status").status_code == 200
    assert server.post("/mace/feedback", PAIR).status_code == 200
    for method, path in controls:
        r = requests.request(method, server.url + path, headers=admin, timeout=30)
        assert r.status_code == 200, (path, r.text)
    assert [a["name"] for a in r.json()["adapters"]] == ["live"]
    # Creating and retiring tenants are control routes too.
    for method, path, body in (
        ("POST", "/mace/adapters", {"name": "t1"}),
        ("DELETE", "/mace/adapters/t1", None),
    ):
        r = requests.request(method, server.url + path, json=body, headers=user, timeout=30)
        assert r.status_code == 401, (path, r.text)
        r = requests.request(method, server.url + path, json=body, headers=admin, timeout=30)
        assert r.status_code in (200, 201), (path, r.text)
    # SGLang's NORMAL level takes only the API key once one is set, even from an admin.
    r = requests.get(server.url + "/mace/status", headers=admin, timeout=30)
    assert r.status_code == 401


def test_feedback_for_an_unknown_adapter_is_a_404_and_stores_nothing(server: Server):
    before = server.get("/mace/status").json()
    r = server.post("/mace/feedback", [PAIR, {**PAIR, "adapter": "someone-else"}])
    assert r.status_code == 404, r.text
    assert "someone-else" in r.json()["error"] and "POST /mace/adapters" in r.json()["error"]
    assert server.get("/mace/status").json()["feedback_count"] == before["feedback_count"]
    # Names are validated: they become directory names.
    for bad in ("../x", "a/b", "", "x" * 65, ".hidden"):
        r = server.post("/mace/feedback", {**PAIR, "adapter": bad})
        assert r.status_code == 400, (bad, r.text)


def test_tenants_are_created_counted_and_retired(server: Server):
    """Without --mace-train a tenant is a store entry: its feedback is kept for later."""
    admin = bearer(ADMIN_KEY)
    r = requests.post(server.url + "/mace/adapters", json={"name": "team-a"}, headers=admin)
    assert r.status_code == 201 and r.json() == {"name": "team-a", "created": True}, r.text
    r = requests.post(server.url + "/mace/adapters", json={"name": "team-a"}, headers=admin)
    assert r.status_code == 200 and r.json()["created"] is False
    bad_weights = (0, float("inf"), float("nan"), 1e-320, 1e4)  # json: Infinity, NaN
    for body in (
        {"name": "../x"},
        {"nom": "x"},
        *({"name": "x", "weight": w} for w in bad_weights),
    ):
        data = json.dumps(body)  # Python's json writes Infinity and NaN; requests' refuses
        headers = {**admin, "Content-Type": "application/json"}
        r = requests.post(server.url + "/mace/adapters", data=data, headers=headers)
        assert r.status_code == 400, (body, r.text)
    before = server.get("/mace/status").json()
    assert server.post("/mace/feedback", [{**PAIR, "adapter": "team-a"}] * 2).status_code == 200
    after = server.get("/mace/status").json()
    assert after["queue_depth"] == before["queue_depth"] + 2
    assert after["tenants"]["queue_depth"]["team-a"] == 2
    listed = requests.get(server.url + "/mace/adapters", headers=admin).json()["adapters"]
    team = next(a for a in listed if a["name"] == "team-a")
    assert team["queue_depth"] == 2 and team["version"] == 0 and team["versions"] == []
    assert set(team) >= {"name", "version", "versions", "train_steps", "queue_depth"}
    assert set(team) >= {"last_loss", "guard_refusals"}
    # Retired: its rows stay stored but leave the queue, and new feedback is refused.
    r = requests.delete(server.url + "/mace/adapters/team-a", headers=admin)
    assert r.status_code == 200 and r.json()["checkpoints_kept"] is True, r.text
    assert requests.delete(server.url + "/mace/adapters/team-a", headers=admin).status_code == 404
    assert requests.delete(server.url + "/mace/adapters/live", headers=admin).status_code == 409
    gone = server.get("/mace/status").json()
    assert gone["queue_depth"] == before["queue_depth"]
    assert gone["feedback_other_adapters"] == before["feedback_other_adapters"] + 2
    assert server.post("/mace/feedback", {**PAIR, "adapter": "team-a"}).status_code == 404


def test_a_server_that_does_not_train_bounds_its_feedback_backlog(server: Server):
    """Without --mace-train nothing drains stored feedback, yet it stays bounded:
    --mace-feedback-backlog (set here) refuses the pair beyond it with a 429 that says
    how to train them, and stores nothing."""
    admin = bearer(ADMIN_KEY)
    r = requests.post(server.url + "/mace/adapters", json={"name": "stored"}, headers=admin)
    assert r.status_code == 201, r.text
    pair = {**PAIR, "adapter": "stored"}
    assert server.post("/mace/feedback", [pair] * (BACKLOG + 1)).status_code == 413
    r = server.post("/mace/feedback", [pair] * BACKLOG)
    assert r.status_code == 200 and r.json()["count"] == BACKLOG, r.text
    count = feedback_count(server)
    r = server.post("/mace/feedback", pair)
    assert r.status_code == 429, r.text
    assert "does not train" in r.json()["error"] and "--mace-train" in r.json()["error"]
    assert feedback_count(server) == count
    assert server.post("/mace/feedback", PAIR).status_code == 200  # another adapter's room
    r = requests.delete(server.url + "/mace/adapters/stored?purge=true", headers=admin)
    assert r.status_code == 200 and r.json()["feedback_deleted"] == BACKLOG, r.text


def test_feedback_survives_kill_9_of_the_whole_server(
    server: Server, tiny_model_dir: Path, state_dir: Path, tmp_path: Path
):
    import os
    import signal

    ids = server.post("/mace/feedback", [PAIR] * 5).json()["ids"]
    count = feedback_count(server)
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(timeout=30)
    again = start(tiny_model_dir, state_dir, tmp_path / "restarted.log")
    try:
        assert feedback_count(again) == count
        assert again.post("/mace/feedback", PAIR).json()["ids"][0] > max(ids)
    finally:
        again.stop()

"""End-to-end continuous training on the tiny model: feedback in, new adapter versions out,
served through SGLang's LoRA pool while requests keep flowing."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from tiny_model import tiny_serve_args
from waits import mace_status, set_paused, wait_for_status

from mace_sgl.launcher import Server
from mace_sgl.templating import encode_pair

PAIRS = [
    {
        "prompt": f"Question {i}: say something",
        "chosen": "Certainly! Here it is.",
        "rejected": f"no {i}",
    }
    for i in range(6)
]
BACKLOG = 64  # --mace-feedback-backlog: never-trained pairs per adapter


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("train-state")


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, state_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    srv = Server(
        tiny_serve_args(
            tiny_model_dir,
            "--mace-train",
            "--mace-state-dir",
            str(state_dir),
            "--mace-default-adapter",
            "live",
            "--mace-lr",
            "1e-3",
            "--mace-max-train-count",
            "1000",
            "--mace-keep-versions",
            "5",
            "--mace-feedback-backlog",
            str(BACKLOG),
        ),
        tmp_path_factory.mktemp("logs") / "train-server.log",
    )
    yield srv
    srv.stop()


def wait_for(server: Server, cond, timeout_s: float = 120.0) -> dict:
    return wait_for_status(server, cond, timeout_s)


def chosen_logprob(server: Server, tokenizer, lora: str | None) -> float:
    prompt, completion = encode_pair(tokenizer, PAIRS[0]["prompt"], PAIRS[0]["chosen"])
    return server.scored(prompt, completion, lora)[0]


def test_status_before_feedback(server: Server):
    s = mace_status(server)
    assert s["training"]["enabled"] is True
    assert s["adapter"] == {"name": "live", "version": 0}
    assert s["adapter_version"] == 0 and s["train_steps"] == 0 and s["queue_depth"] == 0


def test_feedback_raises_version_and_chosen_logprob(
    server: Server, tiny_model_dir: Path, state_dir: Path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    before = chosen_logprob(server, tok, "live")
    base = chosen_logprob(server, tok, None)
    assert before == pytest.approx(base, abs=1e-4)  # v0 is the base model
    assert server.post("/mace/feedback", PAIRS).status_code == 200
    # Wait for exactly what is asserted below: three published versions AND every pair
    # trained at least once (a version can land while a pair is still queued).
    wait_for(
        server,
        lambda s: s["adapter_version"] >= 3 and s["train_steps"] >= 3 and s["queue_depth"] == 0,
    )
    set_paused(server, True)
    try:
        s = mace_status(server)
        after = chosen_logprob(server, tok, "live")
        assert after > before + 0.1, (before, after)
        assert s["train_steps"] >= 3 and s["last_loss"] is not None
        assert s["queue_depth"] == 0  # every pair trained at least once
        # Where the training time went: steps, their guard checks and publishes (the
        # reference passes may all have run inside the steps), adding up to the total
        # (measured slices on CPU and GPU alike).
        by_work = s["training"]["train_seconds_by_work"]
        assert min(by_work["step"], by_work["guard"], by_work["publish"]) > 0, by_work
        assert sum(by_work.values()) == pytest.approx(s["training"]["train_seconds"], rel=1e-6)
        # The guard's readings in /mace/status: each version checked, none refused, the
        # last reading's measurements as the guard took them.
        guard = s["training"]["guard"]
        assert guard["checked"] >= 3 and guard["refused"] == 0, guard
        assert set(guard["refused_by"]) == {"kl", "keep", "content", "empty", "loop"}
        last = guard["last"]
        assert last["published"] and last["why"] == "" and last["version"] >= 3, last
        assert last["kl_per_token"] >= 0 and len(last["kl_by_answer"]) == len(last["answers"])
        # What is served is exactly the checkpoint of the current version (peft format).
        (live,) = [a for a in server.get("/mace/adapters").json()["adapters"] if a["default"]]
        assert live["name"] == "live" and live["version"] == s["adapter_version"]
        assert live["train_steps"] == s["train_steps"] and live["queue_depth"] == 0
        assert live["guard_refusals"] == 0 and live["last_loss"] == s["last_loss"]
        versions = live["versions"]
        assert versions[-1]["version"] == s["adapter_version"]
        assert len(versions) <= 6  # keep 5 plus v0
        wait_for(server, lambda _: (Path(versions[-1]["path"]) / "mace.json").is_file(), 30)
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
        model = PeftModel.from_pretrained(model, versions[-1]["path"])
        prompt, completion = encode_pair(tok, PAIRS[0]["prompt"], PAIRS[0]["chosen"])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + completion])).logits[0]
        lp = (
            logits.log_softmax(-1)[len(prompt) - 1 : -1]
            .gather(1, torch.tensor(completion).unsqueeze(1))
            .sum()
            .item()
        )
        assert lp == pytest.approx(after, abs=1e-3)
        # --mace-default-adapter live: a request that names no adapter gets it.
        assert chosen_logprob(server, tok, None) == pytest.approx(after, abs=1e-4)
    finally:
        set_paused(server, False)


def test_no_radix_sharing_across_adapter_versions(server: Server):
    prompt = list(range(10, 210))

    def cached(lora):
        r = server.post(
            "/generate",
            {"input_ids": prompt, "lora_path": lora, "sampling_params": {"max_new_tokens": 2}},
        )
        assert r.status_code == 200, r.text
        return r.json()["meta_info"]["cached_tokens"]

    server.post("/mace/feedback", PAIRS)
    set_paused(server, True)
    cached("live")
    assert cached("live") >= 190  # same version: the prefix is reused
    v = mace_status(server)["adapter_version"]
    set_paused(server, False)
    wait_for(server, lambda s: s["adapter_version"] > v)
    set_paused(server, True)
    try:
        assert cached("live") < 10  # new version: nothing computed under the old one
    finally:
        set_paused(server, False)


def test_no_request_fails_during_repeated_swaps_under_load(server: Server):
    server.post("/mace/feedback", PAIRS * 2)

    def one(i: int) -> int:
        body = {
            "text": f"Request {i}: tell me",
            "sampling_params": {"max_new_tokens": 24},
            "lora_path": "live" if i % 2 else None,
        }
        return server.post("/generate", body).status_code

    # Rounds of 48 requests, 8 at a time, until a version was published during one:
    # the policy decides when training fits between them, the test only needs a swap.
    # (A version published before the first round does not count: at least one round
    # runs, and a round counts only if the version moved while it ran.)
    codes: list[int] = []
    swapped_during_load = False
    deadline = time.monotonic() + 120
    while not swapped_during_load and time.monotonic() < deadline:
        before = mace_status(server)["adapter_version"]
        with ThreadPoolExecutor(8) as pool:
            codes += list(pool.map(one, range(48)))
        swapped_during_load = mace_status(server)["adapter_version"] > before
    assert codes and codes == [200] * len(codes)
    assert swapped_during_load, "no swap happened during the load"


def test_sidecar_killed_is_restarted_and_training_goes_on(server: Server):
    import os
    import signal

    import psutil

    def sidecars():
        found = []
        for p in psutil.Process(server.proc.pid).children(recursive=True):
            try:  # a killed sidecar is a zombie until the supervisor reaps it
                if p.status() != psutil.STATUS_ZOMBIE and "sidecar.main" in " ".join(p.cmdline()):
                    found.append(p)
            except psutil.Error:
                pass
        return found

    (victim,) = sidecars()
    os.kill(victim.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and [p.pid for p in sidecars()] in ([], [victim.pid]):
        time.sleep(0.2)
    assert len(sidecars()) == 1 and sidecars()[0].pid != victim.pid
    v = mace_status(server)["adapter_version"]
    before = mace_status(server)["feedback_count"]
    assert server.post("/mace/feedback", PAIRS[:2]).status_code == 200
    wait_for(server, lambda s: s["adapter_version"] > v and s["feedback_count"] == before + 2)


def test_feedback_beyond_an_adapters_backlog_is_refused_whole(server: Server):
    """--mace-feedback-backlog on a training server (paused here, so that nothing trains
    meanwhile): a body that would leave an adapter more never-trained pairs than the
    bound is a 429 that names it and stores nothing of the body, another adapter's pairs
    in it included; a body with more pairs for one adapter than the bound is a 413."""
    import requests

    set_paused(server, True)
    try:
        r = requests.post(server.url + "/mace/adapters", json={"name": "team-b"}, timeout=60)
        assert r.status_code == 201, r.text
        b = {**PAIRS[0], "adapter": "team-b"}
        assert server.post("/mace/feedback", [b] * (BACKLOG - 1)).status_code == 200
        before = mace_status(server)["feedback_count"]
        r = server.post("/mace/feedback", [PAIRS[1], b, b])
        assert r.status_code == 429 and "'team-b'" in r.json()["error"], r.text
        assert "nothing was stored" in r.json()["error"]
        assert mace_status(server)["feedback_count"] == before
        assert server.post("/mace/feedback", b).status_code == 200  # exactly at the bound
        assert server.post("/mace/feedback", b).status_code == 429
        r = server.post("/mace/feedback", [PAIRS[1]] * (BACKLOG + 1))
        assert r.status_code == 413 and "send fewer" in r.json()["error"], r.text
    finally:
        set_paused(server, False)

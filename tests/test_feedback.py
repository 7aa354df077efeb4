"""Feedback validation (pure) and the SQLite store (durability, selection order)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mace_sgl.config import PICK_ORDERS
from mace_sgl.feedback import FeedbackError, parse_feedback
from sidecar import store

GOOD = {"prompt": "Say hi", "chosen": "Certainly! Hi.", "rejected": "hi"}


def parse(body, **kw):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_feedback(raw, kw.pop("max_bytes", 10_000), "live", **kw)


def test_one_object_and_a_list_are_normalised():
    (item,) = parse(GOOD)
    assert item == {**GOOD, "adapter": "live", "weight": 1.0}
    chat = {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": "a",
        "rejected": "b",
        "adapter": "tone",
        "weight": 2,
    }
    items = parse([GOOD, chat])
    assert [i["adapter"] for i in items] == ["live", "tone"]
    assert items[1]["weight"] == 2.0


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"\xff\xfe{", "UTF-8"),
        (b"{not json", "not valid JSON"),
        (b'{"prompt": "p", "chosen": "a", "rejected": NaN}', "not valid JSON"),
        ([], "empty list"),
        ("just a string", "expected a JSON object"),
        ({"chosen": "a", "rejected": "b"}, "`prompt` is required"),
        ({**GOOD, "prompt": None}, "`prompt` is required"),
        ({**GOOD, "chosen": ""}, "must not be empty"),
        ({**GOOD, "rejected": "   "}, "must not be empty"),
        ({**GOOD, "chosen": 3}, "must be a string"),
        ({**GOOD, "rejected": GOOD["chosen"]}, "must differ"),
        ({**GOOD, "prompt": []}, "must not be empty"),
        ({**GOOD, "prompt": [{"role": "robot", "content": "x"}]}, "role must be"),
        ({**GOOD, "prompt": [{"role": "user"}]}, "`role` and `content`"),
        ({**GOOD, "weight": 0}, "positive"),
        ({**GOOD, "weight": -1}, "positive"),
        ({**GOOD, "weight": True}, "must be a number"),
        ({**GOOD, "weight": "2"}, "must be a number"),
        ({**GOOD, "adapter": ""}, "`adapter`"),
        ({**GOOD, "adapter": "../etc"}, "`adapter`"),
        ({**GOOD, "extra": 1}, "unknown fields"),
        ([GOOD, {**GOOD, "chosen": None}], "item 1"),
    ],
)
def test_bad_input_is_a_400_with_the_reason(body, reason):
    with pytest.raises(FeedbackError) as err:
        parse(body)
    assert err.value.status == 400
    assert reason in err.value.reason


def test_oversized_body_is_a_413():
    with pytest.raises(FeedbackError) as err:
        parse(GOOD, max_bytes=10)
    assert err.value.status == 413


def test_pairs_longer_than_the_context_are_rejected():
    def count(prompt, completion):
        return len(prompt) + len(completion)

    parse(GOOD, count_tokens=count, max_tokens=100)
    with pytest.raises(FeedbackError, match="model context is 10"):
        parse(GOOD, count_tokens=count, max_tokens=10)


def test_a_list_is_stored_whole_or_not_at_all(tmp_path: Path):
    conn = store.connect(tmp_path / "s.db")
    assert store.add_feedback(conn, parse([GOOD, GOOD])) == [1, 2]
    broken = [*parse([GOOD]), {"prompt": "p"}]  # the second lacks fields: insert fails
    with pytest.raises(KeyError):
        store.add_feedback(conn, broken)
    assert store.counts(conn).feedback == 2


def test_selection_untrained_first_then_by_weighted_loss(tmp_path: Path):
    conn = store.connect(tmp_path / "s.db")
    ids = store.add_feedback(conn, parse([GOOD] * 4))
    first = store.pick_next(conn, "live", 2, "s1", order="oldest")
    assert [r.id for r in first] == ids[:2]
    # In flight rows are not handed out twice.
    assert [r.id for r in store.pick_next(conn, "live", 10, "s1", order="oldest")] == ids[2:]
    for sample_id, loss in zip(ids, [0.1, 0.9, 0.5, 0.3], strict=True):
        assert store.record_result(conn, sample_id, loss, "s1")
    assert not store.record_result(conn, ids[0], 0.2, "s1")  # no longer in flight
    conn.execute("UPDATE feedback SET weight = 10 WHERE id = ?", (ids[0],))  # 0.1*10 = 1.0
    store.add_feedback(conn, parse([GOOD]))
    order = [r.id for r in store.pick_next(conn, "live", 10, "s2")]
    assert order == [5, ids[0], ids[1], ids[2], ids[3]]
    assert store.counts(conn).inflight == 5
    assert store.release_stale(conn, "s3") == 5
    assert store.counts(conn) == store.Counts(feedback=5, untrained=1, inflight=0)


def test_the_newest_untrained_pairs_train_first_by_default(tmp_path: Path):
    """After a shift of preference, the pairs that state the new one go before the
    backlog that states the old; the backlog still trains before any replay."""
    conn = store.connect(tmp_path / "s.db")
    old = store.add_feedback(conn, parse([GOOD] * 3))
    assert [r.id for r in store.pick_next(conn, "live", 1, "s1")] == [old[2]]
    assert store.record_result(conn, old[2], 0.9, "s1")
    new = store.add_feedback(conn, parse([GOOD] * 2))
    order = [r.id for r in store.pick_next(conn, "live", 10, "s2")]
    assert order == [new[1], new[0], old[1], old[0], old[2]]
    with pytest.raises(ValueError, match="one of newest, oldest"):
        store.pick_next(conn, "live", 1, "s3", order="random")
    for order in PICK_ORDERS:  # every --mace-pick-order choice is one pick_next knows
        assert store.pick_next(conn, "live", 1, f"s-{order}", order=order) == []


WRITER = """
import sys, time
from pathlib import Path
from sidecar import store
conn = store.connect(Path(sys.argv[1]))
item = {"prompt": "p", "chosen": "a", "rejected": "b", "adapter": "live", "weight": 1.0}
while True:
    (i,) = store.add_feedback(conn, [item])
    print(i, flush=True)
"""


def test_acknowledged_rows_survive_kill_9_of_the_writer(tmp_path: Path):
    db = tmp_path / "s.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(db)], stdout=subprocess.PIPE, text=True
    )
    acked = []
    deadline = time.monotonic() + 60
    while len(acked) < 50 and time.monotonic() < deadline:
        acked.append(int(proc.stdout.readline()))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(acked) == 50
    conn = store.connect(db)
    stored = {r[0] for r in conn.execute("SELECT id FROM feedback")}
    assert set(acked) <= stored


def feedback_route(monkeypatch: pytest.MonkeyPatch, **flags):
    """The POST /mace/feedback route on an app of its own (no SGLang: no tokenizer, no
    metrics), over a real store in flags' state_dir; returns (client, store connection)."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from mace_sgl.config import MaceConfig
    from mace_sgl.plugin import routes

    monkeypatch.setattr(routes, "_tokenizer_manager", lambda: None)
    cfg = MaceConfig(**flags)
    app = FastAPI()
    app.state.mace = routes.RouteState(cfg)
    app.add_api_route("/mace/feedback", routes.mace_feedback, methods=["POST"])
    conn = store.connect(cfg.store_path)
    assert store.add_tenant(conn, "live")
    return TestClient(app), conn


def test_the_route_refuses_feedback_for_an_adapter_retired_after_its_lookup(tmp_path, monkeypatch):
    """A DELETE that commits between the route's lookup and its store: 409, nothing
    stored (the lookup is made to answer as before the retirement)."""
    from mace_sgl.plugin import routes

    client, conn = feedback_route(monkeypatch, state_dir=str(tmp_path))
    assert store.add_tenant(conn, "t")
    assert store.retire_marked(conn, "t")[0]
    monkeypatch.setattr(routes, "_existing", lambda conn, names: set(names))
    r = client.post("/mace/feedback", json=[GOOD, {**GOOD, "adapter": "t"}])
    assert r.status_code == 409, r.text
    assert "'t' was retired" in r.json()["error"]
    assert store.counts(conn).feedback == 0
    assert client.post("/mace/feedback", json=GOOD).status_code == 200


@pytest.mark.parametrize("train", [False, True])
def test_a_full_backlog_is_a_429_that_says_what_drains_it(tmp_path, monkeypatch, train):
    """--mace-feedback-backlog holds on every server; the 429 of one that does not train
    says that nothing drains the pairs there and how to train them."""
    client, conn = feedback_route(
        monkeypatch, state_dir=str(tmp_path), feedback_backlog=2, train=train
    )
    assert client.post("/mace/feedback", json=[GOOD, GOOD]).status_code == 200
    r = client.post("/mace/feedback", json=GOOD)
    assert r.status_code == 429, r.text
    error = r.json()["error"]
    assert "--mace-feedback-backlog" in error
    assert ("does not train" in error and "--mace-train" in error) is not train
    assert ("caught up" in error) is train
    assert store.counts(conn).feedback == 2


def test_a_full_backlog_evicts_the_oldest_waiting_pairs_under_overflow_evict(tmp_path, monkeypatch):
    """--mace-feedback-overflow evict: the newest feedback is stored (200) and the
    adapter's oldest never-trained pair goes instead, counted in feedback_evicted."""
    client, conn = feedback_route(
        monkeypatch, state_dir=str(tmp_path), feedback_backlog=2, feedback_overflow="evict"
    )
    first = client.post("/mace/feedback", json=[GOOD, GOOD]).json()["ids"]
    r = client.post("/mace/feedback", json={**GOOD, "chosen": "the newest"})
    assert r.status_code == 200, r.text
    ids = {row[0] for row in conn.execute("SELECT id FROM feedback")}
    assert ids == {first[1], *r.json()["ids"]}
    assert store.get_setting(conn, "feedback_evicted", "0") == "1"
    r = client.post("/mace/feedback", json=[GOOD, GOOD, GOOD])  # more than the bound
    assert r.status_code == 413, r.text


def test_sglang_adapter_routes_are_refused_first_and_keep_their_admin_level():
    """--dp-size > 1: the plugin's 400 stands in front of SGLang's own adapter routes
    (added before it, as SGLang's app has them), with their auth level: with both keys
    set, the admin key is needed, as for SGLang's own."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from sglang.srt.utils.auth import AuthLevel, add_api_key_middleware, auth_level

    from mace_sgl.plugin import routes

    app = FastAPI()

    @auth_level(AuthLevel.ADMIN_OPTIONAL)
    async def sglang_route() -> dict:
        return {"success": True}

    for path in routes.SGLANG_ADAPTER_ROUTES:
        app.add_api_route(path, sglang_route, methods=["POST"])
    routes.refuse_adapter_routes(app)
    add_api_key_middleware(app, api_key="user", admin_api_key="admin")
    client = TestClient(app)
    for path in routes.SGLANG_ADAPTER_ROUTES:
        r = client.post(path, json={}, headers={"Authorization": "Bearer admin"})
        assert r.status_code == 400 and "POST /mace/adapters" in r.json()["error"], r.text
        for key in ("user", None):  # not the admin key: refused before the route answers
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            assert client.post(path, json={}, headers=headers).status_code == 401

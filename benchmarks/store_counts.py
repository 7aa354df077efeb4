"""What /mace/status's feedback counts cost at the store's retain bound.

`python -m benchmarks.store_counts [--rows 110000] [--text-chars 400] [--repeats 20]
[--out DIR]`

/mace/status asks the store for its row counts on every call (`store.counts` and
`store.counts_by_adapter`), and each POST /mace/feedback for its queue depth. The rows
carry the prompt and both answers, so counting by reading them grows with what was
stored. The store now answers from its indexes (the covering index `feedback_pick` and
the partial index of rows in flight). This benchmark fills a scratch store (no server)
with `--rows` pairs (default: the 100000 trained pairs `--mace-feedback-retain` keeps
plus the 10000 never-trained ones `--mace-feedback-backlog` allows, over three
adapters, a few in flight), each text `--text-chars` long, and times, in one run, the
store's counts against the same counts read from the rows (`SCAN`, the queries the store
ran before 2026-12-07: the baseline). It reports the median and the spread (min, max)
of `--repeats` calls of each and the ratio of the medians, and checks that both give the
same numbers. DIR/results.json when --out is given.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.stats import emit
from sidecar import store

# The counts as the store read them before 2026-12-07: from the rows (a table scan).
SCAN_COUNTS = (
    "SELECT COUNT(*), COALESCE(SUM(train_count = 0), 0),"
    " COALESCE(SUM(inflight_session IS NOT NULL), 0) FROM feedback"
)
SCAN_BY_ADAPTER = (
    "SELECT adapter, COUNT(*), COALESCE(SUM(train_count = 0), 0),"
    " COALESCE(SUM(inflight_session IS NOT NULL), 0) FROM feedback GROUP BY adapter"
)


def fill(conn: Any, rows: int, text_chars: int) -> None:
    """`rows` pairs over adapters a/b/c, the first 10000 never trained, 8 in flight."""
    text = "x" * text_chars
    untrained = min(10_000, rows)
    with store._transaction(conn):
        conn.executemany(
            "INSERT INTO feedback (created_at, adapter, prompt, prompt_is_chat, chosen,"
            " rejected, weight, train_count) VALUES (0, ?, ?, 0, ?, ?, 1.0, ?)",
            [("abc"[i % 3], text, text, text, 0 if i < untrained else 1) for i in range(rows)],
        )
        conn.execute("UPDATE feedback SET inflight_session = 's' WHERE id <= 8")


def timed(fn: Callable[[], Any], repeats: int) -> tuple[Any, dict[str, float]]:
    """fn's result and its call time in ms: median, min, max over `repeats` calls."""
    times, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(1000.0 * (time.perf_counter() - t))
    return result, {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
    }


def run(rows: int, text_chars: int, repeats: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        conn = store.connect(Path(d) / "feedback.sqlite3")
        try:
            fill(conn, rows, text_chars)
            out: dict[str, Any] = {"rows": rows, "text_chars": text_chars, "repeats": repeats}
            for name, ours, scan in (
                ("counts", lambda: store.counts(conn), lambda: _scan(conn, SCAN_COUNTS)),
                (
                    "counts_by_adapter",
                    lambda: store.counts_by_adapter(conn),
                    lambda: _scan_by_adapter(conn),
                ),
            ):
                scan()  # warm the page cache for both alike
                got, index_t = timed(ours, repeats)
                want, scan_t = timed(scan, repeats)
                if got != want:
                    raise AssertionError(f"{name}: indexes say {got}, rows say {want}")
                out[name] = {
                    "indexes": index_t,
                    "rows_scan": scan_t,
                    "speedup": scan_t["median_ms"] / index_t["median_ms"],
                }
            return out
        finally:
            conn.close()


def _scan(conn: Any, query: str) -> store.Counts:
    total, untrained, inflight = conn.execute(query).fetchone()
    return store.Counts(feedback=total, untrained=untrained, inflight=inflight)


def _scan_by_adapter(conn: Any) -> dict[str, store.Counts]:
    return {
        a: store.Counts(feedback=n, untrained=u, inflight=i)
        for a, n, u, i in conn.execute(SCAN_BY_ADAPTER)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=110_000)
    parser.add_argument("--text-chars", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result = run(args.rows, args.text_chars, args.repeats)
    emit(result, args.out)


if __name__ == "__main__":
    main()

"""How fast the online cost model corrects a foreign profile, on a real server.

    python -m benchmarks.cost_converge --foreign FILE [--model-path P] [--json]

Starts `mace-sgl serve --mace-train --mace-profile FILE` where FILE was measured on
another device or model (for example the tiny test model's profile for SmolLM2), sends a
closed-loop load of 4 streams plus feedback, and polls /mace/status every second: the
running absolute relative error of the cost model per kind of work (an exponential
average over its latest predictions, before each correction) against the number of
observations. Reports, per kind, the first observation count at which the error stayed
under 20%, and the final error.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.colocate import FeedbackStream, request_body
from benchmarks.loadgen import closed_loop
from benchmarks.serve_smoke import machine
from mace_sgl.launcher import Server
from mace_sgl.policy import Profile

KINDS = ("prefill", "decode", "fwd", "head", "bwd")


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out or tempfile.mkdtemp(prefix="cost-converge-"))
    out.mkdir(parents=True, exist_ok=True)
    flags = ["--log-level", "warning", "--mace-train", "--mace-default-adapter", "live",
             "--mace-profile", args.foreign, "--mace-state-dir", str(out / "state")]  # fmt: skip
    if args.model_path:
        flags += ["--model-path", args.model_path]
    foreign = Profile.load(args.foreign).cost
    server = Server(flags, out / "server.log", timeout_s=600)
    trace: list[dict[str, Any]] = []
    try:
        feedback = FeedbackStream(server, backlog=20, interval_s=2.0)
        load = threading.Thread(
            target=closed_loop, args=(server.url, 4, args.seconds, lambda i: request_body(i, 32))
        )
        load.start()
        while load.is_alive():
            cm = server.get("/mace/status").json()["training"]["cost_model"]
            trace.append({"samples": cm["samples"], "error": cm["abs_pct_error"],
                          "weights": cm["weights"]})  # fmt: skip
            time.sleep(1.0)
        load.join()
        feedback.stop()
    finally:
        server.stop()
    final = trace[-1]
    result: dict[str, Any] = {"foreign_profile": args.foreign, "kinds": {}}
    for kind in KINDS:
        errors = [(t["samples"].get(kind, 0), t["error"].get(kind)) for t in trace]
        errors = [(n, e) for n, e in errors if e is not None]
        settled = None
        for i, (n, _) in enumerate(errors):
            if all(e < 0.2 for _, e in errors[i:]):
                settled = n
                break
        result["kinds"][kind] = {
            "foreign_weights": foreign.to_dict()["weights"][kind],
            "final_weights": final["weights"][kind],
            "observations": final["samples"].get(kind, 0),
            "settled_under_20pct_at": settled,
            "final_abs_pct_error": final["error"].get(kind),
        }
    result["machine"] = machine()
    (out / "results.json").write_text(json.dumps({**result, "trace": trace}, indent=2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--foreign", required=True, help="a profile from another device/model")
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--out", default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args)
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()

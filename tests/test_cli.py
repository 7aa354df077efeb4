"""`mace-sgl serve` argument resolution: SGLang's flags, platform defaults, profile, CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mace_sgl import cli

MACE_SGL = str(Path(sys.executable).with_name("mace-sgl"))


@pytest.fixture(scope="module")
def parser():
    return cli.build_serve_parser()


def test_explicit_dests_sees_only_what_was_typed(parser):
    given = cli.explicit_dests(parser, ["--model-path", "m", "--sleep-on-idle", "--port", "1"])
    assert given == {"model_path", "sleep_on_idle", "port"}
    # Parsing with defaults suppressed must not leak into the parser.
    assert parser.parse_args([]).port == 30000


def test_cpu_defaults_profile_and_flags_layer_in_order(tiny_model_dir: Path):
    args, cfg = cli.resolve_serve_args(
        ["--model-path", str(tiny_model_dir), "--chunked-prefill-size", "512"]
    )
    assert cfg.profile == "cpu-dev"
    # Platform defaults for a machine without a GPU.
    assert args.device == "cpu"
    assert args.attention_backend == "torch_native"
    assert args.lora_backend == "torch_native"
    assert args.sleep_on_idle is True
    assert cfg.kv_tokens_min <= args.max_total_tokens <= cfg.kv_tokens_max
    # The profile's value where the command line is silent, the flag where it is not.
    assert args.max_running_requests == 32
    assert args.chunked_prefill_size == 512
    assert args.host == "127.0.0.1"


def test_command_line_beats_platform_defaults(tiny_model_dir: Path):
    args, _ = cli.resolve_serve_args(
        [
            "--model-path",
            str(tiny_model_dir),
            "--max-total-tokens",
            "777",
            "--attention-backend",
            "triton",
            "--mace-kv-tokens-max",
            "5000",
        ]
    )
    assert args.max_total_tokens == 777
    assert args.attention_backend == "triton"


def test_help_lists_sglang_and_mace_flags():
    out = subprocess.run(
        [MACE_SGL, "serve", "--help"], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    for flag in ("--model-path", "--api-key", "--tp-size", "--profile", "--mace-kv-ram-fraction"):
        assert flag in out


def test_unknown_command_is_an_error():
    proc = subprocess.run([MACE_SGL, "bogus"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "usage: mace-sgl" in proc.stderr


def test_kv_prune_selects_its_backend_and_the_settings_it_needs(tiny_model_dir: Path):
    model = ["--model-path", str(tiny_model_dir)]
    args, cfg = cli.resolve_serve_args([*model, "--mace-kv-prune", "--mace-kv-budget", "0.25"])
    assert cfg.kv_prune and cfg.kv_budget == "0.25"
    assert args.attention_backend == "mace_prune"
    assert args.disable_overlap_schedule is True
    # Naming the backend turns pruning on with the configured budget.
    args, cfg = cli.resolve_serve_args([*model, "--attention-backend", "mace_prune"])
    assert cfg.kv_prune and args.disable_overlap_schedule is True
    with pytest.raises(SystemExit):
        cli.resolve_serve_args([*model, "--mace-kv-prune", "--attention-backend", "triton"])
    with pytest.raises(SystemExit, match="mace-sgl: an absolute kv budget must be an integer"):
        cli.resolve_serve_args([*model, "--mace-kv-prune", "--mace-kv-budget", "2.5"])


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--tp-size", "2"], "--tp-size 2"),
        (["--tensor-parallel-size", "4"], "--tp-size 4"),
        (["--pp-size", "2"], "--pp-size 2"),
    ],
)
def test_training_refuses_parallel_layouts_before_starting(
    tiny_model_dir: Path, tmp_path: Path, flags: list[str], named: str
):
    argv = ["--model-path", str(tiny_model_dir), "--mace-state-dir", str(tmp_path), *flags]
    with pytest.raises(SystemExit) as refused:
        cli.resolve_serve_args([*argv, "--mace-train"])
    message = str(refused.value)
    assert f"--mace-train cannot run with {named}" in message
    assert "serve without --mace-train" in message
    # Refused before anything was written: no v0 adapter in the state directory.
    assert not any(tmp_path.rglob("adapter_model.safetensors"))
    # The same layout without training is SGLang's business, not ours.
    args, cfg = cli.resolve_serve_args(argv)
    assert not cfg.train and args.enable_lora is not True


def test_data_parallel_training_is_accepted_with_its_own_placement_and_cores(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("SGLANG_CPU_OMP_THREADS_BIND", "")  # restored after the test
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})
    argv = ["--model-path", str(tiny_model_dir), "--mace-state-dir", str(tmp_path)]
    args, cfg = cli.resolve_serve_args([*argv, "--mace-train", "--dp-size", "2"])
    assert cfg.train and cfg.replicas == 2 and cfg.placement == "lemix"
    store = Path(cfg.replica_store)
    assert store.is_dir() and store.stat().st_mode & 0o777 == 0o700
    # Each replica its own cores, split as evenly as they go.
    assert os.environ["SGLANG_CPU_OMP_THREADS_BIND"] == "0,1,2|3,4"
    monkeypatch.setenv("SGLANG_CPU_OMP_THREADS_BIND", "")
    with pytest.raises(SystemExit, match="--dp-size 8 on CPU needs at least 8 cores"):
        cli.resolve_serve_args([*argv, "--dp-size", "8"])
    with pytest.raises(SystemExit, match="--mace-publish-every 1"):
        cli.resolve_serve_args(
            [*argv, "--mace-train", "--dp-size", "2", "--mace-publish-every", "2"]
        )
    with pytest.raises(SystemExit, match="mace-sgl: --mace-train-ranks .2.: ranks are 0..1"):
        cli.resolve_serve_args([*argv, "--mace-train", "--dp-size", "2", "--mace-train-ranks", "2"])
    args, cfg = cli.resolve_serve_args(
        [*argv, "--mace-train", "--dp-size", "2", "--mace-train-ranks", "1"]
    )
    assert cfg.training_ranks == [1]
    # No train floor unless the flag asks for one, under any placement: under LeMix's
    # serving-first placement a floor kept the holder from serving the overflow.
    assert cfg.train_floor == 0.0
    _, cfg = cli.resolve_serve_args(
        [*argv, "--mace-train", "--dp-size", "2", "--mace-train-floor", "0"]
    )
    assert cfg.train_floor == 0.0
    _, cfg = cli.resolve_serve_args(
        [*argv, "--mace-train", "--dp-size", "2", "--mace-placement", "sglang"]
    )
    assert cfg.train_floor == 0.0
    _, cfg = cli.resolve_serve_args([*argv, "--mace-train"])
    assert cfg.train_floor == 0.0
    _, cfg = cli.resolve_serve_args(
        [*argv, "--mace-train", "--dp-size", "2", "--mace-auto-adapters"]
    )
    assert cfg.auto_adapters and cfg.replicas == 2  # created on every replica
    with pytest.raises(SystemExit, match="--mace-placement sglang"):
        cli.resolve_serve_args([*argv, "--dp-size", "2", "--load-balance-method", "total_tokens"])
    args, cfg = cli.resolve_serve_args(
        [
            *argv,
            "--dp-size",
            "2",
            "--mace-placement",
            "sglang",
            "--load-balance-method",
            "total_tokens",
        ]
    )
    assert cfg.placement == "sglang" and args.load_balance_method == "total_tokens"


def test_several_servers_need_training_and_the_flags_replicas_need(
    tiny_model_dir: Path, tmp_path: Path
):
    argv = ["--model-path", str(tiny_model_dir), "--mace-state-dir", str(tmp_path),
            "--mace-sync-addr", "127.0.0.1:29600", "--mace-sync-world-size", "2"]  # fmt: skip
    with pytest.raises(SystemExit, match="add --mace-train"):
        cli.resolve_serve_args(argv)
    with pytest.raises(SystemExit, match="needs --mace-publish-every 1"):
        cli.resolve_serve_args([*argv, "--mace-train", "--mace-publish-every", "2"])
    args, cfg = cli.resolve_serve_args([*argv, "--mace-train", "--mace-sync-rank", "1"])
    assert cfg.sync_world_size == 2 and cfg.sync_rank == 1 and cfg.replicas == 1
    assert cfg.synced and cfg.sync_host == "127.0.0.1"
    # Tenants created from feedback are not for several servers; the route's are.
    with pytest.raises(SystemExit, match="POST /mace/adapters on any server"):
        cli.resolve_serve_args([*argv, "--mace-train", "--mace-auto-adapters"])


def test_cores_split_evenly():
    assert cli.split_evenly([0, 1], 2) == [[0], [1]]
    assert cli.split_evenly(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]


def test_training_accepts_the_single_process_layout(tiny_model_dir: Path, tmp_path: Path):
    argv = ["--model-path", str(tiny_model_dir), "--mace-state-dir", str(tmp_path)]
    args, cfg = cli.resolve_serve_args(
        [*argv, "--mace-train", "--tp-size", "1", "--pp-size", "1", "--dp-size", "1"]
    )
    assert cfg.train and args.enable_lora is True

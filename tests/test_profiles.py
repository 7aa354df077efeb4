"""Profiles for GPU targets, --print-args and the GPU memory reserve, resolved on CPU.

`--profile NAME` resolves for the profile's target device whatever this machine is, so
these run in CI on a machine without a GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mace_sgl import cli, gpu_memory
from mace_sgl.config import CONFIGS_DIR, load_profile

MACE_SGL = str(Path(sys.executable).with_name("mace-sgl"))


def _resolve(tiny_model_dir: Path, state: Path, *flags: str):
    return cli.resolve_serve_args(
        ["--model-path", str(tiny_model_dir), "--mace-state-dir", str(state), *flags]
    )


def _h100_training(tiny_model_dir: Path, state: Path, *flags: str):
    return _resolve(tiny_model_dir, state, "--profile", "h100", "--mace-train", *flags)


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")))
def test_every_shipped_profile_loads_with_a_target(name: str):
    parser = cli.build_serve_parser()  # every key must be a real SGLang or mace setting
    profile = load_profile(name, {a.dest for a in parser._actions})
    assert profile.name == name
    assert profile.target_device in ("cpu", "cuda")
    if profile.target_device == "cuda":
        assert profile.target["gpu_memory_gb"] > 0
        assert profile.sglang["attention_backend"] == "flashinfer"
        assert 0 < profile.sglang["mem_fraction_static"] < 1


def test_h100_resolves_gpu_settings_on_a_cpu_machine(tiny_model_dir: Path, tmp_path: Path):
    args, cfg = _h100_training(tiny_model_dir, tmp_path)
    assert cfg.profile == "h100"
    # None of the CPU platform defaults.
    assert args.device == "cuda"
    assert args.attention_backend == "flashinfer"
    assert args.lora_backend == "csgmv"
    assert args.sleep_on_idle is False
    assert args.max_total_tokens is None  # SGLang sizes the pool from GPU memory
    assert args.cuda_graph_max_bs_decode == 128
    # The training reserve comes out of the static share before SGLang sizes its pool.
    assert cfg.train_memory_mb == 6144
    assert args.mem_fraction_static == pytest.approx(0.85 - 6144 / (80 * 1024), abs=1e-4)


def test_orin_resolves_its_edge_settings(tiny_model_dir: Path, tmp_path: Path):
    args, cfg = _resolve(tiny_model_dir, tmp_path, "--profile", "orin-agx", "--mace-train")
    assert args.device == "cuda" and args.dtype == "bfloat16"
    assert args.attention_backend == "flashinfer"
    assert args.cuda_graph_bs_decode == [1, 2, 4, 8, 16]
    assert args.context_length == 4096
    assert args.mem_fraction_static == pytest.approx(0.5 - 2048 / (32 * 1024), abs=1e-4)


def test_reserve_is_estimated_when_not_given_and_includes_prune_scores(
    tiny_model_dir: Path, tmp_path: Path
):
    args, cfg = _h100_training(
        tiny_model_dir, tmp_path, "--mace-train-memory-mb", "0", "--mace-kv-prune"
    )
    model_config = json.loads((tiny_model_dir / "config.json").read_text())
    train = gpu_memory.estimate_train_bytes(model_config, cfg.lora_rank, cfg.targets)
    assert cfg.train_memory_mb == pytest.approx(train / gpu_memory.MB, abs=0.1)
    # Pruning bounds the request rows its score tensor has, and reserves it too.
    assert args.max_running_requests == 256
    prune = gpu_memory.prune_score_bytes(257, model_config["max_position_embeddings"])
    assert args.mace_reserve == gpu_memory.GpuReserve(train, prune)
    expected = 0.85 - (train + prune) / (80 * 2**30)
    assert args.mem_fraction_static == pytest.approx(expected, abs=1e-4)


def test_explicit_static_share_is_taken_as_given(tiny_model_dir: Path, tmp_path: Path):
    args, cfg = _h100_training(tiny_model_dir, tmp_path, "--mem-fraction-static", "0.7")
    assert args.mem_fraction_static == 0.7
    assert not cfg.reserve_pending  # nor lowered later by the resolution hook


def test_a_reserve_that_leaves_too_little_to_serve_is_refused(tiny_model_dir: Path, tmp_path: Path):
    with pytest.raises(SystemExit) as refused:
        _resolve(
            tiny_model_dir,
            tmp_path,
            "--profile",
            "orin-agx",
            "--mace-train",
            "--mace-train-memory-mb",
            "12000",
        )
    assert "lower --mace-train-memory-mb" in str(refused.value)


def test_lowered_fraction_and_estimate_are_plain_arithmetic():
    reserve = gpu_memory.GpuReserve(train_bytes=8 * 2**30, prune_bytes=0)
    assert gpu_memory.lowered_fraction(0.9, reserve, 80 * 2**30) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="would leave"):
        gpu_memory.lowered_fraction(0.35, reserve, 80 * 2**30)
    llama = {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
    }
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    # Rank 16 on all seven projections of Llama-3-8B: 41.9M parameters (peft's count).
    assert gpu_memory.lora_params(llama, 16, targets) == 41_943_040
    one = gpu_memory.estimate_train_bytes(llama, 16, targets, tenants=1)
    two = gpu_memory.estimate_train_bytes(llama, 16, targets, tenants=2)
    # A second tenant adds its fp32 LoRA, gradient, two AdamW moments and snapshot.
    assert two - one == pytest.approx(1.25 * 5 * 4 * 41_943_040, abs=2)
    # Llama-3-8B has 8,030,261,248 parameters (untied head); tied, one embedding fewer.
    assert gpu_memory.base_params(llama) == 8_030_261_248
    tied = llama | {"tie_word_embeddings": True}
    assert gpu_memory.base_params(tied) == 8_030_261_248 - 128256 * 4096
    # --mace-train-dtype float32 on a GPU: the trainer's float32 copy of the base on top.
    copy = gpu_memory.estimate_train_bytes(llama, 16, targets, base_copy=True)
    assert copy - one >= 1.25 * 4 * 8_030_261_248


def test_print_args_prints_one_json_object_and_writes_nothing(tiny_model_dir: Path, tmp_path: Path):
    state = tmp_path / "state"
    out = subprocess.run(
        [
            MACE_SGL,
            "serve",
            "--model-path",
            str(tiny_model_dir),
            "--profile",
            "h100",
            "--mace-train",
            "--mace-state-dir",
            str(state),
            "--print-args",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    resolved = json.loads(out.stdout)  # nothing but the one object on stdout
    assert resolved["profile"] == "h100"
    assert resolved["sglang"]["attention_backend"] == "flashinfer"
    assert resolved["sglang"]["device"] == "cuda"
    assert resolved["sglang"]["enable_lora"] is True
    assert resolved["sglang"]["mem_fraction_static"] == pytest.approx(0.775, abs=1e-4)
    assert resolved["mace"]["train"] is True and resolved["mace"]["train_memory_mb"] == 6144
    assert resolved["gpu_reserve"]["static_share"] == "taken out of mem_fraction_static"
    assert "print_args" not in resolved["sglang"]
    # Nothing started and nothing written: no store, no v0 adapter.
    assert not state.exists() or not any(state.rglob("*"))


def test_profile_files_are_the_shipped_ones():
    assert {p.stem for p in CONFIGS_DIR.glob("*.yaml")} >= {"cpu-dev", "h100", "orin-agx"}


def test_a_reserve_left_to_resolution_comes_out_of_the_share_sglang_resolves(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch
):
    """No share given (or none of known GPU size): the plugin wraps SGLang's own
    handle_gpu_memory_settings step and lowers what it resolved for the GPU it finds."""
    import sglang.srt.utils.common as common
    from sglang.srt.arg_groups import resolution_hooks
    from sglang.srt.arg_groups.model_override_base import resolving_view
    from sglang.srt.arg_groups.overrides import declare_resolution
    from sglang.srt.server_args import ServerArgs

    from mace_sgl.plugin import gpu_reserve

    profile = tmp_path / "gpu.yaml"
    profile.write_text("target:\n  device: cuda\nsglang:\n  attention_backend: flashinfer\n")
    args, cfg = _resolve(tiny_model_dir, tmp_path / "s", "--profile", str(profile), "--mace-train")
    assert cfg.reserve_pending and args.mem_fraction_static is None
    server_args = ServerArgs.from_cli_args(args)

    def handle_gpu_memory_settings(sa):  # stands in for SGLang's step on an 80 GiB GPU
        declare_resolution(sa, "sglang", mem_fraction_static=0.88)

    monkeypatch.setitem(resolution_hooks._HOOKS, gpu_reserve.STEP, [])
    monkeypatch.setattr(common, "get_device_memory_capacity", lambda device=None: 80 * 1024.0)
    gpu_reserve.install(cfg)
    resolution_hooks.run_hook(handle_gpu_memory_settings, server_args)
    expected = 0.88 - cfg.train_memory_mb / (80 * 1024)
    assert resolving_view(server_args).mem_fraction_static == pytest.approx(expected, abs=1e-4)
    # A GPU whose size cannot be read: a clear refusal, not a silent missing reserve.
    monkeypatch.setattr(common, "get_device_memory_capacity", lambda device=None: None)
    with pytest.raises(ValueError, match="give --mem-fraction-static"):
        resolution_hooks.run_hook(handle_gpu_memory_settings, ServerArgs.from_cli_args(args))

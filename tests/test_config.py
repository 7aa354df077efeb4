"""Profiles, --mace-* flags and the precedence rules of `mace-sgl serve`."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from mace_sgl import config
from mace_sgl.config import MaceConfig

SMOL = {
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "hidden_size": 576,
}


def test_kv_bytes_per_token_counts_k_and_v_over_all_layers():
    # 2 (K, V) * 30 layers * 3 kv heads * 64 dims * 2 bytes (bf16)
    assert config.kv_bytes_per_token(SMOL) == 23040
    no_head_dim = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64}
    assert config.kv_bytes_per_token(no_head_dim, dtype_bytes=4) == 2 * 2 * 4 * 16 * 4


def test_kv_tokens_for_ram_is_a_share_of_ram_within_bounds():
    cfg = MaceConfig(kv_ram_fraction=0.1, kv_tokens_min=1000, kv_tokens_max=100_000)
    assert config.kv_tokens_for_ram(cfg, SMOL, 23040 * 10_000 * 10) == 10_000
    assert config.kv_tokens_for_ram(cfg, SMOL, 1) == 1000
    assert config.kv_tokens_for_ram(cfg, SMOL, 10**15) == 100_000


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kv_ram_fraction": 0.0},
        {"kv_ram_fraction": 0.95},
        {"kv_tokens_min": 10, "kv_tokens_max": 5},
        {"sync_world_size": 2},  # several servers need the group's address
        {"sync_addr": "127.0.0.1:29600"},  # ... and an address needs several servers
        {"sync_addr": "127.0.0.1:29600", "sync_world_size": 2, "sync_rank": 2},
        {"sync_addr": "localhost", "sync_world_size": 2},  # no port
        {"sync_addr": "127.0.0.1:0", "sync_world_size": 2},
        {"adapter_decay": 1.0},  # would wipe the adapter after every step
        {"adapter_decay": -0.1},
        {"adapter_decay": float("nan")},
        {"adapter_decay_per": "token"},
        {"dpo_span": "tokens"},  # whole or edit
    ],
)
def test_invalid_mace_config_is_rejected(kwargs):
    with pytest.raises(ValueError):
        MaceConfig(**kwargs)


def test_config_round_trips_through_the_environment(monkeypatch: pytest.MonkeyPatch):
    cfg = MaceConfig(profile="cpu-dev", kv_ram_fraction=0.2)
    monkeypatch.setenv(config.ENV_VAR, cfg.to_env())
    assert MaceConfig.from_env() == cfg
    monkeypatch.delenv(config.ENV_VAR)
    assert MaceConfig.from_env() == MaceConfig()


def test_profile_errors_name_the_problem(tmp_path: Path):
    bad_section = tmp_path / "a.yaml"
    bad_section.write_text("sglang: {}\ntraining: {}\n")
    with pytest.raises(ValueError, match="unknown sections"):
        config.load_profile(str(bad_section), set())
    bad_sglang = tmp_path / "b.yaml"
    bad_sglang.write_text("sglang:\n  max-running-requestz: 3\n")
    with pytest.raises(ValueError, match="max_running_requestz"):
        config.load_profile(str(bad_sglang), {"max_running_requests"})
    bad_mace = tmp_path / "c.yaml"
    bad_mace.write_text("mace:\n  kv_ram_fractoin: 0.2\n")
    with pytest.raises(ValueError, match="kv_ram_fractoin"):
        config.load_profile(str(bad_mace), set())
    with pytest.raises(FileNotFoundError, match="cpu-dev"):
        config.load_profile("no-such-profile", set())


def test_mace_flags_override_the_profile():
    parser = argparse.ArgumentParser()
    config.add_mace_args(parser)
    profile = config.Profile("p", sglang={}, mace={"kv_ram_fraction": 0.3, "kv_tokens_max": 9999})
    args = parser.parse_args(["--mace-kv-ram-fraction", "0.05"])
    cfg = config.build_mace_config(args, profile)
    assert cfg.kv_ram_fraction == 0.05
    assert cfg.kv_tokens_max == 9999
    assert cfg.profile == "p"


def test_policy_flags_parse_into_the_config():
    parser = argparse.ArgumentParser()
    config.add_mace_args(parser)
    args = parser.parse_args(
        ["--mace-policy", "fcfs-reserve", "--mace-profile", "p.json", "--mace-slo-tbt-ms", "150"]
    )
    cfg = config.build_mace_config(args, None)
    assert (cfg.policy, cfg.cost_profile, cfg.slo_tbt_ms) == ("fcfs-reserve", "p.json", 150.0)
    assert MaceConfig().policy == "mace"
    with pytest.raises(SystemExit):  # argparse names the valid choices
        parser.parse_args(["--mace-policy", "lottery"])
    with pytest.raises(ValueError, match="unknown policy"):
        MaceConfig(policy="lottery")


def test_sync_addresses_split_into_host_and_port():
    assert config.split_addr("127.0.0.1:29600") == ("127.0.0.1", 29600)
    assert config.split_addr("[::1]:29600") == ("::1", 29600)
    cfg = MaceConfig(sync_addr="127.0.0.1:29600", sync_world_size=2, sync_rank=1)
    assert cfg.synced and not MaceConfig().synced

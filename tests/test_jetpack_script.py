"""scripts/setup-jetpack.sh: the dry run works on any machine, and a real run refuses
anything but the pinned Jetson with a message that names it."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "setup-jetpack.sh"
TARGET = ROOT / "configs" / "jetpack-target.env"


def _target() -> dict[str, str]:
    out = {}
    for line in TARGET.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value.strip('"')
    return out


def _tree_state() -> str:
    """Every changed, new or ignored path of the checkout (a dry run adds none)."""
    return subprocess.run(
        ["git", "status", "--porcelain", "--ignored", "--untracked-files=all"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    ).stdout


def _run(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *flags], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def test_the_target_is_pinned_in_one_file():
    target = _target()
    for key in ("JETPACK_VERSION", "L4T_RELEASE", "CUDA_VERSION", "TORCH_CUDA_ARCH_LIST"):
        assert target[key], key
    assert target["TORCH_CUDA_ARCH_LIST"] == "8.7"
    assert target["TORCH_VERSION"] == "2.14.1" and target["SGLANG_VERSION"] == "0.5.23"
    assert target["CUDA_VERSION"].startswith("13")  # JetPack 6's CUDA 12.6 cannot run it


def test_dry_run_prints_every_step_and_changes_nothing(tmp_path: Path):
    before = _tree_state()
    out = _run("--dry-run")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    steps = [line for line in text.splitlines() if "step " in line and "/" in line]
    assert len(steps) >= 5
    target = _target()
    assert f"torch=={target['TORCH_VERSION']}" in text
    assert "TORCH_CUDA_ARCH_LIST=8.7" in text
    assert "DRY RUN" in text
    assert _tree_state() == before


@pytest.mark.skipif(
    platform.machine() == "aarch64" and Path("/etc/nv_tegra_release").exists(),
    reason="this machine may be the Jetson the script targets",
)
def test_a_real_run_off_jetson_refuses_and_names_the_jetson_it_expects():
    out = _run()
    assert out.returncode == 2
    message = out.stderr + out.stdout
    target = _target()
    assert "refusing" in message
    assert "Jetson AGX Orin" in message
    assert f"JetPack {target['JETPACK_VERSION']}" in message
    assert "--dry-run" in message

"""Adapter checkpoints: optimizer state resumes, write failures surface, shape mismatches
give a clear error instead of a crash."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from test_sliced_dpo import PAIRS, lora_model

from mace_sgl.trainer.checkpoints import (
    AdapterGone,
    CheckpointMismatch,
    CheckpointWriter,
    check_compatible,
    owner_id,
    purge_dir,
    resume,
    write_checkpoint,
)
from mace_sgl.trainer.publish import lora_config_dict, write_zero_adapter
from mace_sgl.trainer.sliced import SlicedDPO, run_to_end

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def save(model, dpo: SlicedDPO, adapter_dir: Path, version: int) -> None:
    weights = {n.replace(".default", ""): t for n, t in lora_state(model).items()}
    config = model.peft_config["default"].to_dict()
    write_checkpoint(
        adapter_dir, version, weights, config, {"version": version}, 5, dpo.optimizer.state_dict()
    )


def test_resume_restores_weights_and_optimizer(tiny_model_dir: Path, tmp_path: Path):
    model = lora_model(tiny_model_dir)
    dpo = SlicedDPO(model, beta=0.1, lr=1e-3)
    for _ in range(2):
        assert run_to_end(dpo.step_slices(PAIRS[:1])).ok
    save(model, dpo, tmp_path, 2)
    # The next step from the saved state, uninterrupted ...
    assert run_to_end(dpo.step_slices(PAIRS[1:])).ok
    expected = lora_state(model)

    # ... equals the next step after a restart that resumed the checkpoint: Adam's
    # moments and step count came back, not only the weights.
    fresh = lora_model(tiny_model_dir, seed=7)
    fresh_dpo = SlicedDPO(fresh, beta=0.1, lr=1e-3)
    resumed = resume(tmp_path, fresh, fresh_dpo.optimizer)
    assert resumed.version == 2 and resumed.optimizer
    assert run_to_end(fresh_dpo.step_slices(PAIRS[1:])).ok
    for name, t in lora_state(fresh).items():
        torch.testing.assert_close(t, expected[name], rtol=1e-5, atol=1e-6)

    # Without the optimizer state the same step lands elsewhere (the check can fail).
    blank = lora_model(tiny_model_dir, seed=7)
    blank_dpo = SlicedDPO(blank, beta=0.1, lr=1e-3)
    (tmp_path / "v2" / "optimizer.pt").unlink()
    assert resume(tmp_path, blank, blank_dpo.optimizer).optimizer is False
    assert run_to_end(blank_dpo.step_slices(PAIRS[1:])).ok
    diffs = [(t - expected[n]).abs().max().item() for n, t in lora_state(blank).items()]
    assert max(diffs) > 1e-4


def test_checkpoint_loads_in_plain_peft(tiny_model_dir: Path, tmp_path: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = lora_model(tiny_model_dir)
    dpo = SlicedDPO(model, beta=0.1, lr=1e-3)
    save(model, dpo, tmp_path, 1)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "v1"))
    for name, t in lora_state(loaded).items():
        torch.testing.assert_close(t, lora_state(model)[name])


def test_write_failures_are_counted_and_logged(tmp_path: Path, caplog):
    calls = threading.Event()

    def broken(*args, **kwargs):
        calls.set()
        raise OSError(28, "No space left on device")

    writer = CheckpointWriter(tmp_path, keep=3, write=broken)
    writer.submit(4, {}, {}, {}, None)
    writer.flush()
    assert calls.is_set()
    status = writer.status()
    assert status["failures"] == 1 and status["written"] == 0
    assert "v4" in status["last_error"] and "No space left" in status["last_error"]
    assert "checkpoint of v4" in caplog.text


def test_writer_keeps_the_newest_versions(tmp_path: Path):
    writer = CheckpointWriter(tmp_path, keep=2)
    write_zero_adapter(tmp_path / "v0", _tiny_config(), 2, 4, ["q_proj"])
    for v in (1, 2, 3):
        writer.submit(v, {"w": torch.zeros(2)}, lora_config_dict(2, 4, ["q_proj"]), {}, {"s": 1})
    writer.flush()
    status = writer.status()
    # versions submitted while a write runs may be superseded by newer ones
    assert status["written"] + status["superseded"] == 3 and status["failures"] == 0
    assert status["last_written_version"] == 3 and status["last_error"] is None
    names = sorted(p.name for p in tmp_path.glob("v*"))
    assert names[0] == "v0" and names[-1] == "v3" and len(names) <= 3


def test_writer_holds_at_most_one_waiting_write(tmp_path: Path):
    started, release = threading.Event(), threading.Event()
    written: list[int] = []

    def slow(adapter_dir, version, *args):
        started.set()
        release.wait(10)
        written.append(version)
        return adapter_dir / f"v{version}"

    writer = CheckpointWriter(tmp_path, keep=3, write=slow)
    first = writer.submit(1, {}, {}, {}, None)
    assert started.wait(10)  # v1 is being written
    futures = [writer.submit(v, {}, {}, {}, None) for v in (2, 3, 4, 5)]
    for f in futures[:-1]:  # each newer version replaced the waiting one
        assert f.result(timeout=1) is None
    release.set()
    assert first.result(timeout=10) == tmp_path / "v1"
    assert futures[-1].result(timeout=10) == tmp_path / "v5"
    writer.flush()
    assert written == [1, 5]
    assert writer.status()["superseded"] == 3 and writer.status()["written"] == 2


def _adapter(adapter_dir: Path) -> CheckpointWriter:
    """An adapter's directory as its creation leaves it (v0), and its writer."""
    write_zero_adapter(adapter_dir / "v0", _tiny_config(), 2, 4, ["q_proj"])
    return CheckpointWriter(adapter_dir, keep=3)


def _submit(writer: CheckpointWriter, version: int):
    return writer.submit(version, {"w": torch.zeros(2)}, lora_config_dict(2, 4, ["q_proj"]),
                         {"version": version}, None)  # fmt: skip


def test_a_write_after_a_purge_does_not_bring_the_adapter_back(tmp_path: Path, caplog):
    """DELETE ?purge=true deletes the directory while the trainer may still hold a
    version to write: the write is dropped (counted as purged, not a failure) and the
    directory stays gone."""
    adapter_dir = tmp_path / "adapters" / "team-a"
    writer = _adapter(adapter_dir)
    assert _submit(writer, 1).result(timeout=10) == adapter_dir / "v1"
    purge_dir(adapter_dir)
    assert not adapter_dir.exists() and list((tmp_path / "adapters").iterdir()) == []
    with pytest.raises(AdapterGone):
        _submit(writer, 2).result(timeout=10)
    writer.flush()
    assert not adapter_dir.exists()
    status = writer.status()
    assert status["purged"] == 1 and status["failures"] == 0 and status["written"] == 1
    assert status["last_error"] is None and "failed" not in caplog.text


@pytest.mark.parametrize("made_again", [False, True])
def test_a_write_under_way_when_the_purge_comes_is_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, made_again: bool
):
    """The purge lands between the write's first file and its last (the directory is
    renamed away, then deleted), and maybe a new adapter of the same name is created
    meanwhile: the write ends as purged and leaves nothing behind."""
    import safetensors.torch

    adapter_dir = tmp_path / "adapters" / "team-a"
    writer = _adapter(adapter_dir)
    inside, release = threading.Event(), threading.Event()
    real = safetensors.torch.save_file

    def paused(tensors, path, *a, **kw):
        real(tensors, path, *a, **kw)
        if ".v1.tmp" in str(path):  # the write under test, not a new adapter's v0
            inside.set()
            assert release.wait(10)

    monkeypatch.setattr(safetensors.torch, "save_file", paused)
    future = _submit(writer, 1)
    assert inside.wait(10)
    purge_dir(adapter_dir)
    if made_again:
        _adapter(adapter_dir)
    release.set()
    with pytest.raises(AdapterGone):
        future.result(timeout=10)
    writer.flush()
    adapters = tmp_path / "adapters"
    left = sorted(str(p.relative_to(adapters)) for p in adapters.glob("**/*v*"))
    assert left == (["team-a/v0"] if made_again else [])
    assert writer.status()["purged"] == 1 and writer.status()["failures"] == 0


def test_a_write_queued_for_a_purged_adapter_skips_its_namesake(tmp_path: Path):
    """Purged and created again under the same name before the old adapter's queued
    write ran: the new adapter's directory gets nothing of the old one."""
    adapter_dir = tmp_path / "adapters" / "team-a"
    old = _adapter(adapter_dir)
    purge_dir(adapter_dir)
    new = _adapter(adapter_dir)  # a new v0, maybe on the freed inode
    with pytest.raises(AdapterGone):
        _submit(old, 5).result(timeout=10)
    assert sorted(p.name for p in adapter_dir.glob("*v*")) == ["v0"]
    assert old.status()["purged"] == 1 and old.status()["failures"] == 0
    assert _submit(new, 1).result(timeout=10) == adapter_dir / "v1"


def test_a_write_whose_directory_changes_hands_mid_way_touches_no_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The owner check before the version goes into place: a directory made again for
    a new adapter between the write's first check and its end keeps its own v1."""
    from mace_sgl.trainer import checkpoints

    adapter_dir = tmp_path / "adapters" / "team-a"
    writer = _adapter(adapter_dir)
    assert _submit(writer, 1).result(timeout=10) == adapter_dir / "v1"
    theirs = (adapter_dir / "v1" / "mace.json").read_text()
    owners = iter([writer.owner])  # the first check passes, every later one sees another
    monkeypatch.setattr(checkpoints, "read_owner", lambda d: next(owners, "another"))
    with pytest.raises(AdapterGone):
        _submit(writer, 1).result(timeout=10)
    assert (adapter_dir / "v1" / "mace.json").read_text() == theirs


def test_a_purge_that_cannot_delete_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from mace_sgl.trainer import checkpoints

    adapter_dir = tmp_path / "adapters" / "team-a"
    _adapter(adapter_dir)

    def refuse(self, target):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "rename", refuse)
    monkeypatch.setattr(checkpoints.shutil, "rmtree", lambda *a, **kw: None)
    with pytest.raises(OSError, match="by hand"):
        purge_dir(adapter_dir)
    monkeypatch.undo()  # a rename refused, the deletion in place works: no error
    monkeypatch.setattr(Path, "rename", refuse)
    purge_dir(adapter_dir)
    assert not adapter_dir.exists()


def test_purge_clears_what_a_crashed_purge_left(tmp_path: Path):
    adapters = tmp_path / "adapters"
    left = adapters / ".team-b.purged-0123"
    (left / "v3").mkdir(parents=True)
    _adapter(adapters / "team-a")
    _adapter(adapters / "team-c")
    purge_dir(adapters / "team-a")
    purge_dir(adapters / "never-made")  # nothing there: no error
    assert [p.name for p in adapters.iterdir()] == ["team-c"]


def _tiny_config() -> dict:
    return {
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "num_hidden_layers": 1,
    }


def test_mismatched_rank_or_targets_is_a_clear_error(tmp_path: Path):
    write_zero_adapter(tmp_path / "v0", _tiny_config(), 8, 16, TARGETS)
    check_compatible(tmp_path, 8, 16, list(reversed(TARGETS)))  # same set: fine
    with pytest.raises(CheckpointMismatch, match="--mace-lora-rank 8") as err:
        check_compatible(tmp_path, 16, 32, TARGETS)
    assert "--mace-state-dir" in str(err.value)
    with pytest.raises(CheckpointMismatch, match="targets"):
        check_compatible(tmp_path, 8, 16, ["q_proj"])


def test_resume_refuses_a_checkpoint_of_another_shape(tiny_model_dir: Path, tmp_path: Path):
    model = lora_model(tiny_model_dir)  # rank 4
    dpo = SlicedDPO(model, beta=0.1, lr=1e-3)
    save(model, dpo, tmp_path, 1)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    other = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    with pytest.raises(CheckpointMismatch, match="shape"):
        resume(tmp_path, other, torch.optim.AdamW([torch.zeros(1, requires_grad=True)]))


def test_serve_refuses_a_state_dir_of_another_adapter_shape(tiny_model_dir: Path, tmp_path: Path):
    from mace_sgl import cli

    flags = ["--model-path", str(tiny_model_dir), "--mace-train", "--mace-state-dir", str(tmp_path)]
    cli.resolve_serve_args(flags)  # writes v0 at rank 16
    with pytest.raises(SystemExit, match="rank 16.*--mace-lora-rank 16"):
        cli.resolve_serve_args([*flags, "--mace-lora-rank", "8"])


def test_a_lease_generation_goes_only_into_the_directory_of_its_tenant(tmp_path: Path, monkeypatch):
    """A generation read for a tenant answered after a purge and a re-creation of its
    directory (the name created again) is not kept in the new directory: not when the new
    owner is there before the write, nor when the purge comes between the owner check
    and the write (the file lands in the directory the purge renamed away)."""
    from mace_sgl.trainer import checkpoints

    d = tmp_path / "t"
    d.mkdir()
    old = owner_id(d)
    assert checkpoints.keep_lease_generation(d, "e", 1, owner="someone-else") is None
    assert checkpoints.read_lease_generation(d) is None
    assert checkpoints.keep_lease_generation(d, "e", 1, owner=old) == ("e", 1)
    assert checkpoints.keep_lease_generation(d, "e", 2, owner=old) == ("e", 1)  # first stays

    d2 = tmp_path / "u"
    d2.mkdir()
    owner = owner_id(d2)
    read_at = checkpoints._read_at

    def purged_meanwhile(dir_fd: int, name: str) -> str | None:
        got = read_at(dir_fd, name)
        if name == checkpoints.OWNER_FILE:  # the purge and the new tenant's directory
            d2.rename(tmp_path / ".u.purged")
            d2.mkdir()
            owner_id(d2)
        return got

    monkeypatch.setattr(checkpoints, "_read_at", purged_meanwhile)
    assert checkpoints.keep_lease_generation(d2, "e", 4, owner=owner) == ("e", 4)
    assert checkpoints.read_lease_generation(d2) is None  # the new directory: nothing
    assert checkpoints.read_lease_generation(tmp_path / ".u.purged") == ("e", 4)

"""Adapter checkpoints on disk: written off the serving thread, resumed at start, checked.

A version `vN/` is a peft-format adapter (adapter_model.safetensors, adapter_config.json,
loadable by plain peft) plus `mace.json` (version, time, steps, loss) and `optimizer.pt`
(AdamW state, read back with torch.load(weights_only=True): tensors and numbers only), so
a restart resumes the adapter and its optimizer where the last published version left
them. A write that fails is counted and logged, never silent.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mace_sgl.trainer.publish import checkpoints

logger = logging.getLogger("mace_sgl.trainer")

OPTIMIZER_FILE = "optimizer.pt"


class AdapterGone(FileNotFoundError):
    """The adapter's directory is gone (retired with purge): nothing is written there."""


class CheckpointMismatch(ValueError):
    """The state dir holds checkpoints of another adapter shape than the flags ask for."""


def check_compatible(adapter_dir: Path, rank: int, alpha: int, targets: list[str]) -> None:
    """Raise CheckpointMismatch, with what to do, if any stored version (v0 included)
    was made with another rank, alpha or target modules than these."""
    for version, path in checkpoints(adapter_dir):
        cfg_file = path / "adapter_config.json"
        if not cfg_file.is_file():
            continue
        stored = json.loads(cfg_file.read_text())
        have = (
            int(stored.get("r", -1)),
            int(stored.get("lora_alpha", -1)),
            sorted(stored.get("target_modules") or []),
        )
        want = (rank, alpha, sorted(targets))
        if have != want:
            raise CheckpointMismatch(
                f"{path} (v{version}) was trained with rank {have[0]}, alpha {have[1]}, "
                f"targets {','.join(have[2])}; the flags ask for rank {want[0]}, alpha "
                f"{want[1]}, targets {','.join(want[2])}. Start with --mace-lora-rank "
                f"{have[0]} --mace-lora-alpha {have[1]} --mace-lora-targets "
                f"{','.join(have[2])} to resume it, or use another --mace-state-dir "
                f"(or --mace-adapter-name) for a new adapter."
            )


@dataclass(frozen=True)
class Resumed:
    """What resume() restored."""

    version: int
    path: Path | None
    optimizer: bool  # the optimizer state came back too


def resume(adapter_dir: Path, model: Any, optimizer: torch.optim.Optimizer) -> Resumed:
    """Load the newest checkpointed version (v1 and up) into the LoRA parameters and, when
    saved with it, the optimizer's state. `model`: a peft model, or its LoRA tensors by
    parameter name (a tenant's weights while another tenant is in the model)."""
    from safetensors.torch import load_file

    # v0 is the all-zero adapter that only reserves SGLang's slot: never resume it
    # (zero A and zero B would leave LoRA without any gradient).
    versions = [(n, d) for n, d in checkpoints(adapter_dir) if n > 0]
    if not versions:
        return Resumed(0, None, False)
    version, path = versions[-1]
    weights = load_file(str(path / "adapter_model.safetensors"))
    if isinstance(model, dict):
        params = model
    else:
        params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    missing = [n for n in params if n.replace(".default", "") not in weights]
    if missing:
        raise CheckpointMismatch(f"{path} lacks {len(missing)} LoRA tensors, e.g. {missing[0]}")
    with torch.no_grad():
        for name, p in params.items():
            src = weights[name.replace(".default", "")]
            if src.shape != p.shape:
                raise CheckpointMismatch(
                    f"{path}: {name} has shape {tuple(src.shape)}, the model {tuple(p.shape)}"
                )
            p.copy_(src)
    restored = False
    opt_file = path / OPTIMIZER_FILE
    if opt_file.is_file():
        try:
            optimizer.load_state_dict(torch.load(opt_file, weights_only=True))
            restored = True
        except Exception:  # an unreadable optimizer file costs momentum, not the adapter
            logger.exception("could not restore optimizer state from %s; starting it fresh", path)
    logger.info("resumed adapter from %s (optimizer state: %s)", path, restored)
    return Resumed(version, path, restored)


def write_checkpoint(
    adapter_dir: Path,
    version: int,
    weights: dict[str, torch.Tensor],
    config: dict[str, Any],
    meta: dict[str, Any],
    keep: int,
    optimizer_state: dict[str, Any] | None = None,
    owner: str | None = None,
) -> Path:
    """peft-format checkpoint of one version, written to a temp dir and renamed; prunes
    all but the newest `keep` versions (v0, the all-zero start, always stays).

    The adapter's directory must exist (it holds v0 from the adapter's creation): it is
    never created here, so a write that outlives a purge of its adapter (`purge_dir`,
    which first renames the directory away) raises AdapterGone instead of bringing the
    purged adapter's directory back. With `owner` (`owner_id` of the directory when
    its writer started), a directory made since under the same name (the adapter
    purged and created again) raises AdapterGone too, checked before the first file
    and again before the version is renamed into place."""
    from safetensors.torch import save_file

    out = adapter_dir / f"v{version}"
    tmp = adapter_dir / f".v{version}.tmp"

    def still_ours() -> None:
        if owner is not None and read_owner(adapter_dir) != owner:
            raise AdapterGone(f"{adapter_dir} is another adapter's now (purged, made again)")

    try:
        still_ours()
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crash in the middle of a write
        tmp.mkdir()
        save_file(weights, str(tmp / "adapter_model.safetensors"))
        config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
        (tmp / "adapter_config.json").write_text(json.dumps(config, default=str, indent=2) + "\n")
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
        (tmp / "mace.json").write_text(json.dumps(meta) + "\n")
        still_ours()  # before anything of the directory's own is touched
        if out.exists():
            shutil.rmtree(out)  # a version number reused after a crash lost its newer files
        tmp.rename(out)
    except FileNotFoundError as e:
        if adapter_dir.is_dir() and (owner is None or read_owner(adapter_dir) == owner):
            raise
        raise AdapterGone(f"{adapter_dir} is gone (the adapter was purged)") from e
    for old, path in checkpoints(adapter_dir)[:-keep]:
        if old != 0:
            shutil.rmtree(path, ignore_errors=True)
    return out


OWNER_FILE = ".owner"  # a random id per adapter directory (owner_id)


def read_owner(adapter_dir: Path) -> str | None:
    try:
        return (adapter_dir / OWNER_FILE).read_text()
    except FileNotFoundError:
        return None


def write_once(path: Path, text: str, dir_fd: int | None = None) -> bool:
    """Create `path` holding `text` atomically, unless it exists: the first writer's
    stays (a temporary file linked into place). Returns False for an error other than
    the file existing or its directory missing (logged), else True. With `dir_fd`,
    `path` is a name in that open directory (whatever is renamed meanwhile)."""
    tmp = path.parent / f"{path.name}.{uuid.uuid4().hex}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666, dir_fd=dir_fd)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        # fails if another writer was first
        os.link(tmp, path, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except (FileExistsError, FileNotFoundError):
        pass  # theirs stays (or the directory is gone)
    except OSError:
        logger.exception("could not write %s", path)
        return False
    finally:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:  # gone already, or a leftover that harms nothing
            pass
    return True


def _read_at(dir_fd: int, name: str) -> str | None:
    """The text of file `name` in the open directory `dir_fd`; None where it is not."""
    try:
        fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    with os.fdopen(fd) as f:
        return f.read()


def owner_id(adapter_dir: Path) -> str | None:
    """The random id of this adapter directory, made by the first writer that asks
    (atomically: every replica's writer gets the same); None without the directory. A
    directory made again after a purge gets a new one (an inode number or a time would
    not do: ext4 hands a freed inode out again at once). None too where it cannot be
    written: that writer then writes without the check."""
    for _ in range(3):
        got = read_owner(adapter_dir)
        if got is not None or not adapter_dir.is_dir():
            return got
        if not write_once(adapter_dir / OWNER_FILE, uuid.uuid4().hex):
            return None
    return read_owner(adapter_dir)


LEASE_FILE = ".lease-generation"  # "EPOCH GENERATION": trainer/lease.py's key generation


def read_lease_generation(adapter_dir: Path) -> tuple[str, int] | None:
    """The (store epoch, generation) this adapter directory's tenant steps under across
    servers (trainer/lease.py), kept at its creation; None where none was kept."""
    try:
        return _lease_generation((adapter_dir / LEASE_FILE).read_text())
    except OSError:
        return None


def _lease_generation(text: str | None) -> tuple[str, int] | None:
    try:
        epoch, generation = (text or "").split()
        return epoch, int(generation)
    except ValueError:
        return None


def keep_lease_generation(
    adapter_dir: Path, epoch: str, generation: int, owner: str | None = None
) -> tuple[str, int] | None:
    """Keep (epoch, generation) in the directory, once: the first writer's stays (every
    replica reads the same); nothing where the directory is gone (purged). With `owner`
    (the directory's `owner_id` when its tenant was created), nothing either where the
    directory is another one now (purged, made again for a tenant created again under
    the name: a slow store answer for the old tenant must not fix the new one's): the
    owner is read and the file written through one handle on the directory, so a purge
    in between leaves it in the directory it renamed away. Returns what the directory
    holds afterwards (None: nothing)."""
    try:
        fd = os.open(adapter_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # gone (purged)
        return None
    try:
        if owner is not None and _read_at(fd, OWNER_FILE) != owner:
            return None
        write_once(Path(LEASE_FILE), f"{epoch} {generation}", dir_fd=fd)
        return _lease_generation(_read_at(fd, LEASE_FILE))
    finally:
        os.close(fd)


def purge_dir(adapter_dir: Path) -> None:
    """Delete a retired adapter's checkpoints (DELETE /mace/adapters/NAME?purge=true).
    The directory is first renamed away in one step, so a checkpoint writer that still
    holds a version of it, and never creates the directory, cannot write into it or
    bring it back while it is deleted; a leftover of a purge a crash cut short goes
    too (no adapter name starts with a dot)."""
    doomed = adapter_dir.with_name(f".{adapter_dir.name}.purged-{uuid.uuid4().hex}")
    try:
        adapter_dir.rename(doomed)
    except FileNotFoundError:
        pass  # nothing kept (or purged already)
    except OSError:
        logger.exception("could not move %s away to purge it; deleting it in place", adapter_dir)
        shutil.rmtree(adapter_dir, ignore_errors=True)
        if adapter_dir.exists():
            raise OSError(f"could not purge {adapter_dir}: delete it by hand") from None
    for d in adapter_dir.parent.glob(".*.purged-*"):
        shutil.rmtree(d, ignore_errors=True)


class CheckpointWriter:
    """Writes one adapter's checkpoints in order on a background thread (its own, or
    one shared with other adapters' writers); failures are counted,
    logged and kept as `last_error` (each version is a whole checkpoint, so the next
    successful write restores what a restart resumes).

    Bounded: one write runs and at most one waits. A newer version replaces the waiting
    one (`superseded`), so a slow disk costs intermediate versions on disk, never an
    unbounded queue of weight and optimizer copies in memory. A write whose adapter was
    purged meanwhile (its directory gone, or made again for a new adapter of that name)
    is dropped (`purged`, with a warning), not a failure."""

    def __init__(
        self,
        adapter_dir: Path,
        keep: int,
        write: Callable[..., Path] = write_checkpoint,
        pool: ThreadPoolExecutor | None = None,
    ):
        self.adapter_dir = adapter_dir
        self.keep = keep
        self._write = write
        # The directory this writer's adapter owns: a purge and a new adapter of the same
        # name make another one, which a write still queued for the old one must not touch.
        self.owner = owner_id(adapter_dir)
        # Tenants share one writer thread (pool): a thread per tenant would outlive its
        # tenant's retirement, and each thread's own malloc arena holds its freed
        # serialisation buffers, tens of MB of RSS per tenant.
        self._pool = pool or ThreadPoolExecutor(1, thread_name_prefix="mace-ckpt")
        self._lock = threading.Lock()
        self._waiting: tuple[int, tuple[Any, ...], Future] | None = None
        self.written = 0
        self.failures = 0
        self.superseded = 0
        self.purged = 0
        self.last_error: str | None = None
        self.last_written: int | None = None

    def submit(
        self,
        version: int,
        weights: dict[str, torch.Tensor],
        config: dict[str, Any],
        meta: dict[str, Any],
        optimizer_state: dict[str, Any] | None,
    ) -> Future:
        """Queue the write of `version` (the tensors must not change afterwards). The
        future ends when it is written, fails, or is superseded (result None)."""
        future: Future = Future()
        args = (self.adapter_dir, version, weights, config, meta, self.keep, optimizer_state,
                self.owner)  # fmt: skip
        with self._lock:
            dropped, self._waiting = self._waiting, (version, args, future)
            if dropped is not None:
                self.superseded += 1
        if dropped is not None:
            dropped[2].set_result(None)
        else:  # nothing waited, so no drain is due to take this one: start one
            self._pool.submit(self._drain)
        return future

    def _drain(self) -> None:
        with self._lock:
            job, self._waiting = self._waiting, None
        if job is None:  # taken by an earlier drain
            return
        version, args, future = job
        try:
            future.set_result(self._write(*args))
        except BaseException as e:  # counted and logged by _done
            future.set_exception(e)
        self._done(version, future)

    def _done(self, version: int, future: Future) -> None:
        error = future.exception()
        with self._lock:
            if error is None:
                self.written += 1
                self.last_written = version
                return
            if isinstance(error, AdapterGone):
                # Purged: the trainer lets the tenant go within a poll. (A live tenant's
                # directory removed by hand lands here too: hence a warning.)
                self.purged += 1
                logger.warning("checkpoint of v%d not written: %s", version, error)
                return
            self.failures += 1
            self.last_error = f"v{version}: {type(error).__name__}: {error}"
        logger.error(
            "checkpoint of v%d under %s failed: %s",
            version,
            self.adapter_dir,
            error,
            exc_info=(type(error), error, error.__traceback__),
        )

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "written": self.written,
                "failures": self.failures,
                "last_error": self.last_error,
                "last_written_version": self.last_written,
                "superseded": self.superseded,
                "purged": self.purged,
            }

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait for queued writes (tests, shutdown)."""
        self._pool.submit(lambda: None).result(timeout=timeout_s)

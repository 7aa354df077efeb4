"""Messages between trainer (scheduler process) and sidecar: msgspec structs, msgpack on
the wire, decoded into exactly these types (never pickle).

Each sidecar process has an id, fresh at every start. A trainer takes Work only from the
sidecar it last heard a Control from, and says so in every Ready; a sidecar sends Work
only on a Ready that names it. So after a sidecar restart, Work of the dead one still in
transit is dropped, and the first Ready naming the new one lists every sample the trainer
will ever train from earlier Work (`held`): the others in flight can safely be requeued.
"""

from __future__ import annotations

import msgspec


class Sample(msgspec.Struct, frozen=True):
    """One stored preference pair, as the sidecar hands it to the trainer."""

    id: int
    prompt: str | list[dict[str, str]]
    chosen: str
    rejected: str
    weight: float
    loss: float | None = None  # its last DPO loss, if it trained before (priorities)
    adapter: str = "live"  # the tenant whose feedback it is (its LoRA trains on it)
    trained: int = 0  # its store train_count: steps reported for it, kept or rolled back


class Hello(msgspec.Struct, tag=True, frozen=True):
    """Trainer -> sidecar when a trainer session starts (a new scheduler process)."""

    session: str
    adapter: str
    dp_rank: int = 0  # the data-parallel replica whose scheduler the trainer lives in


class Ready(msgspec.Struct, tag=True, frozen=True):
    """Trainer -> sidecar: send up to `want` samples (0: only a heartbeat, sent every few
    seconds even while paused, so that a restarted sidecar learns of the session)."""

    session: str
    want: int
    # Ids of the samples the trainer holds (queued, in the step in progress, or in
    # finished steps not reported yet: held back for a publish, or reaching the peers).
    held: list[int] = msgspec.field(default_factory=list)
    # The sidecar whose Work the trainer accepts ("" before any Control reached it).
    sidecar: str = ""
    dp_rank: int = 0
    # The fraction of the last seconds its replica did not serve (plugin/iteration.py
    # recent_idle): with several replicas the sidecar leases training to the one with
    # the most room among those asking.
    room: float = 0.0


class Result(msgspec.Struct, tag=True, frozen=True):
    """Trainer -> sidecar: a sample took part in a finished optimizer step."""

    session: str
    sample_id: int
    loss: float
    version: int
    adapter: str = ""  # the tenant it trained (whose version `version` is)


class Release(msgspec.Struct, tag=True, frozen=True):
    """Trainer -> sidecar: samples the trainer held and gives back untrained (it holds
    fewer pairs ahead now that its steps are slower, or newer ones supersede them: Newer):
    the store queues them again with their train count unchanged."""

    session: str
    sample_ids: list[int]


class Work(msgspec.Struct, tag=True, frozen=True):
    """Sidecar -> trainer: samples to train, in priority order."""

    session: str
    samples: list[Sample]
    sidecar: str = ""  # the id of the sidecar process that picked them
    # Every tenant's weight in the store when they were picked: the trainer's fair share
    # over the pairs it holds uses the same weights as the sidecar's.
    weights: dict[str, float] = msgspec.field(default_factory=dict)
    # With several replicas: the newest version of each tenant that a Result reported.
    # A trainer steps a tenant only once its own copy is at least that version (it came
    # from another replica's step, over trainer/replicas.py), so no step starts from an
    # older adapter than the last one published anywhere.
    versions: dict[str, int] = msgspec.field(default_factory=dict)


class Control(msgspec.Struct, tag=True, frozen=True):
    """Sidecar -> trainer: pause or resume training; also how a trainer learns the id of
    the sidecar process it now talks to."""

    paused: bool
    session: str = ""  # the trainer session it is meant for ("": any)
    sidecar: str = ""


class Newer(msgspec.Struct, tag=True, frozen=True):
    """Sidecar -> trainer, with --mace-pick-order newest only: never-trained pairs that
    wait in the store (in flight for nobody) and that a step should take before pairs
    the trainer's Ready listed as held: newer than its never-trained ones, or any where
    it holds a replay (store.newer_untrained). Per tenant their ids, newest first, at
    most as many as it held of that tenant. The trainer gives back the queued pairs
    they supersede (runtime.py _give_back_superseded) and asks for samples again: the
    store hands out the newest first."""

    session: str
    sidecar: str
    ids: dict[str, list[int]]


ToSidecar = Hello | Ready | Result | Release
ToTrainer = Work | Control | Newer

_encoder = msgspec.msgpack.Encoder()
_to_sidecar = msgspec.msgpack.Decoder(ToSidecar)
_to_trainer = msgspec.msgpack.Decoder(ToTrainer)


def encode(msg: msgspec.Struct) -> bytes:
    """msgpack bytes of a message."""
    return _encoder.encode(msg)


def decode_to_sidecar(data: bytes) -> ToSidecar:
    """A trainer->sidecar message; raises msgspec.DecodeError on bytes that are not msgpack
    and msgspec.ValidationError (a subclass) on any other message."""
    return _to_sidecar.decode(data)


def decode_to_trainer(data: bytes) -> ToTrainer:
    """A sidecar->trainer message; raises msgspec.DecodeError on bytes that are not msgpack
    and msgspec.ValidationError (a subclass) on any other message."""
    return _to_trainer.decode(data)

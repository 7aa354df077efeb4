"""Messages between trainer (scheduler process) and sidecar: msgspec structs, msgpack on
the wire, decoded into exactly these types (never pickle)."""

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


class Hello(msgspec.Struct, tag=True, frozen=True):
    """Trainer -> sidecar when a trainer session starts (a new scheduler process)."""

    session: str
    adapter: str


class Ready(msgspec.Struct, tag=True, frozen=True):
    """Trainer -> sidecar: send up to `want` samples."""

    session: str
    want: int


class Result(msgspec.Struct, tag=True, frozen=True):
    """Trainer -> sidecar: a sample took part in a finished optimizer step."""

    session: str
    sample_id: int
    loss: float
    version: int


class Work(msgspec.Struct, tag=True, frozen=True):
    """Sidecar -> trainer: samples to train, in priority order."""

    session: str
    samples: list[Sample]


class Control(msgspec.Struct, tag=True, frozen=True):
    """Sidecar -> trainer: pause or resume training."""

    paused: bool


ToSidecar = Hello | Ready | Result
ToTrainer = Work | Control

_encoder = msgspec.msgpack.Encoder()
_to_sidecar = msgspec.msgpack.Decoder(ToSidecar)
_to_trainer = msgspec.msgpack.Decoder(ToTrainer)


def encode(msg: msgspec.Struct) -> bytes:
    """msgpack bytes of a message."""
    return _encoder.encode(msg)


def decode_to_sidecar(data: bytes) -> Hello | Ready | Result:
    """A trainer->sidecar message; raises msgspec.ValidationError on anything else."""
    return _to_sidecar.decode(data)


def decode_to_trainer(data: bytes) -> Work | Control:
    """A sidecar->trainer message; raises msgspec.ValidationError on anything else."""
    return _to_trainer.decode(data)

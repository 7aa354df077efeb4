"""Trainer <-> sidecar protocol: typed msgpack round trips and owner-only ipc sockets."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import msgspec
import pytest
import zmq

from mace_sgl.ipc import channels
from mace_sgl.ipc.messages import (
    Control,
    Hello,
    Ready,
    Result,
    Sample,
    Work,
    decode_to_sidecar,
    decode_to_trainer,
    encode,
)


def test_messages_round_trip_as_their_own_types():
    chat = [{"role": "user", "content": "hi"}]
    for msg in [Hello("s", "live"), Ready("s", 2, [4, 5], "x"), Result("s", 7, 0.25, 3)]:
        assert decode_to_sidecar(encode(msg)) == msg
    work = Work("s", [Sample(1, "p", "a", "b", 1.0), Sample(2, chat, "a", "b", 2.0)], "x")
    for msg in [work, Control(paused=True, session="s", sidecar="x")]:
        assert decode_to_trainer(encode(msg)) == msg


def test_messages_of_the_earlier_protocol_still_decode():
    class OldReady(msgspec.Struct, tag="Ready"):
        session: str
        want: int

    class OldControl(msgspec.Struct, tag="Control"):
        paused: bool

    assert decode_to_sidecar(encode(OldReady("s", 2))) == Ready("s", 2, held=[], sidecar="")
    assert decode_to_trainer(encode(OldControl(True))) == Control(True, session="", sidecar="")


def test_wrong_or_foreign_payloads_are_refused():
    with pytest.raises(msgspec.ValidationError):
        decode_to_trainer(encode(Ready("s", 1)))  # a sidecar-bound message
    with pytest.raises(msgspec.DecodeError):
        decode_to_sidecar(b"\x80\x04\x95")  # a pickle header is not msgpack we accept


def test_sockets_are_owner_only_and_carry_messages(tmp_path: Path):
    ctx = zmq.Context()
    run = tmp_path / "run"
    push_t, pull_s = channels.bind_sidecar(ctx, run)
    push_s, pull_t = channels.connect_trainer(ctx, run)
    try:
        assert stat.S_IMODE(os.stat(run).st_mode) == 0o700
        for name in (channels.TO_TRAINER, channels.TO_SIDECAR):
            assert stat.S_IMODE(os.stat(run / name).st_mode) == 0o600
        push_s.send(encode(Hello("s", "live")))
        assert pull_s.poll(5000)
        assert decode_to_sidecar(pull_s.recv()) == Hello("s", "live")
        push_t.send(encode(Control(paused=False)))
        assert pull_t.poll(5000)
        assert decode_to_trainer(pull_t.recv()) == Control(paused=False)
    finally:
        for s in (push_t, pull_s, push_s, pull_t):
            s.close(linger=0)
        ctx.term()

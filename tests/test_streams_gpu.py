"""The trainer's CUDA paths: slices on the training stream, their device timing, forward
timing on the forward stream, and the publish point.

Marked gpu: skipped where CUDA is missing. Never run on the machines this was written on
(no GPU, no device lent): treat a first run as the first test of these paths. The same
rules are checked with stand-in streams on CPU in tests/test_streams.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def cuda_streams():
    from mace_sgl.trainer.streams import DeviceStreams

    forward = torch.cuda.Stream()
    return DeviceStreams(
        forward_of=lambda: forward,
        training=torch.cuda.Stream(),
        stream_context=torch.cuda.stream,
        current=torch.cuda.current_stream,
    )


def test_forward_timing_matches_an_event_reference_on_the_forward_stream():
    streams = cuda_streams()
    a = torch.randn(4096, 4096, device="cuda")
    ref_start, ref_end = (torch.cuda.Event(enable_timing=True) for _ in range(2))

    def work():
        # As SGLang's run_batch under overlap: the forward switches to the forward
        # stream itself, the caller's (schedule) stream stays current outside.
        with torch.cuda.stream(streams.forward):
            ref_start.record()
            for _ in range(20):
                a @ a
            ref_end.record()

    for _ in range(3):  # warm-up
        work()
    torch.cuda.synchronize()
    assert torch.cuda.current_stream() != streams.forward
    streams.time_forward(work, "obs")
    torch.cuda.synchronize()
    [(payload, seconds)] = streams.drain_forwards()
    reference = ref_start.elapsed_time(ref_end) / 1000  # the same run, inside the forward
    assert payload == "obs"
    assert seconds == pytest.approx(reference, rel=0.25)


def test_sliced_step_on_the_training_stream_equals_cpu_and_is_timed_on_device(
    tiny_model_dir: Path,
):
    from test_sliced_dpo import PAIRS, lora_model

    from mace_sgl.trainer.jobs import JobBoard, QueuedPair
    from mace_sgl.trainer.sliced import SlicedDPO, run_to_end

    torch.backends.cuda.matmul.allow_tf32 = False
    cpu = SlicedDPO(lora_model(tiny_model_dir), beta=0.1, lr=1e-3)
    expected = run_to_end(cpu.step_slices(PAIRS, None))

    streams = cuda_streams()
    dpo = SlicedDPO(lora_model(tiny_model_dir).cuda(), beta=0.1, lr=1e-3)
    board = JobBoard(streams)
    queued = [QueuedPair(p, 0.0, None, "live") for p in PAIRS]
    job = board.start_step(dpo.step_slices(PAIRS, None), queued)
    storage = {p.untyped_storage().data_ptr() for p in dpo.model.parameters()}
    slices = 0
    while True:
        ran = board.run(job.key, storage)
        slices += 1
        assert ran.on_device and ran.error is None
        if ran.finished:
            result = ran.value
            break
    torch.cuda.synchronize()
    spans = board.drain_device()
    assert len(spans) == slices
    assert all(0 < seconds < 60 for _, seconds, _, _ in spans)
    assert result.ok
    assert result.losses == pytest.approx(expected.losses, rel=1e-3)
    for (name, p), (_, q) in zip(
        cpu.model.named_parameters(), dpo.model.named_parameters(), strict=True
    ):
        if p.requires_grad:
            torch.testing.assert_close(q.detach().cpu(), p.detach(), rtol=1e-3, atol=1e-5, msg=name)


def test_publish_point_orders_the_slot_copy_between_forwards_without_a_host_sync():
    streams = cuda_streams()
    slot = torch.zeros(1024, 1024, device="cuda")
    torch.cuda.synchronize()
    with streams.training_work():
        torch.cuda._sleep(2_000_000_000)  # a long training slice still running
        new = torch.full((1024, 1024), 3.0, device="cuda")  # written on the training stream
        with streams.publish_point():
            slot.copy_(new, non_blocking=True)
    with torch.cuda.stream(streams.forward):
        seen = slot.sum()  # a forward queued after the publish
    # The host did not wait: the forward stream is still behind the training slice.
    assert not streams.forward.query()
    streams.forward.synchronize()
    assert seen.item() == 3.0 * 1024 * 1024

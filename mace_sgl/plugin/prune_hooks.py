"""SGLang glue of KV pruning (registered in plugin/__init__): backend name and prune step."""

from __future__ import annotations

from typing import Any

from mace_sgl.plugin import state

NAME = "mace_prune"


def install_backend() -> None:
    """Add `mace_prune` to SGLang's attention registry and --attention-backend choices.

    Every process needs it: the launcher validates the flag, the scheduler builds the
    backend. The factory imports the backend module only when SGLang builds it.
    """
    from sglang.srt.arg_groups.choices import (
        ATTENTION_BACKEND_CHOICES,
        add_attention_backend_choices,
    )
    from sglang.srt.layers.attention.attention_registry import register_attention_backend

    if NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([NAME])
    register_attention_backend(NAME)(create_backend)


def create_backend(model_runner: Any) -> Any:
    """The registered factory: see mace_sgl/prune/backend.py."""
    from mace_sgl.prune.backend import create_backend as create

    return create(model_runner)


def prune_decode_batch(result: Any, batch: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER ScheduleBatch.prepare_for_decode: the next slot is allocated and no forward
    is in flight; rows over budget (counting the token about to be decoded) are compacted
    before ForwardBatch reads seq_lens. A no-op unless this scheduler built mace_prune.

    A batch does not know its scheduler; its req_to_token pool (one per scheduler) carries
    the scheduler's state (plugin/state.py attach)."""
    st = state.of(batch.req_to_token_pool)
    if st is not None and st.pruner is not None and batch.spec_algorithm.is_none():
        st.pruner.prune_batch(batch)

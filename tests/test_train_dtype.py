"""--mace-train-dtype: when the trainer keeps a float32 copy of the base weights."""

from __future__ import annotations

import pytest
import torch

from mace_sgl.trainer.shared import cpu_native_bf16, trainer_dtype

AVX2 = "flags : fpu sse2 avx avx2 fma"
ZEN4 = "flags : fpu sse2 avx avx2 fma avx512f avx512_bf16"
SPR = "flags : fpu avx2 avx512f amx_tile amx_bf16"
ARM = "Features : fp asimd sve bf16 i8mm"


def test_native_bf16_is_read_from_the_cpu_flags():
    assert not cpu_native_bf16(AVX2)
    assert cpu_native_bf16(ZEN4) and cpu_native_bf16(SPR) and cpu_native_bf16(ARM)
    assert not cpu_native_bf16("flags : avx512f avx512bw")  # AVX512 without its bf16 part


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_auto_copies_to_float32_only_on_a_cpu_without_native_bf16(monkeypatch, dtype):
    w = torch.zeros(2, dtype=dtype)
    monkeypatch.setattr("mace_sgl.trainer.shared.cpu_native_bf16", lambda: False)
    assert trainer_dtype("auto", w) == torch.float32
    assert trainer_dtype("model", w) is None
    monkeypatch.setattr("mace_sgl.trainer.shared.cpu_native_bf16", lambda: True)
    assert trainer_dtype("auto", w) is None
    assert trainer_dtype("float32", w) == torch.float32
    assert trainer_dtype("float32", torch.zeros(2)) is None  # already float32: shared


def test_a_float32_copy_keeps_the_tied_head_one_tensor(tiny_model_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    from mace_sgl.trainer.shared import build_shared_llama, shares_storage

    class Fused(torch.nn.Module):
        """SGLang's layout (fused qkv and gate_up) over an HF model's weights."""

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    config = AutoConfig.from_pretrained(tiny_model_dir)
    sg = Fused()
    sg.model = Fused()
    sg.model.embed_tokens = hf.model.embed_tokens
    sg.model.norm = hf.model.norm
    sg.lm_head = hf.lm_head
    layers = []
    for layer in hf.model.layers:
        a, m = layer.self_attn, layer.mlp
        fused = Fused()
        fused.self_attn, fused.mlp = Fused(), Fused()
        fused.self_attn.qkv_proj = torch.nn.Linear(1, 1)
        fused.self_attn.qkv_proj.weight = torch.nn.Parameter(
            torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
        )
        fused.self_attn.o_proj = a.o_proj
        fused.mlp.gate_up_proj = torch.nn.Linear(1, 1)
        fused.mlp.gate_up_proj.weight = torch.nn.Parameter(
            torch.cat([m.gate_proj.weight, m.up_proj.weight])
        )
        fused.mlp.down_proj = m.down_proj
        fused.input_layernorm = layer.input_layernorm
        fused.post_attention_layernorm = layer.post_attention_layernorm
        layers.append(fused)
    sg.model.layers = torch.nn.ModuleList(layers)

    shared = build_shared_llama(sg, config)
    assert shares_storage(shared, sg)
    copy = build_shared_llama(sg, AutoConfig.from_pretrained(tiny_model_dir), torch.float32)
    assert not shares_storage(copy, sg)
    assert copy.lm_head.weight.dtype == torch.float32
    tied = hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    same = copy.lm_head.weight.data_ptr() == copy.model.embed_tokens.weight.data_ptr()
    assert same == tied
    ids = torch.tensor([[5, 17, 33, 41, 60]])
    with torch.no_grad():
        exact = hf.float()(input_ids=ids).logits  # bf16 -> float32 is exact
        got = copy(input_ids=ids).logits
    torch.testing.assert_close(got, exact)

"""A differentiable HF Llama that shares SGLang's loaded base weights (no second copy).

SGLang fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj`; the HF modules get
row-slice views of those tensors, loaded with `assign=True`, so every base parameter of
the HF model is storage that SGLang already holds. Only LoRA parameters, optimizer state
and activations are new memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _weight(module: Any) -> torch.Tensor:
    # With --enable-lora SGLang wraps linear layers; the base weight sits one level down.
    return getattr(module, "base_layer", module).weight


def shared_state_dict(sglang_model: Any, config: Any) -> dict[str, torch.Tensor]:
    """HF parameter names -> views of SGLang's tensors (tensor parallel size 1)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    inter = config.intermediate_size
    inner = sglang_model.model
    vocab = config.vocab_size  # SGLang pads the vocabulary rows; the padding is unused
    state = {
        "model.embed_tokens.weight": _weight(inner.embed_tokens)[:vocab],
        "model.norm.weight": inner.norm.weight,
        "lm_head.weight": _weight(sglang_model.lm_head)[:vocab],
    }
    for i, layer in enumerate(inner.layers):
        p = f"model.layers.{i}."
        qkv = _weight(layer.self_attn.qkv_proj)
        gate_up = _weight(layer.mlp.gate_up_proj)
        if qkv.shape[0] != q + 2 * kv or gate_up.shape[0] != 2 * inter:
            raise ValueError(
                f"layer {i}: fused shapes {tuple(qkv.shape)}, {tuple(gate_up.shape)} do not "
                "match the config; tensor parallel size > 1 is not supported by the trainer"
            )
        state |= {
            p + "self_attn.q_proj.weight": qkv[:q],
            p + "self_attn.k_proj.weight": qkv[q : q + kv],
            p + "self_attn.v_proj.weight": qkv[q + kv :],
            p + "self_attn.o_proj.weight": _weight(layer.self_attn.o_proj),
            p + "mlp.gate_proj.weight": gate_up[:inter],
            p + "mlp.up_proj.weight": gate_up[inter:],
            p + "mlp.down_proj.weight": _weight(layer.mlp.down_proj),
            p + "input_layernorm.weight": layer.input_layernorm.weight,
            p + "post_attention_layernorm.weight": layer.post_attention_layernorm.weight,
        }
    return state


def cpu_native_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU does bf16 math natively: AVX512-BF16 or AMX on x86, the BF16
    extension on Arm. Without it torch runs bf16 matmuls several times slower than
    float32 (measured on an AVX2 EPYC, one thread, a 75x576 @ 576x1536 matmul: 16.4 ms
    in bf16, 2.1 ms in float32). Unknown (no /proc/cpuinfo): True, nothing changes."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return True
    return bool(set(cpuinfo.split()) & {"avx512_bf16", "amx_bf16", "bf16"})


def trainer_dtype(choice: str, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype of the trainer's own copy of the base weights (--mace-train-dtype), or
    None to share SGLang's tensors. `weight`: one of SGLang's base weights."""
    if choice == "model" or weight.dtype == torch.float32:
        return None
    if choice == "float32":
        return torch.float32
    half = weight.dtype in (torch.bfloat16, torch.float16)
    if weight.device.type == "cpu" and half and not cpu_native_bf16():
        return torch.float32
    return None


def build_shared_llama(sglang_model: Any, config: Any, dtype: torch.dtype | None = None) -> Any:
    """An HF LlamaForCausalLM whose base parameters are SGLang's own tensors, or (with
    `dtype`) copies of them in that dtype; a tensor that two names share (the tied
    embedding and LM head) stays one copy."""
    from transformers import LlamaForCausalLM

    config._attn_implementation = "sdpa"  # causal without a mask when none is passed
    state = shared_state_dict(sglang_model, config)
    if dtype is not None:
        copies: dict[tuple, torch.Tensor] = {}
        for name, t in state.items():
            key = (t.data_ptr(), tuple(t.shape), t.stride())
            if key not in copies:
                copies[key] = t.detach().to(dtype, copy=True)
            state[name] = copies[key]
    device = state["model.embed_tokens.weight"].device
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(state, assign=True, strict=True)
    # Non-persistent buffers are not in the state dict: rebuild the rotary table for real.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def shares_storage(model: Any, sglang_model: Any) -> bool:
    """True when every base parameter of `model` lies inside a tensor of `sglang_model`."""
    spans = []
    for t in sglang_model.parameters():
        start = t.untyped_storage().data_ptr()
        spans.append((start, start + t.untyped_storage().nbytes()))
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        ptr = p.data_ptr()
        if not any(a <= ptr < b for a, b in spans):
            return False
    return True


def attach_lora(model: Any, rank: int, alpha: int, targets: list[str]) -> Any:
    """Wrap with a peft LoRA adapter (fp32 adapter weights on the shared base)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0)
    peft_model = get_peft_model(model, cfg, autocast_adapter_dtype=True)
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    return peft_model

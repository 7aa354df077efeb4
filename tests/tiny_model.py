"""Builds a tiny random Llama with a locally trained byte-level BPE tokenizer (no hub)."""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Large language models answer questions, write code and summarise text.",
    "Preference feedback says which of two answers a user liked better.",
    "A scheduler batches prefill, decode and fine-tuning work on one device.",
    "Once upon a time there was a small model that learned while it served.",
    "0 1 2 3 4 5 6 7 8 9 + - * / = ( ) [ ] { } < > ! ? , . ; : ' \" # @ $ % & _",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def build_tiny_llama(out: Path, seed: int = 0, vocab_size: int = 512) -> Path:
    """Write config, weights (float32) and tokenizer of a 2-layer Llama into out."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.model_max_length = 2048
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    # Random init at std 0.02 gives near-uniform logits; a wider init makes greedy
    # decoding decisive, so token-for-token comparisons test the engine, not ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.25)
    model.save_pretrained(out, safe_serialization=True)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["torch_dtype"] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def tiny_serve_args(model_dir: Path, *extra: str) -> list[str]:
    """`mace-sgl serve` flags for the tiny model (float32, quiet), then `extra`.

    The publish guard's content checks are off (`--mace-guard-min-keep 0`,
    `--mace-guard-open-keep 0`): the random model's canary answers are strings of random
    tokens, whose "content words" any step changes (in a first run it refused 523 of 539
    versions). Its empty, loop and KL checks stay on; tests/test_guard.py tests the
    content checks themselves."""
    return ["--model-path", str(model_dir), "--dtype", "float32", "--log-level", "warning",
            "--mace-guard-min-keep", "0", "--mace-guard-open-keep", "0", *extra]  # fmt: skip

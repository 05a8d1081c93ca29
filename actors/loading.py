"""Loading a model for tandem's runner: the transformers causal LM (converted by
actors/runner.py ModelRunner), its tokenizer, its end-of-sequence ids, and the dtype names."""

from __future__ import annotations

import torch

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_causal_lm(model_path: str, dtype: torch.dtype):
    """Load a transformers causal LM (local folder or hub id) for conversion by ModelRunner."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ValueError(f"model: cannot load {model_path!r}: {exc}") from exc


def generation_eos_ids(model_path: str) -> list[int]:
    """End-of-sequence ids from a model's generation config and tokenizer config."""
    ids: set[int] = set()
    try:
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        ids.update([eos] if isinstance(eos, int) else list(eos or []))
    except (OSError, ValueError):
        pass
    try:
        tok = load_tokenizer(model_path)
        if tok.eos_token_id is not None:
            ids.add(int(tok.eos_token_id))
    except ValueError:
        pass
    return sorted(ids)


def load_tokenizer(model_path: str):
    """The model's tokenizer. A folder whose tokenizer_config.json names the generic fast
    class gets exactly that (AutoTokenizer would otherwise pick the class of the model
    family from config.json and replace the saved decoder)."""
    import json
    from pathlib import Path

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        declared = None
        cfg_file = Path(model_path) / "tokenizer_config.json"
        if cfg_file.is_file():
            declared = json.loads(cfg_file.read_text()).get("tokenizer_class")
        if declared in ("PreTrainedTokenizerFast", "TokenizersBackend"):
            return PreTrainedTokenizerFast.from_pretrained(model_path)
        return AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"model: cannot load a tokenizer from {model_path!r}: {exc}") from exc

"""Build model runners and tokenizers from user-facing model references (pack names, local
folders, hub ids). The composition root: actors/ receives paths and options only."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

from tandem.actors.loading import load_causal_lm, load_tokenizer, parse_dtype
from tandem.actors.runner import ModelRunner
from tandem.deploy.packs import DEFAULT_DRAFT, DEFAULT_TARGET, DRAFT_QUANTIZE_DEFAULT, resolve_model_path


@dataclass(frozen=True)
class ModelSpec:
    """What to load for one model."""

    ref: str  # pack name, local folder or hub id
    dtype: str = "bfloat16"
    device: str = "auto"  # actors/devices.py
    quantize: str | None = None  # None | "int8" | "int4" | "pack" (deploy/pack_grid.target_quantize)
    exits: tuple[int, ...] = ()
    head_ids: tuple[int, ...] | None = None
    exit_adapters: str | None = None  # folder from `tandem train-exits`, or "auto"


def trained_exits_for(ref: str, setting: str | None) -> str | None:
    """The exit-adapter folder to use: "auto" finds `tandem train-exits` output in the
    default place ($TANDEM_CACHE/exits/<draft>), "none"/None uses none, else a path."""
    if setting in (None, "", "none"):
        return None
    if setting == "auto":
        from tandem.deploy.exits import find_trained_exits

        found = find_trained_exits(ref)
        return str(found) if found else None
    return str(setting)


def sorted_thresholds(args, exits: tuple[int, ...]) -> tuple[float, ...]:
    """--thresholds, else the trained exits' calibration (emit early only where the exit
    agrees with the full draft at least 90% of the time), else 0.8 each."""
    if args.thresholds:
        return tuple(float(t) for t in args.thresholds.split(","))
    return default_thresholds(trained_exits_for(args.draft, args.exit_adapters), exits)


def default_thresholds(adapters: str | None, exits: tuple[int, ...]) -> tuple[float, ...]:
    """The S2D thresholds every entry point uses unless told otherwise: the trained exits'
    calibration (emit early only where the exit agrees with the full draft at least 90% of
    the time) when the adapters folder has one, else 0.8 per exit below the deepest."""
    if adapters:
        from tandem.actors.exit_adapters import read_manifest, suggest_thresholds

        calib = read_manifest(adapters).get("training", {}).get("calibration")
        if calib:
            return suggest_thresholds(calib, exits, min_agree=0.9)
    return (0.8,) * (len(exits) - 1)


def build_runner(spec: ModelSpec, *, model=None) -> ModelRunner:
    """Resolve and load one model into a ModelRunner (trained exits included)."""
    from tandem.actors.workers import ModelLoad

    parse_dtype(spec.dtype)  # clear error before any loading
    from tandem.deploy.pack_grid import resolver_for

    resolve = resolver_for(resolve_model_path, spec.quantize)
    load = ModelLoad(
        path=resolve(spec.ref),
        dtype=spec.dtype,
        device=spec.device,
        quantize=spec.quantize,
        exits=tuple(spec.exits),
        head_ids=spec.head_ids,
        exit_adapters=trained_exits_for(spec.ref, spec.exit_adapters),
    )
    return load.build(model=model)


@functools.lru_cache(maxsize=8)
def tokenizer_for(ref: str):
    return load_tokenizer(resolve_model_path(ref))


def stop_ids_for(tokenizer, model_path: str | None = None) -> list[int]:
    """End-of-sequence ids: the tokenizer's eos plus the generation config's."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if model_path is not None:
        try:
            from transformers import GenerationConfig

            gen = GenerationConfig.from_pretrained(model_path)
            eos = gen.eos_token_id
            ids.update([eos] if isinstance(eos, int) else list(eos or []))
        except (OSError, ValueError):
            pass
    return sorted(ids)


def encode_prompt(tokenizer, *, prompt: str | None = None, messages: Sequence[dict] | None = None, chat: bool = True) -> list[int]:
    """Token ids for a prompt. Chat messages (or a plain prompt, when the tokenizer has a chat
    template and chat is True) go through the chat template with a generation prompt."""
    if messages is None and prompt is None:
        raise ValueError("prompt: give a prompt or chat messages")
    if messages is not None:
        msgs = list(messages)
    elif chat and getattr(tokenizer, "chat_template", None):
        msgs = [{"role": "user", "content": prompt}]
    else:
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    out = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(out["input_ids"])


__all__ = [
    "DEFAULT_DRAFT",
    "DEFAULT_TARGET",
    "DRAFT_QUANTIZE_DEFAULT",
    "ModelSpec",
    "build_runner",
    "encode_prompt",
    "load_causal_lm",
    "stop_ids_for",
    "tokenizer_for",
]

"""Tiny random models with a word-level tokenizer: seconds to build, exact in float32.

The tests use them for every layer above the algorithms, and `make soak` serves them so a
30-minute soak runs thousands of requests on two cores. Nothing here downloads anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_VOCAB = 6


def make_tiny_model(
    folder, *, seed: int, vocab: int = TINY_VOCAB, layers: int = 2, hidden: int = 32, std: float = 0.35, context: int = 512
):
    """A random Qwen2 causal LM saved under `folder`; larger init std makes its next-token
    distributions peaked enough for drafts to be accepted sometimes and rejected sometimes."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        tie_word_embeddings=True,
        initializer_range=std,
        bos_token_id=0,
        eos_token_id=None,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    model.save_pretrained(str(folder))
    return str(folder)


TINY_WORDS = 64  # the service tests' vocabulary: a word-level tokenizer with a chat template


def make_tiny_tokenizer(folder, vocab: int = TINY_WORDS):
    """A word-level tokenizer over `vocab` tokens (specials, role markers, short words) with
    a chat template, saved next to a tiny model so pack-free service tests have real text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<eos>", "<system>", "<user>", "<assistant>"]
    words = [w for w in "the a an of to and in is it for on with as by at from this that def return if else print x y n".split()]
    extra = [f"w{i}" for i in range(vocab)]
    tokens = (specials + words + extra)[:vocab]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    fast.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<assistant> {% endif %}"
    )
    fast.save_pretrained(str(folder))
    # Next to a Qwen2 config.json, AutoTokenizer would pick Qwen2Tokenizer (byte-level
    # decoding); name the generic class so the word-level decoder is kept.
    cfg_path = Path(folder) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "TokenizersBackend"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return fast


def make_service_models(root) -> dict[str, str]:
    """{"small": path, "other": path, "draft": path}: vocab-64 models with a tokenizer; the
    draft has 4 layers (exit at 2) and drafts for both targets."""
    from transformers import GenerationConfig

    root = Path(root)
    out = {}
    for name, seed, layers in (("small", 11, 2), ("other", 12, 3), ("draft", 13, 4)):
        path = make_tiny_model(root / name, seed=seed, vocab=TINY_WORDS, layers=layers, hidden=32, std=0.3, context=8192)
        make_tiny_tokenizer(root / name)
        GenerationConfig(eos_token_id=1).save_pretrained(str(root / name))
        out[name] = path
    return out

"""A tiny draft for exit-training tests: a random 4-layer Qwen2 (tests/conftest.py's
make_tiny_model) with a small byte-level BPE tokenizer trained in-process on a few standard
library files, so the real data pipeline (stdlib text, chat prompts, head subset) runs."""

from __future__ import annotations

import sysconfig
from pathlib import Path

TINY_VOCAB = 384
TINY_LAYERS = 4


def make_tiny_draft(folder: Path, *, seed: int = 3) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.conftest import make_tiny_model

    folder = Path(folder)
    make_tiny_model(folder, seed=seed, vocab=TINY_VOCAB, layers=TINY_LAYERS, hidden=64, std=0.2)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sample = [(stdlib / name).read_text() for name in ("bisect.py", "heapq.py", "textwrap.py", "fnmatch.py")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sample, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(str(folder))
    return str(folder)

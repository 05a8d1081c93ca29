"""The exit trainer's training text (training/train_exits.py): documents from the Python
standard library on disk and the repository's evaluation prompts, a stable train/validation
split, their rendering into token streams, and the frequent-token head's vocabulary.

Training text exists on every machine: the standard library's source (raw files, plus
chat-formatted "write this function" samples built from functions with docstrings, plus pydoc
topics as prose) and bench/eval/*_dev.jsonl as user turns. A stable hash of each document's
key puts a fraction of them in the validation split.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import random
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch



@dataclass(frozen=True)
class Doc:
    """One training document: kind is "file" (a .py file), "topic" (a pydoc topic, prose) or
    "prompt" (a user turn from the eval prompt files); key identifies it stably."""

    kind: str
    key: str
    source: str  # file path, topic name, or the prompt text


def _stable_unit(text: str) -> float:
    """A number in [0, 1) from a string, equal on every machine and run."""
    return int(hashlib.sha1(text.encode()).hexdigest()[:12], 16) / float(1 << 48)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def collect_documents(*, stdlib: str | None, prompts: str) -> list[Doc]:
    """Every document of the corpus, in a stable order."""
    root = Path(stdlib) if stdlib else stdlib_root()
    docs: list[Doc] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in rel or "__pycache__" in rel or "dist-packages" in rel:
            continue
        docs.append(Doc(kind="file", key=f"file:{rel}", source=str(path)))
    if stdlib is None:
        try:
            from pydoc_data.topics import topics  # the language reference as prose

            docs.extend(Doc(kind="topic", key=f"topic:{name}", source=name) for name in sorted(topics))
        except ImportError:  # pragma: no cover - a stripped interpreter
            pass
    for fname in sorted(glob.glob(prompts)):
        with open(fname) as f:
            for line_no, line in enumerate(f):
                if not line.strip():
                    continue
                rec = json.loads(line)
                qid = str(rec.get("question_id", f"{Path(fname).name}:{line_no}"))
                for t, turn in enumerate(rec.get("turns", [])):
                    docs.append(Doc(kind="prompt", key=f"prompt:{qid}:{t}", source=str(turn)))
    if not docs:
        raise ValueError(f"training text: no Python files under {root} and no prompts matching {prompts}")
    return docs


def split_documents(docs: Sequence[Doc], val_fraction: float) -> tuple[list[Doc], list[Doc]]:
    """(train, val) by a stable hash of each key; both non-empty when possible."""
    train = [d for d in docs if _stable_unit(d.key) >= val_fraction]
    val = [d for d in docs if _stable_unit(d.key) < val_fraction]
    if not val and len(train) > 1:
        val, train = train[-1:], train[:-1]
    return train, val


class DocRenderer:
    """Turns a Doc into training text. Deterministic given (doc, rng)."""

    INSTRUCTIONS = (
        "Write a Python function `{sig}` that {doc}",
        "Implement `{sig}` in Python. {Doc}",
        "Can you write Python code for `{name}`? It should {doc}",
        "Write a Python class `{name}`: {doc}",
    )

    def __init__(self, tokenizer, *, prompts: Sequence[str], chat_fraction: float, max_chars: int):
        self.tokenizer = tokenizer
        self.prompts = list(prompts) or ["Write a Python function."]
        self.chat_fraction = chat_fraction
        self.max_chars = max_chars
        self.has_template = bool(getattr(tokenizer, "chat_template", None))

    def chat(self, user: str, assistant: str | None) -> str:
        msgs = [{"role": "user", "content": user}]
        if assistant is not None:
            msgs.append({"role": "assistant", "content": assistant})
        if self.has_template:
            return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=assistant is None)
        text = f"User: {user}\nAssistant:"
        return text + (f" {assistant}\n" if assistant is not None else "")

    def render(self, doc: Doc, rng: random.Random) -> str:
        if doc.kind == "prompt":
            return self.chat(doc.source, None)
        if doc.kind == "topic":
            from pydoc_data.topics import topics

            text = topics[doc.source][: self.max_chars]
            if rng.random() < self.chat_fraction:
                return self.chat(f"Explain `{doc.source}` in Python.", text.strip())
            return text
        text = Path(doc.source).read_text(encoding="utf-8", errors="replace")
        if rng.random() < self.chat_fraction:
            sample = self._function_chat(text, rng)
            if sample is not None:
                return sample
        if len(text) > self.max_chars:  # a window starting at a line boundary
            start = rng.randrange(0, len(text) - self.max_chars)
            start = text.find("\n", start) + 1
            text = text[start : start + self.max_chars]
        return text

    def _function_chat(self, source: str, rng: random.Random) -> str | None:
        """A "write this function" exchange from a function or class with a docstring."""
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            return None
        nodes = [
            n
            for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and ast.get_docstring(n)
        ]
        if not nodes:
            return None
        node = rng.choice(nodes)
        code = ast.get_source_segment(source, node)
        if not code or len(code) > self.max_chars:
            return None
        doc = ast.get_docstring(node).strip()
        first = doc.split("\n\n")[0].replace("\n", " ").strip().rstrip(".") + "."
        if isinstance(node, ast.ClassDef):
            sig, template = node.name, self.INSTRUCTIONS[3]
        else:
            sig = f"{node.name}({ast.unparse(node.args)})"
            template = rng.choice(self.INSTRUCTIONS[:3])
        lowered = first[0].lower() + first[1:] if first else first
        user = template.format(sig=sig, name=node.name, doc=lowered, Doc=first)
        if rng.random() < 0.3:
            user = f"{rng.choice(self.prompts)}\n\n{user}"
        answer = f"Here is an implementation of `{node.name}`:\n\n```python\n{code}\n```\n\n{doc.splitlines()[0].strip()}"
        return self.chat(user, answer)


@dataclass
class StreamState:
    """Position in the training stream: resumable exactly."""

    epoch: int = 0
    cursor: int = 0  # next document index within the epoch's order
    carry: list[int] = field(default_factory=list)  # tokens read but not yet used
    sequences: int = 0  # sequences produced so far


class TokenStream:
    """Packs rendered, tokenized documents (each followed by EOS) into sequences of
    seq_len + 1 tokens (inputs and next-token targets). The document order of an epoch is a
    seeded shuffle; each document's rendering uses an RNG seeded by (seed, epoch, cursor), so
    the stream is a pure function of (seed, state)."""

    def __init__(self, docs: Sequence[Doc], renderer: DocRenderer, *, seed: int, seq_len: int, max_doc_tokens: int, state: StreamState | None = None):
        if not docs:
            raise ValueError("training text: the split has no documents")
        self.docs = list(docs)
        self.renderer = renderer
        self.seed = seed
        self.seq_len = seq_len
        self.max_doc_tokens = max_doc_tokens
        self.state = state or StreamState()
        self._order_epoch = -1
        self._order: list[int] = []
        eos = renderer.tokenizer.eos_token_id
        self.eos = int(eos) if eos is not None else None

    def _order_for(self, epoch: int) -> list[int]:
        if epoch != self._order_epoch:
            self._order = list(range(len(self.docs)))
            random.Random(f"{self.seed}:{epoch}").shuffle(self._order)
            self._order_epoch = epoch
        return self._order

    def _next_doc_tokens(self) -> list[int]:
        st = self.state
        order = self._order_for(st.epoch)
        doc = self.docs[order[st.cursor]]
        rng = random.Random(f"{self.seed}:{st.epoch}:{st.cursor}")
        st.cursor += 1
        if st.cursor >= len(order):
            st.epoch, st.cursor = st.epoch + 1, 0
        text = self.renderer.render(doc, rng)
        ids = self.renderer.tokenizer(text, add_special_tokens=False)["input_ids"][: self.max_doc_tokens]
        return list(ids) + ([self.eos] if self.eos is not None else [])

    def next_sequence(self) -> list[int]:
        need = self.seq_len + 1
        while len(self.state.carry) < need:
            self.state.carry.extend(self._next_doc_tokens())
        seq, self.state.carry = self.state.carry[:need], self.state.carry[need:]
        self.state.sequences += 1
        return seq

    def next_batch(self, batch: int) -> torch.Tensor:
        return torch.tensor([self.next_sequence() for _ in range(batch)], dtype=torch.long)  # [B, L + 1]


# ----------------------------------------------------------------------------------------
# Head subset (frequent tokens)
# ----------------------------------------------------------------------------------------


def special_token_ids(tokenizer) -> set[int]:
    ids = set(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
    for tok_id in getattr(tokenizer, "added_tokens_decoder", {}) or {}:
        ids.add(int(tok_id))
    return ids


def count_token_frequencies(texts: Iterator[str], tokenizer, vocab_size: int, *, max_chars: int) -> torch.Tensor:
    """[vocab] counts of each token id over texts, until max_chars characters were read."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    buf: list[str] = []
    used = 0

    def flush() -> None:
        if buf:
            for ids in tokenizer(buf, add_special_tokens=False)["input_ids"]:
                if ids:
                    counts.index_add_(0, torch.tensor(ids).clamp(max=vocab_size - 1), torch.ones(len(ids), dtype=torch.int64))
            buf.clear()

    for text in texts:
        buf.append(text)
        used += len(text)
        if len(buf) >= 64:
            flush()
        if used >= max_chars:
            break
    flush()
    return counts


def choose_head_ids(counts: torch.Tensor, *, size: int, specials: set[int], freq_share: float) -> torch.Tensor:
    """The head subset S (sorted ids): every special token, then the most frequent tokens in
    the training text (at most freq_share of the slots, only tokens seen at least twice),
    then the lowest unused ids (BPE vocabularies list merges roughly by frequency in their
    own, broader training corpus: this covers prose and languages the local text lacks)."""
    vocab = counts.numel()
    size = min(size, vocab)
    chosen: list[int] = sorted(i for i in specials if 0 <= i < vocab)
    taken = set(chosen)
    budget_freq = int(size * freq_share)
    order = torch.argsort(counts, descending=True, stable=True).tolist()
    for tok in order:
        if len(taken) >= budget_freq or counts[tok] < 2:
            break
        if tok not in taken:
            taken.add(tok)
    tok = 0
    while len(taken) < size and tok < vocab:
        taken.add(tok)
        tok += 1
    return torch.tensor(sorted(taken)[:size] if len(taken) > size else sorted(taken), dtype=torch.int64)

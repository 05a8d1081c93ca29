"""tandem's pure-algorithm layer: sampling, lossless verification (standard, SpecTr K-SEQ),
S2D exit policy, acceptance statistics, the goodput policy and the request planner. Imports
only torch, numpy and the standard library, so it runs in unit tests without Ray, gRPC or
transformers.

The package's names load lazily (PEP 562): the planner (plan.py), the goodput policy and the
exit policy are pure Python, and the client imports the planner's names and bounds without
torch; `from tandem.speculation import verify_block` still works and loads torch then.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "ExitPolicy": "sorted_policy",
    "should_emit": "sorted_policy",
    "SamplingParams": "sampling",
    "SparseDist": "sampling",
    "TokenLogprob": "sampling",
    "logits_to_probs": "sampling",
    "make_generator": "sampling",
    "penalize": "sampling",
    "sample": "sampling",
    "token_counts": "sampling",
    "token_logprobs": "sampling",
    "truncate_to_sparse": "sampling",
    "KSeqResult": "spectr",
    "beta": "spectr",
    "kseq_residual": "spectr",
    "kseq_rho": "spectr",
    "kseq_select": "spectr",
    "verify_kseq": "spectr",
    "verify_kseq_greedy": "spectr",
    "SpecStats": "stats",
    "VerifyResult": "verify",
    "residual_distribution": "verify",
    "verify_block": "verify",
    "verify_greedy": "verify",
    "SpecConfig": "plan",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"tandem.speculation.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'tandem.speculation' has no attribute {name!r}")

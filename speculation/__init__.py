"""tandem's pure-algorithm layer: sampling, lossless verification (standard, SpecTr K-SEQ),
S2D exit policy and acceptance statistics. Imports only torch, numpy and the standard
library, so it runs in unit tests without Ray, gRPC or transformers."""

from tandem.speculation.sampling import (
    SamplingParams,
    SparseDist,
    TokenLogprob,
    logits_to_probs,
    make_generator,
    penalize,
    sample,
    token_counts,
    token_logprobs,
    truncate_to_sparse,
)
from tandem.speculation.sorted_policy import ExitPolicy, should_emit
from tandem.speculation.spectr import KSeqResult, beta, kseq_residual, kseq_rho, kseq_select, verify_kseq, verify_kseq_greedy
from tandem.speculation.stats import SpecStats
from tandem.speculation.verify import VerifyResult, residual_distribution, verify_block, verify_greedy

__all__ = [
    "ExitPolicy",
    "KSeqResult",
    "SamplingParams",
    "SparseDist",
    "SpecStats",
    "TokenLogprob",
    "VerifyResult",
    "beta",
    "kseq_residual",
    "kseq_rho",
    "kseq_select",
    "logits_to_probs",
    "make_generator",
    "penalize",
    "residual_distribution",
    "sample",
    "should_emit",
    "token_counts",
    "token_logprobs",
    "truncate_to_sparse",
    "verify_block",
    "verify_greedy",
    "verify_kseq",
    "verify_kseq_greedy",
]

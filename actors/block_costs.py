"""A target's verification cost curve: the forward time of a block of k rows (k = 1..n) after
a short context, measured on the runner as it serves (its device, kernels and threads).

The goodput policy (speculation/goodput.py) uses it to predict the verification time of a draft
length it has not tried yet. What it captures, measured here (bench/results/pack_fidelity.json):
a bf16 target on the CPU, or any target on a GPU, costs about the same for 1 to 8 rows, so a
longer draft is nearly free to verify; the 4-bit CPU kernel processes rows in tiles of 4, so a
block of 5-8 rows costs about twice one of 1-4 (1.5B pack, 2 cores: 35/40/49/115 ms for
1/2/4/8 rows), and a draft of 3 often pays better than 7.
"""

from __future__ import annotations

import time

CONTEXT = 32  # tokens before the measured blocks: a short prompt, so attention costs little


def measure_block_costs(runner, max_rows: int, *, reps: int = 2) -> list[float]:
    """Seconds of `runner.extend` for blocks of 1..max_rows rows with every row's logits (as a
    verification needs them); the fastest of `reps` tries each, after one warm-up."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    ids = [(7 + 13 * i) % runner.vocab_size for i in range(CONTEXT + max_rows)]
    seq = runner.new_sequence(CONTEXT + max_rows + 1)
    try:
        runner.prefill(seq, ids[:CONTEXT])
        runner.extend(seq, ids[CONTEXT : CONTEXT + 1])  # warm-up
        runner.rollback(seq, CONTEXT)
        costs = []
        for k in range(1, max_rows + 1):
            best = float("inf")
            for _ in range(reps):
                t0 = time.perf_counter()
                runner.extend(seq, ids[CONTEXT : CONTEXT + k])
                best = min(best, time.perf_counter() - t0)
                runner.rollback(seq, CONTEXT)
            costs.append(best)
        return costs
    finally:
        runner.release(seq)


def measure_batch_costs(runner, block_rows: int, batches, *, reps: int = 1) -> dict[int, float]:
    """Seconds of one `runner.extend_batch` over b sequences of `block_rows` rows each, for
    each b in `batches`, keyed by the forward's rows (b * block_rows): what c requests'
    verification blocks cost when they share a forward (continuous batching). The fastest of
    `reps` tries each, after one warm-up."""
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    batches = sorted({int(b) for b in batches})
    if not batches or batches[0] < 1:
        raise ValueError(f"batches must be sequence counts >= 1, got {batches}")
    ids = [(7 + 13 * i) % runner.vocab_size for i in range(CONTEXT + block_rows)]
    seqs = []
    try:
        for _ in range(batches[-1]):
            seqs.append(runner.new_sequence(CONTEXT + block_rows + 1))
            runner.prefill(seqs[-1], ids[:CONTEXT])

        def run(b: int) -> float:
            t0 = time.perf_counter()
            runner.extend_batch(seqs[:b], [ids[CONTEXT:]] * b)
            dt = time.perf_counter() - t0
            for s in seqs[:b]:
                runner.rollback(s, CONTEXT)
            return dt

        run(batches[0])  # warm-up
        return {b * block_rows: min(run(b) for _ in range(reps)) for b in batches}
    finally:
        for s in seqs:
            runner.release(s)

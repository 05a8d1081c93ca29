"""deploy/serve.py overlap_pays: the router overlaps drafting with verification (PEARL) unless
the draft and target actors share a node whose cores their threads oversubscribe."""

from __future__ import annotations

import pytest

from tandem.deploy.serve import overlap_pays


def info(node, threads, cpus=2):
    return {"node_id": node, "threads": threads, "node_cpus": cpus}


@pytest.mark.parametrize(
    "draft,target,want",
    [
        (info("a", 1), info("a", 1), True),  # 1 + 1 threads on 2 cores: both sides run at once
        (info("a", 2), info("a", 2), False),  # 2 + 2 on 2 cores: in turn
        (info("a", 1), info("a", 2), False),
        (info("a", 2, cpus=8), info("a", 4, cpus=8), True),
        (info("a", 2), info("b", 2), True),  # separate nodes (KubeRay pools): overlap
        (info(None, 2), info(None, 2), True),  # placement unknown (outside Ray): as before, overlap
    ],
)
def test_overlap_rule(draft, target, want):
    assert overlap_pays(draft, target) is want

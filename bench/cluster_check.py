"""`make cluster-check`: tandem's pools on a multi-node Ray cluster on this machine (Ray's own
ray.cluster_utils.Cluster: a head and worker nodes, each a real raylet with its own
resources), tiny models, no Kubernetes:

1. the draft pool lands on the node advertising `draft_pool`, the target pool on a node
   advertising `target_pool` (never the head);
2. under load the target pool grows onto a second target node (the autoscaler's new
   placement group is placed there);
3. that node's first target node is killed (SIGKILL of its raylet and workers) while
   requests stream: they resume on the surviving replica, every output equals the
   target-only reference, nothing is lost;
4. a replacement node joins; after the load the pool shrinks back to its floor.

Prints and writes one JSON summary (`passed` when every check holds). Run as its own
process: it is the Ray driver of the cluster it builds (`make cluster-check`; not part of
`make test`: it takes minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

PROMPT = [0, 1, 2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_args(resources: dict, num_cpus: int = 1) -> dict:
    # explicit free ports: Ray's fixed defaults may be held by another Ray on this machine
    return {"num_cpus": num_cpus, "resources": resources, "dashboard_agent_listen_port": _free_port(),
            "metrics_export_port": _free_port(), "runtime_env_agent_port": _free_port()}


def bundle_nodes(pg) -> list[str]:
    import ray

    return list(ray.util.placement_group_table(pg)["bundles_to_node_id"].values())


def run(root: Path, *, say=print) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from tandem.actors.autoscale import ScalePolicy
    from tandem.actors.engine import ActorEngine
    from tandem.actors.pools import DraftPool, DraftPoolSpec, TargetPool, TargetSpec
    from tandem.actors.speculative import SpecConfig
    from tandem.actors.workers import ModelLoad
    from tandem.bench.tiny_models import make_tiny_model

    target_path = make_tiny_model(root / "target", seed=1)
    draft_path = make_tiny_model(root / "draft", seed=2, layers=4)
    stale = Path("/tmp/ray/ray_current_cluster")
    had_stale = stale.exists()
    cluster = Cluster(initialize_head=True, head_node_args={**_node_args({}, num_cpus=1), "include_dashboard": False})
    checks: dict[str, bool] = {}
    summary: dict = {"checks": checks}
    try:
        draft_node = cluster.add_node(**_node_args({"draft_pool": 1}))
        t1 = cluster.add_node(**_node_args({"target_pool": 1}))
        t2 = cluster.add_node(**_node_args({"target_pool": 1}))
        ray.init(address=cluster.address, namespace="tandem-cluster-check", log_to_driver=False)
        say(f"cluster: head + draft node + 2 target nodes ({len(ray.nodes())} nodes)")
        head_id = cluster.head_node.node_id
        draft = DraftPool(DraftPoolSpec(load=ModelLoad(path=draft_path, dtype="float32", exits=(2,))), timeout_s=120)
        pool = TargetPool(TargetSpec(name="t", load=ModelLoad(path=target_path, dtype="float32"), replicas=1), timeout_s=120)
        eng = ActorEngine(draft, {"t": pool}, heartbeat_s=1.0, heartbeat_timeout_s=5.0, restart_grace_s=60.0)
        placed = {"draft": bundle_nodes(draft.members[0].pg), "target": bundle_nodes(pool.members[0].pg)}
        checks["draft_on_draft_node"] = placed["draft"] == [draft_node.node_id]
        checks["target_on_a_target_node_not_head"] = placed["target"][0] in (t1.node_id, t2.node_id) and head_id not in placed["target"]
        first_target_node = t1 if placed["target"][0] == t1.node_id else t2
        other_target_node = t2 if first_target_node is t1 else t1
        ref = eng.generate("t", PROMPT, spec=SpecConfig(method="ar"), max_new_tokens=200).tokens

        scaler = eng.start_autoscaler({"t": ScalePolicy(min_replicas=1, max_replicas=2, target_ongoing_requests=1.0,
                                                        upscale_delay_s=0.5, downscale_delay_s=3.0, load_timeout_s=120)},
                                      interval_s=0.2)
        outputs, errors, stop = [], [], threading.Event()

        def client():
            while not stop.is_set():
                try:
                    out = eng.generate("t", PROMPT, spec=SpecConfig(method="sd", draft_len=3), max_new_tokens=200,
                                       on_tokens=lambda toks: time.sleep(0.01))
                    outputs.append(out.tokens)
                except Exception as exc:  # noqa: BLE001 - counted: nothing may be lost
                    errors.append(repr(exc)[:300])

        threads = [threading.Thread(target=client) for _ in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while pool.size < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        grown = [m for m in pool.members if m.serving and m is not pool.members[0]]
        checks["grew_onto_the_other_target_node"] = bool(grown) and bundle_nodes(grown[0].pg) == [other_target_node.node_id]
        say(f"grew to {pool.size} replicas; killing the first target node mid-stream")
        served = len(outputs)
        while len(outputs) < served + 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        in_flight = pool.load()
        cluster.remove_node(first_target_node, allow_graceful=False)
        killed_at = time.monotonic()
        while len(outputs) < served + 12 and time.monotonic() < killed_at + 120 and not errors:
            time.sleep(0.1)
        say(f"after the kill: {len(outputs) - served} more requests finished; adding a replacement target node")
        cluster.add_node(**_node_args({"target_pool": 1}))
        time.sleep(5.0)
        stop.set()
        for t in threads:
            t.join(timeout=120)
        checks["requests_in_flight_at_the_kill"] = in_flight > 0
        checks["nothing_lost_every_output_exact"] = not errors and bool(outputs) and all(o == ref for o in outputs)
        shrink_deadline = time.monotonic() + 90
        while pool.size > 1 and time.monotonic() < shrink_deadline:
            time.sleep(0.2)
        checks["shrank_after_the_load"] = pool.size == 1
        checks["serves_after"] = eng.generate("t", PROMPT, spec=SpecConfig(method="sd", draft_len=3), max_new_tokens=200).tokens == ref
        summary.update(
            requests=len(outputs), errors=errors[:10], in_flight_at_kill=in_flight,
            events=[{"kind": e.kind, "replicas": e.replicas} for e in scaler.events],
            nodes={"head": head_id[:8], "draft": draft_node.node_id[:8], "first_target": first_target_node.node_id[:8],
                   "second_target": other_target_node.node_id[:8]},
        )
        eng.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()
        if not had_stale:
            stale.unlink(missing_ok=True)  # Cluster wrote it: ray.init() elsewhere must not find it
    summary["passed"] = bool(checks) and all(checks.values())
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tandem.bench.cluster_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", default=None, help="also write the summary JSON here")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="tandem-cluster-") as tmp:
        summary = run(Path(tmp), say=lambda m: print(f"[cluster-check] {m}", file=sys.stderr, flush=True))
    text = json.dumps(summary, indent=2)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    print(json.dumps(summary))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Multi-node scenarios on ray.cluster_utils.Cluster, run in a subprocess by test_engine.py
(the test session already holds a single-node Ray). Prints one JSON line.

usage: python tests/multinode.py placement|fraction|node_loss MARKET STORE
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main() -> None:
    mode, market, store = sys.argv[1:4]
    import ray
    from ray.cluster_utils import Cluster

    from snp_ray.engine.job import SliceJobConfig, run_slice_job
    from snp_ray.store import FragmentStore

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0},
                      shutdown_at_exit=True)
    cpus = 2 if mode == "fraction" else 1
    workers = [cluster.add_node(num_cpus=cpus, num_gpus=1) for _ in range(2)]
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    cluster.wait_for_nodes()
    batched = mode == "node_loss_batched"     # units of 2 classes in one pass each
    preset = "quick" if mode.startswith("node_loss") else "smoke"
    cfg = SliceJobConfig(market=market, fragments=store, k=5, preset=preset,
                         gpus_per_actor=0.5 if mode == "fraction" else 1.0, ping_timeout_s=5.0,
                         startup_timeout_s=60, engine="batched" if batched else "cached",
                         overrides={"class_batch": 2} if batched else {})
    removed = {}
    if mode.startswith("node_loss"):
        def remove_when_started():
            deadline = time.time() + 120
            while time.time() < deadline:
                try:
                    n = len(FragmentStore(store).refresh().keys())
                except Exception:  # noqa: BLE001 - the store may not exist yet
                    n = 0
                if n >= 1:
                    victim = workers[0]
                    removed["node_id"] = victim.node_id
                    removed["after"] = n
                    cluster.remove_node(victim, allow_graceful=False)
                    return
                time.sleep(0.2)
        threading.Thread(target=remove_when_started, daemon=True).start()
    result = run_slice_job(cfg)
    node_gpus = {n["NodeID"]: n["Resources"].get("GPU", 0) for n in ray.nodes()}
    final = FragmentStore(store)
    print(json.dumps({"summary": result.summary(), "actors": result.actors,
                      "node_gpus": node_gpus, "removed": removed,
                      "keys": sorted(final.keys()),
                      "manifest_rows": final.dataset().count_rows(),
                      "results": {k: {x: v.get(x) for x in ("status", "node", "gpu_ids", "engine", "seconds")}
                                  for k, v in result.results.items()}}))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()

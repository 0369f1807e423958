"""The slice job's driver memory and scheduler overhead (issue #14 section 4).

Each measurement runs in a fresh subprocess (its own driver, so its peak RSS is its own) that
starts a ``ray.cluster_utils.Cluster`` of logical nodes (a head with no CPUs plus N worker nodes of
1 CPU each, so N actors), writes a synthetic market (model specs and few-shot manifests only,
10 classes per model, no weights) and runs the slice job in the ``noop-benchmark`` slice mode:
actors write a placeholder fragment of ``--fragment-kb`` KiB to the store instead of slicing.

- memory: the driver's peak RSS (VmHWM) at 50, 200 and 1000 pairs on 2 nodes, and its growth;
- overhead: the job's cost per pair beyond the actor's own work, at 1, 2 and 4 nodes: for each
  actor, the time between two of its pairs finishing (as the driver sees them) minus the actor's
  own time for the second (making and storing the fragment), the median over all such intervals
  (actors start at different times, so intervals are per actor, not over the whole pool); also
  the driver's CPU milliseconds per finished pair.

Run against another checkout (e.g. the code before issue #14) with ``PYTHONPATH=/path/to/it``:
where the engine has no ``noop-benchmark`` mode, the actor class is replaced by one that does the
same placeholder work and returns the fragment's blobs as the old actors did ("legacy"). The old
actors also reread the whole manifest before every pair (O(pairs^2) reads in all: at 1000 pairs
that alone outlasts the run's timeout on 2 cores); the shim does so only with ``--legacy-recheck``,
so by default it differs from the new actors only in what it returns.

Usage: python benchmarks/driver_memory.py [--pairs 50,200,1000] [--nodes 1,2,4]
       [--overhead-pairs 200] [--fragment-kb 64] [--out FILE]      (prints one JSON object)
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
CLASSES_PER_MODEL = 10
OBJECT_STORE = 100 * 1024 * 1024
log = logging.getLogger("driver_memory")


# ------------------------------------------------------------------ the measured process
def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(f"no {field} in /proc/self/status")


def synthetic_market(root: Path, pairs: int, k: int = 1) -> None:
    """Model specs (no weights) and k-shot manifests for ``pairs`` (model, class) pairs."""
    from snp_ray.artifacts import atomic_write_json, sha256_bytes
    from snp_ray.data.fewshot import FewShotManifest
    from snp_ray.data.specs import ImageSpec
    from snp_ray.market.market import fewshot_seed
    from snp_ray.market.modelstore import ModelSpec, ModelStore

    store = ModelStore(root)
    image = ImageSpec(mean=[0.5] * 3, std=[0.25] * 3).to_dict()
    for i in range((pairs + CLASSES_PER_MODEL - 1) // CLASSES_PER_MODEL):
        classes = list(range(min(CLASSES_PER_MODEL, pairs - i * CLASSES_PER_MODEL)))
        spec = ModelSpec(id=f"m{i:05d}", task="bench", index=i, arch="vgg11", width=0.125,
                         dataset="cifar10", classes=classes, class_names=[f"c{c}" for c in classes],
                         input=image, params=1000, weights_sha256=sha256_bytes(f"bench-{i}".encode()))
        atomic_write_json(store.model_dir(spec.id) / "spec.json", spec.to_dict())
        store.save_manifest(spec.id, FewShotManifest(
            dataset="cifar10", k=k, seed=fewshot_seed(0, i), classes=classes,
            row_ids=[[c * k + j for j in range(k)] for c in classes]))


def _legacy_actor(kb: int, recheck: bool):
    """For an engine without the noop mode: an actor doing the same placeholder work that
    returns the fragment's blobs, as actors did before issue #14 (the old driver expects them)."""
    import ray
    from snp_ray.engine import actors
    from snp_ray.slicing.api import pair_key

    spec = importlib.util.spec_from_file_location("snp_bench_noop", REPO / "snp_ray/engine/noop.py")
    noop = importlib.util.module_from_spec(spec)
    sys.modules["snp_bench_noop"] = noop
    spec.loader.exec_module(noop)
    ray.cloudpickle.register_pickle_by_value(noop)     # the workers run the old checkout

    class LegacyNoopActor(actors.SlicerActor):
        def slice_pair(self, model_id, class_id):
            mspec = self.market.spec(model_id)
            key = pair_key(mspec, class_id, self.config, self.k, self.seed)
            if recheck and self.store.refresh().has(key):   # the old actor: on every pair
                return {"key": key, "status": "skipped", "blobs": self.store.blobs(key),
                        **self._row(self.store.rows()[key])}
            frag = noop.noop_fragment(mspec, class_id, self.config, self.k, self.seed, kb)
            t_put = time.perf_counter()
            self.store.put(frag)
            put_seconds = time.perf_counter() - t_put
            return {"key": key, "status": "done", "blobs": frag.to_blobs(), "model": model_id,
                    "class_id": int(class_id), "class": frag.spec.class_name,
                    "params": frag.spec.params, "source_params": frag.spec.source_params,
                    "seconds": frag.spec.seconds, "put_seconds": put_seconds,
                    "actor": self.actor_id, "node": self.node_id, "gpu_ids": self.gpu_ids}

    actors.SlicerActor = LegacyNoopActor        # _run_pool imports it from the module at run time


def measure(pairs: int, nodes: int, kb: int, legacy_recheck: bool = False) -> dict:
    """One run in this process: cluster, synthetic market, the job; the driver's numbers."""
    import ray
    from ray.cluster_utils import Cluster

    from snp_ray.engine.job import SliceJobConfig, run_slice_job

    legacy = "slice_mode" not in {f.name for f in dataclasses.fields(SliceJobConfig)}
    cluster = Cluster(initialize_head=True, shutdown_at_exit=True,
                      head_node_args={"num_cpus": 0, "object_store_memory": OBJECT_STORE})
    for _ in range(nodes):
        cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE)
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    cluster.wait_for_nodes()
    extra = {}
    if legacy:
        _legacy_actor(kb, legacy_recheck)
    else:
        extra = {"slice_mode": "noop-benchmark", "noop_fragment_kb": kb}
    with tempfile.TemporaryDirectory(prefix="driver-memory-") as tmp:
        synthetic_market(Path(tmp) / "market", pairs)
        cfg = SliceJobConfig(market=str(Path(tmp) / "market"), fragments=str(Path(tmp) / "frags"),
                             k=1, preset="smoke", actors=nodes, ping_timeout_s=120.0,
                             startup_timeout_s=300.0, **extra)
        marks: list[tuple[float, float, float]] = []   # (wall, driver CPU, RSS) per finished pair

        def progress(_msg: str) -> None:
            ru = resource.getrusage(resource.RUSAGE_SELF)
            marks.append((time.perf_counter(), ru.ru_utime + ru.ru_stime, _status_mb("VmRSS")))

        samples: list[float] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.02):
                samples.append(_status_mb("VmRSS"))

        rss_start = _status_mb("VmRSS")
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        res = run_slice_job(cfg, progress)
        wall = time.perf_counter() - t0
        stop.set()
        sampler.join()
        peak = _status_mb("VmHWM")
        done = [r for r in res.results.values() if r["status"] == "done"]
    ray.shutdown()
    cluster.shutdown()
    if res.done != pairs or res.failed:
        raise RuntimeError(f"the job did not do every pair: {res.summary()}")
    overheads, last_seen = [], {}
    for (t, _cpu, _rss), row in zip(marks, done):     # results are kept in the order pairs finished
        work = row["seconds"] + row.get("put_seconds", 0.0)
        if row["actor"] in last_seen:
            overheads.append(t - last_seen[row["actor"]] - work)
        last_seen[row["actor"]] = t
    cpu_s = (marks[-1][1] - marks[0][1]) / max(1, len(marks) - 1)
    actor_s = sum(r["seconds"] + r.get("put_seconds", 0.0) for r in done) / len(done)
    code = ("legacy, rechecking" if legacy_recheck else "legacy") if legacy else "this checkout"
    return {"code": code, "pairs": pairs, "nodes": nodes,
            "actors": len(res.actors), "actors_used": len(last_seen), "fragment_kb": kb,
            "rss_start_mb": round(rss_start, 1), "peak_rss_mb": round(peak, 1),
            "peak_rss_sampled_mb": round(max(samples, default=rss_start), 1),
            "rss_last_pair_mb": round(marks[-1][2], 1),
            "growth_mb": round(peak - rss_start, 1), "wall_s": round(wall, 2),
            "actor_ms_per_pair": round(actor_s * 1000, 2),
            "store_put_ms": round(sum(r.get("put_seconds", 0.0) for r in done) / len(done) * 1000, 2),
            "overhead_ms_per_pair": round(statistics.median(overheads) * 1000, 2),
            "overhead_ms_per_pair_mean": round(statistics.fmean(overheads) * 1000, 2),
            "driver_cpu_ms_per_pair": round(cpu_s * 1000, 2)}


# ------------------------------------------------------------------ the orchestrator
def run_child(pairs: int, nodes: int, kb: int, timeout: float, recheck: bool) -> dict:
    cmd = [sys.executable, str(HERE), "--child", f"{pairs},{nodes}", "--fragment-kb", str(kb)]
    cmd += ["--legacy-recheck"] if recheck else []
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    log.info("%s", result)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", default="50,200,1000", help="pair counts of the memory runs (2 nodes)")
    p.add_argument("--nodes", default="1,2,4", help="logical node counts of the overhead runs")
    p.add_argument("--overhead-pairs", type=int, default=200)
    p.add_argument("--fragment-kb", type=int, default=64,
                   help="weights per placeholder fragment (64: under Ray's 100 KB inline limit, "
                        "so results that carry blobs land in the driver's own heap)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    p.add_argument("--out", default="", help="also write the JSON here")
    p.add_argument("--legacy-recheck", action="store_true",
                   help="legacy runs only: reread the manifest before every pair, as the old actors did")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    if a.child:
        pairs, nodes = (int(x) for x in a.child.split(","))
        print(json.dumps(measure(pairs, nodes, a.fragment_kb, a.legacy_recheck)))
        return 0
    pair_counts = [int(x) for x in a.pairs.split(",")]
    node_counts = [int(x) for x in a.nodes.split(",")]
    runs: dict[tuple[int, int], dict] = {}
    for n in pair_counts:
        runs[(n, 2)] = run_child(n, 2, a.fragment_kb, a.timeout, a.legacy_recheck)
    for nodes in node_counts:
        if (a.overhead_pairs, nodes) not in runs:
            runs[(a.overhead_pairs, nodes)] = run_child(a.overhead_pairs, nodes, a.fragment_kb,
                                                        a.timeout, a.legacy_recheck)
    memory = [runs[(n, 2)] for n in pair_counts]
    lo, hi = memory[0], memory[-1]
    out = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
           "code": lo["code"], "fragment_kb": a.fragment_kb, "command": " ".join(sys.argv),
           "memory": [{k: r[k] for k in ("pairs", "rss_start_mb", "rss_last_pair_mb", "peak_rss_mb", "growth_mb",
                                         "wall_s")} for r in memory],
           "peak_rss_ratio": round(hi["peak_rss_mb"] / lo["peak_rss_mb"], 3),
           "growth_ratio": round(hi["growth_mb"] / max(lo["growth_mb"], 0.1), 3),
           "driver_kb_per_pair": round((hi["peak_rss_mb"] - lo["peak_rss_mb"]) * 1024
                                       / max(1, hi["pairs"] - lo["pairs"]), 2),
           "overhead": [{k: runs[(a.overhead_pairs, n)][k] for k in (
               "nodes", "pairs", "actors_used", "actor_ms_per_pair", "store_put_ms",
               "overhead_ms_per_pair", "overhead_ms_per_pair_mean", "driver_cpu_ms_per_pair")}
               for n in node_counts]}
    text = json.dumps(out, indent=2)
    if a.out:
        from snp_ray.artifacts import atomic_write_bytes

        atomic_write_bytes(Path(a.out), text.encode())
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

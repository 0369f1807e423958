"""Load test of the market service on loopback (issue #15 section 4).

Starts the service (Ray Serve, 127.0.0.1 only) on a market, then runs bounded client loops, each
stopping after ``--requests`` requests or ``--seconds`` seconds, whichever comes first:

- (a) cache-hit pack requests (one stored pack asked again and again);
- (b) new packs of 3 to 5 classes (seeded class sets, a fresh pack store, so each is built);
- (c) predictions of 1 and of 32 images per request on a stored pack;
- one restart: the service is shut down and started again over the same stores; the time until
  the first answer for a stored pack (and how much of it is Serve starting).

Every request must succeed: the script exits 1 if any did not. Prints one JSON object (``--json``)
with p50/p99 latency in ms, throughput, and the machine.

    python benchmarks/serve_load.py --market runs/quickstart --preset quick --k 10 --json
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

log = logging.getLogger("serve_load")


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def run_clients(make_request, clients: int, max_requests: int, max_seconds: float) -> dict:
    """``clients`` threads share a budget of ``max_requests`` and a deadline; each request is
    ``make_request(session, i)`` returning a requests.Response. Latencies in ms."""
    counter = itertools.count()
    lat, errors, lock = [], [], threading.Lock()
    deadline = time.monotonic() + max_seconds

    def loop():
        with requests.Session() as s:
            while time.monotonic() < deadline:
                i = next(counter)
                if i >= max_requests:
                    return
                t = time.perf_counter()
                try:
                    r = make_request(s, i)
                    ok = r.status_code == 200
                    detail = None if ok else f"{r.status_code} {r.text[:200]}"
                except requests.RequestException as e:
                    ok, detail = False, repr(e)
                ms = 1000 * (time.perf_counter() - t)
                with lock:
                    (lat.append(ms) if ok else errors.append(detail))
    t0 = time.perf_counter()
    threads = [threading.Thread(target=loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"clients": clients, "requests": len(lat) + len(errors), "errors": len(errors),
            "error_samples": errors[:3], "p50_ms": round(percentile(lat, 50), 2),
            "p99_ms": round(percentile(lat, 99), 2), "mean_ms": round(statistics.fmean(lat), 2) if lat else None,
            "throughput_rps": round(len(lat) / wall, 2), "wall_s": round(wall, 2)}


def png(img: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--market", default="runs/quickstart")
    p.add_argument("--preset", default="quick")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=300, help="per scenario (new packs: --new-packs)")
    p.add_argument("--new-packs", type=int, default=24)
    p.add_argument("--seconds", type=float, default=60.0, help="per scenario")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    from ray import serve

    from snp_ray.runtime import ensure_ray
    from snp_ray.serve.config import ServeConfig
    from snp_ray.serve.deploy import start

    packs = tempfile.mkdtemp(prefix="snp-serve-load-")   # a fresh pack store: (b) really builds
    cfg = ServeConfig(market=a.market, preset=a.preset, packs=packs, port=a.port)
    ensure_ray(num_cpus=os.cpu_count())
    t0 = time.perf_counter()
    url = start(cfg)
    startup_s = time.perf_counter() - t0
    log.info("service ready at %s in %.1f s", url, startup_s)
    classes = [c["name"] for c in requests.get(f"{url}v1/classes", timeout=60).json()["classes"]]
    rng = random.Random(a.seed)
    out: dict = {"market": a.market, "preset": a.preset, "k": a.k, "startup_s": round(startup_s, 2),
                 "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                             "processor": platform.processor() or platform.machine(),
                             "load_before": os.getloadavg()}}

    # (b) new packs, one client at a time (a build uses the CPU; the first one also warms up)
    sets = []
    while len(sets) < a.new_packs:
        s = sorted(rng.sample(classes, rng.choice([3, 4, 5])))
        if s not in sets:
            sets.append(s)
    warm = requests.post(f"{url}v1/packs", json={"classes": sets[0], "k": a.k}, timeout=300)
    warm.raise_for_status()
    log.info("first pack (cold caches): %.2f s", warm.elapsed.total_seconds())
    out["first_pack_s"] = round(warm.elapsed.total_seconds(), 3)
    lat_by_size: dict[int, list[float]] = {}
    for i, s in enumerate(sets[1:], 1):
        t = time.perf_counter()
        r = requests.post(f"{url}v1/packs", json={"classes": s, "k": a.k}, timeout=300)
        ms = 1000 * (time.perf_counter() - t)
        if r.status_code != 200 or r.json()["cached"]:
            out.setdefault("new_pack_errors", []).append(r.text[:200])
            continue
        lat_by_size.setdefault(len(s), []).append(ms)
    allnew = [x for v in lat_by_size.values() for x in v]
    out["b_new_packs"] = {"requests": len(sets) - 1, "errors": len(out.get("new_pack_errors", [])),
                          "p50_ms": round(percentile(allnew, 50), 1),
                          "p99_ms": round(percentile(allnew, 99), 1),
                          "by_size": {n: {"n": len(v), "p50_ms": round(percentile(v, 50), 1),
                                          "p99_ms": round(percentile(v, 99), 1)}
                                      for n, v in sorted(lat_by_size.items())}}
    log.info("(b) %s", out["b_new_packs"])

    # (a) cache hits
    body = {"classes": sets[0], "k": a.k}
    out["a_cache_hits_one_client"] = run_clients(
        lambda s, i: s.post(f"{url}v1/packs", json=body, timeout=60), 1, a.requests, a.seconds)
    log.info("(a, one client) %s", out["a_cache_hits_one_client"])
    out["a_cache_hits"] = run_clients(lambda s, i: s.post(f"{url}v1/packs", json=body, timeout=60),
                                      a.clients, a.requests, a.seconds)
    log.info("(a) %s", out["a_cache_hits"])

    # (c) predictions
    pid = warm.json()["id"]
    imgs = np.random.default_rng(a.seed).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    blobs = [png(x) for x in imgs]

    def predict(n):
        def go(s, i):
            files = [("images", (f"{j}.png", blobs[(i + j) % len(blobs)], "image/png"))
                     for j in range(n)]
            return s.post(f"{url}v1/packs/{pid}/predict", files=files, timeout=60,
                          headers={"serve_multiplexed_model_id": pid})
        return go
    out["c_predict_1_one_client"] = run_clients(predict(1), 1, a.requests, a.seconds)
    log.info("(c1, one client) %s", out["c_predict_1_one_client"])
    out["c_predict_1"] = run_clients(predict(1), a.clients, a.requests, a.seconds)
    log.info("(c1) %s", out["c_predict_1"])
    out["c_predict_32"] = run_clients(predict(32), a.clients, max(20, a.requests // 4), a.seconds)
    out["c_predict_32"]["images_per_s"] = round(32 * out["c_predict_32"]["throughput_rps"], 1)
    log.info("(c32) %s", out["c_predict_32"])

    # restart: the same stores, a new service; the first answer for a stored pack
    serve.shutdown()
    t0 = time.perf_counter()
    start(cfg)
    ready = time.perf_counter() - t0
    r = requests.post(f"{url}v1/packs", json=body, timeout=120)
    first = time.perf_counter() - t0
    r2 = requests.post(f"{url}v1/packs/{pid}/predict",
                       files=[("images", ("0.png", blobs[0], "image/png"))], timeout=120)
    out["restart"] = {"serve_ready_s": round(ready, 2), "first_pack_answer_s": round(first, 2),
                      "cached": r.json().get("cached"), "first_prediction_s":
                      round(time.perf_counter() - t0, 2), "ok": r.ok and r2.ok}
    log.info("restart %s", out["restart"])
    serve.shutdown()
    out["machine"]["load_after"] = os.getloadavg()

    errors = (out["a_cache_hits"]["errors"] + out["b_new_packs"]["errors"]
              + out["c_predict_1"]["errors"] + out["c_predict_32"]["errors"]
              + out["a_cache_hits_one_client"]["errors"] + out["c_predict_1_one_client"]["errors"]
              + (0 if out["restart"]["ok"] and out["restart"]["cached"] else 1))
    out["errors"] = errors
    text = json.dumps(out, indent=2)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")
    print(json.dumps(out) if a.json else text)
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

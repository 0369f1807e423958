"""Load test of the market service on loopback (issue #15 section 4).

Starts the service (Ray Serve, 127.0.0.1 only) on a market, then runs bounded client loops, each
stopping after ``--requests`` requests or ``--seconds`` seconds, whichever comes first:

- (a) cache-hit pack requests (one stored pack asked again and again);
- (b) new packs of 3 to 5 classes (seeded class sets, a fresh pack store, so each is built);
- (c) predictions of 1 and of 32 images per request on a stored pack;
- one restart: the service is shut down and started again over the same stores; the time until
  the first answer for a stored pack (and how much of it is Serve starting);
- with access tokens (issue #26), on the restarted service: (d) the same rows with auth on (a
  cached pack, a new 3-class pack, a one-image prediction) for a requester token without
  effective quotas; (e) developers' uploads over HTTP (``snp_ray.client.MarketClient``): the
  seconds from the upload to ``ready`` for a VGG11 x 1/4 (``snp:vgg11?width=0.25``) and a
  ResNet-18 (``torchvision:resnet18``) at 32x32, both with random weights, for the first
  ``--upload-classes`` classes of the market's dataset; (f) a burst of ``--burst`` one-image
  predictions from 4 threads with a token of ``--burst-rate`` predictions per second: how many
  were answered (200) and how many refused (429, each with Retry-After).

The service runs on a copy of the market in a temporary folder (uploads and tokens change a
market; the given one is left as it was). Every request must succeed (in (f): be a 200 or a 429
with Retry-After, both seen): the script exits 1 if any did not. Prints one JSON object
(``--json``) with p50/p99 latency in ms, throughput, and the machine.

    python benchmarks/serve_load.py --market runs/quickstart --preset quick --k 10 --json

A reduced run (a few requests per row, two classes per upload, VGG only) checks that it works:

    python benchmarks/serve_load.py --market M --preset smoke --k 5 --requests 20 --new-packs 3 \
        --seconds 10 --upload-classes 2 --uploads vgg11 --burst 30 --json
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import random
import shutil
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


#: uploaded models (e): the architecture reference and how to build it with random weights
UPLOADS = {"vgg11": "snp:vgg11?width=0.25", "resnet18": "torchvision:resnet18"}


def random_weights(name: str, classes: int, path: Path, seed: int) -> int:
    """Save a randomly initialised model of ``UPLOADS[name]`` as safetensors; its parameters."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    if name == "vgg11":
        from snp_ray.models import build_model

        model = build_model("vgg11", classes, 0.25)
    else:
        import torchvision

        model = torchvision.models.get_model("resnet18", weights=None, num_classes=classes)
    save_file(model.state_dict(), path)
    return sum(p.numel() for p in model.parameters())


def with_tokens(a, url: str, market: Path, classes: list[str], sets: list[list[str]], body: dict,
                pid: str, blobs: list[bytes], rng: random.Random) -> dict:
    """(d) auth-on latency rows, (e) uploads to ready, (f) a prediction burst over a quota."""
    from snp_ray.client import MarketClient
    from snp_ray.errors import RemoteError
    from snp_ray.serve.accounts import Accounts, Limits

    out: dict = {}
    accounts = Accounts(market / "accounts.sqlite")
    roomy = Limits(packs_per_hour=1_000_000, concurrent_builds=1_000,
                   predictions_per_second=1_000_000)
    requester = accounts.create("bench-requester", "requester", roomy)[0]
    developer = accounts.create("bench-developer", "developer", roomy)[0]
    burst = accounts.create("bench-burst", "requester", Limits(
        packs_per_hour=1_000_000, concurrent_builds=1_000, predictions_per_second=a.burst_rate))[0]
    auth = {"Authorization": f"Bearer {requester}"}
    refused = requests.post(f"{url}v1/packs", json=body, timeout=60)
    out["auth_enforced"] = refused.status_code == 401

    # (d) a cached pack, new 3-class packs, one-image predictions, as a requester
    d: dict = {"cached_pack": run_clients(
        lambda s, i: s.post(f"{url}v1/packs", json=body, headers=auth, timeout=60),
        1, a.requests, a.seconds)}
    fresh = []
    while len(fresh) < max(1, a.new_packs // 4):
        s3 = sorted(rng.sample(classes, 3))
        if s3 not in sets and s3 not in fresh:
            fresh.append(s3)
    lat, bad = [], []
    for s3 in fresh:
        t = time.perf_counter()
        r = requests.post(f"{url}v1/packs", json={"classes": s3, "k": a.k}, headers=auth, timeout=300)
        if r.status_code == 200 and not r.json()["cached"]:
            lat.append(1000 * (time.perf_counter() - t))
        else:
            bad.append(f"{r.status_code} {r.text[:200]}")
    d["new_3_class_pack"] = {"requests": len(fresh), "errors": len(bad), "error_samples": bad[:3],
                             "p50_ms": round(percentile(lat, 50), 1),
                             "p99_ms": round(percentile(lat, 99), 1)}

    def predict_one(s, i):
        return s.post(f"{url}v1/packs/{pid}/predict", timeout=60,
                      files=[("images", ("0.png", blobs[i % len(blobs)], "image/png"))],
                      headers={**auth, "serve_multiplexed_model_id": pid})
    d["predict_1"] = run_clients(predict_one, 1, a.requests, a.seconds)
    d["errors"] = (d["cached_pack"]["errors"] + d["new_3_class_pack"]["errors"]
                   + d["predict_1"]["errors"] + (0 if out["auth_enforced"] else 1))
    out["d_auth"] = d
    log.info("(d) %s", d)

    # (e) uploads over HTTP, one at a time, each followed until ready
    dataset = requests.get(f"{url}v1/classes", headers=auth, timeout=60).json().get("dataset")
    names = [c["name"] for c in sorted(requests.get(f"{url}v1/classes", headers=auth, timeout=60)
                                       .json()["classes"], key=lambda c: c["id"])]
    dev = MarketClient(url, token=developer, timeout=600)
    out["e_uploads"] = {}
    for name in [n for n in a.uploads.split(",") if n]:
        path = market.parent / f"upload-{name}.safetensors"
        params = random_weights(name, a.upload_classes, path, a.seed)
        row = {"arch": UPLOADS[name], "params": params, "classes": a.upload_classes, "k": a.k,
               "errors": 0}
        t0 = time.perf_counter()
        try:
            model = dev.upload(path, UPLOADS[name], names[:a.upload_classes], dataset or "cifar10",
                               k=a.k, seed=a.seed, model_id=f"bench-{name}")
            row["upload_answer_s"] = round(time.perf_counter() - t0, 2)
            dev.wait_ready(model["id"], timeout_s=a.upload_timeout, poll_s=0.5)
            row["upload_to_ready_s"] = round(time.perf_counter() - t0, 2)
        except RemoteError as e:
            row["errors"], row["error"] = 1, str(e)[:300]
        out["e_uploads"][name] = row
        log.info("(e) %s %s", name, row)

    # (f) a burst over a small prediction quota: 200s up to the bucket, then 429s
    codes, lock, waits = [], threading.Lock(), []
    hdr = {"Authorization": f"Bearer {burst}", "serve_multiplexed_model_id": pid}
    counter = itertools.count()
    deadline = time.monotonic() + a.seconds

    def fire():
        with requests.Session() as s:
            while time.monotonic() < deadline and next(counter) < a.burst:
                r = s.post(f"{url}v1/packs/{pid}/predict", headers=hdr, timeout=60,
                           files=[("images", ("0.png", blobs[0], "image/png"))])
                with lock:
                    codes.append(r.status_code)
                    if r.status_code == 429:
                        waits.append(r.headers.get("Retry-After"))
    t0 = time.perf_counter()
    threads = [threading.Thread(target=fire) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok, over = codes.count(200), codes.count(429)
    other = len(codes) - ok - over
    no_wait = sum(1 for w in waits if not (w and w.isdigit()))
    out["f_burst"] = {"requests": len(codes), "rate_per_s": a.burst_rate, "wall_s": round(wall, 2),
                      "ok_200": ok, "refused_429": over, "other": other,
                      "allowed_at_most": int(max(1.0, a.burst_rate) + a.burst_rate * wall),
                      "retry_after_s": sorted({int(w) for w in waits if w and w.isdigit()}),
                      "errors": other + no_wait + (0 if ok and over else 1)}
    # the token bucket holds max(1, rate) and refills at rate: more 200s would be a leak
    out["f_burst"]["errors"] += int(ok > out["f_burst"]["allowed_at_most"] + 1)
    log.info("(f) %s", out["f_burst"])
    return out


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
    p.add_argument("--uploads", default="vgg11,resnet18",
                   help=f"models to upload, comma-separated, of {sorted(UPLOADS)} ('' for none)")
    p.add_argument("--upload-classes", type=int, default=10,
                   help="classes of each uploaded model: the catalogue's first N by id (default 10)")
    p.add_argument("--upload-timeout", type=float, default=3600.0,
                   help="seconds an upload may take to become ready")
    p.add_argument("--burst", type=int, default=200, help="prediction requests in the burst (f)")
    p.add_argument("--burst-rate", type=float, default=5.0,
                   help="the burst token's predictions per second")
    p.add_argument("--out", default="")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    from ray import serve

    from snp_ray.runtime import ensure_ray
    from snp_ray.serve.config import ServeConfig
    from snp_ray.serve.deploy import start

    work = Path(tempfile.mkdtemp(prefix="snp-serve-load-"))
    market = work / "market"             # uploads and tokens change a market: work on a copy
    shutil.copytree(a.market, market, ignore=shutil.ignore_patterns(
        "packs", "uploads", "accounts.sqlite*"))
    packs = str(work / "packs")          # a fresh pack store: (b) really builds
    cfg = ServeConfig(market=str(market), preset=a.preset, packs=packs, port=a.port)
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

    # (d, e, f) with access tokens: from the first token on, every API request needs one
    try:
        out.update(with_tokens(a, url, market, classes, sets, body, pid, blobs, rng))
    finally:
        serve.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    out["machine"]["load_after"] = os.getloadavg()

    errors = (out["a_cache_hits"]["errors"] + out["b_new_packs"]["errors"]
              + out["c_predict_1"]["errors"] + out["c_predict_32"]["errors"]
              + out["a_cache_hits_one_client"]["errors"] + out["c_predict_1_one_client"]["errors"]
              + (0 if out["restart"]["ok"] and out["restart"]["cached"] else 1)
              + out["d_auth"]["errors"] + out["f_burst"]["errors"]
              + sum(u["errors"] for u in out["e_uploads"].values()))
    out["errors"] = errors
    text = json.dumps(out, indent=2)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")
    print(json.dumps(out) if a.json else text)
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

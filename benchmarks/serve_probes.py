"""The review's probes of issue #26, replayed against a live market service on loopback.

The review measured a running ``snp serve`` on the quickstart market: 4 distinct new packs asked
at once (one answered 500: a torch.fx trace in one build thread broke another thread's forward),
a body of 100,000 nested ``[`` (500, RecursionError), 16 PNGs of 6,000 x 6,000 pixels in a
1.9 MB body (8.7 s of decoding, then 200), a cross-site ``text/plain`` POST (built a pack), an
EPS image. This script sends the same requests (bounded in count and time) to the API under
uvicorn on 127.0.0.1, over a copy of ``--market``, and reports each status and its seconds.
Exit status 1 if any probe is not answered as expected.

    python benchmarks/serve_probes.py --market M --preset smoke --k 5 --json
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import shutil
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

log = logging.getLogger("serve_probes")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(size: tuple[int, int], fmt: str = "PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size).save(buf, format=fmt)
    return buf.getvalue()


def start(market: Path, preset: str):
    """The API (no Ray Serve: the builds run in the same threads either way) under uvicorn."""
    import uvicorn

    from snp_ray.serve.api import create_api
    from snp_ray.serve.config import ServeConfig
    from snp_ray.serve.service import LocalPredictor, MarketService

    port = free_port()
    service = MarketService(ServeConfig(market=str(market), preset=preset, port=port))
    server = uvicorn.Server(uvicorn.Config(create_api(service, LocalPredictor(service.packs, 4)),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    if not server.started:
        raise SystemExit("the service did not start within 60 s")
    return f"http://127.0.0.1:{port}", server, thread


def timed(fn):
    t0 = time.perf_counter()
    r = fn()
    return r, time.perf_counter() - t0


def probes(url: str, k: int, rounds: int) -> list[dict]:
    classes = [c["name"] for c in requests.get(f"{url}/v1/classes", timeout=60).json()["classes"]]
    rows = []

    def row(name, want, status, seconds, detail=""):
        rows.append({"probe": name, "want": want, "status": status, "seconds": round(seconds, 3),
                     "ok": status in want if isinstance(want, tuple) else status == want,
                     "detail": detail})

    # 1. distinct new packs at once, `rounds` times (each round its own class sets)
    for r in range(rounds):
        sets = [[classes[(r * 4 + i + j * 3) % len(classes)] for j in range(3)] for i in range(4)]
        with ThreadPoolExecutor(4) as ex:
            t0 = time.perf_counter()
            answers = list(ex.map(lambda s: requests.post(
                f"{url}/v1/packs", json={"classes": s, "k": k}, timeout=600), sets))
            seconds = time.perf_counter() - t0
        statuses = sorted(a.status_code for a in answers)
        row(f"4 distinct new packs at once (round {r + 1})", 200,
            200 if statuses == [200] * 4 else max(statuses), seconds, f"statuses {statuses}")
    # 2. deep JSON
    r, s = timed(lambda: requests.post(f"{url}/v1/packs", data=b"[" * 100_000,
                                       headers={"content-type": "application/json"}, timeout=60))
    row("100,000 nested '['", 400, r.status_code, s, r.json().get("error", "")[:80])
    # 3. 16 PNGs of 6,000 x 6,000 pixels for a prediction
    pid = requests.post(f"{url}/v1/packs", json={"classes": classes[:3], "k": k},
                        timeout=600).json()["id"]
    big = png((6000, 6000))
    files = [("images", (f"{i}.png", big, "image/png")) for i in range(16)]
    r, s = timed(lambda: requests.post(f"{url}/v1/packs/{pid}/predict", files=files, timeout=120))
    row(f"16 PNGs of 6000x6000 ({16 * len(big) / 1e6:.1f} MB body)", 400, r.status_code, s,
        r.json().get("error", "")[:80])
    # 4. a cross-site form post
    r, s = timed(lambda: requests.post(f"{url}/v1/packs", data=json.dumps({"classes": classes[:3]}),
                                       headers={"content-type": "text/plain"}, timeout=60))
    row("text/plain POST to /v1/packs", 415, r.status_code, s)
    # 5. formats that run other decoders
    for fmt in ("EPS", "TIFF"):
        try:
            blob = png((32, 32), fmt)
        except OSError:                       # Pillow writes EPS only with Ghostscript
            blob = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\n"
        r, s = timed(lambda: requests.post(f"{url}/v1/packs/{pid}/predict",
                                           files=[("images", ("x", blob, "image/x"))], timeout=60))
        row(f"an {fmt} image", 400, r.status_code, s, r.json().get("error", "")[:80])
    # 6. top-<m> spellings and a long class list
    r, s = timed(lambda: requests.post(f"{url}/v1/packs", json={"classes": classes[:3], "k": k,
                                                                "plan": "top-99999"}, timeout=600))
    row("plan top-99999 (one spelling: all)", 200, r.status_code, s, f"pack {r.json().get('id')}")
    r, s = timed(lambda: requests.post(f"{url}/v1/packs", json={"classes": classes * 20, "k": k},
                                       timeout=60))
    row(f"{len(classes) * 20} classes in one request", 400, r.status_code, s,
        r.json().get("error", "")[:80])
    r, s = timed(lambda: requests.get(f"{url}/v1/health", timeout=60))
    row("still answering (health)", 200, r.status_code, s)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--market", required=True, help="a sliced market folder (copied, not changed)")
    p.add_argument("--preset", default="quick")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3, help="rounds of 4 concurrent new packs")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        market = Path(tmp) / "market"
        shutil.copytree(a.market, market, ignore=shutil.ignore_patterns("packs", "accounts.sqlite*"))
        url, server, thread = start(market, a.preset)
        try:
            rows = probes(url, a.k, a.rounds)
        finally:
            server.should_exit = True
            thread.join(10)
    for r in rows:
        log.info("%-45s want %-5s got %s in %.3f s %s", r["probe"], r["want"], r["status"],
                 r["seconds"], r["detail"])
    out = {"rows": rows, "failed": [r["probe"] for r in rows if not r["ok"]],
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
           "command": " ".join(["python", *sys.argv])}
    if a.json:
        print(json.dumps(out))
    return 1 if out["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

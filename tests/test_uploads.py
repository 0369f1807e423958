"""Issue #26 part 4: developers upload models over HTTP (``POST /v1/models``), follow their state
and remove them. In-process (TestClient, with a stand-in slicer) for states, owners and every
refusal; then once through the real Ray Serve deployment and the real slice job on Ray.

The model: a torchvision MobileNetV2 (width 1/4) with random weights saved by safetensors,
classes airplane, cat, dog (cifar10 ids 0, 3, 5), with the developer's own few-shot file (random
images), so neither the service nor the slicer reads the 50,000-row train split.
"""
from __future__ import annotations

import json
import pickle
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from conftest import png_bytes, write_image_parquet
from snp_ray.errors import EngineError
from snp_ray.serve.accounts import Accounts
from snp_ray.serve.api import create_api
from snp_ray.serve.config import ServeConfig
from snp_ray.serve.service import LocalPredictor, MarketService

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = "torchvision:mobilenet_v2?width_mult=0.25"
SPEC = {"arch": ARCH, "classes": ["airplane", "cat", "dog"], "dataset": "cifar10", "k": 5,
        "id": "mv2"}
LIMITS = dict(max_upload_bytes=4 * 1024 ** 2, max_upload_rows=40,
              max_upload_decoded_bytes=8 * 1024 ** 2)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _parquet(tmp: Path, per_class: dict[int, int], seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    labels = np.concatenate([[c] * n for c, n in per_class.items()])
    images = rng.integers(0, 256, (labels.size, 32, 32, 3), dtype=np.uint8)
    return write_image_parquet(tmp / f"fs-{seed}.parquet", images, labels,
                               [f"c{i}" for i in range(10)]).read_bytes()


@pytest.fixture(scope="module")
def blobs(tmp_path_factory, real_data):
    """Weights (safetensors bytes), a good few-shot file, a decompression bomb, too many rows."""
    import torch
    import torchvision
    from safetensors.torch import save

    tmp = tmp_path_factory.mktemp("uploads")
    torch.manual_seed(0)
    model = torchvision.models.get_model("mobilenet_v2", weights=None, num_classes=3, width_mult=0.25)
    zeros = pa.array([b"\0" * (1024 ** 2)] * 16, pa.binary())    # 16 MiB that zstd makes tiny
    bomb = pa.table({"image": zeros, "label": pa.array([0] * 16, pa.int16())}).replace_schema_metadata(
        {"classes": json.dumps([f"c{i}" for i in range(10)])})
    # no dictionary: the footer's uncompressed size must state what decoding costs
    pq.write_table(bomb, tmp / "bomb.parquet", compression="zstd", use_dictionary=False)
    return {"weights": save(model.state_dict()), "fewshot": _parquet(tmp, {0: 6, 3: 6, 5: 6}),
            "bomb": (tmp / "bomb.parquet").read_bytes(),
            "rows": _parquet(tmp, {0: 20, 3: 20, 5: 20}, seed=1)}


def _files(blobs, spec=SPEC, weights=None, fewshot="fewshot"):
    parts = [("spec", (None, json.dumps(spec) if isinstance(spec, dict) else spec, "application/json")),
             ("weights", ("model.safetensors", blobs["weights"] if weights is None else weights,
                          "application/octet-stream"))]
    if fewshot:
        parts.append(("fewshot", ("fewshot.parquet", blobs[fewshot], "application/octet-stream")))
    return parts


class Slicer:
    """A stand-in for the slice job: reports progress, waits for ``go``, then fails if told."""

    def __init__(self):
        self.go, self.calls, self.error = threading.Event(), [], None

    def __call__(self, model_id, k, progress):
        self.calls.append((model_id, k))
        progress(1)
        assert self.go.wait(30)
        if self.error:
            raise self.error


def _client(market: Path, accounts: Path, slicer: Slicer):
    from fastapi.testclient import TestClient

    cfg = ServeConfig(market=str(market), preset="smoke", accounts=str(accounts), **LIMITS)
    service = MarketService(cfg)
    service.uploads.slicer = slicer
    return TestClient(create_api(service, LocalPredictor(service.packs, 2)),
                      raise_server_exceptions=False)


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _wait(c, mid, headers, state, timeout=60.0) -> dict:
    deadline = time.time() + timeout
    while True:
        model = c.get(f"/v1/models/{mid}", headers=headers).json()["model"]
        if model["state"] == state or time.time() > deadline:
            return model
        time.sleep(0.05)


@pytest.fixture
def world(tmp_path):
    market = tmp_path / "market"
    market.mkdir()
    accounts = Accounts(tmp_path / "accounts.sqlite")        # outside the market folder
    tokens = {name: accounts.create(name, role)[0] for name, role in
              (("alice", "developer"), ("bob", "developer"), ("rita", "requester"),
               ("root", "admin"), ("carol", "developer"))}
    accounts.revoke("carol")
    return market, accounts.path, tokens


def test_an_upload_is_owned_sliced_ready_after_a_restart_and_removable(world, blobs):
    """202 with state slicing; ready once the slicer returns; the owner and state survive a
    restart; the owner replaces it, a failed slicing is 'failed' without server paths; an admin
    removes it and it is gone (404, no record, no model folder)."""
    market, accounts, tok = world
    slicer = Slicer()
    alice = _auth(tok["alice"])
    with _client(market, accounts, slicer) as c:
        r = c.post("/v1/models", files=_files(blobs), headers=alice)
        assert r.status_code == 202, r.text
        model = r.json()["model"]
        assert {k: model[k] for k in ("id", "owner", "state", "k", "classes", "arch", "dataset",
                                      "error")} == {
            "id": "mv2", "owner": "alice", "state": "slicing", "k": 5, "error": None,
            "classes": ["airplane", "cat", "dog"], "arch": ARCH, "dataset": "cifar10"}
        assert model["params"] > 100_000 and model["progress"]["total"] == 3
        assert _wait(c, "mv2", alice, "slicing")["progress"] == {"done": 1, "total": 3}
        slicer.go.set()
        ready = _wait(c, "mv2", alice, "ready")
        assert ready["state"] == "ready" and ready["progress"] == {"done": 3, "total": 3}
        assert slicer.calls == [("mv2", 5)]
        rita = c.get("/v1/models", headers=_auth(tok["rita"]))    # any valid token reads
        assert rita.status_code == 200 and rita.json() == {"models": [ready]}
    record = json.loads((market / "uploads" / "mv2.json").read_text())
    assert record["owner"] == "alice" and record["state"] == "ready"
    with _client(market, accounts, Slicer()) as c:                # a restart
        assert c.get("/v1/models/mv2", headers=alice).json()["model"] == ready
    slicer = Slicer()
    slicer.error = EngineError(f"1 of 3 classes could not be sliced: {market}/fragments is full")
    slicer.go.set()
    with _client(market, accounts, slicer) as c:
        r = c.post("/v1/models", files=_files(blobs, {**SPEC, "replace": True}), headers=alice)
        assert r.status_code == 202, r.text
        failed = _wait(c, "mv2", alice, "failed")
        assert failed["state"] == "failed" and failed["error_type"] == "EngineError"
        assert failed["error"] == "1 of 3 classes could not be sliced: <market>/fragments is full"
        r = c.delete("/v1/models/mv2", headers=_auth(tok["root"]))
        assert r.status_code == 200, r.text
        assert r.json() == {"removed": "mv2", "retired": {"fragments": 0, "blobs": 0, "packs": []}}
        assert c.get("/v1/models/mv2", headers=alice).status_code == 404
        assert c.get("/v1/models", headers=alice).json() == {"models": []}
    assert not (market / "uploads" / "mv2.json").exists() and not (market / "models" / "mv2").exists()


def test_every_bad_upload_or_change_is_a_named_4xx_and_the_market_is_unchanged(world, blobs):
    market, accounts, tok = world
    slicer = Slicer()
    slicer.go.set()
    with _client(market, accounts, slicer) as c:
        assert c.post("/v1/models", files=_files(blobs), headers=_auth(tok["alice"])).status_code == 202
        assert _wait(c, "mv2", _auth(tok["alice"]), "ready")["state"] == "ready"
        before = snapshot(market)
        w = blobs["weights"]
        dev, bob = _auth(tok["alice"]), _auth(tok["bob"])
        deep = '{"arch": ' + "[" * 5000 + "]" * 5000 + "}"
        cases = {
            "no token": (401, "AuthError", lambda: c.post("/v1/models", files=_files(blobs))),
            "a requester's token": (403, "ForbiddenError", lambda: c.post(
                "/v1/models", files=_files(blobs), headers=_auth(tok["rita"]))),
            "a revoked token": (401, "AuthError", lambda: c.post(
                "/v1/models", files=_files(blobs), headers=_auth(tok["carol"]))),
            "JSON, not multipart": (415, "UnsupportedMediaType", lambda: c.post(
                "/v1/models", json=SPEC, headers=dev)),
            "pickled weights": (400, "WeightsError", lambda: c.post("/v1/models", headers=dev, files=_files(
                blobs, {**SPEC, "id": "p"}, weights=pickle.dumps({"w": [1.0]}, protocol=4)))),
            "weights over the cap": (413, "PayloadTooLarge", lambda: c.post("/v1/models", headers=dev, files=_files(
                blobs, {**SPEC, "id": "big"}, weights=w + b"\0" * (4 * 1024 ** 2)))),
            "truncated safetensors": (400, "WeightsError", lambda: c.post("/v1/models", headers=dev, files=_files(
                blobs, {**SPEC, "id": "cut"}, weights=w[:len(w) // 2]))),
            "unknown spec keys": (400, "ConfigError", lambda: c.post("/v1/models", headers=dev, files=_files(
                blobs, {**SPEC, "id": "u", "epochs": 3}))),
            "deep JSON in the spec": (400, "DataError", lambda: c.post(
                "/v1/models", headers=dev, files=_files(blobs, deep))),
            "a path-like id": (400, "ConfigError", lambda: c.post("/v1/models", headers=dev, files=_files(
                blobs, {**SPEC, "id": "../x"}))),
            "a few-shot decompression bomb": (400, "DataError", lambda: c.post(
                "/v1/models", headers=dev, files=_files(blobs, {**SPEC, "id": "b"}, fewshot="bomb"))),
            "too many few-shot rows": (400, "DataError", lambda: c.post(
                "/v1/models", headers=dev, files=_files(blobs, {**SPEC, "id": "r"}, fewshot="rows"))),
            "replacing another's model": (403, "ForbiddenError", lambda: c.post(
                "/v1/models", headers=bob, files=_files(blobs, {**SPEC, "replace": True}))),
            "deleting another's model": (403, "ForbiddenError", lambda: c.delete("/v1/models/mv2", headers=bob)),
            "deleting with a requester's token": (403, "ForbiddenError", lambda: c.delete(
                "/v1/models/mv2", headers=_auth(tok["rita"]))),
            "deleting an unknown model": (404, "ArtifactNotFoundError", lambda: c.delete(
                "/v1/models/nope", headers=dev)),
            "an unknown model": (404, "ArtifactNotFoundError", lambda: c.get("/v1/models/nope", headers=dev)),
        }
        WHY = {"a few-shot decompression bomb": "decompresses to 16,777,",
               "too many few-shot rows": "60 rows, more than the 40",
               "weights over the cap": "over the limit of 4,194,304 bytes",
               "replacing another's model": "belongs to 'alice'"}
        for name, (status, kind, send) in cases.items():
            r = send()
            assert (r.status_code, r.json().get("type")) == (status, kind), (name, r.text)
            assert r.json()["error"] and str(market) not in r.text, (name, r.text)
            assert WHY.get(name, "") in r.json()["error"], (name, r.text)
            assert snapshot(market) == before, name
        assert c.get("/v1/models/mv2", headers=bob).json()["model"]["owner"] == "alice"
        assert slicer.calls == [("mv2", 5)]                        # no refused upload sliced


# ---------------------------------------------------------------- through Ray Serve
@pytest.fixture(scope="module")
def served_uploads(served_market, real_data, tmp_path_factory):
    """The service over an empty market in Ray Serve, under its own route prefix beside the
    session's served market (one Serve instance per cluster, started by that fixture whichever
    module runs first): (URL, market, tokens)."""
    from ray import serve

    from snp_ray.serve.deploy import build_app

    tmp = tmp_path_factory.mktemp("served_uploads")
    market = tmp / "market"
    market.mkdir()
    accounts = Accounts(tmp / "accounts.sqlite")
    tokens = {name: accounts.create(name, role)[0] for name, role in
              (("dev", "developer"), ("req", "requester"))}
    cfg = ServeConfig(market=str(market), preset="smoke", accounts=str(accounts.path),
                      port=served_market[1].port, max_models_per_replica=2)
    port = cfg.port
    serve.run(build_app(cfg), name="snp-uploads", route_prefix="/uploads")
    try:
        yield f"http://127.0.0.1:{port}/uploads/", market, tokens
    finally:
        serve.delete("snp-uploads")


def test_served_upload_is_sliced_on_ray_packed_predicted_and_removed(served_uploads, blobs):
    url, market, tok = served_uploads
    dev, req = _auth(tok["dev"]), _auth(tok["req"])
    assert requests.get(f"{url}v1/classes", headers=req, timeout=30).json()["classes"] == []
    t0 = time.perf_counter()
    r = requests.post(f"{url}v1/models", files=_files(blobs), headers=dev, timeout=120)
    assert r.status_code == 202, r.text
    assert r.json()["model"]["state"] == "slicing" and r.json()["model"]["owner"] == "dev"
    deadline = time.time() + 150
    while True:
        model = requests.get(f"{url}v1/models/mv2", headers=req, timeout=30).json()["model"]
        if model["state"] != "slicing" or time.time() > deadline:
            break
        time.sleep(0.5)
    seconds = time.perf_counter() - t0
    assert model["state"] == "ready" and model["progress"] == {"done": 3, "total": 3}, model
    print(f"upload to ready: {seconds:.1f} s")
    classes = requests.get(f"{url}v1/classes", headers=req, timeout=30).json()
    assert [(c["name"], c["ks"], [h["model"] for h in c["holders"]]) for c in classes["classes"]] == [
        ("airplane", [5], ["mv2"]), ("cat", [5], ["mv2"]), ("dog", [5], ["mv2"])]
    r = requests.post(f"{url}v1/packs", json={"classes": ["cat", "dog"], "k": 5}, headers=req,
                      timeout=120)
    assert r.status_code == 200, r.text
    pid = r.json()["id"]
    img = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)

    def predict():
        return requests.post(f"{url}v1/packs/{pid}/predict", headers=req, timeout=60,
                             files=[("images", ("x.png", png_bytes(img), "image/png"))])
    first = predict()
    assert first.status_code == 200 and len(first.json()["predictions"][0]) == 2, first.text
    r = requests.delete(f"{url}v1/models/mv2", headers=dev, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json() == {"removed": "mv2", "retired": {"fragments": 3, "blobs": 3, "packs": [pid]}}
    assert requests.get(f"{url}v1/classes", headers=req, timeout=30).json()["classes"] == []
    gone = predict()
    assert (gone.status_code, gone.json()["type"]) == (404, "ArtifactNotFoundError"), gone.text
    assert requests.get(f"{url}v1/packs/{pid}", headers=req, timeout=30).status_code == 404
    assert requests.get(f"{url}v1/models/mv2", headers=req, timeout=30).status_code == 404

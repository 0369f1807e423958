"""Issue #26 part 4: developers upload over HTTP, and everyone scripts against the market.

:class:`snp_ray.client.MarketClient` against the real FastAPI app served by uvicorn on a loopback
port (no Ray Serve), over a copy of the sliced smoke market: refusals become ``RemoteError`` with
the service's status, type and Retry-After; a pack is built, predicted on and downloaded; a
developer uploads a model, follows it to ``ready`` and removes it; ``snp market add --remote``
does the same from the command line; and the web page's developer tab does it in Chromium.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import time
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import requests

from conftest import free_port, png_bytes, serve_in_thread
from snp_ray.client import MarketClient, refusal
from snp_ray.errors import ModelFailedError, RemoteError, RemoteTimeout

pytestmark = pytest.mark.usefixtures("one_thread")

REQUEST = {"classes": ["cat", "airplane", "frog"], "k": 5}       # the smoke market's classes
NO_PACK = "0123456789abcdef01234567"
UPLOAD_ARCH = "snp:vgg11?width=0.125"
UPLOAD_CLASSES = ["airplane", "cat"]


def _serve(market: Path, **cfg):
    """The API (no Ray Serve) under uvicorn on a free loopback port, in a thread."""
    from snp_ray.serve.api import create_api
    from snp_ray.serve.config import ServeConfig
    from snp_ray.serve.service import LocalPredictor, MarketService

    port = free_port()
    service = MarketService(ServeConfig(market=str(market), preset="smoke", port=port, **cfg))
    server, thread = serve_in_thread(create_api(service, LocalPredictor(service.packs, 2)), port)
    return f"http://127.0.0.1:{port}", server, thread, service


@pytest.fixture(scope="module")
def live(sliced_smoke, tmp_path_factory):
    """One served copy of the sliced smoke market for the module, with a token per role: (URL,
    market folder, tokens by role, the MarketService). Tests make their own tokens for quotas,
    and leave the market's models as they found them."""
    from snp_ray.serve.accounts import Accounts

    market = tmp_path_factory.mktemp("client") / "market"
    shutil.copytree(sliced_smoke, market)
    accounts = Accounts(market / "accounts.sqlite")
    tokens = {role: accounts.create(role, role)[0] for role in ("developer", "requester", "admin")}
    tokens["developer2"] = accounts.create("developer2", "developer")[0]
    url, server, thread, service = _serve(market)
    try:
        yield url, market, tokens, service
    finally:
        server.should_exit = True
        thread.join(10)


def _token(market: Path, name: str, role: str = "requester", **limits) -> str:
    from snp_ray.serve.accounts import Accounts, Limits

    return Accounts(market / "accounts.sqlite").create(name, role, Limits(**limits))[0]


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


# ---------------------------------------------------------------- refusals
def test_refusals_become_remote_errors_with_status_type_and_retry_after(live):
    url, market, tokens, _ = live
    with pytest.raises(RemoteError) as e:                      # no token, once tokens exist
        MarketClient(url).classes()
    assert (e.value.status, e.value.kind, e.value.retry_after) == (401, "AuthError", None)
    assert "access token" in e.value.message and "HTTP 401" in str(e.value)
    with pytest.raises(RemoteError) as e:
        MarketClient(url, token="snp_guess").classes()
    assert (e.value.status, e.value.kind) == (401, "AuthError")

    dev = MarketClient(url, token=tokens["developer"])
    assert dev.classes()["ks"] == [5]                          # a developer reads the catalogue
    with pytest.raises(RemoteError) as e:                      # ... but may not pack
        dev.pack(REQUEST["classes"], k=5)
    assert (e.value.status, e.value.kind) == (403, "ForbiddenError")

    req = MarketClient(url, token=tokens["requester"])
    with pytest.raises(RemoteError) as e:
        req.pack_info(NO_PACK)
    assert (e.value.status, e.value.kind) == (404, "ArtifactNotFoundError")
    assert "<market>" in e.value.message and str(market) not in e.value.message
    with pytest.raises(RemoteError) as e:
        req.pack(["cta", "dog"], k=5)
    assert (e.value.status, e.value.kind) == (404, "UnknownNameError")
    assert "cat" in e.value.close_matches
    with pytest.raises(RemoteError) as e:
        req.pack([], k=5)
    assert e.value.status == 400 and e.value.kind in ("ConfigError", "DataError")

    # the client always sends a media type the route takes: a hand-made text/plain post is 415
    r = requests.post(f"{url}/v1/packs", data=json.dumps(REQUEST), timeout=30,
                      headers={"content-type": "text/plain",
                               "Authorization": f"Bearer {tokens['requester']}"})
    err = refusal(r)
    assert (err.status, err.kind, err.retry_after) == (415, "UnsupportedMediaType", None)


def test_a_spent_prediction_quota_is_a_429_with_retry_after(live):
    url, market, tokens, _ = live
    admin = MarketClient(url, token=tokens["admin"])
    pid = admin.pack(REQUEST["classes"], k=5)["id"]
    slow = MarketClient(url, token=_token(market, "slow", predictions_per_second=0.01))
    assert slow.predict(pid, _images(1)).shape == (1, 3)
    with pytest.raises(RemoteError) as e:
        slow.predict(pid, _images(1))
    assert (e.value.status, e.value.kind) == (429, "QuotaExceeded")
    assert 90 <= e.value.retry_after <= 100                    # 1 request / 0.01 per s
    assert f"retry in {e.value.retry_after} s" in str(e.value)


def test_errors_without_a_service_body_and_without_an_answer():
    """A proxy's HTML 502 still becomes a RemoteError (type HTTPError, the body's start); a
    closed port is a RemoteError with no status; a bad URL or a missing file is refused before
    any request."""
    r = requests.Response()
    r.status_code, r.reason, r._content = 502, "Bad Gateway", b"<html>upstream down</html>"
    r.headers["Retry-After"] = "7"
    err = refusal(r)
    assert (err.status, err.kind, err.retry_after) == (502, "HTTPError", 7)
    assert err.message == "Bad Gateway: <html>upstream down</html>"
    with pytest.raises(RemoteError) as e:
        MarketClient(f"http://127.0.0.1:{free_port()}", timeout=5).models()
    assert e.value.status is None and e.value.kind == "ConnectionError"
    from snp_ray.errors import ConfigError

    with pytest.raises(ConfigError, match="needs a scheme"):
        MarketClient("127.0.0.1:8000")
    with pytest.raises(ConfigError, match="no file at"):
        MarketClient("http://127.0.0.1:1").upload("/nonexistent.safetensors", UPLOAD_ARCH,
                                                  UPLOAD_CLASSES, "cifar10")
    import pickle

    back = pickle.loads(pickle.dumps(RemoteError(429, "QuotaExceeded", "slow down", 3, ["a"])))
    assert (back.status, back.kind, back.message, back.retry_after, back.close_matches) == (
        429, "QuotaExceeded", "slow down", 3, ["a"])


class _Canned:
    """A stand-in for requests.Session answering GET /v1/models/{id} from a list of states."""

    def __init__(self, answers: list[dict]):
        self.answers, self.calls = list(answers), 0

    def request(self, method, url, **kwargs):
        assert method == "GET" and url.endswith("/v1/models/m1"), (method, url)
        r = requests.Response()
        model = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        r.status_code, r._content = 200, json.dumps({"model": model}).encode()
        r.headers["content-type"] = "application/json"
        return r

    def close(self):
        pass


def _m(state: str, done: int = 0, error: str | None = None, error_type: str | None = None) -> dict:
    return {"id": "m1", "state": state, "progress": {"done": done, "total": 2}, "error": error,
            "error_type": error_type}


def test_wait_ready_follows_states_and_raises_typed_errors():
    """wait_ready returns the ready model after reporting each change once; a failed model is a
    ModelFailedError with the service's reason; a wait past its limit is a RemoteTimeout."""
    seen = []
    session = _Canned([_m("validating"), _m("slicing"), _m("slicing"), _m("slicing", 1),
                       _m("ready", 2)])
    c = MarketClient("http://127.0.0.1:1", session=session)
    out = c.wait_ready("m1", timeout_s=10, poll_s=0.01, on_progress=seen.append)
    assert out == _m("ready", 2) and session.calls == 5
    assert [(m["state"], m["progress"]["done"]) for m in seen] == [
        ("validating", 0), ("slicing", 0), ("slicing", 1), ("ready", 2)]

    failed = _m("failed", error="missing keys: fc.weight", error_type="WeightsError")
    c = MarketClient("http://127.0.0.1:1", session=_Canned([_m("validating"), failed]))
    with pytest.raises(ModelFailedError) as e:
        c.wait_ready("m1", timeout_s=10, poll_s=0.01)
    assert (e.value.kind, e.value.message, e.value.model) == (
        "WeightsError", "missing keys: fc.weight", failed)
    assert str(e.value) == "model 'm1' failed (WeightsError): missing keys: fc.weight"
    c = MarketClient("http://127.0.0.1:1", session=_Canned([_m("failed", error="out of memory")]))
    with pytest.raises(ModelFailedError, match=r"failed \(Error\): out of memory"):
        c.wait_ready("m1", timeout_s=10, poll_s=0.01)

    session = _Canned([_m("slicing", 1)])
    t = time.monotonic()
    with pytest.raises(RemoteTimeout, match=r"still 'slicing' \(progress 1/2\) after 0.3 s") as e:
        MarketClient("http://127.0.0.1:1", session=session).wait_ready("m1", timeout_s=0.3,
                                                                         poll_s=0.05)
    assert isinstance(e.value, TimeoutError) and e.value.model == _m("slicing", 1)
    assert time.monotonic() - t < 2 and session.calls >= 3


# ---------------------------------------------------------------- requesters
def test_pack_predict_and_download_round_trip(live, tmp_path):
    url, market, tokens, _ = live
    c = MarketClient(url, token=tokens["requester"])
    names = {x["name"] for x in c.classes()["classes"]}
    assert set(REQUEST["classes"]) <= names
    meta = c.pack(["frog", "cat", "airplane"], k=5, plan="best")
    assert re.fullmatch(r"[0-9a-f]{24}", meta["id"]) and len(meta["classes"]) == 3
    again = c.pack(REQUEST["classes"], k=5, plan="best")        # the same set: the stored pack
    assert again["id"] == meta["id"] and again["cached"] is True

    imgs = _images(3, seed=4)
    probs = c.predict(meta["id"], [imgs[0], png_bytes(imgs[1]), imgs[2]])
    assert probs.shape == (3, 3) and np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(c.predict(meta["id"], imgs), probs)   # one NxHxWx3 array too
    # the same answer as the raw JSON route, placed in the pack's head order
    raw = requests.post(f"{url}/v1/packs/{meta['id']}/predict", timeout=60,
                        headers={"Authorization": f"Bearer {tokens['requester']}"},
                        files=[("images", (f"{i}.png", png_bytes(x), "image/png"))
                               for i, x in enumerate(imgs)]).json()["predictions"]
    for row, top in zip(probs, raw):
        for entry in top:
            assert row[meta["classes"].index(entry["class"])] == entry["probability"]

    spec = c.download(meta["id"], "spec.json", tmp_path)
    assert spec == tmp_path / f"{meta['id']}-spec.json"
    assert isinstance(json.loads(spec.read_text()), dict)
    direct = requests.get(f"{url}/v1/packs/{meta['id']}/spec.json", timeout=60,
                          headers={"Authorization": f"Bearer {tokens['requester']}"})
    assert spec.read_bytes() == direct.content
    weights = c.download(meta["id"], "model.safetensors", tmp_path / "w.safetensors")
    assert weights.stat().st_size > 1000
    with pytest.raises(RemoteError) as e:
        c.download(meta["id"], "model.pkl", tmp_path / "x")
    assert e.value.status == 404 and not list(tmp_path.glob("x*"))
    from snp_ray.errors import ConfigError

    with pytest.raises(ConfigError, match="uint8 HxWx3"):
        c.predict(meta["id"], [np.zeros((32, 32), np.uint8)])


def test_pack_with_own_samples(live, tmp_path):
    """The multipart form of POST /v1/packs: a requester's own Parquet samples, as a path."""
    from conftest import write_image_parquet

    url, _, tokens, _ = live
    c = MarketClient(url, token=tokens["requester"])
    labels = np.repeat([0, 3], 4)                               # airplane, cat (CIFAR-10 ids)
    path = write_image_parquet(tmp_path / "mine.parquet", _images(8, seed=9), labels,
                               ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                "horse", "ship", "truck"])
    plain = c.pack(["airplane", "cat"], k=5)
    mine = c.pack(["airplane", "cat"], k=5, samples=path)
    assert mine["id"] != plain["id"]
    assert c.pack(["airplane", "cat"], k=5, samples=path.read_bytes())["id"] == mine["id"]


# ---------------------------------------------------------------- developers
@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> tuple[Path, int]:
    """A VGG11 at width 1/8 with random weights for two CIFAR-10 classes: (file, parameters)."""
    import torch
    from safetensors.torch import save_file

    from snp_ray.models import build_model

    torch.manual_seed(0)
    model = build_model("vgg11", len(UPLOAD_CLASSES), 0.125)
    path = tmp_path_factory.mktemp("weights") / "vgg.safetensors"
    save_file(model.state_dict(), path)
    return path, sum(p.numel() for p in model.parameters())


def test_a_developer_uploads_follows_packs_and_removes_a_model(live, weights):
    url, market, tokens, _ = live
    path, params = weights
    dev = MarketClient(url, token=tokens["developer"])
    with pytest.raises(RemoteError) as e:                       # a requester may not upload
        MarketClient(url, token=tokens["requester"]).upload(path, UPLOAD_ARCH, UPLOAD_CLASSES,
                                                            "cifar10", k=5, model_id="up1")
    assert (e.value.status, e.value.kind) == (403, "ForbiddenError")
    import pickle

    with pytest.raises(RemoteError) as e:                       # refused before anything is kept
        dev.upload(pickle.dumps({"w": [1.0]}), UPLOAD_ARCH, UPLOAD_CLASSES, "cifar10", k=5,
                   model_id="up1")
    assert (e.value.status, e.value.kind) == (400, "WeightsError")
    with pytest.raises(RemoteError) as e:
        dev.status("up1")
    assert (e.value.status, e.value.kind) == (404, "ArtifactNotFoundError")

    model = dev.upload(path, UPLOAD_ARCH, UPLOAD_CLASSES, "cifar10", k=5, model_id="up1")
    assert {k: model[k] for k in ("id", "owner", "classes", "params", "dataset", "k")} == {
        "id": "up1", "owner": "developer", "classes": UPLOAD_CLASSES, "params": params,
        "dataset": "cifar10", "k": 5}
    assert model["arch"] in (UPLOAD_ARCH, "vgg11")              # the zoo's name for snp: archs
    assert model["state"] in ("slicing", "ready") and model["progress"]["total"] == 2
    seen: list[dict] = []
    ready = dev.wait_ready("up1", timeout_s=600, poll_s=0.5, on_progress=seen.append)
    assert ready["state"] == "ready" and ready["progress"] == {"done": 2, "total": 2}
    assert ready["error"] is None and seen[-1] == ready
    assert all(m["state"] in ("slicing", "ready") for m in seen)
    assert dev.status("up1") == ready

    listed = {m["id"]: m for m in dev.models()}
    assert listed["up1"] == ready
    smoke = [m for m in listed.values() if m["id"] != "up1"]
    assert len(smoke) == 3 and all(m["owner"] is None and m["state"] == "ready" for m in smoke)
    holders = {c["name"]: [h["model"] for h in c["holders"]] for c in dev.classes()["classes"]}
    assert all("up1" in holders[c] for c in UPLOAD_CLASSES)
    assert not any("up1" in v for c, v in holders.items() if c not in UPLOAD_CLASSES)

    req = MarketClient(url, token=tokens["requester"])
    pack = req.pack(UPLOAD_CLASSES, k=5, plan="all")            # every holder: the upload too
    assert sorted({f["model"] for f in pack["fragments"]} & {"up1"}) == ["up1"]

    with pytest.raises(RemoteError) as e:                       # the same id again: replace=True
        dev.upload(path, UPLOAD_ARCH, UPLOAD_CLASSES, "cifar10", k=5, model_id="up1")
    assert (e.value.status, e.value.kind) == (400, "ModelExistsError")
    with pytest.raises(RemoteError) as e:                       # another developer's model
        MarketClient(url, token=tokens["developer2"]).remove("up1")
    assert (e.value.status, e.value.kind) == (403, "ForbiddenError")
    assert "belongs to 'developer'" in e.value.message
    with pytest.raises(RemoteError) as e:                       # nor the operator's
        dev.remove(smoke[0]["id"])
    assert e.value.status == 403

    out = dev.remove("up1")
    assert out["removed"] == "up1"
    assert out["retired"]["fragments"] == 2 and pack["id"] in out["retired"]["packs"]
    with pytest.raises(RemoteError) as e:
        dev.status("up1")
    assert e.value.status == 404
    with pytest.raises(RemoteError) as e:                       # its pack went with it
        req.pack_info(pack["id"])
    assert e.value.status == 404
    assert "up1" not in {m["id"] for m in dev.models()}


def _snp(*argv: str) -> tuple[int, dict]:
    from snp_ray.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        rc = main([*argv, "--json"])
    return rc, json.loads(out.getvalue().strip().splitlines()[-1])


def test_snp_market_add_list_remove_remote(live, weights, monkeypatch, caplog):
    """`snp market add --remote URL --token T --wait` uploads through the API and follows the
    model to ready (its progress logged); list and remove work the same way; the token may come
    from $SNP_MARKET_TOKEN; refusals are exit 2 with the service's reason."""
    import logging

    url, _, tokens, _ = live
    path, _ = weights
    add = ["market", "add", "--remote", url, "--arch", UPLOAD_ARCH, "--weights", str(path),
           "--classes", ",".join(UPLOAD_CLASSES), "--dataset", "cifar10", "--k", "5", "--id", "cli1"]
    rc, err = _snp(*add)                                        # no token
    assert rc == 2 and err["type"] == "RemoteError" and "HTTP 401, AuthError" in err["error"]
    rc, err = _snp("market", "list", "--store", "x", "--token", "t")
    assert rc == 2 and err["type"] == "ConfigError" and "--remote" in err["error"]

    caplog.set_level(logging.INFO, logger="snp_ray.cli")
    rc, out = _snp(*add, "--token", tokens["developer"], "--wait")
    assert rc == 0, out
    m = out["model"]
    assert (m["id"], m["state"], m["progress"], m["owner"]) == (
        "cli1", "ready", {"done": 2, "total": 2}, "developer")
    logged = [r.getMessage() for r in caplog.records if r.name == "snp_ray.cli"]
    assert logged[0] == "uploaded cli1: slicing" and logged[-1] == "cli1: ready 2/2", logged

    monkeypatch.setenv("SNP_MARKET_TOKEN", tokens["developer"])
    rc, out = _snp("market", "list", "--remote", url)
    assert rc == 0 and {"cli1": "ready"}.items() <= {r["id"]: r["state"] for r in out["models"]}.items()
    rc, err = _snp("market", "remove", "--remote", url, "--id", "cli1", "--token",
                   tokens["developer2"])
    assert rc == 2 and "HTTP 403, ForbiddenError" in err["error"]
    rc, out = _snp("market", "remove", "--remote", url, "--id", "cli1")
    assert rc == 0 and out["removed"] == "cli1" and out["retired"]["fragments"] == 2
    rc, err = _snp("market", "remove", "--remote", url, "--id", "cli1")
    assert rc == 2 and "HTTP 404, ArtifactNotFoundError" in err["error"]


def test_the_developer_tab_uploads_shows_progress_and_removes(browser, live, weights):
    """In Chromium, a developer token: the developer tab uploads the weights, shows the model
    slicing and then ready (as the API says), lists it with its owner, and deletes it."""
    from playwright.sync_api import expect

    url, _, tokens, _ = live
    path, params = weights
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(120_000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("dialog", lambda d: d.accept())                     # the delete confirmation
    try:
        page.goto(url + "/")
        page.fill("#token-input", tokens["developer"])
        page.click("#token-save")
        expect(page.locator("#catalogue-summary")).to_contain_text("classes from 3 models")
        page.click("#tab-developer")
        expect(page.locator("#requester-panel")).to_be_hidden()
        expect(page.locator('[data-testid="model-row"]')).to_have_count(3)
        expect(page.locator("#model-dataset")).to_have_value("cifar10")   # from the catalogue
        page.set_input_files("#model-weights", str(path))
        page.fill("#model-arch", UPLOAD_ARCH)
        page.fill("#model-classes", ", ".join(UPLOAD_CLASSES))
        page.fill("#model-k", "5")
        page.fill("#model-id", "web1")
        page.click("#upload-button")
        expect(page.locator("#upload-model")).to_have_text("web1")
        expect(page.locator("#upload-state")).to_have_text("ready", timeout=600_000)
        expect(page.locator("#upload-count")).to_have_text("2 of 2 classes sliced")
        expect(page.locator("#upload-status")).to_have_text(
            "Model web1 is ready: requesters can pack its classes (airplane, cat).")
        expect(page.locator("#upload-error")).to_be_hidden()
        assert MarketClient(url, token=tokens["developer"]).status("web1")["state"] == "ready"
        row = page.locator('tr[data-model="web1"]')
        expect(row.get_by_test_id("model-state")).to_have_text("ready")
        expect(row.get_by_test_id("model-owner")).to_have_text("developer")
        expect(row.locator("td.num")).to_have_text(f"{params:,}")

        # another developer's model: the service refuses, the page says why
        page.locator('tr[data-model]').first.get_by_test_id("model-delete").click()
        expect(page.locator("#upload-error")).to_contain_text("only its owner or an admin")
        row.get_by_test_id("model-delete").click()
        expect(page.locator("#upload-status")).to_have_text(
            re.compile(r"^Removed web1 with 2 fragments and \d+ packs\.$"))
        expect(page.locator('tr[data-model="web1"]')).to_have_count(0)
        with pytest.raises(RemoteError):
            MarketClient(url, token=tokens["developer"]).status("web1")

        # a refused upload shows the service's message (a requester token may not upload)
        page.fill("#token-input", tokens["requester"])
        page.click("#token-save")
        page.click("#upload-button")
        expect(page.locator("#upload-error")).to_contain_text("has role 'requester'")
        expect(page.locator("#upload-error")).to_contain_text("Your access token's role may not do this.")
        assert errors == []
    finally:
        context.close()


def _failing_slicer(model_id: str, k: int, progress) -> None:
    """A slicer (``Uploads.slicer``) that slices one class, then fails as the slice job does."""
    from snp_ray.errors import EngineError

    progress(1)
    raise EngineError("1 of 2 classes could not be sliced; class 3: out of memory")


def test_a_failed_slicing_reaches_the_client_as_model_failed_error(live, weights, monkeypatch):
    url, _, tokens, service = live
    monkeypatch.setattr(service.uploads, "slicer", _failing_slicer)
    dev = MarketClient(url, token=tokens["developer"])
    dev.upload(weights[0], UPLOAD_ARCH, UPLOAD_CLASSES, "cifar10", k=5, model_id="bad1")
    with pytest.raises(ModelFailedError) as e:
        dev.wait_ready("bad1", timeout_s=120, poll_s=0.2)
    assert (e.value.kind, e.value.message) == (
        "EngineError", "1 of 2 classes could not be sliced; class 3: out of memory")
    assert e.value.model["state"] == "failed" and e.value.model["progress"] == {"done": 1, "total": 2}
    assert dev.status("bad1")["state"] == "failed"
    assert dev.remove("bad1")["removed"] == "bad1"


def test_the_developer_tab_shows_why_an_upload_failed(browser, live, weights, monkeypatch):
    from playwright.sync_api import expect

    url, _, tokens, service = live
    monkeypatch.setattr(service.uploads, "slicer", _failing_slicer)
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(120_000)
    try:
        page.goto(url + "/#develop")                            # the tab opens from its link
        page.fill("#token-input", tokens["developer"])
        page.click("#token-save")
        expect(page.locator("#developer-panel")).to_be_visible()
        page.set_input_files("#model-weights", str(weights[0]))
        page.fill("#model-arch", UPLOAD_ARCH)
        page.fill("#model-classes", ",".join(UPLOAD_CLASSES))
        page.fill("#model-dataset", "cifar10")
        page.fill("#model-k", "5")
        page.fill("#model-id", "bad2")
        page.click("#upload-button")
        expect(page.locator("#upload-state")).to_have_text("failed")
        expect(page.locator("#upload-error")).to_have_text(
            "Error: Model bad2 failed: EngineError: 1 of 2 classes could not be sliced; class 3: "
            "out of memory")
        expect(page.locator('tr[data-model="bad2"]').get_by_test_id("model-state")).to_have_text("failed")
        expect(page.locator("#upload-button")).to_be_enabled()
    finally:
        context.close()
        with contextlib.suppress(RemoteError):                  # absent if the upload was refused
            MarketClient(url, token=tokens["admin"]).remove("bad2")

"""Who may use the market service (issue #26): tokens, roles, quotas, and the service's browser
and network defences (content types, the Host allow-list, no CORS by default, no server paths in
error bodies). In-process (FastAPI's TestClient over ``create_api``), over a copy of the sliced
smoke market, as tests/test_serve.py does.
"""
from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from conftest import png_bytes
from snp_ray.errors import QuotaExceeded, UnprotectedServiceError
from snp_ray.serve.accounts import Accounts, Limits, Principal, Quotas, accounts_path, digest
from snp_ray.serve.api import create_api, error_body
from snp_ray.serve.config import ServeConfig
from snp_ray.serve.service import LocalPredictor, MarketService
from test_serve import REQUEST, market  # noqa: F401  (market: a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

NO_PACK = "0123456789abcdef01234567"


def _app(market: Path, **cfg):
    service = MarketService(ServeConfig(**{"market": str(market), "preset": "smoke", **cfg}))
    return create_api(service, LocalPredictor(service.packs, 2))


def _client(market: Path, base_url: str = "http://testserver", **cfg):
    from fastapi.testclient import TestClient

    return TestClient(_app(market, **cfg), base_url=base_url, raise_server_exceptions=False)


def _token(market: Path, role: str = "requester", name: str = "alice", **limits) -> str:
    return Accounts(market / "accounts.sqlite").create(name, role, Limits(**limits))[0]


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _image() -> dict:
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return {"files": [("images", ("x.png", png_bytes(img), "image/png"))]}


#: every API route, with a request that gets past the token check (and fails later, cheaply)
ROUTES = [("get", "/v1/classes", {}), ("post", "/v1/packs", {"json": {"classes": []}}),
          ("get", f"/v1/packs/{NO_PACK}", {}), ("get", f"/v1/packs/{NO_PACK}/spec.json", {}),
          ("post", f"/v1/packs/{NO_PACK}/predict", {"json": {"images": []}}),
          ("get", "/openapi.json", {}), ("get", "/v1/models", {})]


# ---------------------------------------------------------------- tokens and roles
def test_once_a_token_exists_every_api_route_needs_a_valid_one(market):
    """Open on loopback while no token exists; then missing, malformed, unknown and revoked tokens
    are 401s on every API route, while the page, its files and health stay public."""
    with _client(market) as c:
        assert c.get("/v1/classes").status_code == 200          # no token yet: open on loopback
        token = _token(market)
        for method, path, kwargs in ROUTES:
            for headers in ({}, {"Authorization": "Basic dXNlcjpwdw=="}, _auth("snp_guess"),
                            _auth(token[:-1])):
                r = getattr(c, method)(path, headers=headers, **kwargs)
                assert r.status_code == 401, (path, headers, r.status_code, r.text)
                assert r.json()["type"] == "AuthError" and r.json()["error"]
                assert r.headers["www-authenticate"].startswith("Bearer")
            r = getattr(c, method)(path, headers=_auth(token), **kwargs)
            assert r.status_code in (200, 400, 404), (path, r.status_code, r.text)
        for path in ("/", "/static/app.js", "/static/style.css", "/v1/health", "/-/healthz"):
            assert c.get(path).status_code == 200, path
        assert "/v1/packs" in c.get("/openapi.json", headers=_auth(token)).json()["paths"]
        assert c.get("/docs").status_code == 404
        Accounts(market / "accounts.sqlite").revoke("alice")
        r = c.get("/v1/classes", headers=_auth(token))
        assert r.status_code == 401 and "revoked" in r.json()["error"]


def test_a_role_may_only_do_its_own_work(market):
    """A developer token reads the catalogue but may not pack, read packs or predict (403); a
    requester and an admin may."""
    with _client(market) as c:
        tokens = {role: _token(market, role, role) for role in ("developer", "requester", "admin")}
        for role, token in tokens.items():
            assert c.get("/v1/classes", headers=_auth(token)).status_code == 200, role
            for method, path, kwargs in ROUTES[1:5]:     # the requester's routes
                r = getattr(c, method)(path, headers=_auth(token), **kwargs)
                if role == "developer":
                    assert r.status_code == 403, (path, r.text)
                    assert r.json()["type"] == "ForbiddenError" and "requester" in r.json()["error"]
                else:
                    assert r.status_code in (400, 404), (role, path, r.status_code, r.text)


def test_a_principal_owns_what_it_added_and_an_admin_owns_everything():
    dev = Principal("tok-1", "dev", "developer")
    assert dev.owns("tok-1") and not dev.owns("tok-2") and not dev.owns(None)
    assert Principal("tok-9", "root", "admin").owns("tok-1")
    assert dev.may("models") and not dev.may("pack")
    assert not Principal("tok-3", "req", "requester").may("models")


# ---------------------------------------------------------------- quotas
def test_quotas_count_real_builds_and_prediction_requests(market):
    """Two builds an hour: a stored pack answered again does not count, a third new pack is a
    429 with Retry-After (about an hour), and a stored pack is still answered after that. A
    prediction rate of 0.01/s allows one request, then 429s."""
    other = {"classes": ["dog", "ship"], "k": 5}
    third = {"classes": ["bird", "deer"], "k": 5}
    with _client(market) as c:
        auth = _auth(_token(market, packs_per_hour=2, predictions_per_second=0.01))
        first = c.post("/v1/packs", json=REQUEST, headers=auth).json()
        assert first["cached"] is False
        assert c.post("/v1/packs", json=REQUEST, headers=auth).json()["cached"] is True
        assert c.post("/v1/packs", json=other, headers=auth).json()["cached"] is False
        refused = c.post("/v1/packs", json=third, headers=auth)
        assert refused.status_code == 429, refused.text
        assert refused.json()["type"] == "QuotaExceeded"
        assert 3500 <= int(refused.headers["retry-after"]) <= 3600
        again = c.post("/v1/packs", json=REQUEST, headers=auth)
        assert again.status_code == 200 and again.json()["cached"] is True
        path = f"/v1/packs/{first['id']}/predict"
        assert c.post(path, headers=auth, **_image()).status_code == 200
        r = c.post(path, headers=auth, **_image())
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 90, r.text
        # another token has its own quotas
        assert c.post(path, headers=_auth(_token(market, name="bob")), **_image()).status_code == 200


def test_concurrent_builds_are_limited_per_token(tmp_path):
    accounts = Accounts(tmp_path / "accounts.sqlite")
    _, info = accounts.create("carol", "requester", Limits(concurrent_builds=1))
    carol = Principal(info.id, info.name, info.role, info.limits)
    quotas = Quotas(accounts)
    quotas.start_build(carol)
    with pytest.raises(QuotaExceeded, match="under way") as e:
        quotas.start_build(carol)
    assert e.value.retry_after >= 1
    quotas.end_build(carol, built=False)
    quotas.start_build(carol)                   # released: a new build may start
    quotas.end_build(carol, built=True)
    assert accounts.builds_since(carol.id, 0)[0] == 1


# ---------------------------------------------------------------- browser and network defences
def test_json_routes_take_json_or_their_multipart_only(market):
    """415 for bodies that a cross-site form could send (text/plain, urlencoded) or that say
    nothing; multipart reaches the route's own checks (400, not 415)."""
    with _client(market) as c:
        for path in ("/v1/packs", f"/v1/packs/{NO_PACK}/predict"):
            for headers in ({"content-type": "text/plain"},
                            {"content-type": "application/x-www-form-urlencoded"}, {}):
                r = c.post(path, content=json.dumps(REQUEST), headers=headers)
                assert r.status_code == 415, (path, headers, r.text)
                assert r.json()["type"] == "UnsupportedMediaType"
        r = c.post("/v1/packs", files=[("request", (None, json.dumps(REQUEST)))])
        assert r.status_code == 400 and "missing ['samples']" in r.json()["error"]


def test_only_allowed_host_names_are_answered(market):
    """A DNS-rebinding page reaches the service under its own name: 400, even for the page."""
    with _client(market, base_url="http://evil.example:8000") as c:
        for path in ("/", "/v1/classes", "/v1/health"):
            r = c.get(path)
            assert r.status_code == 400 and r.json()["type"] == "HostNotAllowedError", (path, r.text)
    for base in ("http://127.0.0.1:8000", "http://localhost", "http://[::1]:8000"):
        with _client(market, base_url=base) as c:
            assert c.get("/v1/classes").status_code == 200, base
    with _client(market, base_url="http://market.example", allowed_hosts=["Market.Example"]) as c:
        assert c.get("/v1/classes").status_code == 200


def test_no_cors_headers_by_default_and_no_cross_site_posts(market):
    origin = {"Origin": "https://evil.example"}
    with _client(market) as c:
        r = c.get("/v1/classes", headers=origin)
        assert r.status_code == 200
        assert not [h for h in r.headers if h.lower().startswith("access-control-")]
        pre = c.options("/v1/packs", headers={**origin, "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in pre.headers
        r = c.post("/v1/packs", json=REQUEST, headers=origin)
        assert r.status_code == 403 and r.json()["type"] == "ForbiddenError", r.text
        same = c.post("/v1/packs", json={"classes": []}, headers={"Origin": "http://testserver"})
        assert same.status_code == 400                     # the page's own origin gets through
    with _client(market, cors_origins=["https://app.example"]) as c:
        r = c.get("/v1/classes", headers={"Origin": "https://app.example"})
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        r = c.post("/v1/packs", json={"classes": []}, headers={"Origin": "https://app.example"})
        assert r.status_code == 400


def test_error_bodies_carry_no_server_path(market, monkeypatch):
    root = str(market.resolve())
    with _client(market) as c:
        r = c.get(f"/v1/packs/{NO_PACK}")                 # the store's message names its folder
        assert r.status_code == 404 and "<market>" in r.json()["error"], r.text
        assert root not in r.text and "/tmp/" not in r.text

    def broken(*a, **k):
        raise RuntimeError(f"disk trouble at {root}/packs/x")
    monkeypatch.setattr(MarketService, "classes", broken)
    with _client(market) as c:
        r = c.get("/v1/classes")
        assert r.status_code == 500 and r.json()["type"] == "InternalError"
        assert root not in r.text
    from snp_ray.errors import StoreError

    body = error_body(StoreError("cannot read /tmp/elsewhere/x.json; POST /v1/packs/ab/predict"))
    assert body["error"] == "cannot read <path>; POST /v1/packs/ab/predict", body


# ---------------------------------------------------------------- the token database and the CLI
def test_tokens_are_stored_hashed(tmp_path):
    accounts = Accounts(tmp_path / "accounts.sqlite")
    tokens = [accounts.create(f"user{i}", "requester")[0] for i in range(3)]
    files = b"".join(p.read_bytes() for p in tmp_path.glob("accounts.sqlite*"))
    for token in tokens:
        assert token.encode() not in files
        assert digest(token).encode() in files          # what is stored instead
    rows = sqlite3.connect(tmp_path / "accounts.sqlite").execute("SELECT * FROM tokens").fetchall()
    assert not any(t in map(str, row) for row in rows for t in tokens)
    assert accounts.verify(tokens[1]).name == "user1"


def test_snp_tokens_create_list_revoke(market, capsys):
    from snp_ray.cli import main

    args = ["--market", str(market), "--json"]
    assert main(["tokens", "create", "--role", "requester", "--name", "dana",
                 "--packs-per-hour", "3", *args]) == 0
    made = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert made["token"].startswith("snp_") and made["packs_per_hour"] == 3
    with _client(market) as c:
        assert c.get("/v1/classes").status_code == 401
        assert c.get("/v1/classes", headers=_auth(made["token"])).status_code == 200
        assert main(["tokens", "list", *args]) == 0
        out = capsys.readouterr().out
        assert made["token"] not in out
        listed = json.loads(out.strip().splitlines()[-1])["tokens"]
        assert [(t["id"], t["name"], t["role"], t["revoked"]) for t in listed] == [
            (made["id"], "dana", "requester", None)]
        assert set(listed[0]) == {"id", "name", "role", "created", "revoked", "packs_per_hour",
                                  "concurrent_builds", "predictions_per_second"}
        assert main(["tokens", "create", "--role", "admin", "--name", "dana", *args]) == 2
        with pytest.raises(SystemExit):                  # argparse: not one of the roles
            main(["tokens", "create", "--role", "owner", "--name", "x", *args])
        capsys.readouterr()
        assert main(["tokens", "revoke", made["id"], *args]) == 0
        assert c.get("/v1/classes", headers=_auth(made["token"])).status_code == 401
    assert main(["tokens", "list", "--market", str(market / "nowhere")]) == 2


def test_a_service_beyond_loopback_needs_a_token_or_insecure_open(market, capsys):
    """`snp serve --host 0.0.0.0` with no token is refused before Ray starts; the API refuses it
    too (serve run), unless insecure_open (then no token is asked, even once one exists)."""
    from snp_ray.cli import main

    assert main(["serve", "--market", str(market), "--host", "0.0.0.0", "--json"]) == 2
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["type"] == \
        "UnprotectedServiceError"
    with pytest.raises(UnprotectedServiceError, match="--insecure-open"):
        _app(market, host="0.0.0.0")
    assert not accounts_path(ServeConfig(market=str(market))).exists()   # nothing was created
    with _client(market, host="0.0.0.0", insecure_open=True) as c:
        _token(market)
        assert c.get("/v1/classes").status_code == 200
    with _client(market, host="0.0.0.0") as c:            # a token exists now: it starts, closed
        assert c.get("/v1/classes").status_code == 401


# ---------------------------------------------------------------- the web page with a token
@pytest.fixture
def page_server(market):
    """The API (no Ray Serve) under uvicorn on a free loopback port, in a thread: its URL."""
    from conftest import free_port, serve_in_thread

    port = free_port()
    server, thread = serve_in_thread(_app(market, port=port), port)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(10)


def test_the_page_takes_a_token_and_shows_refusals_plainly(browser, page_server, market):
    """Without a token the page says one is needed (401); with one typed in, it loads the
    catalogue, packs, downloads through the token, and shows a spent quota (429) plainly."""
    from playwright.sync_api import expect

    from test_web import CLASSES

    token = _token(market, packs_per_hour=1)
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(60_000)
    try:
        page.goto(page_server)
        expect(page.locator("#error")).to_contain_text("needs an access token")
        expect(page.locator('[data-testid="class-option"]')).to_have_count(0)
        page.fill("#token-input", "snp_wrong")
        page.click("#token-save")
        expect(page.locator("#error")).to_contain_text("was refused")
        page.fill("#token-input", token)
        page.click("#token-save")
        expect(page.locator('[data-testid="class-option"]')).not_to_have_count(0)
        expect(page.locator("#error")).to_be_hidden()
        assert page.evaluate("() => sessionStorage.getItem('snp-market-token')") == token
        assert page.locator("#token-input").input_value() == ""       # not left on screen

        for name in CLASSES:
            page.locator(f'#class-list li[data-class="{name}"] input').check()
        page.select_option("#k-select", "5")
        page.click("#pack-button")
        expect(page.locator("#pack-id")).to_have_text(re.compile(r"^[0-9a-f]{24}$"))
        with page.expect_download() as info:
            page.click("#download-spec")
        pid = page.locator("#pack-id").inner_text()
        assert info.value.suggested_filename == f"{pid}-spec.json"
        import httpx

        stored = httpx.get(f"{page_server}v1/packs/{pid}/spec.json", headers=_auth(token))
        assert Path(info.value.path()).read_bytes() == stored.content and stored.status_code == 200

        page.locator('#class-list li[data-class="dog"] input').check()   # a new pack: over quota
        page.click("#pack-button")
        expect(page.locator("#error")).to_contain_text("Too many requests for your token")
        expect(page.locator("#error")).to_contain_text("try again in")
    finally:
        context.close()

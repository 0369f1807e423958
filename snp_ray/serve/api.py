"""The HTTP surface of the market (FastAPI): JSON endpoints, downloads and the web page.

:func:`create_api` is plain FastAPI over a :class:`MarketService`; Ray Serve wraps it as the
ingress (``deploy.py``) and tests can call it directly. Predictions go through ``predict(pack id,
raw inputs) -> probabilities``: in Serve, the multiplexed and batched predictor deployment.
Every refusal is a 4xx with a JSON body ``{"error", "type"}`` naming the problem, and no server
path. Developers upload models (``POST /v1/models``, multipart, its own body limit
``max_upload_bytes``), follow them (``GET /v1/models[/{id}]``) and remove them (``DELETE``):
``uploads.py``. Access: every API route but health needs a token of a role that may do it (``accounts.py``;
open on loopback until a token exists); only the allowed host names are answered (DNS
rebinding), unsafe requests from another site's page are refused, and CORS is off unless
``cors_origins`` names sites.
"""
from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from snp_ray.errors import (ArtifactNotFoundError, AuthError, DataError, ForbiddenError,
                            HostNotAllowedError, PayloadTooLarge, QuotaExceeded, SnpError,
                            StoreError, UnknownNameError, UnsupportedMediaType)
from snp_ray.serve.accounts import LOOPBACK_NAMES, Gate, Principal, Quotas
from snp_ray.serve.images import decode_base64, decode_batch
from snp_ray.serve.packstore import FILES
from snp_ray.serve.redact import hidden_roots, scrub
from snp_ray.serve.uploads import UploadSpec
from snp_ray.serve.service import MarketService, top_classes

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
MEDIA = {"model.onnx": "application/octet-stream", "model.pt2": "application/zip",
         "model.safetensors": "application/octet-stream", "spec.json": "application/json"}
Predict = Callable[[str, Any], Awaitable[np.ndarray]]


def status_of(e: SnpError) -> int:
    if isinstance(e, PayloadTooLarge):
        return 413
    for kind, status in ((AuthError, 401), (ForbiddenError, 403), (QuotaExceeded, 429),
                         (UnsupportedMediaType, 415), (HostNotAllowedError, 400)):
        if isinstance(e, kind):
            return status
    if isinstance(e, ArtifactNotFoundError) or (isinstance(e, UnknownNameError)
                                                 and e.kind == "class"):
        return 404
    if isinstance(e, StoreError):
        return 500
    return 400


def error_body(e: Exception, hide: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The JSON body of every refusal. Server paths never reach a client: ``hide`` maps known
    roots (the market folder) to placeholders, and any other absolute path under an existing
    top-level folder reads ``<path>``."""
    if isinstance(e, StarletteHTTPException):
        message, kind = f"{e.detail} ({e.status_code})", "HTTPError"
    elif isinstance(e, RequestValidationError):
        message, kind = f"malformed request: {e.errors()}", "ConfigError"
    else:
        message, kind = str(e), type(e).__name__
    body = {"error": scrub(message, hide or {}), "type": kind}
    if isinstance(e, UnknownNameError):
        body["close_matches"] = e.close
    return body


async def send_refusal(send, status: int, e: SnpError) -> None:
    """Answer an ASGI request with ``e``'s JSON body (middleware refusals, before any route)."""
    payload = json.dumps(error_body(e)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def host_name(value: str) -> str:
    """The host name of a ``Host`` header or netloc, lower case, without port or brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return (value.rsplit(":", 1)[0] if value.count(":") == 1 else value).rstrip(".")


def netloc(value: str) -> str:
    """``host[:port]`` of an origin or ``Host`` header, default ports dropped."""
    scheme, _, rest = value.strip().lower().rpartition("://")
    for default in ((":80",) if scheme == "http" else (":443",) if scheme == "https" else (":80", ":443")):
        rest = rest.removesuffix(default)
    return rest


class HostGuard:
    """ASGI middleware: answer only requests for an allowed host name (a DNS-rebinding page
    reaches a loopback service under the attacker's name), and refuse unsafe requests that a
    browser sends from another site's page (cross-site form posts), unless that origin is in
    ``origins``."""

    UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})

    def __init__(self, app, hosts: set[str], origins: set[str]):
        self.app, self.hosts, self.origins = app, hosts, origins

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1")
        if "*" not in self.hosts and host_name(host) not in self.hosts:
            return await send_refusal(send, 400, HostNotAllowedError(
                f"this service does not answer for the host {host_name(host)[:100]!r}; its "
                "operator can allow it (snp serve --allowed-host NAME)"))
        origin = headers.get(b"origin")
        if origin is not None and scope.get("method") in self.UNSAFE:
            text = origin.decode("latin-1")
            if "*" not in self.origins and text not in self.origins and netloc(text) != netloc(host):
                return await send_refusal(send, 403, ForbiddenError(
                    f"a {scope['method']} from the web page of {text[:100]!r} is refused: this "
                    "service takes browser requests from its own pages (ServeConfig.cors_origins "
                    "allows others)"))
        return await self.app(scope, receive, send)


def allowed_hosts(cfg) -> set[str]:
    """The loopback names, the bound host and ``cfg.allowed_hosts``. Also ``testserver``, the
    name Starlette's TestClient sends: a single-label name that public DNS does not resolve, so
    a rebinding page cannot be served under it."""
    names = {*LOOPBACK_NAMES, "testserver"} | {h if h == "*" else host_name(h) for h in cfg.allowed_hosts}
    if cfg.host not in ("", "0.0.0.0", "::"):       # a bind address: no port, maybe brackets
        names.add(cfg.host.strip("[]").lower())
    return names


class BodyLimit:
    """ASGI middleware: refuse bodies over ``max_bytes`` (declared or streamed) with a 413;
    ``routes`` maps (method, path) to a route's own limit (a model upload carries weights)."""

    def __init__(self, app, max_bytes: int, routes: Mapping[tuple[str, str], int] | None = None):
        self.app, self.max_bytes, self.routes = app, max_bytes, dict(routes or {})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, root = scope.get("path", ""), scope.get("root_path", "")
        path = path[len(root):] if root and path.startswith(root) else path   # under a prefix
        limit = self.routes.get((scope.get("method", ""), path.rstrip("/")), self.max_bytes)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
            return await self._refuse(send, int(declared), limit)
        seen, started = 0, False

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise PayloadTooLarge(f"the request body is over {limit:,} bytes")
            return message

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except PayloadTooLarge:
            if not started:
                await self._refuse(send, seen, limit)

    async def _refuse(self, send, size: int, limit: int) -> None:
        await send_refusal(send, 413, PayloadTooLarge(
            f"the request body ({size:,} bytes) is over the limit of {limit:,} bytes"))


def create_api(service: MarketService, predict: Predict) -> FastAPI:
    cfg = service.cfg
    # the API description is a route like the others (a token once tokens exist); no Swagger
    # page, which would fetch it without one
    app = FastAPI(title="snp_ray market", summary="Slice-and-Pack: a model for your classes, now",
                  docs_url=None, redoc_url=None, openapi_url=None)
    gate = Gate.for_service(cfg)                 # refuses an unprotected non-loopback host
    quotas = Quotas(gate.accounts)
    hide = hidden_roots(cfg)
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes,
                       routes={("POST", "/v1/models"): cfg.max_upload_bytes})
    if cfg.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins),
                           allow_methods=["GET", "POST", "DELETE"], expose_headers=["Retry-After"],
                           allow_headers=["authorization", "content-type", "serve_multiplexed_model_id"])
    app.add_middleware(HostGuard, hosts=allowed_hosts(cfg), origins=set(cfg.cors_origins))

    def allow(action: str):
        """A route's access rule: the request's principal, if its role may do ``action``."""
        async def principal(request: Request) -> Principal:
            return gate.who(request.headers.get("authorization")).require(action)
        return Depends(principal)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(_: Principal = allow("catalogue")) -> dict[str, Any]:
        return app.openapi()

    @app.exception_handler(SnpError)
    async def refused(_: Request, e: SnpError):
        headers = {}
        if isinstance(e, AuthError):
            headers["WWW-Authenticate"] = 'Bearer realm="snp_ray market"'
        if isinstance(e, QuotaExceeded):
            headers["Retry-After"] = str(e.retry_after)
        return JSONResponse(error_body(e, hide), status_code=status_of(e), headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException):
        return JSONResponse(error_body(e, hide), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def malformed(_: Request, e: RequestValidationError):
        return JSONResponse(error_body(e, hide), status_code=400)

    @app.exception_handler(Exception)
    async def failed(_: Request, e: Exception):
        log.error("unexpected error answering a request", exc_info=e)
        return JSONResponse({"error": "the service failed on this request (its log has the "
                                      "details)", "type": "InternalError"}, status_code=500)

    # Under Ray Serve the proxy itself answers /-/healthz (200, "success"): /v1/health is ours
    @app.get("/-/healthz")
    @app.get("/v1/health")
    async def healthz() -> dict[str, Any]:
        # the catalogue as last read (never re-read for a probe), off the event loop
        return await asyncio.to_thread(service.health)

    @app.get("/v1/classes", dependencies=[allow("catalogue")])
    async def classes() -> dict[str, Any]:
        return await asyncio.to_thread(service.classes)

    def stored(body: Any, samples: bytes | None) -> bool:
        return service.packs.lookup(service.parse(body, samples).digest) is not None

    @app.post("/v1/packs")
    async def make_pack(request: Request, who: Principal = allow("pack")) -> dict[str, Any]:
        body, samples = await pack_request_parts(request)
        try:
            quotas.start_build(who)
        except QuotaExceeded:
            if not await asyncio.to_thread(stored, body, samples):
                raise
            return await asyncio.to_thread(service.pack, body, samples)   # no build: no quota
        built = False
        try:
            answer = await asyncio.to_thread(service.pack, body, samples)
            built = not answer.get("cached", False)
            return answer
        finally:
            await asyncio.to_thread(quotas.end_build, who, built)

    @app.get("/v1/packs/{pid}", dependencies=[allow("download")])
    async def pack_meta(pid: str) -> dict[str, Any]:
        return service.meta(pid)

    @app.get("/v1/packs/{pid}/{name}", dependencies=[allow("download")])
    async def pack_file(pid: str, name: str):
        if name not in FILES:
            raise ArtifactNotFoundError(f"no file {name!r} in a pack; files: {list(FILES)}")
        path = await asyncio.to_thread(service.packs.file, pid, name)
        return FileResponse(path, media_type=MEDIA[name], filename=f"{pid}-{name}")

    @app.post("/v1/packs/{pid}/predict")
    async def predict_route(pid: str, request: Request, who: Principal = allow("predict")
                            ) -> dict[str, Any]:
        media_type(request, PREDICT_FORMS)      # refused before any work
        quotas.predict(who)
        meta = service.meta(pid)
        raw = await _inputs(request, meta, cfg.max_images)
        probs = np.asarray(await predict(pid, raw))
        return {"id": pid, "predictions": top_classes(meta, probs)}

    # ---------------------------------------------------------------- developers' models
    @app.post("/v1/models", status_code=202)
    async def upload_model(request: Request, who: Principal = allow("models")):
        spec, weights, fewshot = await upload_parts(request)
        quotas.start_build(who)              # an upload is a build: it starts a slicing job
        accepted = False
        try:
            model = await asyncio.to_thread(service.uploads.add, who, spec, weights, fewshot)
            accepted = True
        finally:
            await asyncio.to_thread(quotas.end_build, who, accepted)
        return JSONResponse({"model": model}, status_code=202)

    @app.get("/v1/models", dependencies=[allow("catalogue")])
    async def list_models() -> dict[str, Any]:
        return {"models": await asyncio.to_thread(service.uploads.list)}

    @app.get("/v1/models/{mid}", dependencies=[allow("catalogue")])
    async def get_model(mid: str) -> dict[str, Any]:
        return {"model": await asyncio.to_thread(service.uploads.describe, mid)}

    @app.delete("/v1/models/{mid}")
    async def delete_model(mid: str, who: Principal = allow("models")) -> dict[str, Any]:
        return await asyncio.to_thread(service.uploads.remove, who, mid)

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


#: the deepest nesting a request's JSON may have (a pack request is 3 deep)
MAX_JSON_DEPTH = 16


def parse_json(raw: bytes | str, what: str) -> Any:
    """JSON from a client, bounded in nesting: 100,000 ``[`` made ``json.loads`` raise a
    RecursionError (a 500); a deep but parsable document would reach every walker after it."""
    try:
        value = json.loads(raw)
    except RecursionError:
        raise DataError(f"{what} nests deeper than {MAX_JSON_DEPTH} levels") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{what} is not valid JSON ({e})") from None
    stack = [(value, 1)]
    while stack:                      # iterative: the check itself must not recurse
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise DataError(f"{what} nests deeper than {MAX_JSON_DEPTH} levels")
            stack.extend((v, depth + 1) for v in (node.values() if isinstance(node, dict) else node))
    return value


async def json_body(request: Request) -> Any:
    return parse_json(await request.body(), "the request body")


PACK_REQUEST_FORMS = ("send the pack request as application/json, or as multipart/form-data with "
                      "a 'request' part (the JSON object) and a 'samples' part (a Parquet file)")


PREDICT_FORMS = ("send images as multipart/form-data files, or JSON {\"images\": [base64, ...]} "
                 "(image packs) or {\"texts\": [...]} (text packs)")


def media_type(request: Request, forms: str,
               takes: tuple[str, ...] = ("application/json", "multipart/form-data")) -> str:
    """The body's media type, one of ``takes`` (by default the two a route takes); anything
    else (or nothing) is a 415, so that a cross-site form cannot post here without a CORS
    preflight (text/plain, urlencoded)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in takes:
        raise UnsupportedMediaType(f"{forms}; got " + (f"content-type {ctype[:100]!r}" if ctype
                                                       else "no content-type"))
    return ctype


async def form_parts(request: Request, forms: str, required: set[str],
                     optional: set[str] = frozenset(), files: dict[str, str] | None = None
                     ) -> dict[str, Any]:
    """A multipart body's parts by name: each of ``required`` once, ``optional`` at most once,
    nothing else (a DataError naming what is wrong); the parts in ``files`` (name -> what the
    file is) must be file uploads."""
    allowed = set(required) | set(optional)
    form = await request.form(max_files=len(allowed), max_fields=len(allowed))
    parts = {name: [v for n, v in form.multi_items() if n == name] for name, _ in form.multi_items()}
    unknown = sorted(set(parts) - allowed)
    missing = sorted(set(required) - set(parts))
    if unknown or missing or any(len(v) > 1 for v in parts.values()):
        raise DataError(f"{forms}; got parts {[p[:40] for p in sorted(parts)][:10]}"
                        + (f" (missing {missing})" if missing else "")
                        + (f" (unknown {[u[:40] for u in unknown][:10]})" if unknown else ""))
    for name, kind in (files or {}).items():
        if name in parts and not hasattr(parts[name][0], "read"):
            raise DataError(f"the {name!r} part must be a file upload ({kind}), "
                            f"e.g. curl -F {name}=@FILE")
    return {name: values[0] for name, values in parts.items()}


async def json_part(part: Any, what: str) -> Any:
    """A part holding JSON, sent as a field or as a file."""
    return parse_json(await part.read() if hasattr(part, "read") else part.encode(), what)


async def pack_request_parts(request: Request) -> tuple[Any, bytes | None]:
    """A pack request's JSON object and, for a multipart upload, the requester's Parquet file."""
    if media_type(request, PACK_REQUEST_FORMS) == "multipart/form-data":
        parts = await form_parts(request, PACK_REQUEST_FORMS, {"request", "samples"},
                                 files={"samples": "a Parquet file"})
        return await json_part(parts["request"], "the 'request' part"), await parts["samples"].read()
    return await json_body(request), None


UPLOAD_FORMS = ("send a model as multipart/form-data with a 'weights' part (a safetensors "
                "file), a 'spec' part (a JSON object: arch, classes, dataset, and optionally k, "
                "seed, id, input_size, mean, std, replace) and optionally a 'fewshot' part (a "
                "Parquet file in the dataset's schema)")


async def upload_parts(request: Request) -> tuple[UploadSpec, bytes, bytes | None]:
    """A model upload's spec, weights and optional few-shot file (multipart only: 415 else)."""
    media_type(request, UPLOAD_FORMS, takes=("multipart/form-data",))
    parts = await form_parts(request, UPLOAD_FORMS, {"weights", "spec"}, {"fewshot"},
                             files={"weights": "a safetensors file", "fewshot": "a Parquet file"})
    spec = UploadSpec.parse(await json_part(parts["spec"], "the 'spec' part"))
    weights = await parts["weights"].read()
    fewshot = await parts["fewshot"].read() if "fewshot" in parts else None
    return spec, weights, fewshot


async def _inputs(request: Request, meta: dict[str, Any], max_images: int) -> Any:
    """The request's inputs as a pack takes them: uint8 images (multipart files or a JSON list
    of base64 strings) for image packs, a list of strings for text packs."""
    if media_type(request, PREDICT_FORMS) == "multipart/form-data":
        if meta["modality"] != "image":
            raise DataError("file uploads are for image packs; send {\"texts\": [...]} here")
        form = await request.form(max_files=max_images, max_fields=max_images)
        files = [v for _, v in form.multi_items() if hasattr(v, "read")]
        blobs = [await f.read() for f in files]
        return await asyncio.to_thread(decode_batch, blobs,
                                       [f"image {i} ({f.filename})" for i, f in enumerate(files)])
    body = await json_body(request)
    if not isinstance(body, dict):
        raise DataError(PREDICT_FORMS)
    if meta["modality"] == "image":
        items = body.get("images")
        if not isinstance(items, list) or not items or len(items) > max_images:
            raise DataError(f"'images' must be a list of 1 to {max_images} base64 strings")
        blobs = [decode_base64(x, f"image {i}") for i, x in enumerate(items)]
        return await asyncio.to_thread(decode_batch, blobs, [f"image {i}" for i in range(len(blobs))])
    texts = body.get("texts")
    if (not isinstance(texts, list) or not texts or len(texts) > max_images
            or not all(isinstance(t, str) for t in texts)):
        raise DataError(f"'texts' must be a list of 1 to {max_images} strings")
    return texts

"""The HTTP surface of the market (FastAPI): JSON endpoints, downloads and the web page.

:func:`create_api` is plain FastAPI over a :class:`MarketService`; Ray Serve wraps it as the
ingress (``deploy.py``) and tests can call it directly. Predictions go through ``predict(pack id,
raw inputs) -> probabilities``: in Serve, the multiplexed and batched predictor deployment.
Every refusal is a 4xx with a JSON body ``{"error", "type"}`` naming the problem.
"""
from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any, Awaitable, Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from snp_ray.errors import (ArtifactNotFoundError, DataError, PayloadTooLarge, SnpError,
                            StoreError, UnknownNameError)
from snp_ray.serve.images import decode_base64, decode_batch
from snp_ray.serve.packstore import FILES
from snp_ray.serve.service import MarketService, top_classes

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
MEDIA = {"model.onnx": "application/octet-stream", "model.pt2": "application/zip",
         "model.safetensors": "application/octet-stream", "spec.json": "application/json"}
Predict = Callable[[str, Any], Awaitable[np.ndarray]]


def status_of(e: SnpError) -> int:
    if isinstance(e, PayloadTooLarge):
        return 413
    if isinstance(e, ArtifactNotFoundError) or (isinstance(e, UnknownNameError)
                                                 and e.kind == "class"):
        return 404
    if isinstance(e, StoreError):
        return 500
    return 400


def error_body(e: Exception) -> dict[str, Any]:
    body = {"error": str(e), "type": type(e).__name__}
    if isinstance(e, UnknownNameError):
        body["close_matches"] = e.close
    return body


class BodyLimit:
    """ASGI middleware: refuse bodies over ``max_bytes`` (declared or streamed) with a 413."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send, int(declared))
        seen, started = 0, False

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise PayloadTooLarge(f"the request body is over {self.max_bytes:,} bytes")
            return message

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except PayloadTooLarge:
            if not started:
                await self._refuse(send, seen)

    async def _refuse(self, send, size: int) -> None:
        e = PayloadTooLarge(f"the request body ({size:,} bytes) is over the limit of "
                            f"{self.max_bytes:,} bytes")
        payload = json.dumps(error_body(e)).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


def create_api(service: MarketService, predict: Predict) -> FastAPI:
    cfg = service.cfg
    app = FastAPI(title="snp_ray market", summary="Slice-and-Pack: a model for your classes, now",
                  docs_url="/docs", redoc_url=None)
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)

    @app.exception_handler(SnpError)
    async def refused(_: Request, e: SnpError):
        return JSONResponse(error_body(e), status_code=status_of(e))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException):
        return JSONResponse({"error": f"{e.detail} ({e.status_code})", "type": "HTTPError"},
                            status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def malformed(_: Request, e: RequestValidationError):
        return JSONResponse({"error": f"malformed request: {e.errors()}", "type": "ConfigError"},
                            status_code=400)

    # Under Ray Serve the proxy itself answers /-/healthz (200, "success"): /v1/health is ours
    @app.get("/-/healthz")
    @app.get("/v1/health")
    async def healthz() -> dict[str, Any]:
        cat = service.catalogue()
        return {"status": "ok", "models": len(cat.specs), "classes": len(cat.classes)}

    @app.get("/v1/classes")
    async def classes() -> dict[str, Any]:
        return await asyncio.to_thread(service.classes)

    @app.post("/v1/packs")
    async def make_pack(request: Request) -> dict[str, Any]:
        body, samples = await pack_request_parts(request)
        return await asyncio.to_thread(service.pack, body, samples)

    @app.get("/v1/packs/{pid}")
    async def pack_meta(pid: str) -> dict[str, Any]:
        return service.meta(pid)

    @app.get("/v1/packs/{pid}/{name}")
    async def pack_file(pid: str, name: str):
        if name not in FILES:
            raise ArtifactNotFoundError(f"no file {name!r} in a pack; files: {list(FILES)}")
        path = await asyncio.to_thread(service.packs.file, pid, name)
        return FileResponse(path, media_type=MEDIA[name], filename=f"{pid}-{name}")

    @app.post("/v1/packs/{pid}/predict")
    async def predict_route(pid: str, request: Request) -> dict[str, Any]:
        meta = service.meta(pid)
        raw = await _inputs(request, meta, cfg.max_images)
        probs = np.asarray(await predict(pid, raw))
        return {"id": pid, "predictions": top_classes(meta, probs)}

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


async def json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"the request body is not valid JSON ({e})") from None


PACK_REQUEST_FORMS = ("send the pack request as application/json, or as multipart/form-data with "
                      "a 'request' part (the JSON object) and a 'samples' part (a Parquet file)")


async def pack_request_parts(request: Request) -> tuple[Any, bytes | None]:
    """A pack request's JSON object and, for a multipart upload, the requester's Parquet file."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        form = await request.form(max_files=2, max_fields=2)
        parts = {name: [v for n, v in form.multi_items() if n == name] for name, _ in form.multi_items()}
        unknown = sorted(set(parts) - {"request", "samples"})
        missing = sorted({"request", "samples"} - set(parts))
        if unknown or missing or any(len(v) > 1 for v in parts.values()):
            raise DataError(f"{PACK_REQUEST_FORMS}; got parts {sorted(parts)}"
                            + (f" (missing {missing})" if missing else "")
                            + (f" (unknown {unknown})" if unknown else ""))
        spec, samples = parts["request"][0], parts["samples"][0]
        if not hasattr(samples, "read"):
            raise DataError("the 'samples' part must be a file upload (a Parquet file), "
                            "e.g. curl -F samples=@mine.parquet")
        raw = await spec.read() if hasattr(spec, "read") else spec.encode()
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"the 'request' part is not valid JSON ({e})") from None
        return body, await samples.read()
    if ctype and ctype != "application/json" and not ctype.endswith("+json"):
        raise DataError(f"{PACK_REQUEST_FORMS}; got content-type {ctype!r}")
    return await json_body(request), None


async def _inputs(request: Request, meta: dict[str, Any], max_images: int) -> Any:
    """The request's inputs as a pack takes them: uint8 images (multipart files or a JSON list
    of base64 strings) for image packs, a list of strings for text packs."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        if meta["modality"] != "image":
            raise DataError("file uploads are for image packs; send {\"texts\": [...]} here")
        form = await request.form(max_files=max_images, max_fields=max_images)
        files = [v for _, v in form.multi_items() if hasattr(v, "read")]
        blobs = [await f.read() for f in files]
        return await asyncio.to_thread(decode_batch, blobs,
                                       [f"image {i} ({f.filename})" for i, f in enumerate(files)])
    body = await json_body(request) if ctype.startswith("application/json") else None
    if not isinstance(body, dict):
        raise DataError("send images as multipart/form-data files, or JSON {\"images\": [base64, "
                        "...]} (image packs) or {\"texts\": [...]} (text packs)")
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

"""A small client of the market service's HTTP API, for people who script against a market.

One object, one method per verb, typed errors, no hidden state beyond the HTTP session (and the
class order of packs already asked about: a pack id names its content, so it never changes).
Every refusal of the service becomes a :class:`snp_ray.errors.RemoteError` carrying its HTTP
status, the service's error type and message, and ``retry_after`` for a 429.

This module talks HTTP only: it imports neither the server (``snp_ray.serve``) nor torch, so a
developer's laptop needs requests, numpy and (for arrays to predict on) pillow.

    >>> c = MarketClient("http://127.0.0.1:8000", token="snp_...")
    >>> m = c.upload("mine.safetensors", "torchvision:resnet18", ["cat", "dog"], "cifar10")
    >>> c.wait_ready(m["id"])["state"]
    'ready'
"""
from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import requests

from snp_ray.errors import ConfigError, ModelFailedError, RemoteError, RemoteTimeout

log = logging.getLogger(__name__)

#: the states of a model: an upload's (``ready`` and ``failed`` are final), and ``unsliced`` for a
#: model added on the market's own machine that nothing is slicing
STATES = ("validating", "slicing", "ready", "failed", "unsliced")

Source = str | Path | bytes


class MarketClient:
    """The market at ``url`` (``http://host:port``), as the holder of ``token`` (a bearer
    token from ``snp tokens create``; None for an open loopback market). ``timeout`` bounds each
    request in seconds; a pack build or an upload of a large file may need more than a read."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 120.0,
                 session: requests.Session | None = None):
        if "://" not in url:
            raise ConfigError(f"the market URL {url!r} needs a scheme, e.g. http://127.0.0.1:8000")
        self.url, self.token, self.timeout = url.rstrip("/"), token, timeout
        self.session = session or requests.Session()
        self._pack_classes: dict[str, tuple[list[str], list[int]]] = {}

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> "MarketClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ developers: models
    def upload(self, weights: Source, arch: str, classes: Sequence[str | int], dataset: str, *,
               k: int = 20, seed: int = 0, model_id: str | None = None, input_size: int = 32,
               mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
               fewshot: Source | None = None, replace: bool = False) -> dict[str, Any]:
        """Offer a model (``POST /v1/models``): its safetensors ``weights`` (a path or the bytes),
        what ``arch`` builds it, its output classes in head order (names or ids of ``dataset``)
        and, optionally, your own few-shot samples (Parquet). The service answers at once (202)
        and checks and slices in the background: the answer is the model in state
        ``validating``; follow it with :meth:`status` or :meth:`wait_ready`."""
        spec = {"arch": arch, "classes": list(classes), "dataset": dataset, "k": int(k),
                "seed": int(seed), "id": model_id, "input_size": int(input_size),
                "mean": None if mean is None else [float(x) for x in mean],
                "std": None if std is None else [float(x) for x in std], "replace": bool(replace)}
        files = [("weights", _file(weights, "weights.safetensors", "application/octet-stream")),
                 ("spec", (None, json.dumps(spec), "application/json"))]
        if fewshot is not None:
            files.append(("fewshot", _file(fewshot, "fewshot.parquet", "application/vnd.apache.parquet")))
        return self._call("POST", "/v1/models", files=files)["model"]

    def status(self, model_id: str) -> dict[str, Any]:
        """An uploaded model as the service sees it now: ``state``, ``progress``, ``error``..."""
        return self._call("GET", f"/v1/models/{_segment(model_id)}")["model"]

    def wait_ready(self, model_id: str, timeout_s: float = 600.0, poll_s: float = 1.0,
                   on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll :meth:`status` until the model is ``ready`` and return it. A ``failed`` (or
        ``unsliced``) model raises :class:`ModelFailedError` with the service's reason, a wait
        past ``timeout_s`` :class:`RemoteTimeout`. ``on_progress`` sees every answer whose state
        or progress changed (the CLI prints it)."""
        deadline = time.monotonic() + timeout_s
        last = None
        while True:
            model = self.status(model_id)
            seen = (model.get("state"), json.dumps(model.get("progress"), sort_keys=True))
            if on_progress is not None and seen != last:
                on_progress(model)
            last = seen
            if model.get("state") == "ready":
                return model
            if model.get("state") == "failed":
                kind, message = _model_error(model)
                raise ModelFailedError(model, kind, message)
            if model.get("state") == "unsliced":    # added on the market's machine: waiting won't help
                raise ModelFailedError(model, "Unsliced", "nothing is slicing it (progress "
                                       f"{_progress(model)}); the market's operator can run snp slice")
            if time.monotonic() + poll_s > deadline:
                raise RemoteTimeout(f"model {model_id!r} is still {model.get('state')!r} "
                                    f"(progress {_progress(model)}) after {timeout_s:g} s", model)
            time.sleep(poll_s)

    def models(self) -> list[dict[str, Any]]:
        """The market's models (``GET /v1/models``)."""
        return self._call("GET", "/v1/models")["models"]

    def remove(self, model_id: str) -> dict[str, Any]:
        """Remove a model you own (or any, as an admin) with its fragments and the packs built on
        them: ``{"removed": id, "retired": {"fragments", "blobs", "packs"}}``."""
        return self._call("DELETE", f"/v1/models/{_segment(model_id)}")

    # ------------------------------------------------------------ requesters: packs
    def classes(self) -> dict[str, Any]:
        """The class catalogue (``GET /v1/classes``): ``classes`` with their holders, ``ks``..."""
        return self._call("GET", "/v1/classes")

    def pack(self, classes: Sequence[str | int], k: int | None = None, plan: str | None = None,
             samples: Source | None = None) -> dict[str, Any]:
        """A pack for ``classes`` (``POST /v1/packs``), built now or a stored one (``cached``).
        ``samples``: your own labelled images (Parquet; a path or bytes) to pack with."""
        body: dict[str, Any] = {"classes": list(classes)}
        if k is not None:
            body["k"] = int(k)
        if plan is not None:
            body["plan"] = plan
        if samples is None:
            return self._call("POST", "/v1/packs", json=body)
        return self._call("POST", "/v1/packs", files=[
            ("request", (None, json.dumps(body), "application/json")),
            ("samples", _file(samples, "samples.parquet", "application/vnd.apache.parquet"))])

    def pack_info(self, pack_id: str) -> dict[str, Any]:
        """A stored pack's description (``GET /v1/packs/{id}``)."""
        return self._call("GET", f"/v1/packs/{_segment(pack_id)}")

    def predict(self, pack_id: str, images: Iterable[np.ndarray | bytes] | np.ndarray) -> np.ndarray:
        """Class probabilities, one row per image, columns in the pack's head order (its
        ``classes``). ``images``: uint8 HxWx3 arrays (or one NxHxWx3 array), or encoded PNG/JPEG
        bytes. The service answers each image's five most likely classes: in a pack of more
        classes the others read NaN."""
        blobs = [_encoded(x, i) for i, x in enumerate(images)]
        if not blobs:
            raise ConfigError("predict needs at least one image")
        names, ids = self._classes_of(pack_id)
        answer = self._call("POST", f"/v1/packs/{_segment(pack_id)}/predict",
                            files=[("images", (f"{i}.png", b, "application/octet-stream"))
                                   for i, b in enumerate(blobs)],
                            headers={"serve_multiplexed_model_id": pack_id})
        probs = np.full((len(blobs), len(names)), np.nan)
        column = {cid: j for j, cid in enumerate(ids)}
        for row, top in zip(probs, answer["predictions"]):
            for entry in top:
                row[column[entry["class_id"]]] = entry["probability"]
        return probs

    def download(self, pack_id: str, name: str, dest: str | Path) -> Path:
        """Save one of a pack's files (``model.onnx``, ``model.safetensors``, ``model.pt2``,
        ``spec.json``) to ``dest`` (a file, or a folder to put ``<id>-<name>`` in). The file is
        written under a temporary name and renamed when complete."""
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / f"{pack_id}-{name}"
        r = self._send("GET", f"/v1/packs/{_segment(pack_id)}/{_segment(name)}", stream=True)
        part = dest.with_name(dest.name + ".part")
        try:
            with r, open(part, "wb") as f:
                for chunk in r.iter_content(1 << 20):
                    f.write(chunk)
            part.replace(dest)
        except requests.RequestException as e:
            part.unlink(missing_ok=True)
            raise RemoteError(None, type(e).__name__, f"{self.url}: {e}") from e
        return dest

    # ------------------------------------------------------------ plumbing
    def _classes_of(self, pack_id: str) -> tuple[list[str], list[int]]:
        if pack_id not in self._pack_classes:
            meta = self.pack_info(pack_id)
            self._pack_classes[pack_id] = (list(meta["classes"]), list(meta["class_ids"]))
        return self._pack_classes[pack_id]

    def _call(self, method: str, path: str, **kwargs) -> Any:
        r = self._send(method, path, **kwargs)
        try:
            return r.json()
        except ValueError:
            raise RemoteError(r.status_code, "BadAnswer",
                              f"{method} {path} answered {r.headers.get('content-type')!r}, "
                              "not JSON") from None

    def _send(self, method: str, path: str, headers: dict[str, str] | None = None,
              **kwargs) -> requests.Response:
        """One request; any answer but 2xx raises :class:`RemoteError`."""
        headers = dict(headers or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            r = self.session.request(method, self.url + path, headers=headers,
                                     timeout=self.timeout, **kwargs)
        except requests.RequestException as e:
            raise RemoteError(None, type(e).__name__, f"{method} {self.url}{path}: {e}") from e
        if r.status_code >= 400:
            raise refusal(r)
        log.debug("%s %s -> %d", method, path, r.status_code)
        return r


def refusal(r: requests.Response) -> RemoteError:
    """The :class:`RemoteError` for a refused request: the service's ``{"error", "type"}``
    body, or (from a proxy in between, say) the status line and the start of the body."""
    try:
        body = r.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or "error" not in body:
        body = {"error": f"{r.reason or 'error'}: {r.text[:200]}", "type": "HTTPError"}
    after = r.headers.get("Retry-After")
    return RemoteError(r.status_code, str(body.get("type", "HTTPError")), str(body["error"]),
                       int(after) if after and after.strip().isdigit() else None,
                       body.get("close_matches") or ())


def _file(source: Source, default_name: str, media: str) -> tuple[str, bytes, str]:
    """A multipart file part from a path or bytes (a missing path is the caller's error)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return default_name, bytes(source), media
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"no file at {path}")
    return path.name, path.read_bytes(), media


def _encoded(image: np.ndarray | bytes, i: int) -> bytes:
    """PNG bytes for an HxWx3 uint8 array; encoded bytes pass unchanged (the service checks)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ConfigError(f"image {i}: expected a uint8 HxWx3 array (or encoded image bytes), got "
                          f"{arr.dtype} {arr.shape}")
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _segment(value: str) -> str:
    """One URL path segment, escaped (an id never steers the request to another route)."""
    from urllib.parse import quote

    return quote(str(value), safe="")


def _model_error(model: dict[str, Any]) -> tuple[str, str]:
    """A failed model's error type and message (``error_type`` and ``error``)."""
    err = model.get("error")
    if isinstance(err, dict):                   # {"error", "type"}, as a refusal's body
        return str(err.get("type", "Error")), str(err.get("error") or err)
    return str(model.get("error_type") or "Error"), str(err or "the service gave no reason")


def _progress(model: dict[str, Any]) -> str:
    p = model.get("progress") or {}
    return f"{p.get('done', '?')}/{p.get('total', '?')}"

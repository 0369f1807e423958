"""Models that developers upload over HTTP: who owns each, what state it is in, and the slicing
that follows an accepted upload.

An upload is checked exactly as ``snp market add`` checks a model (:func:`lifecycle.add_model`,
capped by the service's config before anything is read or allocated); nothing is written unless
every check passes. Then its owner and state go to ``<market>/uploads/<id>.json`` (written
atomically, so a restart shows them), and its classes are sliced in the background by the slice
job (:func:`snp_ray.engine.job.run_slice_job`: Ray actors, one fragment per exactly-once pair
key) into the store the service serves from, with the service's preset and seed and the upload's
k. Each stored fragment makes the service re-read its catalogue on the next request.

States: ``validating`` (being checked; in memory only, since a refused upload leaves nothing
behind), ``slicing``, ``ready``, ``failed`` (with the error, server paths scrubbed before it is
stored). Models added with ``snp market add`` or trained by the market have no record: owner
null, and a state read from the catalogue: ``ready`` when every class has a fragment of the
service's preset and seed at some k (``k``: the largest such k), else ``unsliced`` (nothing is
slicing it; ``snp slice`` would). Only an admin may replace or remove those.

A service that restarts while an upload was slicing slices it again: pairs already stored are
skipped (their keys are exactly-once).
"""
from __future__ import annotations

import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from snp_ray.artifacts import atomic_write_json, read_json
from snp_ray.errors import (ArtifactNotFoundError, ConfigError, EngineError, ForbiddenError,
                            SnpError)
from snp_ray.market.add import AddLimits
from snp_ray.market.market import Market
from snp_ray.market.modelstore import ModelSpec, check_id
from snp_ray.serve import lifecycle
from snp_ray.serve.accounts import Principal
from snp_ray.serve.redact import hidden_roots, scrub

if TYPE_CHECKING:
    from snp_ray.serve.service import MarketService

log = logging.getLogger(__name__)

FOLDER = "uploads"
STATES = ("validating", "slicing", "ready", "failed", "unsliced")
#: the fields of an upload's spec (``snp market add``'s options) and their defaults
SPEC_DEFAULTS: dict[str, Any] = {"arch": None, "classes": None, "dataset": None, "k": 20, "seed": 0,
                                 "id": None, "input_size": 32, "mean": None, "std": None,
                                 "replace": False}
MAX_INPUT_SIZE = 1024
#: slice(model id, k, progress(done pairs)): raises on failure
Slicer = Callable[[str, int, Callable[[int], None]], None]


@dataclass
class UploadSpec:
    """An upload's ``spec`` part, type-checked; :func:`lifecycle.add_model` checks the rest
    (architecture, classes, dataset, id) as ``snp market add`` does."""

    arch: str
    classes: list[str]
    dataset: str
    k: int = 20
    seed: int = 0
    id: str | None = None
    input_size: int = 32
    mean: list[float] | None = None
    std: list[float] | None = None
    replace: bool = False

    @classmethod
    def parse(cls, doc: Any) -> "UploadSpec":
        if not isinstance(doc, dict):
            raise ConfigError("the 'spec' part must be a JSON object with 'arch', 'classes' and "
                              f"'dataset' (fields: {list(SPEC_DEFAULTS)})")
        unknown = sorted(set(doc) - set(SPEC_DEFAULTS))
        if unknown:
            raise ConfigError(f"unknown keys {[str(u)[:40] for u in unknown[:10]]} in the 'spec' "
                              f"part; valid keys: {list(SPEC_DEFAULTS)}")
        missing = [key for key in ("arch", "classes", "dataset") if doc.get(key) is None]
        if missing:
            raise ConfigError(f"the 'spec' part lacks {missing}")
        v = {**SPEC_DEFAULTS, **doc}
        for key in ("arch", "dataset"):
            if not isinstance(v[key], str) or not 0 < len(v[key]) <= 200:
                raise ConfigError(f"spec '{key}' must be a string of 1 to 200 characters")
        classes = v["classes"]
        if (not isinstance(classes, list) or not 0 < len(classes) <= 10_000
                or not all(isinstance(c, (str, int)) and not isinstance(c, bool) for c in classes)):
            raise ConfigError("spec 'classes' must be a list of 1 to 10,000 class names or ids")
        for key, lo, hi in (("k", 1, 100_000), ("seed", 0, 2 ** 31 - 1),
                            ("input_size", 8, MAX_INPUT_SIZE)):
            if isinstance(v[key], bool) or not isinstance(v[key], int) or not lo <= v[key] <= hi:
                raise ConfigError(f"spec '{key}' must be an integer from {lo} to {hi}, got "
                                  f"{str(v[key])[:40]}")
        if v["id"] is not None:
            check_id(v["id"])
        for key in ("mean", "std"):
            x = v[key]
            if x is not None and not (isinstance(x, list) and len(x) == 3 and all(
                    isinstance(f, (int, float)) and not isinstance(f, bool) and math.isfinite(f)
                    for f in x)):
                raise ConfigError(f"spec '{key}' must be null or a list of 3 finite numbers")
        if not isinstance(v["replace"], bool):
            raise ConfigError("spec 'replace' must be true or false")
        return cls(arch=v["arch"], classes=[str(c) for c in classes], dataset=v["dataset"],
                   k=v["k"], seed=v["seed"], id=v["id"], input_size=v["input_size"],
                   mean=v["mean"], std=v["std"], replace=v["replace"])

    def options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`snp_ray.market.add.add_model`."""
        return {"k": self.k, "seed": self.seed, "model_id": self.id, "input_size": self.input_size,
                "mean": self.mean, "std": self.std, "replace": self.replace}


class Uploads:
    """A service's uploaded models: adds, removals, their records and background slicing (one
    job at a time per replica, in a worker thread)."""

    def __init__(self, service: "MarketService", slicer: Slicer | None = None):
        self.service, self.cfg = service, service.cfg
        self.folder = Path(self.cfg.market) / FOLDER
        self.slicer: Slicer = slicer or self.slice_on_ray
        self.hide = hidden_roots(self.cfg)
        self.limits = AddLimits(max_weights_bytes=self.cfg.max_upload_bytes,
                                max_params=self.cfg.max_upload_params,
                                max_fewshot_bytes=self.cfg.max_upload_bytes,
                                max_fewshot_rows=self.cfg.max_upload_rows,
                                max_fewshot_decoded_bytes=self.cfg.max_upload_decoded_bytes)
        self._lock = threading.Lock()
        self._validating: dict[str, dict[str, Any]] = {}
        self._jobs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snp-upload-slicing")

    # ---------------------------------------------------------------- records
    def _path(self, model_id: str) -> Path:
        return self.folder / f"{check_id(model_id)}.json"

    def record(self, model_id: str) -> dict[str, Any] | None:
        path = self._path(model_id)
        return read_json(path, f"upload record of {model_id}") if path.is_file() else None

    def _update(self, model_id: str, identity: str, **changes: Any) -> None:
        """Change a record, unless the model was removed or replaced meanwhile."""
        with self._lock:
            rec = self.record(model_id)
            if rec is None or rec.get("identity") != identity:
                return
            atomic_write_json(self._path(model_id), {**rec, **changes, "updated": time.time()})

    # ---------------------------------------------------------------- reads
    def describe(self, model_id: str, market: Market | None = None, catalogue=None) -> dict[str, Any]:
        """The model as a client sees it (:class:`ArtifactNotFoundError` if unknown)."""
        market = market or Market(self.cfg.market)
        if model_id not in market.ids():
            pending = self._validating.get(model_id)
            if pending is not None:
                return dict(pending)
            raise ArtifactNotFoundError(f"no model {str(model_id)[:100]!r} in this market")
        spec = market.spec(model_id)
        rec = self.record(model_id)
        out = {"id": spec.id, "owner": rec["owner"] if rec else None,
               "owner_id": rec["owner_id"] if rec else None, "classes": spec.class_names,
               "class_ids": spec.classes, "arch": spec.arch_ref, "params": spec.params,
               "dataset": spec.dataset, "error": None, "error_type": None}
        if rec is not None and rec.get("identity") == spec.identity:
            return {**out, "state": rec["state"], "progress": rec["progress"], "k": rec["k"],
                    "error": rec.get("error"), "error_type": rec.get("error_type")}
        return {**out, **self._served(spec, catalogue or self.service.catalogue())}

    @staticmethod
    def _served(spec: ModelSpec, catalogue) -> dict[str, Any]:
        """State, progress and k of a model without a current record, from the catalogue."""
        held: dict[int, int] = {}
        for c in spec.classes:
            served = catalogue.classes.get(c)
            for k in {h.k for h in served.holders if h.model == spec.id} if served else ():
                held[k] = held.get(k, 0) + 1
        total = len(spec.classes)
        full = [k for k, n in held.items() if n == total]
        if full:
            return {"state": "ready", "progress": {"done": total, "total": total}, "k": max(full)}
        k = max(held, key=lambda k: (held[k], k)) if held else None
        return {"state": "unsliced", "progress": {"done": held.get(k, 0), "total": total}, "k": k}

    def list(self) -> list[dict[str, Any]]:
        market, catalogue = Market(self.cfg.market), self.service.catalogue()
        ids = sorted(set(market.ids()) | set(self._validating))
        out = []
        for mid in ids:
            try:
                out.append(self.describe(mid, market, catalogue))
            except ArtifactNotFoundError:        # removed or refused meanwhile
                continue
        return out

    # ---------------------------------------------------------------- writes
    def _check_owner(self, who: Principal, model_id: str, verb: str) -> None:
        rec = self.record(model_id)
        if not who.owns(rec["owner_id"] if rec else None):
            whose = (f"belongs to {rec['owner']!r}" if rec else
                     "was added by the market's operator (it has no owner)")
            raise ForbiddenError(f"model {model_id!r} {whose}; only its owner or an admin may "
                                 f"{verb} it")

    def add(self, who: Principal, spec: UploadSpec, weights: bytes,
            fewshot: bytes | None = None) -> dict[str, Any]:
        """Check and store an uploaded model, record its owner, schedule its slicing; returns its
        description. Blocking (checks run models): call it in a thread."""
        market = Market(self.cfg.market)
        mid = spec.id
        if mid is not None:
            with self._lock:
                if mid in self._validating:
                    raise ConfigError(f"model {mid!r} is being uploaded already; wait for that "
                                      "upload's answer")
                if spec.replace and mid in market.ids():
                    self._check_owner(who, mid, "replace")
                self._validating[mid] = {
                    "id": mid, "owner": who.name, "owner_id": who.id, "state": "validating",
                    "progress": {"done": 0, "total": len(spec.classes)}, "error": None,
                    "error_type": None, "classes": spec.classes, "class_ids": None,
                    "arch": spec.arch, "params": None, "dataset": spec.dataset, "k": spec.k}
        try:
            added, retired = lifecycle.add_model(
                market, spec.arch, weights, spec.classes, spec.dataset, fragments=self.service.store,
                packs=self.service.packs, fewshot=fewshot, limits=self.limits, **spec.options())
            saved = added.spec
            with self._lock:
                atomic_write_json(self._path(saved.id), {
                    "id": saved.id, "owner": who.name, "owner_id": who.id, "identity": saved.identity,
                    "state": "slicing", "progress": {"done": 0, "total": len(saved.classes)},
                    "error": None, "error_type": None, "k": spec.k, "created": time.time(),
                    "updated": time.time()})
        finally:
            if mid is not None:
                with self._lock:
                    self._validating.pop(mid, None)
        log.info("%s uploaded model %s (%s, classes %s)%s", who.name, saved.id, saved.arch,
                 saved.class_names, f"; retired {retired.to_dict()}" if spec.replace else "")
        self.service.invalidate()               # a replacement retired fragments and packs
        self._jobs.submit(self._slice, saved.id, saved.identity, spec.k, len(saved.classes))
        return self.describe(saved.id, market)

    def remove(self, who: Principal, model_id: str) -> dict[str, Any]:
        """Remove a model (its owner or an admin), its fragments and the packs built on them."""
        market = Market(self.cfg.market)
        if model_id not in market.ids():
            raise ArtifactNotFoundError(f"no model {str(model_id)[:100]!r} in this market")
        self._check_owner(who, model_id, "remove")
        _, retired = lifecycle.remove_model(market, model_id, self.service.store, self.service.packs)
        with self._lock:
            self._path(model_id).unlink(missing_ok=True)
        self.service.invalidate()
        log.info("%s removed model %s; retired %s", who.name, model_id, retired.to_dict())
        return {"removed": model_id, "retired": retired.to_dict()}

    # ---------------------------------------------------------------- slicing
    def resume(self) -> None:
        """Slice again the uploads a previous run of the service left slicing."""
        if not self.folder.is_dir():
            return
        market = Market(self.cfg.market)
        for path in sorted(self.folder.glob("*.json")):
            mid = path.stem
            try:
                rec = self.record(mid)
                spec = market.spec(mid)
            except SnpError:
                continue
            if rec and rec.get("state") == "slicing" and rec.get("identity") == spec.identity:
                log.info("resuming the slicing of uploaded model %s", mid)
                self._jobs.submit(self._slice, mid, spec.identity, int(rec["k"]), len(spec.classes))

    def _slice(self, model_id: str, identity: str, k: int, total: int) -> None:
        def progress(done: int) -> None:
            self._update(model_id, identity, progress={"done": min(done, total), "total": total})
            self.service.invalidate()            # the new fragment shows on the next request

        try:
            self.slicer(model_id, k, progress)
        except SnpError as e:
            log.warning("slicing uploaded model %s failed: %s", model_id, e)
            self._update(model_id, identity, state="failed", error=scrub(str(e), self.hide),
                         error_type=type(e).__name__)
        except Exception:
            log.exception("slicing uploaded model %s failed", model_id)
            self._update(model_id, identity, state="failed", error_type="InternalError",
                         error="slicing failed (the service's log has the details)")
        else:
            self._update(model_id, identity, state="ready", progress={"done": total, "total": total})
        finally:
            self.service.invalidate()

    def slice_on_ray(self, model_id: str, k: int, progress: Callable[[int], None]) -> None:
        """The default slicer: the slice job for one model's pairs, on the connected Ray."""
        from snp_ray.engine.job import SliceJobConfig, run_slice_job

        cfg = self.cfg
        job = SliceJobConfig(market=str(Path(cfg.market).resolve()), fragments=cfg.fragments,
                             k=k, preset=cfg.preset, seed=cfg.seed, models=[model_id],
                             actors=cfg.upload_slice_actors)
        done = 0

        def step(_: str) -> None:
            nonlocal done
            done += 1
            progress(done)
        result = run_slice_job(job, step)
        if result.failures:
            first = result.failures[0]
            raise EngineError(f"{len(result.failures)} of {result.total} classes could not be "
                              f"sliced; class {first['class_id']}: {first['error']}")

    def close(self) -> None:
        self._jobs.shutdown(wait=False, cancel_futures=True)

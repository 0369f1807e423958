"""The main job: plan every (model, class) pair of a market, slice them in parallel on a pool of
actors into the fragment store, optionally pack one class set, and report.

Scheduling keeps pairs of one model on the actor that already loaded that model, gives an idle
actor the model with the most pairs left otherwise, and never has more than one unit of work in
flight per actor. A unit is one pair, or with the batched engine up to ``class_batch`` pairs of
one model, sliced in one pass; every pair of a unit keeps its own key, retries and failure. Lost actors (a node removed, a process killed) are noticed by a ping that times out;
their pairs go back to the queue and a replacement actor is requested. Writes are idempotent and
the store keeps one row per key, so a pair done twice is stored once; the job compacts the
manifest at the end, on one of its actors (the driver only when none is left).

The driver never holds fragment weights: actors write fragments to the store themselves and
return a small dict of metadata (key, sizes, timings, writer), which is all the driver keeps per
pair. Its memory therefore does not grow with the fragments (``benchmarks/driver_memory.py``).
"""
from __future__ import annotations

import logging
import os
import resource
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable

from snp_ray.config import Config, check_range
from snp_ray.engine.noop import SLICE, check_mode, job_pair_key
from snp_ray.errors import ConfigError, EngineError, SnpError, StoreError
from snp_ray.market.market import Market
from snp_ray.runtime import ENGINES
from snp_ray.slicing.config import SliceConfig, slice_preset
from snp_ray.store import FragmentStore

log = logging.getLogger(__name__)


@dataclass
class SliceJobConfig(Config):
    market: str                        # market store folder
    fragments: str = ""                # fragment store URI; default <market>/fragments
    k: int = 10
    preset: str = "quick"              # slice preset
    overrides: dict[str, Any] = field(default_factory=dict)   # SliceConfig field overrides
    seed: int = 0                      # few-shot sample seed
    actors: int = 0                    # 0: one per GPU (or fraction) when GPUs exist, else per CPU
    gpus_per_actor: float = 1.0
    max_restarts: int = 2
    max_task_retries: int = 2
    max_attempts: int = 3              # per pair, across actors
    ping_timeout_s: float = 20.0
    startup_timeout_s: float = 120.0
    models: list[str] = field(default_factory=list)           # empty: every model
    slice_mode: str = SLICE            # "noop-benchmark": placeholder fragments, benchmarks only
    noop_fragment_kb: int = 1          # weights per placeholder fragment in that mode
    engine: str = "cached"             # slicer engine; batched: a model's classes in one pass

    def validate(self) -> None:
        check_mode(self.slice_mode)
        if self.engine not in ENGINES:
            raise ConfigError(f"SliceJobConfig.engine must be one of {ENGINES}, got {self.engine!r}")
        check_range("SliceJobConfig", "noop_fragment_kb", self.noop_fragment_kb, 1, 1 << 20)
        check_range("SliceJobConfig", "k", self.k, 1, 100_000)
        check_range("SliceJobConfig", "actors", self.actors, 0, 100_000)
        check_range("SliceJobConfig", "gpus_per_actor", self.gpus_per_actor, 0.0, 8.0, lo_open=True)
        check_range("SliceJobConfig", "max_attempts", self.max_attempts, 1, 100)

    def slice_config(self) -> SliceConfig:
        return slice_preset(self.preset, **self.overrides)

    def store_uri(self) -> str:
        return self.fragments or os.path.join(self.market, "fragments")


@dataclass
class SliceJobResult:
    total: int
    done: int
    skipped: int
    failed: int
    wall_seconds: float
    results: dict[str, dict[str, Any]]          # key -> metadata row (never weights)
    failures: list[dict[str, Any]]
    actors: list[dict[str, Any]]
    timings: dict[str, float] = field(default_factory=dict)   # plan/startup/pool/compact seconds
    compacted_by: str = ""                      # "actor", "driver" or "" (nothing to do)

    def summary(self) -> dict[str, Any]:
        """``fragment_params``/``source_params`` total every stored fragment of the job's pairs
        (sliced now or skipped as already stored), so a rerun that skips everything reports the
        same totals as the run that sliced them; the ``*_this_run`` fields count this run only."""
        done = [r for r in self.results.values() if r["status"] == "done"]
        stored = [r for r in self.results.values() if r["status"] in ("done", "skipped")]
        return {"pairs": self.total, "done": self.done, "skipped": self.skipped,
                "failed": self.failed, "wall_seconds": round(self.wall_seconds, 2),
                "throughput_pairs_per_s": round(self.done / self.wall_seconds, 4) if self.wall_seconds else 0,
                "fragments_stored": len(stored),
                "fragment_params": sum(r["params"] for r in stored),
                "source_params": sum(r["source_params"] for r in stored),
                "fragment_params_this_run": sum(r["params"] for r in done),
                "source_params_this_run": sum(r["source_params"] for r in done),
                "slice_seconds": round(sum(r["seconds"] for r in done), 2),
                "actors": len(self.actors), "failures": self.failures,
                "peak_rss_mb_per_actor": _peak_rss_per_actor(done),
                "timings": {k: round(v, 3) for k, v in self.timings.items()},
                "compacted_by": self.compacted_by}


def run_slice_job(cfg: SliceJobConfig, progress: Callable[[str], None] | None = None) -> SliceJobResult:
    """Slice every pair of the market not stored yet; fragments go to the store, not the driver."""
    from snp_ray.runtime import ensure_ray

    ensure_ray()
    t_start = time.perf_counter()
    market = Market(cfg.market)
    ids = cfg.models or market.ids()
    if not ids:
        raise ConfigError(f"the market at {cfg.market} holds no models")
    scfg = cfg.slice_config()
    store = FragmentStore(cfg.store_uri(), writer="driver")
    store.adopt_identities({market.spec(mid).id: market.spec(mid) for mid in ids})
    stored = store.rows()
    pairs, results = [], {}
    for mid in ids:
        spec = market.spec(mid)
        market.keep_manifest(mid, cfg.k, cfg.seed)   # draw the few-shot manifest once, up front
        for c in spec.classes:
            key = job_pair_key(spec, c, scfg, cfg.k, cfg.seed, cfg.slice_mode)
            row = stored.get(key)
            if row is not None:
                results[key] = {"key": key, "status": "skipped", "model": mid, "class_id": c,
                                "class": row["class_name"], "params": row["params"],
                                "source_params": row["source_params"], "seconds": row["seconds"],
                                "writer": row["writer"]}
            else:
                pairs.append((mid, c, key))
    del stored
    store.refresh()            # the manifest rows (spec JSON included) are not kept while slicing
    total = len(pairs) + len(results)
    queues: dict[str, deque] = {}
    for mid, c, key in pairs:
        queues.setdefault(mid, deque()).append((c, key))
    failures: list[dict[str, Any]] = []
    actors_info: list[dict[str, Any]] = []
    timings = {"plan_s": time.perf_counter() - t_start}
    compacted_by = ""
    if pairs:
        timings.update(_run_pool(cfg, scfg, market, queues, results, failures, actors_info,
                                 progress, len(pairs)))
        compacted_by = "actor" if "compact_s" in timings else "driver"
        if compacted_by == "driver":       # no actor could: the driver reads the manifest itself
            t_compact = time.perf_counter()
            store.refresh().compact()
            timings["compact_s"] = time.perf_counter() - t_compact
    done = sum(r["status"] == "done" for r in results.values())
    skipped = sum(r["status"] == "skipped" for r in results.values())
    return SliceJobResult(total, done, skipped, len(failures), time.perf_counter() - t_start,
                          results, failures, actors_info, timings, compacted_by)


def _peak_rss_per_actor(done: list[dict[str, Any]]) -> dict[str, float]:
    """The largest peak RSS each actor reported (pairs done this run; skipped pairs have none)."""
    out: dict[str, float] = {}
    for r in done:
        if r.get("peak_rss_mb") is not None:
            out[r["actor"][:12]] = round(max(out.get(r["actor"][:12], 0.0), r["peak_rss_mb"]), 1)
    return out


def _actor_count(cfg: SliceJobConfig, n_pairs: int) -> tuple[int, float]:
    import ray

    res = ray.cluster_resources()
    gpus = float(res.get("GPU", 0))
    if cfg.actors:
        n = cfg.actors
    elif gpus > 0:
        n = int(gpus // cfg.gpus_per_actor)
    else:
        n = int(res.get("CPU", 1))
    return max(1, min(n, n_pairs)), (cfg.gpus_per_actor if gpus > 0 else 0.0)


def check_actor_row(row: Any, key: str) -> dict[str, Any]:
    """The actor's result row, refused (EngineError) if it carries anything but small metadata.
    The driver's contract with any actor (fragments go to the store, rows carry keys and
    metadata): public so that an actor's own checks hold its rows to the same rule."""
    if not isinstance(row, dict):
        raise EngineError(f"pair {key}: an actor returned {type(row).__name__}, not a metadata dict")
    scalar = (str, int, float, bool, type(None))
    bulky = sorted(k for k, v in row.items() if not (isinstance(v, scalar) or (
        isinstance(v, list) and all(isinstance(x, scalar) for x in v))))
    if bulky:
        raise EngineError(f"pair {key}: an actor returned non-metadata fields {bulky}; actors must "
                          "write fragments to the store and return keys and metadata only")
    return row


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _run_pool(cfg, scfg, market, queues, results, failures, actors_info, progress,
              n_todo) -> dict[str, float]:
    """Run the pairs in ``queues`` on an actor pool; returns its timings (seconds)."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    from snp_ray.engine.actors import SlicerActor
    from snp_ray.runtime import worker_env

    n_actors, gpus = _actor_count(cfg, n_todo)
    env = worker_env("SNP_SLICE_CACHE_MB", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                     "AWS_DEFAULT_REGION")
    remote = ray.remote(SlicerActor).options(
        num_cpus=1, num_gpus=gpus, max_restarts=cfg.max_restarts,
        max_task_retries=cfg.max_task_retries, max_concurrency=2, scheduling_strategy="SPREAD")
    args = (os.path.abspath(cfg.market), cfg.store_uri(), scfg.to_dict(), cfg.k, cfg.seed, env)
    kwargs = {"mode": cfg.slice_mode, "noop_kb": cfg.noop_fragment_kb, "engine": cfg.engine}
    unit_size = scfg.class_batch if cfg.engine == "batched" else 1

    actors: dict[int, Any] = {}
    starting: dict[Any, int] = {}
    next_id = 0
    deadline = time.time() + cfg.startup_timeout_s

    def spawn() -> None:
        nonlocal next_id, deadline
        a = remote.remote(*args, **kwargs)
        actors[next_id] = a
        starting[a.info.remote()] = next_id
        next_id += 1
        deadline = time.time() + cfg.startup_timeout_s

    for _ in range(n_actors):
        spawn()
    ready: dict[int, dict[str, Any]] = {}
    last_model: dict[int, str] = {}
    in_flight: dict[Any, tuple[int, str, list[tuple[int, str]], float]] = {}   # (actor, model, unit, t)
    attempts: Counter = Counter()
    done_count, t0 = 0, time.perf_counter()
    t_ready: float | None = None            # when the first actor was ready
    cpu_ready = 0.0

    def next_unit(aid: int):
        mid = last_model.get(aid)
        if not (mid and queues.get(mid)):
            busy = Counter()
            for (_, m, unit, _) in in_flight.values():
                busy[m] += len(unit)
            candidates = [m for m, q in queues.items() if q]
            if not candidates:
                return None
            mid = max(candidates, key=lambda m: (len(queues[m]) - busy[m] * 2, m))
        q = queues[mid]
        return mid, [q.popleft() for _ in range(min(unit_size, len(q)))]

    def requeue(mid: str, c: int, key: str, why: str) -> None:
        attempts[key] += 1
        if attempts[key] >= cfg.max_attempts:
            failures.append({"model": mid, "class_id": c, "key": key, "error": why})
            log.error("giving up on %s class %s after %d attempts: %s", mid, c, attempts[key], why)
        else:
            queues.setdefault(mid, deque()).appendleft((c, key))

    def requeue_unit(mid: str, unit: list[tuple[int, str]], why: str) -> None:
        for c, key in reversed(unit):            # back at the front, in their order
            requeue(mid, c, key, why)

    def lose(aid: int, why: str) -> None:
        log.warning("actor %d lost (%s); requesting a replacement", aid, why)
        a = actors.pop(aid, None)
        ready.pop(aid, None)
        for ref, (owner, mid, unit, _) in list(in_flight.items()):
            if owner == aid:
                del in_flight[ref]
                requeue_unit(mid, unit, why)
        if a is not None:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - the actor may already be gone
                pass
        spawn()

    while any(queues.values()) or in_flight:
        # actors that finished starting
        if starting:
            started, _ = ray.wait(list(starting), num_returns=len(starting), timeout=0)
            for ref in started:
                aid = starting.pop(ref)
                try:
                    info = ray.get(ref)
                except (RayActorError, RayTaskError) as e:
                    log.warning("actor %d failed to start: %s", aid, e)
                    actors.pop(aid, None)
                    continue
                ready[aid] = info
                actors_info.append(info)
                if t_ready is None:
                    t_ready, cpu_ready = time.perf_counter(), _cpu_seconds()
        if not ready and not in_flight:
            if time.time() > deadline:
                raise EngineError("no slicer actor could start: the cluster lacks the resources "
                                  f"(each actor needs 1 CPU{' and GPUs' if gpus else ''})")
            time.sleep(0.2)
            continue
        # hand out work
        busy = {owner for (owner, *_rest) in in_flight.values()}
        for aid in list(ready):
            if aid in busy:
                continue
            pick = next_unit(aid)
            if pick is None:
                break
            mid, unit = pick
            retry = any(attempts[key] > 0 for _, key in unit)
            ref = actors[aid].slice_pairs.remote(mid, [c for c, _ in unit], retry)
            in_flight[ref] = (aid, mid, unit, time.perf_counter())
            last_model[aid] = mid
        if not in_flight:
            continue
        finished, _ = ray.wait(list(in_flight), num_returns=1, timeout=2.0)
        for ref in finished:
            aid, mid, unit, started_at = in_flight.pop(ref)
            try:
                rows = ray.get(ref)
            except RayTaskError as e:
                cause = getattr(e, "cause", None)
                if type(cause) is StoreError:     # an I/O error of the store, not bad input:
                    requeue_unit(mid, unit, str(cause))       # retried like a lost actor
                elif isinstance(cause, SnpError):
                    for c, key in unit:
                        failures.append({"model": mid, "class_id": c, "key": key, "error": str(cause)})
                        log.error("pair %s/%s failed: %s", mid, c, cause)
                else:
                    requeue_unit(mid, unit, str(e).splitlines()[0])
                continue
            except RayActorError as e:
                in_flight[ref] = (aid, mid, unit, started_at)
                lose(aid, f"actor died: {str(e).splitlines()[0]}")
                continue
            if not isinstance(rows, list) or len(rows) != len(unit):
                raise EngineError(f"an actor answered {len(unit)} pairs of {mid} with "
                                  f"{type(rows).__name__} instead of one row per pair")
            for (c, key), row in zip(unit, rows):
                results[key] = check_actor_row(row, key)
                done_count += 1
                rate = done_count / (time.perf_counter() - t0)
                eta = (n_todo - done_count) / rate if rate > 0 else float("inf")
                msg = (f"[{done_count}/{n_todo}] {mid} {row['class']}: {row['params']:,} params, "
                       f"{row['seconds']:.1f}s | {rate:.2f} pairs/s, ETA {eta:.0f}s")
                log.info(msg)
                if progress:
                    progress(msg)
        if not finished:   # nothing finished for a while: check that busy actors are alive
            now = time.perf_counter()
            for ref, (aid, *_r, started_at) in list(in_flight.items()):   # _r: model, unit
                if now - started_at < cfg.ping_timeout_s or aid not in actors:
                    continue
                try:
                    ray.get(actors[aid].ping.remote(), timeout=cfg.ping_timeout_s)
                    in_flight[ref] = (aid, *_r, now)          # alive: check again later
                except (GetTimeoutError, RayActorError) as e:
                    lose(aid, type(e).__name__)
    t_end = time.perf_counter()
    compact_s = _compact_on_an_actor([actors[aid] for aid in ready if aid in actors])
    for a in actors.values():
        try:
            ray.kill(a)
        except Exception:  # noqa: BLE001
            pass
    t_ready = t0 if t_ready is None else t_ready
    out = {"startup_s": t_ready - t0, "pool_s": t_end - t_ready,
           "driver_cpu_pool_s": _cpu_seconds() - cpu_ready}
    return out if compact_s is None else {**out, "compact_s": compact_s}


def _compact_on_an_actor(alive: list[Any]) -> float | None:
    """Compact the manifest on the first live actor that can (reading every manifest row is the
    job's largest read, kept off the driver); its seconds, or None when none could."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    for actor in alive:
        t0 = time.perf_counter()
        try:
            ray.get(actor.compact.remote())
            return time.perf_counter() - t0
        except (RayActorError, RayTaskError) as e:
            log.warning("compaction on an actor failed (%s); trying another",
                        str(e).splitlines()[0])
    return None

"""Where work runs: starting or joining Ray the same way from the CLI, the jobs and the tests,
and the torch device and arithmetic that slicing, training and packing use."""
from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: force a torch device for slicing and training ("cpu", "cuda", "cuda:1"); default: a GPU if seen
ENV_DEVICE = "SNP_DEVICE"


def default_device() -> str:
    """``SNP_DEVICE`` if set, else the first GPU torch sees (Ray sets what a task sees), else CPU."""
    import torch

    return os.environ.get(ENV_DEVICE) or ("cuda" if torch.cuda.is_available() else "cpu")


#: the slicer engine every path uses unless told otherwise (``cached``, ``batched``, ``naive``)
ENV_ENGINE = "SNP_SLICE_ENGINE"
#: the slicer's engines (batched: snp_ray/slicing/batched.py)
ENGINES = ("cached", "naive", "batched")


def default_engine() -> str:
    """``SNP_SLICE_ENGINE`` if set, else ``cached``: the slice job, the expansion job and the
    Tune sweep's fold slicing all build their slicers through it, so one setting reaches all."""
    from snp_ray.errors import ConfigError

    engine = os.environ.get(ENV_ENGINE) or "cached"
    if engine not in ENGINES:
        raise ConfigError(f"{ENV_ENGINE} must be one of {ENGINES}, got {engine!r}")
    return engine


#: what ``precision="auto"`` resolves to ("fp32" or "bf16") whatever the hardware; unset: the
#: hardware decides (:func:`resolve_precision`). An explicit config value is never overridden.
ENV_PRECISION = "SNP_PRECISION"
#: the CPU flags that make ``auto`` pick bf16 on a CPU
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def resolve_precision(precision: str, device: "torch.device") -> str:
    """``auto``: ``SNP_PRECISION`` when set (fp32 or bf16: a result made elsewhere can be
    remade with the same arithmetic), else bf16 where the hardware runs it natively (a CUDA GPU
    of compute capability 8.0 or newer, or a Linux CPU with AVX512-BF16 or AMX-BF16 and oneDNN),
    else fp32. Emulated bf16 is slower than fp32, so it is never chosen automatically."""
    import torch

    if precision != "auto":
        return precision
    forced = forced_precision()
    if forced:
        return forced
    if device.type == "cuda":
        return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp32"
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def forced_precision() -> str:
    """``SNP_PRECISION`` ("" when unset); ConfigError when it names no precision."""
    from snp_ray.errors import ConfigError

    value = os.environ.get(ENV_PRECISION, "")
    if value not in ("", "fp32", "bf16"):
        raise ConfigError(f"{ENV_PRECISION} must be fp32 or bf16, got {value!r}")
    return value


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's flags (Linux; empty where unknown)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU flags list AVX512-BF16 or AMX-BF16 (Linux; False where unknown)."""
    return bool(cpu_flags(cpuinfo) & set(BF16_FLAGS))


def _cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor()


#: the environment variables a worker needs to compute what its driver would: where data and
#: caches are, and the device, precision and engine choices above
WORKER_ENV = ("SNP_DATA_ROOT", "SNP_CACHE_DIR", ENV_DEVICE, ENV_PRECISION, ENV_ENGINE)


def worker_env(*extra: str) -> dict[str, str]:
    """The driver's values of :data:`WORKER_ENV` and ``extra`` that are set, for a Ray task's
    ``runtime_env`` (a remote cluster's workers do not inherit the driver's environment)."""
    return {k: os.environ[k] for k in (*WORKER_ENV, *extra) if k in os.environ}


#: the fields of :func:`environment` that can move a number (what a rerun must match to be
#: expected to give the same digits); the others describe the machine
DECISIVE = ("engine", "device", "precision", "torch", "numpy")


def environment() -> dict:
    """What a number is made with besides the code and the configs, as seen by this process:
    the slicing engine (``SNP_SLICE_ENGINE``; per-class or batched), the device, the precision
    ``auto`` resolves to here for slicing and for packing (``SNP_PRECISION`` forces it; the
    batched engine always slices in fp32; each fragment records what it used), the CPU flags
    that decide it, threads, and the torch, numpy, Ray and Python versions."""
    import importlib.metadata
    import platform

    import numpy
    import torch

    engine = default_engine()
    device = torch.device(default_device())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model()
    slicing = "fp32" if engine == "batched" else resolve_precision("auto", device)
    try:
        ray_version = importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        ray_version = "absent"
    return {
        "engine": engine, "engine_kind": "batched" if engine == "batched" else "per-class",
        "device": f"{device.type}: {name}",
        "precision": {"slicing": slicing, "packing": resolve_precision("auto", torch.device("cpu"))},
        "precision_forced": forced_precision() or None,
        "cpu_bf16_flags": sorted(cpu_flags() & set(BF16_FLAGS)),
        "onednn": bool(torch.backends.mkldnn.is_available()),
        "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "thread_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
                       if k in os.environ},
        "torch": torch.__version__, "numpy": numpy.__version__, "ray": ray_version,
        "python": platform.python_version(), "platform": platform.platform(terse=True),
    }


def decisive(env: dict) -> dict:
    """The :data:`DECISIVE` part of an :func:`environment`."""
    return {k: env.get(k) for k in DECISIVE}


#: Ray's logger for the token-auth notices, and the notices that are routine on a local start
_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
_AUTH_NOTICES = ("Token authentication is enabled", "Generated new authentication token")


class _AuthNoticeFilter(logging.Filter):
    """Drops Ray's routine "token authentication is enabled / token generated" notices.

    Every local ``ray.init`` prints them, and they tell a user nothing to act on. Authentication
    itself stays on; Ray's warning that authentication is *disabled* still gets through.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_AUTH_NOTICES)


def quiet_ray_notices() -> None:
    """Install :class:`_AuthNoticeFilter` on Ray's auth logger (once; idempotent)."""
    logger = logging.getLogger(_AUTH_LOGGER)
    if not any(isinstance(f, _AuthNoticeFilter) for f in logger.filters):
        logger.addFilter(_AuthNoticeFilter())


def ray_env_defaults() -> None:
    """Environment defaults for a driver, set before Ray is imported (Ray reads them then).

    Ray's log deduplication folds worker lines that differ only in numbers into one
    "[repeated Nx across cluster]" line, which would hide all but one model's per-epoch
    progress; lines from snp_ray loggers are exempted. A value the user set is kept.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", r" snp_ray\.")


def worker_logging(level: int = logging.INFO) -> None:
    """Send snp_ray log records of a Ray worker to its stderr, which Ray forwards to the driver.

    Ray workers configure only Ray's own logger, so without this INFO lines (per-epoch training
    progress) are dropped. A no-op when the snp_ray logger already has a handler.
    """
    logger = logging.getLogger("snp_ray")
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def ensure_ray(num_cpus: int | None = None, object_store_memory: int | None = None) -> None:
    """Attach to ``RAY_ADDRESS`` when set; otherwise start a local Ray in this process.

    A no-op when Ray is already initialised (tests share one session cluster).
    """
    ray_env_defaults()
    import ray

    if ray.is_initialized():
        return
    quiet_ray_notices()
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        return
    log.info("starting a local Ray in-process")
    # address="local": always a fresh in-process cluster, never a stale one that an earlier
    # `ray start` left in /tmp/ray/ray_current_cluster
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
             object_store_memory=object_store_memory, log_to_driver=True, configure_logging=False)

"""Where work runs: starting or joining Ray the same way from the CLI, the jobs and the tests,
and the torch device and arithmetic that slicing, training and packing use."""
from __future__ import annotations

import logging
import os
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


def resolve_precision(precision: str, device: "torch.device") -> str:
    """``auto``: bf16 where the hardware runs it natively (a CUDA GPU of compute capability 8.0
    or newer, or a Linux CPU with AVX512-BF16 or AMX-BF16 and oneDNN), else fp32. Emulated bf16
    is slower than fp32, so it is never chosen automatically."""
    import torch

    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp32"
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU flags list AVX512-BF16 or AMX-BF16 (Linux; False where unknown)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def ensure_ray(num_cpus: int | None = None, object_store_memory: int | None = None) -> None:
    """Attach to ``RAY_ADDRESS`` when set; otherwise start a local Ray in this process.

    A no-op when Ray is already initialised (tests share one session cluster).
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
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

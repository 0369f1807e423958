"""Starting or joining Ray the same way from the CLI, the jobs and the tests."""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


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

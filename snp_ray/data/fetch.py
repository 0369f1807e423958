"""Make sure a job's dataset is on disk before any work starts; fetch CIFAR when it is missing.

A user who clones the repository alone has no shared data folder. Rather than start Ray and fail
inside every training task, a job first calls :func:`ensure_dataset`, which returns the data root
that holds the dataset: ``SNP_DATA_ROOT`` when it has it, else the default root in the user's
cache, filled (CIFAR-10/100 only, network reachable) by torchvision's download converted to our
Parquet. Offline it raises one :class:`DatasetNotFoundError` that says what to do.

The network probe and the fetch step are parameters so that tests run the decision and the
conversion on a hand-made torchvision folder and never touch the network.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
import urllib.request
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from snp_ray.data.catalog import ENV_DATA_ROOT, get_dataset
from snp_ray.errors import DatasetNotFoundError

log = logging.getLogger(__name__)

#: "0" (or false/no/off/never): never download; a missing dataset is an error straight away
ENV_DOWNLOAD = "SNP_DOWNLOAD"
#: seconds the network probe may take: an offline machine must fail fast, not hang
PROBE_TIMEOUT_S = 3.0
_DOWNLOADABLE = ("cifar10", "cifar100")
_SIZES = {"cifar10": "about 170 MB", "cifar100": "about 170 MB"}


def default_data_root() -> Path:
    """Where downloaded datasets go: ``$SNP_CACHE_DIR/data`` (default ``~/.cache/snp_ray/data``)."""
    from snp_ray.data.tables import cache_dir

    return cache_dir() / "data"


def has_dataset(name: str, root: Path) -> bool:
    """Whether every split of ``name`` is a file under ``root``."""
    info = get_dataset(name)
    return all(info.path(s, root).is_file() for s in info.splits)


def downloads_allowed() -> bool:
    """``SNP_DOWNLOAD`` unless it is set to 0/false/no/off/never (the tests set it to 0)."""
    return os.environ.get(ENV_DOWNLOAD, "1").strip().lower() not in ("0", "false", "no", "off", "never")


def can_reach(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether an HTTP HEAD of ``url`` succeeds within ``timeout`` seconds (proxies honoured).

    The request runs in a daemon thread because a DNS lookup ignores socket timeouts.
    """
    answer: list[bool] = []

    def probe() -> None:
        try:
            req = urllib.request.Request(url, method="HEAD")
            with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - fixed https URL
                answer.append(200 <= resp.status < 400)
        except Exception:  # noqa: BLE001 - any failure means "no usable network"
            answer.append(False)

    thread = threading.Thread(target=probe, name="snp-network-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])


def ensure_dataset(name: str, root: str | Path | None = None, allow_download: bool | None = None,
                   *, cache_root: str | Path | None = None,
                   online: Callable[[str], bool] = can_reach,
                   fetch: Callable[[str, Path], object] | None = None,
                   verify: bool = True, progress: bool = True) -> Path:
    """The data root holding every split of ``name``; download it there if need be.

    - ``root`` (default ``SNP_DATA_ROOT``) has it: return ``root``.
    - the default root (``cache_root``, default :func:`default_data_root`) has it: return that.
    - else, for CIFAR-10/100 with downloads allowed (``allow_download``, default
      :func:`downloads_allowed`) and ``online(url)`` true: ``fetch(name, folder)`` (default
      torchvision's download, with a progress bar) into a folder under the default root, convert
      it with :func:`~snp_ray.data.convert.convert_cifar`, delete the download, return the
      default root.
    - otherwise raise :class:`DatasetNotFoundError` naming ``SNP_DATA_ROOT`` and the remedy.

    ``verify=False`` skips the md5 checks of the converter (only for hand-made test folders).
    """
    info = get_dataset(name)
    configured_value = str(root) if root is not None else os.environ.get(ENV_DATA_ROOT, "")
    configured = Path(configured_value).expanduser().resolve() if configured_value else None
    if configured is not None and has_dataset(name, configured):
        return configured
    default = Path(cache_root or default_data_root()).expanduser().resolve()
    if default != configured and has_dataset(name, default):
        log.info("%s is not under %s; using the copy downloaded earlier to %s", name,
                 configured or f"{ENV_DATA_ROOT} (unset)", default)
        return default

    files = "{" + ",".join(info.splits) + "}.parquet"
    where = (f"{ENV_DATA_ROOT}={configured_value} has no {name}/{files}" if configured
             else f"{ENV_DATA_ROOT} is not set and {default} has no {name}/{files}")
    if name not in _DOWNLOADABLE:
        raise DatasetNotFoundError(f"{where}; to obtain it, {info.obtain}")
    fix = (f"point {ENV_DATA_ROOT} at a folder holding {name}/{files} (the project's shared/data "
           "ships CIFAR-10)")
    if allow_download is None:
        allow_download = downloads_allowed()
    if not allow_download:
        raise DatasetNotFoundError(f"{where}, and downloads are off ({ENV_DOWNLOAD}=0 or "
                                   f"--no-download); {fix}, or allow the download")
    from snp_ray.data.convert import convert_cifar, download_cifar, source_url

    url = source_url(name)
    host = urlparse(url).hostname or url
    if not online(url):
        raise DatasetNotFoundError(
            f"{where}, and there is no network to download it (could not reach {host} within "
            f"{PROBE_TIMEOUT_S:g} s); {fix}, or rerun with a network to download it into {default}")

    raw = default / "_downloads"
    log.info("%s; downloading %s (%s) from %s with torchvision into %s", where, name,
             _SIZES[name], host, raw)
    (fetch or download_cifar)(name, raw)
    log.info("converting the %s download to Parquet under %s (a minute or two)", name, default)
    convert_cifar(name, raw, default, verify=verify, progress=progress)
    shutil.rmtree(raw, ignore_errors=True)
    if not has_dataset(name, default):  # a bug, not bad input: the converter wrote elsewhere
        raise RuntimeError(f"converted {name} but {default}/{name}/{files} is incomplete")
    log.info("%s is ready under %s (deleted the raw download); later runs reuse it", name, default)
    return default

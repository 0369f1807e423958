"""The service's settings: one typed, serialisable config shared by `snp serve`, `serve run` and
the tests."""
from __future__ import annotations

from dataclasses import dataclass, field

from snp_ray.config import Config, check_range
from snp_ray.errors import ConfigError
from snp_ray.packing.samples import MAX_BYTES, MAX_ROWS


@dataclass
class ServeConfig(Config):
    """Where the market lives and how the service answers.

    ``packs``: the content-addressed pack store (default ``<market>/packs``); ``fragments``: the
    fragment store URI (default ``<market>/fragments``); ``preset``: the slice preset whose
    fragments the service packs; ``folds``: the cross-validation folds of the few-shot accuracy
    estimate; ``refresh_s``: how often the class catalogue re-reads the market;
    ``max_body_bytes``: any request body (and ``snp pack --samples``' file); ``max_images``:
    inputs per prediction request, and a requester's samples per pack request.

    Access (``accounts.py``): ``accounts``: the token database (a relative path is in the
    market folder); ``insecure_open``: answer everyone without tokens, even beyond loopback;
    ``allowed_hosts``: names clients may reach the service under (the ``Host`` header) besides
    the loopback names and ``host``, which are always answered (``"*"``: any name);
    ``cors_origins``: browser origins of other sites that may call the API (default none: no
    CORS headers)."""

    market: str = ""
    fragments: str = ""
    packs: str = ""
    preset: str = "quick"
    seed: int = 0
    plan: str = "best"
    folds: int = 3
    max_models_per_replica: int = 8
    max_batch_size: int = 32
    batch_wait_timeout_s: float = 0.002
    max_body_bytes: int = MAX_BYTES          # the caps ``snp pack --samples`` refuses past too
    max_images: int = MAX_ROWS
    refresh_s: float = 30.0
    host: str = "127.0.0.1"
    port: int = 8000
    accounts: str = "accounts.sqlite"
    insecure_open: bool = False
    allowed_hosts: list[str] = field(default_factory=list)
    cors_origins: list[str] = field(default_factory=list)
    threads: int = 1
    #: bytes of fragment weights a replica keeps loaded (LRU): a count of fragments bounds
    #: nothing when one fragment is 10 kB and another 100 MB
    fragment_cache_bytes: int = 1 << 30
    #: bytes of packs on disk before the least recently used are evicted (0: unbounded); packs
    #: are derived data, rebuilt on the next request for them
    pack_store_bytes: int = 0
    #: the whole body of a model upload (POST /v1/models: weights, spec, few-shot file); every
    #: other route keeps ``max_body_bytes``. Also the cap on the weights and few-shot files
    max_upload_bytes: int = 512 * 1024 ** 2
    #: parameters of an uploaded model (counted on the meta device, before any allocation);
    #: the default is ``snp market add``'s
    max_upload_params: int = 200_000_000
    #: rows of an uploaded few-shot file, and the bytes of its columns once decompressed
    max_upload_rows: int = 50_000
    max_upload_decoded_bytes: int = 1024 ** 3
    #: slicer actors (one CPU each) of the job that slices an upload's classes
    upload_slice_actors: int = 1

    #: classes one pack request may name (a pack's head and plan grow with them)
    max_classes: int = 100

    def validate(self) -> None:
        if not self.market:
            raise ConfigError("ServeConfig.market: the market folder is required")
        check_range("ServeConfig", "folds", self.folds, 2, 10)
        check_range("ServeConfig", "max_models_per_replica", self.max_models_per_replica, 1, 10_000)
        check_range("ServeConfig", "max_batch_size", self.max_batch_size, 1, 4096)
        check_range("ServeConfig", "batch_wait_timeout_s", self.batch_wait_timeout_s, 0.0, 10.0)
        check_range("ServeConfig", "max_body_bytes", self.max_body_bytes, 1024, 2 ** 31)
        check_range("ServeConfig", "max_images", self.max_images, 1, 100_000)
        check_range("ServeConfig", "port", self.port, 0, 65535)
        check_range("ServeConfig", "threads", self.threads, 1, 256)
        check_range("ServeConfig", "max_classes", self.max_classes, 1, 100_000)
        check_range("ServeConfig", "fragment_cache_bytes", self.fragment_cache_bytes, 0, 2 ** 50)
        check_range("ServeConfig", "pack_store_bytes", self.pack_store_bytes, 0, 2 ** 60)
        check_range("ServeConfig", "max_upload_bytes", self.max_upload_bytes, 1024, 2 ** 40)
        check_range("ServeConfig", "max_upload_params", self.max_upload_params, 1, 2 ** 40)
        check_range("ServeConfig", "max_upload_rows", self.max_upload_rows, 1, 2 ** 31)
        check_range("ServeConfig", "max_upload_decoded_bytes", self.max_upload_decoded_bytes, 1, 2 ** 44)
        check_range("ServeConfig", "upload_slice_actors", self.upload_slice_actors, 1, 1024)
        for origin in self.cors_origins:
            if origin != "*" and (not origin.startswith(("http://", "https://"))
                                  or "/" in origin.split("://", 1)[1]):
                raise ConfigError(f"ServeConfig.cors_origins: {origin!r} is not an origin like "
                                  "https://example.org (scheme and host, no path) or '*'")

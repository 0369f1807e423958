"""One exception hierarchy for everything snp_ray raises on bad input.

Callers catch :class:`SnpError` to separate "your input is wrong" from bugs. Each subclass names
the layer that refused the input, and every message names the object and the problem.
"""
from __future__ import annotations


class SnpError(Exception):
    """Base class of every error snp_ray raises on purpose."""


class ConfigError(SnpError, ValueError):
    """A configuration value is missing, malformed or out of range."""


class UnknownNameError(ConfigError, KeyError):
    """A name (task, architecture, preset, class) is not one of the valid ones."""

    #: longer lists (timm has ~1400 models) are cut to the closest names
    MAX_LISTED = 30

    def __init__(self, kind: str, name: object, valid: list[str] | tuple[str, ...], where: str = ""):
        """``where`` follows the name in the message (e.g. ``" (held by no model of this
        market)"``): what the valid names are valid for."""
        import difflib

        self.kind, self.name, self.valid = kind, name, sorted(map(str, valid))
        #: the valid names closest to ``name`` (a service returns them with its 404)
        self.close = close = difflib.get_close_matches(str(name), self.valid, n=8, cutoff=0.5)
        kinds = kind + ("es" if kind.endswith("s") else "s")
        if len(self.valid) <= self.MAX_LISTED:
            listed = f"valid {kinds}: {', '.join(self.valid)}"
        else:
            listed = (f"closest of the {len(self.valid)} valid {kinds}: {', '.join(close)}" if close
                      else f"none of the {len(self.valid)} valid {kinds} is close, e.g. "
                           f"{', '.join(self.valid[:8])}")
        super().__init__(f"unknown {kind} {name!r}{where}; {listed}")

    def __str__(self) -> str:  # KeyError would otherwise print the repr of the message
        return self.args[0]


class DataError(SnpError, ValueError):
    """A dataset, sample or split is unusable."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """A dataset file is missing; the message says how to obtain it."""


class SchemaError(DataError):
    """A table lacks the columns (or types) it must have."""


class TestSplitAccessError(DataError, PermissionError):
    """Code outside the evaluation API asked for the test split."""

    __test__ = False  # not a pytest test class, despite the name


class StoreError(SnpError, OSError):
    """A model or fragment store cannot be read or written."""


class ArtifactNotFoundError(StoreError, FileNotFoundError):
    """A stored object (model, fragment, blob) does not exist."""


class IntegrityError(StoreError):
    """A stored object fails its checksum or does not match its spec."""


class EngineError(SnpError, RuntimeError):
    """A distributed job could not complete."""


class ExportError(SnpError, RuntimeError):
    """A pack cannot be written in an export format: ``torch.export`` cannot capture its graph,
    the ONNX exporter cannot translate it (or its package is missing), or the file would exceed
    the format's limits. ``fmt`` names the format."""

    def __init__(self, fmt: str, why: str):
        self.fmt, self.why = fmt, why
        super().__init__(f"cannot export the pack as {fmt}: {why}")


class UnsupportedLayerError(ConfigError):
    """The slicer cannot follow units through an operation; raised while tracing, before any
    training. ``op`` names the operation and ``path`` the module (or graph node) it sits in."""

    def __init__(self, op: str, path: str, why: str):
        self.op, self.path, self.why = op, path, why
        super().__init__(f"the slicer cannot handle {op} at {path}: {why}")


class WeightsError(ConfigError):
    """A weights file offered to the market is unusable: not safetensors (e.g. a pickle), not
    for the named architecture (missing/unexpected keys, shape mismatches), or not finite."""


class ModelExistsError(ConfigError):
    """A model id that is already in the store was given without asking to replace it."""


class DatasetMismatchError(ConfigError):
    """A model of another dataset than the market's: a market holds one dataset, because its
    classes are keyed by id (CIFAR-100 "apple" and CIFAR-10 "airplane" are both class 0)."""


class PayloadTooLarge(DataError):
    """A request body over the market service's limit (HTTP 413)."""


class UnsupportedMediaType(DataError):
    """A request body of a content type the route does not take (HTTP 415): JSON routes take
    ``application/json`` only, so a cross-site form cannot post to them without a preflight."""


class AccessError(SnpError, PermissionError):
    """The market service refuses a request for who sent it or from where, not for what it
    says."""


class AuthError(AccessError):
    """A missing, unknown or revoked access token (HTTP 401)."""


class ForbiddenError(AccessError):
    """A valid token whose role may not do this, or a cross-site browser request (HTTP 403)."""


class HostNotAllowedError(AccessError):
    """A request naming a host the service does not answer for (HTTP 400): a DNS-rebinding page
    reaches a loopback service under its own name."""


class QuotaExceeded(AccessError):
    """A token used up one of its quotas (HTTP 429); ``retry_after`` is in whole seconds."""

    def __init__(self, message: str, retry_after: int):
        self.message, self.retry_after = message, max(1, int(retry_after))
        super().__init__(f"{message}; retry in {self.retry_after} s")

    def __reduce__(self):  # keeps both arguments across processes (pickle calls cls(*args))
        return type(self), (self.message, self.retry_after)


class UnprotectedServiceError(ConfigError):
    """A service asked to listen beyond loopback with no access token to require (and without
    an explicit ``--insecure-open``)."""


class RemoteError(SnpError):
    """A market service refused a request (or did not answer): ``status`` is the HTTP code (None
    when no answer came), ``kind`` the service's error type (its ``"type"``, e.g.
    ``QuotaExceeded``), ``message`` its ``"error"``, ``retry_after`` the seconds a 429 asks to
    wait (else None). Raised by :class:`snp_ray.client.MarketClient`, which keeps the server's
    classes out of a client's process."""

    def __init__(self, status: int | None, kind: str, message: str,
                 retry_after: int | None = None, close_matches: list[str] | tuple[str, ...] = ()):
        self.status, self.kind, self.message = status, kind, message
        self.retry_after, self.close_matches = retry_after, list(close_matches)
        where = f"HTTP {status}" if status is not None else "no answer"
        wait = f"; retry in {retry_after} s" if retry_after is not None else ""
        super().__init__(f"the market refused the request ({where}, {kind}): {message}{wait}"
                         if status is not None else f"the market did not answer: {message}")

    def __reduce__(self):  # keeps every field across processes (pickle calls cls(*args))
        return type(self), (self.status, self.kind, self.message, self.retry_after,
                            self.close_matches)


class ModelFailedError(RemoteError):
    """An uploaded model ended in the ``failed`` state (its slicing failed): ``model`` is the
    service's last description of it, ``kind``/``message`` its error; ``status`` is 200, that of
    the answer that reported it."""

    def __init__(self, model: dict, kind: str, message: str):
        self.model = model
        super().__init__(200, kind, message)
        self.args = (f"model {model.get('id')!r} failed ({kind}): {message}",)

    def __str__(self) -> str:
        return self.args[0]

    def __reduce__(self):
        return type(self), (self.model, self.kind, self.message)


class RemoteTimeout(RemoteError, TimeoutError):
    """A wait on the market (an uploaded model to become ready) ran past its time limit."""

    def __init__(self, message: str, model: dict | None = None):
        self.model = model
        super().__init__(None, "Timeout", message)
        self.args = (message,)

    def __str__(self) -> str:
        return self.args[0]

    def __reduce__(self):
        return type(self), (self.message, self.model)

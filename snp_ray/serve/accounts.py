"""Who may use the market service: access tokens with a role and quotas, in one SQLite file.

A token is random (``secrets.token_urlsafe``), shown once when it is made, and stored only as
its sha256, so a copy of the database (a backup, a shared disk) lets nobody in. Roles:
``developer`` adds and removes its own models, ``requester`` builds packs, predicts and
downloads, ``admin`` does everything. Each token has quotas: pack builds per hour (kept in the
database, so they outlive a restart), concurrent builds and prediction requests per second
(counted in memory, per replica).

Who needs a token (:class:`Gate`): once the database holds any token, every request but the web
page and health checks does. Before that, a service on loopback is open (logged as a warning), so
that one person can try a market locally without setting anything up; one on any other host
refuses to start unless ``insecure_open`` says so. Revoking every token does not reopen it.
"""
from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from snp_ray.config import check_range
from snp_ray.errors import (AuthError, ConfigError, ForbiddenError, QuotaExceeded, UnknownNameError,
                            UnprotectedServiceError)

log = logging.getLogger(__name__)

ROLES = ("developer", "requester", "admin")
#: what each role may do; the API names one action per route
ACTIONS = {"developer": frozenset({"catalogue", "models"}),
           "requester": frozenset({"catalogue", "pack", "predict", "download"}),
           "admin": frozenset({"catalogue", "models", "pack", "predict", "download", "tokens"})}
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
TOKEN_PREFIX = "snp_"          # lets secret scanners and people recognise a leaked token
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}$")
HOUR = 3600.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, role TEXT NOT NULL, hash TEXT NOT NULL UNIQUE,
    created REAL NOT NULL, revoked REAL,
    packs_per_hour INTEGER NOT NULL, concurrent_builds INTEGER NOT NULL,
    predictions_per_second REAL NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS tokens_active_name ON tokens(name) WHERE revoked IS NULL;
CREATE TABLE IF NOT EXISTS builds (token TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS builds_token_at ON builds(token, at);
"""


@dataclass(frozen=True)
class Limits:
    """A token's quotas. Prediction requests are counted, not images: a request holds at most
    ``ServeConfig.max_images`` of them."""

    packs_per_hour: int = 20
    concurrent_builds: int = 2
    predictions_per_second: float = 20.0

    def __post_init__(self) -> None:
        check_range("quota", "packs_per_hour", self.packs_per_hour, 1, 1_000_000)
        check_range("quota", "concurrent_builds", self.concurrent_builds, 1, 1_000)
        check_range("quota", "predictions_per_second", self.predictions_per_second, 0.01, 1_000_000)


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: a token's id, name and role (``limits`` None: no quotas)."""

    id: str
    name: str
    role: str
    limits: Limits | None = None

    def may(self, action: str) -> bool:
        return action in ACTIONS[self.role]

    def require(self, action: str) -> "Principal":
        if not self.may(action):
            allowed = [r for r in ROLES if action in ACTIONS[r]]
            raise ForbiddenError(f"the token {self.name!r} has role {self.role!r}, which may not "
                                 f"{action}; roles that may: {', '.join(allowed)}")
        return self

    def owns(self, owner: str | None) -> bool:
        """Whether this principal may change a thing recorded as ``owner``'s (a token id):
        admins may change anything, others only what they added."""
        return self.role == "admin" or (owner is not None and owner == self.id)


#: everyone, while the service is open (no tokens on loopback, or ``insecure_open``)
OPEN = Principal(id="open", name="open service", role="admin")


@dataclass(frozen=True)
class TokenInfo:
    """A token as listed: everything but the token itself, which is never stored."""

    id: str
    name: str
    role: str
    created: float
    revoked: float | None
    limits: Limits

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "role": self.role, "created": self.created,
                "revoked": self.revoked, **asdict(self.limits)}


def digest(token: str) -> str:
    """The stored form of a token. One unsalted sha256 suffices: a token holds 256 random bits,
    so there is no dictionary to try and nothing for a salt or a slow hash to protect (those
    defend guessable passwords); the digest is also the lookup key."""
    return hashlib.sha256(token.encode()).hexdigest()


def is_loopback(host: str) -> bool:
    host = host.strip().strip("[]").lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bearer(header: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header."""
    if not header:
        raise AuthError("this market needs an access token: send 'Authorization: Bearer <token>' "
                        "(the market's operator makes one with `snp tokens create`)")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("the Authorization header must be 'Bearer <token>'")
    return token.strip()


class Accounts:
    """The token database. Thread-safe: one connection per thread, in WAL mode, so that a
    request's token check never waits for a writer (the CLI, a build being recorded)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._local = threading.local()

    def exists(self) -> bool:
        return self.path.is_file()

    def _conn(self, create: bool = False) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if not create and not self.exists():
            # reading must not create the file (or its WAL files) in someone's market
            raise AuthError("no access tokens exist for this market")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode={'rwc' if create else 'rw'}",
                                   uri=True, timeout=10.0)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(SCHEMA)
        except sqlite3.Error as e:
            raise ConfigError(f"cannot open the token database {self.path.name} ({e})") from None
        self._local.conn = conn
        return conn

    # ---------------------------------------------------------------- tokens
    def create(self, name: str, role: str, limits: Limits = Limits()) -> tuple[str, TokenInfo]:
        """A new token for ``name`` with ``role``: (the token, shown only now, its listing)."""
        if role not in ROLES:
            raise UnknownNameError("role", role, ROLES)
        if not isinstance(name, str) or not NAME.match(name):
            raise ConfigError(f"token name {name!r}: use 1 to 64 letters, digits or _.@+- "
                              "(starting with a letter or digit)")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        info = TokenInfo(id="tok-" + secrets.token_hex(6), name=name, role=role,
                         created=time.time(), revoked=None, limits=limits)
        conn = self._conn(create=True)
        try:
            with conn:
                conn.execute("INSERT INTO tokens VALUES (?,?,?,?,?,?,?,?,?)",
                             (info.id, name, role, digest(token), info.created, None,
                              limits.packs_per_hour, limits.concurrent_builds,
                              limits.predictions_per_second))
        except sqlite3.IntegrityError:
            raise ConfigError(f"a token named {name!r} exists already; revoke it first or "
                              "choose another name") from None
        log.info("created token %s (%s, role %s)", info.id, name, role)
        return token, info

    def list(self) -> list[TokenInfo]:
        if not self.exists():
            return []
        rows = self._conn().execute("SELECT id, name, role, created, revoked, packs_per_hour, "
                                    "concurrent_builds, predictions_per_second FROM tokens "
                                    "ORDER BY created").fetchall()
        return [_info(r) for r in rows]

    def revoke(self, which: str) -> TokenInfo:
        """Revoke a token by id, or the active token of that name; it stops working at once."""
        tokens = self.list()
        hit = ([t for t in tokens if t.id == which]
               or [t for t in tokens if t.name == which and t.revoked is None])
        if not hit:
            raise UnknownNameError("token", which, [t.id for t in tokens]
                                   + [t.name for t in tokens if t.revoked is None])
        info = hit[0]
        if info.revoked is None:
            conn = self._conn()
            with conn:
                conn.execute("UPDATE tokens SET revoked = ? WHERE id = ?", (time.time(), info.id))
            log.info("revoked token %s (%s)", info.id, info.name)
        return next(t for t in self.list() if t.id == info.id)

    def has_tokens(self) -> bool:
        """Whether any token was ever made (revoked ones count: revoking does not reopen)."""
        return self.exists() and self._conn().execute("SELECT 1 FROM tokens LIMIT 1").fetchone() is not None

    def verify(self, token: str) -> Principal:
        """The principal of an active token; :class:`AuthError` for any other string."""
        row = self._conn().execute(
            "SELECT id, name, role, created, revoked, packs_per_hour, concurrent_builds, "
            "predictions_per_second FROM tokens WHERE hash = ?", (digest(token),)).fetchone()
        if row is None or row[4] is not None:
            # one message for unknown and revoked tokens: it tells a guesser nothing
            raise AuthError("the access token is not valid (unknown or revoked)")
        info = _info(row)
        return Principal(info.id, info.name, info.role, info.limits)

    # ---------------------------------------------------------------- builds
    def record_build(self, token_id: str, at: float | None = None) -> None:
        conn = self._conn()
        with conn:
            conn.execute("INSERT INTO builds VALUES (?, ?)", (token_id, time.time() if at is None else at))
            conn.execute("DELETE FROM builds WHERE at < ?", (time.time() - 2 * HOUR,))

    def builds_since(self, token_id: str, since: float) -> tuple[int, float | None]:
        """The builds recorded for a token since ``since``: (count, time of the oldest)."""
        n, oldest = self._conn().execute("SELECT COUNT(*), MIN(at) FROM builds WHERE token = ? "
                                         "AND at >= ?", (token_id, since)).fetchone()
        return int(n), oldest


def _info(row: tuple) -> TokenInfo:
    return TokenInfo(row[0], row[1], row[2], row[3], row[4], Limits(int(row[5]), int(row[6]), float(row[7])))


def accounts_path(cfg) -> Path:
    """Where a :class:`~snp_ray.serve.config.ServeConfig`'s tokens live (relative to the market)."""
    return Path(cfg.market) / cfg.accounts


class Gate:
    """Who a request comes from: the principal of its token, or :data:`OPEN` while the service
    is open (``insecure_open``, or no token made yet on loopback)."""

    def __init__(self, accounts: Accounts, insecure_open: bool = False):
        self.accounts, self.insecure_open = accounts, insecure_open
        self._closed = False            # once a token exists, it stays closed

    @classmethod
    def for_service(cls, cfg) -> "Gate":
        """The gate for a service config; refuses a service beyond loopback that nobody's token
        protects (:class:`UnprotectedServiceError`)."""
        accounts = Accounts(accounts_path(cfg))
        check_exposure(cfg.host, accounts, cfg.insecure_open)
        gate = cls(accounts, cfg.insecure_open)
        if cfg.insecure_open:
            log.warning("insecure_open: the market at %s answers anyone who reaches %s, with no "
                        "token and no quotas", cfg.market, cfg.host)
        elif not gate.closed():
            log.warning("no access token exists for the market at %s: the service is open to "
                        "anyone on this machine until one is made (`snp tokens create`)", cfg.market)
        return gate

    def closed(self) -> bool:
        if not self._closed and not self.insecure_open and self.accounts.has_tokens():
            self._closed = True
            log.info("access tokens exist: every API request needs one from now on")
        return self._closed

    def who(self, authorization: str | None) -> Principal:
        """The principal of an ``Authorization`` header value (:class:`AuthError` if none)."""
        if not self.closed():
            return OPEN
        return self.accounts.verify(bearer(authorization))


def check_exposure(host: str, accounts: Accounts, insecure_open: bool) -> None:
    """Refuse to serve beyond loopback without a token to require (unless ``insecure_open``)."""
    if insecure_open or is_loopback(host) or accounts.has_tokens():
        return
    raise UnprotectedServiceError(
        f"refusing to serve on {host!r} with no access token: make one with `snp tokens create "
        f"--market MARKET --role requester --name NAME` (or pass --insecure-open to let anyone "
        "in, with no tokens and no quotas)")


class Quotas:
    """The use of each token, checked before the work: pack builds per hour (from the
    database, plus the builds under way), concurrent builds, prediction requests per second
    (a token bucket holding one second's worth). Only a build that makes a new pack counts; a
    request answered by a stored pack does not."""

    def __init__(self, accounts: Accounts):
        self.accounts = accounts
        self._lock = threading.Lock()
        self._pending: dict[str, int] = {}
        self._buckets: dict[str, tuple[float, float]] = {}    # id -> (tokens, at)

    def start_build(self, who: Principal) -> None:
        """Reserve a build for ``who`` (:class:`QuotaExceeded` if none is left); end it with
        :meth:`end_build`."""
        lim = who.limits
        if lim is None:
            return
        with self._lock:
            pending = self._pending.get(who.id, 0)
            if pending >= lim.concurrent_builds:
                raise QuotaExceeded(f"the token {who.name!r} has {pending} pack builds under way, "
                                    f"its limit of concurrent builds", retry_after=5)
            now = time.time()
            done, oldest = self.accounts.builds_since(who.id, now - HOUR)
            if done + pending >= lim.packs_per_hour:
                wait = oldest + HOUR - now if done and oldest is not None else 5
                raise QuotaExceeded(f"the token {who.name!r} built {done} packs in the last hour "
                                    f"(limit {lim.packs_per_hour}); a stored pack is still "
                                    "answered", retry_after=math.ceil(wait))
            self._pending[who.id] = pending + 1

    def end_build(self, who: Principal, built: bool) -> None:
        """Release a reservation; ``built``: a new pack was made, so it counts for the hour."""
        if who.limits is None:
            return
        with self._lock:
            left = self._pending.get(who.id, 1) - 1
            if left > 0:
                self._pending[who.id] = left
            else:
                self._pending.pop(who.id, None)
        if built:
            self.accounts.record_build(who.id)

    def predict(self, who: Principal) -> None:
        """Take one prediction request from ``who``'s bucket (:class:`QuotaExceeded` if empty)."""
        lim = who.limits
        if lim is None:
            return
        rate = lim.predictions_per_second
        cap = max(1.0, rate)
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(who.id, (cap, now))
            tokens = min(cap, tokens + (now - at) * rate)
            if tokens < 1.0:
                self._buckets[who.id] = (tokens, now)
                raise QuotaExceeded(f"the token {who.name!r} is over its {rate:g} prediction "
                                    "requests per second", retry_after=math.ceil((1.0 - tokens) / rate))
            self._buckets[who.id] = (tokens - 1.0, now)

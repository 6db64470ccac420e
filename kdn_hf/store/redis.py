"""RedisTier: a shared tier in Redis (or Redis Cluster), for many engines on many machines.

URL (the query parameters are ours; the rest goes to redis-py's ``from_url``)::

    redis://[user:pass@]host:port/db?prefix=kdn:&ttl=86400&timeout=0.25&breaker=5&budget=8GiB
    rediss://...                      TLS
    redis://host:port/0?cluster=1     Redis Cluster (redis-py's cluster client; any node of it)

- ``prefix``   string put before every key (default ``kdn:``). Keys are
  already hashes over the namespace, model and codec, so the prefix only
  separates kdn_hf from other users of the same Redis.
- ``ttl``      seconds an entry lives (``SET ... EX``); default none.
- ``timeout``  socket connect/read timeout in seconds (default 0.25): the
  most one call can wait on a slow or unreachable server.
- ``breaker``  seconds the tier is skipped after a failure (default 5): a
  circuit breaker, so a down Redis costs one timeout per ``breaker`` seconds,
  not one per request. After the pause the next call tries again, so the tier
  comes back by itself.
- ``budget``   optional; values larger than it are not stored, and it is
  reported in ``stats()``. Eviction is Redis's own (configure
  ``maxmemory`` and ``maxmemory-policy allkeys-lru`` on the server): an LRU
  budget shared by every client, enforced by the server.

Values are encoded entries, the same bytes as the disk tier (checksum
included; ``KVStore`` verifies them). A Redis failure is a logged miss or a
dropped put, counted in ``stats().errors``, never an exception. Gets and puts
of several keys are one pipelined round trip.

Semantics that differ from the in-process tiers (``exact_budget = False``):
eviction order and byte accounting are the server's, and ``stats()`` scans
the prefix's keys for ``entries`` / ``bytes_used`` (O(entries)).

Redis Cluster (``cluster=1``): keys spread over hash slots, so batched gets
and puts are split by slot and pipelined to each master (redis-py's cluster
pipeline / ``mget_nonatomic``); ``keys()`` and ``stats()`` scan every master
and ``evictions`` sums their counts. Only db 0 exists in a cluster (another db
is a StoreError). The client discovers the cluster on first use, not when the
tier is opened, so an unreachable cluster is a bounded miss like a down
server. A master that dies takes the whole tier down for a breaker period at a
time (each call that meets the error is one miss, never an exception) until
the cluster heals: a replica promoted in its place, or the master back.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Callable, Iterable, Iterator, Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
import redis.cluster
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from kdn_hf.errors import StoreError
from kdn_hf.store.base import StorageTier, TierStats, check_budget, check_key, check_value

logger = logging.getLogger("kdn_hf.store")

DEFAULT_PREFIX = "kdn:"
DEFAULT_TIMEOUT_S = 0.25
DEFAULT_BREAKER_S = 5.0
_PARAMS = ("prefix", "ttl", "timeout", "breaker", "budget", "cluster")
#: what a failing call may raise: redis-py's errors (RedisClusterException, e.g. "cannot be connected"
#: or a slot not covered, is not a RedisError) and socket errors
_FAILURES = (redis.RedisError, RedisClusterException, OSError)


class RedisTier(StorageTier):
    """Entries as Redis string values under ``prefix + key``. See the module docstring."""

    name = "redis"
    exact_budget = False

    def __init__(
        self,
        client: "redis.Redis | redis.cluster.RedisCluster | Callable[[], redis.cluster.RedisCluster]",
        *,
        prefix: str = DEFAULT_PREFIX,
        ttl_s: int | None = None,
        breaker_s: float = DEFAULT_BREAKER_S,
        byte_budget: int | None = None,
    ) -> None:
        """``client``: a redis-py client, or a function making a RedisCluster client (called on first use,
        since a cluster client connects as it is made)."""
        if callable(client) and not isinstance(client, (redis.Redis, redis.cluster.RedisCluster)):
            self._client, self._connect, self._cluster = None, client, True
        else:
            self._client, self._connect = client, None
            self._cluster = isinstance(client, redis.cluster.RedisCluster)
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.breaker_s = breaker_s
        self.byte_budget = None if byte_budget is None else check_budget(byte_budget, "redis")
        self._down_until = 0.0
        self._lock = threading.Lock()
        self._connect_lock = threading.Lock()
        self._stats = TierStats(name=self.name, byte_budget=self.byte_budget or 0)

    @classmethod
    def from_url(cls, url: str) -> RedisTier:
        """Open the tier a ``redis://`` / ``rediss://`` URL describes; raises StoreError for bad parameters."""
        parts = urlsplit(url)
        ours, theirs = {}, []
        for k, v in parse_qsl(parts.query, keep_blank_values=True):
            (ours.__setitem__(k, v) if k in _PARAMS else theirs.append((k, v)))
        try:
            timeout = float(ours.get("timeout", DEFAULT_TIMEOUT_S))
            breaker = float(ours.get("breaker", DEFAULT_BREAKER_S))
            ttl = int(ours["ttl"]) if ours.get("ttl") else None
            if timeout <= 0 or breaker < 0 or (ttl is not None and ttl <= 0):
                raise ValueError("timeout and ttl must be positive, breaker non-negative")
        except ValueError as e:
            raise StoreError(f"bad redis store parameter in {url!r}: {e}; e.g. ?timeout=0.25&ttl=3600&breaker=5") from e
        budget = None
        if ours.get("budget"):
            from kdn_hf.errors import ConfigError
            from kdn_hf.store.url import parse_size

            try:
                budget = parse_size(ours["budget"])
            except ConfigError as e:
                raise StoreError(f"bad budget in redis store URL {url!r}: {e}") from e
        plain = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(theirs), parts.fragment))
        kwargs = dict(socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0))
        try:
            if ours.get("cluster", "0") not in ("", "0", "false"):
                if parts.path.strip("/") not in ("", "0") or dict(theirs).get("db", "0") != "0":
                    raise ValueError("a Redis Cluster has only db 0; use redis://host:port/0?cluster=1")
                redis.connection.parse_url(plain)  # bad URLs fail now; connecting waits for the first call
                client = lambda: redis.cluster.RedisCluster.from_url(plain, **kwargs)
            else:
                client = redis.Redis.from_url(plain, **kwargs)
        except (ValueError, redis.RedisError, RedisClusterException) as e:
            raise StoreError(f"cannot open redis store {url!r}: {e}") from e
        return cls(client, prefix=ours.get("prefix", DEFAULT_PREFIX), ttl_s=ttl, breaker_s=breaker, byte_budget=budget)

    # -- StorageTier -------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        names = [self._name(check_key(k)) for k in keys]
        if not names:
            return []
        values = self._call("get", lambda: self._mget(names))
        if values is None:
            self._count(misses=len(names))
            return [None] * len(names)
        hits = [v for v in values if v is not None]
        self._count(hits=len(hits), misses=len(values) - len(hits), bytes_read=sum(len(v) for v in hits))
        return [None if v is None else bytes(v) for v in values]

    def put(self, key: str, value: bytes) -> None:
        self.put_many([(key, value)])

    def put_many(self, items: Iterable[tuple[str, bytes]]) -> None:
        todo, too_big = [], []
        for k, v in items:
            name, v = self._name(check_key(k)), check_value(v)
            (too_big if self.byte_budget is not None and len(v) > self.byte_budget else todo).append((name, v))
        if too_big:
            self._count(rejected_puts=len(too_big))
            self._call("delete", lambda: self._pipe([("delete", n) for n, _ in too_big]))
        if not todo:
            return
        if self._call("put", lambda: self._pipe([("set", n, v) for n, v in todo])) is not None:
            self._count(puts=len(todo), bytes_written=sum(len(v) for _, v in todo))

    def contains(self, key: str) -> bool:
        name = self._name(check_key(key))
        return bool(self._call("contains", lambda: self.client.exists(name)))

    def delete(self, key: str) -> bool:
        name = self._name(check_key(key))
        return bool(self._call("delete", lambda: self.client.delete(name)))

    def peek(self, key: str) -> bytes | None:
        name = self._name(check_key(key))
        value = self._call("peek", lambda: self.client.get(name))
        return None if value is None else bytes(value)

    def note_corrupt(self, key: str) -> None:
        self._count(corrupt=1)
        self.delete(key)

    def keys(self) -> Iterator[str]:
        names = self._call("scan", lambda: list(self.client.scan_iter(match=self._glob(), count=1000)))
        n = len(self.prefix)
        return iter(sorted(name[n:].decode() for name in names or []))

    def stats(self) -> TierStats:
        def scan() -> tuple[int, int]:
            names = list(self.client.scan_iter(match=self._glob(), count=1000))
            sizes = self._pipe([("strlen", name) for name in names]) if names else []
            return len(names), sum(sizes)

        counted = self._call("stats", scan)
        evicted = self._call("stats", self._evicted)
        with self._lock:
            s = dataclasses.replace(self._stats)
        if counted is not None:
            s.entries, s.bytes_used = counted
        if isinstance(evicted, int):
            s.evictions = evicted  # the server's count, for every client of this Redis
        return s

    def close(self) -> None:
        if self._client is None:
            return
        try:
            self._client.close()
        except _FAILURES:
            pass

    @property
    def client(self) -> redis.Redis | redis.cluster.RedisCluster:
        """The redis-py client (a cluster client is made, and the cluster discovered, on first use)."""
        if self._client is None:
            with self._connect_lock:
                if self._client is None:
                    self._client = self._connect()
        return self._client

    @property
    def available(self) -> bool:
        """False while the circuit breaker skips the tier after a failure."""
        return time.monotonic() >= self._down_until

    # -- internals ---------------------------------------------------------

    def _name(self, key: str) -> str:
        return self.prefix + key

    def _glob(self) -> str:
        escaped = "".join("\\" + c if c in "*?[]\\" else c for c in self.prefix)
        return escaped + "*"

    def _evicted(self) -> int:
        """The server's evicted_keys; summed over every master of a cluster."""
        if self._cluster:
            per_node = self.client.info("stats", target_nodes=redis.cluster.RedisCluster.PRIMARIES)
            return sum(int(info.get("evicted_keys", 0)) for info in per_node.values())
        return int(self.client.info("stats").get("evicted_keys", 0))

    def _mget(self, names: list[str]) -> list:
        if self._cluster:
            return self.client.mget_nonatomic(names)
        return self.client.mget(names)

    def _pipe(self, ops: list[tuple]) -> list:
        pipe = self.client.pipeline(transaction=False)
        for op, name, *args in ops:
            if op == "set":
                pipe.set(name, args[0], ex=self.ttl_s)
            else:
                getattr(pipe, op)(name)
        return pipe.execute()

    def _call(self, what: str, fn):
        """Run ``fn`` unless the breaker is open; a Redis failure opens it and returns None."""
        if not self.available:
            return None
        try:
            return fn()
        except _FAILURES as e:
            self._down_until = time.monotonic() + self.breaker_s
            logger.warning(
                "redis tier: %s failed (%s: %s); skipping redis for %.1f s", what, type(e).__name__, e, self.breaker_s
            )
            self._count(errors=1)
            return None

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for field, n in deltas.items():
                setattr(self._stats, field, getattr(self._stats, field) + n)

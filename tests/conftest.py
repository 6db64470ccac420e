"""Fixtures shared by every test directory (no model needed)."""

from __future__ import annotations

import pytest
import torch

from kdn_hf.kv import ChunkKV


@pytest.fixture
def make_chunk():
    """Factory of small random ChunkKV: kv [layers, 2, kv_heads, tokens, head_dim] of ``dtype``,
    positions ``start .. start+tokens-1``, random token ids, optional meta."""

    def make(
        tokens: int = 5,
        dtype: torch.dtype = torch.float16,
        layers: int = 2,
        kv_heads: int = 2,
        head_dim: int = 4,
        start: int = 0,
        seed: int = 0,
        meta: dict[str, str] | None = None,
    ) -> ChunkKV:
        g = torch.Generator().manual_seed(seed)
        kv = torch.randn(layers, 2, kv_heads, tokens, head_dim, generator=g).to(dtype)
        positions = torch.arange(start, start + tokens, dtype=torch.int64)
        token_ids = torch.randint(0, 50_000, (tokens,), generator=g, dtype=torch.int64)
        return ChunkKV(kv=kv, positions=positions, token_ids=token_ids, meta=dict(meta or {}))

    return make


class RedisServer:
    """A real redis-server on a free loopback port, in its own temp dir, no persistence."""

    def __init__(self, tmp_dir) -> None:
        import shutil
        import socket
        import subprocess
        import time

        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed (apt-get install redis-server); the redis tier is untested")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.dir = tmp_dir
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(tmp_dir), "--maxmemory-policy", "allkeys-lru"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        pytest.fail(f"redis-server did not start on port {self.port}")

    def url(self, db: int = 0, **params) -> str:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return f"redis://127.0.0.1:{self.port}/{db}" + (f"?{query}" if query else "")

    def flush(self) -> None:
        import redis

        redis.Redis(port=self.port).flushall()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A session-wide redis-server (skips if not installed); ``.url(db, **params)``, ``.flush()``."""
    pytest.importorskip("redis", reason="the redis extra is not installed (pip install kdn-hf[redis])")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of this test's own (for tests that kill or stop it)."""
    pytest.importorskip("redis", reason="the redis extra is not installed (pip install kdn-hf[redis])")
    server = RedisServer(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    """An empty Redis (flushed) and a URL to it."""
    redis_server.flush()
    return redis_server.url()


def pytest_addoption(parser):
    parser.addoption("--faults", type=int, default=None,
                     help="cases per fault-injection test (default: $KDN_TEST_FAULTS or a small number)")


@pytest.fixture
def fault_count(request):
    """How many cases each fault-injection test runs: --faults N, else $KDN_TEST_FAULTS, else 20."""
    import os

    n = request.config.getoption("--faults")
    return n if n is not None else int(os.environ.get("KDN_TEST_FAULTS", "20"))

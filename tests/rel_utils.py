"""Helpers of the reliability tests (tests/test_rel_*.py; see docs/reliability.md).

- :class:`WorkerProcess`: a real ``genseg worker gen|seg`` process (or the toy stage of
  :func:`toy_main`), its log, its resident memory and open file descriptors, kill -9;
- :class:`Ledger`: reads the output topics and checks the contract's promise: every
  request ends in exactly one logical terminal outcome per (id, image_index), and a
  duplicate is only a redelivery with identical blob content;
- :class:`Stunnel`: a TLS terminator in front of the broker (tansu 0.6.0 cannot serve
  TLS itself, see docs/reliability.md);
- :class:`SaslGate`: a SASL/PLAIN-checking gate in front of the broker (tansu 0.6.0
  cannot authenticate clients on memory:// or s3:// storage);
- certificates, hostile PNGs, figures for the report.

Every wait polls a condition against a deadline; nothing sleeps in place of a check.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plumbing.broker import free_port
from plumbing.settings import Settings
from tests import forkserver
from tests.kafka_utils import TopicReader

REPO = Path(__file__).resolve().parent.parent

# --- figures for docs/reliability.md ----------------------------------------------------

#: Where the figures of the last run go (one JSON object per test, by test name).
FIGURES_PATH = Path(
    os.environ.get(
        "GENSEG_REL_FIGURES", Path(tempfile.gettempdir()) / "genseg-reliability-figures.json"
    )
)


def record_figures(test: str, **figures: Any) -> None:
    """Merge ``figures`` of ``test`` into :data:`FIGURES_PATH` (read by the report's author)."""
    try:
        data = json.loads(FIGURES_PATH.read_text())
    except (OSError, ValueError):
        data = {}
    data[test] = {"recorded_at": time.strftime("%Y-%m-%d %H:%M:%S"), **figures}
    FIGURES_PATH.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))


# --- waiting ------------------------------------------------------------------------------


async def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> None:
    """Poll ``condition`` until it holds; fail the test with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout:.0f}s: {what}")
        await asyncio.sleep(interval)


# --- worker processes ---------------------------------------------------------------------


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a worker process for ``settings`` (plus ``extra`` variables)."""
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "KAFKA_SECURITY_PROTOCOL": settings.kafka_security_protocol,
        "GENSEG_TOPIC_PREFIX": settings.topic_prefix,
        "GENSEG_BLOB_URL": settings.blob_url,
        "GENSEG_MODELS": "tiny",
        "GENSEG_DEVICE": "cpu",
        "OTEL_SDK_DISABLED": "true",
        # Rich wraps log lines at the terminal width (80 without a terminal): keep one
        # record per line so the tests can read the log.
        "COLUMNS": "240",
        "PYTHONUNBUFFERED": "1",
    }
    if settings.kafka_ssl_cafile:
        env["KAFKA_SSL_CAFILE"] = settings.kafka_ssl_cafile
    env.update(extra)
    return env


class WorkerProcess:
    """One worker process; ``kind`` is ``gen``, ``seg`` or ``toy`` (:func:`toy_main`).

    Each start appends to the same log file, after a marker line, so the log tells
    every incarnation's story.
    """

    def __init__(
        self,
        kind: str,
        env: dict[str, str],
        log_dir: Path,
        name: str | None = None,
        args: Iterable[str] = (),
    ) -> None:
        self.kind = kind
        self.env = env
        self.name = name or kind
        self.args = list(args)
        self.log_path = log_dir / f"{self.name}.log"
        self.proc: forkserver.Process | None = None
        self.starts = 0
        self.kills = 0
        self._log_offset = 0  # where the current incarnation's log starts

    def command(self) -> list[str]:
        if self.kind == "toy":
            return [sys.executable, "-m", "tests.rel_utils", "toy", *self.args]
        return [
            sys.executable, "-m", "genseg.cli", "worker", self.kind,
            "--torch-threads", "1", *self.args,
        ]  # fmt: skip

    def start(self) -> None:
        assert not self.alive, f"{self.name} is already running"
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"\n=== start {self.starts} of {self.name} ===\n".encode())
            log.flush()
            self._log_offset = log.tell()
            self.proc = forkserver.popen(
                self.command(), env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO
            )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL, and reap."""
        assert self.proc is not None and self.alive, f"{self.name} is not running"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.kills += 1

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (graceful drain), SIGKILL after ``timeout``; the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def log(self, current_only: bool = False) -> str:
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return ""
        return (data[self._log_offset :] if current_only else data).decode("utf-8", "replace")

    def count(self, text: str, current_only: bool = True) -> int:
        return self.log(current_only).count(text)

    def check_alive(self) -> None:
        """Fail the test at once, with the log's tail, when the worker died unasked."""
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(
                f"worker {self.name} exited with {self.proc.returncode}:\n{self.log()[-4000:]}"
            )

    async def wait_logged(self, text: str, timeout: float = 120.0, times: int = 1) -> None:
        """Wait until this incarnation logged ``text`` ``times`` times (fails if it dies)."""

        def seen() -> bool:
            self.check_alive()
            return self.count(text) >= times

        await wait_until(seen, timeout, f"{self.name} logs {text!r} x{times}")

    async def wait_assigned(self, timeout: float = 120.0) -> None:
        stage = {"gen": "gen", "seg": "seg", "toy": "toy"}[self.kind]
        await self.wait_logged(f"stage {stage} assigned [", timeout)

    # --- resources (Linux /proc) ---

    def rss_kib(self) -> int:
        """Resident set size (VmRSS) in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS in /proc status")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def threads(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
        raise AssertionError("no Threads in /proc status")


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


async def run_cli(args: list[str], env: dict[str, str], timeout: float = 120.0) -> CliResult:
    """``python -m genseg.cli ARGS`` as a subprocess, without blocking the event loop."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "genseg.cli", *args, env=env, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"genseg {' '.join(args)} ran past {timeout:.0f}s") from None
    return CliResult(
        proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")
    )


def logged(proc: forkserver.Process, log_path: Path, text: str) -> bool:
    """True once the process ``proc``, writing to ``log_path``, logged ``text``; fails at
    once if it died without (for tests that start their workers without WorkerProcess)."""
    output = log_path.read_text(errors="replace")
    assert proc.poll() is None or text in output, output[-3000:]
    return text in output


def stop_all(workers: Iterable[WorkerProcess]) -> None:
    for worker in workers:
        worker.stop(15)


# --- the outcome ledger -------------------------------------------------------------------


def _asset_fingerprint(event: dict[str, Any]) -> tuple[Any, ...]:
    """What two deliveries of one image's asset-ready event must agree on."""
    return (
        event["status"],
        event["image"]["sha256"],
        tuple(m["sha256"] for m in event.get("masks", [])),
        tuple((a["label"], a["asset"]["sha256"]) for a in event.get("assets", [])),
    )


def _image_fingerprint(event: dict[str, Any]) -> tuple[Any, ...]:
    return (
        event["image"]["sha256"],
        tuple(sorted((k, v["sha256"]) for k, v in event.get("heatmaps", {}).items())),
        event["params"]["seed"],
    )


@dataclass
class Verdict:
    """The ledger's view of one run (see :meth:`Ledger.verdict`)."""

    expected: int
    assets: int = 0  # distinct (id, image_index) with an asset-ready event
    dead: int = 0  # distinct (id, image_index) with a dead-letter event only
    lost: list[str] = field(default_factory=list)
    both: list[str] = field(default_factory=list)  # an asset-ready AND a dead-letter event
    forked: list[str] = field(default_factory=list)  # duplicates whose content differs
    duplicate_assets: int = 0  # extra asset-ready records (redeliveries)
    duplicate_images: int = 0  # extra image-ready records (redeliveries)
    foreign: list[str] = field(default_factory=list)  # outcomes for ids never submitted

    def figures(self) -> dict[str, Any]:
        return {
            "requests": self.expected,
            "asset_ready": self.assets,
            "dead_lettered": self.dead,
            "lost": len(self.lost),
            "asset_and_dead_letter": len(self.both),
            "forked_duplicates": len(self.forked),
            "duplicate_asset_records": self.duplicate_assets,
            "duplicate_image_records": self.duplicate_images,
        }

    def assert_exactly_once(self, *, allow_dead: bool = False) -> None:
        problems = []
        if self.lost:
            problems.append(f"{len(self.lost)} requests lost: {self.lost[:10]}")
        if self.both:
            problems.append(f"asset-ready and dead-letter for {self.both[:10]}")
        if self.forked:
            problems.append(f"duplicates with different content: {self.forked[:10]}")
        if self.foreign:
            problems.append(f"outcomes for ids never submitted: {self.foreign[:10]}")
        if not allow_dead and self.dead:
            problems.append(f"{self.dead} requests dead-lettered")
        assert not problems, "; ".join(problems)


class Ledger(TopicReader):
    """Reads images, assets and dead letters from the beginning and judges the outcome."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, "images", "assets", "dlq")

    def terminal_ids(self) -> set[str]:
        return set(self.keys("assets")) | {
            d.get("id") for d in self.values("dlq") if d.get("id") is not None
        }

    def done(self, ids: Iterable[str]) -> bool:
        return set(ids) <= self.terminal_ids()

    def distinct_images(self) -> int:
        return len(set(self.keys("images")))

    def distinct_assets(self) -> int:
        return len(set(self.keys("assets")))

    async def until_done(self, ids: Iterable[str], timeout: float) -> None:
        wanted = set(ids)
        await self.until(lambda: wanted <= self.terminal_ids(), timeout=timeout)

    def verdict(self, ids: Iterable[str]) -> Verdict:
        wanted = list(dict.fromkeys(ids))
        v = Verdict(expected=len(wanted))
        assets: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
        for event in self.values("assets"):
            assets[(event["id"], event.get("image_index", 0))].append(event)
        images: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
        for event in self.values("images"):
            images[(event["id"], event.get("image_index", 0))].append(event)
        dead: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for event in self.values("dlq"):
            dead[event.get("id") or ""].append(event)
        known = set(wanted)
        v.foreign = sorted({i for i, _ in assets if i not in known})
        for request_id in wanted:
            key = (request_id, 0)
            if key in assets and dead.get(request_id):
                v.both.append(request_id)
            if key in assets:
                v.assets += 1
            elif dead.get(request_id):
                v.dead += 1
            else:
                v.lost.append(request_id)
        for key, events in assets.items():
            v.duplicate_assets += len(events) - 1
            if len({_asset_fingerprint(e) for e in events}) > 1:
                v.forked.append(f"asset {key}")
        for key, events in images.items():
            v.duplicate_images += len(events) - 1
            if len({_image_fingerprint(e) for e in events}) > 1:
                v.forked.append(f"image {key}")
        return v


def blob_refs_of_asset(event: dict[str, Any]) -> list[dict[str, Any]]:
    """Every blob reference an asset-ready event carries."""
    return [event["image"], *event.get("masks", []), *(a["asset"] for a in event["assets"])]


# --- TLS ----------------------------------------------------------------------------------


@dataclass
class TlsFiles:
    ca: Path
    cert: Path
    key: Path
    other_ca: Path  # a CA that signed nothing here: clients trusting only it must fail


def make_certificates(directory: Path, hosts: Iterable[str] = ("127.0.0.1",)) -> TlsFiles:
    """A self-signed CA and a server certificate it signs for ``hosts`` (IP or DNS SANs)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    directory.mkdir(parents=True, exist_ok=True)

    def ca_pair(name: str) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return key, cert

    ca_key, ca_cert = ca_pair("genseg test CA")
    _, other_cert = ca_pair("genseg unrelated CA")
    server_key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "genseg broker")]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    files = TlsFiles(
        ca=directory / "ca.pem",
        cert=directory / "server.pem",
        key=directory / "server.key",
        other_ca=directory / "other-ca.pem",
    )
    files.ca.write_bytes(ca_cert.public_bytes(pem))
    files.other_ca.write_bytes(other_cert.public_bytes(pem))
    files.cert.write_bytes(server_cert.public_bytes(pem))
    files.key.write_bytes(
        server_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    files.key.chmod(0o600)
    return files


STUNNEL_MISSING = (
    "stunnel is not installed: the TLS test runs the broker behind stunnel (tansu 0.6.0 "
    "cannot serve TLS). Install it with `apt-get install -y stunnel4` "
    "(scripts/ci-system-deps.sh should do this; see docs/reliability.md)."
)


def stunnel_binary() -> str | None:
    return shutil.which("stunnel4") or shutil.which("stunnel")


class Stunnel:
    """stunnel terminating TLS on ``port`` and forwarding plaintext to ``target_port``."""

    def __init__(self, tls: TlsFiles, target_port: int, directory: Path) -> None:
        self.tls = tls
        self.target_port = target_port
        self.port = free_port()
        self.directory = directory
        self.log_path = directory / "stunnel.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        binary = stunnel_binary()
        if binary is None:
            raise AssertionError(STUNNEL_MISSING)
        conf = self.directory / "stunnel.conf"
        conf.write_text(
            "\n".join(
                [
                    "foreground = yes",
                    f"output = {self.log_path}",
                    "debug = 5",
                    f"pid = {self.directory / 'stunnel.pid'}",
                    "[kafka]",
                    f"accept = 127.0.0.1:{self.port}",
                    f"connect = 127.0.0.1:{self.target_port}",
                    f"cert = {self.tls.cert}",
                    f"key = {self.tls.key}",
                    "sslVersionMin = TLSv1.2",
                    "",
                ]
            )
        )
        self.proc = subprocess.Popen(
            [binary, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"stunnel exited: {self.log_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"stunnel not listening: {self.log_text()}") from None
                time.sleep(0.05)  # poll interval while waiting for the listener

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- a SASL/PLAIN gate --------------------------------------------------------------------


def _i16(data: bytes, at: int) -> int:
    return struct.unpack_from(">h", data, at)[0]


def _i32(data: bytes, at: int) -> int:
    return struct.unpack_from(">i", data, at)[0]


class SaslGate:
    """A Kafka-protocol gate that authenticates SASL/PLAIN clients, then pipes to the broker.

    tansu 0.6.0 offers SCRAM only, and keeps no SCRAM credentials on its memory:// and
    s3:// storage (every login fails), and it has no PLAIN. This gate stands in for the
    broker's SASL layer: it answers SaslHandshake (v0/v1) and SaslAuthenticate (v0/v1)
    itself, checks the PLAIN credentials against ``users``, forwards ApiVersions before
    authentication, refuses every other request until the client authenticated (closes
    the connection, as Kafka does), and afterwards pipes bytes both ways.

    It runs on its own event loop in a thread. ``logins`` lists (username, accepted).
    """

    def __init__(self, target_port: int, users: dict[str, str]) -> None:
        self.target_port = target_port
        self.users = users
        self.port = free_port()
        self.logins: list[tuple[str, bool]] = []
        self.refused_before_auth = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sasl-gate", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise AssertionError("SASL gate did not start")

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop

        async def main() -> None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
            self._ready.set()
            await self._server.serve_forever()

        try:
            loop.run_until_complete(main())
        except asyncio.CancelledError:
            pass
        finally:
            loop.close()

    def stop(self) -> None:
        loop, server = self._loop, self._server
        if loop is None or server is None:
            return

        async def close() -> None:
            server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        with _suppress_closed_loop():
            asyncio.run_coroutine_threadsafe(close(), loop).result(10)
        if self._thread is not None:
            self._thread.join(10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            up_reader, upstream_writer = await asyncio.open_connection(
                "127.0.0.1", self.target_port
            )
            authenticated = False
            while not authenticated:
                frame = await _read_frame(reader)
                if frame is None:
                    return
                api_key, version, correlation = _i16(frame, 0), _i16(frame, 2), _i32(frame, 4)
                if api_key == 18:  # ApiVersions: the broker's own answer
                    upstream_writer.write(struct.pack(">i", len(frame)) + frame)
                    await upstream_writer.drain()
                    answer = await _read_frame(up_reader)
                    if answer is None:
                        return
                    writer.write(struct.pack(">i", len(answer)) + answer)
                elif api_key == 17:  # SaslHandshake
                    mechanism = _read_string(frame, _body_start(frame))
                    error = 0 if mechanism == "PLAIN" else 33  # UNSUPPORTED_SASL_MECHANISM
                    body = struct.pack(">hi", error, 1) + _string("PLAIN")
                    _reply(writer, correlation, body)
                elif api_key == 36 and version <= 1:  # SaslAuthenticate
                    at = _body_start(frame)
                    token = frame[at + 4 : at + 4 + _i32(frame, at)]
                    parts = token.split(b"\x00")
                    user = parts[1].decode("utf-8", "replace") if len(parts) == 3 else ""
                    password = parts[2].decode("utf-8", "replace") if len(parts) == 3 else ""
                    ok = len(parts) == 3 and self.users.get(user) == password
                    self.logins.append((user, ok))
                    message = None if ok else "Authentication failed: invalid credentials"
                    body = struct.pack(">h", 0 if ok else 58)  # SASL_AUTHENTICATION_FAILED
                    body += _nullable_string(message) + struct.pack(">i", 0)
                    if version >= 1:
                        body += struct.pack(">q", 0)
                    _reply(writer, correlation, body)
                    await writer.drain()
                    if not ok:
                        return
                    authenticated = True
                else:
                    self.refused_before_auth += 1
                    return  # Kafka closes the connection of an unauthenticated client
                await writer.drain()
            await asyncio.gather(_pipe(reader, upstream_writer), _pipe(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError, struct.error):
            return
        finally:
            for w in (writer, upstream_writer):
                if w is not None:
                    w.close()


class _suppress_closed_loop:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        return exc_type is RuntimeError


async def _read_frame(reader: asyncio.StreamReader) -> bytes | None:
    try:
        size = struct.unpack(">i", await reader.readexactly(4))[0]
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        return None


def _body_start(frame: bytes) -> int:
    """Offset of a request body after a v1 header (api key, version, correlation, client id)."""
    client_id_len = _i16(frame, 8)
    return 10 + max(client_id_len, 0)


def _read_string(frame: bytes, at: int) -> str:
    length = _i16(frame, at)
    return frame[at + 2 : at + 2 + length].decode("utf-8", "replace")


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">h", len(data)) + data


def _nullable_string(text: str | None) -> bytes:
    return struct.pack(">h", -1) if text is None else _string(text)


def _reply(writer: asyncio.StreamWriter, correlation: int, body: bytes) -> None:
    payload = struct.pack(">i", correlation) + body
    writer.write(struct.pack(">i", len(payload)) + payload)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


# --- hostile images -----------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def huge_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A complete, valid 1-bit grayscale PNG of ``width`` x ``height`` black pixels.

    ~400 million pixels in some 50 KB: a decompression bomb for any decoder that
    allocates the image before checking its size.
    """
    row = b"\x00" + bytes((width + 7) // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", data)
        + _png_chunk(b"IEND", b"")
    )


# --- a toy worker with tunable timing (the long-job test) ----------------------------------


def toy_main(argv: list[str]) -> None:
    """``python -m tests.rel_utils toy``: the toy stage with timings from the environment.

    ``REL_SESSION_TIMEOUT_MS``, ``REL_HEARTBEAT_MS``, ``TOY_WORKER`` (name in the Pong).
    Every handler call is logged (``handling <id> attempt <n>``) so duplicates show.
    """
    import logging

    from consumers.runtime import RuntimeConfig, StageRuntime
    from consumers.stage import ItemResult, StageContext
    from tests.toy_stage import Ping, ToyStage

    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s %(message)s")
    log = logging.getLogger("rel.toy")

    class LoggedToy(ToyStage):
        def handle(self, events: list[Ping], ctx: StageContext) -> list[ItemResult]:
            for e in events:
                log.info("handling %s attempt %d", e.id, self.attempts.get(e.id, 0) + 1)
            results = super().handle(events, ctx)
            for e in events:
                log.info("handled %s", e.id)
            return results

    config = RuntimeConfig(
        max_batch=1,
        session_timeout_ms=int(os.environ.get("REL_SESSION_TIMEOUT_MS", "6000")),
        heartbeat_interval_ms=int(os.environ.get("REL_HEARTBEAT_MS", "500")),
        commit_interval_ms=100,
        concurrency=1,
        create_topics=False,
    )
    runtime = StageRuntime(LoggedToy(os.environ.get("TOY_WORKER", "w")), Settings(), config)
    asyncio.run(runtime.serve())


if __name__ == "__main__":
    if sys.argv[1:2] == ["toy"]:
        toy_main(sys.argv[2:])
    else:
        raise SystemExit("usage: python -m tests.rel_utils toy")

"""Test processes forked from one that has already imported torch, diffusers and the workers.

A ``genseg worker`` spends about 12 s of this 2-core machine importing torch, diffusers,
transformers, scipy and peft before it runs a line of its own, and the tests start
dozens. The fork server is one process per test session that imports them once
(:data:`PRELOAD`); :func:`popen` then starts each ``python -m MODULE``, ``python SCRIPT``
or ``python -c CODE`` as a fork of it. The child is a real process: its own pid,
environment, working directory and standard streams, the program run as ``__main__``
(by :mod:`runpy`, as ``python -m`` does), killed by real signals, exiting through the
interpreter's own shutdown (atexit handlers, non-daemon threads), and reaped by the
server, which sends back its exit status. :class:`ForkedProcess` offers the part of
:class:`subprocess.Popen` the tests use.

What a fork cannot give that a fresh interpreter would: whatever a library read from the
environment while it was imported (``HF_HOME``, ``XDG_CACHE_HOME``, ``TORCH_*``,
``OMP_NUM_THREADS`` ...). A request is therefore forked only when its environment equals
the server's outside :data:`RUN_TIME_VARIABLES`, the variables read when the program
runs (genseg's settings, OpenTelemetry's, AWS's, proxies, ``TMPDIR``, the terminal's width); any
other difference, an interpreter option or a program the server cannot run, and
:func:`popen` starts a plain subprocess instead. ``GENSEG_TEST_FORKSERVER=0`` turns the
server off. Tests that are about a fresh interpreter (what a command imports, results
that must not depend on the process) start theirs with :mod:`subprocess` directly.

The protocol, over a Unix ``SOCK_SEQPACKET`` socket, one connection per child: the client
sends a JSON request with its three standard streams' descriptors attached; the server
answers ``{"pid": N}`` with a pidfd of the child attached (signals sent through it cannot
reach a recycled pid), then ``{"returncode": R}`` when the child has exited.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import io
import json
import logging
import os
import random
import re
import runpy
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]

#: Imported by the server before it forks anything: what a worker process imports, ours
#: included (none of genseg's modules reads the environment when imported).
PRELOAD = (
    "torch",
    "torchvision",
    "diffusers",
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
    "transformers",
    "transformers.modeling_utils",
    "peft",
    "segment_anything",
    "genseg.cli",
    "genseg.workers",
    "gen_worker.handler",
    "seg_worker.handler",
)

#: Variables a child may have different from the server's: read when a program runs,
#: never by a library's import.
RUN_TIME_VARIABLES = re.compile(
    r"(KAFKA_|GENSEG_|SD_|SAM|TOY_|DEPTH_|OTEL_|AWS_|REL_|PYTEST_CURRENT_TEST$|PYTHONUNBUFFERED$|TMPDIR$"
    r"|COLUMNS$|LINES$|(NO|HTTPS?|ALL)_PROXY$|(no|https?|all)_proxy$)"
)

logger = logging.getLogger(__name__)

#: How many requests were forked and why the others were not (the session's summary).
counts: Counter[str] = Counter()

# The server's environment: the tests' own, before any test changed it (set_baseline).
_baseline: dict[str, str] | None = None


def set_baseline(env: Mapping[str, str]) -> None:
    """The environment the server starts with, which a request must match outside
    :data:`RUN_TIME_VARIABLES` to be forked: the session's once its test modules are
    imported (tests/conftest.py; some set variables when imported). Without a call, the
    environment at the first request."""
    global _baseline
    _baseline = dict(env)


def _base_env() -> dict[str, str]:
    if _baseline is None:
        set_baseline(os.environ)
    assert _baseline is not None
    return _baseline


_MAX_MESSAGE = 1 << 20


# --- the server -----------------------------------------------------------------------------


class _Job:
    """A request, run as ``__main__`` in the forked child."""

    def __init__(self, request: dict[str, Any]) -> None:
        self.request = request

    def run(self) -> None:
        kind, target, args = self.request["kind"], self.request["target"], self.request["args"]
        if kind == "module":
            sys.argv = [target, *args]
            sys.path[0] = os.getcwd()
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        elif kind == "script":
            path = os.path.abspath(target)
            sys.argv = [target, *args]
            sys.path[0] = os.path.dirname(path)
            runpy.run_path(path, run_name="__main__")
        else:
            main = types.ModuleType("__main__")
            sys.modules["__main__"] = main
            sys.argv = ["-c", *args]
            sys.path[0] = ""
            exec(compile(target, "<string>", "exec"), vars(main))


def _become_child(request: dict[str, Any], fds: list[int]) -> _Job:
    """In the forked child: take the request's streams, environment and directory."""
    for number, fd in enumerate(fds):
        os.dup2(fd, number)
    # Everything else the server held (its socket, its epoll, other children's pidfds).
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    # What a fresh interpreter would not share with its siblings.
    import numpy as np  # here only: the client side needs the standard library alone

    random.seed()
    np.random.seed()
    tempfile.tempdir = None  # cached from the server's TMPDIR
    return _Job(request)


def serve(path: str) -> _Job:
    """Import :data:`PRELOAD`, then fork a child per request until standard input closes.

    Returns only in a child, with the job it is to run."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    gc.freeze()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(64)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "accept")
    selector.register(0, selectors.EVENT_READ, "parent")
    children: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, connection)
    print("ready", flush=True)
    while True:
        for key, _ in selector.select():
            if key.data == "accept":
                connection, _ = listener.accept()
                selector.register(connection, selectors.EVENT_READ, "request")
            elif key.data == "parent":
                if not os.read(0, 4096):  # the test run has ended
                    for pid, _ in children.values():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    sys.exit(0)
            elif key.data == "request":
                connection = key.fileobj
                assert isinstance(connection, socket.socket)
                selector.unregister(connection)
                message, fds, _, _ = socket.recv_fds(connection, _MAX_MESSAGE, 3)
                if not message:
                    connection.close()
                    continue
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    # The server's sockets, closed through their objects: closed under
                    # them, they would close whatever the child opens at those numbers.
                    selector.close()
                    listener.close()
                    connection.close()
                    for pidfd, (_, other) in children.items():
                        other.close()
                        os.close(pidfd)
                    return _become_child(json.loads(message), fds)
                for fd in fds:
                    os.close(fd)
                pidfd = os.pidfd_open(pid)
                children[pidfd] = (pid, connection)
                selector.register(pidfd, selectors.EVENT_READ, "child")
                socket.send_fds(connection, [json.dumps({"pid": pid}).encode()], [pidfd])
            else:  # a child has exited
                pidfd = key.fd
                pid, connection = children.pop(pidfd)
                selector.unregister(pidfd)
                os.close(pidfd)
                _, status = os.waitpid(pid, 0)
                reply = {"returncode": os.waitstatus_to_exitcode(status)}
                with contextlib.suppress(OSError):  # the test stopped listening
                    connection.send(json.dumps(reply).encode())
                connection.close()


# --- the client -----------------------------------------------------------------------------


class ForkedProcess:
    """A child of the fork server: the part of :class:`subprocess.Popen` the tests use."""

    def __init__(
        self,
        args: list[str],
        connection: socket.socket,
        pid: int,
        pidfd: int,
        stdout: IO[Any] | None,
        stderr: IO[Any] | None,
    ) -> None:
        self.args = args
        self.pid = pid
        self.stdin = None
        self.stdout = stdout
        self.stderr = stderr
        self.returncode: int | None = None
        self._connection = connection
        self._pidfd = pidfd

    def poll(self) -> int | None:
        return self._wait(0.0)

    def wait(self, timeout: float | None = None) -> int:
        returncode = self._wait(timeout)
        if returncode is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        return returncode

    def _wait(self, timeout: float | None) -> int | None:
        if self.returncode is None:
            self._connection.settimeout(timeout)
            try:
                message = self._connection.recv(_MAX_MESSAGE)
            except (TimeoutError, BlockingIOError):
                return None
            if not message:
                raise RuntimeError(f"the fork server lost child {self.pid}")
            self.returncode = int(json.loads(message)["returncode"])
            self._connection.close()
            os.close(self._pidfd)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # exited since
                signal.pidfd_send_signal(self._pidfd, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[Any, Any]:
        """Read the piped streams to their end, then wait (as :meth:`Popen.communicate`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        streams = [s for s in (self.stdout, self.stderr) if s is not None]
        chunks: dict[int, list[bytes]] = {s.fileno(): [] for s in streams}
        with selectors.DefaultSelector() as selector:
            for stream in streams:
                selector.register(stream.fileno(), selectors.EVENT_READ)
            while selector.get_map():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
                for key, _ in selector.select(left):
                    data = os.read(key.fd, 65536)
                    if data:
                        chunks[key.fd].append(data)
                    else:
                        selector.unregister(key.fd)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        outputs = []
        for stream in (self.stdout, self.stderr):
            if stream is None:
                outputs.append(None)
                continue
            data = b"".join(chunks[stream.fileno()])
            text = isinstance(stream, io.TextIOBase)
            outputs.append(data.decode(errors="replace") if text else data)
            stream.close()
        return outputs[0], outputs[1]


class _Server:
    """The session's fork server process, started at the first request."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="genseg-forkserver-")
        self.path = os.path.join(self.directory, "socket")
        self.log_path = os.path.join(self.directory, "server.log")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.forkserver", self.path],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                # Its standard streams become each child's: unbuffered, as the workers'
                # (PYTHONUNBUFFERED=1) are; a child without it only writes sooner.
                env={**_base_env(), "PYTHONUNBUFFERED": "1"},
                cwd=ROOT,
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # "ready" after the imports, or EOF if it died
        if line.strip() != b"ready":
            raise RuntimeError(f"the fork server did not start:\n{Path(self.log_path).read_text()}")
        atexit.register(self.close)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()  # the server kills what is left and exits
        self.proc.wait(30)

    def spawn(
        self, args: list[str], request: dict[str, Any], fds: list[int]
    ) -> tuple[socket.socket, int, int]:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        connection.connect(self.path)
        socket.send_fds(connection, [json.dumps(request).encode()], fds)
        message, pidfds, _, _ = socket.recv_fds(connection, _MAX_MESSAGE, 1)
        if not message:
            raise RuntimeError(f"the fork server refused {args}:\n{self.log()}")
        return connection, int(json.loads(message)["pid"]), pidfds[0]

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")


#: What :func:`popen` returns.
Process = ForkedProcess | subprocess.Popen[Any]

_server: _Server | None = None
_server_lock = threading.Lock()


def _the_server() -> _Server:
    global _server
    with _server_lock:
        if _server is None:
            _server = _Server()
        return _server


def enabled() -> bool:
    return os.environ.get("GENSEG_TEST_FORKSERVER", "1") != "0" and hasattr(os, "pidfd_open")


def forkable(args: Sequence[str], env: Mapping[str, str]) -> dict[str, Any] | None:
    """The server's request for ``args`` in ``env``, or None when only a fresh
    interpreter would run it as asked."""
    if not enabled() or len(args) < 2 or args[0] != sys.executable:
        return None
    if args[1] in ("-m", "-c"):
        if len(args) < 3:
            return None
        kind, target, rest = {"-m": "module", "-c": "code"}[args[1]], args[2], args[3:]
    elif args[1].startswith("-"):
        return None  # an interpreter option
    else:
        kind, target, rest = "script", args[1], args[2:]
    base = _base_env()
    for name in set(env) | set(base):
        if not RUN_TIME_VARIABLES.match(name) and env.get(name) != base.get(name):
            logger.info("a fresh interpreter for %s: %s differs", args[1:3], name)
            counts[f"fresh ({name} differs)"] += 1
            return None
    return {"kind": kind, "target": target, "args": list(rest), "env": dict(env)}


def popen(
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    stdin: int | IO[Any] | None = None,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
    text: bool = False,
) -> Process:
    """Start ``args`` as :class:`subprocess.Popen` would (the same keywords), forked from
    the server when :func:`forkable`; a plain subprocess otherwise."""
    args = [str(a) for a in args]
    environment = dict(os.environ if env is None else env)
    request = forkable(args, environment)
    if request is None or stdin == subprocess.PIPE:  # no test writes to a child's stdin
        return subprocess.Popen(
            args, env=environment, cwd=cwd, stdin=stdin, stdout=stdout, stderr=stderr, text=text
        )
    request["cwd"] = os.path.abspath(cwd or os.getcwd())
    with contextlib.ExitStack() as ours:  # descriptors that are the child's alone
        devnull = ours.enter_context(open(os.devnull, "r+b"))
        readers: dict[int, int] = {}  # stream number -> our end of its pipe
        fds: list[int] = []
        for number, given in enumerate((stdin, stdout, stderr)):
            if given is None:
                fds.append(number)
            elif given == subprocess.DEVNULL:
                fds.append(devnull.fileno())
            elif given == subprocess.PIPE:
                readers[number], write = os.pipe()
                ours.callback(os.close, write)
                fds.append(write)
            elif given == subprocess.STDOUT:
                fds.append(fds[1])
            else:
                fds.append(given if isinstance(given, int) else given.fileno())
        connection, pid, pidfd = _the_server().spawn(args, request, fds)
    counts["forked"] += 1

    def reader(number: int) -> IO[Any] | None:
        if number not in readers:
            return None
        binary = os.fdopen(readers[number], "rb")
        return io.TextIOWrapper(binary) if text else binary

    return ForkedProcess(args, connection, pid, pidfd, reader(1), reader(2))


def run(
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
    capture_output: bool = False,
    text: bool = False,
) -> subprocess.CompletedProcess[Any]:
    """:func:`subprocess.run` for the keywords the tests use, through :func:`popen`."""
    piped = subprocess.PIPE if capture_output else None
    proc = popen(args, env=env, cwd=cwd, stdout=piped, stderr=piped, text=text)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    assert proc.returncode is not None
    return subprocess.CompletedProcess(list(args), proc.returncode, out, err)


if __name__ == "__main__":
    serve(sys.argv[1]).run()

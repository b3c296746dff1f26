"""The warm stage server: a stage starts in a fraction of a second instead of re-importing its libraries.

``python -m tasks run <paper> <stage>`` (what dvc.yaml calls) is a small stdlib-only client. It looks for
the stage server of this virtual environment: a process that has already imported the third-party
modules stages use (torch, numpy, pydantic, MLflow and its SQL store, scikit-learn, transformers,
diffusers, peft, ...) and forks one child per request. The child takes over the client's standard
streams, working folder, environment, ``sys.path`` and arguments, imports the project's own code fresh
from the client's folder (the server never imports it) and runs the stage exactly as ``python -m tasks``
would. The client forwards SIGINT, SIGTERM and SIGHUP to the child and exits with the child's exit
code, so DVC, Prefect and a terminal see the same process semantics; when the client dies (even by
SIGKILL) the child receives SIGTERM and ends as a killed stage (outputs untouched, MLflow run KILLED).

When no server answers, the client starts one in the background (detached, its log beside its socket)
and runs the stage in its own process as before; the next stage finds the server warm. The server exits
after ``PAPERFLOWS_STAGE_SERVER_IDLE`` seconds without a request (default 600).
``PAPERFLOWS_STAGE_SERVER=0`` turns it off: every stage then runs in a fresh process.

A server is identified by the interpreter, the modification times of ``site-packages`` (installing a
package changes them), this file's content and the environment variables libraries read when they are
imported (threads, Hugging Face offline mode, CUDA, ...): a change in any of them makes the next client
start a new server; the old one finishes its running stages and exits when idle.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import struct
import sys
import tempfile

SWITCH_ENV = "PAPERFLOWS_STAGE_SERVER"
IDLE_ENV = "PAPERFLOWS_STAGE_SERVER_IDLE"
IMPORT_TIME_ENV = ("OMP_", "MKL_", "OPENBLAS_", "GOTO_", "KMP_", "HF_", "TRANSFORMERS_", "DIFFUSERS_",
                   "TORCH", "PYTORCH_", "CUDA_", "PYTHON", "MPLBACKEND", "TOKENIZERS_", "LD_")
PRELOAD = ("numpy", "scipy", "yaml", "pydantic", "tqdm", "safetensors.torch", "torch", "torch.nn",
           "torch.optim", "sklearn.datasets", "sklearn.linear_model", "sklearn.metrics",
           "matplotlib", "matplotlib.pyplot", "mlflow", "mlflow.store.tracking.sqlalchemy_store",
           "transformers", "tokenizers", "diffusers", "peft", "torchsde", "botorch", "gpytorch",
           "statsmodels.api")
PROJECT_PACKAGES = ("tasks", "models", "flows", "tests", "benchmarks")
_LEN = struct.Struct("!I")
_INT = struct.Struct("!i")


def enabled() -> bool:
    return os.environ.get(SWITCH_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def fingerprint() -> str:
    h = hashlib.sha256()
    h.update(os.path.realpath(sys.executable).encode() + sys.version.encode())
    for entry in sys.path:
        if entry.endswith("-packages") and os.path.isdir(entry):
            h.update(f"{entry}:{os.stat(entry).st_mtime_ns}".encode())
    with open(__file__, "rb") as fh:
        h.update(fh.read())
    for key in sorted(os.environ):
        if key.startswith(IMPORT_TIME_ENV):
            h.update(f"{key}={os.environ[key]}\0".encode())
    return h.hexdigest()[:16]


def socket_path() -> str:
    folder = os.path.join(tempfile.gettempdir(), f"paperflows-{os.getuid()}")
    name = f"stage-{fingerprint()}.sock"
    if len(os.path.join(folder, name)) > 100:  # a Unix socket's path must fit in ~108 bytes
        short = hashlib.sha256(folder.encode()).hexdigest()[:8]
        folder = os.path.join("/tmp", f"paperflows-{os.getuid()}-{short}")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    return os.path.join(folder, name)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("stage server closed the connection")
        buf += chunk
    return buf


# ----------------------------------------------------------------------------------------- client
def forward(argv: list[str]) -> int | None:
    """Run ``python -m tasks <argv>`` in a child of the warm server; None when there is none (then the
    caller runs it here). Only ``run`` is forwarded: the other commands are cheap."""
    if not argv or argv[0] != "run" or not enabled() or "-h" in argv or "--help" in argv:
        return None
    path = socket_path()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        start_server(path)
        return None
    fds = [fd if _valid(fd) else os.open(os.devnull, os.O_RDWR) for fd in (0, 1, 2)]
    req = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ),
                      "path": sys.path}).encode()
    try:
        socket.send_fds(sock, [_LEN.pack(len(req)) + req], fds)
        (pid,) = _INT.unpack(_recv_exact(sock, _INT.size))
    except (OSError, ConnectionError):
        sock.close()
        return None  # the server went away before forking: run here
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: _kill(pid, signum))
    try:
        (code,) = _INT.unpack(_recv_exact(sock, _INT.size))
    except ConnectionError:
        print(f"error: the stage server stopped while running this stage (pid {pid})", file=sys.stderr)
        return 1
    return 128 - code if code < 0 else code  # killed by signal N -> 128 + N, as a shell reports it


def _valid(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def start_server(path: str) -> None:
    """Start a detached server for ``path`` unless one is starting already (its lock is held)."""
    import fcntl
    import subprocess

    with open(path + ".lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        with open(path + ".log", "a") as log:
            subprocess.Popen([sys.executable, "-m", "tasks.stageserver", path], stdin=subprocess.DEVNULL,
                             stdout=log, stderr=log, start_new_session=True, close_fds=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def warm(timeout: float = 180.0) -> bool:
    """Start the server if none is up and wait until it answers (benchmarks, `make serve`)."""
    import time

    path = socket_path()
    deadline = time.monotonic() + timeout
    started = False
    while time.monotonic() < deadline:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            return True
        except OSError:
            if not started:
                start_server(path)
                started = True
            time.sleep(0.2)
        finally:
            probe.close()
    return False


# ----------------------------------------------------------------------------------------- server
def serve(path: str, idle: float) -> None:
    import fcntl
    import importlib
    import select
    import time

    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one server starts at a time; a second one finds it and exits
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            return
        except OSError:
            pass
        finally:
            probe.close()
        for name in PRELOAD:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - a missing optional library is simply not preloaded
                pass
        if "sqlalchemy.orm" in sys.modules:
            sys.modules["sqlalchemy.orm"].configure_mappers()
        if os.path.exists(path):
            os.unlink(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        os.chmod(path, 0o600)
        listener.listen(64)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *a: None)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    ident = os.stat(path).st_ino
    children: dict[int, socket.socket] = {}
    last = time.monotonic()
    print(f"stage server {os.getpid()} ready on {path}", flush=True)
    try:
        while True:
            _reap(children)
            current = os.stat(path).st_ino if os.path.exists(path) else None
            if not children and (time.monotonic() - last > idle or current != ident):
                break
            ready, _, _ = select.select([listener, wake_r], [], [], 1.0)
            if wake_r in ready:
                os.read(wake_r, 512)
            if listener in ready:
                conn, _ = listener.accept()
                last = time.monotonic()
                _accept(conn, listener, children)
    finally:
        for conn in children.values():
            conn.close()
        listener.close()
        if os.path.exists(path) and os.stat(path).st_ino == ident:
            os.unlink(path)


def _reap(children: dict[int, socket.socket]) -> None:
    for pid in list(children):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            conn = children.pop(pid)
            try:
                conn.sendall(_INT.pack(os.waitstatus_to_exitcode(status)))
            except OSError:
                pass
            conn.close()


def _accept(conn: socket.socket, listener: socket.socket, children: dict[int, socket.socket]) -> None:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    if struct.unpack("3i", creds)[1] != os.getuid():
        conn.close()
        return
    try:
        msg, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
        (size,) = _LEN.unpack(msg[:_LEN.size])
        body = msg[_LEN.size:]
        if len(body) < size:
            body += _recv_exact(conn, size - len(body))
        req = json.loads(body)
    except (OSError, ValueError, ConnectionError, struct.error):
        conn.close()
        return
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        listener.close()
        for other in children.values():
            other.close()
        _child(conn, fds, req)  # never returns
    for fd in fds:
        os.close(fd)
    print(f"child {pid}: {' '.join(req['argv'])} in {req['cwd']}", flush=True)
    try:
        conn.sendall(_INT.pack(pid))
    except OSError:
        pass
    children[pid] = conn


def _child(conn: socket.socket, fds: list[int], req: dict) -> None:
    code = 1
    try:
        code = _run_child(conn, fds, req)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # noqa: BLE001 - report like an uncaught exception of `python -m tasks`
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


def _run_child(conn: socket.socket, fds: list[int], req: dict) -> int:
    import importlib
    import io
    import threading

    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _die_with_parent()
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        if fd > 2:
            os.close(fd)
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=os.isatty(1),
                                  write_through=os.isatty(1))
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), errors="backslashreplace",
                                  line_buffering=True)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    sys.path[:] = req["path"]
    sys.argv = [os.path.join(req["cwd"], "tasks", "__main__.py"), *req["argv"]]
    for name in list(sys.modules):
        if name.split(".")[0] in PROJECT_PACKAGES:
            del sys.modules[name]
    importlib.invalidate_caches()
    threading.Thread(target=_watch_client, args=(conn,), daemon=True).start()
    from tasks.__main__ import main

    return main(req["argv"])


def _watch_client(conn: socket.socket) -> None:
    """The client closed its end (it died, e.g. SIGKILL): end this stage as a killed one."""
    try:
        while conn.recv(64):
            pass
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGTERM)


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


if __name__ == "__main__":
    if sys.argv[1:] == ["--warm"]:
        sys.exit(0 if warm() else 1)
    serve(sys.argv[1], float(os.environ.get(IDLE_ENV, "600")))

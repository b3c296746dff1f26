"""`make serve`: a Prefect server, an MLflow tracking server, `cpu` and `gpu` process work pools with
one worker each, the `gpu` tag limit and the deployments of prefect.yaml, all on loopback.
Ctrl-C stops everything it started. The pieces are reused by the scale-out test."""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tasks.core.settings import apply_offline_defaults, find_root

PREFECT = [sys.executable, "-m", "prefect"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status < 500:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


class Services:
    """Processes started here, each in its own session so it can be stopped with its children."""

    def __init__(self, log_dir: Path):
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def stop(self, name: str | None = None, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        for pname, proc in list(self.procs):
            if name is not None and pname != name:
                continue
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            self.procs.remove((pname, proc))

    def stop_all(self, timeout: float = 15) -> None:
        """SIGTERM to every process group at once, then wait (SIGKILL after ``timeout``)."""
        for _, proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.time() + timeout
        for _, proc in list(self.procs):
            try:
                proc.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()


def base_env(api_url: str, mlflow_uri: str, home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PREFECT_API_URL=api_url, MLFLOW_TRACKING_URI=mlflow_uri, PREFECT_HOME=str(home),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="true",
               MLFLOW_DISABLE_TELEMETRY="true", PAPERFLOWS_NO_PROGRESS="1")
    return env


def start_prefect_server(services: Services, port: int, home: Path, cwd: Path) -> str:
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(port),
               PREFECT_UI_ENABLED=os.environ.get("PREFECT_UI_ENABLED", "true"))
    env.pop("PREFECT_API_URL", None)
    proc = services.start("prefect-server", [*PREFECT, "server", "start", "--host", "127.0.0.1",
                                             "--port", str(port)], cwd, env)
    api = f"http://127.0.0.1:{port}/api"
    wait_http(f"{api}/health", 180, proc)
    return api


def start_mlflow_server(services: Services, port: int, root: Path) -> str:
    store = f"sqlite:///{(root / 'mlflow.db').resolve()}"
    # the server's job consumers (seven processes, ~1.7 GB) serve features this project does not use
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true",
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = services.start("mlflow-server", [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
                                            "--port", str(port), "--backend-store-uri", store,
                                            "--artifacts-destination", str((root / "mlartifacts").resolve()),
                                            "--workers", "1"], root, env)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", 180, proc)
    return url


def prefect_cli(args: list[str], env: dict[str, str], cwd: Path, check: bool = True) -> str:
    out = subprocess.run([*PREFECT, *args], cwd=cwd, env=env, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise RuntimeError(f"prefect {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    return out.stdout


def setup_pools_and_limit(api_url: str, gpu_limit: int) -> None:
    """Process work pools `cpu` and `gpu` and the `gpu` tag concurrency limit, when missing."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.workers.process import ProcessWorker

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        for pool in ("cpu", "gpu"):
            try:
                client.create_work_pool(WorkPoolCreate(
                    name=pool, type="process",
                    base_job_template=ProcessWorker.get_default_base_job_template()))
            except ObjectAlreadyExists:
                pass
        try:
            client.read_concurrency_limit_by_tag("gpu")
        except ObjectNotFound:
            client.create_concurrency_limit(tag="gpu", concurrency_limit=gpu_limit)


def deploy(env: dict[str, str], workspace: Path) -> None:
    prefect_cli(["--no-prompt", "deploy", "--all"], env, workspace)


def start_worker(services: Services, pool: str, workspace: Path, env: dict[str, str],
                 name: str | None = None) -> subprocess.Popen:
    """A process worker whose flow runs execute in ``workspace`` (its clone of the repo)."""
    wenv = dict(env, PAPERFLOWS_ROOT=str(workspace),
                PYTHONPATH=os.pathsep.join([str(workspace), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return services.start(f"worker-{name or pool}", [*PREFECT, "worker", "start", "--pool", pool, "--name",
                                                     name or f"{pool}-{socket.gethostname()}",
                                                     "--type", "process"], workspace, wenv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__)
    parser.add_argument("--prefect-port", type=int, default=4200)
    parser.add_argument("--mlflow-port", type=int, default=5000)
    parser.add_argument("--no-deploy", action="store_true", help="skip `prefect deploy --all`")
    args = parser.parse_args(argv)
    root = apply_offline_defaults(find_root())

    def stop(signum, frame):  # Ctrl-C and SIGTERM alike, even when started in the background
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    services = Services(root / ".prefect" / "logs")
    home = root / ".prefect"
    try:
        api = start_prefect_server(services, args.prefect_port, home, root)
        mlflow_url = start_mlflow_server(services, args.mlflow_port, root)
        env = base_env(api, mlflow_url, home)
        from flows.core import visible_gpus

        setup_pools_and_limit(api, max(1, visible_gpus()))
        if not args.no_deploy:
            deploy(env, root)
        start_worker(services, "cpu", root, env)
        start_worker(services, "gpu", root, env)
        ui = api.removesuffix("/api")
        print(f"Prefect UI:  {ui}\nMLflow UI:   {mlflow_url}\n"
              f"Deployments: {ui}/deployments (e.g. run 'lowprec_ensemble/pipeline')\n"
              f"Logs:        .prefect/logs/\nCtrl-C stops everything.", flush=True)
        while all(p.poll() is None for _, p in services.procs):
            time.sleep(1)
        dead = [n for n, p in services.procs if p.poll() is not None]
        print(f"stopped: {', '.join(dead)} exited (see .prefect/logs/)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        services.stop_all()


if __name__ == "__main__":
    sys.exit(main())

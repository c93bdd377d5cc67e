"""nginx in front of N gunicorn replicas of this checkout, all on loopback: `make cluster`.

    python scripts/cluster.py --replicas 3 --port 8080 [--models-dir DIR] [--run-dir DIR]
                              [--env KEY=VALUE ...]

Every replica is the production server (gunicorn.conf.py, "app_factory:create_app()") on its
own free 127.0.0.1 port, named replica-1..replica-N as in compose (the replica label of
/metrics), sharing MODELS_DIR and DATA_DIR, with its own LOG_DIR under the run directory, and
TRUSTED_PROXY_HOPS=1 so that its access log and per-address limits see the client behind
nginx. nginx runs deploy/nginx/nginx.conf (copied into the run directory) with replicas.conf,
limits.conf, upload.conf and listen.conf written for this cluster. Ctrl-C or SIGTERM stops it
cleanly: the replicas drain (SIGTERM: running requests finish) and nginx quits gracefully.

Importable without side effects: tests/test_cluster.py and bench/bench.py use `Cluster`,
`Nginx` and `nginx_available()`.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from dotenv import dotenv_values

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from config import Config, load_config  # noqa: E402

NGINX_CONF_DIR = ROOT / "deploy" / "nginx"
GUNICORN = [str(Path(sys.executable).parent / "gunicorn"), "-c", "gunicorn.conf.py",
            "app_factory:create_app()"]
# Margin of nginx's timeouts over the replicas' own, so that the replica answers first.
TIMEOUT_MARGIN = 60


def nginx_binary() -> str | None:
    """nginx on PATH, or Debian's /usr/sbin/nginx (not on a non-root user's PATH)."""
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def nginx_available() -> bool:
    return nginx_binary() is not None


def free_port() -> int:
    """A free 127.0.0.1 port picked by the OS, so parallel runs and a dev server do not collide."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def limits_conf(config: Config) -> str:
    """deploy/nginx/limits.conf for these settings (the file in the repository is this for
    config.py's defaults; tests/test_cluster.py checks that they agree)."""
    generation = config.QUEUE_TIMEOUT + config.REQUEST_TIMEOUT
    upstream = math.ceil(max(generation, config.MODEL_PROBE_TIMEOUT)) + TIMEOUT_MARGIN
    return (
        "# Sizes and timeouts from config.py's settings (scripts/cluster.py's limits_conf writes\n"
        "# this file; the one in deploy/nginx/ is for the defaults).\n"
        "# MAX_REQUEST_BYTES: the largest JSON body. Model uploads (POST /api/v1/models) have\n"
        "# MAX_UPLOAD_BYTES instead (upload.conf) and stream to the replica.\n"
        f"client_max_body_size {config.MAX_REQUEST_BYTES};\n"
        "# Above QUEUE_TIMEOUT + REQUEST_TIMEOUT and MODEL_PROBE_TIMEOUT (an upload's trial), so\n"
        "# that a replica's own timeout reply comes first.\n"
        f"proxy_read_timeout {upstream}s;\n"
        f"proxy_send_timeout {upstream}s;\n"
        "# No retry on another replica (nginx.conf's proxy_next_upstream) after this long.\n"
        f"proxy_next_upstream_timeout {upstream}s;\n"
        "# CLIENT_HEADER_TIMEOUT, CLIENT_BODY_TIMEOUT and CLIENT_SEND_TIMEOUT.\n"
        f"client_header_timeout {math.ceil(config.CLIENT_HEADER_TIMEOUT)}s;\n"
        f"client_body_timeout {math.ceil(config.CLIENT_BODY_TIMEOUT)}s;\n"
        f"send_timeout {math.ceil(config.CLIENT_SEND_TIMEOUT)}s;\n")


def upload_conf(config: Config) -> str:
    """deploy/nginx/upload.conf for these settings: the body limit of model uploads."""
    return ("# MAX_UPLOAD_BYTES: the largest model upload (POST /api/v1/models), refused by nginx\n"
            "# before a byte is relayed when its Content-Length says more (scripts/cluster.py's\n"
            "# upload_conf writes this file; the one in deploy/nginx/ is for the defaults).\n"
            f"client_max_body_size {config.MAX_UPLOAD_BYTES};\n")


def replicas_conf(upstreams: list[str]) -> str:
    """The upstream servers: a replica refused twice is skipped for 2 s, then tried again."""
    return "".join(f"server {address} max_fails=2 fail_timeout=2s;\n" for address in upstreams)


def listen_conf(port: int, temp_dir: Path) -> str:
    """Loopback only, the access log in the run directory (nginx's -p prefix), and every temp
    path in `temp_dir` (the build's defaults under /var/lib/nginx need root)."""
    temp = "".join(f"{kind}_temp_path {temp_dir / kind};\n"
                   for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"listen 127.0.0.1:{port};\naccess_log logs/access.log llm_json;\n{temp}"


def answers_health(url: str) -> bool:
    """Whether GET /health answers 200 (urllib: `make cluster` needs only the runtime packages)."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
            return reply.status == 200
    except OSError:         # refused, reset, timed out, or an HTTP error status
        return False


def tail(path: Path, size: int = 6000) -> str:
    try:
        with open(path, "rb") as file:
            file.seek(max(0, file.seek(0, os.SEEK_END) - size))
            return file.read().decode(errors="replace")
    except OSError:
        return ""


class Nginx:
    """nginx running deploy/nginx/nginx.conf in `run_dir`, in front of `upstreams`
    ("127.0.0.1:5001", ...), on `port` (a free one when None) of 127.0.0.1.

    Runs as this user in the foreground (daemon off). As root its workers run as nobody: their
    temp directory is then a fresh one under the system temp dir (reachable by nobody; a test's
    tmp_path is not), which nginx's master gives to the worker user itself.
    """

    def __init__(self, upstreams: list[str], run_dir: Path, port: int | None = None,
                 config: Config | None = None):
        self.upstreams, self.run_dir = list(upstreams), Path(run_dir)
        self.port = port or free_port()
        self.config = config or load_config({})
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.temp_dir: Path | None = None

    @property
    def access_log(self) -> Path:
        return self.run_dir / "logs" / "access.log"

    @property
    def error_log(self) -> Path:
        return self.run_dir / "logs" / "error.log"

    def write_config(self) -> Path:
        """nginx.conf and its includes in the run directory; the path of nginx.conf."""
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.temp_dir = Path(tempfile.mkdtemp(prefix="llm-nginx-"))
        self.temp_dir.chmod(0o711)
        shutil.copyfile(NGINX_CONF_DIR / "nginx.conf", self.run_dir / "nginx.conf")
        (self.run_dir / "replicas.conf").write_text(replicas_conf(self.upstreams))
        (self.run_dir / "limits.conf").write_text(limits_conf(self.config))
        (self.run_dir / "upload.conf").write_text(upload_conf(self.config))
        (self.run_dir / "listen.conf").write_text(listen_conf(self.port, self.temp_dir))
        return self.run_dir / "nginx.conf"

    def command(self, conf: Path, *extra: str) -> list[str]:
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx is not installed (make nginx installs it)")
        return [binary, "-p", str(self.run_dir), "-c", str(conf), "-e", str(self.error_log),
                "-g", f"daemon off; pid {self.run_dir / 'nginx.pid'};", *extra]

    def start(self, seconds: float = 15) -> "Nginx":
        conf = self.write_config()
        checked = subprocess.run(self.command(conf, "-t", "-q"), capture_output=True, text=True,
                                 timeout=30)
        if checked.returncode:
            raise RuntimeError(f"nginx -t refused the configuration:\n{checked.stderr}"
                               f"{tail(self.error_log)}")
        self.process = subprocess.Popen(self.command(conf), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nginx did not start:\n{tail(self.error_log)}")

    def stop(self, seconds: float = 15) -> None:
        """Graceful quit (SIGQUIT, what `nginx -s quit` sends): open requests finish."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(timeout=seconds)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None

    def __enter__(self) -> "Nginx":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Replica:
    """One gunicorn replica: its port stays the same across restarts (nginx knows it)."""

    def __init__(self, index: int, run_dir: Path, env: dict[str, str]):
        self.name = f"replica-{index + 1}"
        self.dir = run_dir / self.name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_dir = self.dir / "logs"
        self.output_path = self.dir / "output.log"
        self.env = {**env, "HOST": "127.0.0.1", "PORT": str(self.port),
                    "LOG_DIR": str(self.log_dir), "REPLICA_NAME": self.name}
        self.process: subprocess.Popen | None = None

    def spawn(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_path, "ab") as output:  # appended: restarts keep the history
            self.process = subprocess.Popen(GUNICORN, cwd=ROOT, env=self.env,
                                            stdin=subprocess.DEVNULL, stdout=output,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self.running:
            if answers_health(self.url):
                return
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"{self.name} did not start within {seconds:g} s; its output:\n"
                           f"{tail(self.output_path)}")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def terminate(self, seconds: float) -> int | None:
        """SIGTERM (the replica drains), then wait for its exit; SIGKILL after `seconds`."""
        if not self.running:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            return self.kill()

    def kill(self) -> int | None:
        if self.running:
            os.killpg(self.process.pid, signal.SIGKILL)  # gunicorn's worker too
        return self.process.wait(timeout=30) if self.process else None


class Cluster:
    """`replicas` gunicorn replicas sharing `models_dir` behind nginx (`Nginx`), everything
    under `run_dir`: run_dir/replica-<n>/{logs/,output.log}, run_dir/data (DATA_DIR unless
    `settings` names one), nginx's files and run_dir/logs/access.log. `settings` are the
    replicas' environment on top of this process's."""

    def __init__(self, replicas: int, run_dir: Path, settings: dict[str, str],
                 models_dir: Path, nginx_port: int | None = None):
        self.run_dir = Path(run_dir).resolve()
        self.models_dir = Path(models_dir).resolve()
        self.env = {**os.environ, "DATA_DIR": str(self.run_dir / "data"),
                    **{key: str(value) for key, value in settings.items()},
                    "MODELS_DIR": str(self.models_dir), "TRUSTED_PROXY_HOPS": "1"}
        self.config = _replica_config(self.env)
        self.replicas = [Replica(i, self.run_dir, self.env) for i in range(replicas)]
        self.nginx = Nginx([f"127.0.0.1:{replica.port}" for replica in self.replicas],
                           self.run_dir, nginx_port, self.config)
        # A replica's drain plus gunicorn's own margin (gunicorn.conf.py's graceful_timeout).
        self.stop_seconds = self.config.SHUTDOWN_TIMEOUT + 20

    @property
    def url(self) -> str:
        return self.nginx.url

    @property
    def replica_urls(self) -> list[str]:
        return [replica.url for replica in self.replicas]

    def api_log(self, i: int) -> Path:
        return self.replicas[i].log_dir / "api.log"

    def start(self, seconds: float = 120) -> "Cluster":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            for replica in self.replicas:
                replica.spawn()
            for replica in self.replicas:
                replica.wait_ready(seconds)
            self.nginx.start()
        except BaseException:
            self.stop()
            raise
        return self

    def kill(self, i: int) -> None:
        """SIGKILL replica i (and its gunicorn worker): no drain, no cleanup."""
        self.replicas[i].kill()

    def terminate(self, i: int) -> int | None:
        """SIGTERM replica i and wait for its exit (it drains first); its exit status."""
        return self.replicas[i].terminate(self.stop_seconds)

    def restart(self, i: int, seconds: float = 120) -> None:
        """Start replica i again on its port (terminated first when still running)."""
        self.terminate(i)
        self.replicas[i].spawn()
        self.replicas[i].wait_ready(seconds)

    def stop(self) -> None:
        """Every replica drains at once (SIGTERM, once each), then nginx quits."""
        waits = [threading.Thread(target=replica.terminate, args=(self.stop_seconds,))
                 for replica in self.replicas]
        for wait in waits:
            wait.start()
        for wait in waits:
            wait.join()
        self.nginx.stop()

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _replica_config(env: dict[str, str]) -> Config:
    """The settings a replica will have: its environment over the checkout's .env."""
    dotenv = ROOT / ".env"
    return load_config({**(dotenv_values(dotenv) if dotenv.exists() else {}), **env})


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=3, help="gunicorn replicas (3)")
    parser.add_argument("--port", type=int, default=8080, help="nginx's port on 127.0.0.1 (8080)")
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="shared MODELS_DIR (default: the checkout's setting, ./models)")
    parser.add_argument("--run-dir", type=Path, default=ROOT / "logs" / "cluster",
                        help="logs, nginx files and DATA_DIR (default: logs/cluster)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for every replica (repeatable)")
    args = parser.parse_args(argv)
    if args.replicas < 1:
        parser.error("--replicas must be at least 1")
    bad = [item for item in args.env if "=" not in item]
    if bad:
        parser.error(f"--env wants KEY=VALUE, got {bad[0]!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    settings = dict(item.split("=", 1) for item in args.env)
    models_dir = args.models_dir or Path(_replica_config({**os.environ, **settings}).MODELS_DIR)
    if not models_dir.is_absolute():
        models_dir = ROOT / models_dir
    stop, started = threading.Event(), threading.Event()

    def on_signal(*_):
        """Before the cluster is up: unwind start() (it stops what it started); after: stop."""
        if not started.is_set():
            raise KeyboardInterrupt("interrupted")
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    cluster = Cluster(args.replicas, args.run_dir, settings, models_dir, args.port)
    print(f"starting {args.replicas} replicas sharing {models_dir} ...", flush=True)
    try:
        cluster.start()
    except (RuntimeError, KeyboardInterrupt) as exc:
        print(f"the cluster did not start: {exc}", file=sys.stderr)
        return 1
    started.set()
    try:
        _serve(cluster, stop)
    finally:
        print("stopping: replicas drain, then nginx quits ...", flush=True)
        cluster.stop()
    return 0


def _serve(cluster: Cluster, stop: threading.Event) -> None:
    """Print where everything is, then wait for the signal, reporting replicas that die."""
    for replica in cluster.replicas:
        print(f"  {replica.name}: {replica.url}  (logs: {replica.log_dir})")
    print(f"nginx: {cluster.url}  (access log: {cluster.nginx.access_log})\n"
          f"Ctrl-C stops everything.", flush=True)
    while not stop.wait(1):
        for replica in cluster.replicas:
            if replica.process is not None and replica.process.poll() is not None:
                print(f"{replica.name} exited ({replica.process.returncode}); see "
                      f"{replica.output_path}", flush=True)
                replica.process = None


if __name__ == "__main__":
    sys.exit(main())

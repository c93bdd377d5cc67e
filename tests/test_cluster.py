"""Three gunicorn replicas sharing one MODELS_DIR behind real nginx (scripts/cluster.py), started
once for the module: what a client of the balancer and of each replica sees.

Skipped when nginx is not installed (`make nginx` installs Debian's package as root).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest
import requests

from conftest import LONG, MODEL_NAME, ROOT, TEST_N_CTX, wait_until
from config import load_config
from models.registry_file import REGISTRY_FILE
from scripts.cluster import Cluster, limits_conf, nginx_available, nginx_binary, upload_conf

# How long an upload or delete through one replica may take to be seen by the others.
SEEN_WITHIN = 5.0
CHUNK = 1024 * 1024


def upload(url: str, model_file: Path, name: str, overwrite: bool = False,
           headers: dict | None = None) -> requests.Response:
    """POST /api/v1/models with the model's bytes streamed from disk (requests would hold a
    whole multipart body in memory), with its exact Content-Length."""
    boundary = uuid.uuid4().hex
    fields = b"".join(
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"{key}\"\r\n\r\n{value}\r\n"
        .encode() for key, value in (("name", name), ("overwrite", str(overwrite).lower())))
    head = fields + (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
                     f"filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
                     ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    length = len(head) + model_file.stat().st_size + len(tail)
    return requests.post(f"{url}/api/v1/models", data=_Body(head, model_file, tail, length),
                         timeout=120, headers={
                             "Content-Type": f"multipart/form-data; boundary={boundary}",
                             **(headers or {})})


class _Body:
    """An iterable body of known length: requests then sends a Content-Length, not chunks."""

    def __init__(self, head: bytes, model_file: Path, tail: bytes, length: int):
        self.head, self.model_file, self.tail, self.length = head, model_file, tail, length

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        yield self.head
        with open(self.model_file, "rb") as file:
            while chunk := file.read(CHUNK):
                yield chunk
        yield self.tail


def generate(url: str, model: str | None = None, tokens: int = 4, request_id: str | None = None,
             timeout: float = 60) -> requests.Response:
    body = {"prompt": "Say hi", "stream": False, "options": {"num_predict": tokens,
                                                             "temperature": 0}}
    if model:
        body["model"] = model
    headers = {"X-Request-ID": request_id} if request_id else {}
    return requests.post(f"{url}/api/generate", json=body, headers=headers, timeout=timeout)


def listed(url: str) -> set[str]:
    reply = requests.get(f"{url}/api/v1/models", timeout=10)
    assert reply.status_code == 200, reply.text
    return {model["name"] for model in reply.json()["models"]}


def log_lines(path: Path) -> list[dict]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def nginx_log(cluster: Cluster) -> dict[str, dict]:
    """request_id -> nginx's access-log line (written once the reply has gone out)."""
    return {line["request_id"]: line for line in log_lines(cluster.nginx.access_log)}


def replica_request_ids(cluster: Cluster) -> dict[str, int]:
    """request_id -> the replica whose api.log has a line for it."""
    return {line["request_id"]: i for i in range(len(cluster.replicas))
            for line in log_lines(cluster.api_log(i)) if "request_id" in line}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, model_file, model_registry):
    if not nginx_available():
        pytest.skip("nginx is not installed (make nginx installs it as root)")
    root = tmp_path_factory.mktemp("cluster")
    models_dir = root / "models"
    models_dir.mkdir()
    os.symlink(model_file, models_dir / MODEL_NAME)
    (models_dir / REGISTRY_FILE).write_text(model_registry)  # sha256 known: no re-hash
    # One llama.cpp thread each: three replicas share the machine's cores.
    settings = {"N_CTX": TEST_N_CTX, "MODEL_POOL_SIZE": 1, "MAX_WORKERS": 2, "N_PARALLEL": 4,
                "N_THREADS": 1, "SHUTDOWN_TIMEOUT": 30, "DEEPSEEK_MODELS_DIR": root / "deepseek"}
    cluster = Cluster(3, root / "run", settings, models_dir)
    cluster.start()
    try:
        with ThreadPoolExecutor(3) as pool:  # the model loaded once in every replica
            for reply in pool.map(generate, cluster.replica_urls):
                assert reply.status_code == 200, reply.text
        yield cluster
    finally:
        cluster.stop()


def test_the_repository_limits_conf_is_config_defaults():
    """deploy/nginx/limits.conf and upload.conf are what cluster.py writes for config.py's
    defaults: nginx's body limits and timeouts follow MAX_REQUEST_BYTES, MAX_UPLOAD_BYTES,
    QUEUE_TIMEOUT + REQUEST_TIMEOUT and so on."""
    text = (ROOT / "deploy" / "nginx" / "limits.conf").read_text()
    assert text == limits_conf(load_config({}))
    config = load_config({})
    upload_limit = (ROOT / "deploy" / "nginx" / "upload.conf").read_text()
    assert upload_limit == upload_conf(config)
    assert f"client_max_body_size {config.MAX_UPLOAD_BYTES};" in upload_limit
    assert f"client_max_body_size {config.MAX_REQUEST_BYTES};" in text
    timeout = int(re.search(r"proxy_read_timeout (\d+)s;", text).group(1))
    assert timeout > config.QUEUE_TIMEOUT + config.REQUEST_TIMEOUT


def test_the_compose_nginx_config_is_valid(tmp_path):
    """`nginx -t` on deploy/nginx/ as compose mounts it; the replica-N names only resolve inside
    compose's network, so they are checked as 127.0.0.1 here."""
    if not nginx_available():
        pytest.skip("nginx is not installed")
    for conf in (ROOT / "deploy" / "nginx").glob("*.conf"):
        shutil.copy(conf, tmp_path / conf.name)
    replicas = (tmp_path / "replicas.conf").read_text()
    assert re.findall(r"server (replica-\d):5000", replicas) == [
        "replica-1", "replica-2", "replica-3"]
    (tmp_path / "replicas.conf").write_text(re.sub(r"replica-\d", "127.0.0.1", replicas))
    checked = subprocess.run(
        [nginx_binary(), "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"),
         "-e", str(tmp_path / "error.log"), "-g", f"pid {tmp_path / 'nginx.pid'};"],
        capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr


def test_an_upload_through_the_balancer_is_served_by_every_replica_and_so_is_its_delete(
        cluster, model_file):
    reply = upload(cluster.url, model_file, "fleet-copy")
    assert reply.status_code == 201, reply.text
    name = reply.json()["name"]
    for url in cluster.replica_urls:
        assert wait_until(lambda: name in listed(url), SEEN_WITHIN), url
        answer = generate(url, name)
        assert answer.status_code == 200, (url, answer.text)
        assert answer.json()["done"] is True

    deleted = requests.delete(f"{cluster.url}/api/v1/models/{name}", timeout=30)
    assert deleted.status_code == 200, deleted.text
    for url in cluster.replica_urls:
        assert wait_until(lambda: name not in listed(url), SEEN_WITHIN), url
        assert requests.get(f"{url}/api/v1/models/{name}", timeout=10).status_code == 404
        answer = generate(url, name)
        assert answer.status_code == 404, (url, answer.text)
    assert not (cluster.models_dir / name).exists()


def test_same_name_uploads_at_three_replicas_at_once_one_wins(cluster, model_file):
    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda url: upload(url, model_file, "contested"),
                                cluster.replica_urls))
    statuses = sorted(reply.status_code for reply in replies)
    assert statuses == [201, 409, 409], [reply.text for reply in replies]
    loser = next(reply for reply in replies if reply.status_code == 409)
    assert loser.json()["error"]["code"]
    name = next(reply.json()["name"] for reply in replies if reply.status_code == 201)
    assert requests.delete(f"{cluster.url}/api/v1/models/{name}", timeout=30).status_code == 200


def test_concurrent_uploads_deletes_and_lists_of_one_name_leave_the_store_consistent(
        cluster, model_file):
    urls = cluster.replica_urls
    name = "churn.gguf"
    tasks = ([("upload", i) for i in range(6)] + [("delete", i) for i in range(6)]
             + [("list", i) for i in range(8)])

    def run(task):
        kind, i = task
        url = urls[i % len(urls)]
        if kind == "upload":
            return kind, upload(url, model_file, name)
        if kind == "delete":
            time.sleep(0.05 * i)  # spread over the uploads' lifetime
            return kind, requests.delete(f"{url}/api/v1/models/{name}", timeout=60)
        time.sleep(0.1 * i)
        return kind, requests.get(f"{url}/api/v1/models", timeout=60)

    with ThreadPoolExecutor(len(tasks)) as pool:
        results = list(pool.map(run, tasks))
    allowed = {"upload": {200, 201, 409}, "delete": {200, 404}, "list": {200}}
    for kind, reply in results:
        assert reply.status_code in allowed[kind], (kind, reply.status_code, reply.text)
        assert reply.headers["Content-Type"].startswith("application/json")
        reply.json()
    assert any(reply.status_code == 201 for kind, reply in results if kind == "upload")

    models_dir = cluster.models_dir
    registry = json.loads((models_dir / REGISTRY_FILE).read_text())
    on_disk = {path.name for path in models_dir.glob("*.gguf")}
    assert {entry["name"] for entry in registry["models"]} == on_disk
    for url in urls:
        assert wait_until(lambda: listed(url) == on_disk, SEEN_WITHIN), (url, listed(url))
    assert not list(models_dir.glob(".upload-*.partial"))
    if name in on_disk:
        assert requests.delete(f"{cluster.url}/api/v1/models/{name}", timeout=30).status_code == 200


def _arrivals(reply: requests.Response) -> list[tuple[float, bytes]]:
    """(arrival instant, line) of each line of a streamed reply, as the bytes come in."""
    arrivals, pending = [], b""
    for data in reply.iter_content(chunk_size=None):
        now = time.monotonic()
        pending += data
        *lines, pending = pending.split(b"\n")
        arrivals.extend((now, line) for line in lines if line.strip())
    return arrivals


@pytest.mark.parametrize("path, body", [
    ("/api/generate", {"prompt": LONG["prompt"], "stream": True,
                       "options": {"num_predict": 40, "temperature": 0}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG["prompt"]}],
                              "stream": True, "max_tokens": 40, "temperature": 0}),
])
def test_streams_through_nginx_arrive_token_by_token(cluster, path, body):
    with requests.post(f"{cluster.url}{path}", json=body, stream=True, timeout=60) as reply:
        assert reply.status_code == 200, reply.text
        arrivals = _arrivals(reply)
    tokens = [instant for instant, line in arrivals if b'"done":true' not in line
              and b"[DONE]" not in line]
    assert len(tokens) >= 20, arrivals
    # Buffered by nginx, everything would come in one or two reads at the end.
    instants = sorted({round(instant, 3) for instant in tokens})
    assert len(instants) >= len(tokens) // 2, (len(instants), len(tokens))
    assert tokens[len(tokens) // 2] < arrivals[-1][0]


def test_x_request_id_passes_through_to_the_replica_log(cluster):
    mine = f"client-{uuid.uuid4().hex}"
    reply = generate(cluster.url, request_id=mine)
    assert reply.status_code == 200 and reply.headers["X-Request-ID"] == mine
    unsent = requests.get(f"{cluster.url}/api/v1/models", timeout=10)
    nginx_id = unsent.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", nginx_id), nginx_id
    # An id the replicas would refuse is replaced by nginx's, so all three logs still agree.
    bad = requests.get(f"{cluster.url}/api/v1/models", headers={"X-Request-ID": "a b<c>"},
                       timeout=10).headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", bad), bad
    assert wait_until(lambda: {mine, nginx_id, bad} <= set(replica_request_ids(cluster)), 5)
    assert wait_until(lambda: {mine, nginx_id, bad} <= set(nginx_log(cluster)), 5)
    access = nginx_log(cluster)
    served_by = cluster.replicas[replica_request_ids(cluster)[mine]].port
    assert access[mine]["upstream_addr"] == f"127.0.0.1:{served_by}"


def test_a_forged_x_forwarded_for_is_not_the_client_address(cluster):
    rid = f"xff-{uuid.uuid4().hex}"
    reply = requests.get(f"{cluster.url}/api/v1/models", timeout=10,
                         headers={"X-Forwarded-For": "203.0.113.9", "X-Request-ID": rid})
    assert reply.status_code == 200
    assert wait_until(lambda: rid in replica_request_ids(cluster), 5)
    line = next(line for i in range(3) for line in log_lines(cluster.api_log(i))
                if line.get("request_id") == rid)
    assert line["client"] == "127.0.0.1"


def test_nginx_refuses_bodies_over_the_limits_before_relaying_them(cluster):
    """An upload announcing more than MAX_UPLOAD_BYTES, or a JSON body over MAX_REQUEST_BYTES,
    gets nginx's JSON 413 at once: no replica sees a byte of it."""
    config = load_config({})
    for path, declared in (("/api/v1/models", config.MAX_UPLOAD_BYTES + 1),
                           ("/api/generate", config.MAX_REQUEST_BYTES + 1)):
        rid = f"big-{uuid.uuid4().hex}"
        conn = http.client.HTTPConnection("127.0.0.1", cluster.nginx.port, timeout=10)
        try:
            conn.putrequest("POST", path)
            for name, value in (("Content-Length", str(declared)), ("X-Request-ID", rid),
                                ("Content-Type", "application/octet-stream")):
                conn.putheader(name, value)
            conn.endheaders(b"x" * 1024)
            reply = conn.getresponse()
            status, body = reply.status, json.loads(reply.read())
        finally:
            conn.close()
        assert status == 413, (path, body)
        assert body["error"]["code"] == "payload_too_large"
        assert wait_until(lambda: rid in nginx_log(cluster), 5)
        assert nginx_log(cluster)[rid]["upstream_addr"] == ""
        assert rid not in replica_request_ids(cluster)


def _load(url: str, count: int, tokens: int, prefix: str) -> list[tuple[str, int]]:
    """`count` generations at once; (request id, status) of each, 0 for no reply at all."""
    def one(i):
        rid = f"{prefix}-{i}-{uuid.uuid4().hex[:8]}"
        try:
            return rid, generate(url, tokens=tokens, request_id=rid).status_code
        except requests.RequestException:
            return rid, 0
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def test_kill_9_of_a_replica_under_load_fails_only_requests_it_held(cluster):
    victim = 0
    victim_addr = f"127.0.0.1:{cluster.replicas[victim].port}"
    held = threading.Event()

    def kill_once_busy():
        def busy():
            report = requests.get(f"{cluster.replica_urls[victim]}/stats/concurrency", timeout=5)
            return report.json()["in_flight"] > 0
        if wait_until(busy, 30):
            held.set()
        cluster.kill(victim)

    killer = threading.Thread(target=kill_once_busy)
    killer.start()
    try:
        during = _load(cluster.url, 12, 16, "kill")
    finally:
        killer.join(timeout=60)
    try:
        assert held.is_set(), "the victim never held a request"
        after = _load(cluster.url, 6, 2, "after")
        assert [status for _, status in after] == [200] * 6, after
        ids = {rid for rid, _ in during}
        assert wait_until(lambda: ids <= set(nginx_log(cluster)), 5)
        access = nginx_log(cluster)
        tried_victim = {rid for rid, _ in during if victim_addr in access[rid]["upstream_addr"]}
        assert tried_victim, "nginx sent none of the load to the victim"
        failed = {rid for rid, status in during if status != 200}
        assert failed <= tried_victim, (failed, tried_victim)
        assert all(status in (200, 502) for _, status in during), during
    finally:
        cluster.restart(victim)


def _started_stream(url: str, tokens: int) -> tuple[requests.Response, Iterator[bytes]]:
    """A streamed generation on one replica, returned once its first token has arrived: it is
    running (admitted) from then on, whatever else the replica is doing."""
    reply = requests.post(f"{url}/api/generate", stream=True, timeout=60, json={
        "prompt": "Say hi", "options": {"num_predict": tokens, "temperature": 0}})
    assert reply.status_code == 200, reply.text
    lines = reply.iter_lines()
    assert "response" in json.loads(next(line for line in lines if line))
    return reply, lines


def _streamed_to_the_end(started: tuple[requests.Response, Iterator[bytes]]) -> int | dict:
    """200 when the stream went on to its final line, finished by length or a stop (not cut
    off by the drain), else the line it ended with."""
    reply, lines = started
    last = [json.loads(line) for line in lines if line][-1]
    finished = last.get("done") is True and last.get("done_reason") in ("length", "stop")
    return reply.status_code if finished else last


def test_a_rolling_restart_under_steady_load_loses_no_request(cluster):
    """Each replica in turn gets SIGTERM while it runs a longer generation of its own (so its
    drain lasts a while): that one finishes, the balancer's requests it refuses meanwhile (503
    shutting_down) are retried by nginx on the others, and nothing fails."""
    stop, results, drained = threading.Event(), [], []

    def client(k):
        while not stop.is_set():
            rid = f"roll-{k}-{uuid.uuid4().hex[:8]}"
            try:
                results.append((rid, generate(cluster.url, tokens=6, request_id=rid).status_code))
            except requests.RequestException as exc:
                results.append((rid, repr(exc)))

    clients = [threading.Thread(target=client, args=(k,)) for k in range(3)]
    for thread in clients:
        thread.start()
    try:
        for i, url in enumerate(cluster.replica_urls):
            long = ThreadPoolExecutor(1)
            running = long.submit(_streamed_to_the_end, _started_stream(url, tokens=32))
            assert cluster.terminate(i) == 0, cluster.replicas[i].output_path.read_text()[-3000:]
            drained.append(running.result(timeout=60))
            long.shutdown()
            seen = len(results)
            cluster.restart(i)
            assert wait_until(lambda: len(results) > seen + 3, 30)
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=60)
    assert drained == [200] * 3     # each drain let its own running generation finish
    failures = [(rid, status) for rid, status in results if status != 200]
    assert not failures, failures
    assert wait_until(lambda: {rid for rid, _ in results} <= set(nginx_log(cluster)), 5)
    access = nginx_log(cluster)
    retried = [access[rid]["upstream_status"] for rid, _ in results
               if "503" in access[rid]["upstream_status"]]
    assert retried, "no request met a draining replica: the test did not test the drain"

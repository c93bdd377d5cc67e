"""Keys with scopes: stored hashed, managed by `flask keys`, checked on every request.

One live server per module holds keys made by the CLI (in this process and in a separate one);
the scope matrix runs against it. Apps of their own only where a test breaks the key file.
"""

from __future__ import annotations

import html
import io
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from types import SimpleNamespace

import ollama
import openai
import pytest
import requests

from conftest import MODEL_NAME, ROOT, LiveServer, build_test_app
from services.errors import ConfigError
from services.key_store import KEYS_FILE, KeyStore

PROMPT = {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0, "seed": 7}


def cli_create(runner, name: str, scope: str, *options: str) -> str:
    """A key made by `flask keys create` (Click's runner, in this process); the key alone is
    the command's standard output."""
    result = runner.invoke(args=["keys", "create", "--name", name, "--scope", scope, *options])
    assert result.exit_code == 0, result.output
    assert "it is not shown again" in result.stderr
    return result.stdout.strip()


def flask_cli(data_dir: Path, scratch: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m flask --app app_factory ...` in a process of its own, sharing DATA_DIR with
    the server (its other directories are its own)."""
    env = {**os.environ, "APP_ENV": "testing", "DATA_DIR": str(data_dir),
           "MODELS_DIR": str(scratch / "models"), "LOG_DIR": str(scratch / "logs"),
           "DEEPSEEK_MODELS_DIR": str(scratch / "deepseek")}
    return subprocess.run([sys.executable, "-m", "flask", "--app", "app_factory", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def team(tmp_path_factory, model_file, model_registry):
    """A live server whose only keys are an inference key `reader` and an admin key `boss`,
    both made with `flask keys create`."""
    root = tmp_path_factory.mktemp("keys")
    app = build_test_app(root, model_file, model_registry)
    data_dir = Path(app.extensions["llm"].config.DATA_DIR)
    assert not data_dir.exists()            # starting the server creates no key file
    runner = app.test_cli_runner()
    keys = {"reader": cli_create(runner, "reader", "inference"),
            "boss": cli_create(runner, "boss", "admin")}
    server = LiveServer(app)
    yield SimpleNamespace(server=server, url=server.url, app=app, runner=runner, keys=keys,
                          data_dir=data_dir, scratch=tmp_path_factory.mktemp("cli"))
    server.stop()
    app.extensions["llm"].close()


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


CALLERS = {"no key": {}, "wrong key": bearer("llm-not-a-key-of-this-server"),
           "inference": "reader", "admin": "boss"}


def call(team, route: str, headers: dict) -> requests.Response:
    """One request to a route of the matrix."""
    url = team.url
    if route == "read":
        return requests.get(f"{url}/api/v1/models", headers=headers, timeout=60)
    if route == "generate":
        return requests.post(f"{url}/api/v1/generate", json=PROMPT, headers=headers, timeout=120)
    if route == "upload":          # not a GGUF file: an admin gets as far as the header check
        return requests.post(f"{url}/api/v1/models", headers=headers, timeout=60,
                             files={"file": ("junk.gguf", b"not a model" * 10)})
    if route == "delete":
        return requests.delete(f"{url}/api/v1/models/no-such-model.gguf", headers=headers,
                               timeout=60)
    return requests.post(f"{url}/api/v1/models/{MODEL_NAME}/{route}", headers=headers, timeout=120)


# What each caller gets on each route: status, and the error code where there is one.
EXPECTED = {
    "inference": {"read": (200, None), "generate": (200, None), "upload": (403, "forbidden"),
                  "delete": (403, "forbidden"), "load": (403, "forbidden"),
                  "unload": (403, "forbidden")},
    "admin": {"read": (200, None), "generate": (200, None),
              "upload": (400, "invalid_model_file"), "delete": (404, "model_not_found"),
              "load": (200, None), "unload": (200, None)},
}


@pytest.mark.parametrize("route", ["read", "generate", "upload", "delete", "load", "unload"])
@pytest.mark.parametrize("caller", list(CALLERS))
def test_scope_matrix(team, caller, route):
    who = CALLERS[caller]
    headers = bearer(team.keys[who]) if isinstance(who, str) else who
    reply = call(team, route, headers)
    if caller in ("no key", "wrong key"):
        assert reply.status_code == 401, reply.text
        assert reply.headers["WWW-Authenticate"] == "Bearer"
        assert reply.json()["error"]["code"] == "unauthorized"
        return
    status, code = EXPECTED[caller][route]
    assert reply.status_code == status, reply.text
    if code:
        assert reply.json()["error"]["code"] == code
    if code == "forbidden":
        assert "'admin' scope" in reply.json()["error"]["message"]
    if route == "generate":
        assert reply.json()["usage"]["completion_tokens"] >= 1


def test_only_an_admin_key_copies_and_deletes_models(team):
    reader, boss = bearer(team.keys["reader"]), bearer(team.keys["boss"])
    copy = {"source": MODEL_NAME, "destination": "team-copy"}
    refused = requests.post(f"{team.url}/api/copy", json=copy, headers=reader, timeout=60)
    assert refused.status_code == 403 and "admin" in refused.json()["error"]   # Ollama's shape
    assert requests.post(f"{team.url}/api/copy", json=copy, headers=boss,
                         timeout=60).status_code == 200
    listed = lambda: [m["name"] for m in requests.get(  # noqa: E731
        f"{team.url}/api/v1/models", headers=reader, timeout=60).json()["models"]]
    assert "team-copy.gguf" in listed()
    for method, path, body in (("DELETE", "/api/v1/models/team-copy.gguf", None),
                               ("DELETE", "/api/delete", {"model": "team-copy.gguf"})):
        reply = requests.request(method, team.url + path, json=body, headers=reader, timeout=60)
        assert reply.status_code == 403
    assert "team-copy.gguf" in listed()
    reply = requests.delete(f"{team.url}/api/v1/models/team-copy.gguf", headers=boss, timeout=60)
    assert reply.status_code == 200 and reply.json()["removed"]["name"] == "team-copy.gguf"
    assert "team-copy.gguf" not in listed()


def test_a_key_made_and_revoked_by_another_process(team):
    made = flask_cli(team.data_dir, team.scratch, "keys", "create", "--name", "ci-bot",
                     "--scope", "inference", "--priority", "low", "--requests-per-minute", "500")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("llm-") and "\n" not in key and "not shown again" in made.stderr
    assert requests.get(f"{team.url}/api/v1/models", headers=bearer(key),
                        timeout=60).status_code == 200
    listing = flask_cli(team.data_dir, team.scratch, "keys", "list")
    assert listing.returncode == 0, listing.stderr
    row = next(line.split() for line in listing.stdout.splitlines() if line.startswith("ci-bot"))
    assert row[1:5] == ["inference", "low", "500", "default"]
    assert row[-1] == "-" and row[7] != "-"     # not revoked; used (created is row[5:7])
    assert key not in listing.stdout + listing.stderr

    revoked = flask_cli(team.data_dir, team.scratch, "keys", "revoke", "ci-bot")
    assert revoked.returncode == 0 and "revoked 'ci-bot'" in revoked.stdout
    reply = requests.get(f"{team.url}/api/v1/models", headers=bearer(key), timeout=60)
    assert reply.status_code == 401 and reply.headers["WWW-Authenticate"] == "Bearer"
    again = flask_cli(team.data_dir, team.scratch, "keys", "revoke", "ci-bot")
    assert again.returncode == 1 and "no live key is named 'ci-bot'" in again.stderr


def test_cli_lists_limits_and_refuses_clearly(team):
    runner = team.runner
    listing = runner.invoke(args=["keys", "list"])
    assert listing.exit_code == 0
    names = {line.split()[0]: line.split()[1] for line in listing.stdout.splitlines()[1:]}
    assert names["reader"] == "inference" and names["boss"] == "admin"
    assert not any(key in listing.output for key in team.keys.values())

    limited = runner.invoke(args=["keys", "limit", "reader", "--tokens-per-minute", "0"])
    assert limited.exit_code == 0
    assert "default requests/min, unlimited tokens/min" in limited.stdout
    limited = runner.invoke(args=["keys", "limit", "reader", "--tokens-per-minute", "default"])
    assert "default tokens/min" in limited.stdout
    for args, message in (
            (["create", "--name", "reader", "--scope", "admin"], "a live key named 'reader'"),
            (["create", "--name", "two words", "--scope", "admin"], "1-64 letters"),
            (["create", "--name", "admin-key-1", "--scope", "admin"], "API_KEYS/ADMIN_KEYS"),
            (["create", "--name", "x", "--scope", "admin", "--requests-per-minute", str(10**12)],
             "a limit is a whole number"),
            (["revoke", "nobody"], "no live key is named 'nobody'"),
            (["limit", "nobody", "--requests-per-minute", "5"], "no live key is named")):
        result = runner.invoke(args=["keys", *args])
        assert result.exit_code == 1 and message in result.output, (args, result.output)
    for args in (["create", "--name", "x", "--scope", "root"], ["limit", "reader"],
                 ["limit", "reader", "--requests-per-minute", "-1"]):
        assert runner.invoke(args=["keys", *args]).exit_code == 2     # a usage error


def test_logs_stats_and_metrics_name_the_key_never_the_key_itself(team):
    request_id = uuid.uuid4().hex
    reply = requests.post(f"{team.url}/api/v1/generate", json=PROMPT, timeout=120,
                          headers={**bearer(team.keys["reader"]), "X-Request-ID": request_id})
    assert reply.status_code == 200
    assert team.server.logged_request(request_id)["key"] == "reader"
    stats = requests.get(f"{team.url}/stats", headers=bearer(team.keys["boss"]), timeout=60)
    assert stats.json()["keys"]["reader"]["completion_tokens"] >= 1
    metrics = requests.get(f"{team.url}/metrics", headers=bearer(team.keys["boss"]), timeout=60)
    assert 'llm_key_requests_total{key="reader"' in metrics.text
    used = [line for line in team.runner.invoke(args=["keys", "list"]).stdout.splitlines()
            if line.startswith("reader")][0]
    assert used.split()[7] != "-"           # last used is set (created is columns 5 and 6)
    logs = "".join(path.read_text() for path in
                   Path(team.app.extensions["llm"].config.LOG_DIR).glob("*.log*"))
    stored = (team.data_dir / KEYS_FILE).read_bytes()
    for key in team.keys.values():
        for text in (logs, stats.text, metrics.text):
            assert key not in text
        assert key.encode() not in stored   # only its digest is kept


def test_clients_send_the_key_their_own_way(team):
    client = openai.OpenAI(base_url=f"{team.url}/v1", api_key=team.keys["reader"],
                           max_retries=0, timeout=60)
    done = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=3, seed=1)
    assert done.usage.completion_tokens >= 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{team.url}/v1", api_key="llm-wrong", max_retries=0,
                      timeout=60).models.list()
    keyed = ollama.Client(host=team.url, timeout=60, headers=bearer(team.keys["reader"]))
    assert keyed.generate(model=MODEL_NAME, prompt="Hello", options={"num_predict": 3}).done
    with pytest.raises(ollama.ResponseError) as refused:
        ollama.Client(host=team.url, timeout=60).list()
    assert refused.value.status_code == 401


@pytest.mark.parametrize("query", ["api_key", "key", "access_token", "token"])
def test_a_key_in_the_query_string_is_not_accepted(team, query):
    reply = requests.get(f"{team.url}/api/v1/models", params={query: team.keys["boss"]},
                         timeout=60)
    assert reply.status_code == 401


def raw_request(url: str, header_lines: bytes) -> tuple[int, bytes]:
    """Send GET /api/v1/models with raw header bytes (no client library would send them)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(b"GET /api/v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                     + header_lines + b"\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize("header", [
    b"Authorization: Bearer " + b"k" * 60_000 + b"\r\n",
    b"Authorization: Bearer \xc3\xa9t\xc3\xa9-\xff\xfe\r\n",
    b"Authorization: Bearer llm-\r\n folded\r\n",                  # an obs-fold: a newline
    b"Authorization: Bearer llm-a\x00b\r\n",
    b"Authorization: Bearer \r\n",
    b"Authorization: Bearer\r\n",
    b"Authorization: bearer bearer bearer\r\n",
    b"Authorization: Bearer %s\r\nAuthorization: Bearer x\r\n",
])
def test_hostile_key_values_get_401_never_500(team, header):
    errors_before = _errors_log(team)
    status, body = raw_request(team.url, header.replace(b"%s", team.keys["reader"].encode()))
    assert status == 401, body
    assert json.loads(body)["error"]["code"] == "unauthorized"
    assert _errors_log(team) == errors_before


def _errors_log(team) -> str:
    path = Path(team.app.extensions["llm"].config.LOG_DIR) / "errors.log"
    return path.read_text() if path.exists() else ""


def test_docs_page_marks_the_routes_that_need_an_admin_key(team):
    page = requests.get(f"{team.url}/", timeout=60).text
    scopes = {(method, html.unescape(rule)): scope for method, rule, scope in re.findall(
        r'data-method="(\w+)" data-rule="([^"]+)" data-scope="(\w+)"', page)}
    admin = {key for key, scope in scopes.items() if scope == "admin"}
    assert {("POST", "/api/v1/models"), ("DELETE", "/api/v1/models/<name>"),
            ("POST", "/api/copy"), ("DELETE", "/api/delete"),
            ("POST", "/api/v1/models/<name>/load"),
            ("POST", "/api/v1/models/<name>/unload")} <= admin
    assert scopes[("GET", "/api/v1/models")] == scopes[("POST", "/v1/chat/completions")] \
        == "inference"
    assert "admin key" in page and "an inference key gets 403" in page


def test_a_key_priority_is_its_default_and_its_ceiling(team):
    from api.access import request_priority
    from services.keys import Principal
    low = Principal("slow", "inference", priority="low", top_priority="low")
    with team.app.test_request_context(headers={"X-Request-Priority": "high"}):
        assert request_priority(low) == "low"
    with team.app.test_request_context():
        assert request_priority(low) == "low"
    reply = requests.get(f"{team.url}/api/v1/models", timeout=60,
                         headers={**bearer(team.keys["reader"]), "X-Request-Priority": "urgent"})
    assert reply.status_code == 400 and "X-Request-Priority" in reply.json()["error"]["message"]


def test_settings_keys_have_scopes_too(make_app):
    client = make_app(API_KEYS="plain-key", ADMIN_KEYS="root-key").test_client()
    for key, status in (("plain-key", 403), ("root-key", 400)):
        with client.post("/api/v1/models", headers=bearer(key),
                         data={"file": (io.BytesIO(b"junk"), "junk.gguf")}) as reply:
            assert reply.status_code == status
            assert reply.get_json()["error"]["code"] == (
                "forbidden" if status == 403 else "invalid_model_file")
    with client.get("/stats", headers=bearer("plain-key")) as reply:
        assert set(reply.get_json()["keys"]) == {"inference-key-1", "admin-key-2"}


def test_revoking_the_last_key_locks_the_server_rather_than_opening_it(make_app):
    app = make_app()
    client, runner = app.test_client(), app.test_cli_runner()
    assert client.get("/api/v1/models").status_code == 200            # no key anywhere: open
    assert not (Path(app.extensions["llm"].config.DATA_DIR) / KEYS_FILE).exists()
    key = cli_create(runner, "only", "admin")
    assert client.get("/api/v1/models").status_code == 401
    result = runner.invoke(args=["keys", "revoke", "only"])
    assert "no live key remains" in result.stderr
    assert client.get("/api/v1/models").status_code == 401
    assert client.get("/api/v1/models", headers=bearer(key)).status_code == 401


def test_a_damaged_key_file_stops_the_start_and_fails_requests_closed(make_app, tmp_path,
                                                                      model_file, model_registry):
    data = tmp_path / "damaged"
    data.mkdir()
    (data / KEYS_FILE).write_bytes(b"this is not a database " * 200)
    with pytest.raises(ConfigError, match="damaged/keys.sqlite3 is not a readable key store"):
        build_test_app(tmp_path / "refused", model_file, model_registry, DATA_DIR=str(data))

    app = make_app()
    key = cli_create(app.test_cli_runner(), "soon-broken", "inference")
    path = Path(app.extensions["llm"].config.DATA_DIR) / KEYS_FILE
    for stale in path.parent.iterdir():                             # replaced while running
        stale.unlink()
    path.write_bytes(b"garbage " * 1000)
    reply = app.test_client().get("/api/v1/models", headers=bearer(key))
    assert reply.status_code == 503
    assert reply.get_json() == {"error": {
        "code": "key_store_unavailable", "message": "the server cannot read its key store, so "
        "it refuses requests until an operator fixes it (errors.log has the cause)"}}
    errors = (Path(app.extensions["llm"].config.LOG_DIR) / "errors.log").read_text()
    assert "file is not a database" in errors and key not in errors


def test_the_store_keeps_a_digest_and_an_owner_only_file(team):
    path = team.data_dir / KEYS_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    with sqlite3.connect(path) as conn:
        digests = [row[0] for row in conn.execute("SELECT digest FROM keys")]
    assert all(len(digest) == 32 for digest in digests)


def test_processes_sharing_the_file_see_each_other_at_once(tmp_path):
    """Two stores on one file stand for two server workers (or a worker and the CLI)."""
    path = tmp_path / "shared" / KEYS_FILE
    worker, operator = KeyStore(path), KeyStore(path)
    assert not worker.has_keys() and not path.exists()
    keys = [operator.create(f"k{index}", "inference")[1] for index in range(3)]
    failures = []

    def look_up():
        for _ in range(200):
            if worker.authenticate(keys[0]) is None:
                failures.append("refused a live key")

    threads = [threading.Thread(target=look_up) for _ in range(4)]
    for thread in threads:
        thread.start()
    operator.create("during", "admin")             # writes while the readers read
    operator.revoke("k1")
    for thread in threads:
        thread.join()
    assert failures == []
    assert worker.authenticate(keys[1]) is None    # revoked by the other store
    assert worker.authenticate(keys[2]).name == "k2"


def test_last_used_is_written_at_most_once_a_minute(tmp_path):
    now = [1_000_000.0]
    store = KeyStore(tmp_path / KEYS_FILE, clock=lambda: now[0])
    _, key = store.create("clocked", "inference")
    last_used = lambda: store.list()[0].last_used  # noqa: E731
    store.authenticate(key)
    assert last_used() == 1_000_000.0
    now[0] += 30
    store.authenticate(key)
    assert last_used() == 1_000_000.0
    now[0] += 31
    store.authenticate(key)
    assert last_used() == 1_000_061.0

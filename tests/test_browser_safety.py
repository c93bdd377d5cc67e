"""Browser safety: no web page can drive the server (issue 9, finding 2).

DNS rebinding is stopped by ALLOWED_HOSTS, cross-site writes by the Origin check (a `*` in
CORS_ORIGINS opens reads only), and `text/plain` or other non-JSON bodies to JSON endpoints by
415. Every refusal comes before any work, in the dialect's own error shape.
"""

from __future__ import annotations

import io
import json
import socket

import pytest
import requests

from conftest import MODEL_NAME

EVIL = "https://evil.example"
APP = "https://app.example"
HELLO = [{"role": "user", "content": "Hi"}]

# (dialect, method, path, a valid JSON body): every JSON endpoint that takes a body.
JSON_ROUTES = [
    ("native", "POST", "/api/v1/generate", {"prompt": "Hi", "max_tokens": 1}),
    ("native", "POST", "/api/deepseek/generate", {"prompt": "Hi", "max_tokens": 1}),
    ("openai", "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 1}),
    ("openai", "POST", "/v1/chat/completions", {"messages": HELLO, "max_tokens": 1}),
    ("openai", "POST", "/v1/embeddings", {"input": "Hi"}),
    ("ollama", "POST", "/api/generate", {"prompt": "Hi", "stream": False,
                                         "options": {"num_predict": 1}}),
    ("ollama", "POST", "/api/chat", {"messages": HELLO, "stream": False,
                                     "options": {"num_predict": 1}}),
    ("ollama", "POST", "/api/embed", {"input": "Hi"}),
    ("ollama", "POST", "/api/show", {"model": MODEL_NAME}),
    ("ollama", "DELETE", "/api/delete", {"model": "no-such-model"}),
]
GET_ROUTES = [("native", "/"), ("native", "/api/v1/models"), ("native", "/api/v1/health"),
              ("native", "/api/deepseek/models"), ("native", "/stats"), ("native", "/metrics"),
              ("openai", "/v1/models"), ("ollama", "/api/tags"), ("native", "/no/such/route")]


# What an Ollama-shaped error ({"error": "<message>"}, no code) says for each code.
_MESSAGE_NAMES = {"host_not_allowed": "ALLOWED_HOSTS", "origin_not_allowed": "CORS_ORIGINS",
                  "unsupported_media_type": "Content-Type"}


def assert_error(reply, dialect: str, status: int, code: str) -> None:
    """The reply is the error `code` with `status`, in the dialect's own error shape."""
    assert reply.status_code == status, reply.get_data(as_text=True)[:300]
    body = reply.get_json()
    if dialect == "ollama":
        assert set(body) == {"error"} and _MESSAGE_NAMES[code] in body["error"], body
        return
    if dialect == "openai":
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == code and body["error"]["message"], body


def nothing_loaded(app) -> bool:
    """No model instance was loaded: no generation or embedding was started."""
    return not any(model.instances for model in app.extensions["llm"].pool.loaded_models())


# --- Host (DNS rebinding) -------------------------------------------------------------------

@pytest.mark.parametrize("dialect,path", GET_ROUTES)
def test_a_rebinding_host_is_refused_on_reads(make_app, dialect, path):
    client = make_app().test_client()
    reply = client.get(path, headers={"Host": "attacker.example"})
    assert_error(reply, dialect, 400, "host_not_allowed")
    assert reply.headers["X-Request-ID"]


@pytest.mark.parametrize("dialect,method,path,body", JSON_ROUTES)
def test_a_rebinding_host_is_refused_on_writes_before_any_work(make_app, dialect, method, path,
                                                                body):
    app = make_app()
    reply = app.test_client().open(path, method=method, json=body,
                                   headers={"Host": "attacker.example:5000"})
    assert_error(reply, dialect, 400, "host_not_allowed")
    assert nothing_loaded(app)


def test_the_host_check_comes_before_the_api_key(make_app):
    client = make_app(API_KEYS="k1").test_client()
    reply = client.get("/api/v1/models", headers={"Host": "attacker.example"})
    assert reply.status_code == 400 and reply.get_json()["error"]["code"] == "host_not_allowed"
    assert client.get("/api/v1/models").status_code == 401


@pytest.mark.parametrize("host", ["localhost", "localhost:5000", "LOCALHOST:5000", "localhost.",
                                  "127.0.0.1", "127.0.0.1:8080", "[::1]:5000", "[::1]",
                                  "[0:0:0:0:0:0:0:1]:5000"])
def test_loopback_hosts_are_served_by_default(client, host):
    assert client.get("/api/v1/models", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize("host", [
    "attacker.example", "localhost.attacker.example", "127.0.0.1.nip.io", "attacker.localhost.",
    "0.0.0.0:5000",               # browsers route 0.0.0.0 to this machine ("0.0.0.0 day")
    "[::ffff:127.0.0.1]:5000",    # the IPv4 loopback, mapped: not a listed name
    "127.1", "2130706433",        # other spellings of 127.0.0.1 are names, not listed
    "[::1", "[evil]:5000", "local host", "localhost@attacker.example", "",
])
def test_other_hosts_are_refused_by_default(client, host):
    reply = client.get("/api/v1/models", headers={"Host": host})
    assert reply.status_code == 400 and reply.get_json()["error"]["code"] == "host_not_allowed"


def test_health_answers_any_host_for_liveness_probes(client):
    """A Kubernetes httpGet probe sends the pod's IP as Host, which no default can list; a
    failed liveness probe restarts the pod. /health tells a rebinding page only "ok"."""
    reply = client.get("/health", headers={"Host": "10.42.0.17:5000"})
    assert reply.status_code == 200 and reply.get_json() == {"status": "ok"}
    assert client.get("/api/v1/health", headers={"Host": "10.42.0.17:5000"}).status_code == 400


def test_allowed_hosts_setting(make_app):
    allowed = "llm.internal:8080, .example.com, 10.0.0.5, [fd00::1], [fd00::2]:8080, fd00::3"
    client = make_app(ALLOWED_HOSTS=allowed).test_client()
    for host in ["llm.internal", "llm.internal:9999", "example.com", "api.example.com:443",
                 "10.0.0.5:5000", "[fd00::1]:5000", "[fd00:0::1]", "[fd00::2]", "[fd00::3]:1"]:
        assert client.get("/api/v1/models", headers={"Host": host}).status_code == 200, host
    for host in ["localhost", "127.0.0.1", "evilexample.com", "example.com.evil", "10.0.0.50"]:
        assert client.get("/api/v1/models", headers={"Host": host}).status_code == 400, host
    anyone = make_app(ALLOWED_HOSTS="*").test_client()
    assert anyone.get("/api/v1/models", headers={"Host": "attacker.example"}).status_code == 200


def test_only_ip_addresses_listed_still_refuse_names(make_app):
    client = make_app(ALLOWED_HOSTS="127.0.0.1").test_client()
    assert client.get("/api/v1/models", headers={"Host": "127.0.0.1:5000"}).status_code == 200
    assert client.get("/api/v1/models", headers={"Host": "attacker.example"}).status_code == 400


def raw_get(server, headers: str) -> bytes:
    """The status line of a GET sent byte for byte, with header lines no client library sends."""
    host, port = server.url.rsplit("/", 1)[-1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"GET /api/v1/models HTTP/1.1\r\n{headers}Connection: close\r\n\r\n".encode())
        return sock.makefile("rb").readline().strip()


def test_a_rebinding_host_is_refused_over_real_http(live):
    server = live()
    reply = requests.post(f"{server.url}/api/v1/generate", json={"prompt": "Hi", "max_tokens": 1},
                          headers={"Host": "attacker.example"}, timeout=30)
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "host_not_allowed"
    for headers in ["Host: localhost\r\nHost: attacker.example\r\n",    # two Host headers
                    "Host: attacker.example\r\nHost: localhost\r\n",
                    "Host: attacker.example\r\nX-Forwarded-Host: localhost\r\n"]:
        assert raw_get(server, headers) == b"HTTP/1.1 400 BAD REQUEST", headers
    assert raw_get(server, "Host: 127.0.0.1\r\n") == b"HTTP/1.1 200 OK"
    assert server.generate(prompt="Hi", max_tokens=1).status_code == 200


# --- Origin (cross-site writes) --------------------------------------------------------------

def test_a_cross_site_upload_is_refused_and_nothing_is_written(live):
    server = live()
    models_dir = server.backend.models.models_dir
    before = sorted(p.name for p in models_dir.iterdir())
    reply = requests.post(f"{server.url}/api/v1/models", headers={"Origin": EVIL}, timeout=30,
                          files={"file": ("planted.gguf", b"GGUF" + bytes(4096))},
                          data={"name": "aaa-planted"})
    assert reply.status_code == 403 and reply.json()["error"]["code"] == "origin_not_allowed"
    assert sorted(p.name for p in models_dir.iterdir()) == before
    assert [m["name"] for m in requests.get(f"{server.url}/api/v1/models", timeout=30)
            .json()["models"]] == [MODEL_NAME]


@pytest.mark.parametrize("path,dialect", [(f"/api/v1/models/{MODEL_NAME}", "native"),
                                          ("/api/delete", "ollama")])
def test_a_cross_site_delete_is_refused_and_the_model_stays(make_app, path, dialect):
    client = make_app().test_client()
    reply = client.delete(path, json={"model": MODEL_NAME}, headers={"Origin": EVIL})
    assert_error(reply, dialect, 403, "origin_not_allowed")
    assert client.get(f"/api/v1/models/{MODEL_NAME}").status_code == 200


@pytest.mark.parametrize("dialect,method,path,body", JSON_ROUTES)
@pytest.mark.parametrize("origin", [EVIL, "null", "http://localhost:3000", "https://localhost"])
def test_cross_origin_writes_are_refused_before_any_work(make_app, dialect, method, path, body,
                                                         origin):
    """Under the development default CORS_ORIGINS=*: a page of another origin (another port
    or scheme of the same host included, and a sandboxed frame's "null") may not write."""
    app = make_app()
    reply = app.test_client().open(path, method=method, json=body, headers={"Origin": origin})
    assert_error(reply, dialect, 403, "origin_not_allowed")
    assert nothing_loaded(app)


def test_simple_requests_a_page_sends_without_preflight_are_refused(make_app):
    """text/plain and form posts need no preflight, so only the Origin check stops them."""
    app = make_app()
    client = app.test_client()
    for content_type in ["text/plain", "application/x-www-form-urlencoded"]:
        reply = client.post("/api/generate", headers={"Origin": EVIL, "Content-Type": content_type},
                            data=json.dumps({"prompt": "Hi", "options": {"num_predict": 1}}))
        assert reply.status_code == 403, content_type
    assert nothing_loaded(app)


def test_a_browser_that_omits_origin_is_judged_by_sec_fetch_site(make_app):
    app = make_app()
    client = app.test_client()
    body = {"prompt": "Hi", "max_tokens": 1}
    for site in ["cross-site", "same-site"]:
        reply = client.post("/api/v1/generate", json=body, headers={"Sec-Fetch-Site": site})
        assert_error(reply, "native", 403, "origin_not_allowed")
    assert nothing_loaded(app)
    for site in ["same-origin", "none"]:           # "none": the user typed or bookmarked it
        assert client.post("/api/v1/generate", json=body,
                           headers={"Sec-Fetch-Site": site}).status_code == 200


def test_same_origin_and_clients_without_origin_may_write(make_app):
    client = make_app().test_client()
    body = {"prompt": "Hi", "max_tokens": 1}
    assert client.post("/api/v1/generate", json=body).status_code == 200          # curl, SDKs
    assert client.post("/api/v1/generate", json=body,
                       headers={"Origin": "http://localhost"}).status_code == 200  # docs page
    assert client.post("/api/v1/generate", json=body, headers={
        "Host": "127.0.0.1:5000", "Origin": "http://127.0.0.1:5000"}).status_code == 200


def test_an_origin_listed_by_name_may_write(make_app):
    app = make_app(CORS_ORIGINS=f"*, {APP}")
    client = app.test_client()
    headers = {"Origin": APP}
    reply = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, headers=headers)
    assert reply.status_code == 200 and reply.headers["Access-Control-Allow-Origin"] == APP
    assert client.post("/api/v1/generate", json={"prompt": "Hi", "max_tokens": 1},
                       headers={"Origin": APP.upper()}).status_code == 200
    # The upload passes the gate and reaches the file checks (this junk is no model).
    upload = client.post("/api/v1/models", headers=headers, content_type="multipart/form-data",
                         data={"file": (io.BytesIO(b"GGUF" + bytes(64)), "new.gguf")})
    assert upload.status_code == 400 and upload.get_json()["error"]["code"] == "invalid_model_file"
    assert client.delete(f"/api/v1/models/{MODEL_NAME}", headers=headers).status_code == 200
    assert client.get(f"/api/v1/models/{MODEL_NAME}").status_code == 404
    # A star beside the name still opens writes to no one else.
    assert client.post("/api/v1/generate", json={"prompt": "Hi"},
                       headers={"Origin": EVIL}).status_code == 403


def test_null_cannot_be_listed_as_a_writer(make_app):
    client = make_app(CORS_ORIGINS="null").test_client()
    reply = client.post("/api/v1/generate", json={"prompt": "Hi"}, headers={"Origin": "null"})
    assert reply.status_code == 403


# --- CORS headers ----------------------------------------------------------------------------

def test_star_lets_any_page_read(client):
    reply = client.get("/v1/models", headers={"Origin": EVIL})
    assert reply.status_code == 200 and reply.headers["Access-Control-Allow-Origin"] in (EVIL, "*")
    assert "X-Request-ID" in reply.headers["Access-Control-Expose-Headers"]


def preflight(client, path: str, method: str, origin: str):
    return client.options(path, headers={"Origin": origin, "Access-Control-Request-Method": method,
                                         "Access-Control-Request-Headers": "content-type"})


def test_star_grants_no_preflight_for_a_write(client):
    for path, method in [("/api/v1/generate", "POST"), (f"/api/v1/models/{MODEL_NAME}", "DELETE"),
                         ("/v1/chat/completions", "POST")]:
        reply = preflight(client, path, method, EVIL)
        assert "Access-Control-Allow-Methods" not in reply.headers, path
        assert "Access-Control-Allow-Headers" not in reply.headers, path
    reply = preflight(client, "/v1/models", "GET", EVIL)
    assert "GET" in reply.headers["Access-Control-Allow-Methods"]


def test_a_named_origin_gets_its_preflight_and_others_do_not(make_app):
    client = make_app(CORS_ORIGINS=f"*,{APP}").test_client()
    reply = preflight(client, f"/api/v1/models/{MODEL_NAME}", "DELETE", APP)
    assert reply.headers["Access-Control-Allow-Origin"] == APP
    assert "DELETE" in reply.headers["Access-Control-Allow-Methods"]
    assert "content-type" in reply.headers["Access-Control-Allow-Headers"].lower()
    assert "Access-Control-Allow-Methods" not in preflight(
        client, f"/api/v1/models/{MODEL_NAME}", "DELETE", EVIL).headers
    only_named = make_app(CORS_ORIGINS=APP).test_client()
    assert "Access-Control-Allow-Origin" not in only_named.get(
        "/v1/models", headers={"Origin": EVIL}).headers


# --- Content types ---------------------------------------------------------------------------

@pytest.mark.parametrize("dialect,method,path,body", JSON_ROUTES)
@pytest.mark.parametrize("content_type", ["text/plain", "multipart/form-data; boundary=x",
                                          "application/xml", "text/json"])
def test_a_json_endpoint_refuses_other_content_types(client, dialect, method, path, body,
                                                     content_type):
    reply = client.open(path, method=method, data=json.dumps(body),
                        headers={"Content-Type": content_type})
    assert_error(reply, dialect, 415, "unsupported_media_type")


@pytest.mark.parametrize("path", ["/api/v1/generate", "/api/deepseek/generate",
                                  "/v1/completions", "/v1/chat/completions"])
def test_native_and_openai_refuse_form_encoded_and_untyped_bodies(client, path):
    for headers in [{"Content-Type": "application/x-www-form-urlencoded"}, {}]:
        reply = client.post(path, data=json.dumps({"prompt": "Hi"}), headers=headers)
        assert reply.status_code == 415, headers


def test_ollama_accepts_what_its_own_clients_send(client):
    """Ollama's docs' `curl -d '{…}'` sends form-encoded; some clients send no Content-Type."""
    body = json.dumps({"model": MODEL_NAME})
    for headers in [{"Content-Type": "application/x-www-form-urlencoded"}, {},
                    {"Content-Type": "application/json; charset=utf-8"}]:
        reply = client.post("/api/show", data=body, headers=headers)
        assert reply.status_code == 200 and reply.get_json()["details"]["format"] == "gguf", headers
    reply = client.post("/api/show", data=body, headers={"Content-Type": "text/plain"})
    assert_error(reply, "ollama", 415, "unsupported_media_type")

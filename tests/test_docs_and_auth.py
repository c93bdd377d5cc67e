"""The docs page lists every route; API keys guard everything but /health and the docs."""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest


def test_docs_page_lists_every_route_the_app_has(app, client):
    page = client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    text = page.get_data(as_text=True)
    shown = {(method, html.unescape(rule)) for method, rule in
             re.findall(r'data-method="(\w+)" data-rule="([^"]+)"', text)}
    served = {(method, rule.rule) for rule in app.url_map.iter_rules()
              if rule.endpoint.rsplit(".", 1)[-1] != "static"
              for method in rule.methods - {"HEAD", "OPTIONS"}}
    assert shown == served
    assert ("POST", "/api/v1/generate") in shown and ("GET", "/") in shown


def test_docs_page_shows_parameters_examples_and_a_playground(client):
    text = html.unescape(client.get("/").get_data(as_text=True))
    for param in ("prompt", "max_tokens", "temperature", "top_p", "top_k", "repeat_penalty",
                  "stop", "seed", "stream"):
        assert f"<code>{param}</code>" in text
    assert "curl -X POST http://localhost/api/v1/generate -H 'Content-Type: application/json'" in text
    assert 'id="playground"' in text and "getReader()" in text
    assert "MAX_CONCURRENT_REQUESTS" in text


@pytest.fixture
def keyed(make_app):
    return make_app(API_KEYS="k-one,k-two").test_client()


@pytest.mark.parametrize("path", ["/api/v1/models", "/stats", "/api/v1/health", "/cache/status"])
def test_routes_need_a_key_when_keys_are_set(keyed, path):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k-one"},
                    {"Authorization": "Basic k-one"}):
        reply = keyed.get(path, headers=headers)
        assert reply.status_code == 401
        assert reply.get_json()["error"]["code"] == "unauthorized"
    assert keyed.get(path, headers={"Authorization": "Bearer k-two"}).status_code == 200


def test_health_and_docs_stay_public_with_keys(keyed):
    assert keyed.get("/health").status_code == 200
    assert keyed.get("/").status_code == 200


def test_generate_with_a_key_works_and_the_key_is_never_logged(make_app):
    app = make_app(API_KEYS="secret-key-123")
    client = app.test_client()
    assert client.post("/api/v1/generate", json={"prompt": "hi"}).status_code == 401
    reply = client.post("/api/v1/generate", json={"prompt": "hi", "max_tokens": 2},
                        headers={"Authorization": "Bearer secret-key-123"})
    assert reply.status_code == 200
    reply.close()
    logs = "".join(p.read_text() for p in Path(app.extensions["llm"].config.LOG_DIR).glob("*.log"))
    assert "secret-key-123" not in logs
    assert "secret-key-123" not in client.get(
        "/", headers={"Authorization": "Bearer secret-key-123"}).get_data(as_text=True)


def test_cors_allows_configured_origins(make_app):
    client = make_app(CORS_ORIGINS="http://app.example").test_client()
    reply = client.get("/health", headers={"Origin": "http://app.example"})
    assert reply.headers["Access-Control-Allow-Origin"] == "http://app.example"
    other = client.get("/health", headers={"Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers

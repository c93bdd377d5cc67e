"""Per-key rate limits: requests and generated tokens per window, 429 with Retry-After and the
X-RateLimit-* headers in each API's error shape, recovery after the window, per-key overrides,
uncounted monitoring, two replicas sharing one Redis, and a Redis that fails."""

from __future__ import annotations

import functools
import logging
import socket
import threading
import time

import fakeredis
import ollama
import openai
import pytest
import requests
from fakeredis import TcpFakeServer
from limits.storage import RedisStorage

import app_factory
from config import load_config
from conftest import LONG, MODEL_NAME, LiveServer, build_test_app, wait_until
from services.errors import ConfigError, RateLimited
from services.keys import Principal
from services.rate_limits import RateLimiter

KEYS = [f"rl-secret-{n}" for n in range(6)]
WINDOW = 3          # seconds: the short window of the recovery tests


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def limited(tmp_path_factory, model_file, model_registry):
    """One live server, 3 requests per minute per key; each test spends its own key."""
    app = build_test_app(tmp_path_factory.mktemp("limited"), model_file, model_registry,
                         API_KEYS=",".join(KEYS), RATE_LIMIT_REQUESTS_PER_MINUTE=3)
    server = LiveServer(app)
    yield server
    server.stop()
    app.extensions["llm"].close()


@pytest.fixture
def short_window(monkeypatch, live):
    """Live servers whose limiter counts in windows of WINDOW seconds instead of a minute (the
    constructor's `window_seconds`, as create_app builds it)."""
    monkeypatch.setattr(app_factory, "RateLimiter",
                        functools.partial(RateLimiter, window_seconds=WINDOW))
    return live


def start_fake_redis(port: int = 0) -> TcpFakeServer:
    """A Redis stand-in speaking the real protocol on `port` (fakeredis, Lua included)."""
    server = TcpFakeServer(("127.0.0.1", port))
    server.daemon_threads, server.block_on_close = True, False   # clients may stay connected
    # fakeredis closes a connection after any error reply, the NOSCRIPT that redis-py's first
    # EVALSHA of a script gets included; a real Redis keeps it and redis-py loads the script.
    # So the scripts limits runs are loaded beforehand.
    preload = fakeredis.FakeRedis(server=server.fake_server)
    for name in dir(RedisStorage):
        if name.startswith("SCRIPT_"):
            preload.script_load(getattr(RedisStorage, name))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def stop(server: TcpFakeServer) -> None:
    server.shutdown()
    server.server_close()


@pytest.fixture
def redis_server():
    server = start_fake_redis()
    yield server
    stop(server)


def models(server, key: str) -> requests.Response:
    return requests.get(f"{server.url}/v1/models", headers=bearer(key), timeout=30)


def test_the_fourth_request_of_a_key_is_refused_and_another_key_is_not(limited):
    before = time.time()
    replies = [models(limited, KEYS[0]) for _ in range(4)]
    assert [r.status_code for r in replies] == [200, 200, 200, 429]
    assert [r.headers["X-RateLimit-Remaining"] for r in replies] == ["2", "1", "0", "0"]
    assert {r.headers["X-RateLimit-Limit"] for r in replies} == {"3"}
    reset = int(replies[0].headers["X-RateLimit-Reset"])
    assert before < reset <= time.time() + 61          # epoch seconds, the window's end
    refused = replies[3]
    assert refused.headers["X-RateLimit-Reset"] == str(reset)
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
    assert "3 requests per 60 s" in error["message"]
    other = models(limited, KEYS[1])
    assert other.status_code == 200 and other.headers["X-RateLimit-Remaining"] == "2"
    assert "X-RateLimit-Limit-Tokens" not in other.headers      # no tokens limit set


def test_each_api_refuses_in_its_own_error_shape(limited):
    """The official clients see their own rate-limit errors; the native API its JSON."""
    client = openai.OpenAI(base_url=f"{limited.url}/v1", api_key=KEYS[2], max_retries=0)
    for _ in range(3):
        client.models.list()
    with pytest.raises(openai.RateLimitError) as refused:
        client.models.list()
    assert refused.value.response.headers["X-RateLimit-Remaining"] == "0"
    assert int(refused.value.response.headers["Retry-After"]) >= 1
    with pytest.raises(ollama.ResponseError) as ollama_refused:
        ollama.Client(host=limited.url, headers=bearer(KEYS[2])).list()
    assert ollama_refused.value.status_code == 429
    assert "rate limit reached" in ollama_refused.value.error
    native = requests.get(f"{limited.url}/api/v1/models", headers=bearer(KEYS[2]), timeout=30)
    assert native.status_code == 429
    assert native.json()["error"]["code"] == "rate_limit_exceeded"
    assert native.headers["X-RateLimit-Limit"] == "3" and "Retry-After" in native.headers


def test_monitoring_endpoints_are_not_counted(limited):
    for _ in range(4):
        for path in ("/health", "/stats", "/metrics", "/stats/concurrency"):
            reply = requests.get(f"{limited.url}{path}", headers=bearer(KEYS[3]), timeout=30)
            assert reply.status_code == 200, path
            assert "X-RateLimit-Remaining" not in reply.headers, path
    assert [models(limited, KEYS[3]).status_code for _ in range(4)] == [200, 200, 200, 429]


def test_the_requests_limit_recovers_after_the_window(short_window):
    server = short_window(API_KEYS=KEYS[0], RATE_LIMIT_REQUESTS_PER_MINUTE=2)
    assert [models(server, KEYS[0]).status_code for _ in range(3)] == [200, 200, 429]
    refused = models(server, KEYS[0])
    wait = int(refused.headers["Retry-After"])
    assert refused.status_code == 429 and 1 <= wait <= WINDOW
    assert f"2 requests per {WINDOW} s" in refused.json()["error"]["message"]
    time.sleep(wait + 0.2)
    again = models(server, KEYS[0])
    assert again.status_code == 200 and again.headers["X-RateLimit-Remaining"] == "1"


def test_generated_tokens_exhaust_the_tokens_limit_which_recovers(short_window):
    server = short_window(API_KEYS=KEYS[0], RATE_LIMIT_TOKENS_PER_MINUTE=6)
    first = requests.post(f"{server.url}/api/v1/generate", headers=bearer(KEYS[0]), timeout=120,
                          json={**LONG, "max_tokens": 8})
    assert first.status_code == 200
    assert first.headers["X-RateLimit-Limit-Tokens"] == "6"
    assert first.headers["X-RateLimit-Remaining-Tokens"] == "6"   # counted once the reply ends
    assert first.json()["usage"]["completion_tokens"] == 8
    # The 8 tokens are charged when the reply closes: from then on every request is refused.
    assert wait_until(lambda: models(server, KEYS[0]).status_code == 429, 10)
    refused = requests.post(f"{server.url}/api/v1/generate", headers=bearer(KEYS[0]),
                            timeout=120, json={**LONG, "max_tokens": 8})
    assert refused.status_code == 429
    assert refused.headers["X-RateLimit-Remaining-Tokens"] == "0"
    # Only a tokens limit is set: the plain headers describe it too.
    assert refused.headers["X-RateLimit-Limit"] == "6"
    assert "6 generated tokens per 3 s" in refused.json()["error"]["message"]
    time.sleep(int(refused.headers["Retry-After"]) + 0.2)
    again = requests.post(f"{server.url}/api/v1/generate", headers=bearer(KEYS[0]), timeout=120,
                          json={**LONG, "max_tokens": 4})
    assert again.status_code == 200 and again.headers["X-RateLimit-Remaining-Tokens"] == "6"


def test_a_streamed_reply_is_charged_once_it_ends(short_window):
    server = short_window(API_KEYS=KEYS[0], RATE_LIMIT_TOKENS_PER_MINUTE=5,
                          RATE_LIMIT_REQUESTS_PER_MINUTE=50)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEYS[0], max_retries=0)
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": LONG["prompt"]}],
        max_tokens=6, temperature=0, stream=True)
    assert sum(1 for chunk in stream if chunk.choices and chunk.choices[0].delta.content) >= 1

    def refused() -> bool:
        reply = models(server, KEYS[0])
        return (reply.status_code == 429 and reply.headers["X-RateLimit-Remaining-Tokens"] == "0"
                and reply.headers["X-RateLimit-Limit"] == "50")   # both: plain = requests
    assert wait_until(refused, 10)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model=MODEL_NAME, max_tokens=4,
                                       messages=[{"role": "user", "content": "Hi"}])


def test_an_open_server_limits_each_client_address(make_app):
    client = make_app(RATE_LIMIT_REQUESTS_PER_MINUTE=1).test_client()   # no key anywhere
    assert client.get("/v1/models").status_code == 200
    refused = client.get("/v1/models")
    assert refused.status_code == 429 and "this client sent" in refused.json["error"]["message"]
    other = client.get("/v1/models", environ_base={"REMOTE_ADDR": "127.0.0.2"})
    assert other.status_code == 200


def test_a_keys_own_limits_override_the_servers():
    limiter = RateLimiter("memory://", 1, 0)
    default = Principal("plain", "inference")
    own = Principal("own", "inference", requests_per_minute=3)
    exempt = Principal("exempt", "inference", requests_per_minute=0)
    assert limiter.admit(default, "key:plain")["X-RateLimit-Limit"] == "1"
    with pytest.raises(RateLimited):
        limiter.admit(default, "key:plain")
    assert [limiter.admit(own, "key:own")["X-RateLimit-Remaining"] for _ in range(3)] == [
        "2", "1", "0"]
    with pytest.raises(RateLimited) as refused:
        limiter.admit(own, "key:own")
    assert refused.value.headers["X-RateLimit-Limit"] == "3" and refused.value.retry_after >= 1
    assert all(limiter.admit(exempt, "key:exempt") == {} for _ in range(5))   # 0: no limit
    tokens = Principal("tokens", "inference", tokens_per_minute=10)
    limiter.charge_tokens(tokens, "key:tokens", 25)       # a reply is charged in full
    with pytest.raises(RateLimited) as spent:
        limiter.admit(tokens, "key:tokens")
    assert spent.value.headers["X-RateLimit-Remaining-Tokens"] == "0"
    limiter.charge_tokens(exempt, "key:exempt", 10**6)    # no tokens limit: nothing counted


def test_limits_set_with_the_cli_apply_at_once(make_app):
    app = make_app(RATE_LIMIT_REQUESTS_PER_MINUTE=1)
    runner = app.test_cli_runner()

    def create(name: str, *limits: str) -> str:
        done = runner.invoke(args=["keys", "create", "--name", name, "--scope", "inference",
                                   *limits])
        assert done.exit_code == 0, done.output
        return done.stdout.splitlines()[0].strip()

    own, exempt, plain = (create("own", "--requests-per-minute", "2"),
                          create("exempt", "--requests-per-minute", "0"), create("plain"))
    client = app.test_client()

    def statuses(key: str, n: int) -> list[int]:
        return [client.get("/v1/models", headers=bearer(key)).status_code for _ in range(n)]
    assert statuses(own, 3) == [200, 200, 429]
    assert statuses(plain, 2) == [200, 429]
    assert statuses(exempt, 5) == [200] * 5
    assert "X-RateLimit-Limit" not in client.get("/v1/models", headers=bearer(exempt)).headers
    done = runner.invoke(args=["keys", "limit", "own", "--requests-per-minute", "5"])
    assert done.exit_code == 0, done.output
    assert statuses(own, 1) == [200]        # a new limit is a new budget


def test_two_replicas_share_one_redis(make_app, redis_server):
    uri = f"redis://127.0.0.1:{redis_server.server_address[1]}/0"
    settings = {"API_KEYS": ",".join(KEYS[:2]), "RATE_LIMIT_REQUESTS_PER_MINUTE": 3,
                "RATE_LIMIT_STORAGE_URI": uri}
    one, two = make_app(**settings).test_client(), make_app(**settings).test_client()
    replies = [client.get("/v1/models", headers=bearer(KEYS[0])) for client in (one, two, one)]
    assert [r.headers["X-RateLimit-Remaining"] for r in replies] == ["2", "1", "0"]
    assert two.get("/v1/models", headers=bearer(KEYS[0])).status_code == 429
    assert one.get("/v1/models", headers=bearer(KEYS[0])).status_code == 429
    assert two.get("/v1/models", headers=bearer(KEYS[1])).status_code == 200


def test_a_redis_that_is_down_lets_requests_pass(make_app):
    with socket.socket() as probe:               # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = make_app(API_KEYS=KEYS[0], RATE_LIMIT_REQUESTS_PER_MINUTE=1,
                   RATE_LIMIT_STORAGE_URI=f"redis://127.0.0.1:{port}/0")
    client = app.test_client()
    replies = [client.get("/v1/models", headers=bearer(KEYS[0])) for _ in range(3)]
    assert [r.status_code for r in replies] == [200, 200, 200]
    assert not any("X-RateLimit-Limit" in r.headers for r in replies)


def test_a_storage_outage_is_logged_once_and_limits_resume(redis_server):
    port = redis_server.server_address[1]
    lines = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append((record.levelname, record.fields["message"]))
    log = logging.getLogger("test_rate_limits.outage")
    log.addHandler(Collect())
    limiter = RateLimiter(f"redis://127.0.0.1:{port}/0", 2, 0, retry_storage_after=0.2,
                          errors_log=log)
    who = Principal("k", "inference")
    assert limiter.admit(who, "key:k")["X-RateLimit-Remaining"] == "1"
    stop(redis_server)
    assert [limiter.admit(who, "key:k") for _ in range(5)] == [{}] * 5   # fail open
    assert lines == [("ERROR", "rate-limit storage failed: requests pass without limits until "
                               "it answers again")]
    restarted = start_fake_redis(port)
    try:
        seen = []
        assert wait_until(lambda: seen.append(limiter.admit(who, "key:k")) or seen[-1], 10)
        assert seen[-1]["X-RateLimit-Remaining"] == "1"      # an empty Redis: counting anew
        assert lines[-1] == ("WARNING", "rate-limit storage answers again: limits apply")
        assert limiter.admit(who, "key:k")["X-RateLimit-Remaining"] == "0"
        with pytest.raises(RateLimited):
            limiter.admit(who, "key:k")
    finally:
        stop(restarted)


@pytest.mark.parametrize("uri", ["nope", "bogus://user:hunter2@host", "async+memory://",
                                 "memcached://localhost:11211", "redis://:hunter2@host:port/0"])
def test_an_unusable_storage_uri_stops_the_start(uri):
    with pytest.raises(ConfigError, match="RATE_LIMIT_STORAGE_URI") as refused:
        load_config({"RATE_LIMIT_STORAGE_URI": uri})
    assert "hunter2" not in str(refused.value)


def test_the_storage_password_is_masked_in_the_shown_settings():
    shown = dict((name, value) for name, value, _ in load_config(
        {"RATE_LIMIT_STORAGE_URI": "redis://app:hunter2@cache:6379/0"}).public_items())
    assert shown["RATE_LIMIT_STORAGE_URI"] == "redis://app:***@cache:6379/0"
    query = dict((name, value) for name, value, _ in load_config(
        {"RATE_LIMIT_STORAGE_URI": "redis://cache:6379/0?password=hunter2"}).public_items())
    assert "hunter2" not in query["RATE_LIMIT_STORAGE_URI"]

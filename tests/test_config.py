"""Settings: defaults, environment layering, and start-up refusal of invalid values."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from config import load_config
from conftest import ROOT
from services.errors import ConfigError


def test_defaults_match_the_design_table():
    config = load_config({})
    assert config.APP_ENV == "development"
    assert (config.HOST, config.PORT) == ("127.0.0.1", 5000)
    assert (config.MAX_CONCURRENT_REQUESTS, config.MAX_WORKERS, config.MODEL_POOL_SIZE) == (10, 4, 3)
    assert (config.QUEUE_TIMEOUT, config.REQUEST_TIMEOUT) == (30, 300)
    assert (config.N_CTX, config.N_BATCH, config.N_THREADS, config.N_GPU_LAYERS) == (4096, 512, None, 0)
    assert (config.DEEPSEEK_DEFAULT_CTX, config.DEEPSEEK_MAX_CTX) == (8192, 32768)
    assert (config.DEEPSEEK_CHUNK_SIZE, config.DEEPSEEK_CHUNK_OVERLAP) == (4096, 256)
    assert config.MAX_UPLOAD_BYTES == 64 * 1024**3
    assert config.CORS_ORIGINS == ("*",) and config.API_KEYS == ()
    assert len(config.SECRET_KEY) == 64


@pytest.mark.parametrize("host, expected", [
    ("127.0.0.1", ("localhost", "127.0.0.1", "::1")),
    ("192.168.1.20", ("localhost", "127.0.0.1", "::1", "192.168.1.20")),
    ("0.0.0.0", ("localhost", "127.0.0.1", "::1")),     # a wildcard bind is no name to allow
    ("::", ("localhost", "127.0.0.1", "::1")),
])
def test_allowed_hosts_default_to_loopback_and_the_bound_address(host, expected):
    assert load_config({"HOST": host}).ALLOWED_HOSTS == expected
    assert load_config({"HOST": host, "ALLOWED_HOSTS": "llm.lan, *"}).ALLOWED_HOSTS == ("llm.lan", "*")


def test_environment_values_are_parsed():
    config = load_config({"MAX_WORKERS": "2", "QUEUE_TIMEOUT": "1.5", "API_KEYS": "a, b,,",
                          "N_THREADS": "3", "N_GPU_LAYERS": "-1", "APP_ENV": "testing"})
    assert config.MAX_WORKERS == 2 and config.QUEUE_TIMEOUT == 1.5
    assert config.API_KEYS == ("a", "b") and config.threads_per_instance == 3
    assert config.N_GPU_LAYERS == -1 and config.TESTING


def test_auto_threads_give_the_one_batched_context_every_core():
    config = load_config({"MODEL_POOL_SIZE": "2", "MAX_WORKERS": "4"})
    assert config.threads_per_instance == os.cpu_count()


def test_the_kv_cache_defaults_to_three_requests_worth_and_never_below_one():
    assert load_config({"N_CTX": "1024"}).kv_cache_tokens(1024) == 3072
    assert load_config({"KV_CACHE_TOKENS": "500"}).kv_cache_tokens(2048) == 2048
    assert load_config({"KV_CACHE_TOKENS": "9000"}).kv_cache_tokens(2048) == 9000


@pytest.mark.parametrize("name,value", [
    ("MAX_WORKERS", "abc"), ("MODEL_POOL_SIZE", "0"), ("N_PARALLEL", "0"), ("PORT", "-1"), ("QUEUE_TIMEOUT", "soon"),
    ("N_THREADS", "0"), ("APP_ENV", "staging"), ("REQUEST_TIMEOUT", "inf"),
])
def test_invalid_values_are_refused_naming_the_variable(name, value):
    with pytest.raises(ConfigError, match=name):
        load_config({name: value})


def test_production_requires_a_secret_key_and_allows_no_origin_by_default():
    with pytest.raises(ConfigError, match="SECRET_KEY"):
        load_config({"APP_ENV": "production"})
    config = load_config({"APP_ENV": "production", "SECRET_KEY": "s3cret"})
    assert config.CORS_ORIGINS == () and config.SECRET_KEY == "s3cret"


def test_server_start_stops_with_a_message_naming_the_bad_variable(tmp_path):
    env = {**os.environ, "MAX_WORKERS": "abc", "LOG_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "main.py"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert "MAX_WORKERS" in done.stderr and "abc" in done.stderr


def test_dotenv_file_is_read_and_the_environment_wins(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("MAX_WORKERS=3\nPORT=6000\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PORT", "7000")
    config = load_config()
    assert config.MAX_WORKERS == 3 and config.PORT == 7000

"""Every setting of the server, read once from the environment (and `.env`), typed and checked.

Each setting is declared once in `SETTINGS` with its parser, default and a one-line description;
the startup log and the docs page are generated from that same table. Nothing else in the code
base reads `os.environ`: `create_app` gets a `Config` and passes values down.
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from dotenv import dotenv_values, find_dotenv

from services.errors import ConfigError
from utils.redact import mask_uri

GiB = 1024**3
MiB = 1024**2


def _int(minimum: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = int(str(raw).strip())
        if value < minimum:
            raise ValueError(f"must be an integer >= {minimum}")
        return value

    parse.__doc__ = f"integer >= {minimum}"
    return parse


def _float(minimum: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        value = float(str(raw).strip())
        if not value >= minimum or value == float("inf"):
            raise ValueError(f"must be a number >= {minimum}")
        return value

    parse.__doc__ = f"number >= {minimum}"
    return parse


def _text(raw: str) -> str:
    """text"""
    return str(raw).strip()


def _csv(raw: str) -> tuple[str, ...]:
    """comma-separated list"""
    return tuple(part.strip() for part in str(raw).split(",") if part.strip())


def _bool(raw: str) -> bool:
    """true or false"""
    value = str(raw).strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        raise ValueError("must be true or false")
    return value in ("true", "1", "yes", "on")


def _storage_uri(raw: str) -> str:
    """memory:// or redis://[:password@]host:port/db (rediss://, redis+unix:// too)"""
    value = str(raw).strip()
    scheme = value.partition("://")[0].lower() if "://" in value else ""
    if scheme not in ("memory", "redis", "rediss", "redis+unix"):
        raise ValueError("unsupported scheme")
    urlsplit(value).port      # raises ValueError for a port that is not a number
    return value


def _threads(raw: str) -> int | None:
    """'auto' or an integer >= 1"""
    if str(raw).strip().lower() == "auto":
        return None
    return _int(1)(raw)


def _env_name(raw: str) -> str:
    """development, production or testing"""
    value = str(raw).strip().lower()
    if value not in CONFIG_CLASSES:
        raise ValueError(f"must be one of {', '.join(CONFIG_CLASSES)}")
    return value


@dataclass(frozen=True)
class Setting:
    name: str
    parse: Callable[[str], Any]
    default: Any
    help: str


SETTINGS: tuple[Setting, ...] = (
    Setting("APP_ENV", _env_name, "development", "development / production / testing"),
    Setting("SECRET_KEY", _text, "", "Flask secret; random per start outside production"),
    Setting("HOST", _text, "127.0.0.1", "address `python main.py` listens on"),
    Setting("PORT", _int(1), 5000, "port `python main.py` listens on"),
    Setting("MODELS_DIR", _text, "./models", "GGUF models and models_list.json"),
    Setting("DEEPSEEK_MODELS_DIR", _text, "./DeepSeek/model", "DeepSeek GGUF models"),
    Setting("DEFAULT_MODEL", _text, "",
            "model used when a request names none (else the installed one, else the oldest)"),
    Setting("LOG_DIR", _text, "./logs", "api.log and errors.log"),
    Setting("LOG_LEVEL", _text, "INFO", "level of the application loggers"),
    Setting("LOG_MAX_BYTES", _int(1024), 10 * MiB, "log rotation size"),
    Setting("LOG_BACKUP_COUNT", _int(1), 5, "rotated log files kept"),
    Setting("LOG_PROMPTS", _bool, False, "write prompts and generated text to api.log"),
    Setting("MAX_CONCURRENT_REQUESTS", _int(1), 10, "admitted (running + queued) requests"),
    Setting("MAX_WORKERS", _int(1), 4, "generation worker threads"),
    Setting("MODEL_POOL_SIZE", _int(1), 3,
            "embedding contexts per model (generation runs in one batched context per model)"),
    Setting("N_PARALLEL", _int(1), 8,
            "sequence slots of a model's batched context: requests decoded together"),
    Setting("KV_CACHE_TOKENS", _int(0), 0,
            "KV cache of a model's batched context, shared by its slots (0: 3 x N_CTX)"),
    Setting("QUEUE_TIMEOUT", _float(0.001), 30.0, "seconds to wait for a worker and an instance"),
    Setting("REQUEST_TIMEOUT", _float(0.001), 300.0, "seconds a generation may run"),
    Setting("SHUTDOWN_TIMEOUT", _float(0), 60.0, "seconds SIGTERM waits for running requests"),
    Setting("CLIENT_HEADER_TIMEOUT", _float(0.1), 10.0,
            "seconds a client has to send a request's line and headers; later gets 408"),
    Setting("CLIENT_BODY_TIMEOUT", _float(0.1), 30.0,
            "seconds a request body may lag behind CLIENT_MIN_RATE before it gets 408"),
    Setting("CLIENT_MIN_RATE", _int(1), 1024,
            "bytes/s a request body must keep up on average (each byte buys 1/rate s)"),
    Setting("CLIENT_SEND_TIMEOUT", _float(0.1), 60.0,
            "seconds a reply may wait on a client that does not read before it is dropped"),
    Setting("N_CTX", _int(16), 4096, "context window of GGUF instances (tokens)"),
    Setting("N_BATCH", _int(1), 512, "llama.cpp prompt batch size"),
    Setting("N_THREADS", _threads, None, "llama.cpp threads per context; auto = all cores"),
    Setting("N_GPU_LAYERS", _int(-1), 0, "layers offloaded to a GPU (passed to llama.cpp)"),
    Setting("DEEPSEEK_DEFAULT_CTX", _int(16), 8192, "default DeepSeek context (tokens)"),
    Setting("DEEPSEEK_MAX_CTX", _int(16), 32768, "largest DeepSeek context a request may ask"),
    Setting("DEEPSEEK_CHUNK_SIZE", _int(16), 4096, "large-context chunk size (tokens)"),
    Setting("DEEPSEEK_CHUNK_OVERLAP", _int(0), 256, "tokens shared by neighbouring chunks"),
    Setting("DEEPSEEK_CACHE_SIZE", _int(1), 2, "DeepSeek models kept loaded (LRU eviction)"),
    Setting("MAX_UPLOAD_BYTES", _int(1), 64 * GiB, "largest model upload; larger gets 413"),
    Setting("MEMORY_RESERVE_BYTES", _int(0), 512 * MiB, "memory a model load must leave free"),
    Setting("MODEL_PROBE_TIMEOUT", _float(1), 300.0,
            "seconds a new model's trial (in a throwaway process) may take"),
    Setting("MAX_REQUEST_BYTES", _int(1024), 16 * MiB, "largest JSON body; larger gets 413"),
    Setting("CORS_ORIGINS", _csv, None, "origins allowed cross-origin (* in development: reads only)"),
    Setting("ALLOWED_HOSTS", _csv, None,
            "Host header values served (default: localhost, 127.0.0.1, ::1 and HOST; * for any)"),
    Setting("CHAT_TEMPLATE_TIMEOUT", _float(0.01), 2.0,
            "seconds a model's chat template may take to render one prompt"),
    Setting("DEEPSEEK_MAX_STEPS", _int(1), 64, "most map steps one DeepSeek request may plan"),
    Setting("API_KEYS", _csv, (),
            "inference keys: when any key exists, `Authorization: Bearer <key>` is required"),
    Setting("ADMIN_KEYS", _csv, (),
            "admin keys: may also upload, delete, load and unload models"),
    Setting("DATA_DIR", _text, "./data",
            "server state: keys.sqlite3 (keys made by `flask keys create`)"),
    Setting("RATE_LIMIT_REQUESTS_PER_MINUTE", _int(0), 0,
            "API requests per minute per key (0: no limit; `flask keys limit` overrides per key)"),
    Setting("RATE_LIMIT_TOKENS_PER_MINUTE", _int(0), 0,
            "generated tokens per minute per key (0: no limit; overridable per key)"),
    Setting("RATE_LIMIT_STORAGE_URI", _storage_uri, "memory://",
            "where limit counters live: memory:// (this process) or redis://host:port/db"),
    Setting("PRIORITY_AGING_SECONDS", _float(0.001), 10.0,
            "a waiting request rises one priority level per this many seconds (no starving)"),
    Setting("PRELOAD_MODELS", _csv, (),
            "models loaded at start; readiness (/api/v1/health) is 503 until they are"),
    Setting("MODEL_IDLE_SECONDS", _float(0), 0.0,
            "unload a model nobody used for this long (0: keep until evicted)"),
    Setting("RESPONSE_CACHE_SIZE", _int(0), 0,
            "replies of deterministic requests kept for reuse, LRU (0: no response cache)"),
    Setting("TRUSTED_PROXY_HOPS", _int(0), 0,
            "proxies in front (nginx: 1) whose X-Forwarded-For names the client (0: none)"),
    Setting("REPLICA_NAME", _text, "",
            "this process's name in a fleet: the replica label of /metrics (default host:PORT)"),
)


class Config:
    """Settings for one app; subclasses change defaults per environment (microblog style)."""

    ENV = "development"
    TESTING = False
    DEFAULTS: Mapping[str, Any] = {"CORS_ORIGINS": ("*",)}

    def __init__(self, environ: Mapping[str, Any]):
        for setting in SETTINGS:
            raw = environ.get(setting.name)
            if raw is None or (isinstance(raw, str) and raw.strip() == ""):
                value = self.DEFAULTS.get(setting.name, setting.default)
            elif isinstance(raw, str):
                value = _parse(setting, raw)
            else:
                value = _parse(setting, str(raw)) if isinstance(raw, (int, float)) else raw
            setattr(self, setting.name, value)
        self.APP_ENV = self.ENV
        self._check()

    def _check(self) -> None:
        if not self.SECRET_KEY:
            self.SECRET_KEY = secrets.token_hex(32)
        if self.ALLOWED_HOSTS is None:
            # A wildcard bind address is no name a client uses; a browser page fetching
            # http://0.0.0.0:PORT reaches this machine, so it is never allowed by default.
            bound = () if self.HOST in ("0.0.0.0", "::", "") else (self.HOST,)
            self.ALLOWED_HOSTS = tuple(dict.fromkeys(("localhost", "127.0.0.1", "::1", *bound)))
        if not self.REPLICA_NAME:
            self.REPLICA_NAME = f"{socket.gethostname()}:{self.PORT}"
        if self.DEEPSEEK_DEFAULT_CTX > self.DEEPSEEK_MAX_CTX:
            raise ConfigError("DEEPSEEK_DEFAULT_CTX must not exceed DEEPSEEK_MAX_CTX")
        if self.DEEPSEEK_CHUNK_OVERLAP >= self.DEEPSEEK_CHUNK_SIZE:
            raise ConfigError("DEEPSEEK_CHUNK_OVERLAP must be smaller than DEEPSEEK_CHUNK_SIZE")

    @property
    def threads_per_instance(self) -> int:
        """N_THREADS, or with 'auto' every core: one batched context per model decodes all of
        its requests in one llama_decode per step, so it is the one thing computing."""
        return self.N_THREADS or max(1, os.cpu_count() or 1)

    def kv_cache_tokens(self, n_ctx: int) -> int:
        """Cells of a batched context whose requests may each use `n_ctx`: KV_CACHE_TOKENS, or
        with 0 three requests' worth (the memory the former default pool of 3 instances took)."""
        return max(self.KV_CACHE_TOKENS, n_ctx) if self.KV_CACHE_TOKENS else 3 * n_ctx

    def public_items(self) -> list[tuple[str, Any, str]]:
        """(name, value, help) for the startup log and docs page, secrets masked."""
        hidden = {"SECRET_KEY", "API_KEYS", "ADMIN_KEYS"}

        def shown(name: str) -> Any:
            value = getattr(self, name)
            if name in hidden and value:
                return "***"
            # A Redis password may be part of the URI.
            return mask_uri(value) if name == "RATE_LIMIT_STORAGE_URI" else value

        return [(s.name, shown(s.name), s.help) for s in SETTINGS]


class DevelopmentConfig(Config):
    ENV = "development"


class ProductionConfig(Config):
    ENV = "production"
    DEFAULTS = {"CORS_ORIGINS": ()}

    def _check(self) -> None:
        if not self.SECRET_KEY:
            raise ConfigError("SECRET_KEY must be set when APP_ENV=production")
        super()._check()


class TestingConfig(Config):
    ENV = "testing"
    TESTING = True


CONFIG_CLASSES: dict[str, type[Config]] = {
    "development": DevelopmentConfig,
    "production": ProductionConfig,
    "testing": TestingConfig,
}


def _parse(setting: Setting, raw: str) -> Any:
    try:
        return setting.parse(raw)
    except ValueError as exc:
        expected = setting.parse.__doc__ or "a valid value"
        shown = mask_uri(raw)      # a URI's password stays out of the message
        raise ConfigError(f"{setting.name}={shown!r} is invalid: expected {expected}") from exc


def load_config(environ: Mapping[str, Any] | None = None) -> Config:
    """Build the Config for APP_ENV from `environ`, or from os.environ over `.env` when None."""
    if environ is None:
        dotenv_path = find_dotenv(usecwd=True)
        environ = {**(dotenv_values(dotenv_path) if dotenv_path else {}), **os.environ}
    raw_env = environ.get("APP_ENV") or "development"
    env_name = _parse(SETTINGS[0], str(raw_env))
    return CONFIG_CLASSES[env_name](environ)

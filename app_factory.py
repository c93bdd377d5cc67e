"""create_app(config) -> Flask: settings, logging, CORS, services and the route table.

Everything the app needs is built here and hung on `app.extensions["llm"]`; nothing is global,
so tests can build many apps side by side with different settings.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from config import Config, load_config
from DeepSeekLLM.deepseek_service import DeepSeekService, build_deepseek
from models.model_manager import ModelManager, servable_check
from models.probe import SubprocessTrial
from services.engine.chat_template import ChatTemplates
from services.concurrency_manager import ConcurrencyManager
from services.engine.batch_engine import EngineSettings
from services.embeddings import EmbeddingService, embedding_loader
from services.key_store import KEYS_FILE, KeyStore
from services.keys import Authenticator
from services.llm_service import LLMService
from services.engine.memory import MemoryGuard
from services.model_admin import ModelAdmin
from services.model_events import ModelEvents
from services.model_loading import InstanceSettings, Loader, llamacpp_loader
from services.model_pool import ModelPool
from services.model_preload import Preloader
from services.observability.cache_report import ModelCache, PoolCache, registry_estimate
from services.observability.load_meter import LoadMeter
from services.observability.metrics import build_registry
from services.observability.request_stats import RequestCounts
from services.observability.stats import UsageStats
from services.rate_limits import RateLimiter
from services.response_cache import ResponseCache
from services.types import ANONYMOUS, Caller
from utils.logger import AppLoggers, configure_logging


@dataclass
class Backend:
    """The services of one app; `close` releases workers, model instances and log files."""

    config: Config
    loggers: AppLoggers
    models: ModelManager
    model_admin: ModelAdmin
    pool: ModelPool
    concurrency: ConcurrencyManager
    stats: UsageStats
    llm: LLMService
    started_at: float = field(default_factory=time.monotonic)
    # Observability: API request counts, model load timings, the model caches /cache/status
    # reports (a DeepSeek cache appends itself), and this app's own Prometheus registry.
    requests: RequestCounts = field(default_factory=RequestCounts)
    load_meter: LoadMeter = field(default_factory=LoadMeter)
    caches: list[ModelCache] = field(default_factory=list)
    metrics: Any = None
    deepseek: DeepSeekService | None = None
    embeddings: EmbeddingService | None = None     # the OpenAI and Ollama embedding endpoints
    # Teams: who may call (keys and scopes), how often (per-key limits), cached replies.
    access: Authenticator | None = None
    limiter: RateLimiter | None = None
    response_cache: ResponseCache | None = None
    # Model lifecycle: status changes as events, and PRELOAD_MODELS loading at start.
    model_events: ModelEvents = field(default_factory=ModelEvents)
    preloader: Preloader | None = None

    def close(self) -> None:
        self.model_events.close(wait=2.0)   # open event streams end
        if self.preloader is not None:
            self.preloader.stop()
        self.concurrency.shutdown()
        if self.deepseek is not None:
            self.deepseek.close()
        for manager in self.model_admin.managers.values():
            manager.close()
        self.pool.close()                   # a preload in progress ends with ShuttingDown
        if self.preloader is not None:
            self.preloader.join()
        if self.access is not None and self.access.store is not None:
            self.access.store.close()
        self.loggers.close()


def build_backend(config: Config, loader: Loader | None = None,
                  caller: Callable[[], Caller] = lambda: ANONYMOUS) -> Backend:
    """Wire the services from the settings; `loader` replaces the real llama.cpp loader in tests.
    `caller()` names who sends the request being admitted (the HTTP edge's key and priority)."""
    settings = InstanceSettings(n_ctx=config.N_CTX, n_batch=config.N_BATCH,
                                n_threads=config.threads_per_instance,
                                n_gpu_layers=config.N_GPU_LAYERS)
    probe = functools.partial(SubprocessTrial, config.MODEL_PROBE_TIMEOUT, config.N_CTX,
                              config.N_BATCH)
    siblings: list[ModelManager] = []     # links between their directories share trials
    models = ModelManager(config.MODELS_DIR, "gguf", config.DEFAULT_MODEL, probe=probe(),
                          siblings=siblings)
    managers = {"gguf": models,
                "deepseek": ModelManager(config.DEEPSEEK_MODELS_DIR, "deepseek", probe=probe(),
                                         siblings=siblings)}
    guard = MemoryGuard(config.MEMORY_RESERVE_BYTES)
    meter = LoadMeter()
    events = ModelEvents()
    pool = ModelPool(config.MODEL_POOL_SIZE, meter.wrap(loader or llamacpp_loader(settings)),
                     guard.check, admit=servable_check(managers.values()),
                     engine_settings=functools.partial(engine_settings, config),
                     idle_seconds=config.MODEL_IDLE_SECONDS, events=events)
    stats = UsageStats()
    concurrency = ConcurrencyManager(config.MAX_CONCURRENT_REQUESTS, config.MAX_WORKERS,
                                     config.QUEUE_TIMEOUT, config.REQUEST_TIMEOUT,
                                     on_outcome=stats.record_outcome, caller=caller)
    response_cache = ResponseCache(config.RESPONSE_CACHE_SIZE)
    loggers = configure_logging(config.LOG_DIR, config.LOG_MAX_BYTES, config.LOG_BACKUP_COUNT)
    backend = Backend(
        config=config,
        loggers=loggers, models=models, pool=pool,
        model_admin=ModelAdmin(managers, pool, guard, config.kv_cache_tokens(config.N_CTX),
                               events),
        concurrency=concurrency, stats=stats,
        llm=LLMService(models, pool, concurrency, stats, config.N_CTX,
                       ChatTemplates(config.CHAT_TEMPLATE_TIMEOUT), response_cache),
        load_meter=meter, response_cache=response_cache,
        access=Authenticator(config.API_KEYS, config.ADMIN_KEYS,
                             KeyStore(Path(config.DATA_DIR) / KEYS_FILE)),
        limiter=RateLimiter(config.RATE_LIMIT_STORAGE_URI, config.RATE_LIMIT_REQUESTS_PER_MINUTE,
                            config.RATE_LIMIT_TOKENS_PER_MINUTE, errors_log=loggers.errors),
        model_events=events, preloader=Preloader(config.PRELOAD_MODELS, models, pool, events))
    backend.caches.append(PoolCache("pool", pool, meter,
                                    registry_estimate(managers.values())))
    backend.deepseek = build_deepseek(config, backend.model_admin, backend.llm)
    backend.embeddings = EmbeddingService(models, pool, concurrency, stats,
                                          meter.wrap(embedding_loader(settings, config.N_CTX)),
                                          config.N_CTX)
    backend.caches.append(backend.deepseek.cache)
    backend.metrics = build_registry(backend)
    return backend


def engine_settings(config: Config, n_ctx: int | None) -> EngineSettings:
    """A model's batched context for requests of `n_ctx` tokens (None: N_CTX)."""
    n_ctx = n_ctx or config.N_CTX
    return EngineSettings(slots=config.N_PARALLEL, kv_cells=config.kv_cache_tokens(n_ctx),
                          n_ctx=n_ctx, n_batch=config.N_BATCH,
                          n_threads=config.threads_per_instance,
                          priority_aging_seconds=config.PRIORITY_AGING_SECONDS)


def register_blueprints(app: Flask) -> None:
    """The route table; it matches the HTTP contract in DESIGN.md."""
    from api import (docs, lifecycle_routes, models_api, monitoring, ollama_routes, openai_routes,
                     responses_routes, routes)
    from DeepSeekLLM import deepseek_routes

    app.register_blueprint(docs.bp)                                  # GET /
    app.register_blueprint(routes.bp, url_prefix="/api/v1")          # generate, health
    app.register_blueprint(models_api.bp, url_prefix="/api/v1")      # models, system
    app.register_blueprint(deepseek_routes.bp, url_prefix="/api/deepseek")  # models, generate
    app.register_blueprint(monitoring.bp)                            # /health, /stats, /cache
    app.register_blueprint(openai_routes.bp, url_prefix="/v1")       # OpenAI: models, completions,
                                                                     # chat/completions, embeddings
    app.register_blueprint(responses_routes.bp, url_prefix="/v1")    # OpenAI: responses
    app.register_blueprint(ollama_routes.bp, url_prefix="/api")      # Ollama: generate, chat, embed,
                                                                     # tags, show, ps, delete, version
    app.register_blueprint(lifecycle_routes.bp, url_prefix="/api/v1")  # load, unload, events


def create_app(config: Config | Mapping[str, Any] | None = None, *,
               loader: Loader | None = None) -> Flask:
    """Build the app. `config` is a Config, a mapping of settings (tests), or None (environment).

    :raise ConfigError: a setting has an invalid value.
    """
    from api.access import current_caller
    from api.cli import keys_cli, models_cli
    from api.errors import register_error_handlers
    from api.http import UploadRequest
    from api.browser_safety import register_cors
    from api.middleware import register_request_hooks

    if not isinstance(config, Config):
        config = load_config(config)
    app = Flask(__name__)
    app.request_class = UploadRequest
    app.config.update(
        SECRET_KEY=config.SECRET_KEY, TESTING=config.TESTING,
        MAX_CONTENT_LENGTH=config.MAX_REQUEST_BYTES,
        MAX_FORM_MEMORY_SIZE=1024 * 1024, MAX_FORM_PARTS=100)
    app.json.sort_keys = False
    app.extensions["llm"] = build_backend(config, loader, current_caller)
    if config.TRUSTED_PROXY_HOPS:
        # Behind nginx every request comes from the balancer's address: the client's own is
        # the last X-Forwarded-For entry each trusted proxy appended (access log, per-address
        # limits). Never trusted by default: any client can send that header.
        hops = config.TRUSTED_PROXY_HOPS
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops)
    register_cors(app, config.CORS_ORIGINS or ())
    register_request_hooks(app)
    register_error_handlers(app)
    register_blueprints(app)
    app.cli.add_command(models_cli)
    app.cli.add_command(keys_cli)
    if not _in_cli_command():
        app.extensions["llm"].preloader.start()
    return app


def _in_cli_command() -> bool:
    """Whether a `flask` command other than `run` builds this app (`flask keys list`, say):
    such a command must not load PRELOAD_MODELS."""
    import click

    context = click.get_current_context(silent=True)
    return context is not None and context.command.name != "run"

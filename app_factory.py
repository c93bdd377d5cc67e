"""create_app(config) -> Flask: settings, logging, CORS, services and the route table.

Everything the app needs is built here and hung on `app.extensions["llm"]`; nothing is global,
so tests can build many apps side by side with different settings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from flask import Flask
from flask_cors import CORS

from config import Config, load_config
from models.model_manager import ModelManager
from services.concurrency_manager import ConcurrencyManager
from services.llm_service import LLMService
from services.model_pool import InstanceSettings, Loader, ModelPool, llamacpp_loader
from services.stats import UsageStats
from utils.logger import AppLoggers, configure_logging


@dataclass
class Backend:
    """The services of one app; `close` releases workers, model instances and log files."""

    config: Config
    loggers: AppLoggers
    models: ModelManager
    pool: ModelPool
    concurrency: ConcurrencyManager
    stats: UsageStats
    llm: LLMService
    started_at: float = field(default_factory=time.monotonic)

    def close(self) -> None:
        self.concurrency.shutdown()
        self.models.close()
        self.pool.close()
        self.loggers.close()


def build_backend(config: Config, loader: Loader | None = None) -> Backend:
    """Wire the services from the settings; `loader` replaces the real llama.cpp loader in tests."""
    settings = InstanceSettings(n_ctx=config.N_CTX, n_batch=config.N_BATCH,
                                n_threads=config.threads_per_instance,
                                n_gpu_layers=config.N_GPU_LAYERS)
    models = ModelManager(config.MODELS_DIR, "gguf", config.DEFAULT_MODEL)
    pool = ModelPool(config.MODEL_POOL_SIZE, loader or llamacpp_loader(settings))
    concurrency = ConcurrencyManager(config.MAX_CONCURRENT_REQUESTS, config.MAX_WORKERS,
                                     config.QUEUE_TIMEOUT, config.REQUEST_TIMEOUT)
    stats = UsageStats()
    return Backend(
        config=config,
        loggers=configure_logging(config.LOG_DIR, config.LOG_MAX_BYTES, config.LOG_BACKUP_COUNT),
        models=models, pool=pool, concurrency=concurrency, stats=stats,
        llm=LLMService(models, pool, concurrency, stats, config.N_CTX))


def register_blueprints(app: Flask) -> None:
    """The route table; it matches the HTTP contract in DESIGN.md."""
    from api import docs, monitoring, routes

    app.register_blueprint(docs.bp)                                  # GET /
    app.register_blueprint(routes.bp, url_prefix="/api/v1")          # generate, models, health
    app.register_blueprint(monitoring.bp)                            # /health, /stats, /cache


def create_app(config: Config | Mapping[str, Any] | None = None, *,
               loader: Loader | None = None) -> Flask:
    """Build the app. `config` is a Config, a mapping of settings (tests), or None (environment).

    :raise ConfigError: a setting has an invalid value.
    """
    from api.errors import register_error_handlers
    from api.middleware import register_request_hooks

    if not isinstance(config, Config):
        config = load_config(config)
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=config.SECRET_KEY, TESTING=config.TESTING,
        MAX_CONTENT_LENGTH=config.MAX_REQUEST_BYTES,
        MAX_FORM_MEMORY_SIZE=1024 * 1024, MAX_FORM_PARTS=100)
    app.json.sort_keys = False
    app.extensions["llm"] = build_backend(config, loader)
    if config.CORS_ORIGINS:
        CORS(app, origins=list(config.CORS_ORIGINS), expose_headers=["X-Request-ID", "Retry-After"])
    register_request_hooks(app)
    register_error_handlers(app)
    register_blueprints(app)
    return app

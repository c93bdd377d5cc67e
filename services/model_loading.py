"""How a model file becomes a llama.cpp instance: the loader the pool calls, with the rules
every load in this process follows (one at a time, console output kept)."""

from __future__ import annotations

import contextlib
import io
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable

# Called as loader(path): an object whose `.client` is the model's llama_cpp.Llama.
Loader = Callable[..., Any]


@dataclass(frozen=True)
class InstanceSettings:
    """What every pooled llama.cpp instance is built with."""

    n_ctx: int
    n_batch: int
    n_threads: int
    n_gpu_layers: int


# llama-cpp-python's verbose=False silences a load by dup2-ing the process's stdout/stderr to
# /dev/null: every other thread's console output vanishes meanwhile, and two loads at once can
# leave stderr redirected for good. So instances load verbose, one at a time, with only
# sys.stderr redirected (log handlers keep the real stream), and are made quiet afterwards.
_STDERR_SWAP = threading.Lock()


def load_quietly(load: Callable[[], Any]) -> Any:
    """Run another llama.cpp load (a tokenizer, say) under the same rules as the instances'."""
    with _STDERR_SWAP, contextlib.redirect_stderr(io.StringIO()):
        return load()


def llamacpp_loader(settings: InstanceSettings) -> Loader:
    """The real loader: a LangChain `LlamaCpp` whose `.client` is the `llama_cpp.Llama`."""

    def load(path: str) -> Any:
        from langchain_community.llms import LlamaCpp

        # The Llama's own context only tokenizes and reads metadata: the engine decodes in a
        # context of its own, so this one stays small.
        with _STDERR_SWAP, contextlib.redirect_stderr(io.StringIO()):
            instance = LlamaCpp(model_path=path, n_ctx=min(settings.n_ctx, 256),
                                n_batch=min(settings.n_batch, 256), n_threads=settings.n_threads,
                                n_gpu_layers=settings.n_gpu_layers,
                                model_kwargs={"n_threads_batch": settings.n_threads}, verbose=True)
            logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        instance.client.verbose = False
        return instance

    return load


def close_instance(instance: Any) -> None:
    """Free an instance's llama.cpp model and context now rather than at garbage collection."""
    client = getattr(instance, "client", None)
    if client is not None and hasattr(client, "close"):
        client.close()

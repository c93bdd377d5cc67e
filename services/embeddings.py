"""Embeddings: vectors for texts, from the same files and the same admission as generation.

An embedding needs a llama.cpp context created with embeddings on, so each model gets a second
kind of pooled instance, named `<model>#embedding`: same file, same pool size and memory checks,
evicted with the model. Jobs go through the ConcurrencyManager like generations (429, queue and
request timeouts, /stats), and their callers wait on the job's events like generations do.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

import llama_cpp

from models.gguf_header import read_gguf
from models.model_file import ModelFile
from models.model_manager import ModelManager
from services.concurrency_manager import ConcurrencyManager, Job
from services.errors import ContextOverflow, InvalidRequest
from services.engine.memory import estimate_load
from services.model_loading import InstanceSettings, Loader, load_quietly
from services.model_pool import ModelPool, variant_name
from services.observability.stats import UsageStats

MAX_INPUTS = 2048


@dataclass(frozen=True)
class Embeddings:
    model: str
    vectors: list[list[float]]
    prompt_tokens: int
    queue_ms: float
    load_ms: float
    embed_ms: float


def embedding_loader(settings: InstanceSettings, n_ctx: int) -> Loader:
    """Loads a LangChain `LlamaCpp` with embeddings on, one batch as large as its context so an
    input that fits the context is embedded in one pass.

    A model that declares no pooling (a causal LM such as Gemma) is mean-pooled: one vector per
    input, which is what the OpenAI and Ollama APIs return.
    """

    def load(path: str) -> Any:
        from langchain_community.llms import LlamaCpp

        instance = load_quietly(lambda: LlamaCpp(
            model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=settings.n_threads,
            n_gpu_layers=settings.n_gpu_layers, verbose=True,
            model_kwargs={"embedding": True, "n_ubatch": n_ctx, "pooling_type": _pooling(path),
                          "n_threads_batch": settings.n_threads}))
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        instance.client.verbose = False
        return instance

    return load


def _pooling(path: str) -> int:
    """The pooling the file declares (CLS for BERT-style models, say), else mean."""
    metadata = read_gguf(path).metadata
    declared = metadata.get(f"{metadata.get('general.architecture')}.pooling_type")
    if isinstance(declared, int) and declared > llama_cpp.LLAMA_POOLING_TYPE_NONE:
        return declared
    return llama_cpp.LLAMA_POOLING_TYPE_MEAN


def check_inputs(inputs: Any) -> list[str]:
    """:raise InvalidRequest: not a string or a non-empty list of at most MAX_INPUTS strings.

    Token ids get their own message: they come from a client that tokenized the text with
    OpenAI's tokenizer (LangChain's OpenAIEmbeddings does by default), so they are other
    tokens, or none, to this model; embedding them would return vectors of the wrong text.
    """
    if isinstance(inputs, str):
        return [inputs]
    if _token_ids(inputs):
        raise InvalidRequest(
            "input holds token ids; they are ids of the client's tokenizer (OpenAI's tiktoken), "
            "not of this model's, so send the texts instead. LangChain: OpenAIEmbeddings("
            "check_embedding_ctx_length=False, ...) sends the texts", param="input")
    if (not isinstance(inputs, list) or not inputs or len(inputs) > MAX_INPUTS
            or not all(isinstance(text, str) for text in inputs)):
        raise InvalidRequest(f"input must be a string or a list of 1 to {MAX_INPUTS} strings",
                             param="input")
    return inputs


def _token_ids(value: Any) -> bool:
    """A list of ints (the ids of one text), or a list of such lists."""
    if not isinstance(value, list) or not value:
        return False
    if all(isinstance(item, list) for item in value):
        return all(_ids(item) for item in value)
    return _ids(value)


def _ids(value: list) -> bool:
    return bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def shorten(vectors: list[list[float]], dimensions: int | None) -> list[list[float]]:
    """Each vector cut to its first `dimensions` values and normalised again, as OpenAI's
    `dimensions` does (meaningful for models trained for it; for others it is what the client
    asked for all the same).

    :raise InvalidRequest: more dimensions than the model's vectors have.
    """
    if dimensions is None or not vectors:
        return vectors
    size = len(vectors[0])
    if dimensions > size:
        raise InvalidRequest(f"dimensions must be at most {size}, this model's embedding size",
                             param="dimensions")
    shortened = []
    for vector in vectors:
        head = vector[:dimensions]
        norm = sum(x * x for x in head) ** 0.5
        shortened.append([x / norm for x in head] if norm else head)
    return shortened


class EmbeddingService:
    """Embeds texts on pooled embedding instances, admitted and counted like generations."""

    def __init__(self, models: ModelManager, pool: ModelPool, concurrency: ConcurrencyManager,
                 stats: UsageStats, loader: Loader, n_ctx: int):
        self.models = models
        self.pool = pool
        self.concurrency = concurrency
        self.stats = stats
        self._loader = loader
        self.n_ctx = n_ctx

    def embed(self, model_name: str | None, inputs: Sequence[str],
              truncate: bool = False) -> Embeddings:
        """One normalised vector per input, in order. With `truncate`, an input longer than the
        context is cut to fit instead of refused.

        :raise ModelNotFound, ContextOverflow, TooBusy, QueueTimeout, GenerationTimeout:
        """
        model = self.models.resolve(model_name)
        received_at = time.monotonic()
        job = self.concurrency.submit(
            lambda job: self._work(job, model, inputs, truncate, received_at), model.name)
        try:
            return job.next_event()
        except BaseException:
            job.cancel()
            raise

    def _work(self, job: Job, model: ModelFile, inputs: Sequence[str], truncate: bool,
              received_at: float) -> None:
        """On a worker: hold an embedding instance, embed every input, put the result."""
        tokens, ok = 0, False
        try:
            cost = estimate_load(model.size_bytes, model.kv_bytes_per_token, self.n_ctx)
            with self.pool.checkout(variant_name(model.name, "embedding"), model.path,
                                    job.queue_deadline, job.reserve, cost,
                                    loader=self._loader) as instance:
                load_seconds = time.monotonic() - (job.reserved_at or time.monotonic())
                llm = instance.client
                tokens = sum(_input_tokens(llm, text, index, truncate)
                             for index, text in enumerate(inputs))
                job.start()
                vectors = []
                for text in inputs:
                    job.check()
                    vectors.append(llm.embed(text, normalize=True, truncate=truncate))
            embed_seconds = time.monotonic() - job.started_at
            ok = True
        except BaseException as exc:
            job.events.put(exc)
            raise
        finally:
            self.stats.record(model.name, ok, tokens, 0, job.queue_seconds, 0.0,
                              latency_seconds=time.monotonic() - received_at)
        job.events.put(Embeddings(model.name, vectors, tokens, job.queue_seconds * 1000,
                                  load_seconds * 1000, embed_seconds * 1000))


def _input_tokens(llm: Any, text: str, index: int, truncate: bool) -> int:
    """Tokens `llm.embed` will see for one input (it adds BOS, parses no special tokens).

    :raise ContextOverflow: the input does not fit the context and may not be truncated.
    """
    count, limit = len(llm.tokenize(text.encode("utf-8"))), llm.n_batch
    if count <= limit or truncate:
        return min(count, limit)
    raise ContextOverflow(f"input {index} is {count} tokens; this model embeds at most {limit} "
                          f"tokens at a time", param="input", prompt_tokens=count,
                          context_length=limit)

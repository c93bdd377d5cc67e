"""DeepSeek generation: validate a request, resolve its model, plan it against n_ctx, start it.

A request whose prompt, context and answer fit n_ctx is one generation (strategy "none"). One
that does not is map-reduced: the context is cut into token-exact overlapping chunks, a map step
notes what each chunk holds that bears on the prompt, collapse steps merge notes too long for
one prompt, and a reduce step answers from the notes (run.py). Every step is an ordinary
generation on the shared concurrency manager and pool (steps.py).
"""

from __future__ import annotations

import functools
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from DeepSeekLLM.model_cache import CachedModel, ModelCache, ModelTokenizer
from DeepSeekLLM.run import DeepSeekResult, DeepSeekRun, Plan, run_events, step_sampling
from DeepSeekLLM.services import PromptBuilder, count_chunks, plan_budget, split_tokens
from DeepSeekLLM.steps import StepRunner
from models.model_file import ModelFile
from services.errors import InvalidRequest, ModelNotFound, ModelOnTrial, ModelUnusable
from services.dialects import sampling_fields as f
from services.dialects.params import Param, at_least, not_blank, parse_params
from services.types import SamplingParams
from services.llm_service import LLMService, check_fits
from services.model_admin import ModelAdmin
from services.concurrency_manager import outcome_of
from services.types import CANCELLED

MIN_N_CTX = 256

DEEPSEEK_PARAMS: tuple[Param, ...] = (
    Param("prompt", "string", None, "the instruction or question (required)", not_blank,
          required=True),
    Param("context", "string", "", "a document to work from, any length: chunked (map-reduce) "
          "when it does not fit n_ctx"),
    Param("model", "string", None, "model name from GET /api/deepseek/models; the first one if "
          "omitted", not_blank),
    f.MAX_TOKENS.param(note="the answer's, and each note's at most"),
    f.TEMPERATURE.param(), f.TOP_P.param(), f.TOP_K.param(), f.MIN_P.param(),
    f.REPEAT_PENALTY.param(), f.SEED.param(),
    Param("n_ctx", "integer", None, f"context window of each step ({MIN_N_CTX} .. "
          f"DEEPSEEK_MAX_CTX and the model's own); default DEEPSEEK_DEFAULT_CTX",
          at_least(MIN_N_CTX)),
    Param("chunk_size", "integer", None, "tokens per chunk when the context must be chunked; "
          "default DEEPSEEK_CHUNK_SIZE, or less to fit", at_least(16)),
    Param("chunk_overlap", "integer", None, "tokens neighbouring chunks share; default "
          "DEEPSEEK_CHUNK_OVERLAP, at most a quarter of the chunk", at_least(0)),
    Param("stream", "boolean", False, "stream progress, reasoning and token events as "
          "server-sent events"),
)


@dataclass(frozen=True)
class DeepSeekLimits:
    default_ctx: int
    max_ctx: int
    chunk_size: int
    chunk_overlap: int
    max_steps: int = 64       # DEEPSEEK_MAX_STEPS: map steps one request may plan


@dataclass(frozen=True)
class DeepSeekRequest:
    prompt: str
    context: str
    model: str | None
    n_ctx: int | None
    chunk_size: int | None
    chunk_overlap: int | None
    sampling: SamplingParams
    stream: bool

    @classmethod
    def from_json(cls, body: Any, max_ctx: int) -> "DeepSeekRequest":
        """:raise InvalidRequest: unknown, missing or ill-typed fields, values out of range."""
        values = parse_params(body, DEEPSEEK_PARAMS)
        n_ctx, size, overlap = values["n_ctx"], values["chunk_size"], values["chunk_overlap"]
        if n_ctx is not None and n_ctx > max_ctx:
            raise InvalidRequest(f"n_ctx must be at most DEEPSEEK_MAX_CTX ({max_ctx})")
        if size is not None and overlap is not None and overlap >= size:
            raise InvalidRequest(f"chunk_overlap ({overlap}) must be smaller than chunk_size "
                                 f"({size})")
        sampling = f.sampling_params(n_ctx or max_ctx, **f.named_fields(values))
        return cls(prompt=values["prompt"], context=values["context"], model=values["model"],
                   n_ctx=n_ctx, chunk_size=size, chunk_overlap=overlap,
                   sampling=sampling, stream=values["stream"])


class DeepSeekService:
    """DeepSeek models, listed and resolved (the GGUF default as fallback), and generation."""

    def __init__(self, admin: ModelAdmin, llm: LLMService, cache: ModelCache,
                 limits: DeepSeekLimits, window: int, queue_timeout: float):
        self.admin, self.llm, self.cache, self.limits = admin, llm, cache, limits
        self.window, self.queue_timeout = window, queue_timeout

    def parse_request(self, body: object) -> DeepSeekRequest:
        """:raise InvalidRequest:"""
        return DeepSeekRequest.from_json(body, self.limits.max_ctx)

    def list_models(self) -> list[dict]:
        """The DeepSeek models with metadata and load state, or the fallback when there are none."""
        models, fallback = self.admin.list("deepseek"), False
        if not models:
            try:
                models, fallback = [self.admin.describe(self._fallback().name, "gguf")], True
            except ModelNotFound:
                return []
        loaded = [m for m in self.llm.pool.loaded_models() if m.n_ctx is not None]
        for info in models:
            mine = [m for m in loaded if m.name == info["name"] and m.instances]
            info.update(fallback=fallback, loaded=bool(mine),
                        instances=sum(m.instances for m in mine),
                        in_use=sum(m.in_use for m in mine), contexts=[m.n_ctx for m in mine])
        return models

    def resolve(self, name: str | None) -> ModelFile:
        """The named DeepSeek model, or the first; the GGUF default while there is none.

        :raise ModelNotFound, ModelOnTrial, ModelUnusable:
        """
        manager = self.admin.manager("deepseek")
        if manager.list():
            try:
                return manager.resolve(name)
            except (ModelOnTrial, ModelUnusable):
                raise               # it exists: say why it cannot serve, not "not found"
            except ModelNotFound:
                pass
        else:
            fallback = self._fallback()
            if not name or name in (fallback.name, fallback.name.removesuffix(".gguf")):
                return fallback
        raise ModelNotFound(f"DeepSeek model {name!r} not found; GET /api/deepseek/models "
                            f"lists the models")

    def generate(self, request: DeepSeekRequest) -> DeepSeekResult:
        """Run a request to the end. :raise BackendError: as `stream` and while running."""
        run = self.stream(request)
        try:
            for event in run:
                if isinstance(event, DeepSeekResult):
                    return event
        finally:
            run.close()
        raise AssertionError("a DeepSeek run ended without a result")

    def stream(self, request: DeepSeekRequest) -> DeepSeekRun:
        """Plan a request and start its first step, so that early errors raise here.

        :raise ModelNotFound, InvalidRequest, ContextOverflow, TooBusy, QueueTimeout,
            ModelLoadError, ShuttingDown:
        """
        model = self.resolve(request.model)
        job = self.llm.concurrency.admit(model.name)
        cleanup = ExitStack()
        cleanup.callback(job.end, CANCELLED)       # a run closed before it ended
        try:
            plan = self._plan(cleanup.enter_context(self.cache.use(model)), request)
            self.cache.add_context(plan.entry, plan.n_ctx)
            # Seeded steps each run alone (README, "Seeds and batching"): one at a time.
            window = 1 if request.sampling.seed is not None else self.window
            runner = StepRunner(self.llm, model, plan.n_ctx, window, job)
            cleanup.callback(runner.close)
            first = plan.single or plan.builder.map_step(plan.chunks[0])
            first_step = runner.start_first(first, step_sampling(plan, request.sampling))
        except BaseException as exc:
            job.end(outcome_of(exc))
            cleanup.close()
            raise
        events = run_events(plan, runner, first_step, request.sampling)
        return DeepSeekRun(model.name, plan.chunking(), events, cleanup)

    def evict(self, name: str) -> bool:
        """Forget a DeepSeek model whose file was removed or replaced; close its instances."""
        return self.cache.evict(name)

    def close(self) -> None:
        self.cache.close()

    def _fallback(self) -> ModelFile:
        return self.admin.manager("gguf").resolve(None)

    def _plan(self, entry: CachedModel, request: DeepSeekRequest) -> Plan:
        """Count the request in the model's tokens; chunk the context if it does not fit.

        :raise InvalidRequest, ContextOverflow:
        """
        n_ctx = self._n_ctx(entry.model, request.n_ctx)
        tokenizer = entry.tokenizer
        builder = PromptBuilder(tokenizer.layout, tokenizer.tokenize, request.prompt)
        context = tokenizer.tokenize(request.context) if request.context else []
        plan = Plan(entry, n_ctx, builder, len(context))
        single = builder.single(context)
        max_tokens = request.sampling.max_tokens
        if len(single) + max_tokens <= n_ctx:
            plan.single = single
            return plan
        if not context:
            check_fits(len(single), max_tokens, n_ctx)
        plan.budget = plan_budget(builder, n_ctx, max_tokens, len(context), request.chunk_size,
                                  request.chunk_overlap,
                                  (self.limits.chunk_size, self.limits.chunk_overlap))
        self._check_steps(len(context), plan.budget.chunk_size, plan.budget.overlap)
        plan.chunks = split_tokens(context, plan.budget.chunk_size, plan.budget.overlap)
        return plan

    def _check_steps(self, context_tokens: int, chunk_size: int, overlap: int) -> None:
        """:raise InvalidRequest: the plan has more map steps than DEEPSEEK_MAX_STEPS. Counted
        before any step starts; collapse steps are bounded by the map steps (each merges at
        least two notes into one), and one reduce step follows."""
        steps = count_chunks(context_tokens, chunk_size, overlap)
        if steps > self.limits.max_steps:
            raise InvalidRequest(
                f"this request would take {steps} map steps ({context_tokens} context tokens in "
                f"chunks of {chunk_size} sharing {overlap}), more than DEEPSEEK_MAX_STEPS "
                f"({self.limits.max_steps}); raise chunk_size, lower chunk_overlap or shorten "
                f"the context", steps=steps, max_steps=self.limits.max_steps)

    def _n_ctx(self, model: ModelFile, requested: int | None) -> int:
        """:raise InvalidRequest: more context than the model was trained on."""
        trained = model.context_length or self.limits.max_ctx
        if requested is None:
            return min(self.limits.default_ctx, trained)
        if requested > trained:
            raise InvalidRequest(f"n_ctx {requested} exceeds the {trained} tokens of context "
                                 f"{model.name} was trained on", n_ctx=requested,
                                 context_length=trained)
        return requested


def build_deepseek(config: Any, admin: ModelAdmin, llm: LLMService) -> DeepSeekService:
    """The DeepSeek service from the settings, on the app's shared services."""
    limits = DeepSeekLimits(config.DEEPSEEK_DEFAULT_CTX, config.DEEPSEEK_MAX_CTX,
                            config.DEEPSEEK_CHUNK_SIZE, config.DEEPSEEK_CHUNK_OVERLAP,
                            config.DEEPSEEK_MAX_STEPS)
    cache = ModelCache(config.DEEPSEEK_CACHE_SIZE, llm.pool,
                       functools.partial(ModelTokenizer, templates=llm.templates))
    return DeepSeekService(admin, llm, cache, limits, window=config.N_PARALLEL,
                           queue_timeout=config.QUEUE_TIMEOUT)

"""Prometheus exposition of the counters the services keep (GET /metrics).

A collector reads the same objects /stats reads at scrape time, so the two can never disagree,
and nothing is counted twice. Each app gets its own CollectorRegistry (never the global one), so
many apps can live in one process, as the tests build them. Label values are bounded: route
templates, status codes, outcomes, and the names of models that exist.

In a fleet every replica is scraped on its own, so every series carries `replica` (REPLICA_NAME):
the app's registry adds it to every sample any of its collectors yields, the process collector's
included, so no metric added later can go out without it.
"""

from __future__ import annotations

import copy
import time
from importlib import metadata
from typing import Iterator

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                   InfoMetricFamily)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from services.observability.reports import cache_statuses, engine_states
from services.types import OUTCOMES


class BackendCollector(Collector):
    """Reads one backend's statistics, concurrency state and model caches on every scrape."""

    def __init__(self, backend):
        self._backend = backend

    def collect(self) -> Iterator:
        yield from self._requests()
        yield from self._usage()
        yield from self._concurrency()
        yield from self._caches()
        yield from self._keys()
        yield from self._response_cache()

    def _requests(self) -> Iterator:
        http = CounterMetricFamily("llm_http_requests", "API requests answered, by route template "
                                   "and status (monitoring endpoints not counted)",
                                   labels=["method", "route", "status"])
        for (method, route, status), count in sorted(self._backend.requests.by_status().items()):
            http.add_metric([method, route, str(status)], count)
        uptime = GaugeMetricFamily("llm_uptime_seconds", "seconds since the app started")
        uptime.add_metric([], time.monotonic() - self._backend.started_at)
        return [http, uptime]

    def _usage(self) -> Iterator:
        stats = self._backend.stats
        outcomes = CounterMetricFamily("llm_model_requests", "generation requests per model and "
                                       "outcome", labels=["model", "outcome"])
        prompt = CounterMetricFamily("llm_prompt_tokens", "prompt tokens evaluated", labels=["model"])
        completion = CounterMetricFamily("llm_completion_tokens", "tokens generated",
                                         labels=["model"])
        for model, usage in stats.by_model().items():
            for outcome in OUTCOMES:
                outcomes.add_metric([model, outcome], usage[outcome])
            prompt.add_metric([model], usage["prompt_tokens"])
            completion.add_metric([model], usage["completion_tokens"])
        latency = HistogramMetricFamily("llm_request_latency_seconds", "completed generations, "
                                        "from admission to last token", labels=["model"])
        ttft = HistogramMetricFamily("llm_time_to_first_token_seconds", "from admission to the "
                                     "first sampled token", labels=["model"])
        for model, histograms in stats.histograms().items():
            latency.add_metric([model], *histograms["latency"])
            ttft.add_metric([model], *histograms["ttft"])
        return [outcomes, prompt, completion, latency, ttft]

    def _concurrency(self) -> Iterator:
        snapshot = self._backend.concurrency.snapshot()
        for name, value, help_text in (
                ("llm_requests_in_flight", snapshot.in_flight, "admitted requests (active + queued)"),
                ("llm_requests_active", snapshot.active, "requests holding a slot or instance"),
                ("llm_queue_depth", snapshot.queued, "admitted requests waiting for a worker, a "
                                                     "model load or a slot"),
                ("llm_workers_busy", snapshot.workers_busy, "worker threads running a request"),
                ("llm_max_concurrent_requests", snapshot.max_concurrent_requests,
                 "MAX_CONCURRENT_REQUESTS"),
                ("llm_max_workers", snapshot.max_workers, "MAX_WORKERS")):
            gauge = GaugeMetricFamily(name, help_text)
            gauge.add_metric([], value)
            yield gauge
        rejected = CounterMetricFamily("llm_rejected_requests", "requests refused with 429 "
                                       "(MAX_CONCURRENT_REQUESTS reached)")
        rejected.add_metric([], snapshot.outcomes["rejected"])
        timeouts = CounterMetricFamily("llm_timeouts", "requests that ran out of time, by stage",
                                       labels=["stage"])
        timeouts.add_metric(["queue"], snapshot.outcomes["queue_timed_out"])
        timeouts.add_metric(["generation"], snapshot.outcomes["timed_out"])
        yield from (rejected, timeouts)
        yield from self._engines()

    def _engines(self) -> Iterator:
        """Each loaded model's batched engine: slots, what a decode step carries, prefix reuse."""
        families = {
            "slots_busy": GaugeMetricFamily("llm_slots_busy", "sequence slots decoding",
                                            labels=["model", "n_ctx"]),
            "slots_total": GaugeMetricFamily("llm_slots_total", "sequence slots (N_PARALLEL)",
                                             labels=["model", "n_ctx"]),
            "waiting": GaugeMetricFamily("llm_sequences_waiting", "sequences waiting for a slot",
                                         labels=["model", "n_ctx"]),
            "sequences_per_step": GaugeMetricFamily(
                "llm_sequences_per_decode_step", "sequences in one llama_decode, mean of the "
                "recent steps", labels=["model", "n_ctx"]),
            "steps": CounterMetricFamily("llm_decode_steps", "llama_decode calls",
                                         labels=["model", "n_ctx"]),
            "prompt_tokens_reused": CounterMetricFamily(
                "llm_prompt_tokens_reused", "prompt tokens taken from a slot's cached prefix "
                "instead of evaluated", labels=["model", "n_ctx"])}
        for state in engine_states(self._backend):
            labels = [state["model"], str(state["n_ctx"])]
            for key, family in families.items():
                family.add_metric(labels, state[key] or 0)
        return families.values()

    def _caches(self) -> Iterator:
        instances = GaugeMetricFamily("llm_pool_instances", "llama.cpp instances by state "
                                      "(every context size of a model together)",
                                      labels=["model", "state"])
        by_model: dict[str, dict[str, int]] = {}
        for model in self._backend.pool.loaded_models():
            counts = by_model.setdefault(model.name, {"idle": 0, "in_use": 0, "loading": 0})
            counts["idle"] += model.instances - model.in_use
            counts["in_use"] += model.in_use
            counts["loading"] += model.loading
        for name, counts in sorted(by_model.items()):
            for state, count in counts.items():
                instances.add_metric([name, state], count)
        counters = {key: CounterMetricFamily(f"llm_model_cache_{key}", f"model cache {key}",
                                             labels=["cache"])
                    for key in ("hits", "misses", "evictions")}
        for status in cache_statuses(self._backend):
            for key, family in counters.items():
                family.add_metric([status["name"]], status[key])
        loads = HistogramMetricFamily("llm_model_load_duration_seconds", "time to load one "
                                      "model instance", labels=["model"])
        for model, snapshot in self._backend.load_meter.durations().items():
            loads.add_metric([model], *snapshot)
        return [instances, *counters.values(), loads]

    def _keys(self) -> Iterator:
        """Requests and generated tokens per key name (never the key)."""
        requests = CounterMetricFamily("llm_key_requests", "API requests per key name and "
                                       "outcome", labels=["key", "outcome"])
        tokens = CounterMetricFamily("llm_key_completion_tokens", "tokens generated for each key",
                                     labels=["key"])
        for key, counts in self._backend.requests.by_key().items():
            for outcome in OUTCOMES:
                requests.add_metric([key, outcome], counts[outcome])
            tokens.add_metric([key], counts["completion_tokens"])
        return [requests, tokens]

    def _response_cache(self) -> Iterator:
        status = self._backend.response_cache.status()
        hits = CounterMetricFamily("llm_response_cache_hits", "requests answered from the "
                                   "response cache")
        hits.add_metric([], status["hits"])
        misses = CounterMetricFamily("llm_response_cache_misses", "deterministic requests the "
                                     "response cache did not hold")
        misses.add_metric([], status["misses"])
        entries = GaugeMetricFamily("llm_response_cache_entries", "replies held "
                                    "(RESPONSE_CACHE_SIZE at most)")
        entries.add_metric([], status["entries"])
        return [hits, misses, entries]


REPLICA_LABEL = "replica"


class ReplicaRegistry(CollectorRegistry):
    """A registry whose every sample carries replica="<name>", whichever collector yields it:
    the label is added where the registry hands its families to the exposition, so a collector
    or metric registered later needs nothing to get it.

    Prometheus adds an `instance` label of its own, but that is the scraped address, which
    changes when a pod moves; the replica's configured name is what dashboards group by.
    """

    def __init__(self, replica: str):
        super().__init__(auto_describe=False)
        self.replica = exposable(replica)

    def collect(self) -> Iterator[Metric]:
        for family in super().collect():
            yield self._labelled(family)

    def _labelled(self, family: Metric) -> Metric:
        """A copy, so a collector that hands out the same family twice never sees it changed."""
        labelled = copy.copy(family)
        labelled.samples = [sample._replace(labels={**sample.labels, REPLICA_LABEL: self.replica})
                            for sample in family.samples]
        return labelled


def exposable(value: str) -> str:
    """`value` as UTF-8 can carry it: an environment variable holding bytes that are not UTF-8
    arrives with surrogates, which would make every scrape fail to encode. Quotes, backslashes
    and newlines need nothing here: the exposition escapes label values."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


class ReplicaInfo(Collector):
    """llm_replica_info: one series per replica whose labels say what it runs (value 1), to
    join on `replica` or to count the replicas up."""

    def collect(self) -> Iterator[Metric]:
        info = InfoMetricFamily("llm_replica", "this replica and the llama.cpp binding it runs")
        info.add_metric([], {"llama_cpp_python": _version("llama_cpp_python")})
        yield info


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"


def build_registry(backend) -> CollectorRegistry:
    """A registry of this backend's metrics plus the process's CPU, memory and file handles,
    every series labelled with the replica's name."""
    registry = ReplicaRegistry(backend.config.REPLICA_NAME)
    registry.register(BackendCollector(backend))
    registry.register(ReplicaInfo())
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry, accept: str = "") -> tuple[bytes, str]:
    """(exposition, content type) for one scrape, in the format its Accept header asks for:
    the classic text format (0.0.4) by default, OpenMetrics when the scraper prefers it."""
    encode, content_type = choose_encoder(accept)
    return encode(registry), content_type

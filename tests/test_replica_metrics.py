"""Stats across replicas: every /metrics series names its replica (REPLICA_NAME), so a fleet's
series never collide and Prometheus can add them up; on the real model.

Two apps run in this process with different names, one of them hostile (quotes, a backslash, a
newline, 10 kB, a byte that is not UTF-8): each app's exposition, classic and OpenMetrics, must
parse and carry only its own name on every sample.
"""

from __future__ import annotations

import pytest
import requests
from prometheus_client import Counter
from prometheus_client.openmetrics.parser import \
    text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_classic

from conftest import LiveServer, MODEL_NAME, build_test_app

PLAIN = "replica-a"
# Config strips the ends, so the hostile parts sit inside; \udcff is how Python hands over an
# environment byte that is not UTF-8.
HOSTILE = 'b "quoted" back\\slash\nnew line ' + "x" * 10_000 + " \udcff end"
HOSTILE_EXPOSED = HOSTILE.replace("\udcff", "\\udcff")
OPENMETRICS = "application/openmetrics-text; version=1.0.0, text/plain;q=0.5"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, model_file, model_registry):
    """Two live apps named PLAIN and HOSTILE; PLAIN generates twice, HOSTILE once."""
    servers = {}
    for name in (PLAIN, HOSTILE):
        app = build_test_app(tmp_path_factory.mktemp("replica"), model_file, model_registry,
                             REPLICA_NAME=name)
        servers[name] = LiveServer(app)
    usage = {name: [] for name in servers}
    for name, prompts in ((PLAIN, ("The sky is", "Water is")), (HOSTILE, ("Grass is",))):
        for prompt in prompts:
            reply = servers[name].generate(prompt=prompt, max_tokens=6, temperature=0)
            assert reply.status_code == 200, reply.text
            usage[name].append(reply.json()["usage"]["completion_tokens"])
    yield servers, usage
    for server in servers.values():
        server.stop()
        server.app.extensions["llm"].close()


def scrape(server, accept: str = "") -> list:
    """Every sample of one /metrics reply, parsed by prometheus_client's own parser."""
    reply = requests.get(f"{server.url}/metrics", headers={"Accept": accept}, timeout=30)
    assert reply.status_code == 200
    if accept:
        assert reply.headers["Content-Type"].startswith("application/openmetrics-text")
        families = parse_openmetrics(reply.text)
    else:
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        families = parse_classic(reply.text)
    return [sample for family in families for sample in family.samples]


@pytest.mark.parametrize("accept", ["", OPENMETRICS], ids=["classic", "openmetrics"])
def test_every_sample_of_each_replica_carries_its_own_name_only(fleet, accept):
    servers, _ = fleet
    for name, exposed in ((PLAIN, PLAIN), (HOSTILE, HOSTILE_EXPOSED)):
        samples = scrape(servers[name], accept)
        assert {sample.labels.get("replica") for sample in samples} == {exposed}
        names = {sample.name for sample in samples}
        # the app's own series, the process collector's and the info series all went through
        assert {"llm_completion_tokens_total", "llm_queue_depth", "process_cpu_seconds_total",
                "process_resident_memory_bytes", "llm_replica_info"} <= names


def test_the_info_series_names_the_replica_and_its_llama_cpp(fleet):
    servers, _ = fleet
    [info] = [s for s in scrape(servers[PLAIN]) if s.name == "llm_replica_info"]
    assert info.value == 1
    assert info.labels["replica"] == PLAIN
    assert info.labels["llama_cpp_python"].split(".")[0].isdigit()


def test_a_metric_registered_later_gets_the_label_too(fleet):
    servers, _ = fleet
    later = Counter("test_registered_later", "a metric no code of the app knows about",
                    ["kind"], registry=servers[PLAIN].backend.metrics)
    later.labels("example").inc(3)
    [sample] = [s for s in scrape(servers[PLAIN]) if s.name == "test_registered_later_total"]
    assert (sample.labels, sample.value) == ({"kind": "example", "replica": PLAIN}, 3)


def test_the_fleets_series_never_collide_and_add_up_to_the_tokens_generated(fleet):
    """What `sum(llm_completion_tokens_total)` and `sum by (replica)` compute in Prometheus."""
    servers, usage = fleet
    scraped = {name: scrape(server) for name, server in servers.items()}
    keys = [(s.name, frozenset(s.labels.items())) for samples in scraped.values() for s in samples]
    assert len(keys) == len(set(keys))
    by_replica: dict[str, float] = {}
    for samples in scraped.values():
        for sample in samples:
            if sample.name == "llm_completion_tokens_total":
                assert sample.labels["model"] == MODEL_NAME
                replica = sample.labels["replica"]
                by_replica[replica] = by_replica.get(replica, 0) + sample.value
    assert by_replica == {PLAIN: sum(usage[PLAIN]), HOSTILE_EXPOSED: sum(usage[HOSTILE])}
    assert sum(by_replica.values()) == sum(map(sum, usage.values())) > 0


def test_stats_names_the_replica(fleet):
    servers, _ = fleet
    for name, server in servers.items():
        stats = requests.get(f"{server.url}/stats", timeout=10).json()
        assert stats["replica"] == name

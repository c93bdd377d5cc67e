"""GET /dashboard in a real headless Chromium: it loads offline, polls, and draws live charts.

The screenshot goes to tests/artifacts/dashboard.png (git-ignored) for a person to look at.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import requests

from browser import Chromium, find_chromium

ARTIFACTS = Path(__file__).parent / "artifacts"

# Per chart: points held, non-null values, the largest value, and pixels the series inked.
CHART_FIGURES = """
Object.fromEntries(Object.entries(window.dashboard.charts).map(([id, chart]) => {
  const values = chart.values.flat().filter((v) => v !== null);
  return [id, {points: chart.pointCount, values: values.length, max: Math.max(0, ...values)}];
}))
"""


@pytest.fixture
def browser(tmp_path):
    binary = find_chromium()
    if binary is None:
        pytest.skip("no Chromium on this machine: `make test` installs the Debian package "
                    "`chromium` when run as root with apt-get; elsewhere install it by hand")
    chromium = Chromium(binary, tmp_path / "chromium-profile")
    yield chromium
    chromium.close()


def traffic(server, rounds: int = 6) -> None:
    """Two clients generating side by side, plus a bad request per round."""
    def client(offset: int) -> None:
        for i in range(rounds):
            server.generate(prompt=f"Tell me about the number {i + offset}", max_tokens=24)
            requests.post(f"{server.url}/api/v1/generate", json={"prompt": ""}, timeout=30)

    threads = [threading.Thread(target=client, args=(n,)) for n in (0, 100)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_dashboard_draws_live_charts_after_traffic(live, browser):
    server = live()
    page = requests.get(f"{server.url}/dashboard", timeout=10).text
    assert "http://" not in page.replace(server.url, "") and "https://" not in page  # no CDN
    browser.open(f"{server.url}/dashboard?interval=500")
    assert browser.wait_for("window.dashboard && window.dashboard.polls >= 2")
    traffic(server)
    assert browser.wait_for("window.dashboard.polls >= 12 && window.dashboard.charts.requests"
                            ".values[0].slice(-2).every((v) => v === 0)", timeout=30)
    charts = browser.evaluate(CHART_FIGURES)
    browser.screenshot(ARTIFACTS / "dashboard.png")
    assert set(charts) == {"requests", "tokens", "queue", "latency", "models", "slots"}
    for name, figures in charts.items():
        assert figures["points"] >= 12 and figures["values"] > 0, (name, figures)
    for name in ("requests", "tokens", "latency", "models", "queue", "slots"):
        assert charts[name]["max"] > 0, (name, charts[name])
    assert browser.evaluate("window.dashboard.errors") == 0
    assert browser.evaluate("document.getElementById('fig-total').textContent") == "24"
    assert "gemma-3-270m-q4_k_m.gguf" in browser.evaluate(
        "document.getElementById('loaded').textContent")
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000


def test_dashboard_lists_model_events_live(live, browser):
    server = live()
    browser.open(f"{server.url}/dashboard?interval=500")
    assert browser.wait_for("window.dashboard && window.dashboard.events.connected")
    server.generate(prompt="Hi", max_tokens=2)                    # loads the model
    unload = requests.post(f"{server.url}/api/v1/models/gemma-3-270m-q4_k_m.gguf/unload",
                           timeout=30)
    assert unload.status_code == 200
    assert browser.wait_for("window.dashboard.events.received.map((e) => e.kind).join() === "
                            "'loading,loaded,unloaded'", timeout=30)
    shown = browser.evaluate("document.getElementById('events').textContent")
    assert "unloaded" in shown and "gemma-3-270m-q4_k_m.gguf (admin)" in shown


def test_dashboard_polls_every_two_seconds_by_default(live, browser):
    server = live()
    browser.open(f"{server.url}/dashboard")
    assert browser.wait_for("window.dashboard && window.dashboard.polls >= 1")
    assert browser.evaluate("window.dashboard.interval") == 2000

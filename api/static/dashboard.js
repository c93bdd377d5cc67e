/* The /dashboard page: polls /stats and /stats/concurrency and charts them with tinychart.js,
 * and lists model events (loads, unloads, uploads, deletes) live from /api/v1/models/events.
 *
 * Rates (requests/s, tokens/s) are differences of the server's lifetime counters between two
 * polls, so they are exact whatever the poll interval. `window.dashboard` exposes the state
 * (polls, errors, charts) for scripts and the browser test.
 */
(function () {
  "use strict";

  const params = new URLSearchParams(location.search);
  const interval = Math.max(250, Number(params.get("interval")) || 2000);
  const charts = {};
  const state = {interval, polls: 0, errors: 0, lastError: null, charts, previous: null};
  window.dashboard = state;

  function chart(id, unit, series) {
    charts[id] = new TinyChart.LineChart(document.getElementById(id), {series, unit});
  }

  chart("requests", "req/s", [{name: "all", color: "#1f5fbf"}, {name: "ok", color: "#16794a"},
                              {name: "errors", color: "#b42318"}]);
  chart("tokens", "tok/s", [{name: "generated", color: "#7a3fbf"}, {name: "prompt", color: "#c07a00"}]);
  chart("queue", "", [{name: "queued", color: "#b42318"}, {name: "active", color: "#16794a"},
                      {name: "in flight", color: "#5b6475"}]);
  chart("latency", "ms", [{name: "p50", color: "#1f5fbf"}, {name: "p95", color: "#b42318"},
                          {name: "TTFT p50", color: "#16794a"}]);
  chart("models", "", [{name: "models", color: "#1f5fbf"}, {name: "instances", color: "#7a3fbf"},
                       {name: "in use", color: "#16794a"}]);
  chart("slots", "", [{name: "slots busy", color: "#16794a"}, {name: "slots", color: "#5b6475"},
                      {name: "sequences per step", color: "#7a3fbf"}]);

  function headers() {
    const key = sessionStorage.getItem("llm_api_key");
    return key ? {Authorization: "Bearer " + key} : {};
  }

  async function fetchJson(path) {
    const reply = await fetch(path, {headers: headers(), cache: "no-store"});
    if (reply.status === 401) {
      document.getElementById("auth").hidden = false;
      throw new Error("an API key is needed");
    }
    if (!reply.ok) throw new Error(`${path}: HTTP ${reply.status}`);
    return reply.json();
  }

  function rate(now, before, field, seconds) {
    if (!before || seconds <= 0) return null;
    return Math.max(0, (field(now) - field(before)) / seconds);
  }

  function update(stats, concurrency) {
    const t = Date.now();
    const before = state.previous;
    const seconds = before ? (t - before.t) / 1000 : 0;
    const errors = (s) => s.requests.failed + s.requests.rejected + s.requests.timed_out;
    charts.requests.push(t, [rate(stats, before?.stats, (s) => s.requests.total, seconds),
                             rate(stats, before?.stats, (s) => s.requests.succeeded, seconds),
                             rate(stats, before?.stats, errors, seconds)]);
    charts.tokens.push(t, [rate(stats, before?.stats, (s) => s.tokens.completion, seconds),
                           rate(stats, before?.stats, (s) => s.tokens.prompt, seconds)]);
    charts.queue.push(t, [concurrency.queued, concurrency.active, concurrency.in_flight]);
    charts.latency.push(t, [stats.latency_ms.p50, stats.latency_ms.p95, stats.ttft_ms.p50]);
    const loaded = stats.loaded_models;
    charts.models.push(t, [loaded.length, loaded.reduce((n, m) => n + m.instances, 0),
                           loaded.reduce((n, m) => n + m.in_use, 0)]);
    const engines = concurrency.engines;
    const widths = engines.map((e) => e.sequences_per_step).filter((w) => w !== null);
    charts.slots.push(t, [concurrency.slots.busy, concurrency.slots.total,
                          widths.length ? Math.max(...widths) : null]);
    state.previous = {t, stats};
    showFigures(stats, concurrency);
  }

  function showFigures(stats, concurrency) {
    const r = stats.requests;
    const figures = {
      uptime: formatUptime(stats.uptime_seconds), total: r.total, succeeded: r.succeeded,
      failed: r.failed, rejected: r.rejected, timed_out: r.timed_out,
      speed: TinyChart.formatValue(stats.tokens_per_second.recent),
      in_flight: `${concurrency.in_flight} / ${concurrency.limits.MAX_CONCURRENT_REQUESTS}`,
      workers: `${concurrency.workers.busy} / ${concurrency.workers.max}`,
      slots: `${concurrency.slots.busy} / ${concurrency.slots.total}`,
    };
    for (const [id, value] of Object.entries(figures)) {
      document.getElementById("fig-" + id).textContent = value;
    }
    document.getElementById("loaded").textContent = stats.loaded_models.length
      ? stats.loaded_models.map((m) => `${m.name} (${m.instances} loaded, ${m.in_use} in use)`).join(", ")
      : "no model loaded yet";
  }

  function formatUptime(seconds) {
    const s = Math.floor(seconds);
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
    return h ? `${h}h ${m}m` : m ? `${m}m ${s % 60}s` : `${s}s`;
  }

  async function poll() {
    try {
      const [stats, concurrency] = await Promise.all([fetchJson("/stats"),
                                                      fetchJson("/stats/concurrency")]);
      update(stats, concurrency);
      state.polls += 1;
      document.getElementById("status").textContent =
        `updated ${new Date().toTimeString().slice(0, 8)}, every ${interval / 1000} s`;
    } catch (error) {
      state.errors += 1;
      state.lastError = String(error);
      document.getElementById("status").textContent = "not updating: " + error.message;
    } finally {
      setTimeout(poll, interval);
    }
  }

  document.getElementById("auth").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem("llm_api_key", document.getElementById("key").value);
    document.getElementById("auth").hidden = true;
  });
  window.addEventListener("resize", () => Object.values(charts).forEach((c) => c.draw()));

  // Model events: the SSE stream read with fetch(), not EventSource, which cannot send the
  // Authorization header; after a break it reconnects with Last-Event-ID and catches up.
  const events = {received: [], connected: false, lastId: null, connections: 0};
  state.events = events;
  const EVENTS_SHOWN = 100, EVENTS_RETRY_MS = 3000;

  function eventsStatus(text) {
    document.getElementById("events-status").textContent = text;
  }

  function describeEvent(event) {
    const extra = [event.variant, event.reason, event.source,
                   event.load_seconds === undefined ? null : `${event.load_seconds} s`,
                   event.error].filter((part) => part);
    return event.model + (extra.length ? ` (${extra.join(", ")})` : "");
  }

  function showEvent(event) {
    events.received.push(event);
    if (events.received.length > EVENTS_SHOWN) events.received.shift();
    document.getElementById("no-events")?.remove();
    const item = document.createElement("li");
    const time = document.createElement("time");
    time.textContent = String(event.at).slice(11, 19);
    const kind = document.createElement("span");
    kind.className = "kind " + event.kind;
    kind.textContent = event.kind;
    item.append(time, kind, document.createTextNode(describeEvent(event)));
    const list = document.getElementById("events");
    list.prepend(item);
    while (list.children.length > EVENTS_SHOWN) list.lastChild.remove();
  }

  function handleFrame(frame) {
    let id = null, data = "";
    for (const line of frame.split("\n")) {
      if (line.startsWith("id: ")) id = Number(line.slice(4));
      else if (line.startsWith("data: ")) data += line.slice(6);
    }
    if (!data) return;                       // a heartbeat comment or the retry hint
    if (id !== null) events.lastId = id;
    showEvent(JSON.parse(data));
  }

  async function followEvents() {
    const sent = headers();
    if (events.lastId !== null) sent["Last-Event-ID"] = String(events.lastId);
    try {
      const reply = await fetch("/api/v1/models/events", {headers: sent, cache: "no-store"});
      if (reply.status === 401) {
        document.getElementById("auth").hidden = false;
        throw new Error("an API key is needed");
      }
      if (!reply.ok) throw new Error(`HTTP ${reply.status}`);
      events.connected = true;
      events.connections += 1;
      eventsStatus("live");
      const reader = reply.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buffer += value;
        for (let end; (end = buffer.indexOf("\n\n")) >= 0; buffer = buffer.slice(end + 2)) {
          handleFrame(buffer.slice(0, end));
        }
      }
      eventsStatus("reconnecting…");
    } catch (error) {
      eventsStatus("not connected: " + error.message);
    } finally {
      events.connected = false;
      setTimeout(followEvents, EVENTS_RETRY_MS);
    }
  }

  poll();
  followEvents();
})();

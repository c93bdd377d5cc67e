/* tinychart.js: a small, dependency-free canvas line chart for the /dashboard page.
 *
 * Served by the app itself so the dashboard works offline (no CDN). One chart draws a few
 * series sharing a time axis; values scroll off after `maxPoints`; null leaves a gap.
 *
 *   const chart = new TinyChart.LineChart(canvas, {series: [{name: "p50", color: "#1f5fbf"}],
 *                                                  unit: "ms", maxPoints: 150});
 *   chart.push(Date.now(), [123.4]);   // then it redraws itself
 */
(function (global) {
  "use strict";

  const PAD = {left: 44, right: 12, top: 26, bottom: 22};

  function niceMax(value) {
    if (!(value > 0)) return 1;
    const power = Math.pow(10, Math.floor(Math.log10(value)));
    for (const step of [1, 2, 4, 6, 8, 10]) {  // quarters stay round numbers
      if (value <= step * power) return step * power;
    }
    return 10 * power;
  }

  function formatValue(value) {
    if (value === null || value === undefined || Number.isNaN(value)) return "–";
    const abs = Math.abs(value);
    if (abs >= 1e9) return (value / 1e9).toFixed(1) + "G";
    if (abs >= 1e6) return (value / 1e6).toFixed(1) + "M";
    if (abs >= 1e4) return (value / 1e3).toFixed(0) + "k";
    if (abs >= 100 || Number.isInteger(value)) return value.toFixed(0);
    return value.toFixed(abs >= 10 ? 1 : 2);
  }

  /** An axis label: at most 3 significant digits, no trailing zeros. */
  function formatTick(value) {
    if (value >= 1e4) return formatValue(value);
    return String(Number(value.toPrecision(3)));
  }

  function formatTime(ms) {
    return new Date(ms).toTimeString().slice(0, 8);
  }

  class LineChart {
    constructor(canvas, options) {
      this.canvas = canvas;
      this.series = options.series;
      this.unit = options.unit || "";
      this.maxPoints = options.maxPoints || 150;
      this.times = [];
      this.values = this.series.map(() => []);
    }

    /** Add one point per series (null for "no value") at time `t` (ms) and redraw. */
    push(t, values) {
      this.times.push(t);
      this.series.forEach((_, i) => this.values[i].push(values[i] ?? null));
      if (this.times.length > this.maxPoints) {
        this.times.shift();
        this.values.forEach((list) => list.shift());
      }
      this.draw();
    }

    /** Points held, and how many of them are non-null in any series (for tests and status). */
    get pointCount() {
      return this.times.length;
    }

    get valueCount() {
      return this.values.reduce((n, list) => n + list.filter((v) => v !== null).length, 0);
    }

    draw() {
      const ctx = this._context();
      const {width, height} = this.canvas.getBoundingClientRect();
      ctx.clearRect(0, 0, width, height);
      const plot = {x: PAD.left, y: PAD.top, w: width - PAD.left - PAD.right,
                    h: height - PAD.top - PAD.bottom};
      const all = this.values.flat().filter((v) => v !== null);
      const top = niceMax(Math.max(0, ...all));
      this._grid(ctx, plot, top);
      this._timeLabels(ctx, plot);
      this.series.forEach((s, i) => this._line(ctx, plot, top, this.values[i], s.color));
      this._legend(ctx, plot);
    }

    _context() {
      const ratio = global.devicePixelRatio || 1;
      const {width, height} = this.canvas.getBoundingClientRect();
      if (this.canvas.width !== Math.round(width * ratio)) {
        this.canvas.width = Math.round(width * ratio);
        this.canvas.height = Math.round(height * ratio);
      }
      const ctx = this.canvas.getContext("2d");
      ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
      ctx.font = "11px system-ui, sans-serif";
      return ctx;
    }

    _grid(ctx, plot, top) {
      ctx.strokeStyle = "#e3e6ec";
      ctx.fillStyle = "#5b6475";
      ctx.lineWidth = 1;
      ctx.textAlign = "right";
      ctx.textBaseline = "middle";
      for (let i = 0; i <= 4; i++) {
        const y = plot.y + plot.h - (plot.h * i) / 4;
        ctx.beginPath();
        ctx.moveTo(plot.x, Math.round(y) + 0.5);
        ctx.lineTo(plot.x + plot.w, Math.round(y) + 0.5);
        ctx.stroke();
        ctx.fillText(formatTick((top * i) / 4), plot.x - 6, y);
      }
      if (this.unit) {  // above the axis labels, clear of the legend
        ctx.textBaseline = "bottom";
        ctx.fillText(this.unit, plot.x - 6, plot.y - 8);
      }
    }

    _timeLabels(ctx, plot) {
      if (!this.times.length) return;
      ctx.fillStyle = "#5b6475";
      ctx.textBaseline = "top";
      const step = plot.w / Math.max(1, this.maxPoints - 1);
      const first = plot.x + (this.maxPoints - this.times.length) * step;  // the oldest point
      if (plot.x + plot.w - first > 110) {  // room for both labels
        ctx.textAlign = "left";
        ctx.fillText(formatTime(this.times[0]), first, plot.y + plot.h + 6);
      }
      ctx.textAlign = "right";
      ctx.fillText(formatTime(this.times[this.times.length - 1]), plot.x + plot.w, plot.y + plot.h + 6);
    }

    _line(ctx, plot, top, values, color) {
      const step = plot.w / Math.max(1, this.maxPoints - 1);
      const offset = this.maxPoints - values.length;
      ctx.strokeStyle = color;
      ctx.fillStyle = color;
      ctx.lineWidth = 2;
      ctx.beginPath();
      let drawing = false;
      values.forEach((value, i) => {
        if (value === null) { drawing = false; return; }
        const x = plot.x + (offset + i) * step;
        const y = plot.y + plot.h - (plot.h * value) / top;
        if (drawing) ctx.lineTo(x, y); else ctx.moveTo(x, y);
        drawing = true;
      });
      ctx.stroke();
      const last = values.length - 1;
      if (last >= 0 && values[last] !== null) {
        ctx.beginPath();
        ctx.arc(plot.x + (offset + last) * step, plot.y + plot.h - (plot.h * values[last]) / top,
                2.5, 0, 2 * Math.PI);
        ctx.fill();
      }
    }

    _legend(ctx, plot) {
      let x = plot.x;
      ctx.textAlign = "left";
      ctx.textBaseline = "middle";
      this.series.forEach((s, i) => {
        const list = this.values[i];
        const label = `${s.name} ${formatValue(list.length ? list[list.length - 1] : null)}`;
        ctx.fillStyle = s.color;
        ctx.fillRect(x, 8, 10, 10);
        ctx.fillStyle = "#1d2330";
        ctx.fillText(label, x + 14, 13);
        x += ctx.measureText(label).width + 30;
      });
    }
  }

  global.TinyChart = {LineChart, formatValue};
})(window);

// Draws the Monitor charts from the series the page embeds (#metric-series) with Chart.js.
(function () {
  "use strict";

  function draw() {
    var source = document.getElementById("metric-series");
    if (!source || !window.Chart) return;
    var s = JSON.parse(source.textContent);
    var labels = s.time.map(function (t) {
      var d = new Date(t);
      return d.toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
    });
    var css = getComputedStyle(document.documentElement);
    var text = css.getPropertyValue("--bs-body-color") || "#212529";
    var grid = css.getPropertyValue("--bs-border-color") || "#dee2e6";
    Chart.defaults.color = text.trim();
    Chart.defaults.borderColor = grid.trim();
    Chart.defaults.animation = false;
    var common = { responsive: true, maintainAspectRatio: false, interaction: { mode: "index", intersect: false },
                   scales: { x: { ticks: { maxTicksLimit: 8 } }, y: { beginAtZero: true } } };
    var charts = {
      calls: { type: "bar", data: { labels: labels, datasets: [
        { label: "Invocations", data: s.invocations, backgroundColor: "#0d6efd" },
        { label: "Errors", data: s.errors, backgroundColor: "#dc3545" }] } },
      latency: { type: "line", data: { labels: labels, datasets: [
        { label: "p50", data: s.p50_ms, borderColor: "#198754", spanGaps: true, pointRadius: 0 },
        { label: "p95", data: s.p95_ms, borderColor: "#fd7e14", spanGaps: true, pointRadius: 0 },
        { label: "p99", data: s.p99_ms, borderColor: "#dc3545", spanGaps: true, pointRadius: 0 }] } },
      instances: { type: "bar", data: { labels: labels, datasets: [
        { label: "Cold starts", data: s.cold_starts, backgroundColor: "#0dcaf0" },
        { label: "Max instances", data: s.max_instances, type: "line", borderColor: "#6f42c1", pointRadius: 0 }] } },
      usage: { type: "line", data: { labels: labels, datasets: [
        { label: "GB-s", data: s.gb_seconds, borderColor: "#20c997", fill: true, pointRadius: 0 }] } },
    };
    document.querySelectorAll("canvas[data-chart]").forEach(function (canvas) {
      var spec = charts[canvas.dataset.chart];
      if (!spec) return;
      canvas.parentElement.style.height = "200px";
      new Chart(canvas, { type: spec.type, data: spec.data, options: common });
      canvas.dataset.drawn = "yes";
    });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", draw);
  else draw();
})();

// tandem ops dashboard: polls /dashboard/api/state once a second, fills the
// node tables and draws the charts on <canvas> (no libraries).
"use strict";
(function () {
  const STATE_URL = "/dashboard/api/state";
  const WINDOW_S = 300;
  const COLORS = ["#58a6ff", "#3fb950", "#f0883e", "#a371f7", "#f85149"];

  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    if (attrs) for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function fmtNum(v, digits) {
    if (v === null || v === undefined || !isFinite(v)) return "–";
    if (Math.abs(v) >= 1000) return (v / 1000).toFixed(1) + "k";
    return v.toFixed(digits === undefined ? 1 : digits);
  }

  function fmtSecs(v) {
    if (v === null || v === undefined || !isFinite(v)) return "–";
    if (v < 1e-3) return (v * 1e6).toFixed(0) + " µs";
    if (v < 1) return (v * 1e3).toFixed(v < 0.01 ? 2 : 1) + " ms";
    return v.toFixed(2) + " s";
  }

  // ---- node tables -------------------------------------------------------

  function kvBar(n) {
    const total = n.total_blocks || 0;
    const used = Math.max(0, total - n.free_blocks);
    const wrap = el("span");
    const bar = el("span", { class: "bar", title: used + " used, " + n.cached_blocks + " cached, " + n.free_blocks + " free" });
    if (total > 0) {
      // Held by requests (blue), then held by the prefix cache (purple).
      const cached = Math.min(n.cached_blocks || 0, used);
      const active = used - cached;
      const u = el("span", { class: "used" });
      u.style.width = (100 * active / total).toFixed(1) + "%";
      bar.appendChild(u);
      const c = el("span", { class: "cached" });
      c.style.left = (100 * active / total).toFixed(1) + "%";
      c.style.width = (100 * cached / total).toFixed(1) + "%";
      bar.appendChild(c);
    }
    wrap.appendChild(bar);
    const pct = total > 0 ? " (" + (100 * used / total).toFixed(0) + "%)" : "";
    wrap.appendChild(el("span", { class: "bar-label" }, used + " / " + total + pct));
    return wrap;
  }

  function fillTable(role, nodes) {
    const body = document.querySelector("#nodes-" + role + " tbody");
    const rows = nodes.filter((n) => n.role === role);
    body.replaceChildren();
    if (rows.length === 0) {
      const tr = el("tr");
      tr.appendChild(el("td", { class: "empty", colspan: "8" }, "no " + role + " workers"));
      body.appendChild(tr);
      return;
    }
    for (const n of rows) {
      const tr = el("tr", { class: "node", "data-role": role, "data-addr": n.addr, "data-healthy": String(n.healthy) });
      tr.appendChild(el("td", { class: "addr" }, n.addr));
      const h = el("td");
      h.appendChild(el("span", { class: "health " + (n.healthy ? "up" : "down") }, n.healthy ? "healthy" : "down"));
      tr.appendChild(h);
      tr.appendChild(el("td", null, String(n.in_flight)));
      tr.appendChild(el("td", null, String(n.running)));
      tr.appendChild(el("td", null, String(n.waiting)));
      const kv = el("td");
      kv.appendChild(kvBar(n));
      tr.appendChild(kv);
      tr.appendChild(el("td", null, String(n.free_blocks)));
      tr.appendChild(el("td", null, String(n.cached_blocks)));
      body.appendChild(tr);
    }
  }

  function fillSummary(state) {
    const s = state.series;
    const last = s.length ? s[s.length - 1] : null;
    const recent = s.slice(-10);
    const avg = (k) => {
      const v = recent.map((x) => x[k]).filter((x) => x !== null && x !== undefined);
      return v.length ? v.reduce((a, b) => a + b, 0) / v.length : null;
    };
    const healthy = state.nodes.filter((n) => n.healthy).length;
    const cards = [
      ["nodes healthy", healthy + " / " + state.nodes.length],
      ["tokens/s", fmtNum(last ? last.tokens_per_s : null)],
      ["requests/s", fmtNum(last ? last.requests_per_s : null, 2)],
      ["TTFT p50 (10 s)", fmtSecs(avg("ttft_p50_s"))],
      ["TPOT p50 (10 s)", fmtSecs(last ? last.tpot_p50_s : null)],
    ];
    const box = document.getElementById("summary");
    box.replaceChildren();
    for (const [k, v] of cards) {
      const c = el("div", { class: "card" });
      c.appendChild(el("div", { class: "k" }, k));
      c.appendChild(el("div", { class: "v" }, v));
      box.appendChild(c);
    }
  }

  // ---- charts ------------------------------------------------------------

  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  // lines: [{label, key, scale}], fmt: value formatter for the axis.
  function drawChart(canvas, series, lines, fmt) {
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(200, canvas.clientWidth || 400);
    const h = Math.max(120, canvas.clientHeight || 200);
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const pad = { l: 58, r: 10, t: 22, b: 22 };
    const pw = w - pad.l - pad.r, ph = h - pad.t - pad.b;

    const tEnd = series.length ? series[series.length - 1].t_ms : Date.now();
    const tStart = tEnd - WINDOW_S * 1000;
    let maxV = 0, points = 0;
    for (const s of series) {
      for (const ln of lines) {
        const v = s[ln.key];
        if (v !== null && v !== undefined && isFinite(v)) { maxV = Math.max(maxV, v); points++; }
      }
    }
    const yMax = niceMax(maxV);
    const x = (t) => pad.l + pw * (t - tStart) / (tEnd - tStart);
    const y = (v) => pad.t + ph * (1 - v / yMax);

    // grid and axes
    ctx.font = "11px system-ui, sans-serif";
    ctx.lineWidth = 1;
    ctx.strokeStyle = "#2a333d";
    ctx.fillStyle = "#8a96a3";
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let i = 0; i <= 4; i++) {
      const v = yMax * i / 4, yy = Math.round(y(v)) + 0.5;
      ctx.beginPath(); ctx.moveTo(pad.l, yy); ctx.lineTo(pad.l + pw, yy); ctx.stroke();
      ctx.fillText(fmt(v), pad.l - 6, yy);
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (let s = WINDOW_S; s >= 0; s -= 60) {
      const xx = Math.round(x(tEnd - s * 1000)) + 0.5;
      ctx.beginPath(); ctx.moveTo(xx, pad.t); ctx.lineTo(xx, pad.t + ph); ctx.stroke();
      ctx.fillText(s === 0 ? "now" : "-" + s + "s", xx, pad.t + ph + 5);
    }

    // lines (gaps where a value is null)
    lines.forEach((ln, i) => {
      ctx.strokeStyle = COLORS[i % COLORS.length];
      ctx.lineWidth = 1.5;
      ctx.beginPath();
      let pen = false, lone = null;
      for (const s of series) {
        const v = s[ln.key];
        if (v === null || v === undefined || !isFinite(v) || s.t_ms < tStart) { pen = false; continue; }
        const px = x(s.t_ms), py = y(v);
        if (pen) ctx.lineTo(px, py); else { ctx.moveTo(px, py); lone = [px, py]; }
        pen = true;
      }
      ctx.stroke();
      // Mark isolated points so a single sample is visible.
      ctx.fillStyle = ctx.strokeStyle;
      if (lone) { ctx.beginPath(); ctx.arc(lone[0], lone[1], 1.5, 0, 2 * Math.PI); ctx.fill(); }
      // legend
      ctx.textAlign = "left";
      ctx.textBaseline = "top";
      const lx = pad.l + 6 + i * 110;
      ctx.fillRect(lx, 6, 10, 3);
      ctx.fillStyle = "#d8dee6";
      ctx.fillText(ln.label, lx + 14, 2);
    });

    if (series.length === 0) {
      ctx.fillStyle = "#8a96a3";
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      ctx.fillText("waiting for samples…", pad.l + pw / 2, pad.t + ph / 2);
    }
    canvas.setAttribute("data-points", String(points));
    canvas.setAttribute("data-samples", String(series.length));
    canvas.setAttribute("data-rendered", series.length > 0 ? "true" : "false");
  }

  function drawCharts(series) {
    drawChart(document.getElementById("chart-throughput"), series,
      [{ label: "tokens/s", key: "tokens_per_s" }, { label: "requests/s", key: "requests_per_s" }],
      (v) => fmtNum(v, v < 10 ? 1 : 0));
    drawChart(document.getElementById("chart-ttft"), series,
      [{ label: "p50", key: "ttft_p50_s" }, { label: "p99", key: "ttft_p99_s" }, { label: "mean", key: "ttft_mean_s" }],
      fmtSecs);
    drawChart(document.getElementById("chart-tpot"), series,
      [{ label: "p50", key: "tpot_p50_s" }, { label: "p99", key: "tpot_p99_s" }, { label: "mean", key: "tpot_mean_s" }],
      fmtSecs);
  }

  // ---- polling -----------------------------------------------------------

  let last = null;
  const status = document.getElementById("status");

  async function refresh() {
    try {
      const r = await fetch(STATE_URL, { cache: "no-store" });
      if (!r.ok) throw new Error("HTTP " + r.status);
      const state = await r.json();
      last = state;
      fillTable("decode", state.nodes);
      fillTable("prefill", state.nodes);
      fillSummary(state);
      drawCharts(state.series);
      status.className = "status";
      status.textContent = "updated " + new Date().toLocaleTimeString() + " · " + state.series.length + " samples";
      document.body.setAttribute("data-loaded", "true");
    } catch (e) {
      status.className = "status err";
      status.textContent = "cannot reach the router: " + e.message;
    }
  }

  window.addEventListener("resize", () => { if (last) drawCharts(last.series); });
  refresh();
  setInterval(refresh, 1000);
})();

// gepo-swarm monitor page: polls /api/state (node/web/dashboard.py) and redraws the tiles, the sampler table and
// four uPlot charts. Everything shown comes from peers' records, so text goes in through textContent only.
"use strict";

const COLORS = ["#2563eb", "#d97706", "#dc2626", "#059669"];
// y ranges: accuracy is a fraction; counts and lags start at 0 (and an all-zero series still gets a small axis)
const fromZero = (u, min, max) => [0, max > 0 ? max * 1.15 : 1];
// the reward of one step is noisy (a few groups): a trailing mean over the last 10 snapshots goes beside it
const SMOOTH = 10;
function trailingMean(values) {
  const out = [];
  let sum = 0, n = 0;
  const window = [];
  for (const v of values) {
    window.push(v);
    if (v !== null && v !== undefined) { sum += v; n += 1; }
    if (window.length > SMOOTH) {
      const old = window.shift();
      if (old !== null && old !== undefined) { sum -= old; n -= 1; }
    }
    out.push(n ? sum / n : null);
  }
  return out;
}

const PLOTS = [
  { id: "plot-reward", series: [["reward_mean", "reward"], ["reward_mean", "mean of last " + SMOOTH, trailingMean]] },
  { id: "plot-accuracy", series: [["eval_accuracy", "accuracy"]], range: [0, 1] },
  { id: "plot-staleness", series: [["staleness_mean", "trained groups (mean)"], ["max_lag", "max sampler lag"]],
    range: fromZero },
  { id: "plot-rejects", series: [["rejected", "rejected"], ["stale", "dropped stale"],
                                 ["sampler_rejected", "sampler-reported"]], range: fromZero, counts: true },
];
const COUNT_STEPS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5, 1e6, 1e7];  // whole ticks
const charts = {};
let updates = 0;
let timer = null;

const $ = (id) => document.getElementById(id);

function fmt(value, digits = 0) {
  if (value === null || value === undefined) return "-";
  return digits ? Number(value).toFixed(digits) : Number(value).toLocaleString("en-US");
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  const s = Math.round(seconds);
  if (s < 120) return s + "s";
  if (s < 7200) return Math.round(s / 60) + " min";
  return (s / 3600).toFixed(1) + " h";
}

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (cls) node.className = cls;
  return node;
}

function tile(label, value, sub) {
  const box = el("div", undefined, "tile");
  box.append(el("div", label, "label"), el("div", value, "value"));
  if (sub) box.append(el("div", sub, "sub"));
  return box;
}

function renderLearner(ln) {
  const tiles = $("learner-tiles");
  const trust = $("learner-trust");
  if (!ln) {
    $("learner-key").textContent = "no heartbeat found: is the run id right and the learner running?";
    $("learner-key").title = "";
    trust.hidden = true;
    tiles.replaceChildren();
    return;
  }
  $("learner-key").textContent = ln.key.slice(0, 24) + "\u2026  peer " + ln.peer_id.slice(-8);
  $("learner-key").title = ln.key + "\npeer " + ln.peer_id;
  trust.hidden = false;
  trust.textContent = ln.pinned ? "pinned key" : "unpinned";
  trust.className = ln.pinned ? "badge" : "badge unpinned";
  tiles.replaceChildren(
    tile("version", fmt(ln.version)),
    tile("step", fmt(ln.step)),
    tile("steps/s", fmt(ln.steps_per_s, 3), ln.rate),
    tile("groups/s", fmt(ln.groups_per_s, 2)),
    tile("tokens/s", fmt(ln.tokens_per_s, 1)),
    tile("reward", fmt(ln.reward_mean, 3), "latest step"),
    tile("held-out acc.", fmt(ln.eval_accuracy, 3)),
    tile("staleness", fmt(ln.staleness_mean, 2), "mean, latest step"),
    tile("accepted", fmt(ln.accepted)),
    tile("rejected", fmt(ln.rejected)),
    tile("stale", fmt(ln.stale)),
    tile("duplicate", fmt(ln.duplicate)),
    tile("busy", fmt(ln.busy), "told to wait"),
    tile("tokens trained", fmt(ln.tokens)),
    tile("weights", fmt(ln.weights_mb, 1) + " MB"),
    tile("uptime", duration(ln.up_s)),
    tile("record age", duration(ln.age_s)),
  );
}

function renderSamplers(samplers) {
  const body = $("sampler-rows");
  $("sampler-count").textContent = samplers.length + (samplers.length === 1 ? " sampler" : " samplers");
  if (!samplers.length) {
    const row = el("tr", undefined, "empty");
    const cell = el("td", "no sampler records yet");
    cell.colSpan = 13;
    row.append(cell);
    body.replaceChildren(row);
    return;
  }
  body.replaceChildren(...samplers.map((s) => {
    const row = el("tr");
    row.dataset.key = s.key;
    if (s.age_s > 30) row.className = "old";
    row.append(
      el("td", s.key.slice(8, 20), "l mono sampler-key"), el("td", s.peer_id.slice(-8), "l mono"),
      el("td", fmt(s.version)), el("td", fmt(s.lag), s.lag > 4 ? "lag-high" : ""),
      el("td", fmt(s.groups_per_s, 2)), el("td", fmt(s.tokens_per_s, 1)), el("td", fmt(s.sent)),
      el("td", fmt(s.accepted)), el("td", fmt(s.rejected), s.rejected > 0 ? "bad" : ""), el("td", fmt(s.outbox)),
      el("td", fmt(s.down_mb)), el("td", fmt(s.up_mb)), el("td", duration(s.age_s)),
    );
    return row;
  }));
}

function clock(t, seconds) {  // local wall-clock time of a snapshot: 14:05 or 14:05:30
  const d = new Date(t * 1000);
  const pad = (n) => String(n).padStart(2, "0");
  return pad(d.getHours()) + ":" + pad(d.getMinutes()) + (seconds ? ":" + pad(d.getSeconds()) : "");
}

function chartWidth(figure) {
  return Math.max(240, figure.querySelector(".chart").clientWidth);
}

function makeChart(plot) {
  const figure = $(plot.id);
  const opts = {
    width: chartWidth(figure), height: 200,
    scales: { x: { time: true }, y: plot.range ? { range: plot.range } : {} },
    series: [{ value: (u, t) => (t === null ? "-" : clock(t, true)) }, ...plot.series.map(([, label], i) => ({
      label, stroke: COLORS[i], width: 2, spanGaps: true, points: { show: false },
    }))],
    axes: [{ stroke: "#6b7280", grid: { stroke: "#f0f1f3" }, space: 70,
             values: (u, splits) => splits.map((t) => clock(t, splits.length > 1 && splits[1] - splits[0] < 60)) },
           { stroke: "#6b7280", grid: { stroke: "#f0f1f3" }, ...(plot.counts ? { incrs: COUNT_STEPS } : {}) }],
    legend: { live: true },
  };
  return new uPlot(opts, [[], ...plot.series.map(() => [])], figure.querySelector(".chart"));
}

function renderPlots(history) {
  for (const plot of PLOTS) {
    const figure = $(plot.id);
    charts[plot.id] = charts[plot.id] || makeChart(plot);
    const data = [history.t, ...plot.series.map(([key, , derive]) => (derive ? derive(history[key]) : history[key]))];
    charts[plot.id].setData(data);
    const points = data[1].filter((v) => v !== null && v !== undefined).length;
    if (figure.dataset.firstPoints === undefined) figure.dataset.firstPoints = points;
    figure.dataset.points = points;
    figure.dataset.last = points ? String(data[1].filter((v) => v !== null).pop()) : "";
  }
}

function setStatus(kind, text) {
  $("status-dot").className = "dot " + kind;
  $("status").textContent = text;
}

async function refresh() {
  try {
    const response = await fetch("/api/state", { cache: "no-store" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    const state = await response.json();
    const snap = state.snapshot;
    $("interval").textContent = state.interval + " s";
    if (snap) {
      $("run-id").textContent = snap.run_id;
      renderLearner(snap.learner);
      renderSamplers(snap.samplers);
      setStatus(snap.learner ? "live" : "wait", snap.learner ? "live" : "waiting for the learner");
      $("updated").textContent = "Last snapshot " + new Date(snap.time * 1000).toLocaleTimeString() + ".";
    } else {
      setStatus("wait", "waiting for the first snapshot");
    }
    renderPlots(state.history);
    updates += 1;
    document.body.dataset.updates = updates;
    schedule(state.interval);
  } catch (err) {
    setStatus("lost", "monitor unreachable (" + err.message + "), retrying");
    schedule(5);
  }
}

function schedule(seconds) {
  clearTimeout(timer);
  timer = setTimeout(refresh, Math.max(1000, 1000 * seconds));
}

window.addEventListener("resize", () => {
  for (const plot of PLOTS) {
    if (charts[plot.id]) charts[plot.id].setSize({ width: chartWidth($(plot.id)), height: 200 });
  }
});

refresh();

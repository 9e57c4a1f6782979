// kappa dashboard: one EventSource on /api/stream, every update re-renders from the snapshot.
// Untrusted text (DLQ reasons, topic names) only ever goes through textContent.
"use strict";

const COLORS = { page_view: "#4e79a7", add_to_cart: "#f28e2b", purchase: "#59a14f", refund: "#e15759" };
const SPARE = ["#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];
const fmt = new Intl.NumberFormat("en-US");
const money = new Intl.NumberFormat("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 });
const compact = new Intl.NumberFormat("en-US", { notation: "compact", maximumFractionDigits: 1 });
const $ = (id) => document.getElementById(id);

let source = null;
let updates = 0;
const charts = {};

function colorOf(type, index) {
  return COLORS[type] || SPARE[index % SPARE.length];
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "style") node.style.cssText = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(child == null ? "" : String(child)));
  }
  return node;
}

function setText(id, text) {
  $(id).textContent = text;
}

function rate(value) {
  return value == null ? "–" : `${fmt.format(Math.round(value))}/s`;
}

function eta(seconds) {
  if (seconds == null) return "?";
  const s = Math.round(seconds);
  if (s >= 3600) return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
  if (s >= 60) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
  return `${s}s`;
}

function fillTable(id, rows, columns, emptyText) {
  const body = $(id).querySelector("tbody");
  body.replaceChildren();
  if (!rows.length) {
    body.append(el("tr", {}, el("td", { class: "empty", colspan: String(columns) }, emptyText)));
    return;
  }
  for (const cells of rows) {
    body.append(el("tr", {}, ...cells));
  }
}

// ------------------------------------------------------------------ view (query string <-> controls)

function currentParams() {
  const params = new URLSearchParams(location.search);
  for (const key of [...params.keys()]) if (!params.get(key)) params.delete(key);
  return params;
}

function applyControls(event) {
  const params = new URLSearchParams();
  const [pipeline, version] = ($("pipeline-select").value || "").split(":");
  if (pipeline) params.set("pipeline", pipeline);
  if (version) params.set("version", version);
  if ($("day-input").value) params.set("day", $("day-input").value);
  if ($("diff-day-input").value) params.set("diff_day", $("diff-day-input").value);
  if (event && event.target.id === "day-input") params.delete("diff_day");
  history.replaceState(null, "", `?${params}`);
  connect();
}

function syncControls(view) {
  const select = $("pipeline-select");
  const wanted = `${view.pipeline}:${view.version}`;
  const options = view.pipelines.map((p) => `${p.name}:${p.version}`);
  if ([...select.options].map((o) => o.value).join() !== options.join()) {
    select.replaceChildren(
      ...view.pipelines.map((p) => {
        const promoted = p.name === view.pipeline && p.version === view.current_version ? " (promoted)" : "";
        return el("option", { value: `${p.name}:${p.version}` }, `${p.name} v${p.version}${promoted}`);
      }),
    );
  }
  if (document.activeElement !== select) select.value = wanted;
  if (document.activeElement !== $("day-input")) $("day-input").value = view.day;
  if (document.activeElement !== $("diff-day-input")) $("diff-day-input").value = view.diff_day;
}

// ------------------------------------------------------------------ charts

function chartFor(id, types, series, unit) {
  const container = $(id);
  const signature = types.join(",");
  const width = Math.max(container.clientWidth, 300);
  if (!charts[id] || charts[id].signature !== signature) {
    if (charts[id]) charts[id].plot.destroy();
    const opts = {
      width,
      height: 240,
      tzDate: (ts) => uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC"),
      // at least 15 minutes wide: one minute of data must not stretch the axis over years
      scales: { x: { time: true, range: (u, min, max) => [Math.min(min, max - 840), max + 60] } },
      axes: [{}, { values: (u, ticks) => ticks.map((v) => compact.format(v)), size: 56 }],
      series: [{ label: "minute (UTC)" }, ...types.map((t, i) => ({ label: t, stroke: colorOf(t, i), width: 1.5 }))],
    };
    charts[id] = { plot: new uPlot(opts, [[], ...types.map(() => [])], container), signature };
  }
  const data = [series.x, ...types.map((t) => series[unit === "$" ? "amount" : "events"][t] || [])];
  charts[id].plot.setData(data);
  if (charts[id].plot.width !== width) charts[id].plot.setSize({ width, height: 240 });
}

// ------------------------------------------------------------------ sections

function sectionError(name, data) {
  return data && !Array.isArray(data) && data.error ? `${name}: ${data.error}` : null;
}

function renderResults(results) {
  if (results.error) return;
  const totals = results.totals;
  setText("total-events", fmt.format(totals.events));
  setText("total-windows", `${fmt.format(totals.windows)} minute${totals.windows === 1 ? "" : "s"} with data`);
  setText("total-amount", money.format(totals.amount));
  chartFor("chart-events", results.types, results.series, "#");
  chartFor("chart-amount", results.types, results.series, "$");
}

function renderProcessor(processor) {
  if (processor.error) return;
  const day = processor.day || {};
  setText("late-records", fmt.format(day.late || 0));
  setText("late-all", `${fmt.format(processor.late_all_days)} on all days · ${processor.partitions} partitions`);
}

const percent = new Intl.NumberFormat("en-US", { style: "percent", maximumFractionDigits: 2 });

function renderLateRates(processor) {
  if (processor.error || !processor.late_by_day) return;
  setText("late-threshold", `(re-run candidate above ${percent.format(processor.late_rerun_share)} late)`);
  const rows = processor.late_by_day.map((d) => [
    el("td", {}, d.day),
    el("td", { class: "num" }, fmt.format(d.records)),
    el("td", { class: "num" }, fmt.format(d.late)),
    el("td", { class: "num" }, percent.format(d.share)),
    el("td", { class: d.candidate ? "neg" : "muted" }, d.candidate ? "re-run candidate" : ""),
  ]);
  fillTable("late-table", rows, 5, "the live processor has not counted any day yet");
}

function renderDlq(dlq) {
  if (dlq.error) return;
  setText("dlq-records", fmt.format(dlq.records));
  setText("dlq-rate", `${rate(dlq.rate)} on ${dlq.topic}`);
  setText("dlq-sampled", `(newest ${fmt.format(dlq.sampled)} records)`);
  const rows = dlq.reasons.map((r) => [el("td", {}, r.reason), el("td", { class: "num" }, fmt.format(r.count))]);
  fillTable("dlq-table", rows, 2, "no dead letters");
}

function renderLag(lag, view) {
  if (lag.error) return;
  const live = lag.find((g) => g.group === view.live_group);
  setText("live-lag", live ? fmt.format(live.lag) : "–");
  setText("live-rate", live ? `${rate(live.rate)} · ${live.started ? live.group : "not started"}` : "");
  const rows = lag.map((g) => [
    el("td", {}, `${g.group}`, el("span", { class: "muted" }, ` ${g.kind}`)),
    el("td", {}, g.topic),
    el("td", { class: "num" }, fmt.format(g.consumed)),
    el("td", { class: "num" }, fmt.format(g.lag)),
    el("td", { class: "num" }, rate(g.rate)),
  ]);
  fillTable("lag-table", rows, 5, "no consumer group has committed offsets yet");
}

function progressBar(percent) {
  const bar = el("div", { class: "bar" }, el("span", { style: `width:${percent}%` }), el("em", {}, `${percent}%`));
  return el("td", {}, bar);
}

function renderReplays(replays) {
  if (replays.error) return;
  const active = replays.filter((r) => ["loading", "waiting", "consuming"].includes(r.state));
  setText("replays-running", fmt.format(active.length));
  setText("replays-note", `${fmt.format(replays.length)} known`);
  const rows = replays.map((r) => [
    el("td", {}, r.replay_id),
    el("td", {}, `${r.pipeline} v${r.version}`),
    el("td", {}, r.day),
    progressBar(r.percent),
    el("td", { class: "num" }, fmt.format(r.lag)),
    el("td", { class: "num" }, rate(r.rate)),
    el("td", {}, eta(r.eta_s)),
    el("td", {}, r.state),
  ]);
  fillTable("replay-table", rows, 8, "no replays yet — launch one from Dagster or `kappa replay load`");
}

function signed(value, format) {
  const text = format(value);
  return el("span", { class: value > 0 ? "pos" : value < 0 ? "neg" : "" }, value > 0 ? `+${text}` : text);
}

function renderDiff(diff) {
  if (diff.error) return;
  setText("diff-title", `(${diff.day}, live v${diff.live_version})`);
  if (!diff.available) {
    setText("diff-summary", `${diff.message}: run the reprocess job for that day, then compare here.`);
    fillTable("diff-table", [], 6, "nothing to compare");
    return;
  }
  const promoted = diff.promoted ? "promoted" : "not promoted";
  setText(
    "diff-summary",
    `corrected v${diff.corrected_version} (${promoted}) has ${fmt.format(diff.corrected_events)} events, ` +
      `live has ${fmt.format(diff.live_events)}: ${fmt.format(diff.windows_changed)} of ` +
      `${fmt.format(diff.windows_compared)} (minute, type) rows differ, Δ events ${fmt.format(diff.events_delta)}, ` +
      `Δ amount ${money.format(diff.amount_delta)}. Largest changes first` +
      (diff.windows_changed > diff.rows.length ? ` (${diff.rows.length} shown):` : ":"),
  );
  const rows = diff.rows.map((r) => [
    el("td", {}, r.window_start),
    el("td", {}, r.type),
    el("td", { class: "num" }, fmt.format(r.events)),
    el("td", { class: "num" }, fmt.format(r.events_live)),
    el("td", { class: "num" }, signed(r.events_delta, fmt.format)),
    el("td", { class: "num" }, signed(r.amount_delta, money.format)),
  ]);
  fillTable("diff-table", rows, 6, "live and corrected agree");
}

function renderCauses(causes) {
  if (causes.error) return;
  setText("causes-title", `(${causes.day}, v${causes.version} vs what users read)`);
  if (!causes.available) {
    setText("causes-summary", `${causes.message}: materialize version_diff for that day in Dagster.`);
    fillTable("causes-table", [], 4, "no diff stored");
    return;
  }
  const logic = causes.causes.find((c) => c.cause === "logic change");
  setText("causes-summary", logic ? `${fmt.format(logic.groups)} rows differ for no known cause (logic change).`
    : "every difference is explained by a known cause.");
  const rows = causes.causes.map((c) => [
    el("td", {}, c.cause),
    el("td", { class: "num" }, fmt.format(c.groups)),
    el("td", { class: "num" }, signed(c.events, fmt.format)),
    el("td", { class: "num" }, signed(c.amount, money.format)),
  ]);
  fillTable("causes-table", rows, 4, "no difference");
}

function render(snapshot) {
  const view = snapshot.view;
  updates += 1;
  document.body.dataset.updates = String(updates);
  syncControls(view);
  setText("updated-at", `updated ${view.generated_at.replace("T", " ").replace("+00:00", " UTC")}`);
  setText("context", `${view.pipeline} v${view.version} · day ${view.day} (UTC) · bucket ${view.bucket} · topic ${view.events_topic}`);
  renderResults(snapshot.results);
  renderProcessor(snapshot.processor);
  renderLateRates(snapshot.processor);
  renderDlq(snapshot.dlq);
  renderLag(snapshot.lag, view);
  renderReplays(snapshot.replays);
  renderDiff(snapshot.diff);
  renderCauses(snapshot.causes);
  const errors = ["results", "processor", "dlq", "lag", "replays", "diff", "causes"]
    .map((name) => sectionError(name, snapshot[name]))
    .filter(Boolean);
  setText("errors", errors.join("\n"));
}

// ------------------------------------------------------------------ stream

function connect() {
  if (source) source.close();
  source = new EventSource(`/api/stream?${currentParams()}`);
  source.addEventListener("snapshot", (event) => render(JSON.parse(event.data)));
  source.onopen = () => $("conn").classList.add("on");
  source.onerror = () => {
    $("conn").classList.remove("on");
    fetch(`/api/snapshot?${currentParams()}`)
      .then((r) => r.json())
      .then((body) => body.error && setText("errors", body.error))
      .catch(() => setText("updated-at", "disconnected, retrying…"));
  };
}

$("controls").addEventListener("change", applyControls);
$("reset-view").addEventListener("click", () => {
  history.replaceState(null, "", location.pathname);
  $("day-input").value = "";
  $("diff-day-input").value = "";
  connect();
});
window.addEventListener("resize", () => Object.keys(charts).forEach((id) => charts[id].plot.setSize({ width: Math.max($(id).clientWidth, 300), height: 240 })));
connect();

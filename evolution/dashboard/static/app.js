// The lineage dashboard: builds the page from the JSON endpoints under /ui/api.
// Every stored string (chat text, transcripts, curriculum questions, reasons) goes into the page
// as a text node (el() below); nothing here assigns markup (innerHTML and the like).
// The API token lives in this tab's sessionStorage and is sent only as an Authorization header: with
// every action, and with every read (the reads of stored chats and model replies need it where chat
// does; a 401 there turns the page into a request for the token).
// Layout: a table wider than the window scrolls inside its own box (on a phone the lineage, reply and
// chat tables show each row as a card), and each chart is sized to its box and follows it, so nothing
// spills past the window or into a neighbour.
"use strict";

const TOKEN_KEY = "evolution.token";
const RATIO_METRICS = ["recall", "generalization", "probe_recall", "experience_similarity"];
let live = null;          // the last /ui/api/live
let lineage = null;       // the last /ui/api/lineage
let verifyState = null;   // the last /ui/api/verify
let charts = [];

// -- building the page ---------------------------------------------------------------------

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "on") for (const [ev, fn] of Object.entries(v)) node.addEventListener(ev, fn);
    else if (k === "data") for (const [dk, dv] of Object.entries(v)) node.dataset[dk] = String(dv);
    else if (k === "href" || k === "title" || k === "id" || k === "type" || k === "value" || k === "colSpan") node[k] = v;
    else node.setAttribute(k, String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function fmt(v, digits = 3) {
  if (v === null || v === undefined) return "–";
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toPrecision(digits);
  return String(v);
}

function fmtDelta(name, d) {
  if (d === undefined || d === null) return null;
  const lowerIsBetter = name === "perplexity" || name.startsWith("style_drift");
  const good = lowerIsBetter ? d < 0 : d > 0;
  return el("span", { class: d === 0 ? "muted" : good ? "up" : "down" }, (d > 0 ? "+" : "") + d.toPrecision(2));
}

function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + units[i];
}

function fmtSeconds(s) {
  if (s === null || s === undefined) return "unknown";
  s = Math.round(s);
  const m = Math.floor(s / 60);
  return m >= 60 ? `${Math.floor(m / 60)} h ${m % 60} min` : m ? `${m} min ${s % 60} s` : `${s} s`;
}

function when(iso) { return iso ? iso.slice(0, 19).replace("T", " ") : "–"; }

function genName(n) { return "evolution-gen-" + String(n).padStart(4, "0"); }

function mark(ok) {
  if (ok === true) return el("span", { class: "ok", title: "right" }, "✓ right");
  if (ok === false) return el("span", { class: "bad", title: "wrong" }, "✗ wrong");
  return el("span", { class: "muted" }, "–");
}

function verdictBadge(r) {
  if (!r.verdict) return [el("span", { class: "badge muted" }, r.gen === 0 && r.parent === null ? "base" : r.status), prunedBadge(r)];
  const cls = r.verdict !== "pass" ? "bad" : r.status === "rolled_back" ? "warn" : "ok";
  const fate = { promoted: "", passed: ", not promoted", rolled_back: ", rolled back", rejected: ", rejected" };
  const badge = el("span", { class: "badge " + cls }, r.verdict + (r.status in fate ? fate[r.status] : ", " + r.status));
  return [badge, prunedBadge(r)];
}

function prunedBadge(r) {
  // Deleted on purpose by the retention policy (recorded in the ledger), not broken.
  if (r.pruned === "generation") return [" ", el("span", { class: "badge muted", title: "its GGUF and weights were deleted by the retention policy (evolve prune); its data stays" }, "pruned")];
  if (r.pruned === "weights") return [" ", el("span", { class: "badge muted", title: "merged weights deleted by the retention policy; still servable, rebuilt from the adapters when trained from" }, "weights pruned")];
  return null;
}

function toast(message, kind = "error") {
  const t = document.getElementById("toast");
  t.textContent = message;
  t.className = kind;
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, kind === "error" ? 15000 : 5000);
}

// -- talking to the server -----------------------------------------------------------------

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

async function getJSON(path) {
  const headers = { Accept: "application/json" };
  if (token()) headers.Authorization = "Bearer " + token();
  const r = await fetch(path, { headers, cache: "no-store", credentials: "omit" });
  const body = await r.json().catch(() => null);
  if (!r.ok) {
    const e = new Error((body && body.error && body.error.message) || `${path}: HTTP ${r.status}`);
    e.status = r.status;
    throw e;
  }
  return body;
}

async function act(path, body) {
  // An action: POST with the token as a bearer header (never in the URL, never a cookie).
  const t = token();
  if (!t) throw new Error("this action needs the API token: enter it at the top right (it is in the data root's daemon.token)");
  const r = await fetch(path, {
    method: "POST", cache: "no-store", credentials: "omit",
    headers: { "Content-Type": "application/json", Authorization: "Bearer " + t },
    body: JSON.stringify(body),
  });
  const out = await r.json().catch(() => null);
  if (!r.ok) throw new Error((out && out.error && out.error.message) || `HTTP ${r.status}`);
  return out;
}

function readonly() { return !live || live.readonly === true; }

// -- the live panel --------------------------------------------------------------------------

function renderLive() {
  const box = document.getElementById("live");
  if (!live) return;
  const cards = [];
  const s = live.served;
  cards.push(el("div", { class: "card", id: "live-served" }, el("h3", {}, "served"),
    s ? [el("div", { class: "mono" }, s.model), s.sha256 ? el("div", { class: "mono muted", title: s.sha256 }, s.sha256.slice(0, 16) + "…") : null]
      : el("div", { class: "muted" }, "no generation served yet")));

  const a = live.ageup || {};
  const p = a.progress;
  let ageup;
  if (p && (p.state === "running" || a.running)) {
    const frac = p.stage === "train" && p.total ? p.step / p.total : null;
    const bar = el("div", { class: "bar", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100,
      "aria-valuenow": frac === null ? "" : Math.round(frac * 100) }, el("div"));
    bar.firstChild.style.width = (frac === null ? 5 : Math.max(2, frac * 100)) + "%";
    ageup = [el("div", {}, `generation ${fmt(p.gen)}: ${p.stage || "starting"}`,
      p.stage === "train" && p.total ? ` · ${(p.train_stage || "").toUpperCase()} step ${p.step}/${p.total}` : ""),
      bar, el("div", { class: "muted" }, "ETA " + fmtSeconds(p.eta_s), p.loss !== null && p.loss !== undefined ? ` · loss ${fmt(p.loss)}` : "")];
  } else if (p) {
    ageup = el("div", { class: p.state === "failed" ? "bad" : "muted" }, `last: generation ${fmt(p.gen)} ${p.state}` +
      (p.ended ? " at " + when(new Date(p.ended * 1000).toISOString()) : ""));
  } else {
    ageup = el("div", { class: "muted" }, "none running");
  }
  cards.push(el("div", { class: "card", id: "live-ageup" }, el("h3", {}, "age-up"), ageup));

  const k = live.karma || {};
  const kf = k.threshold ? Math.min(1, (k.progress || 0) / k.threshold) : 0;
  const kbar = el("div", { class: "bar" }, el("div"));
  kbar.firstChild.style.width = kf * 100 + "%";
  cards.push(el("div", { class: "card", id: "live-karma" }, el("h3", {}, "karma"),
    el("div", {}, `${fmt(k.progress)} of ${fmt(k.threshold)} toward the next age-up`), kbar,
    el("div", { class: "muted" }, `total ${fmt(k.total)}`, k.open_request ? ` · request ${k.open_request.id} ${k.open_request.status}` : "")));

  const stop = [el("h3", {}, "stop rule")];
  if (live.paused) {
    stop.push(el("div", { class: "bad" }, "age-ups PAUSED: ", live.paused));
    if (!readonly()) stop.push(el("button", { id: "resume", on: { click: confirmResume } }, "resume age-ups…"));
  } else {
    stop.push(el("div", { class: "ok" }, "age-ups active"));
  }
  cards.push(el("div", { class: "card", id: "live-stop" }, stop));

  const v = verifyState;
  cards.push(el("div", { class: "card", id: "live-verify" }, el("h3", {}, "ledger verify"),
    !v ? el("div", { class: "muted" }, "checking…") : v.ok
      ? el("div", { class: "ok" }, `OK: ${v.entries} entries` + (v.artifacts_checked ? `, ${v.artifacts_checked} artifact(s) re-hashed` : ", chain and head"))
      : [el("div", { class: "bad" }, `FAILED: ${v.problems.length} problem(s)`),
        el("ul", {}, v.problems.slice(0, 5).map((x) => el("li", {}, `seq ${fmt(x.seq)}: ${x.what}: ${x.message}`)))],
    el("button", { id: "verify-artifacts", on: { click: () => refreshVerify(true) } }, "re-hash artifacts")));

  const x = live.experiences;
  if (x) {
    cards.push(el("div", { class: "card", id: "live-experience" }, el("h3", {}, "experience"),
      el("div", {}, `${x.experiences} chats kept: ${x.good} good, ${x.bad} bad, ${x.unrated} unrated`),
      el("div", { class: "muted" }, `${live.conversations ? live.conversations.stored : 0} conversations posted · `,
        el("a", { href: "#/experience" }, "see them"))));
  }
  const r = live.retrieval;
  if (r) {
    const body = r.enabled === false ? [el("div", { class: "muted" }, "off ([retrieval] enabled = false)")]
      : r.pending == null ? [el("div", { class: "muted" }, r.note || "no index yet")]
      : [el("div", {}, `${r.pending} lessons pending: answered from notes until a generation learns them`),
         el("div", { class: "muted" }, `${r.carried} carried by the weights` + (r.by_source
           ? ` · ${r.by_source.correction} corrections, ${r.by_source.good} rated good, ${r.by_source.transcript} from transcripts`
           : ""))];
    cards.push(el("div", { class: "card", id: "live-retrieval" }, el("h3", {}, "retrieval"), body));
  }
  const st = live.staleness;
  if (st && st.enabled) {
    const c = st.last_check;
    cards.push(el("div", { class: "card", id: "live-staleness" }, el("h3", {}, "staleness"),
      c ? [el("div", { class: c.requested ? "bad" : "" },
             `drift ${c.drift == null ? "-" : c.drift.toFixed(2)} of generation ${c.served} (threshold ${st.threshold})`),
           el("div", { class: "muted" }, c.requested ? `age-up request ${c.requested} opened` : (c.why_not || ""))]
        : el("div", { class: "muted" }, "not measured yet")));
  }
  cards.push(el("div", { class: "card", id: "live-error" }, el("h3", {}, "last error"),
    live.last_error ? el("pre", { class: "bad" }, live.last_error) : el("div", { class: "muted" }, "none")));
  box.replaceChildren(el("div", { class: "cards" }, cards));
  document.getElementById("mode").textContent = readonly() ? "read-only (evolve ui): actions need the daemon" : "";
  document.getElementById("token-form").hidden = readonly() && !live.token_for_reads;
  document.getElementById("token").placeholder = !live.token_for_reads ? "for actions only"
    : readonly() ? "for stored chats and replies" : "for chats, replies and actions";
}

async function refreshLive() {
  try {
    live = await getJSON("/ui/api/live");
  } catch (e) {
    live = live || { readonly: true };
    live.last_error = "the dashboard cannot reach the server: " + e.message;
  }
  renderLive();
}

async function refreshVerify(artifacts = false) {
  try {
    verifyState = await getJSON("/ui/api/verify" + (artifacts ? "?artifacts=true" : ""));
  } catch (e) {
    verifyState = { ok: false, problems: [{ seq: null, what: "error", message: e.message }] };
  }
  renderLive();
}

// -- charts (uPlot) -------------------------------------------------------------------------

const COLORS = ["#2463c7", "#c62828", "#1a7f37", "#b26a00", "#7b1fa2", "#00838f"];

const CHART_HEIGHT = 220;

function chartWidth(box) { return Math.max(120, Math.floor(box.clientWidth)); }

function axisSize(self, values, axisIdx, cycleNum) {
  // The y axis as wide as its longest label (uPlot's axis-autosize demo): 160,000 is not cut to 0,000.
  const axis = self.axes[axisIdx];
  if (cycleNum > 1) return axis._size;
  let size = axis.ticks.size + axis.gap;
  const longest = (values || []).reduce((acc, v) => (String(v).length > acc.length ? String(v) : acc), "");
  if (longest) {
    self.ctx.font = axis.font[0];
    size += self.ctx.measureText(longest).width / devicePixelRatio;
  }
  return Math.ceil(size);
}

function chart(container, title, xs, series, xLabel) {
  // Drawn into a box already laid out beside its neighbours, at the box's width; a ResizeObserver keeps
  // it so when the window (or a neighbour) changes the box: a plot never reaches into the next one.
  const opts = {
    title, width: chartWidth(container), height: CHART_HEIGHT,
    scales: { x: { time: false } },
    axes: [{ label: xLabel, incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000] }, { size: axisSize }],
    series: [{ label: xLabel }, ...series.map((s, i) => ({ label: s.label, stroke: COLORS[i % COLORS.length], width: 2,
      points: { show: true, size: 6 } }))],
  };
  const u = new uPlot(opts, [xs, ...series.map((s) => s.values)], container);
  const follow = new ResizeObserver(() => {
    const width = chartWidth(container);
    if (width !== u.width) u.setSize({ width, height: CHART_HEIGHT });
  });
  follow.observe(container);
  charts.push({ u, follow });
  return u;
}

function drawCharts(box, specs, xLabel) {
  // Every box first, then the plots: a chart measured while alone on its row would be too wide once its
  // neighbour arrives.
  const boxes = specs.map(() => el("div", { class: "chart" }));
  box.append(...boxes);
  specs.forEach(([title, xs, series], i) => chart(boxes[i], title, xs, series, xLabel));
}

function clearCharts() {
  for (const c of charts) { c.follow.disconnect(); c.u.destroy(); }
  charts = [];
}

function labelCells(table) {
  // Each cell carries its column's name, shown with it where a row is laid out as a card (table.stack on a phone).
  const heads = [...table.querySelectorAll("thead th")].map((th) => th.textContent);
  for (const tr of table.querySelectorAll("tbody tr")) [...tr.children].forEach((td, i) => { if (heads[i]) td.dataset.label = heads[i]; });
  return table;
}

function breakable(name) {
  // A metric's name may break after each underscore (style_drift_from_parent), so its column stays narrow.
  const parts = String(name).split("_");
  return parts.map((p, i) => (i < parts.length - 1 ? [p + "_", el("wbr")] : p));
}

// -- lineage page ----------------------------------------------------------------------------

function metricNames(rows) {
  const names = new Set();
  for (const r of rows) for (const k of Object.keys(r.metrics || {})) names.add(k);
  const order = ["smoke", "recall", "generalization", "perplexity", "style_drift", "experience_similarity", "preference_margin", "probe_recall"];
  return [...order.filter((n) => names.has(n)), ...[...names].filter((n) => !order.includes(n)).sort()];
}

function rollbackButton(r) {
  if (readonly() || !r.rollback_target) return null;
  return el("button", { class: "rollback", data: { gen: r.gen }, title: "roll back: serve generation " + r.gen, on: { click: () => confirmRollback(r.gen) } }, "serve…");
}

async function pageLineage(known) {
  lineage = known || await getJSON("/ui/api/lineage");
  const rows = lineage.generations;
  const names = metricNames(rows).filter((n) => rows.some((r) => r.metrics[n] !== null && r.metrics[n] !== undefined));
  const table = el("table", { id: "lineage", class: "stack" },
    el("thead", {}, el("tr", {}, ["", "gen", "parent", "created (UTC)", "verdict"].map((h) => el("th", {}, h)), names.map((n) => el("th", { class: "metric", title: n }, breakable(n))),
      ["sha256", "GGUF", "age-up time"].map((h) => el("th", {}, h)))),
    el("tbody", {}, rows.map((r) => el("tr", { class: r.served ? "served" : "", data: { gen: r.gen } },
      el("td", {}, r.served ? el("span", { class: "badge ok", title: "served now" }, "▶ served") : rollbackButton(r)),
      el("td", { class: "num" }, el("a", { href: "#/gen/" + r.gen }, String(r.gen))),
      el("td", { class: "num" }, r.parent === null ? "–" : String(r.parent)),
      el("td", {}, when(r.created).split(" ").map((part, i) => [i ? " " : "", el("span", { class: "nowrap" }, part)])),
      el("td", {}, verdictBadge(r), r.reason && (r.status === "rolled_back" || r.status === "rejected") ? el("div", { class: "muted" }, r.reason) : null,
        Object.keys(r.tasks || {}).length ? el("div", { class: "muted tasks" }, Object.entries(r.tasks).map(([t, v]) =>
          el("span", { class: "badge " + (v === "pass" ? "ok" : "bad"), title: `task adapter ${t}: ${v}` }, `${t} ${v === "pass" ? "✓" : "✗"}`))) : null),
      names.map((n) => el("td", { class: "num" }, fmt(r.metrics[n]), r.deltas[n] !== undefined ? [" ", el("span", { class: "delta" }, fmtDelta(n, r.deltas[n]))] : null)),
      el("td", { class: "mono", title: r.gguf_sha256 || "" }, r.gguf_sha256 ? r.gguf_sha256.slice(0, 12) : "–"),
      el("td", { class: "num" }, fmtBytes(r.gguf_size), r.quantization ? el("div", { class: "muted" }, r.quantization) : null),
      el("td", { class: "num muted time", title: Object.entries(r.stage_seconds || {}).map(([k, v]) => `${k} ${fmtSeconds(v)}`).join("\n") },
        Object.keys(r.stage_seconds || {}).length ? fmtSeconds(Object.values(r.stage_seconds).reduce((a, b) => a + (b || 0), 0)).replace(/ (h|min|s)\b/g, "\u00a0$1") : "–")))));
  const chartsBox = el("div", { class: "charts" });
  main(el("h1", {}, "Lineage"), el("p", { class: "muted wrap" }, `${rows.length} generation(s); ledger ${lineage.ledger}; deltas against each one's parent`),
    rows.length ? table : el("p", { class: "muted" }, "the ledger is empty: no generation recorded yet"), chartsBox);
  if (rows.length) {
    const xs = rows.map((r) => r.gen);
    const ratio = RATIO_METRICS.filter((n) => names.includes(n)).map((n) => ({ label: n, values: rows.map((r) => r.metrics[n] ?? null) }));
    const other = ["perplexity", "style_drift"].filter((n) => names.includes(n)).map((n) => ({ label: n, values: rows.map((r) => r.metrics[n] ?? null) }));
    const moved = rows.some((r) => r.weights) ? [{ label: "vs parent", values: rows.map((r) => (r.weights ? r.weights.vs_parent : null)) },
      { label: "vs generation 0", values: rows.map((r) => (r.weights ? r.weights.vs_gen0 : null)) }] : [];
    drawCharts(chartsBox, [["recall and friends (0–1, higher is better)", xs, ratio], ["perplexity and style drift (lower is better)", xs, other],
      ["weights moved (relative change of the whole model)", xs, moved]]
      .filter(([, , series]) => series.length), "generation");
  }
}

// -- generation page --------------------------------------------------------------------------

function kv(pairs) {
  return el("table", { class: "kv" }, el("tbody", {}, pairs.filter(([, v]) => v !== undefined).map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v)))));
}

async function pageGeneration(n) {
  const [g, lin] = await Promise.all([getJSON("/ui/api/generation/" + n), getJSON("/ui/api/lineage")]);
  lineage = lin;
  const row = lin.generations.find((r) => r.gen === g.gen) || g;
  const out = [el("p", {}, el("a", { href: "#/" }, "← lineage")),
    el("h1", {}, `Generation ${g.gen} `, verdictBadge(g), g.served ? [" ", el("span", { class: "badge ok" }, "▶ served")] : null, " ", rollbackButton(row)),
    kv([["lineage", g.lineage.join(" ← ") + (g.base ? `  (base: ${g.base})` : "")], ["created (UTC)", when(g.created)],
      ["status", g.status], ["GGUF sha256", el("span", { class: "mono" }, g.gguf_sha256 || "–")], ["GGUF", g.gguf_path || "–"],
      ["config hash", el("span", { class: "mono" }, g.config_hash || "–")], ["data manifest hash", el("span", { class: "mono" }, g.manifest_hash || "–")],
      ["reason", g.reason || undefined]])];

  out.push(el("h2", {}, "Gate report"));
  if (!g.gate) {
    out.push(el("p", { class: "muted" }, g.gen === 0 ? "generation 0 is measured, not gated: its numbers are the baseline" : "not gated (yet)"));
  } else {
    out.push(el("p", {}, `vs parent ${fmt(g.gate.parent)}: `, el("strong", { class: g.gate.verdict === "pass" ? "ok" : "bad", id: "gate-verdict" }, g.gate.verdict)));
    if (g.failed.length || g.reasons.length) {
      out.push(el("h3", { class: "bad" }, "Failed rules"),
        el("ul", { id: "failed-rules" }, (g.failed.length ? g.failed.map((c) => `${c.metric}: ${c.rule} — ${c.message}`) : g.reasons).map((m) => el("li", { class: "bad" }, m))));
    }
    out.push(el("table", { id: "gate" },
      el("thead", {}, el("tr", {}, ["metric", "child", "parent", "Δ", "rules"].map((h) => el("th", {}, h)))),
      el("tbody", {}, g.gate_rows.map((r) => el("tr", {},
        el("td", {}, breakable(r.metric)), el("td", { class: "num" }, fmt(r.child)), el("td", { class: "num" }, fmt(r.parent)),
        el("td", { class: "num" }, typeof r.child === "number" && typeof r.parent === "number" ? fmtDelta(r.metric, r.child - r.parent) : "–"),
        el("td", {}, r.rules.map((x) => el("div", { class: x.passed === false ? "bad" : x.passed ? "ok" : "" }, (x.passed === false ? "✗ " : x.passed ? "✓ " : "") + x.rule)),
          r.skipped.map((s) => el("div", { class: "muted" }, "skipped: " + s))))))));
  }

  out.push(el("h2", {}, "Eval replies, parent and child side by side"));
  if (!g.replies.length) {
    out.push(el("p", { class: "muted" }, "no eval report on disk for this generation (eval.json)"));
  } else {
    out.push(el("table", { id: "replies", class: "stack" },
      el("thead", {}, el("tr", {}, ["metric", "question", `parent (${fmt(g.gate ? g.gate.parent : null)})`, "", `child (${g.gen})`, ""].map((h) => el("th", {}, h)))),
      el("tbody", {}, g.replies.map((r) => el("tr", { data: { item: r.id } },
        el("td", { class: "muted" }, r.metric), el("td", { class: "reply" }, r.question),
        el("td", { class: "reply parent " + (r.parent ? (r.parent.correct ? "right" : "wrong") : "") }, r.parent ? r.parent.reply : "–"),
        el("td", {}, r.parent ? mark(r.parent.correct) : ""),
        el("td", { class: "reply child " + (r.child.correct ? "right" : "wrong") }, r.child.reply),
        el("td", {}, mark(r.child.correct)))))));
  }
  if (g.style.length) {
    out.push(el("h3", {}, "Style prompts"), el("table", { id: "style", class: "stack" },
      el("thead", {}, el("tr", {}, el("th", {}, "parent"), el("th", {}, "child"))),
      el("tbody", {}, g.style.map((s) => el("tr", {}, el("td", { class: "reply" }, s.parent ?? "–"), el("td", { class: "reply" }, s.child ?? "–"))))));
  }

  out.push(el("h2", {}, "Training"));
  const lossBox = el("div", { class: "charts", id: "losses" });
  if (g.training && Object.keys(g.training.stages || {}).length) {
    const stages = g.training.stages;
    out.push(el("table", {}, el("thead", {}, el("tr", {}, ["stage", "method", "steps", "loss first → last", "seconds", "note"].map((h) => el("th", {}, h)))),
      el("tbody", {}, Object.entries(stages).map(([name, st]) => el("tr", {}, el("td", {}, name), el("td", {}, st.method || "–"),
        el("td", { class: "num" }, fmt(st.steps)), el("td", { class: "num" }, st.loss_first != null ? `${fmt(st.loss_first, 4)} → ${fmt(st.loss_last, 4)}` : "–"),
        el("td", { class: "num" }, fmt(st.seconds)), el("td", { class: "muted" }, st.reason || ""))))));
  } else if (!g.training) {
    out.push(el("p", { class: "muted" }, "no training recorded (generation 0 is the base model)"));
  }
  out.push(lossBox);

  out.push(el("h2", {}, "Weights"));
  const weightBox = el("div", { class: "charts", id: "weights" });
  const w = g.weights;
  const layers = w ? w.layers.filter((r) => /^\d+$/.test(r.layer)) : [];
  if (!w) {
    out.push(el("p", { class: "muted" }, "not measured (generation 0, or built before weights were measured)"));
  } else {
    out.push(el("p", { class: w.dominant ? "bad" : "muted", id: "weights-flag" }, w.dominant
      ? `layer ${w.dominant.layer} holds ${Math.round(100 * w.dominant.share)} % of this generation's update`
      : "no layer dominates the update"), weightBox);
  }

  out.push(el("h2", {}, "Task adapters"));
  if (!(g.tasks || []).length) {
    out.push(el("p", { class: "muted" }, "none gated on this generation ([tasks] in evolution.toml)"));
  } else {
    const pair = (t, k) => `${fmt(((t.metrics || {}).with || {})[k])} / ${fmt(((t.metrics || {}).without || {})[k])}`;
    out.push(el("table", { id: "tasks" }, el("thead", {}, el("tr", {}, ["task", "verdict", "trained on", "taught replies", "probes", "recall", "why"].map((h) => el("th", {}, h)))),
      el("tbody", {}, g.tasks.map((t) => el("tr", { data: { task: t.task } }, el("td", {}, t.task),
        el("td", {}, el("span", { class: "badge " + (t.verdict === "pass" ? "ok" : "bad") }, t.verdict)),
        el("td", { class: "num" }, fmt(t.trained_on)), el("td", { class: "num" }, pair(t, "taught_similarity")),
        el("td", { class: "num" }, pair(t, "probe_recall")), el("td", { class: "num" }, pair(t, "recall")),
        el("td", { class: "muted" }, (t.reasons || []).join("; ") || "–"))))),
      el("p", { class: "muted" }, "each pair: with the adapter applied / the generation alone"));
  }

  out.push(el("h2", {}, "Data manifest"));
  const m = g.manifest;
  if (m && typeof m === "object" && !Array.isArray(m)) {
    const pairs = Object.entries(m).map(([k, v]) => [k, v !== null && typeof v === "object"
      ? el("span", { class: "mono" }, Object.entries(v).map(([a, b]) => `${a}: ${typeof b === "object" ? JSON.stringify(b) : b}`).join(" · "))
      : String(v)]);
    out.push(kv(pairs));
  } else {
    out.push(el("p", { class: "muted" }, m ? "" : "no data manifest recorded"), m ? el("pre", {}, JSON.stringify(m, null, 2)) : null);
  }

  if (g.artifacts.length) {
    out.push(el("h2", {}, "Artifacts"), el("table", {}, el("thead", {}, el("tr", {}, ["path", "kind", "size", "sha256"].map((h) => el("th", {}, h)))),
      el("tbody", {}, g.artifacts.map((a) => el("tr", {}, el("td", { class: "mono" }, a.path), el("td", {}, a.kind), el("td", { class: "num" }, fmtBytes(a.size)), el("td", { class: "mono" }, a.sha256))))));
  }
  out.push(el("h2", {}, "Events"), el("table", {}, el("thead", {}, el("tr", {}, ["seq", "time (UTC)", "kind"].map((h) => el("th", {}, h)))),
    el("tbody", {}, g.events.map((e) => el("tr", {}, el("td", { class: "num" }, String(e.seq)), el("td", {}, when(e.time)), el("td", {}, e.kind))))));
  if (g.config) out.push(el("details", {}, el("summary", {}, "resolved config"), el("pre", {}, JSON.stringify(g.config, null, 2))));
  main(...out);
  drawCharts(lossBox, Object.entries(g.losses || {}).map(([stage, s]) => [`${stage} loss`, s.step, [{ label: "loss", values: s.loss }]]),
    "logged step");
  if (layers.length) {
    const xs = layers.map((r) => Number(r.layer));
    drawCharts(weightBox, [["relative change per layer", xs, [{ label: "vs parent", values: layers.map((r) => r.vs_parent) },
      { label: "vs generation 0", values: layers.map((r) => r.vs_gen0) }]],
      ["adapter update norm per layer", xs, [{ label: "‖scaling · B A‖", values: layers.map((r) => r.adapter_norm) }]]], "layer");
  }
}

// -- experience page -------------------------------------------------------------------------

function messagesView(msgs) {
  return el("div", { class: "messages" }, (msgs || []).map((m) => el("div", {}, el("span", { class: "role" }, m.role + ":"), el("span", { class: "reply" }, m.content))));
}

function labelCell(label, corrected) {
  if (!label) return el("span", { class: "muted" }, "unrated");
  return el("span", { class: "badge " + (label === "good" ? "ok" : "bad") }, label + (corrected ? " + correction" : ""));
}

function rateButtons(by, id) {
  if (readonly()) return null;
  const rate = async (label) => {
    try {
      await act("/feedback", { [by + "_id"]: id, label });
      toast(`rated ${by} ${id} ${label}`, "info");
      route();
    } catch (e) { toast("rating failed: " + e.message); }
  };
  return [el("button", { class: "rate-good", on: { click: () => rate("good") } }, "good"), " ",
    el("button", { class: "rate-bad", on: { click: () => rate("bad") } }, "bad")];
}

async function pageExperience() {
  const x = await getJSON("/ui/api/experience");
  main(el("h1", {}, "Experience"),
    el("h2", {}, "Captured chats"),
    x.experiences.length ? el("table", { id: "experiences", class: "stack" },
      el("thead", {}, el("tr", {}, ["id", "when (UTC)", "gen", "prompt", "reply", "label", ""].map((h) => el("th", {}, h)))),
      el("tbody", {}, x.experiences.map((e) => el("tr", { data: { id: e.id } }, el("td", { class: "num" }, String(e.id)), el("td", {}, when(e.time)),
        el("td", { class: "num" }, fmt(e.gen)), el("td", {}, messagesView(e.messages)), el("td", { class: "reply" }, e.reply),
        el("td", {}, labelCell(e.label, e.corrected)), el("td", {}, rateButtons("completion", e.completion_id))))))
      : el("p", { class: "muted" }, "no chats kept (the daemon keeps served chats when [daemon] capture is on)"),
    el("h2", {}, "Posted conversations"),
    x.conversations.length ? el("table", { id: "conversations", class: "stack" },
      el("thead", {}, el("tr", {}, ["id", "when (UTC)", "transcript", "label", ""].map((h) => el("th", {}, h)))),
      el("tbody", {}, x.conversations.map((c) => el("tr", { data: { id: c.id } }, el("td", { class: "num" }, String(c.id)), el("td", {}, when(c.time)),
        el("td", {}, messagesView(c.messages)), el("td", {}, labelCell(c.label, c.corrected)), el("td", {}, rateButtons("conversation", c.id))))))
      : el("p", { class: "muted" }, "no conversations posted"));
}

// -- actions -------------------------------------------------------------------------------

function confirmDialog(title, body, withReason, onConfirm) {
  const dlg = document.getElementById("confirm");
  document.getElementById("confirm-title").textContent = title;
  document.getElementById("confirm-body").replaceChildren(...body);
  document.getElementById("confirm-reason-label").hidden = !withReason;
  document.getElementById("confirm-reason").value = "";
  document.getElementById("confirm-error").textContent = "";
  const ok = document.getElementById("confirm-ok");
  const handler = async (ev) => {
    ev.preventDefault();
    ok.disabled = true;
    try {
      await onConfirm(document.getElementById("confirm-reason").value.trim());
      dlg.close();
    } catch (e) {
      document.getElementById("confirm-error").textContent = e.message;
      toast(e.message);
    } finally { ok.disabled = false; }
  };
  ok.onclick = handler;
  dlg.showModal();
}

function confirmRollback(to) {
  const rows = (lineage && lineage.generations) || [];
  const target = rows.find((r) => r.gen === to) || {};
  const served = rows.find((r) => r.served);
  const body = [el("p", {}, "Serve ", el("strong", {}, genName(to)), " instead of ", el("strong", {}, served ? genName(served.gen) : "nothing"), "."),
    el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, ""), el("th", {}, "now"), el("th", {}, "after"))),
      el("tbody", {},
        el("tr", {}, el("th", {}, "/v1/models"), el("td", { class: "mono" }, served ? genName(served.gen) : "–"), el("td", { class: "mono" }, genName(to))),
        el("tr", {}, el("th", {}, "GGUF sha256"), el("td", { class: "mono" }, served && served.gguf_sha256 ? served.gguf_sha256.slice(0, 16) : "–"),
          el("td", { class: "mono" }, target.gguf_sha256 ? target.gguf_sha256.slice(0, 16) : "–")))),
    el("p", { class: "muted" }, "The daemon loads and checks the GGUF against the ledger, appends a rolled_back event and swaps; nothing is deleted, and you can roll forward again the same way.")];
  confirmDialog(`Roll back to generation ${to}?`, body, true, async (reason) => {
    const out = await act("/rollback", { to, reason: reason || "rollback from the dashboard" });
    toast(`generation ${out.served_generation} is served (ledger seq ${out.ledger_seq})`, "info");
    await refreshLive();
    route();
  });
}

function confirmResume() {
  confirmDialog("Resume age-ups?", [el("p", {}, "The stop rule paused age-ups: ", live.paused || ""),
    el("p", { class: "muted" }, "Resuming records ageups_resumed in the ledger; a queued age-up starts at the next tick.")], true, async (reason) => {
    await act("/resume", { reason: reason || "resumed from the dashboard" });
    toast("age-ups resumed", "info");
    await refreshLive();
  });
}

// -- routing -------------------------------------------------------------------------------

function main(...children) {
  clearCharts();
  const box = document.getElementById("main");
  box.replaceChildren(...children);
  for (const table of box.querySelectorAll("table")) {  // a table wider than the window scrolls in its own box
    const wrap = el("div", { class: "scroll" });
    table.replaceWith(wrap);
    wrap.append(table);
  }
  for (const table of box.querySelectorAll("table.stack")) labelCells(table);
}

async function route() {
  const hash = location.hash || "#/";
  const m = hash.match(/^#\/gen\/(\d+)$/);
  try {
    if (m) await pageGeneration(Number(m[1]));
    else if (hash === "#/experience") await pageExperience();
    else await pageLineage();
  } catch (e) {
    if (e.status === 401) askToken(e.message);
    else main(el("p", { class: "error", role: "alert" }, e.message));
  }
}

function askToken(message) {
  // This server keeps stored chats and model replies behind the API token: the page says so and where
  // the token goes; entering it shows the page (setupToken routes again).
  document.getElementById("token-form").hidden = false;
  main(el("section", { id: "need-token", class: "card" },
    el("h1", {}, "This page needs the API token"),
    el("p", {}, "It shows stored chats, transcripts, model replies or what the gate quoted of them, and this server ",
      "shows those only with the token. Enter it in the field at the top (“API token”) and press “use”; this tab ",
      "keeps it until you close it."),
    el("p", { class: token() ? "error" : "muted", role: "alert" }, message)));
  document.getElementById("token").focus();
}

async function refreshLineage() {
  // A new generation, a verdict or a rollback shows without a reload; an unchanged ledger redraws nothing.
  if ((location.hash || "#/") !== "#/" || document.getElementById("confirm").open) return;
  try {
    const fresh = await getJSON("/ui/api/lineage");
    if (JSON.stringify(fresh) !== JSON.stringify(lineage)) await pageLineage(fresh);
  } catch (e) { /* the live panel already says the server is unreachable */ }
}

function setupToken() {
  const form = document.getElementById("token-form");
  const input = document.getElementById("token");
  const state = document.getElementById("token-state");
  const show = () => { state.textContent = token() ? "token set" : "no token"; };
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    if (input.value.trim()) sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    input.value = "";
    show();
    if (document.getElementById("need-token")) route();
  });
  document.getElementById("forget").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); show(); });
  show();
}

async function start() {
  setupToken();
  await refreshLive();
  window.addEventListener("hashchange", route);
  await route();
  refreshVerify();
  setInterval(refreshLive, 2000);
  setInterval(() => refreshVerify(false), 30000);
  setInterval(refreshLineage, 5000);
}

document.addEventListener("DOMContentLoaded", start);

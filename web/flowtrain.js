// FlowTrain web extension: a live loss chart on the FlowTrain Trainer node.
//
// The Trainer sends "flowtrain.progress" {node, step, total, loss, lr} after every
// optimizer step, "flowtrain.phase" {node, phase, n, total, rate, eta} when the run changes
// phase (loading, encoding images, encoding captions, training, previews, saving, done) and
// while it encodes (n of total, items/s, seconds left), and "flowtrain.preview" {node,
// images: [{filename, subfolder, type}]} after each in-training preview. This draws the loss
// and its moving average in a canvas DOM widget, with the phase, step/total, loss and lr
// readout, and shows the newest previews.
//
// While the node trains it also shows the run's state (running, pausing, paused, resuming,
// saving, stopping), s/it and ETA (both events carry "state", progress also "s_per_it" and
// "eta"; "flowtrain.state" follows a button press) and the buttons Pause/Resume, Save now and
// Stop, which POST {"action"} to /flowtrain/control/<node id>. When a workflow is loaded (a
// page reload while training) each Trainer asks GET /flowtrain/state/<node id> and rebuilds
// its chart, state and buttons from the answer; while a run is live and no event came for a
// few seconds the same route is polled (e.g. another browser tab, which gets no events).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TRAINER = "FlowTrainTrainer";
const WINDOW = 20; // moving-average window, the same as the engine's report
const HEIGHT = 214;
const LIVE = new Set(["starting", "running", "pausing", "paused", "resuming", "saving", "stopping"]);
const POLL_MS = 2000;
const STATE_COLOURS = { running: "#4caf50", paused: "#e0a030", pausing: "#e0a030", resuming: "#4caf50",
  saving: "#4f8ff0", stopping: "#e05050", starting: "#999" };
// Trainer node -> {steps, losses, total, lr, el, observer}. Keyed by the node object, not its
// id: onNodeCreated runs before graph.add() gives the node its id (and loading a workflow
// changes ids), so an id captured there would not match the ids in the events.
const runs = new WeakMap();

function movingAverage(values, window) {
  const out = [];
  let acc = 0;
  values.forEach((v, i) => {
    acc += v;
    if (i >= window) acc -= values[i - window];
    out.push(acc / Math.min(i + 1, window));
  });
  return out;
}

// "encoding captions 12/40 (3.1/s, ETA 9s)", or the bare phase name when it has no count.
function phaseText(p) {
  if (!p) return "";
  if (!p.total) return p.phase;
  const parts = [];
  if (Number.isFinite(p.rate) && p.rate > 0) parts.push(p.rate >= 1 ? `${p.rate.toFixed(1)}/s` : `${(1 / p.rate).toFixed(1)}s each`);
  if (Number.isFinite(p.eta)) parts.push(`ETA ${Math.round(p.eta)}s`);
  return `${p.phase} ${p.n}/${p.total}` + (parts.length ? ` (${parts.join(", ")})` : "");
}

// 95 -> "1m35s", 4000 -> "1h06m", 12 -> "12s"
function duration(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

// "0.42s/it  ETA 1m35s" (or "" before the first step)
function timing(run) {
  if (!Number.isFinite(run.sPerIt)) return "";
  const rate = run.sPerIt >= 1 || run.sPerIt === 0 ? `${run.sPerIt.toFixed(2)}s/it` : `${(1 / run.sPerIt).toFixed(2)}it/s`;
  return Number.isFinite(run.eta) && run.state !== "done" ? `${rate}  ETA ${duration(run.eta)}` : rate;
}

function draw(run) {
  const { canvas, text } = run.el;
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 300; // 0 before the first layout; the ResizeObserver redraws
  const h = canvas.clientHeight || 120;
  if (canvas.width !== Math.round(w * dpr)) canvas.width = Math.round(w * dpr);
  if (canvas.height !== Math.round(h * dpr)) canvas.height = Math.round(h * dpr);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.fillStyle = "#1e1e1e";
  ctx.fillRect(0, 0, w, h);
  const pts = run.losses.map((l, i) => [run.steps[i], l]).filter(([, l]) => Number.isFinite(l));
  const last = run.steps.length ? run.steps[run.steps.length - 1] : 0;
  const loss = pts.length ? pts[pts.length - 1][1] : NaN;
  const lr = Number.isFinite(run.lr) ? `  lr ${run.lr.toExponential(2)}` : "";
  const phase = run.phase?.phase;
  const time = timing(run);
  const steps = run.total ? `step ${last}/${run.total}  loss ${Number.isFinite(loss) ? loss.toFixed(4) : "-"}${lr}${time ? "  " + time : ""}` : "";
  const idle = phase === "training" ? "training: first step running…" : phase === "done" ? "done" : "waiting for training…";
  // paused / stopping are on the state badge under the chart, not in this line
  if (!phase || ["training", "done", "paused", "stopping"].includes(phase)) text.textContent = steps || idle;
  else text.textContent = steps ? `${steps}  · ${phase}…` : phaseText(run.phase);
  if (run.phase?.total && !steps) {
    // the encoding before step 1: its own bar along the bottom edge
    ctx.fillStyle = "#d0a040";
    ctx.fillRect(0, h - 2, (w * run.phase.n) / run.phase.total, 2);
  }
  if (pts.length < 2) return;
  const avg = movingAverage(pts.map((p) => p[1]), WINDOW);
  const xs = pts.map((p) => p[0]);
  const ys = pts.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(Math.max(...xs), x0 + 1);
  const y0 = Math.min(...ys), y1 = Math.max(Math.max(...ys), y0 + 1e-9);
  const pad = 6;
  const sx = (x) => pad + ((x - x0) / (x1 - x0)) * (w - 2 * pad);
  const sy = (y) => h - pad - ((y - y0) / (y1 - y0)) * (h - 2 * pad);
  const line = (values, colour, width) => {
    ctx.strokeStyle = colour;
    ctx.lineWidth = width;
    ctx.beginPath();
    values.forEach((y, i) => (i ? ctx.lineTo(sx(xs[i]), sy(y)) : ctx.moveTo(sx(xs[i]), sy(y))));
    ctx.stroke();
  };
  line(ys, "rgba(157,180,214,0.6)", 1);
  line(avg, "#4f8ff0", 2);
  ctx.fillStyle = "#aaa";
  ctx.font = "10px sans-serif";
  ctx.fillText(y1.toPrecision(3), pad, 12);
  ctx.fillText(y0.toPrecision(3), pad, h - pad - 2);
  // legend, top right: raw loss and its moving average
  ctx.textAlign = "right";
  ctx.fillStyle = "#4f8ff0";
  ctx.fillText(`avg ${WINDOW}`, w - pad, 12);
  ctx.fillStyle = "rgba(157,180,214,0.9)";
  ctx.fillText("loss", w - pad - ctx.measureText(`avg ${WINDOW}`).width - 8, 12);
  ctx.textAlign = "left";
  // progress readout along the bottom edge
  if (run.total) {
    ctx.fillStyle = "#4f8ff0";
    ctx.fillRect(0, h - 2, (w * last) / run.total, 2);
  }
}

// The state badge and the buttons: shown while the run is live, each button enabled when
// the engine would accept its action (trainer_core.control.refusal).
function drawControls(run) {
  const c = run.el?.controls;
  if (!c) return;
  c.row.style.display = LIVE.has(run.state) ? "flex" : "none";
  c.state.textContent = run.state || "";
  c.state.style.color = STATE_COLOURS[run.state] || "#ddd";
  c.state.title = run.error || "";
  const acting = run.state !== "starting" && run.state !== "stopping" && !run.busy;
  const paused = run.state === "paused" || run.state === "pausing";
  c.pause.textContent = paused ? "Resume" : "Pause";
  c.pause.dataset.action = paused ? "resume" : "pause";
  c.pause.disabled = !acting;
  c.save.disabled = !acting;
  c.stop.disabled = !acting;
}

function setState(node, run, d) {
  if (d.state !== undefined && d.state !== null) run.state = d.state;
  if (d.s_per_it !== undefined) run.sPerIt = d.s_per_it ?? NaN;
  if (d.eta !== undefined) run.eta = d.eta ?? NaN;
  run.lastEvent = Date.now();
  if (LIVE.has(run.state)) live.add(node);
  else live.delete(node);
}

async function act(node, action) {
  const run = runFor(node);
  run.busy = true;
  drawControls(run);
  try {
    const res = await api.fetchApi(`/flowtrain/control/${encodeURIComponent(node.id)}`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ action }),
    });
    const d = await res.json().catch(() => ({}));
    run.error = res.ok ? "" : d.error || `HTTP ${res.status}`;
    if (res.status === 404) run.state = null; // the run ended meanwhile
    if (d.state) setState(node, run, d);
  } catch (e) {
    run.error = String(e);
  } finally {
    run.busy = false;
    if (run.el) draw(run);
    drawControls(run);
    node.setDirtyCanvas?.(true, false);
  }
}

// Rebuild a node's run from GET /flowtrain/state/<id> (after a reload, or when events stop).
async function restore(node) {
  if (node?.type !== TRAINER || node.id === undefined || node.id === null || node.id === -1) return;
  let res;
  try {
    res = await api.fetchApi(`/flowtrain/state/${encodeURIComponent(node.id)}`);
  } catch {
    return;
  }
  const run = runFor(node);
  if (!res.ok) {
    if (res.status === 404 && LIVE.has(run.state)) {
      run.state = "done"; // it ended while no event reached this page
      live.delete(node);
      drawControls(run);
    }
    return;
  }
  const d = await res.json();
  if (Array.isArray(d.losses)) {
    run.steps = d.losses.map((p) => p[0]);
    run.losses = d.losses.map((p) => (p[1] === null || p[1] === undefined ? NaN : p[1]));
  }
  run.total = d.total ?? run.total;
  run.lr = d.lr === null || d.lr === undefined ? NaN : d.lr;
  run.phase = { phase: d.phase, n: 0, total: 0, rate: NaN, eta: NaN };
  setState(node, run, d);
  if (run.el) draw(run);
  drawControls(run);
  node.setDirtyCanvas?.(true, false);
}

// Trainer nodes whose run is live on this page, polled when their events stop.
const live = new Set();

function poll() {
  const now = Date.now();
  for (const node of [...live]) {
    const run = runs.get(node);
    if (!run || !app.graph?.getNodeById?.(node.id)) live.delete(node);
    else if (now - (run.lastEvent || 0) > POLL_MS) restore(node);
  }
}

function runFor(node) {
  let run = runs.get(node);
  if (!run) {
    run = { steps: [], losses: [], total: 0, lr: NaN, phase: null, el: null, observer: null, state: null,
      sPerIt: NaN, eta: NaN, lastEvent: 0, busy: false, error: "" };
    runs.set(node, run);
  }
  return run;
}

// The server sends the node id as a string ("7"); the graph may key nodes by number or string.
function findNode(id) {
  const graph = app.graph;
  if (!graph?.getNodeById || id === undefined || id === null) return null;
  const asNumber = Number(id);
  return graph.getNodeById(id) ?? (Number.isFinite(asNumber) ? graph.getNodeById(asNumber) : null) ?? null;
}

function attachChart(node) {
  const box = document.createElement("div");
  box.style.cssText = "display:flex;flex-direction:column;gap:2px;width:100%;height:100%;";
  const text = document.createElement("div");
  text.style.cssText = "font:11px monospace;color:#ddd;white-space:nowrap;overflow:hidden;";
  const canvas = document.createElement("canvas");
  canvas.style.cssText = "width:100%;flex:1;min-height:80px;border-radius:4px;";
  const previews = document.createElement("div");
  previews.style.cssText = "display:flex;gap:2px;overflow-x:auto;max-height:64px;";
  const row = document.createElement("div");
  row.style.cssText = "display:none;flex-wrap:wrap;align-items:center;gap:4px;font:11px monospace;";
  const state = document.createElement("span");
  state.style.cssText = "flex:1;font-weight:bold;";
  const button = (label, action, tip) => {
    const b = document.createElement("button");
    b.textContent = label;
    b.title = tip;
    b.dataset.action = action;
    b.style.cssText = "font:11px sans-serif;padding:1px 6px;cursor:pointer;";
    b.addEventListener("click", (e) => {
      e.stopPropagation();
      act(node, b.dataset.action);
    });
    return b;
  };
  const controls = {
    row,
    state,
    pause: button("Pause", "pause", "Pause after the step in progress (a checkpoint is saved); Resume continues."),
    save: button("Save now", "save", "Save a resumable checkpoint after the step in progress, render the previews (when set), then continue."),
    stop: button("Stop", "stop", "Finish the step in progress, save, and let the graph go on with the LoRA so far " +
      "(unlike Cancel, the nodes after the Trainer run)."),
  };
  row.append(state, controls.pause, controls.save, controls.stop);
  box.append(text, canvas, previews, row);
  const widget = node.addDOMWidget("flowtrain_loss_chart", "flowtrain_chart", box, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => HEIGHT,
    getValue: () => undefined,
    setValue: () => {},
  });
  widget.serialize = false; // never part of widgets_values
  const run = runFor(node);
  run.el = { canvas, text, previews, controls };
  // The canvas is laid out (and resized with the node) after this call: redraw at its real
  // size, otherwise the bitmap drawn at the fallback size is stretched and blurred.
  if (typeof ResizeObserver !== "undefined") {
    const observer = new ResizeObserver(() => draw(run));
    observer.observe(canvas);
    run.observer = observer;
  }
  draw(run);
  drawControls(run);
}

function onProgress(event) {
  const d = event.detail || {};
  const node = findNode(d.node);
  if (!node || node.type !== TRAINER) return;
  const run = runFor(node);
  if (run.steps.length && d.step <= run.steps[run.steps.length - 1]) {
    run.steps = []; // a new (or resumed) run on the same node
    run.losses = [];
  }
  run.steps.push(d.step);
  run.losses.push(d.loss === null || d.loss === undefined ? NaN : d.loss);
  run.total = d.total;
  run.lr = d.lr === null || d.lr === undefined ? NaN : d.lr;
  setState(node, run, d);
  if (run.el) draw(run);
  drawControls(run);
  node.setDirtyCanvas?.(true, false);
}

function onState(event) {
  const d = event.detail || {};
  const node = findNode(d.node);
  if (!node || node.type !== TRAINER) return;
  const run = runFor(node);
  setState(node, run, d);
  if (run.el) draw(run);
  drawControls(run);
  node.setDirtyCanvas?.(true, false);
}

function onPhase(event) {
  const d = event.detail || {};
  const node = findNode(d.node);
  if (!node || node.type !== TRAINER) return;
  const run = runFor(node);
  if (d.phase === "loading") {
    run.steps = []; // a new (or resumed) run on the same node: the chart starts over
    run.losses = [];
    run.total = 0;
    run.sPerIt = NaN;
    run.eta = NaN;
  }
  run.phase = { phase: d.phase, n: d.n ?? 0, total: d.total ?? 0, rate: d.rate ?? NaN, eta: d.eta ?? NaN };
  setState(node, run, { state: d.state });
  if (run.el) draw(run);
  drawControls(run);
  node.setDirtyCanvas?.(true, false);
}

function onPreview(event) {
  const d = event.detail || {};
  const node = findNode(d.node);
  const run = node ? runs.get(node) : null;
  if (!run || !run.el) return;
  run.el.previews.replaceChildren(
    ...(d.images || []).map((im) => {
      const img = document.createElement("img");
      const q = new URLSearchParams({ filename: im.filename, subfolder: im.subfolder, type: im.type });
      img.src = api.apiURL(`/view?${q.toString()}&rand=${Math.random()}`);
      img.title = `${im.subfolder}/${im.filename}`;
      img.style.cssText = "height:60px;border-radius:2px;";
      return img;
    })
  );
}

// ComfyUI serves this folder twice when the pack folder's name differs from pyproject's
// [project].name (e.g. a git clone named ComfyUI-FlowTrain): once as WEB_DIRECTORY under the
// folder name and once under "comfyui-flowtrain". The second copy must not register again
// ("Extension named ... already registered") or add a second chart.
const LOADED = "__flowtrainLossChartLoaded";
if (!window[LOADED]) {
  window[LOADED] = true;
  app.registerExtension({
    name: "FlowTrain.LossChart",
    async setup() {
      api.addEventListener("flowtrain.progress", onProgress);
      api.addEventListener("flowtrain.phase", onPhase);
      api.addEventListener("flowtrain.preview", onPreview);
      api.addEventListener("flowtrain.state", onState);
      setInterval(poll, POLL_MS);
    },
    // a workflow was loaded (also the one restored after a page reload): show a run in progress
    async loadedGraphNode(node) {
      if (node?.type === TRAINER) await restore(node);
    },
    async beforeRegisterNodeDef(nodeType, nodeData) {
      if (nodeData.name !== TRAINER) return;
      const created = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const r = created?.apply(this, arguments);
        attachChart(this);
        return r;
      };
      const removed = nodeType.prototype.onRemoved;
      nodeType.prototype.onRemoved = function () {
        runs.get(this)?.observer?.disconnect();
        runs.delete(this);
        live.delete(this);
        return removed?.apply(this, arguments);
      };
    },
  });
}

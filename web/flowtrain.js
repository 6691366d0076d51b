// FlowTrain web extension: a live loss chart on the FlowTrain Trainer node.
//
// The Trainer sends "flowtrain.progress" {node, step, total, loss, lr} after every
// optimizer step, "flowtrain.phase" {node, phase, n, total, rate, eta} when the run changes
// phase (loading, encoding images, encoding captions, training, previews, saving, done) and
// while it encodes (n of total, items/s, seconds left), and "flowtrain.preview" {node,
// images: [{filename, subfolder, type}]} after each in-training preview. This draws the loss
// and its moving average in a canvas DOM widget, with the phase, step/total, loss and lr
// readout, and shows the newest previews.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TRAINER = "FlowTrainTrainer";
const WINDOW = 20; // moving-average window, the same as the engine's report
const HEIGHT = 190;
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
  const steps = run.total ? `step ${last}/${run.total}  loss ${Number.isFinite(loss) ? loss.toFixed(4) : "-"}${lr}` : "";
  const idle = phase === "training" ? "training: first step running…" : phase === "done" ? "done" : "waiting for training…";
  if (!phase || phase === "training" || phase === "done") text.textContent = steps || idle;
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

function runFor(node) {
  let run = runs.get(node);
  if (!run) {
    run = { steps: [], losses: [], total: 0, lr: NaN, phase: null, el: null, observer: null };
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
  box.append(text, canvas, previews);
  const widget = node.addDOMWidget("flowtrain_loss_chart", "flowtrain_chart", box, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => HEIGHT,
    getValue: () => undefined,
    setValue: () => {},
  });
  widget.serialize = false; // never part of widgets_values
  const run = runFor(node);
  run.el = { canvas, text, previews };
  // The canvas is laid out (and resized with the node) after this call: redraw at its real
  // size, otherwise the bitmap drawn at the fallback size is stretched and blurred.
  if (typeof ResizeObserver !== "undefined") {
    const observer = new ResizeObserver(() => draw(run));
    observer.observe(canvas);
    run.observer = observer;
  }
  draw(run);
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
  if (run.el) draw(run);
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
  }
  run.phase = { phase: d.phase, n: d.n ?? 0, total: d.total ?? 0, rate: d.rate ?? NaN, eta: d.eta ?? NaN };
  if (run.el) draw(run);
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
        return removed?.apply(this, arguments);
      };
    },
  });
}

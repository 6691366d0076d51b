// Test harness: runs web/flowtrain.js (argv[2]) with stub ComfyUI app/api modules and a stub DOM.
// stdin: one JSON array per line, either [event name, detail] (a server event), ["@click", "pause" |
// "save" | "stop"] (a click on that button), ["@reply", {status, body}] (what the next fetchApi
// call answers) or ["@load"] (ComfyUI's loadedGraphNode hook, as after a page reload).
// stdout: after each line, {text, state, shown, buttons: {pause, save, stop: [label, disabled]}, fetches}.
import { readFileSync } from "node:fs";
const src = readFileSync(process.argv[2], "utf8")
  .replace(/^import \{ app \} from .*$/m, "const app = globalThis.__app;")
  .replace(/^import \{ api \} from .*$/m, "const api = globalThis.__api;");
const listeners = {};
let ext = null;
const el = () => ({ style: {}, dataset: {}, listeners: {}, append() {}, replaceChildren() {}, textContent: "",
  clientWidth: 300, clientHeight: 120, addEventListener(n, f) { this.listeners[n] = f; },
  getContext: () => new Proxy({}, { get: (t, k) => (k in t ? t[k] : (k === "measureText" ? () => ({ width: 10 }) : () => {})), set: (t, k, v) => ((t[k] = v), true) }) });
globalThis.window = { devicePixelRatio: 1 };
globalThis.document = { createElement: el };
globalThis.setInterval = () => 0; // no polling timer: the process must end
const node = { id: 7, type: "FlowTrainTrainer", addDOMWidget: () => ({}), setDirtyCanvas() {} };
const fetches = [];
const replies = [];
globalThis.__app = { registerExtension: (e) => (ext = e), graph: { getNodeById: (id) => (String(id) === "7" ? node : null) } };
globalThis.__api = { addEventListener: (n, f) => (listeners[n] = f), apiURL: (u) => u,
  fetchApi: async (url, opts = {}) => {
    fetches.push([opts.method || "GET", url, opts.body ? JSON.parse(opts.body) : null]);
    const r = replies.shift() || { status: 404, body: { error: "no run" } };
    return { ok: r.status < 300, status: r.status, json: async () => r.body };
  } };
await import("data:text/javascript," + encodeURIComponent(src));
await ext.setup();
const nodeType = { prototype: {} };
await ext.beforeRegisterNodeDef(nodeType, { name: "FlowTrainTrainer" });
const made = [];
globalThis.document.createElement = () => { const e = el(); made.push(e); return e; };
nodeType.prototype.onNodeCreated.call(node);
// box, text, canvas, previews, controls row, state, pause, save, stop
const [text, row, state, pause, save, stop] = [made[1], made[4], made[5], made[6], made[7], made[8]];
const tick = () => new Promise((r) => setTimeout(r, 0));
const out = [];
for (const line of readFileSync(0, "utf8").trim().split("\n")) {
  const [n, d] = JSON.parse(line);
  fetches.length = 0;
  if (n === "@click") {
    ({ pause, save, stop })[d].listeners.click({ stopPropagation() {} });
  } else if (n === "@reply") {
    replies.push(d);
  } else if (n === "@load") {
    await ext.loadedGraphNode(node);
  } else {
    listeners[n]({ detail: d });
  }
  for (let i = 0; i < 5; i++) await tick();
  const b = (x) => [x.textContent, !!x.disabled];
  out.push({ text: text.textContent, state: state.textContent, shown: row.style.display === "flex",
    buttons: { pause: b(pause), save: b(save), stop: b(stop) }, fetches: [...fetches] });
}
console.log(JSON.stringify(out));

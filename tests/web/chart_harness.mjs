// Test harness: runs web/flowtrain.js (argv[2]) with stub ComfyUI app/api modules and a stub DOM,
// feeds it the JSON events on stdin ([name, detail] per line) and prints the chart text after each.
import { readFileSync } from "node:fs";
const src = readFileSync(process.argv[2], "utf8")
  .replace(/^import \{ app \} from .*$/m, "const app = globalThis.__app;")
  .replace(/^import \{ api \} from .*$/m, "const api = globalThis.__api;");
const listeners = {};
let ext = null;
const el = () => ({ style: {}, append() {}, replaceChildren() {}, textContent: "", clientWidth: 300, clientHeight: 120,
  getContext: () => new Proxy({}, { get: (t, k) => (k in t ? t[k] : (k === "measureText" ? () => ({ width: 10 }) : () => {})), set: (t, k, v) => ((t[k] = v), true) }) });
globalThis.window = { devicePixelRatio: 1 };
globalThis.document = { createElement: el };
const node = { type: "FlowTrainTrainer", addDOMWidget: () => ({}), setDirtyCanvas() {} };
const texts = [];
globalThis.__app = { registerExtension: (e) => (ext = e), graph: { getNodeById: (id) => (String(id) === "7" ? node : null) } };
globalThis.__api = { addEventListener: (n, f) => (listeners[n] = f), apiURL: (u) => u };
await import("data:text/javascript," + encodeURIComponent(src));
await ext.setup();
const nodeType = { prototype: {} };
await ext.beforeRegisterNodeDef(nodeType, { name: "FlowTrainTrainer" });
const made = [];
globalThis.document.createElement = () => { const e = el(); made.push(e); return e; };
nodeType.prototype.onNodeCreated.call(node);
const send = (name, detail) => { listeners[name]({ detail }); texts.push(made[1].textContent); };
for (const line of readFileSync(0, "utf8").trim().split("\n")) { const [n, d] = JSON.parse(line); send(n, d); }
console.log(JSON.stringify(texts));

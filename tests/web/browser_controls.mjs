// Headless Chromium on ComfyUI's own frontend: load a Trainer workflow, queue it, and use the
// node's Pause / Resume / Save now / Stop buttons; screenshots of the running and the paused node.
// Driven by tests/comfyui/test_browser_controls.py (which starts the server and checks the files).
//
//   node browser_controls.mjs <server url> <api graph .json> <trainer node id> <out dir>
// env: CHROMIUM (the browser binary), NODE_PATH (a node_modules folder holding playwright-core).
// Prints one JSON object: what it saw at each stage (state, readout, step) and the timings.
import { createRequire } from "node:module";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const require = createRequire(import.meta.url);
const { chromium } = require("playwright-core");
const [url, graphPath, trainer, outDir] = process.argv.slice(2);
const graph = JSON.parse(readFileSync(graphPath, "utf8"));
const profile = mkdtempSync(join(tmpdir(), "flowtrain-chromium-"));
const FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
  "--disable-component-update", "--disable-sync"];
const log = { stages: {} };
const t0 = Date.now();
const since = () => (Date.now() - t0) / 1000;

const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium", headless: true, args: FLAGS,
  viewport: { width: 1280, height: 1150 },
});
try {
  const page = context.pages()[0] || (await context.newPage());
  page.on("pageerror", (e) => (log.pageErrors = [...(log.pageErrors || []), String(e)]));
  const ready = async () => {
    await page.waitForFunction(() => window.app?.graph && window.__flowtrainLossChartLoaded, null, { timeout: 120000 });
    await page.keyboard.press("Escape"); // a first-run dialog, if any
  };
  await page.goto(url, { waitUntil: "domcontentloaded" });
  await ready();
  await page.evaluate((g) => window.app.loadApiJson(g, "flowtrain_controls.json"), graph);
  log.queued = await page.evaluate(async () => {
    const r = await window.app.queuePrompt(0, 1);
    return r === undefined ? true : r;
  });

  // the node's own elements: the buttons carry their action, the state badge sits before them
  const button = (action) => page.locator(`button[data-action="${action}"]`).first();
  const badge = () => page.locator('button[data-action="save"]').first().locator("xpath=preceding-sibling::span[1]");
  const readout = () => page.evaluate((id) => {
    const node = window.app.graph.getNodeById(Number(id));
    const box = node?.widgets?.find((w) => w.name === "flowtrain_loss_chart")?.element;
    return box ? box.firstChild.textContent : "";
  }, trainer);
  const stepOf = (text) => Number((/step (\d+)\//.exec(text) || [0, -1])[1]);
  const waitState = async (state, timeout = 120000) => {
    const end = Date.now() + timeout;
    while (Date.now() < end) {
      if ((await badge().textContent().catch(() => "")) === state) return;
      await page.waitForTimeout(100);
    }
    throw new Error(`the node never showed "${state}" (readout: ${await readout()})`);
  };
  const waitStep = async (above, timeout = 120000) => {
    const end = Date.now() + timeout;
    while (Date.now() < end) {
      const text = await readout();
      if (stepOf(text) > above) return text;
      await page.waitForTimeout(100);
    }
    throw new Error(`the step never passed ${above} (readout: ${await readout()})`);
  };
  // the whole Trainer in view at 100 %, 440 px wide (room for the readout), right of the sidebar
  const frame = () => page.evaluate((id) => {
    const app = window.app;
    const node = app.graph.getNodeById(Number(id));
    if (node.size[0] < 440) {
      const grow = 440 - node.size[0];
      for (const other of app.graph._nodes) if (other !== node && other.pos[0] > node.pos[0]) other.pos[0] += grow + 20;
      node.setSize([440, node.size[1]]);
    }
    const title = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
    const [left, top] = [80, 110]; // below the frontend's toolbar
    app.canvas.ds.scale = 1;
    app.canvas.ds.offset = [left - node.pos[0], top + title - node.pos[1]];
    app.canvas.setDirty(true, true);
    return { x: left - 10, y: top - 10, width: Math.ceil(node.size[0]) + 20, height: Math.ceil(node.size[1] + title) + 20 };
  }, trainer);
  const shot = async (name) => {
    const clip = await frame();
    await page.waitForTimeout(500); // DOM widgets follow the canvas on the next frames
    await page.screenshot({ path: join(outDir, name), clip });
  };
  // when each control request was answered (ms after the click)
  let clicked = 0;
  page.on("response", (r) => {
    if (r.url().includes("/flowtrain/control/")) log.answers = [...(log.answers || []), [r.status(), Date.now() - clicked]];
  });
  const click = async (action) => {
    clicked = Date.now();
    await button(action).click();
  };

  await waitState("running");
  const running = await waitStep(2);
  log.stages.running = { at: since(), readout: running };
  await shot("trainer_running.png");

  let t = Date.now();
  let before = stepOf(await readout());
  await click("pause");
  await waitState("paused");
  const pausedAt = stepOf(await readout());
  log.stages.paused = { at: since(), readout: await readout(), after_s: (Date.now() - t) / 1000, steps_after_click: pausedAt - before };
  await page.waitForTimeout(2000);
  log.stages.paused.step_2s_later = stepOf(await readout());
  await shot("trainer_paused.png");

  await page.reload({ waitUntil: "domcontentloaded" }); // the node shows the live run again
  await ready();
  await waitState("paused", 30000);
  log.stages.reloaded = { at: since(), readout: await readout() };

  t = Date.now();
  await click("resume");
  const resumed = await waitStep(pausedAt);
  log.stages.resumed = { at: since(), readout: resumed, after_s: (Date.now() - t) / 1000 };

  before = stepOf(resumed);
  await click("save");
  const saved = await waitStep(before + 1);
  log.stages.saved = { at: since(), readout: saved, state: await badge().textContent() };

  t = Date.now();
  await click("stop");
  await page.waitForFunction(() => ![...document.querySelectorAll('button[data-action="stop"]')]
    .some((b) => b.offsetParent !== null), null, { timeout: 120000 });
  log.stages.stopped = { at: since(), readout: await readout(), after_s: (Date.now() - t) / 1000 };
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
console.log(JSON.stringify(log));

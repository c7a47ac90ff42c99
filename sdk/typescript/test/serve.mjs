// A real `meterlane serve` for the tests: the repo's example config (core/examples), its
// upstreams pointed at the model simulator (gateway/simulator.py), Stripe the repo's fake one
// (tests/support/fakestripe.py), the embedded SQLite default in a folder of its own, an app key
// made with the CLI and the example offer published. The Python comes from the repo's venv
// (MLANE_PYTHON, default ../../.venv/bin/python).
import { spawn, execFile } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync, openSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");
export const PYTHON = process.env.MLANE_PYTHON ?? join(ROOT, ".venv", "bin", "python");

// the free plan also allows one llama-local call a second: a short Retry-After to wait out
const RATE_LIMIT = `[[plans.limits]]
metric = "requests"
window = "bucket:1/1s"
amount = 1
model = "llama-local"

`;

const SIMULATOR = `
import sys
from gateway.simulator import Simulator
with Simulator(ttft_ms=(1, 5), tokens_per_second=20000) as sim:
    print(sim.base_url, flush=True)
    sys.stdin.read()  # until the test closes it
`;

async function firstLine(proc, what) {
  const lines = createInterface({ input: proc.stdout });
  const exited = new Promise((_, reject) => proc.once("exit", (code) => reject(
    new Error(`${what} exited with ${code} before it was ready`))));
  const line = new Promise((resolveLine) => lines.once("line", resolveLine));
  return Promise.race([line, exited]);
}

function freePort() {
  return new Promise((resolvePort, reject) => {
    const srv = createServer();
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolvePort(port));
    });
    srv.on("error", reject);
  });
}

async function cli(env, ...args) {
  try {
    const { stdout } = await promisify(execFile)(PYTHON, ["-m", "app", ...args],
      { cwd: ROOT, env, timeout: 120_000 });
    return stdout;
  } catch (err) {
    throw new Error(`meterlane ${args.join(" ")} failed: ${err.stderr ?? err}`);
  }
}

async function waitReady(proc, base, log) {
  const deadline = Date.now() + 60_000;
  while (Date.now() < deadline) {
    if (proc.exitCode !== null) {
      throw new Error(`meterlane serve exited with ${proc.exitCode}:\n${readFileSync(log)}`);
    }
    try {
      if ((await fetch(`${base}/readyz`)).status === 200) return;
    } catch {
      // not listening yet
    }
    await new Promise((r) => setTimeout(r, 100));  // polling the process up, not syncing a test
  }
  throw new Error(`meterlane serve was not ready within 60 s:\n${readFileSync(log)}`);
}

async function call(base, key, method, path, body) {
  const resp = await fetch(base + path, { method, headers: { Authorization: `Bearer ${key}`,
    "Content-Type": "application/json" }, body: body === undefined ? undefined
    : JSON.stringify(body) });
  const doc = await resp.json();
  if (resp.status >= 300) throw new Error(`${method} ${path}: ${resp.status} ${JSON.stringify(doc)}`);
  return doc;
}

/** Start everything; returns { base, key, env, tmp, stop }. */
export async function startServer() {
  if (!existsSync(PYTHON)) {
    throw new Error(`no Python at ${PYTHON}: make the repo's venv (see the README) or set `
      + "MLANE_PYTHON");
  }
  const tmp = mkdtempSync(join(tmpdir(), "meterlane-ts-"));
  const children = [];
  const stop = async () => {
    for (const child of children.reverse()) {
      if (child.exitCode !== null) continue;
      const exited = new Promise((r) => child.once("exit", r));
      child.kill(child.meterlaneSignal ?? "SIGTERM");
      child.stdin?.end();
      await exited;
    }
    rmSync(tmp, { recursive: true, force: true });
  };
  try {
    const sim = spawn(PYTHON, ["-c", SIMULATOR], { cwd: ROOT, stdio: ["pipe", "pipe", "inherit"] });
    children.push(sim);
    const stripe = spawn(PYTHON, ["-m", "tests.support.fakestripe", "--port", "0"],
      { cwd: ROOT, stdio: ["ignore", "pipe", "inherit"] });
    children.push(stripe);
    const env = Object.fromEntries(Object.entries(process.env)
      .filter(([k]) => !k.startsWith("MLANE_")));
    Object.assign(env, { MLANE_CONFIG: join(tmp, "meterlane.toml"),
      MLANE_DATA_DIR: join(tmp, "var"), MLANE_KEY_CACHE_SECONDS: "0",
      OPENAI_API_KEY: "sk-simulator", MLANE_STRIPE_API_KEY: "sk_test_ts_sdk",
      MLANE_STRIPE_WEBHOOK_SECRET: "whsec_stripe_ts_sdk", MLANE_WEBHOOKS_ALLOW_PRIVATE: "1" });
    const example = readFileSync(join(ROOT, "core", "examples", "meterlane.toml"), "utf8");
    // the key first, on the example as it is (its upstreams are not called): it makes the
    // SQLite database while the simulator and the fake Stripe start
    writeFileSync(join(tmp, "meterlane.toml"), example);
    const [simURL, stripeLine, key] = await Promise.all([
      firstLine(sim, "the simulator"), firstLine(stripe, "the fake Stripe"),
      cli(env, "keys", "create", "--role", "app", "--app", "ts-sdk").then(
        (out) => out.trim().split("\n").pop().trim())]);
    const stripeURL = `http://127.0.0.1:${stripeLine.split(" ").pop()}`;
    const config = example.replace(/base_url = "[^"]+"/g, `base_url = "${simURL}"`)
      .replace("[stripe]\n", `[stripe]\napi_base = "${stripeURL}"\n`)
      .replace('[[plans]]\nid = "pro"', `${RATE_LIMIT}[[plans]]\nid = "pro"`);
    if (!config.includes(RATE_LIMIT) || !config.includes(stripeURL)) {
      throw new Error("the example config changed: the tests cannot adapt it");
    }
    writeFileSync(join(tmp, "meterlane.toml"), config);
    await cli(env, "plans", "sync");  // the plans' prices, in the fake Stripe (checkout)

    const port = await freePort();
    const log = join(tmp, "serve.log");
    const serve = spawn(PYTHON, ["-m", "app", "serve", "--port", String(port), "--workers", "1"],
      { cwd: ROOT, env, stdio: ["ignore", openSync(log, "w"), openSync(log, "a")] });
    serve.meterlaneSignal = "SIGINT";  // gunicorn's quick shutdown
    children.push(serve);
    const base = `http://127.0.0.1:${port}`;
    await waitReady(serve, base, log);

    const offer = JSON.parse(readFileSync(join(ROOT, "core", "examples", "offer.json"), "utf8"));
    const made = await call(base, key, "POST", "/v1/paywall/offers", offer);
    await call(base, key, "POST",
      `/v1/paywall/offers/${offer.offer}/versions/${made.version}/publish`);
    return { base, key, env, tmp, log, offer: offer.offer, stop };
  } catch (err) {
    await stop();
    throw err;
  }
}

// Every `ts` block of README.md runs against the real server: a block with its own imports as
// the module it is; a fragment after the README's `ml` (a Meterlane with the openai class).
// The names a README gives to the app's own code (myModel, userId, firstTime, showPaywall)
// are stand-ins here. The route handlers are called with a Request, as Next.js calls them.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdirSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { after, test } from "node:test";
import { fileURLToPath, pathToFileURL } from "node:url";
import { promisify } from "node:util";
import { Meterlane, sign } from "meterlane";
import { source, transpiled, tsBlocks } from "./readme.mjs";
import { useServer, userName } from "./shared.mjs";

const HERE = dirname(fileURLToPath(import.meta.url));
const OUT = join(HERE, ".readme");  // inside the package: "meterlane" and "openai" resolve
const server = useServer();
const shown = [];
const seen = new Set();
Object.assign(globalThis, {
  myModel: async (_prompt, { maxTokens }) => ({ text: "a summary", inputTokens: 1100,
    outputTokens: Math.min(600, maxTokens) }),
  userId: async (request) => request.headers.get("x-test-user"),
  firstTime: async (id) => !seen.has(id) && Boolean(seen.add(id)),
  showPaywall: async (user, event) => { shown.push([user, event.id]); },
});
const SECRET = "whsec_readme_test";

/** What the README's blocks read: set in each test, once the server is up. */
function environment() {
  mkdirSync(OUT, { recursive: true });
  assert.ok(server.base, "the server is up");
  Object.assign(process.env, { MLANE_URL: server.base, MLANE_KEY: server.key,
    MLANE_WEBHOOK_SECRET: SECRET });
}
after(() => rmSync(OUT, { recursive: true, force: true }));

const post = (user, body, headers = {}) => new Request("http://app.example/api", {
  method: "POST", body, headers: { "x-test-user": user, ...headers } });

// what each route file of the README must do when called
const ROUTES = {
  "app/api/chat/route.ts": async (mod) => {
    const user = userName("chat");
    const ok = await mod.POST(post(user, JSON.stringify({ message: "Hello" })));
    assert.equal(ok.status, 200);
    assert.equal(typeof (await ok.json()).reply, "string");
    const ml = new Meterlane({ baseURL: server.base, apiKey: server.key });
    await ml.track({ user, model: "gpt-4o-mini", inputTokens: 20000, outputTokens: 0,
      idempotencyKey: `${user}-all` });
    const spent = await mod.POST(post(user, JSON.stringify({ message: "Hello" })));
    assert.equal(spent.status, 402);
    assert.ok((await spent.json()).paywall.includes(server.offer));
  },
  "app/api/quota/route.ts": async (mod) => {
    assert.equal(mod.runtime, "edge");
    const resp = await mod.GET(new Request("http://app.example/api/quota",
      { headers: { "x-test-user": userName("edge") } }));
    assert.equal(resp.status, 200);
    const limits = await resp.json();
    assert.deepEqual(limits.find((l) => l.id === "tokens-day").used, 0);
  },
  "app/api/hooks/meterlane/route.ts": async (mod) => {
    assert.equal(mod.runtime, "edge");
    const body = JSON.stringify({ id: "evt_readme_1", type: "usage.limit_reached",
      created: 1, data: { user: "user-42" } });
    const header = { "Meterlane-Signature": await sign(body, SECRET) };
    assert.equal((await mod.POST(post("-", body, header))).status, 200);
    assert.equal((await mod.POST(post("-", body, header))).status, 200);  // delivered twice
    assert.deepEqual(shown, [["user-42", "evt_readme_1"]]);               // shown once
    const forged = { "Meterlane-Signature": await sign(body, "whsec_someone_else") };
    assert.equal((await mod.POST(post("-", body, forged))).status, 400);
    assert.equal((await mod.POST(post("-", body.replace("42", "43"), header))).status, 400);
  },
};

test("the README has the blocks this test knows", () => {
  const routes = tsBlocks().map(([, code]) => /^\/\/ (app\/\S+route\.ts)/.exec(code)?.[1])
    .filter(Boolean);
  assert.deepEqual(routes.sort(), Object.keys(ROUTES).sort());
  assert.ok(tsBlocks().length >= 7);
});

for (const [line, code] of tsBlocks()) {
  test(`README.md:${line} runs`, async () => {
    environment();
    const file = join(OUT, `block-${line}.mjs`);
    writeFileSync(file, transpiled(code));
    const mod = await import(pathToFileURL(file).href);
    const route = /^\/\/ (app\/\S+route\.ts)/.exec(code)?.[1];
    if (route) await ROUTES[route](mod);
  });
}

test("the README's blocks type-check against the package's declarations", async () => {
  environment();
  const dir = join(OUT, "typecheck");
  mkdirSync(dir, { recursive: true });
  for (const [line, code] of tsBlocks()) writeFileSync(join(dir, `block-${line}.ts`), source(code));
  writeFileSync(join(dir, "app.d.ts"), `// the app's own code, which the README only names
declare function myModel(prompt: string, options: { maxTokens: number | null }):
  Promise<{ text: string; inputTokens: number; outputTokens: number }>;
declare function userId(request: Request): Promise<string>;
declare function firstTime(eventId: string): Promise<boolean>;
declare function showPaywall(user: string, event: unknown): Promise<void>;
`);
  writeFileSync(join(dir, "tsconfig.json"), JSON.stringify({ compilerOptions: {
    target: "ES2022", module: "NodeNext", moduleResolution: "NodeNext", strict: true,
    noEmit: true, types: ["node"], lib: ["ES2022", "DOM"], skipLibCheck: true },
  include: ["*.ts"] }));
  const tsc = join(HERE, "..", "node_modules", "typescript", "bin", "tsc");
  await promisify(execFile)(process.execPath, [tsc, "-p", dir]).catch((err) => {
    assert.fail(`tsc: ${err.stdout}${err.stderr}`);
  });
});

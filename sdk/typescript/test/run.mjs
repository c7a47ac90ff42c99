// `npm test`: one real `meterlane serve` (test/serve.mjs) for every test file, then Node's own
// test runner over them. The files read the server from MLANE_TS_BASE / MLANE_TS_KEY; a file
// run alone (`node --test test/sdk.test.mjs`) starts a server of its own.
import { spawn } from "node:child_process";
import { readdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { startServer } from "./serve.mjs";

const here = dirname(fileURLToPath(import.meta.url));
// `--with-pack` (CI): the pack-and-install check too, on the same server
const args = process.argv.slice(2);
const withPack = args.includes("--with-pack");
const named = args.filter((a) => a !== "--with-pack");
const files = named.length > 0 ? named.map((f) => join(process.cwd(), f))
  : readdirSync(here).filter((f) => f.endsWith(".test.mjs")
    && (withPack || f !== "pack.test.mjs")).map((f) => join(here, f));

const started = Date.now();
const server = await startServer();
console.log(`# meterlane serve at ${server.base} (ready in ${Date.now() - started} ms)`);
for (const signal of ["SIGINT", "SIGTERM"]) {  // interrupted: no server left behind
  process.once(signal, () => { server.stop().finally(() => process.exit(130)); });
}
let code = 1;
try {
  const runner = spawn(process.execPath, ["--test", "--test-concurrency=1", ...files], {
    stdio: "inherit", env: { ...process.env, MLANE_TS_BASE: server.base, MLANE_TS_KEY: server.key,
      MLANE_TS_OFFER: server.offer } });
  code = await new Promise((resolve) => runner.on("exit", (c) => resolve(c ?? 1)));
} finally {
  await server.stop();
}
process.exit(code);

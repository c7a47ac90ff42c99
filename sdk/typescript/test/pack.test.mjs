// `npm pack`: the tarball installs into an empty folder (with openai, its optional peer) and
// the README's first example runs there against the real server, from ESM; CommonJS loads too.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { transpiled, tsBlocks } from "./readme.mjs";
import { useServer } from "./shared.mjs";

const PKG = join(dirname(fileURLToPath(import.meta.url)), "..");
const run = promisify(execFile);
const server = useServer();

test("the packed tarball installs into an empty folder and runs the README's example",
  async () => {
    const folder = mkdtempSync(join(tmpdir(), "meterlane-pack-"));
    try {
      const { stdout: packed } = await run("npm", ["pack", "--json", "--pack-destination", folder],
        { cwd: PKG });
      const [{ filename, files }] = JSON.parse(packed);
      const names = files.map((f) => f.path);
      assert.ok(names.includes("dist/esm/index.js") && names.includes("dist/cjs/index.js")
        && names.includes("dist/esm/index.d.ts") && names.includes("README.md"), names);
      assert.ok(!names.some((n) => n.startsWith("src/") || n.startsWith("test/")), names);
      const openai = JSON.parse(readFileSync(join(PKG, "node_modules", "openai", "package.json"),
        "utf8")).version;
      writeFileSync(join(folder, "package.json"), JSON.stringify({ name: "empty", private: true,
        type: "module" }));
      await run("npm", ["install", "--no-audit", "--no-fund", "--prefer-offline",
        join(folder, filename), `openai@${openai}`], { cwd: folder });
      const [[line, example]] = tsBlocks();
      writeFileSync(join(folder, "example.mjs"), transpiled(example));
      const { stdout } = await run(process.execPath, ["example.mjs"], { cwd: folder,
        env: { ...process.env, MLANE_URL: server.base, MLANE_KEY: server.key } });
      assert.match(stdout, /^tokens-day \d+ \d+ \S+$/m, `README.md:${line} printed: ${stdout}`);
      const { stdout: cjs } = await run(process.execPath, ["-e",
        "const m = require('meterlane'); console.log(typeof m.Meterlane, typeof m.webhooks.verify)"],
      { cwd: folder });
      assert.equal(cjs.trim(), "function function");
    } finally {
      rmSync(folder, { recursive: true, force: true });
    }
  });

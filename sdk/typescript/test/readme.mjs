// The README's `ts` blocks, as modules Node runs (test/readme.test.mjs, test/pack.test.mjs).
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import ts from "typescript";

const README = readFileSync(join(dirname(fileURLToPath(import.meta.url)), "..", "README.md"),
  "utf8");
const PRELUDE = `import OpenAI from "openai";
import { BadRequest, Conflict, ConnectionFailed, InvalidSignature, Lease, Meterlane,
  MeterlaneError, NotFound, PermissionDenied, QuotaExceeded, RateLimited, ServiceUnavailable,
  webhooks } from "meterlane";
const ml = new Meterlane({ baseURL: process.env.MLANE_URL!, apiKey: process.env.MLANE_KEY!,
  OpenAI });
`;

/** [line, code] of every ts block. */
export function tsBlocks(text = README) {
  return [...text.matchAll(/^```ts\n([\s\S]*?)^```/gm)].map((m) => [
    text.slice(0, m.index).split("\n").length, m[1]]);
}

/** The block as a module: with its own imports, or after the README's `ml`. */
export function source(code) {
  return /^import /m.test(code) ? code : PRELUDE + code;
}

/** The block as an ES module Node runs. */
export function transpiled(code) {
  return ts.transpileModule(source(code), { compilerOptions: {
    module: ts.ModuleKind.ESNext, target: ts.ScriptTarget.ES2022 } }).outputText;
}

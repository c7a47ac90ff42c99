// Meterlane-Signature, checked against an HMAC computed here with node:crypto (not the SDK's
// own code), and the package's portability: its ESM build needs nothing but fetch and Web
// Crypto (what an edge runtime has).
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { readdirSync, readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { InvalidSignature, sign, verify, webhooks } from "meterlane";

const SECRET = "whsec_unit";
const header = (body, t, secret = SECRET) =>
  `t=${t},v1=${createHmac("sha256", secret).update(`${t}.`).update(body).digest("hex")}`;

test("a signature made as the server makes it verifies, as bytes or text", async () => {
  const t = Math.floor(Date.now() / 1000);
  const body = Buffer.from(JSON.stringify({ id: "evt_1", type: "usage.threshold_crossed",
    created: t, data: { user: "ünïcode-42", threshold: 80 } }));
  assert.equal((await verify(body, header(body, t), SECRET)).id, "evt_1");
  assert.equal((await verify(body.toString(), header(body, t), SECRET)).data.threshold, 80);
  assert.equal((await webhooks.verify(new Uint8Array(body).buffer, header(body, t), SECRET)).id,
    "evt_1");
  assert.equal(await sign(body, SECRET, t), header(body, t));
});

test("anything else is InvalidSignature", async () => {
  const t = 1_700_000_000;
  const body = '{"id": "evt_2"}';
  const good = header(body, t);
  const opts = { now: t };
  assert.equal((await verify(body, good, SECRET, opts)).id, "evt_2");
  for (const [bad, why] of [
    [undefined, /malformed/], ["", /malformed/], [`v1=${good.split("v1=")[1]}`, /malformed/],
    [`t=abc,v1=00`, /malformed/], [good.replace(/v1=../, "v1=zz"), /does not match/],
    [good.toUpperCase().replace("T=", "t=").replace("V1=", "v1="), /does not match/],
    [header(body, t, "whsec_other"), /does not match/], [header(body + " ", t), /does not match/],
    [good.slice(0, -2), /does not match/]]) {
    await assert.rejects(verify(body, bad, SECRET, opts), (e) => e instanceof InvalidSignature
      && why.test(e.message), String(bad));
  }
  await assert.rejects(verify(body, good, SECRET, { now: t + 301 }), /tolerance/);
  await assert.rejects(verify(body, good, SECRET, { now: t - 301 }), /tolerance/);
  assert.equal((await verify(body, good, SECRET, { now: t + 600, tolerance: 600 })).id, "evt_2");
});

test("the CommonJS build verifies the same", async () => {
  const cjs = createRequire(import.meta.url)("meterlane");
  const t = Math.floor(Date.now() / 1000);
  assert.equal((await cjs.webhooks.verify("{\"id\": 3}", header("{\"id\": 3}", t), SECRET)).id, 3);
  await assert.rejects(cjs.verify("{}", header("{ }", t), SECRET), cjs.InvalidSignature);
});

test("the ESM build imports only itself and uses no Node globals", () => {
  const dist = join(dirname(fileURLToPath(import.meta.url)), "..", "dist", "esm");
  for (const file of readdirSync(dist).filter((f) => f.endsWith(".js"))) {
    const code = readFileSync(join(dist, file), "utf8").replace(/\/\*[\s\S]*?\*\/|\/\/.*$/gm, "");
    for (const [, spec] of code.matchAll(/\bfrom\s+"([^"]+)"/g)) {
      assert.match(spec, /^\.\/[\w-]+\.js$/, `${file} imports ${spec}`);
    }
    assert.doesNotMatch(code, /\b(process|Buffer|require|__dirname)\b/, file);
    // the one dynamic import: node:crypto's webcrypto on Node 18, where there is no global one
    assert.deepEqual([...code.matchAll(/\bimport\(/g)].length, file === "crypto.js" ? 1 : 0, file);
  }
});

// The SDK against a real `meterlane serve` (test/serve.mjs): its ways of use, typed errors,
// retries that honour Retry-After, timeouts and AbortSignal, the paywall's offers, consents
// and checkout, and the webhooks it signs.
import assert from "node:assert/strict";
import { createServer } from "node:http";
import { createRequire } from "node:module";
import { describe, test } from "node:test";
import OpenAI from "openai";
import { BadRequest, Conflict, ConnectionFailed, Lease, Meterlane, MeterlaneError, NotFound,
  PermissionDenied, QuotaExceeded, RateLimited, InvalidSignature, webhooks } from "meterlane";
import { useServer, userName } from "./shared.mjs";

const server = useServer();
const client = (options = {}) => new Meterlane({ baseURL: server.base, apiKey: server.key,
  OpenAI, ...options });
const used = async (ml, user, id = "tokens-day") =>
  (await ml.quota(user)).limits.find((l) => l.id === id).used;

/** A loopback server that accepts connections and never answers; counts the requests. */
async function silentServer() {
  const hung = [];
  const srv = createServer((req, res) => { hung.push(res); });
  await new Promise((r) => srv.listen(0, "127.0.0.1", r));
  return { url: `http://127.0.0.1:${srv.address().port}`, get requests() { return hung.length; },
    close: () => new Promise((r) => { hung.forEach((res) => res.destroy());
      srv.closeAllConnections(); srv.close(r); }) };
}

describe("the three ways of use", () => {
  test("gateway, metered, track: each counted once in the quota", async () => {
    const ml = client();
    const user = userName("ann");
    const reply = await ml.openai({ user }).chat.completions.create({
      model: "gpt-4o-mini", max_tokens: 20, messages: [{ role: "user", content: "Say hello" }] });
    const throughGateway = reply.usage.total_tokens;
    assert.ok(throughGateway > 0);
    const answer = await ml.metered({ user, model: "gpt-4o-mini", inputTokens: 30,
      maxOutputTokens: 50 }, async (call) => {
      assert.equal(call.maxOutputTokens, 50);
      call.record({ inputTokens: 28, outputTokens: 41 });
      return "the model's answer";
    });
    assert.equal(answer, "the model's answer");
    // a block that throws releases its reservation, and the error is the block's own
    await assert.rejects(ml.metered({ user, model: "gpt-4o-mini", inputTokens: 10,
      maxOutputTokens: 10 }, () => { throw new RangeError("the model failed"); }), RangeError);
    // track afterwards, once per idempotency key (a repeat counts nothing)
    const first = await ml.track({ user, model: "gpt-4o-mini", inputTokens: 7, outputTokens: 3,
      idempotencyKey: `${user}-job-1` });
    const again = await ml.track({ user, model: "gpt-4o-mini", inputTokens: 7, outputTokens: 3,
      idempotencyKey: `${user}-job-1` });
    assert.deepEqual([first.outcome, again.outcome], ["tracked", "duplicate"]);
    const quota = await ml.quota(user);
    const day = quota.limits.find((l) => l.id === "tokens-day");
    assert.equal(day.used, throughGateway + 28 + 41 + 10);
    assert.equal(day.remaining, day.limit - day.used);
    assert.equal(quota.plan.id, "free");
    const credits = await ml.credits(user);
    assert.equal(credits.user, user);
    assert.equal(typeof credits.balance, "number");
  });

  test("reserve -> settle and release by hand; a lease settles once", async () => {
    const ml = client();
    const user = userName("bea");
    const lease = await ml.reserve({ user, model: "gpt-4o-mini",
      messages: [{ role: "user", content: "count these words for me" }], maxOutputTokens: 100 });
    assert.ok(lease instanceof Lease);
    assert.ok(lease.doc.input_tokens > 0);  // the server counted the messages
    assert.equal(lease.grantedOutputTokens, 100);
    const settled = await lease.settle({ inputTokens: 12, outputTokens: 30 });
    assert.equal(settled.outcome, "settled");
    assert.match(settled.cost_usd, /^\d+\.\d+$/);  // a decimal string, never a float
    assert.ok(lease.done);
    await assert.rejects(lease.release(), (err) => err instanceof Conflict
      && err.code === "lease_settled");
    const other = await ml.reserve({ user, model: "gpt-4o-mini", inputTokens: 5,
      maxOutputTokens: 5 });
    assert.equal((await other.release()).outcome, "released");
    assert.equal(await used(ml, user), 42);
  });

  test("a metered block without usage is an error and records nothing", async () => {
    const ml = client();
    const user = userName("bo");
    await assert.rejects(ml.metered({ user, model: "gpt-4o-mini", inputTokens: 10,
      maxOutputTokens: 10 }, () => "no record"), (err) => err instanceof MeterlaneError
      && /without call\.record/.test(err.message));
    assert.equal(await used(ml, user), 0);
  });

  test("trackBatch: event times, idempotency per event, the bound on late events", async () => {
    const ml = client();
    const user = userName("cal");
    const anHourAgo = new Date(Date.now() - 3600_000);
    const events = [
      { user, model: "gpt-4o-mini", inputTokens: 100, outputTokens: 10,
        idempotencyKey: `${user}-a`, timestamp: anHourAgo },
      { user, model: "gpt-4o-mini", inputTokens: 50, outputTokens: 5, cachedInputTokens: 20,
        idempotencyKey: `${user}-b` },
    ];
    const first = await ml.trackBatch(events);
    assert.deepEqual([first.tracked, first.duplicates], [2, 0]);
    assert.deepEqual(first.data.map((d) => d.outcome), ["tracked", "tracked"]);
    const again = await ml.trackBatch(events);
    assert.deepEqual([again.tracked, again.duplicates], [0, 2]);
    const sameDay = anHourAgo.toISOString().slice(0, 10) === new Date().toISOString().slice(0, 10);
    assert.equal(await used(ml, user), sameDay ? 165 : 55);
    const late = new Date(Date.now() - 40 * 86400_000);
    await assert.rejects(ml.track({ user, model: "gpt-4o-mini", inputTokens: 1, outputTokens: 1,
      idempotencyKey: `${user}-late`, timestamp: late }), (err) => err instanceof BadRequest
      && err.status === 422);
  });
});

describe("typed errors", () => {
  test("QuotaExceeded carries the limit and the paywall's offers", async () => {
    const ml = client();
    const user = userName("cy");
    await ml.track({ user, model: "gpt-4o-mini", inputTokens: 19995, outputTokens: 0,
      idempotencyKey: `${user}-big` });
    const err = await ml.reserve({ user, model: "gpt-4o-mini", inputTokens: 20,
      maxOutputTokens: 10 }).then(() => null, (e) => e);
    assert.ok(err instanceof QuotaExceeded, String(err));
    assert.equal(err.status, 402);
    assert.equal(err.limit.id, "tokens-day");
    assert.equal(err.limit.used, 19995);
    assert.equal(err.paywall.trigger, "limit_reached");
    assert.ok(err.offers.some((o) => o.offer === server.offer), JSON.stringify(err.paywall));
    const events = await ml.paywallEvents({ user });
    assert.ok(events.data.some((e) => e.trigger === "limit_reached"
      && e.id === err.paywall.event_id));
    // through the gateway, the openai SDK's own error carries the 402
    await assert.rejects(ml.openai({ user, maxRetries: 0 }).chat.completions.create({
      model: "gpt-4o-mini", messages: [{ role: "user", content: "hi" }] }),
    (e) => e instanceof OpenAI.APIError && e.status === 402);
  });

  test("BadRequest, NotFound, PermissionDenied, ConnectionFailed", async () => {
    const ml = client();
    const user = userName("dan");
    await assert.rejects(ml.reserve({ user, model: "gpt-4o-mini", inputTokens: -5 }),
      (e) => e instanceof BadRequest && [400, 422].includes(e.status) && e.code !== null);
    await assert.rejects(new Lease(ml, { lease_id: "ls_1_1_nope" }).settle(
      { inputTokens: 1, outputTokens: 1 }), (e) => e instanceof NotFound && e.status === 404);
    await assert.rejects(client({ apiKey: "mlk_wrong_key" }).quota(user),
      (e) => e instanceof PermissionDenied && e.status === 401);
    await assert.rejects(client({ baseURL: "http://127.0.0.1:9", maxRetries: 1, backoff: 10 })
      .quota(user), (e) => e instanceof ConnectionFailed && e.status === 0);
  });

  test("the CommonJS build throws the same kinds", async () => {
    const cjs = createRequire(import.meta.url)("meterlane");
    const ml = new cjs.Meterlane({ baseURL: server.base, apiKey: "mlk_wrong_key" });
    await assert.rejects(ml.quota("x"), (e) => e instanceof cjs.PermissionDenied);
  });
});

describe("retries, timeouts, cancelling", () => {
  test("a rate limit is retried after the server's Retry-After", async () => {
    const user = userName("dee");
    const once = client({ maxRetries: 0 });
    await once.track({ user, model: "llama-local", inputTokens: 1, outputTokens: 0,
      idempotencyKey: `${user}-r0` });  // the bucket's one call this second
    const err = await once.reserve({ user, model: "llama-local", inputTokens: 1,
      maxOutputTokens: 1 }).then(() => null, (e) => e);
    assert.ok(err instanceof RateLimited, String(err));
    assert.equal(err.retryAfter, 1);
    const patient = client({ maxRetries: 2, backoff: 10 });  // without Retry-After: 30 ms
    const eve = userName("eve");
    await patient.track({ user: eve, model: "llama-local", inputTokens: 1, outputTokens: 0,
      idempotencyKey: `${eve}-e0` });
    const started = performance.now();
    const lease = await patient.reserve({ user: eve, model: "llama-local", inputTokens: 1,
      maxOutputTokens: 1 });
    assert.ok(performance.now() - started >= 900, "it waited what Retry-After said");
    await lease.release();
  });

  test("a timeout: reads are tried again, a reserve is not", async () => {
    const silent = await silentServer();
    try {
      const ml = new Meterlane({ baseURL: silent.url, apiKey: "k", timeout: 200, maxRetries: 2,
        backoff: 10 });
      await assert.rejects(ml.quota("u"), (e) => e instanceof ConnectionFailed
        && /200 ms/.test(e.message));
      assert.equal(silent.requests, 3);
      await assert.rejects(ml.reserve({ model: "m", inputTokens: 1 }, { timeout: 100 }),
        ConnectionFailed);
      assert.equal(silent.requests, 4);  // a lost reserve is not repeated: it expires by itself
    } finally {
      await silent.close();
    }
  });

  test("an AbortSignal cancels the call, with no retry", async () => {
    const silent = await silentServer();
    try {
      const ml = new Meterlane({ baseURL: silent.url, apiKey: "k", maxRetries: 2 });
      const controller = new AbortController();
      const pending = ml.quota("u", { signal: controller.signal });
      while (silent.requests === 0) await new Promise((r) => setTimeout(r, 5));
      controller.abort(new Error("the user left"));
      await assert.rejects(pending, /the user left/);
      assert.equal(silent.requests, 1);
      await assert.rejects(ml.quota("u", { signal: AbortSignal.abort() }), { name: "AbortError" });
      assert.equal(silent.requests, 1);
    } finally {
      await silent.close();
    }
  });
});

describe("the paywall: offers, consent, checkout", () => {
  test("an offer as served, the user's consent to it, and the checkout it starts", async () => {
    const ml = client();
    const user = userName("fay");
    const offers = await ml.offers({ user, jurisdiction: "US-CA", locale: "en" });
    assert.equal(offers.jurisdiction, "US-CA");
    const offer = offers.data.find((o) => o.offer === server.offer);
    assert.ok(offer, JSON.stringify(offers));
    const base = { user, successUrl: "https://app.example/ok",
      cancelUrl: "https://app.example/back", plan: "pro" };
    const refused = await ml.checkout(base).then(() => null, (e) => e);
    assert.ok(refused instanceof Conflict, String(refused));
    assert.equal(refused.rule, "CNS-01");
    const consent = await ml.recordConsent({ user, offer, ip: "203.0.113.7",
      userAgent: "Mozilla/5.0 (test)", renderManifest: { disclosure_in_viewport: true,
        default_state: "unchecked", dismiss_present: true, cta_label: offer.cta_label } });
    assert.match(consent.consent_id, /^cns_/);
    assert.equal(consent.disclosure_text, offer.disclosure);
    const session = await ml.checkout({ ...base, consentId: consent.consent_id,
      idempotencyKey: `${user}-checkout` });
    assert.match(session.url, /^https?:\/\//);
    // the same request again with its key: the first answer, not a second checkout
    const replayed = await ml.checkout({ ...base, consentId: consent.consent_id,
      idempotencyKey: `${user}-checkout` });
    assert.equal(replayed.id, session.id);
    assert.equal((await ml.getConsent(consent.consent_id)).checkout_session_id, session.id);
    // the consent started its one checkout: another use is refused
    await assert.rejects(ml.checkout({ ...base, consentId: consent.consent_id }), Conflict);
  });

  test("a consent to something else than what was served is refused", async () => {
    const ml = client();
    const user = userName("gus");
    const [offer] = (await ml.offers({ user, jurisdiction: "EU-DE", locale: "de" })).data;
    await assert.rejects(ml.recordConsent({ user, offer: { ...offer, price: "1.00 EUR" },
      renderManifest: { disclosure_in_viewport: true, default_state: "unchecked",
        cta_label: offer.cta_label } }), (e) => e instanceof Conflict && e.rule !== null);
  });
});

describe("webhooks", () => {
  test("a paywall event delivered by the server verifies; altered or replayed, it does not",
    async () => {
      const deliveries = [];
      const receiver = createServer((req, res) => {
        const chunks = [];
        req.on("data", (c) => chunks.push(c));
        req.on("end", () => {
          deliveries.push({ body: Buffer.concat(chunks),
            signature: req.headers["meterlane-signature"] });
          res.end();
        });
      });
      await new Promise((r) => receiver.listen(0, "127.0.0.1", r));
      try {
        const ml = client();
        const resp = await fetch(`${server.base}/v1/webhooks`, { method: "PUT",
          headers: { Authorization: `Bearer ${server.key}`, "Content-Type": "application/json" },
          body: JSON.stringify({ url: `http://127.0.0.1:${receiver.address().port}/hook`,
            rotate_secret: true }) });
        const { secret } = await resp.json();
        assert.ok(secret, "the endpoint's secret");
        const user = userName("hal");
        await ml.track({ user, model: "gpt-4o-mini", inputTokens: 19999, outputTokens: 0,
          idempotencyKey: `${user}-x` });
        const spent = await ml.reserve({ user, model: "gpt-4o-mini", inputTokens: 10,
          maxOutputTokens: 10 }).then(() => null, (e) => e);
        assert.ok(spent instanceof QuotaExceeded);
        const deadline = Date.now() + 30_000;
        let found;
        while (!found && Date.now() < deadline) {  // the server delivers in the background
          for (const d of deliveries) {
            const event = JSON.parse(d.body);
            if (event.data?.user === user && event.type === "usage.limit_reached") found = d;
          }
          if (!found) await new Promise((r) => setTimeout(r, 100));
        }
        assert.ok(found, "the limit_reached event was delivered");
        const event = await webhooks.verify(found.body, found.signature, secret);
        assert.equal(event.id, spent.paywall.event_id);
        const text = new TextDecoder().decode(found.body);
        assert.equal((await webhooks.verify(text, found.signature, secret)).id, event.id);
        await assert.rejects(webhooks.verify(text.replace(user, "mallory"), found.signature,
          secret), InvalidSignature);
        await assert.rejects(webhooks.verify(found.body, found.signature, "whsec_other"),
          InvalidSignature);
        const t = Number(/t=(\d+)/.exec(found.signature)[1]);
        await assert.rejects(webhooks.verify(found.body, found.signature, secret,
          { now: t + 301 }), /tolerance/);
      } finally {
        receiver.closeAllConnections();
        await new Promise((r) => receiver.close(r));
      }
    });
});

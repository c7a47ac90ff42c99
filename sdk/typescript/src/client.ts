/** The Meterlane client: an OpenAI client that goes through the gateway, what an end user has
 * left, reserve -> settle around calls the app makes itself, reporting calls afterwards, and
 * the paywall's offers, consents and checkout. It speaks HTTP only (`fetch`). */

import { sha256Hex } from "./crypto.js";
import { MeterlaneError } from "./errors.js";
import { Transport, write, type Call, type RequestOptions } from "./http.js";
import type { BatchResult, CheckoutSession, Consent, Credits, LeaseDocument, LimitState,
  MeterResult, Offer, OfferList, PaywallEventList, Quota } from "./types.js";

/** What `new OpenAI(...)` is given: the gateway, the key, and the end user's header. */
export interface OpenAIClientOptions {
  baseURL: string;
  apiKey: string;
  defaultHeaders: Record<string, string>;
  timeout: number;
  maxRetries: number;
  [key: string]: unknown;
}

export type OpenAIConstructor = new (options: any) => unknown;

export interface MeterlaneOptions<O extends OpenAIConstructor = OpenAIConstructor> {
  /** Where Meterlane answers, e.g. "http://127.0.0.1:8080" (without /v1). */
  baseURL: string;
  /** An app key (acts for any end user of its app: name them with `user`) or an end user's
   * key (acts only for its own user: leave `user` out). */
  apiKey: string;
  /** Milliseconds one attempt may take (default 30,000). */
  timeout?: number;
  /** How many times a failed call is tried again (default 2). */
  maxRetries?: number;
  /** The first backoff between attempts in milliseconds, when the server names no
   * Retry-After (default 500; doubled each time, with jitter). */
  backoff?: number;
  /** Another `fetch` (a proxy's, a test's). Default: the global one. */
  fetch?: typeof fetch;
  /** The `openai` package's class (`import OpenAI from "openai"`), for `.openai()`. */
  OpenAI?: O;
}

/** Token counts of one call, as the model reported them. */
export interface Usage {
  inputTokens: number;
  outputTokens: number;
  cachedInputTokens?: number;
  reasoningTokens?: number;
  /** Of the input, written to a prompt cache (priced at cache_write). */
  cacheWriteTokens?: number;
}

export interface ReserveArgs {
  model: string;
  /** The end user (app keys); an end user's key acts as its own user. */
  user?: string;
  /** Prompt tokens, if the app counted them; else give `messages` to count. */
  inputTokens?: number;
  messages?: unknown[];
  /** Output the call may generate (default: the plan's default_max_output_tokens). */
  maxOutputTokens?: number;
}

export interface TrackArgs extends Usage {
  model: string;
  /** The call is counted once per key, however often it is sent. */
  idempotencyKey: string;
  user?: string;
  /** When the call happened (default: now): a Date, or RFC 3339 with a zone. At most the
   * server's `[metering] max_event_age` (35 days) ago and 5 minutes ahead. */
  timestamp?: Date | string;
}

export interface OffersArgs {
  user?: string;
  /** US-CA, DE, FR, EU-FR, ...; unknown or absent: the strictest profile. */
  jurisdiction?: string;
  platform?: "web" | "ios" | "android";
  locale?: string;
}

export interface ConsentArgs {
  /** The offer as `offers()` served it and the user saw it. */
  offer: Offer;
  /** How it was shown: `disclosure_in_viewport`, `default_state` ("unchecked"),
   * `cta_label`, `dismiss_present`. */
  renderManifest: Record<string, unknown>;
  user?: string;
  type?: "auto_renewal" | "tos" | "eu_early_start" | "eu_waiver_ack" | "auto_recharge";
  platform?: "web" | "ios" | "android";
  /** The end user's address and browser, as the app saw them (app keys). */
  ip?: string;
  userAgent?: string;
  idempotencyKey?: string;
}

export interface CheckoutArgs {
  user: string;
  successUrl: string;
  cancelUrl: string;
  plan?: string;
  creditPack?: string;
  /** A plan checkout needs the user's auto-renewal consent (`recordConsent`). */
  consentId?: string;
  idempotencyKey?: string;
}

export class Meterlane<O extends OpenAIConstructor = OpenAIConstructor> {
  readonly baseURL: string;
  readonly apiKey: string;
  readonly maxRetries: number;
  private readonly http: Transport;
  private readonly OpenAI: O | undefined;

  constructor(options: MeterlaneOptions<O>) {
    if (!options?.baseURL || !options.apiKey) {
      throw new TypeError("new Meterlane({ baseURL, apiKey }): both are needed");
    }
    this.baseURL = options.baseURL.replace(/\/+$/, "");
    this.apiKey = options.apiKey;
    this.maxRetries = options.maxRetries ?? 2;
    this.OpenAI = options.OpenAI;
    this.http = new Transport({
      baseURL: this.baseURL, apiKey: this.apiKey, timeout: options.timeout ?? 30_000,
      maxRetries: this.maxRetries, backoff: (options.backoff ?? 500) / 1000,
      fetch: options.fetch,
    });
  }

  // -- 1. calls through the gateway ------------------------------------------------------

  /** An `openai` client whose calls go through Meterlane, metered for `user`. Needs the
   * `openai` package's class, given here or to the constructor. */
  openai(options: { user?: string; OpenAI?: O; [key: string]: unknown } = {}
  ): InstanceType<O> {
    const { OpenAI = this.OpenAI, ...rest } = options;
    if (OpenAI === undefined) {
      throw new TypeError("meterlane.openai() needs the openai package's class: "
        + "new Meterlane({ ..., OpenAI }) with `import OpenAI from \"openai\"`");
    }
    return new OpenAI(this.openaiOptions(rest)) as InstanceType<O>;
  }

  /** What `new OpenAI(...)` takes to go through Meterlane for `user` (any other option of
   * the openai client passes through). */
  openaiOptions(options: { user?: string; [key: string]: unknown } = {}): OpenAIClientOptions {
    const { user, defaultHeaders, timeout, maxRetries, ...rest } = options;
    const headers: Record<string, string> = { ...(defaultHeaders as Record<string, string>) };
    if (user !== undefined) headers["X-Meterlane-User"] = user;
    return { ...rest, baseURL: `${this.baseURL}/v1`, apiKey: this.apiKey,
      defaultHeaders: headers, timeout: (timeout as number | undefined) ?? 600_000,
      maxRetries: (maxRetries as number | undefined) ?? this.maxRetries };
  }

  // -- 2. what an end user has left ----------------------------------------------------

  /** Every limit of the user's plan: used, remaining, limit, resets_at (an end user's key:
   * its own, with `user` left out). */
  quota(user?: string, opts?: RequestOptions): Promise<Quota> {
    return this.send({ method: "GET", path: userPath(user, "quota"), retry: "safe" }, opts);
  }

  /** The user's credit balance and grants. */
  credits(user?: string, opts?: RequestOptions): Promise<Credits> {
    return this.send({ method: "GET", path: userPath(user, "credits"), retry: "safe" }, opts);
  }

  // -- 3. calls the app makes itself -----------------------------------------------------

  /** Reserve a call's tokens against the user's limits; throws QuotaExceeded or RateLimited
   * when they would be overspent. Retried only on a 429 or 503 (the server did nothing), not
   * on a lost answer: such a lease expires by itself on the server. */
  async reserve(args: ReserveArgs, opts?: RequestOptions): Promise<Lease> {
    const body = given({ model: args.model, user: args.user, input_tokens: args.inputTokens,
      messages: args.messages, max_output_tokens: args.maxOutputTokens });
    const doc = await this.send<LeaseDocument>(
      { method: "POST", path: "/v1/meter/reserve", body, retry: "refused" }, opts);
    return new Lease(this, doc);
  }

  /** Reserve, run `fn` (which calls any model and `call.record(...)`s its usage), then settle
   * with that usage; if `fn` throws, release the reservation and rethrow. Returns what `fn`
   * returns. */
  async metered<T>(args: ReserveArgs, fn: (call: MeteredCall) => T | Promise<T>,
                   opts?: RequestOptions): Promise<T> {
    const call = new MeteredCall(await this.reserve(args, opts));
    let result: T;
    try {
      result = await fn(call);
    } catch (err) {
      await call.lease.release(opts).catch(() => undefined);  // it expires by itself anyway
      throw err;
    }
    const usage = call.recorded;
    if (usage === null) {
      await call.lease.release(opts).catch(() => undefined);
      throw new MeterlaneError(0, "the metered block ended without call.record(...): its "
        + "lease was released and nothing was recorded");
    }
    await call.lease.settle(usage, opts);
    return result;
  }

  /** Record a call's usage without a lease, once per idempotency key (retried safely). */
  track(args: TrackArgs, opts?: RequestOptions): Promise<MeterResult> {
    return this.send({ method: "POST", path: "/v1/meter/track", body: trackBody(args),
      retry: "safe" }, opts);
  }

  /** Record up to 1,000 calls in one request, all or none, each with its own idempotency key.
   * The answer counts them (`tracked`, `duplicates`) and gives each one's outcome in order
   * (`data`). App keys only. */
  trackBatch(events: TrackArgs[], opts?: RequestOptions): Promise<BatchResult> {
    return this.send({ method: "POST", path: "/v1/meter/track/batch",
      body: { events: events.map(trackBody) }, retry: "safe" }, opts);
  }

  // -- 4. the paywall: events, offers, consents, checkout -----------------------------------

  /** Paywall events (a threshold crossed, a limit reached), newest first, a page at a time
   * (`has_more`; pass the last id as `startingAfter`). */
  paywallEvents(args: { user?: string; trigger?: string; limit?: number;
                        startingAfter?: string } = {},
                opts?: RequestOptions): Promise<PaywallEventList> {
    return this.send({ method: "GET", path: "/v1/paywall/events", retry: "safe", query: {
      user: args.user, trigger: args.trigger, limit: args.limit,
      starting_after: args.startingAfter } }, opts);
  }

  /** The published offers the user may take where they are (`data`), each with the
   * disclosure and call to action that jurisdiction requires, in the user's language. */
  offers(args: OffersArgs = {}, opts?: RequestOptions): Promise<OfferList> {
    return this.send({ method: "GET", path: "/v1/paywall/offers", retry: "safe", query: {
      user: args.user, jurisdiction: args.jurisdiction, platform: args.platform ?? "web",
      locale: args.locale } }, opts);
  }

  /** Record that the user agreed to `offer`, one of offers()'s `data` as it was shown: its
   * version, content hash, price, disclosure (its SHA-256), jurisdiction and locale are taken
   * from it. The answer's `consent_id` starts one checkout. Throws Conflict (409, `.rule`)
   * when it is not what Meterlane served. */
  async recordConsent(args: ConsentArgs, opts?: RequestOptions): Promise<Consent> {
    const { offer } = args;
    const body = given({
      type: args.type ?? "auto_renewal", offer: offer.offer, version: offer.version,
      content_hash: offer.content_hash, rendered_price: offer.price,
      disclosure_sha256: await sha256Hex(offer.disclosure), render_manifest: args.renderManifest,
      platform: args.platform ?? "web", user: args.user, jurisdiction: offer.jurisdiction,
      locale: offer.locale, ip: args.ip, user_agent: args.userAgent });
    return this.send(write("POST", "/v1/paywall/consents", body, args.idempotencyKey), opts);
  }

  /** A consent record, read back as evidence (with the checkout it started). */
  getConsent(consentId: string, opts?: RequestOptions): Promise<Consent> {
    return this.send({ method: "GET", retry: "safe",
      path: `/v1/paywall/consents/${encodeURIComponent(consentId)}` }, opts);
  }

  /** A Stripe Checkout for the user: a plan (a subscription: needs the user's `consentId`,
   * else Conflict naming CNS-01) or a credit pack. Send the user to the answer's `url`. */
  checkout(args: CheckoutArgs, opts?: RequestOptions): Promise<CheckoutSession> {
    const body = given({ user: args.user, success_url: args.successUrl,
      cancel_url: args.cancelUrl, plan: args.plan, credit_pack: args.creditPack,
      consent_id: args.consentId });
    return this.send(write("POST", "/v1/checkout/sessions", body, args.idempotencyKey), opts);
  }

  /** @internal */
  send<T>(call: Call, opts?: RequestOptions): Promise<T> {
    return this.http.send<T>(call, opts);
  }
}

/** A reservation: settle it with the call's usage, or release it if the call failed. */
export class Lease {
  readonly id: string;
  readonly grantedOutputTokens: number | null;
  readonly limits: LimitState[];
  done = false;

  constructor(private readonly client: Meterlane<OpenAIConstructor>,
              readonly doc: LeaseDocument) {
    this.id = doc.lease_id;
    this.grantedOutputTokens = doc.granted_output_tokens ?? null;
    this.limits = [...(doc.limits ?? [])];
  }

  async settle(usage: Usage, opts?: RequestOptions): Promise<MeterResult> {
    const out = await this.client.send<MeterResult>({ method: "POST", retry: "safe",
      path: "/v1/meter/settle", body: { lease_id: this.id, usage: usageBody(usage) } }, opts);
    this.done = true;
    return out;
  }

  async release(opts?: RequestOptions): Promise<MeterResult> {
    const out = await this.client.send<MeterResult>({ method: "POST", retry: "safe",
      path: "/v1/meter/release", body: { lease_id: this.id } }, opts);
    this.done = true;
    return out;
  }
}

/** What `metered()` hands its function: the lease, and where to record the usage. */
export class MeteredCall {
  recorded: Usage | null = null;

  constructor(readonly lease: Lease) {}

  /** The output the call may generate: cap the model call at this. */
  get maxOutputTokens(): number | null {
    return this.lease.grantedOutputTokens;
  }

  record(usage: Usage): void {
    this.recorded = { ...usage };
  }
}

function userPath(user: string | undefined, what: string): string {
  return user === undefined ? `/v1/me/${what}`
    : `/v1/users/${encodeURIComponent(user)}/${what}`;
}

/** The values that were given (undefined leaves a field out). */
function given(values: Record<string, unknown>): Record<string, unknown> {
  return Object.fromEntries(Object.entries(values).filter(([, v]) => v !== undefined));
}

function usageBody(usage: Usage): Record<string, number> {
  const out: Record<string, number> = { input_tokens: usage.inputTokens,
    output_tokens: usage.outputTokens };
  for (const [name, value] of [["cached_input_tokens", usage.cachedInputTokens],
    ["reasoning_tokens", usage.reasoningTokens],
    ["cache_write_tokens", usage.cacheWriteTokens]] as const) {
    if (value) out[name] = value;
  }
  return out;
}

/** One reported call, as /v1/meter/track and each event of track/batch take it. */
function trackBody(args: TrackArgs): Record<string, unknown> {
  return given({ model: args.model, idempotency_key: args.idempotencyKey,
    usage: usageBody(args), user: args.user, timestamp: rfc3339(args.timestamp) });
}

function rfc3339(value: Date | string | undefined): string | undefined {
  if (value === undefined || typeof value === "string") return value;
  if (Number.isNaN(value.getTime())) throw new TypeError("timestamp is an invalid Date");
  return value.toISOString();
}

/** One request of the API and how it is retried: timeouts, an AbortSignal, Retry-After. It
 * needs only `fetch`, so it runs on Node 18+ and on runtimes that have nothing else (edge
 * functions, workers, browsers). */

import { Conflict, ConnectionFailed, MeterlaneError, RateLimited, ServiceUnavailable,
  errorFor } from "./errors.js";

export const VERSION = "0.1.0";
export const USER_AGENT = `meterlane-sdk-typescript/${VERSION}`;
/** A Retry-After longer than this (seconds) is not waited out: the error is thrown. */
export const MAX_RETRY_WAIT = 30;

/** Per-call options, the last argument of every method. */
export interface RequestOptions {
  /** Cancels the call (and any wait between its attempts); the signal's reason is thrown. */
  signal?: AbortSignal;
  /** Milliseconds one attempt may take (default: the client's `timeout`). */
  timeout?: number;
}

/** When a call is tried again (each time at most `maxRetries` times):
 * - "refused": only when the server says it did nothing (a 429 or a 503): a call that must
 *   not run twice;
 * - "safe": also after a connection failure or a timeout: reads, and writes the server makes
 *   idempotent (track's idempotency key, settle and release per lease, an Idempotency-Key). */
export type Retry = "refused" | "safe";

export interface Call {
  method: "GET" | "POST" | "PUT" | "DELETE";
  path: string;
  body?: unknown;
  query?: Record<string, string | number | undefined>;
  headers?: Record<string, string>;
  retry: Retry;
}

export interface TransportOptions {
  baseURL: string;
  apiKey: string;
  timeout: number;
  maxRetries: number;
  backoff: number;
  fetch?: typeof fetch;
}

/** A write that must not run twice: with an Idempotency-Key it may be tried again after a lost
 * answer (the server then replays its first answer); without one, only when the server says
 * it did nothing. */
export function write(method: Call["method"], path: string, body: unknown,
                      idempotencyKey?: string): Call {
  if (idempotencyKey === undefined) return { method, path, body, retry: "refused" };
  return { method, path, body, headers: { "Idempotency-Key": idempotencyKey }, retry: "safe" };
}

export class Transport {
  constructor(readonly options: TransportOptions) {}

  async send<T>(call: Call, opts: RequestOptions = {}): Promise<T> {
    for (let attempt = 0; ; attempt++) {
      const wait = await this.attempt(call, attempt, opts);
      if (!("wait" in wait)) return wait.doc as T;
      await sleep(wait.wait * 1000, opts.signal);
    }
  }

  private async attempt(call: Call, attempt: number, opts: RequestOptions
  ): Promise<{ doc: unknown } | { wait: number }> {
    const { maxRetries } = this.options;
    let resp: Answer;
    try {
      resp = await this.fetchOnce(call, opts);
    } catch (err) {
      if (opts.signal?.aborted) throw opts.signal.reason ?? err;
      if (call.retry === "safe" && attempt < maxRetries) return { wait: this.pause(attempt) };
      throw new ConnectionFailed(0, `${call.method} ${call.path}: ${describe(err)}`,
        { cause: err });
    }
    if (resp.status < 300) return { doc: document(call, resp) };
    const err = errorFor(resp.status, errorBody(resp.text), resp.headers);
    if (attempt < maxRetries && retryable(call, err)) {
      const after = (err as RateLimited).retryAfter ?? null;
      if (after === null || after <= MAX_RETRY_WAIT) {
        return { wait: after ?? this.pause(attempt) };
      }
    }
    throw err;
  }

  private async fetchOnce(call: Call, opts: RequestOptions): Promise<Answer> {
    const timeout = opts.timeout ?? this.options.timeout;
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(new TimeoutError(timeout)), timeout);
    const onAbort = (): void => controller.abort(opts.signal?.reason);
    opts.signal?.addEventListener("abort", onAbort, { once: true });
    if (opts.signal?.aborted) onAbort();
    try {
      const headers: Record<string, string> = {
        Authorization: `Bearer ${this.options.apiKey}`, Accept: "application/json",
        "User-Agent": USER_AGENT, ...call.headers,
      };
      if (call.body !== undefined) headers["Content-Type"] = "application/json";
      const doFetch = this.options.fetch ?? globalThis.fetch;
      const resp = await doFetch(this.url(call), {
        method: call.method, headers, signal: controller.signal,
        body: call.body === undefined ? undefined : JSON.stringify(call.body),
      });
      // the body is read under the same timeout and signal
      return { status: resp.status, headers: headersOf(resp), text: await resp.text() };
    } catch (err) {
      throw controller.signal.reason instanceof TimeoutError ? controller.signal.reason : err;
    } finally {
      clearTimeout(timer);
      opts.signal?.removeEventListener("abort", onAbort);
    }
  }

  private url(call: Call): string {
    const query = new URLSearchParams();
    for (const [k, v] of Object.entries(call.query ?? {})) {
      if (v !== undefined) query.set(k, String(v));
    }
    const qs = query.toString();
    return `${this.options.baseURL}${call.path}${qs ? `?${qs}` : ""}`;
  }

  /** Exponential backoff with jitter, in seconds. */
  private pause(attempt: number): number {
    return Math.min(MAX_RETRY_WAIT,
      this.options.backoff * 2 ** attempt * (0.5 + Math.random() / 2));
  }
}

function retryable(call: Call, err: MeterlaneError): boolean {
  if (err instanceof RateLimited || err instanceof ServiceUnavailable) return true;
  // the first request with this key is still running: its answer comes on a retry
  return call.headers?.["Idempotency-Key"] !== undefined && err instanceof Conflict
    && err.keyInUse;
}

/** An answer, read whole. */
interface Answer {
  status: number;
  headers: Record<string, string>;
  text: string;
}

function document(call: Call, resp: Answer): unknown {
  const text = resp.text;
  if (text === "") return {};
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch {  // not Meterlane answering (a proxy's page?)
    throw new MeterlaneError(resp.status, `${call.method} ${call.path}: the answer is not JSON`);
  }
  if (typeof doc !== "object" || doc === null || Array.isArray(doc)) {
    throw new MeterlaneError(resp.status,
      `${call.method} ${call.path}: the answer is not a JSON object`);
  }
  return doc;
}

function errorBody(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return { detail: text };
  }
}

function headersOf(resp: Response): Record<string, string> {
  const out: Record<string, string> = {};
  resp.headers.forEach((value, name) => { out[name.toLowerCase()] = value; });
  return out;
}

class TimeoutError extends Error {
  constructor(ms: number) {
    super(`no answer within ${ms} ms`);
    this.name = "TimeoutError";
  }
}

function describe(err: unknown): string {
  if (err instanceof Error) {
    const cause = (err as { cause?: unknown }).cause;
    return cause instanceof Error ? `${err.message} (${cause.message})` : err.message;
  }
  return String(err);
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(signal.reason);
      return;
    }
    const onAbort = (): void => {
      clearTimeout(timer);
      reject(signal?.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

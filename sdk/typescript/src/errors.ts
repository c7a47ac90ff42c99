/** Typed errors, read from Meterlane's answers (problem+json, or OpenAI's envelope on the
 * gateway's routes). The same kinds, for the same statuses, as the Python SDK's. */

export type ErrorBody = Record<string, unknown>;

/** Any answer other than success. `body` is the parsed error document; `headers` are the
 * answer's, their names in lower case. */
export class MeterlaneError extends Error {
  readonly status: number;
  readonly code: string | null;
  readonly body: ErrorBody;
  readonly headers: Record<string, string>;

  constructor(status: number, message: string, options: {
    code?: string | null; body?: ErrorBody; headers?: Record<string, string>; cause?: unknown;
  } = {}) {
    super(`${status}: ${message}`, options.cause === undefined ? undefined
      : { cause: options.cause });
    this.name = new.target.name;
    this.status = status;
    this.code = options.code ?? null;
    this.body = options.body ?? {};
    this.headers = options.headers ?? {};
  }

  /** The message as the server wrote it (without the status). */
  get detail(): string {
    return this.message.replace(/^\d+: /, "");
  }
}

/** The server could not be reached, or did not answer in time (status 0). */
export class ConnectionFailed extends MeterlaneError {}

/** 400 / 422: the request was refused as it is. */
export class BadRequest extends MeterlaneError {}

/** 401 / 403: the key is missing, wrong, or may not do this. */
export class PermissionDenied extends MeterlaneError {}

/** 404. */
export class NotFound extends MeterlaneError {}

/** 409: the request clashes with what is recorded (a consent used twice, a lease already
 * settled, a subscription checkout without consent). `rule` names the compliance rule at
 * fault (CNS-01, ...), when there is one. */
export class Conflict extends MeterlaneError {
  get rule(): string | null {
    const found = this.body["rule"];
    return found === undefined || found === null ? null : String(found);
  }

  /** The first request with this Idempotency-Key is still running. */
  get keyInUse(): boolean {
    return (this.code ?? "").replace(/-/g, "_") === "idempotency_key_in_use";
  }

  get retryAfter(): number | null {
    return seconds(this.headers["retry-after"]);
  }
}

/** 402: a quota of the end user's plan is spent. `limit` names it (id, used, limit,
 * resets_at); `paywall` carries the paywall event and its offers when the server has one. */
export class QuotaExceeded extends MeterlaneError {
  get limit(): Record<string, unknown> {
    const found = this.detailDoc()["limit"];
    return isObject(found) ? { ...found } : {};
  }

  get paywall(): Record<string, unknown> | null {
    const found = this.detailDoc()["paywall"];
    return isObject(found) ? { ...found } : null;
  }

  /** The offers the paywall shows for this refusal (none when the server has none). */
  get offers(): Record<string, unknown>[] {
    const found = this.paywall?.["offers"];
    return Array.isArray(found) ? found.filter(isObject) : [];
  }

  private detailDoc(): Record<string, unknown> {
    const inner = this.body["error"];
    return isObject(inner) ? inner : this.body;
  }
}

/** 429: a rate limit; `retryAfter` is how many seconds to wait. */
export class RateLimited extends MeterlaneError {
  get retryAfter(): number | null {
    return seconds(this.headers["retry-after"]);
  }
}

/** 503: the server (or its limit store) cannot answer now; try again shortly. */
export class ServiceUnavailable extends MeterlaneError {
  get retryAfter(): number | null {
    return seconds(this.headers["retry-after"]);
  }
}

function seconds(value: string | undefined): number | null {
  if (value === undefined || value.trim() === "") return null;
  const n = Number(value);
  return Number.isFinite(n) ? Math.max(0, n) : null;
}

export function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

const KINDS: Record<number, typeof MeterlaneError> = {
  400: BadRequest, 422: BadRequest, 401: PermissionDenied, 403: PermissionDenied,
  404: NotFound, 409: Conflict, 402: QuotaExceeded, 429: RateLimited, 503: ServiceUnavailable,
};

/** The error of an answer: its kind by status, its message and code read from OpenAI's
 * envelope (`{"error": {...}}`) or from problem+json. */
export function errorFor(status: number, body: unknown,
                         headers: Record<string, string>): MeterlaneError {
  const doc: ErrorBody = isObject(body) ? body : {};
  const inner = doc["error"];
  let message: string;
  let code: string | null;
  if (isObject(inner)) {
    message = String(inner["message"] ?? "");
    code = typeof inner["code"] === "string" ? inner["code"] : null;
  } else {
    message = String(doc["detail"] || doc["title"] || `HTTP ${status}`);
    const type = String(doc["type"] ?? "").split("/").pop() || null;
    code = typeof doc["code"] === "string" && doc["code"] ? doc["code"] : type;
  }
  const Kind = KINDS[status] ?? MeterlaneError;
  return new Kind(status, message, { code, body: doc, headers });
}

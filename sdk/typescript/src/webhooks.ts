/** Checking the signature of a webhook Meterlane sent (a paywall event, ...): the header
 * `Meterlane-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + raw body)>`. */

import { bytesOf, hmacSha256Hex, hmacSha256Verify, unhex } from "./crypto.js";

export const TOLERANCE_SECONDS = 300;

/** The delivery is not from Meterlane, was altered, or is too old (a replay). */
export class InvalidSignature extends Error {
  constructor(message: string) {
    super(message);
    this.name = "InvalidSignature";
  }
}

/** A delivery's event: `{id, type, created, data}`. */
export interface WebhookEvent {
  id: string;
  type: string;
  created: number | string;
  data: Record<string, unknown>;
  [key: string]: unknown;
}

export interface VerifyOptions {
  /** Seconds a signature's timestamp may be from now (default 300). */
  tolerance?: number;
  /** The time to check against, in Unix seconds (default: now). */
  now?: number;
}

/** The event of a delivery whose `Meterlane-Signature` header checks out; throws
 * InvalidSignature otherwise. Pass the raw request body (`await request.text()`, or its
 * bytes), not re-encoded JSON. De-duplicate by the event's `id`: a delivery may come more
 * than once. */
export async function verify(body: string | Uint8Array | ArrayBuffer,
                             signature: string | null | undefined, secret: string,
                             options: VerifyOptions = {}): Promise<WebhookEvent> {
  const fields = new Map<string, string>();
  for (const part of (signature ?? "").split(",")) {
    const at = part.indexOf("=");
    if (at > 0) fields.set(part.slice(0, at).trim(), part.slice(at + 1).trim());
  }
  const t = fields.get("t");
  const given = fields.get("v1");
  if (t === undefined || given === undefined || !/^-?\d+$/.test(t)) {
    throw new InvalidSignature("malformed Meterlane-Signature header");
  }
  const timestamp = Number(t);
  const now = options.now ?? Date.now() / 1000;
  if (Math.abs(now - timestamp) > (options.tolerance ?? TOLERANCE_SECONDS)) {
    throw new InvalidSignature("the signature's timestamp is outside the tolerance");
  }
  const raw = bytesOf(body);
  const signed = concat(bytesOf(`${timestamp}.`), raw);
  const mac = unhex(given);
  if (mac === null || !(await hmacSha256Verify(secret, signed, mac))) {
    throw new InvalidSignature("the signature does not match");
  }
  return JSON.parse(new TextDecoder().decode(raw)) as WebhookEvent;
}

/** The `Meterlane-Signature` header Meterlane would send for this body at `timestamp` (Unix
 * seconds): for testing an app's webhook route. */
export async function sign(body: string | Uint8Array, secret: string,
                           timestamp: number = Math.floor(Date.now() / 1000)): Promise<string> {
  const mac = await hmacSha256Hex(secret, concat(bytesOf(`${timestamp}.`), bytesOf(body)));
  return `t=${timestamp},v1=${mac}`;
}

function concat(a: Uint8Array, b: Uint8Array): Uint8Array {
  const out = new Uint8Array(a.length + b.length);
  out.set(a, 0);
  out.set(b, a.length);
  return out;
}

/** The documents Meterlane answers with, as its OpenAPI document (`GET /openapi.json`)
 * describes them. Money is a decimal string (`cost_usd`), never a float; times are RFC 3339.
 * Fields a newer server adds pass through untyped. */

/** One limit of a plan, as the quota, a lease and a 402 show it. */
export interface LimitState {
  id: string;
  name?: string;
  metric: string;
  window?: string;
  scope?: string;
  model?: string | null;
  kind?: "quota" | "rate" | string;
  /** An integer, or a decimal USD string for a cost limit. */
  used: number | string;
  remaining: number | string;
  limit: number | string;
  resets_at: string | null;
  included?: number;
  unit?: string;
  [key: string]: unknown;
}

export interface Quota {
  object: "quota";
  user: string;
  plan: { id: string; name?: string | null; [key: string]: unknown };
  limits: LimitState[];
  [key: string]: unknown;
}

export interface Credits {
  object: "credits";
  user: string;
  balance: number;
  granted: number;
  burned: number;
  expired: number;
  grants: Record<string, unknown>[];
  [key: string]: unknown;
}

export interface LeaseDocument {
  object: "meter.lease";
  lease_id: string;
  user: string;
  model: string;
  plan: string;
  input_tokens: number;
  /** Cap the call's output at this (null: no limit bounds it). */
  granted_output_tokens: number | null;
  expires_at: string;
  limits: LimitState[];
  [key: string]: unknown;
}

export interface MeterResult {
  object: "meter.result";
  lease_id: string | null;
  idempotency_key: string | null;
  /** settled, released, expired, tracked, duplicate or quarantined. */
  outcome: string;
  cost_usd: string | null;
  [key: string]: unknown;
}

export interface BatchResult {
  object: "meter.batch_result";
  tracked: number;
  duplicates: number;
  limits_pending: number;
  /** Each event's answer, in order. */
  data: { idempotency_key: string; outcome: string; cost_usd: string | null }[];
  [key: string]: unknown;
}

/** An offer as served for a jurisdiction, platform and locale (GET /v1/paywall/offers). */
export interface Offer {
  offer: string;
  version: number;
  content_hash: string;
  kind: "subscription" | "credits" | string;
  plan: Record<string, unknown> | null;
  billing: Record<string, unknown> | null;
  entitlements: Record<string, unknown> | null;
  locale: string;
  jurisdiction: string;
  headline?: string | null;
  /** The price as shown ("20.00 EUR"). */
  price: string;
  price_label?: string;
  /** The disclosure to show beside the button, as is: a consent carries its SHA-256. */
  disclosure: string;
  cta_label: string;
  decline_label?: string | null;
  [key: string]: unknown;
}

export interface OfferList {
  object: "list";
  /** The profile the rules applied (the strictest for an unknown jurisdiction). */
  jurisdiction: string;
  platform: string;
  data: Offer[];
  [key: string]: unknown;
}

export interface PaywallEvent {
  id: string;
  created_at: string;
  user: string;
  trigger: string;
  threshold: number | null;
  limit: Record<string, unknown>;
  plan: Record<string, unknown>;
  request_id: string | null;
  offers: Record<string, unknown>[];
  [key: string]: unknown;
}

export interface PaywallEventList {
  object: "list";
  data: PaywallEvent[];
  has_more: boolean;
  [key: string]: unknown;
}

export interface Consent {
  consent_id: string;
  type: string;
  offer_id: string;
  offer_version: number;
  content_hash: string;
  plan_id: string | null;
  disclosure_text: string;
  disclosure_sha256: string;
  rendered_price: string;
  cta_label: string;
  locale: string;
  platform: string;
  jurisdiction: string;
  render_manifest: Record<string, unknown>;
  ip: string | null;
  user_agent: string | null;
  captured_at: string;
  retain_until: string;
  checkout_session_id: string | null;
  [key: string]: unknown;
}

export interface CheckoutSession {
  object: "checkout.session";
  id: string;
  /** Send the end user here to pay. */
  url: string;
  mode: "subscription" | "payment" | string;
  item: string;
  [key: string]: unknown;
}

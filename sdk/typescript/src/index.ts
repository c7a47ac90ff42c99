/** Meterlane's TypeScript SDK: speaks HTTP (`fetch`) to a Meterlane server. */

import { sign, verify } from "./webhooks.js";

export { Lease, MeteredCall, Meterlane } from "./client.js";
export type { CheckoutArgs, ConsentArgs, MeterlaneOptions, OffersArgs, OpenAIClientOptions,
  OpenAIConstructor, ReserveArgs, TrackArgs, Usage } from "./client.js";
export { BadRequest, Conflict, ConnectionFailed, MeterlaneError, NotFound, PermissionDenied,
  QuotaExceeded, RateLimited, ServiceUnavailable } from "./errors.js";
export type { RequestOptions } from "./http.js";
export { InvalidSignature, TOLERANCE_SECONDS, sign, verify } from "./webhooks.js";
export type { VerifyOptions, WebhookEvent } from "./webhooks.js";
export type * from "./types.js";

/** `webhooks.verify(rawBody, request.headers.get("Meterlane-Signature"), secret)`. */
export const webhooks = { verify, sign };

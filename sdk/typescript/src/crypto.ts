/** SHA-256 and HMAC-SHA256 through Web Crypto: global on Node 19+, Deno, Bun, edge runtimes
 * and browsers; on Node 18 it is node:crypto's `webcrypto` (loaded only there). */

let subtle: Promise<SubtleCrypto> | undefined;

function subtleCrypto(): Promise<SubtleCrypto> {
  subtle ??= (async () => {
    const found = (globalThis as { crypto?: Crypto }).crypto?.subtle;
    if (found) return found;
    // Node 18 only; the specifier is a variable so that bundlers for the edge leave it alone
    const name = "node:crypto";
    const mod = await import(/* webpackIgnore: true */ name) as { webcrypto: Crypto };
    return mod.webcrypto.subtle;
  })();
  return subtle;
}

const encoder = new TextEncoder();

export function bytesOf(value: string | Uint8Array | ArrayBuffer): Uint8Array {
  if (typeof value === "string") return encoder.encode(value);
  return value instanceof Uint8Array ? value : new Uint8Array(value);
}

export function hex(bytes: ArrayBuffer | Uint8Array): string {
  return Array.from(bytesOf(bytes), (b) => b.toString(16).padStart(2, "0")).join("");
}

/** The bytes of a lower-case hex string (as Meterlane writes it), or null if it is not one. */
export function unhex(text: string): Uint8Array | null {
  if (text.length % 2 !== 0 || !/^[0-9a-f]*$/.test(text)) return null;
  const out = new Uint8Array(text.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(text.slice(2 * i, 2 * i + 2), 16);
  return out;
}

/** SHA-256 of a text (UTF-8) or bytes, as lower-case hex. */
export async function sha256Hex(data: string | Uint8Array): Promise<string> {
  return hex(await (await subtleCrypto()).digest("SHA-256", bytesOf(data) as BufferSource));
}

async function hmacKey(secret: string): Promise<CryptoKey> {
  return (await subtleCrypto()).importKey("raw", bytesOf(secret) as BufferSource,
    { name: "HMAC", hash: "SHA-256" }, false, ["sign", "verify"]);
}

export async function hmacSha256Hex(secret: string, data: Uint8Array): Promise<string> {
  return hex(await (await subtleCrypto()).sign("HMAC", await hmacKey(secret), data as BufferSource));
}

/** Whether `mac` is HMAC-SHA256(secret, data), compared in constant time by Web Crypto. */
export async function hmacSha256Verify(secret: string, data: Uint8Array,
                                       mac: Uint8Array): Promise<boolean> {
  return (await subtleCrypto()).verify("HMAC", await hmacKey(secret), mac as BufferSource,
    data as BufferSource);
}

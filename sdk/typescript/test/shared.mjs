// The server a test file uses: the one `npm test` started (test/run.mjs), or its own.
import { after, before } from "node:test";
import { startServer } from "./serve.mjs";

/** Call at the top of a test file; the returned object is filled before the first test. */
export function useServer() {
  const server = {};
  let own = null;
  before(async () => {
    if (process.env.MLANE_TS_BASE) {
      Object.assign(server, { base: process.env.MLANE_TS_BASE, key: process.env.MLANE_TS_KEY,
        offer: process.env.MLANE_TS_OFFER });
    } else {
      own = await startServer();
      Object.assign(server, own);
    }
  });
  after(async () => { await own?.stop(); });
  return server;
}

/** A fresh end-user name: each test its own users, so tests do not share quotas. */
export function userName(prefix) {
  return `${prefix}-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 7)}`;
}

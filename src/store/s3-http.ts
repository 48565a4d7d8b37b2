/**
 * One HTTP exchange with an S3 endpoint, on node:http/node:https: the request body sent and
 * the response body gathered whole, both through the store's rate limiter, the response
 * bounded in size (a server that sends more than it may is cut off, not buffered), and an
 * idle timeout on the socket. Retries, signing and error meanings are the client's.
 */
import http from 'node:http';
import https from 'node:https';
import type { RateLimiter } from './s3-rate.js';

export interface Exchange {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: Buffer;
}

export interface ExchangeOptions {
  url: URL;
  method: string;
  headers: Record<string, string>;
  body?: Buffer;
  agent: http.Agent;
  /** Idle time on the socket (no byte either way) before the request is given up. */
  timeoutMs: number;
  /** The most body bytes accepted in the response. */
  maxBody: number;
  limiter?: RateLimiter | null;
}

/** Pieces the body is written in, so the rate limit applies along the way. */
const PIECE = 64 << 10;
/** The most bytes of an error answer read. */
const ERROR_BODY = 64 << 10;

function netError(message: string, code: string): Error {
  return Object.assign(new Error(message), { code });
}

/** Until the request can take more, or is gone. */
function drained(req: http.ClientRequest): Promise<void> {
  return new Promise<void>((r) => {
    const done = () => {
      req.off('drain', done);
      req.off('close', done);
      r();
    };
    req.on('drain', done);
    req.on('close', done);
  });
}

async function writeBody(req: http.ClientRequest, body: Buffer | undefined, limiter: RateLimiter | null | undefined): Promise<void> {
  if (body) {
    for (let off = 0; off < body.length && !req.destroyed; off += PIECE) {
      const piece = body.subarray(off, off + PIECE);
      if (limiter) await limiter.take(piece.length);
      if (!req.write(piece)) await drained(req);
    }
  }
  req.end();
}

async function readBody(res: http.IncomingMessage, o: ExchangeOptions): Promise<Buffer> {
  const parts: Buffer[] = [];
  let got = 0;
  // An error answer (an XML <Error>) has its own bound: longer than a short range, far
  // shorter than a whole object.
  const max = (res.statusCode ?? 0) >= 300 ? ERROR_BODY : o.maxBody;
  for await (const chunk of res as AsyncIterable<Buffer>) {
    got += chunk.length;
    if (got > max) {
      res.destroy();
      throw netError(`${o.url.host}: response larger than the ${max} bytes expected`, 'EPROTO');
    }
    parts.push(chunk);
    if (o.limiter) await o.limiter.take(chunk.length);
  }
  // A response cut short ends the iteration quietly with `complete` false.
  if (!res.complete) throw netError(`${o.url.host}: connection closed in the middle of a response`, 'ECONNRESET');
  return parts.length === 1 ? parts[0] : Buffer.concat(parts, got);
}

export function exchange(o: ExchangeOptions): Promise<Exchange> {
  return new Promise<Exchange>((resolve, reject) => {
    const mod = o.url.protocol === 'https:' ? https : http;
    const headers: Record<string, string> = { ...o.headers, 'content-length': String(o.body?.length ?? 0) };
    const req = mod.request(o.url, { method: o.method, headers, agent: o.agent });
    req.setTimeout(o.timeoutMs, () => req.destroy(netError(`${o.url.host}: the connection was idle for ${o.timeoutMs} ms`, 'ETIMEDOUT')));
    req.on('error', reject);
    req.on('response', (res) => {
      res.on('error', reject);
      readBody(res, o).then((body) => resolve({ status: res.statusCode ?? 0, headers: res.headers, body }), reject);
    });
    writeBody(req, o.body, o.limiter).catch((e: Error) => req.destroy(e));
  });
}

export function newAgent(url: URL): http.Agent {
  const opts = { keepAlive: true, maxSockets: 16, keepAliveMsecs: 1000 };
  return url.protocol === 'https:' ? new https.Agent(opts) : new http.Agent(opts);
}

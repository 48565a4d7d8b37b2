/**
 * A fault-injecting HTTP proxy on 127.0.0.1 in front of radosgw, for the S3 store's retry
 * tests: per request, `decide` says pass it on, answer 503 SlowDown, hold the answer back,
 * or cut the connection (after the first bytes of a request body: mid-upload). The Host
 * header goes through unchanged, so the signature the client made for the proxy holds.
 */
import http from 'node:http';
import net from 'node:net';

export type Fate = 'pass' | 'slowdown' | 'cut' | { delayMs: number };

export interface Proxy {
  endpoint: string;
  /** `METHOD path?query` and the fate given, per request. */
  log: Array<{ req: string; fate: string }>;
  close(): Promise<void>;
}

const SLOWDOWN = '<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>';

function forward(port: number, req: http.IncomingMessage, res: http.ServerResponse, delayMs: number): void {
  const up = http.request({ host: '127.0.0.1', port, method: req.method, path: req.url, headers: req.headers, agent: false }, (ur) => {
    setTimeout(() => {
      if (res.destroyed) return ur.resume();
      res.writeHead(ur.statusCode ?? 502, ur.headers);
      ur.pipe(res);
    }, delayMs);
  });
  up.on('error', () => res.destroy());
  req.pipe(up);
}

export async function startProxy(port: number, decide: (req: http.IncomingMessage, n: number) => Fate): Promise<Proxy> {
  const log: Proxy['log'] = [];
  const sockets = new Set<net.Socket>();
  const server = http.createServer((req, res) => {
    const fate = decide(req, log.length);
    log.push({ req: `${req.method} ${req.url}`, fate: typeof fate === 'string' ? fate : `delay ${fate.delayMs}` });
    if (fate === 'slowdown') {
      req.resume();
      res.writeHead(503, { 'content-type': 'application/xml', 'content-length': String(SLOWDOWN.length) });
      res.end(SLOWDOWN);
    } else if (fate === 'cut') {
      const hasBody = Number(req.headers['content-length'] ?? 0) > 0;
      if (hasBody) req.once('data', () => req.socket.destroy());
      else req.socket.destroy();
    } else {
      forward(port, req, res, fate === 'pass' ? 0 : fate.delayMs);
    }
  });
  server.on('connection', (s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const { port: own } = server.address() as net.AddressInfo;
  return {
    endpoint: `http://127.0.0.1:${own}`,
    log,
    close: () =>
      new Promise<void>((r) => {
        for (const s of sockets) s.destroy();
        server.close(() => r());
      }),
  };
}

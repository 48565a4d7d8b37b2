/**
 * The S3 store against a lying server (node:http on 127.0.0.1, no Ceph): answers that are
 * not the range asked for, too long, listings that leave the prefix or never end, bad XML.
 * Each is one EPROTO line, never wrong bytes handed up or a loop; bad keys are left out.
 */
import http from 'node:http';
import net from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { S3Store } from '../src/store/s3.js';

type Handler = (req: http.IncomingMessage, res: http.ServerResponse) => void;
let handler: Handler = (_req, res) => res.end();
let server: http.Server;
let store: S3Store;

beforeAll(async () => {
  server = http.createServer((req, res) => {
    req.resume();
    req.on('end', () => handler(req, res));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const { port } = server.address() as net.AddressInfo;
  store = new S3Store({ kind: 's3', endpoint: `http://127.0.0.1:${port}`, region: 'us-east-1', bucket: 'bkt', prefix: 'p', accessKeyId: 'K', secretAccessKey: 'S', maxAttempts: 2, retryBaseMs: 1, listPageSize: 2 });
});
afterAll(async () => {
  await store.close();
  await new Promise((r) => server.close(r));
});

const fail = async (p: Promise<unknown>) => p.then(() => null, (e: NodeJS.ErrnoException) => ({ code: e.code, message: e.message }));
const xml = (res: http.ServerResponse, body: string, status = 200) => {
  res.writeHead(status, { 'content-type': 'application/xml' });
  res.end(body);
};
const listing = (keys: string[], more: string | null) =>
  `<ListBucketResult>${keys.map((k) => `<Contents><Key>${k}</Key><Size>1</Size></Contents>`).join('')}<IsTruncated>${more !== null}</IsTruncated>${more !== null ? `<NextContinuationToken>${more}</NextContinuationToken>` : ''}</ListBucketResult>`;

async function list(prefix: string): Promise<string[]> {
  const out: string[] = [];
  for await (const o of store.list(prefix)) out.push(o.name);
  return out;
}

describe('S3 store against a lying server', () => {
  it('an appender whose upload failed refuses to go on: what it held is gone', async () => {
    handler = (req, res) => {
      if (req.method === 'HEAD') res.writeHead(404).end();
      else xml(res, '<Error><Code>AccessDenied</Code><Message>no</Message></Error>', 403);
    };
    const a = await store.create('packs/aa/x.pack');
    await a.append(Buffer.alloc(1000, 1));
    expect(await fail(a.sync())).toMatchObject({ code: 'EACCES' });
    expect(await fail(a.append(Buffer.alloc(10)))).toMatchObject({ code: 'EIO', message: expect.stringContaining('its upload failed') });
    expect(await fail(a.sync())).toMatchObject({ code: 'EIO' });
    await a.close();
  });

  it('range answers that are not the range asked for', async () => {
    const buf = Buffer.alloc(100);
    handler = (_req, res) => {
      res.writeHead(206, { 'content-range': 'bytes 0-9/100' });
      res.end(Buffer.alloc(10));
    };
    expect(await fail(store.read('x', buf, 0, 10, 5))).toMatchObject({ code: 'EPROTO', message: expect.stringContaining('not the range asked for') });
    handler = (_req, res) => res.end(Buffer.alloc(50)); // 200, whole object, for a range from 5
    expect(await fail(store.read('x', buf, 0, 10, 5))).toMatchObject({ code: 'EPROTO' });
    handler = (_req, res) => {
      res.writeHead(206, { 'content-range': 'bytes 0-99/100' });
      res.end(Buffer.alloc(100)); // more than the 10 asked for
    };
    expect(await fail(store.read('x', buf, 0, 10, 0))).toMatchObject({ code: 'EPROTO', message: expect.stringContaining('larger than the 10 bytes') });
  });

  it('an endless error answer is cut off; a 500 is retried and reported in one line', async () => {
    handler = (_req, res) => {
      res.writeHead(500);
      res.end(Buffer.alloc(1 << 20, 0x41));
    };
    expect(await fail(store.get('x'))).toMatchObject({ code: 'EPROTO' });
    let n = 0;
    handler = (_req, res) => {
      n++;
      xml(res, `<Error><Code>Internal\u0007Error</Code><Message>line one\nline two</Message></Error>`, 500);
    };
    const e = await fail(store.get('x'));
    expect(n).toBe(2);
    expect(e).toMatchObject({ code: 'EIO' });
    expect(e!.message).not.toMatch(/[\n\u0007]/);
  });

  it('listings: keys outside the prefix, pages that do not go on, bad XML; bad names are left out', async () => {
    handler = (_req, res) => xml(res, listing(['q/x'], null));
    expect(await fail(list('packs'))).toMatchObject({ code: 'EPROTO', message: expect.stringContaining('outside') });
    handler = (req, res) => xml(res, listing(['p/packs/a'], new URL(req.url!, 'http://x').searchParams.get('continuation-token') ?? 'T1'));
    expect(await fail(list('packs'))).toMatchObject({ code: 'EPROTO', message: expect.stringContaining('does not go on') });
    handler = (_req, res) => xml(res, '<ListBucketResult><Contents><Key>p/packs/a</Key></Contents>');
    expect(await fail(list('packs'))).toMatchObject({ code: 'EPROTO', message: expect.stringContaining('bad XML') });
    handler = (_req, res) => xml(res, '<!DOCTYPE x [<!ENTITY a "aaaa">]><ListBucketResult>&a;</ListBucketResult>');
    expect(await fail(list('packs'))).toMatchObject({ code: 'EPROTO' });
    handler = (_req, res) => xml(res, listing(['p/packs/../../etc', 'p/packs//x', 'p/packs/ok'], null));
    expect(await list('packs')).toEqual(['packs/ok']);
    handler = (_req, res) => xml(res, listing(['p/packs/a'], null).replace('<Size>1</Size>', '<Size>-5</Size>'));
    expect(await fail(list('packs'))).toMatchObject({ code: 'EPROTO', message: expect.stringContaining('not a size') });
  });

  it('a multipart reply that is an <Error> in a 200 fails the upload', async () => {
    handler = (_req, res) => xml(res, '<Error><Code>InternalError</Code><Message>x</Message></Error>');
    expect(await fail(store.abortStaleUploads(0))).toMatchObject({ code: 'EIO' });
  });
});

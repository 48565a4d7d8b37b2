/**
 * The S3 store against a real radosgw (test/ceph.ts): the store contract, multipart
 * uploads, sealed appenders, paging, refused credentials, a missing bucket, the rate limit,
 * and retries through a fault-injecting proxy (test/s3-proxy.ts).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { listUploads, putObject } from '../src/store/s3-api.js';
import { S3Store } from '../src/store/s3.js';
import type { S3Spec } from '../src/store/store.js';
import { Ceph, cephUnavailable, startCeph } from './ceph.js';
import { Scratch, prng } from './helpers.js';
import { Fate, startProxy } from './s3-proxy.js';
import { code, storeContract } from './store-contract.js';

const why = await cephUnavailable();
if (why) console.warn(`skipping S3 store tests: ${why}`);

const MIB = 1 << 20;
let s: Scratch;
let c: Ceph;
let store: S3Store;
const stores: S3Store[] = [];

function spec(over: Partial<S3Spec> = {}): S3Spec {
  return {
    kind: 's3',
    endpoint: c.s3!.endpoint,
    region: 'us-east-1',
    bucket: 'genvault-test',
    prefix: 'repo/one',
    accessKeyId: c.s3!.accessKey,
    secretAccessKey: c.s3!.secretKey,
    retryBaseMs: 10,
    ...over,
  };
}

function open(over: Partial<S3Spec> = {}): S3Store {
  const st = new S3Store(spec(over));
  stores.push(st);
  return st;
}

async function withProxy<T>(decide: (req: import('node:http').IncomingMessage, n: number) => Fate, fn: (st: S3Store, log: Array<{ req: string; fate: string }>) => Promise<T>, over: Partial<S3Spec> = {}): Promise<T> {
  const p = await startProxy(c.s3!.port, decide);
  const st = open({ endpoint: p.endpoint, ...over });
  try {
    return await fn(st, p.log);
  } finally {
    await st.close();
    await p.close();
  }
}

describe.skipIf(why !== null)('S3 store', () => {
  beforeAll(async () => {
    s = await Scratch.create('genvault-s3-');
    c = await startCeph(s);
    store = open();
    await store.ensureBucket();
    await store.ensureBucket(); // there already: fine
  });
  afterAll(async () => {
    for (const st of stores) await st.close();
    await s?.cleanup();
  });

  describe('on radosgw', onRadosgw);
  describe('through a faulty network', faults);
});

function onRadosgw(): void {
  storeContract(() => store, 'contract');

  it('a store at the root of a bucket names objects by their keys', async () => {
    const root = open({ prefix: '' });
    await root.put('top/x', 'x');
    expect(await root.stat('top/x')).toEqual({ size: 1 });
    expect(root.describe('top/x')).toBe('s3://genvault-test/top/x');
    expect(store.describe('a/b')).toBe('s3://genvault-test/repo/one/a/b');
    const names: string[] = [];
    for await (const o of root.list('repo')) names.push(o.name);
    expect(names).toContain('repo/one/contract/ex.json');
  });

  it('radosgw honours If-None-Match: * on PUT', async () => {
    await store.put('inm', 'one');
    expect(await code(putObject(store.client, store.key('inm'), Buffer.from('two'), true))).toBe('EEXIST');
    expect((await store.get('inm')).toString()).toBe('one');
  });

  it('uploads an object above the threshold in parts, whole on sync', async () => {
    const st = open({ multipartThreshold: 5 * MIB, partSize: 5 * MIB });
    const data = prng(5, 12 * MIB + 123);
    const a = await st.create('packs/mp/big.pack');
    for (let off = 0; off < data.length; off += MIB) await a.append(data.subarray(off, off + MIB));
    expect(await st.stat('packs/mp/big.pack')).toBeNull(); // nothing visible before sync
    await a.sync();
    expect(await st.stat('packs/mp/big.pack')).toEqual({ size: data.length });
    const buf = Buffer.alloc(2 * MIB);
    expect(await st.read('packs/mp/big.pack', buf, 0, buf.length, 5 * MIB - 100)).toBe(buf.length);
    expect(buf.equals(data.subarray(5 * MIB - 100, 7 * MIB - 100))).toBe(true);
    expect(await code(a.append(Buffer.from('x')))).toBe('ESEALED');
    await a.close();
    // truncate of a multipart object goes through a new upload
    await st.truncate('packs/mp/big.pack', 6 * MIB + 1);
    expect((await st.get('packs/mp/big.pack')).equals(data.subarray(0, 6 * MIB + 1))).toBe(true);
    const uploads: unknown[] = [];
    for await (const u of listUploads(st.client, 'repo/')) uploads.push(u);
    expect(uploads).toEqual([]);
  });

  it('sends parts while the object is appended to; truncate within what is held, not behind the parts sent; close without sync aborts', async () => {
    const st = open({ multipartThreshold: 5 * MIB, partSize: 5 * MIB });
    const uploads = async () => {
      const out: string[] = [];
      for await (const u of listUploads(st.client, 'repo/')) out.push(u.key);
      return out;
    };
    const data = prng(6, 14 * MIB);
    const a = await st.create('packs/ea/eager.pack');
    for (let off = 0; off < 11 * MIB; off += MIB) await a.append(data.subarray(off, off + MIB));
    expect(await uploads()).toEqual(['repo/one/packs/ea/eager.pack']); // under way before any sync
    expect(await st.stat('packs/ea/eager.pack')).toBeNull();
    // Two parts (10 MiB) went up: the bytes after them can be cut, not those in them.
    expect(await code(a.truncate(3 * MIB))).toBe('ESENT');
    expect(a.size).toBe(11 * MIB);
    await a.truncate(10 * MIB + 7);
    await a.truncate(10 * MIB);
    for (let off = 10 * MIB; off < data.length; off += MIB) await a.append(data.subarray(off, off + MIB));
    await a.sync();
    expect((await st.get('packs/ea/eager.pack')).equals(data)).toBe(true);
    expect(await uploads()).toEqual([]);
    await a.close();
    const b = await st.create('packs/ea/dropped.pack');
    await b.append(data);
    expect(await uploads()).toEqual(['repo/one/packs/ea/dropped.pack']);
    expect(await code(b.truncate(0))).toBe('ESENT');
    await b.close();
    expect(await uploads()).toEqual([]);
    expect(await st.stat('packs/ea/dropped.pack')).toBeNull();
    expect(await code(b.append(Buffer.from('x')))).toBe('EBADF');
  });

  it('an object under the threshold is held until sync; truncate of held bytes is exact', async () => {
    const st = open({ multipartThreshold: 12 * MIB, partSize: 5 * MIB });
    const data = prng(7, 11 * MIB + 5);
    const a = await st.create('packs/ho/held.pack');
    await a.append(data);
    await a.truncate(5 * MIB); // exactly one full buffer
    await a.append(data.subarray(5 * MIB, 6 * MIB + 1));
    await a.truncate(2 * MIB + 3); // inside the first buffer
    await a.append(data.subarray(2 * MIB + 3));
    await a.sync();
    expect((await st.get('packs/ho/held.pack')).equals(data)).toBe(true);
    await a.close();
  });

  it('close without sync uploads nothing', async () => {
    const a = await store.create('packs/cc/unsynced.pack');
    await a.append(prng(9, 1000));
    await a.close();
    expect(await store.stat('packs/cc/unsynced.pack')).toBeNull();
  });

  it('lists page by page', async () => {
    const st = open({ listPageSize: 2 });
    const want: string[] = [];
    for (let i = 0; i < 7; i++) {
      await st.put(`pages/o${i}`, String(i));
      want.push(`pages/o${i}`);
    }
    const got: string[] = [];
    for await (const o of st.list('pages')) got.push(o.name);
    expect(got.sort()).toEqual(want);
  });

  it('refused credentials: EACCES, one line naming the endpoint and bucket', async () => {
    const bad = open({ secretAccessKey: 'wrong' + c.s3!.secretKey });
    const e = await bad.get('contract/ex.json').catch((x: NodeJS.ErrnoException) => x);
    expect(e).toMatchObject({ code: 'EACCES' });
    expect((e as Error).message).toMatch(/refused the credentials/);
    expect((e as Error).message).toContain(c.s3!.endpoint);
    expect((e as Error).message).toContain('genvault-test');
    expect((e as Error).message).not.toContain('\n');
    const unknown = open({ accessKeyId: 'NOSUCHKEY' });
    expect(await code(unknown.put('x', 'x'))).toBe('EACCES');
  });

  it('a missing bucket: ENOENT naming the bucket', async () => {
    const none = open({ bucket: 'no-such-bucket' });
    const e = await none.get('x').catch((x: NodeJS.ErrnoException) => x);
    expect(e).toMatchObject({ code: 'ENOENT' });
    expect((e as Error).message).toBe(`bucket no-such-bucket does not exist at ${c.s3!.endpoint}`);
    expect(await code(none.put('x', 'x'))).toBe('ENOENT');
  });

  it('limitRate holds uploads and downloads to roughly the rate', async () => {
    const st = open({ limitRate: 2 * MIB });
    const data = prng(13, 3 * MIB);
    const t0 = performance.now();
    await st.put('rate/x', data);
    const up = performance.now() - t0;
    const buf = Buffer.alloc(data.length);
    const t1 = performance.now();
    expect(await st.read('rate/x', buf, 0, buf.length, 0)).toBe(data.length);
    const down = performance.now() - t1;
    expect(buf.equals(data)).toBe(true);
    for (const ms of [up, down]) {
      expect(ms).toBeGreaterThan(1200);
      expect(ms).toBeLessThan(8000);
    }
  });
}

function faults(): void {
  it('retries 503 SlowDown and succeeds', async () => {
    await withProxy(
      (_req, n) => (n < 3 ? 'slowdown' : 'pass'),
      async (st, log) => {
        await st.put('faults/slow', 'ok');
        expect((await st.get('faults/slow')).toString()).toBe('ok');
        expect(log.filter((l) => l.fate === 'slowdown').length).toBe(3);
      },
    );
  });

  it('retries an answer held back past the timeout', async () => {
    await withProxy(
      (_req, n) => (n === 0 ? { delayMs: 1500 } : 'pass'),
      async (st, log) => {
        await st.put('faults/delayed', 'late');
        expect(log.length).toBeGreaterThanOrEqual(2);
        expect((await st.get('faults/delayed')).toString()).toBe('late');
      },
      { timeoutMs: 400 },
    );
  });

  it('retries parts cut off mid-upload and completes the object', async () => {
    let cuts = 0;
    const data = prng(17, 11 * MIB);
    await withProxy(
      (req) => (req.method === 'PUT' && /partNumber=/.test(req.url ?? '') && cuts++ < 2 ? 'cut' : 'pass'),
      async (st) => {
        const a = await st.create('faults/cut.pack');
        await a.append(data);
        await a.sync();
        await a.close();
        expect((await st.get('faults/cut.pack')).equals(data)).toBe(true);
      },
      { multipartThreshold: 5 * MIB, partSize: 5 * MIB },
    );
    expect(cuts).toBeGreaterThanOrEqual(2);
  });

  it('parts grow as the object does (doubling every partsPerSize parts); the object is whole', async () => {
    const sizes: number[] = [];
    const data = prng(23, 37 * MIB + 5);
    await withProxy(
      (req) => {
        if (req.method === 'PUT' && /partNumber=/.test(req.url ?? '')) sizes.push(Number(req.headers['content-length']) / MIB);
        return 'pass';
      },
      async (st) => {
        const a = await st.create('faults/grow.pack');
        for (let off = 0; off < data.length; off += 3 * MIB) await a.append(data.subarray(off, off + 3 * MIB));
        await a.sync();
        await a.close();
        expect((await st.get('faults/grow.pack')).equals(data)).toBe(true);
      },
      { multipartThreshold: 5 * MIB, partSize: 5 * MIB, partsPerSize: 2 },
    );
    expect(sizes.map((x) => Math.round(x * 100) / 100)).toEqual([5, 5, 10, 10, 7]);
  });

  it('with retries exhausted, fails with one clear line', async () => {
    await withProxy(
      () => 'slowdown',
      async (st) => {
        const e = (await st.put('faults/never', 'x').catch((x: Error) => x)) as NodeJS.ErrnoException;
        expect(e.code).toBe('EIO');
        expect(e.message).toMatch(/^PUT s3:\/\/genvault-test\/repo\/one\/faults\/never at http:\/\/127\.0\.0\.1:\d+ failed: SlowDown: Please reduce your request rate\. \(gave up after 3 attempts\)$/);
      },
      { maxAttempts: 3 },
    );
  });

  it('a multipart upload cut off for good is left for abortStaleUploads, which aborts it', async () => {
    const data = prng(19, 11 * MIB);
    await withProxy(
      (req) => (/uploadId=/.test(req.url ?? '') ? 'cut' : 'pass'),
      async (st) => {
        const a = await st.create('faults/dead.pack');
        await a.append(data);
        const e = (await a.sync().catch((x: Error) => x)) as NodeJS.ErrnoException;
        expect(e.code).toBe('ECONNRESET');
        expect(e.message).not.toContain('\n');
        expect(e.message).toContain('gave up after 2 attempts');
        await a.close();
      },
      { multipartThreshold: 5 * MIB, partSize: 5 * MIB, maxAttempts: 2 },
    );
    const direct = open();
    expect(await direct.abortStaleUploads(60_000)).toBe(0); // too recent
    expect(await direct.abortStaleUploads(0)).toBe(1);
    const left: unknown[] = [];
    for await (const u of listUploads(direct.client, 'repo/one/')) left.push(u);
    expect(left).toEqual([]);
    expect(await direct.stat('faults/dead.pack')).toBeNull();
  });
}

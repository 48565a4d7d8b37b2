/**
 * The worker protocol (src/work/protocol.ts), op by op through the built pool: each answer
 * has the shape protocol.ts gives it, and the ops agree with each other (chunk, then
 * compress, then load / loadMany / restoreMany read back the same bytes).
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Scratch, prng, text } from './helpers.js';
// The pool starts dist/work/worker.js next to itself: use the built pool (scripts/test builds first).
import { WorkerPool } from '../dist/work/pool.js';
import { defaultConfig } from '../dist/format/config.js';
import { COMP_GROUP, COMP_RAW, COMP_ZSTD } from '../dist/format/pack.js';

let s: Scratch;
let pool: InstanceType<typeof WorkerPool>;
const params = defaultConfig().chunking;

beforeAll(async () => {
  s = await Scratch.create('genvault-protocol-');
  pool = new WorkerPool(2, 0, 1, { kind: 'local', dir: s.dir }); // items name packs relative to it
});

afterAll(async () => {
  await pool?.close();
  await s?.cleanup();
});

/** A segment: text (compresses), 1 MiB of zeros, random bytes (does not). */
function segment(): { seg: SharedArrayBuffer; bytes: Buffer } {
  const bytes = Buffer.concat([text(1, 3 << 20), Buffer.alloc(1 << 20), prng(2, 1 << 20)]);
  const seg = new SharedArrayBuffer(bytes.length);
  Buffer.from(seg).set(bytes);
  return { seg, bytes };
}

const sha = (b: Uint8Array) => createHash('sha256').update(b).digest();

interface Chunk {
  start: number;
  length: number;
  digest: Uint8Array;
}

/** chunk, then compress the data chunks into one pack file; the loads' items for them. */
async function packed(group: number) {
  const { seg, bytes } = segment();
  const c = await pool.run({ op: 'chunk', seg, len: bytes.length, params, fast: false });
  if (!('table' in c)) throw new Error('chunk failed');
  const data: Chunk[] = [];
  for (let i = 0; i < c.table.length / 3; i++) {
    if (c.table[i * 3 + 2] === 0) data.push({ start: c.table[i * 3]!, length: c.table[i * 3 + 1]!, digest: c.digests.slice(i * 32, i * 32 + 32) });
  }
  const spans = new Int32Array(data.flatMap((d) => [d.start, d.length]));
  const digests = new Uint8Array(data.length * 32);
  data.forEach((d, i) => digests.set(d.digest, i * 32));
  const res = await pool.run({ op: 'compress', seg, spans, digests, level: 3, group });
  const file = `g${group}.pack`;
  fs.writeFileSync(s.path(file), res.out);
  const items = data.map((d, i) => ({
    file,
    offset: res.table[i * 5]!,
    storedLength: res.table[i * 5 + 1]!,
    rawLength: d.length,
    compression: res.table[i * 5 + 2]!,
    ...(res.table[i * 5 + 2] === COMP_GROUP ? { inner: res.table[i * 5 + 3]!, groupRaw: res.table[i * 5 + 4]! } : {}),
    digest: d.digest,
  }));
  return { bytes, data, items, res };
}

describe('worker protocol', () => {
  it('chunk: a table of [start, length, zero], 32-byte digests, BLAKE3 on request, unchanged bytes', async () => {
    const { seg, bytes } = segment();
    const a = await pool.run({ op: 'chunk', seg, len: bytes.length, params, fast: true });
    if (!('table' in a)) throw new Error(`chunk failed: ${JSON.stringify(a)}`);
    expect(a.table).toBeInstanceOf(Int32Array);
    expect(a.digests).toBeInstanceOf(Uint8Array);
    expect(a.fast).toBeInstanceOf(Uint8Array);
    expect(a.unchanged).toBe(0);
    const n = a.table.length / 3;
    expect(n).toBeGreaterThan(3);
    expect(a.digests.length).toBe(n * 32);
    expect(a.fast!.length).toBe(n * 32);
    let at = 0;
    let zeros = 0;
    for (let i = 0; i < n; i++) {
      const [start, length, zero] = [a.table[i * 3]!, a.table[i * 3 + 1]!, a.table[i * 3 + 2]!];
      expect(start).toBe(at);
      at += length;
      if (zero) {
        zeros += length;
        expect(bytes.subarray(start, start + length).every((b) => b === 0)).toBe(true);
      } else {
        expect(Buffer.from(a.digests.subarray(i * 32, i * 32 + 32)).equals(sha(bytes.subarray(start, start + length)))).toBe(true);
      }
    }
    expect(at).toBe(bytes.length);
    expect(zeros).toBeGreaterThan(0);
    // Without `fast`, no BLAKE3.
    const b = await pool.run({ op: 'chunk', seg, len: bytes.length, params });
    expect('table' in b && b.fast).toBe(null);
  });

  it('chunk with a read: the segment is read from the descriptor; a short source answers { short }', async () => {
    const { bytes } = segment();
    const file = s.path('source.img');
    fs.writeFileSync(file, bytes.subarray(0, 4 << 20)); // the segment is 5 MiB
    const fd = fs.openSync(file, 'r');
    try {
      const seg = new SharedArrayBuffer(bytes.length);
      const ok = await pool.run({ op: 'chunk', seg, len: 4 << 20, params, read: { fd, position: 0, extents: null } });
      expect('table' in ok).toBe(true);
      expect(Buffer.from(seg, 0, 4 << 20).equals(bytes.subarray(0, 4 << 20))).toBe(true);
      const short = await pool.run({ op: 'chunk', seg, len: bytes.length, params, read: { fd, position: 0, extents: null } });
      expect(short).toEqual({ short: 4 << 20 });
    } finally {
      fs.closeSync(fd);
    }
    const dir = fs.openSync(s.dir, 'r');
    try {
      const seg = new SharedArrayBuffer(1 << 20);
      const bad = await pool.run({ op: 'chunk', seg, len: 1 << 20, params, read: { fd: dir, position: 4096, extents: null } });
      expect(bad).toEqual({ readError: { code: 'EISDIR', message: expect.any(String), offset: 4096 } });
    } finally {
      fs.closeSync(dir);
    }
  });

  it('compress: records in `out`, per chunk [record offset, stored length, compression, inner, group raw]', async () => {
    const single = await packed(0);
    expect(single.res.out).toBeInstanceOf(Uint8Array);
    expect(single.res.table).toBeInstanceOf(Int32Array);
    expect(single.res.table.length).toBe(single.data.length * 5);
    const comps = new Set(single.items.map((it) => it.compression));
    expect(comps).toEqual(new Set([COMP_RAW, COMP_ZSTD])); // text compresses, random does not
    const grouped = await packed(1 << 20);
    expect(grouped.items.some((it) => it.compression === COMP_GROUP)).toBe(true);
    // Into the caller's shared buffer when it is big enough: `out` is a view of it.
    const { seg, bytes } = segment();
    const spans = new Int32Array([0, 64 << 10]);
    const out = new SharedArrayBuffer(1 << 20);
    const res = await pool.run({ op: 'compress', seg, spans, digests: sha(bytes.subarray(0, 64 << 10)), level: 3, out });
    expect(res.out.buffer).toBeInstanceOf(SharedArrayBuffer); // the same memory (a new object on this side)
    expect(Buffer.from(out, 0, res.out.length).equals(res.out)).toBe(true);
  });

  it('load: { data } with the chunk, or { damaged } naming what is wrong', async () => {
    for (const group of [0, 1 << 20]) {
      const { bytes, data, items } = await packed(group);
      for (let i = 0; i < items.length; i++) {
        const a = await pool.run({ op: 'load', ...items[i]! });
        expect(a.damaged).toBeUndefined();
        expect(a.data).toBeInstanceOf(Uint8Array);
        expect(Buffer.from(a.data!).equals(bytes.subarray(data[i]!.start, data[i]!.start + data[i]!.length))).toBe(true);
      }
      const wrong = await pool.run({ op: 'load', ...items[0]!, digest: new Uint8Array(32) });
      expect(wrong.data).toBeUndefined();
      expect(wrong.damaged).toEqual(expect.any(String));
    }
  });

  it('loadMany: { all, results: [{ offset, length } | { damaged }] }, or into the shared slab without `all`', async () => {
    const { bytes, data, items } = await packed(1 << 20);
    const a = await pool.run({ op: 'loadMany', items });
    expect(a.all).toBeInstanceOf(Uint8Array);
    expect(a.results).toHaveLength(items.length);
    a.results.forEach((r, i) => {
      expect(r.damaged).toBeUndefined();
      const d = data[i]!;
      expect(Buffer.from(a.all!.subarray(r.offset!, r.offset! + r.length!)).equals(bytes.subarray(d.start, d.start + d.length))).toBe(true);
    });
    const slab = new SharedArrayBuffer(16 << 20);
    const b = await pool.run({ op: 'loadMany', items: [...items, { ...items[0]!, digest: new Uint8Array(32) }], into: slab, intoAt: 4096 });
    expect(b.all).toBeUndefined();
    expect(b.results.at(-1)!.damaged).toEqual(expect.any(String));
    b.results.slice(0, -1).forEach((r, i) => {
      const d = data[i]!;
      expect(Buffer.from(slab, 4096 + r.offset!, r.length!).equals(bytes.subarray(d.start, d.start + d.length))).toBe(true);
    });
  });

  it('restoreMany: writes the chunks (and zeros) at their places; { damaged } lists the items that failed', async () => {
    const { bytes, data, items } = await packed(1 << 20);
    const target = s.path('target.img');
    fs.writeFileSync(target, Buffer.alloc(bytes.length, 0xff));
    const fd = fs.openSync(target, 'r+');
    try {
      const restore = items.map((it, i) => ({ ...it, at: data[i]!.start, zero: false }));
      // The zero chunks (between the text and the random bytes): zeros written there.
      const gaps: Array<[number, number]> = [];
      let at = 0;
      for (const d of data) {
        if (d.start > at) gaps.push([at, d.start - at]);
        at = d.start + d.length;
      }
      if (at < bytes.length) gaps.push([at, bytes.length - at]);
      for (const [g, len] of gaps) restore.push({ ...items[0]!, rawLength: len, at: g, zero: true });
      const a = await pool.run({ op: 'restoreMany', fd, items: restore });
      expect(a).toEqual({ damaged: [] });
      expect(fs.readFileSync(target).equals(bytes)).toBe(true);
      const bad = await pool.run({ op: 'restoreMany', fd, items: [{ ...items[1]!, at: 0, zero: false, digest: new Uint8Array(32) }] });
      expect(bad).toEqual({ damaged: [0] });
    } finally {
      fs.closeSync(fd);
    }
  });

  it('a handler that throws: the task rejects with an Error carrying the message and code', async () => {
    const item = { file: 'none.pack', offset: 0, storedLength: 0, rawLength: 4096, compression: 0, digest: new Uint8Array(32) };
    const e = await pool.run({ op: 'restoreMany', fd: 1 << 20, items: [{ ...item, at: 0, zero: true }] }).catch((x: unknown) => x);
    expect(e).toBeInstanceOf(Error);
    expect(e).toMatchObject({ code: 'EBADF', message: expect.stringContaining('bad file descriptor') });
  });
});

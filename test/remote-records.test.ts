/**
 * Records from a remote writer (CHUNKS coding 2), in process: what the client's `compress`
 * op builds unsealed, the server's `adopt` op takes only when every header, length, group
 * table and chunk identity is the one asked for at that place; anything else is one error.
 * (Unencrypted here: a worker's keys come from its pool. The sealed path runs end to end
 * in remote.test.ts, "an encrypted repository".)
 */
import { describe, expect, it } from 'vitest';
import { createHash } from 'node:crypto';
import { handleCompress } from '../src/work/op-compress.js';
import { handleAdopt } from '../src/work/op-adopt.js';
import { COMP_GROUP, COMP_RAW, RECORD_HEADER_SIZE, decodeRecordHeader, encodeRecordHeader } from '../src/format/pack.js';
import { zstd } from '../src/work/zstd.js';
import { blake3 } from '@napi-rs/blake-hash';
import { prng } from './helpers.js';

/** Groups of two text chunks, the random ones alone (raw), the last text one alone (zstd). */
const GROUP = 100000;

/** A segment of chunks: compressible text, and random data at 2 and 5. */
function segment() {
  const lengths = [40000, 50000, 150000, 30000, 60000, 120000, 20000];
  const parts = lengths.map((n, i) => (i % 3 === 2 ? prng(i + 1, n) : Buffer.from(`chunk ${i} `.repeat(n).slice(0, n))));
  const seg = new SharedArrayBuffer(lengths.reduce((a, b) => a + b));
  const view = Buffer.from(seg);
  const spans = new Int32Array(lengths.length * 2);
  const digests = new Uint8Array(lengths.length * 32);
  let at = 0;
  parts.forEach((p, i) => {
    p.copy(view, at);
    spans[i * 2] = at;
    spans[i * 2 + 1] = p.length;
    digests.set(createHash('sha256').update(p).digest(), i * 32);
    at += p.length;
  });
  return { seg, spans, digests, lengths: Int32Array.from(lengths), parts };
}

function records(s: ReturnType<typeof segment>, group = GROUP): Buffer {
  const r = handleCompress({ op: 'compress', seg: s.seg, spans: s.spans, digests: s.digests, level: 2, group, seal: false }).result;
  return Buffer.from(r.out);
}

function adopt(s: ReturnType<typeof segment>, recs: Buffer, keep?: number[], opts: { group?: number; lengths?: Int32Array; digests?: Uint8Array } = {}) {
  const n = s.lengths.length;
  const sab = new SharedArrayBuffer(Math.max(recs.length, 1));
  Buffer.from(sab).set(recs);
  const out = new SharedArrayBuffer(recs.length + n * 28);
  const k = new Uint8Array(n).fill(1);
  if (keep) k.fill(0).forEach((_, i) => (k[i] = keep.includes(i) ? 1 : 0));
  return handleAdopt({ op: 'adopt', recs: sab, at: 0, len: recs.length, digests: opts.digests ?? s.digests, lengths: opts.lengths ?? s.lengths, keep: k, group: opts.group ?? GROUP, fast: true, out }).result;
}

/** Each record of a buffer: [offset, header]. */
function walk(b: Buffer) {
  const out: Array<[number, NonNullable<ReturnType<typeof decodeRecordHeader>>]> = [];
  for (let at = 0; at < b.length; ) {
    const h = decodeRecordHeader(b, at)!;
    out.push([at, h]);
    at += RECORD_HEADER_SIZE + h.storedLength;
  }
  return out;
}

describe('records from a remote writer', () => {
  it('are taken as they are when every chunk is the one asked for', () => {
    const s = segment();
    const recs = records(s);
    const kinds = walk(recs).map(([, h]) => h.compression);
    expect(kinds).toContain(COMP_GROUP);
    expect(kinds).toContain(COMP_RAW);
    const res = adopt(s, recs);
    // Without keys nothing is sealed: the records come out byte for byte.
    expect(Buffer.from(res.out).equals(recs)).toBe(true);
    expect(res.table.length).toBe(s.lengths.length * 5);
    // Each chunk's BLAKE3 (for the map's change detection), hashed from the decoded bytes.
    s.parts.forEach((p, i) => expect(Buffer.from(res.fast!.subarray(i * 32, i * 32 + 32)).equals(blake3(p))).toBe(true));
  });

  it('drop records of chunks only proved, and keep a group whole for one stored member', () => {
    const s = segment();
    const recs = records(s);
    const res = adopt(s, recs, [0]);
    // Chunk 0 is in a group with chunk 1: the group is written, one table row.
    expect(res.table.length).toBe(5);
    expect(res.table[2]).toBe(COMP_GROUP);
    expect(res.table[3]).toBe(0);
    const onlyRaw = adopt(s, recs, [2]);
    expect(onlyRaw.table.length).toBe(5);
    expect(onlyRaw.table[2]).toBe(COMP_RAW);
    expect(onlyRaw.out.length).toBe(RECORD_HEADER_SIZE + s.lengths[2]!);
    expect(adopt(s, recs, []).out.length).toBe(0);
  });

  it('refuse a payload byte changed, in a raw record and in a compressed group', () => {
    const s = segment();
    const recs = records(s);
    const recsOf = walk(recs);
    const [rawAt] = recsOf.find(([, h]) => h.compression === COMP_RAW)!;
    const a = Buffer.from(recs);
    a[rawAt + RECORD_HEADER_SIZE + 100]! ^= 1;
    expect(() => adopt(s, a)).toThrow(/does not match its identity/);
    const [groupAt, gh] = recsOf.find(([, h]) => h.compression === COMP_GROUP)!;
    const b = Buffer.from(recs);
    b[groupAt + RECORD_HEADER_SIZE + gh.storedLength - 20]! ^= 0x55;
    expect(() => adopt(s, b)).toThrow(/does not decode|decodes to|does not match/);
  });

  it('refuse chunks out of order, missing or extra, and lengths that lie', () => {
    const s = segment();
    const recs = records(s);
    // Asked for in another order: the first record is not the first chunk asked for.
    const swapped = Buffer.from(s.digests);
    swapped.set(s.digests.subarray(32, 64), 0);
    swapped.set(s.digests.subarray(0, 32), 32);
    expect(() => adopt(s, recs, undefined, { digests: swapped })).toThrow(/not the one asked for/);
    const recsOf = walk(recs);
    const [lastAt] = recsOf.at(-1)!;
    expect(() => adopt(s, recs.subarray(0, lastAt))).toThrow(/missing/);
    expect(() => adopt(s, Buffer.concat([recs, recs.subarray(lastAt)]))).toThrow(/more chunks than were asked for/);
    expect(() => adopt(s, recs.subarray(0, recs.length - 1))).toThrow(/runs past the end/);
    expect(() => adopt(s, Buffer.concat([recs, Buffer.alloc(8)]))).toThrow(/no chunk record/);
  });

  it('refuse a group larger than the repository makes, or where it makes none', () => {
    const s = segment();
    const recs = records(s);
    expect(() => adopt(s, recs, undefined, { group: 0 })).toThrow(/makes none/);
    expect(() => adopt(s, recs, undefined, { group: 50000 })).toThrow(/more than the repository's/);
  });

  it('decode a zstd bomb no further than the length its chunk was asked with', () => {
    const data = Buffer.alloc(65536);
    const big = Buffer.alloc(64 << 20);
    const packed = Buffer.alloc(zstd.compressBound(big.length));
    const n = new zstd.CCtx().compress(packed, big, 1);
    const rec = Buffer.alloc(RECORD_HEADER_SIZE + n);
    packed.copy(rec, RECORD_HEADER_SIZE, 0, n);
    const digest = createHash('sha256').update(data).digest();
    encodeRecordHeader(rec, 0, 1, data.length, n, digest);
    const s = { ...segment(), lengths: Int32Array.of(data.length), digests: new Uint8Array(digest) };
    expect(() => adopt(s, rec)).toThrow(/does not decode|decodes to/);
  });
});

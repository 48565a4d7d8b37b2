import { describe, expect, it } from 'vitest';
import { SegmentChunker, chunkSegment, zeroSegment } from '../src/format/chunker.js';
import { defaultConfig } from '../src/format/config.js';
import { prng } from './helpers.js';

const P = defaultConfig().chunking;

function digests(buf: Buffer) {
  return chunkSegment(buf, buf.length, P).map((c) => ({ ...c, key: c.zero ? 'zero' : buf.subarray(c.start, c.start + c.length).toString('base64').slice(0, 40) }));
}

describe('block-aligned content-defined chunking', () => {
  it('cuts only at block multiples, within min and max, covering the whole input', () => {
    const buf = prng(1, 8 << 20);
    const chunks = chunkSegment(buf, buf.length, P);
    let pos = 0;
    for (const c of chunks) {
      expect(c.start).toBe(pos);
      expect(c.start % P.block).toBe(0);
      expect(c.length).toBeLessThanOrEqual(P.max);
      pos += c.length;
    }
    expect(pos).toBe(buf.length);
    const inner = chunks.slice(0, -1);
    expect(inner.every((c) => c.length >= P.min)).toBe(true);
    const avg = buf.length / chunks.length;
    expect(avg).toBeGreaterThan(96 << 10);
    expect(avg).toBeLessThan(256 << 10);
  });

  it('zeroSegment gives the chunks chunkSegment makes of zeros (segments that are all hole)', () => {
    for (const len of [8 << 20, (8 << 20) - 4096, (8 << 20) - 100, P.max, P.max + 1, 12345, 1]) {
      expect(zeroSegment(len, P)).toEqual(chunkSegment(Buffer.alloc(len), len, P));
    }
  });

  it('turns zero runs into zero chunks of at most max bytes, and handles a partial last block', () => {
    const data = prng(2, 300_000);
    const buf = Buffer.concat([data, Buffer.alloc(3 << 20), data.subarray(0, 5000)]);
    const chunks = chunkSegment(buf, buf.length, P);
    const zero = chunks.filter((c) => c.zero);
    expect(zero.reduce((a, c) => a + c.length, 0)).toBeGreaterThanOrEqual((3 << 20) - P.block);
    expect(zero.every((c) => c.length <= P.max)).toBe(true);
    expect(chunks.at(-1)!.start + chunks.at(-1)!.length).toBe(buf.length);
  });

  it('finds the same chunks when the same content sits at another block-aligned offset', () => {
    const content = prng(3, 2 << 20);
    const a = Buffer.concat([prng(4, 40 * 4096), content]);
    const b = Buffer.concat([prng(5, 97 * 4096), content]);
    const ka = new Set(digests(a).map((c) => c.key));
    const inContent = digests(b).filter((c) => c.start >= 97 * 4096);
    const shared = inContent.filter((c) => ka.has(c.key)).length;
    // all but the first chunk or two after the differing prefix line up
    expect(inContent.length).toBeGreaterThan(15);
    expect(shared).toBeGreaterThanOrEqual(inContent.length - 2);
  });

  it('is deterministic', () => {
    const buf = prng(6, 1 << 20);
    expect(chunkSegment(buf, buf.length, P)).toEqual(chunkSegment(Buffer.from(buf), buf.length, P));
  });

  it('gives the same chunks fed piece by piece as all at once', () => {
    const data = prng(7, 3 << 20);
    // data, a long zero run, a short one, data, and a partial last block
    const buf = Buffer.concat([data.subarray(0, 1 << 20), Buffer.alloc(2 << 20), data.subarray(0, 900_000), Buffer.alloc(8192), data.subarray(1 << 20), data.subarray(0, 777)]);
    const whole = chunkSegment(buf, buf.length, P);
    for (const piece of [4096, 65536, 1 << 20, 1_000_000, 12345]) {
      const c = new SegmentChunker(buf, buf.length, P);
      const got: typeof whole = [];
      let reported = 0;
      for (let limit = piece; ; limit += piece) {
        c.advance(Math.min(limit, buf.length), (s) => got.push(s));
        // a chunk is reported only once all its bytes are below the limit
        for (const s of got.slice(reported)) expect(s.start + s.length).toBeLessThanOrEqual(Math.min(limit, buf.length));
        reported = got.length;
        if (limit >= buf.length) break;
      }
      expect(got).toEqual(whole);
    }
  });
});

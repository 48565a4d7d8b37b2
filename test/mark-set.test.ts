import { randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { MarkSet, placeKey } from '../src/util/mark-set.js';

/** n random 32-byte digests in one buffer. */
const digests = (n: number) => randomBytes(n * 32);

describe('MarkSet', () => {
  it('holds every digest added and, while exact, none other', () => {
    const set = new MarkSet();
    const inn = digests(200_000);
    const out = digests(200_000);
    for (let i = 0; i < 200_000; i++) set.add(inn, i * 32);
    expect(set.exact).toBe(true);
    expect(set.size).toBe(200_000);
    let missing = 0;
    let extra = 0;
    for (let i = 0; i < 200_000; i++) {
      if (!set.has(inn, i * 32)) missing++;
      if (set.has(out, i * 32)) extra++;
    }
    expect(missing).toBe(0);
    expect(extra).toBe(0);
    // Adding again does not count twice.
    set.add(inn, 0);
    expect(set.size).toBe(200_000);
  });

  it('tells the all-zero prefix from an empty slot', () => {
    const set = new MarkSet();
    const z = Buffer.alloc(32);
    expect(set.has(z)).toBe(false);
    set.add(z);
    expect(set.has(z)).toBe(true);
    const other = Buffer.alloc(32);
    other[8] = 1; // same first 8 bytes: taken for the same chunk (errs towards "referenced")
    expect(set.has(other)).toBe(true);
  });

  it('past its memory bound turns into a Bloom filter that still holds every digest', () => {
    // 256 tables of 1024 slots start at 2 MiB; a 4 MiB bound stops the first growths.
    const set = new MarkSet(4 << 20);
    const n = 600_000;
    const inn = digests(n);
    for (let i = 0; i < n; i++) set.add(inn, i * 32);
    expect(set.exact).toBe(false);
    expect(set.bytes).toBeLessThanOrEqual(4 << 20);
    for (let i = 0; i < n; i++) if (!set.has(inn, i * 32)) throw new Error(`digest ${i} lost in the filter`);
    const out = digests(100_000);
    let fp = 0;
    for (let i = 0; i < 100_000; i++) if (set.has(out, i * 32)) fp++;
    // 16 Mbit for 600k digests, 4 hashes: ~1.4% expected.
    expect(fp / 100_000).toBeLessThan(0.05);
  });

  it('grows without losing digests and stays within its bound', () => {
    const set = new MarkSet(64 << 20);
    const n = 1_000_000;
    const inn = digests(n);
    for (let i = 0; i < n; i++) set.add(inn, i * 32);
    expect(set.exact).toBe(true);
    expect(set.bytes).toBeLessThanOrEqual(64 << 20);
    for (let i = 0; i < n; i += 7) expect(set.has(inn, i * 32)).toBe(true);
  });
});

describe('MarkSet.clear', () => {
  it('empties the set at the size it has, exact or filter', () => {
    for (const bound of [512 << 20, 4 << 20]) {
      const set = new MarkSet(bound);
      const inn = digests(300_000);
      for (let i = 0; i < 300_000; i++) set.add(inn, i * 32);
      const bytes = set.bytes;
      set.clear();
      expect(set.size).toBe(0);
      expect(set.bytes).toBe(bytes);
      let held = 0;
      for (let i = 0; i < 300_000; i++) if (set.has(inn, i * 32)) held++;
      expect(held).toBe(0);
      set.add(inn, 0);
      expect(set.has(inn, 0)).toBe(true);
    }
  });
});

describe('placeKey', () => {
  it('gives the places of one pack distinct keys', () => {
    const loc = Buffer.alloc(40);
    randomBytes(16).copy(loc);
    const seen = new Set<string>();
    const k = Buffer.alloc(8);
    for (let off = 0; off < 100_000; off++) {
      loc.writeBigUInt64LE(BigInt(off) * 4096n, 16);
      seen.add(placeKey(loc, k).toString('hex'));
    }
    expect(seen.size).toBe(100_000);
  });
});

/**
 * The mount's read-ahead memory (src/read/reader.ts, SlabPool and ChunkLoader.room), in
 * process with a stand-in worker pool: batches are decoded into a bounded pool of slabs,
 * never into fresh memory, and a batch that finds no slab free waits for one without ever
 * waiting for good.
 */
import { describe, expect, it } from 'vitest';
import { ChunkLoader } from '../src/read/reader.js';
import type { Repository } from '../src/repository/repository.js';
import { COMP_RAW, type ChunkLocation } from '../src/format/pack.js';

const MiB = 1 << 20;

interface LoadReq {
  op: string;
  items: Array<{ rawLength: number; digest: Uint8Array }>;
  into?: SharedArrayBuffer;
  intoAt?: number;
}

/** A loader over a pool that "decodes" chunk i as bytes of value i, after `delayMs`. */
function fakeLoader(cacheBytes: number, delayMs: number) {
  const inFlight = { now: 0, most: 0 };
  const slabs = new Set<SharedArrayBuffer>();
  const pool = {
    async run(req: LoadReq) {
      expect(req.op).toBe('loadMany');
      inFlight.most = Math.max(inFlight.most, ++inFlight.now);
      await new Promise((r) => setTimeout(r, delayMs));
      inFlight.now--;
      const total = req.items.reduce((a, it) => a + it.rawLength, 0);
      const out = req.into ? new Uint8Array(req.into, req.intoAt, total) : new Uint8Array(total);
      if (req.into) slabs.add(req.into);
      let at = 0;
      const results = req.items.map((it) => {
        out.fill(it.digest[0]!, at, at + it.rawLength);
        at += it.rawLength;
        return { offset: at - it.rawLength, length: it.rawLength };
      });
      return req.into ? { results } : { all: out, results };
    },
  };
  const repo = { pool, db: {}, location: async () => null } as unknown as Repository;
  const loader = new ChunkLoader(repo, cacheBytes, true);
  return { loader, inFlight, slabs };
}

function digestOf(i: number): Buffer {
  const d = Buffer.alloc(32, 0xee);
  d[0] = i;
  d.writeUInt32BE(i, 1);
  return d;
}

/** Chunks 0..n-1 of `bytes` each, made known to the loader as if their leaf was warmed. */
function chunks(loader: ChunkLoader, n: number, bytes: number): Buffer[] {
  const locations = (loader as unknown as { locations: { set(k: string, v: ChunkLocation): void } }).locations;
  const out: Buffer[] = [];
  for (let i = 0; i < n; i++) {
    const d = digestOf(i);
    locations.set(d.toString('binary'), { packId: 'ab'.repeat(16), offset: i * bytes, storedLength: bytes, rawLength: bytes, compression: COMP_RAW });
    out.push(d);
  }
  return out;
}

describe('read-ahead slabs', () => {
  it('a batch that finds every slab taken waits until one is free, even when the slabs are pinned by chunks that landed while it waited', async () => {
    // Batches of two 0.35 MiB chunks, two batches to a 2 MiB slab (1.4 MiB used): the 6
    // slabs of an 8 MiB cache hold 8.4 MiB, so the cache, once the first twelve batches
    // land, holds nearly all of it and what it evicts by itself frees no whole slab. A
    // batch that waited only for a slab to come back waited for ever (a tar through a
    // loop-mounted image hung that way).
    const { loader, slabs } = fakeLoader(8 * MiB, 5);
    const ds = chunks(loader, 60, Math.floor(0.35 * MiB));
    loader.prefetch(ds);
    const got = await Promise.race([
      // Copied in the turn they are handed over, as the mount's reads do (see SlabPool).
      Promise.all(ds.map((d) => loader.load(d).then((b) => Buffer.from(b)))),
      new Promise<null>((r) => setTimeout(() => r(null), 5000)),
    ]);
    expect(got, 'loads still waiting after 5 s').not.toBeNull();
    got!.forEach((b, i) => {
      expect(b.length).toBe(Math.floor(0.35 * MiB));
      expect(b[0]).toBe(i & 0xff);
      expect(b[b.length - 1]).toBe(i & 0xff);
    });
    expect(loader.batches.fresh).toBe(0);
    expect(loader.batches.slab).toBe(30);
    expect(slabs.size).toBeLessThanOrEqual(8 / 2 + 2);
  });

  it('a slab is refilled only after every chunk in it has left the cache: chunks still cached keep their bytes', async () => {
    const { loader } = fakeLoader(8 * MiB, 1);
    const ds = chunks(loader, 200, Math.floor(0.3 * MiB));
    for (let from = 0; from < ds.length; from += 10) {
      const part = ds.slice(from, from + 10);
      loader.prefetch(part);
      await Promise.all(part.map((d) => loader.load(d)));
      // Every chunk the cache still holds has the bytes it was decoded with.
      for (let i = 0; i <= from + 9; i++) {
        const b = loader.cached(ds[i]!);
        if (b && (b[0] !== (i & 0xff) || b[b.length - 1] !== (i & 0xff))) throw new Error(`chunk ${i} overwritten in the cache`);
      }
    }
    expect(loader.batches.fresh).toBe(0);
  });

  it('a batch whose location cannot become a request fails its own chunks; the batches after it still load', async () => {
    const { loader } = fakeLoader(8 * MiB, 1);
    const ds = chunks(loader, 40, Math.floor(0.35 * MiB));
    const locations = (loader as unknown as { locations: { get(k: string): ChunkLocation } }).locations;
    locations.get(ds[4]!.toString('binary')).packId = 'not a pack id';
    loader.prefetch(ds);
    const got = await Promise.all(ds.map((d) => loader.load(d).then((b) => b[0], (e: Error) => e.message)));
    expect(got[4]).toMatch(/invalid pack id/);
    expect(got[5]).toMatch(/invalid pack id/); // the same batch
    expect(got.filter((g) => typeof g === 'string')).toHaveLength(2);
    expect(got[39]).toBe(39);
  });
});

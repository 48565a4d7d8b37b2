/**
 * Group records (format 3): runs of new chunks compressed as one zstd frame. Backups of
 * compressible images write them, every reader (restore, cat, verify --full) decodes
 * them, damage in the frame or the member table is found and named per chunk, gc copies a
 * group with live members once and whole, and a version-2 repository keeps per-chunk records.
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import { RaveLevel } from 'rave-level';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Scratch, flipByte, gv, gvOk, oneLine, prng, sha256File, text } from './helpers.js';

let s: Scratch;

beforeAll(async () => {
  s = await Scratch.create('genvault-groups-');
});

afterAll(async () => {
  await s?.cleanup();
});

interface Entry {
  digest: string;
  pack: string;
  offset: number;
  stored: number;
  raw: number;
  compression: number;
  inner?: number;
  groupRaw?: number;
}

/** The chunk index ('c' entries), read while no genvault process runs. */
async function chunkEntries(repo: string): Promise<Entry[]> {
  const db = new RaveLevel<Buffer, Buffer>(path.join(repo, 'index'), { keyEncoding: 'buffer', valueEncoding: 'buffer' });
  await db.open();
  const out: Entry[] = [];
  try {
    for await (const [k, v] of db.iterator({ gte: Buffer.from([0x63]), lt: Buffer.from([0x64]) })) {
      const e: Entry = {
        digest: k.toString('hex', 1),
        pack: v.toString('hex', 0, 16),
        offset: Number(v.readBigUInt64LE(16)),
        stored: v.readUInt32LE(24),
        raw: v.readUInt32LE(28),
        compression: v[32]!,
      };
      expect(v.length).toBe(e.compression === 2 ? 41 : 33);
      if (v.length === 41) {
        e.inner = v.readUInt32LE(33);
        e.groupRaw = v.readUInt32LE(37);
      }
      out.push(e);
    }
  } finally {
    await db.close();
  }
  return out;
}

function packFile(repo: string, id: string): string {
  return path.join(repo, 'packs', id.slice(0, 2), `${id}.pack`);
}

/** Group records of an index: key pack:offset -> its members. */
function groupsOf(entries: Entry[]): Map<string, Entry[]> {
  const m = new Map<string, Entry[]>();
  for (const e of entries) {
    if (e.compression !== 2) continue;
    const k = `${e.pack}:${e.offset}`;
    m.set(k, [...(m.get(k) ?? []), e]);
  }
  return m;
}

async function restoreSum(repo: string, spec: string): Promise<string> {
  const out = s.path(`r-${Math.random().toString(36).slice(2)}.img`);
  await gvOk(repo, ['restore', spec, out]);
  const sum = await sha256File(out);
  await fs.rm(out);
  return sum;
}

describe('group records', () => {
  let repo: string;
  let img: string;
  let sum: string;

  beforeAll(async () => {
    repo = s.path('repo');
    img = s.path('text.img');
    // Compressible text with an incompressible stretch and zeros between.
    await fs.writeFile(img, Buffer.concat([text(1, 5 << 20), prng(2, 2 << 20), Buffer.alloc(1 << 20), text(3, 3 << 20)]));
    sum = await sha256File(img);
    await gvOk(repo, ['init']);
    await gvOk(repo, ['backup', img, '--name', 't']);
  });

  it('a new repository is format 4 (group records since 3) and a compressible image is stored in group records', async () => {
    const cfg = JSON.parse(await fs.readFile(path.join(repo, 'config.json'), 'utf8'));
    expect(cfg.version).toBe(5);
    expect(cfg.compression).toEqual({ algorithm: 'zstd', level: 2, group: 1 << 20 });
    const entries = await chunkEntries(repo);
    const groups = groupsOf(entries);
    expect(groups.size).toBeGreaterThanOrEqual(6); // 8 MiB of text in groups of up to 1 MiB
    for (const members of groups.values()) {
      members.sort((a, b) => a.inner! - b.inner!);
      expect(members.length).toBeGreaterThanOrEqual(2);
      // Members tile the group: offsets in the decoded group follow each other.
      let at = 0;
      for (const m of members) {
        expect(m.inner).toBe(at);
        at += m.raw;
      }
      expect(at).toBe(members[0]!.groupRaw);
      expect(at).toBeLessThanOrEqual(1 << 20);
    }
    // The incompressible stretch is stored raw, a record per chunk.
    expect(entries.some((e) => e.compression === 0)).toBe(true);
  });

  it('restore and cat give the image back; verify and verify --full pass', async () => {
    expect(await restoreSum(repo, 't@latest')).toBe(sum);
    const cat = await gv(repo, ['cat', 't@latest']);
    expect(cat.code).toBe(0);
    const v = await gv(repo, ['verify']);
    expect(v.code, v.stdout + v.stderr).toBe(0);
    const full = JSON.parse(await gvOk(repo, ['verify', '--full', '--json']));
    expect(full).toMatchObject({ ok: true, damagedChunks: [] });
    expect(full.chunksRead).toBe(full.chunks);
  });

  it('a format-2 repository keeps one record per chunk and stays format 2', async () => {
    const v2 = s.path('repo-v2');
    await gvOk(v2, ['init']);
    const cfgFile = path.join(v2, 'config.json');
    const cfg = JSON.parse(await fs.readFile(cfgFile, 'utf8'));
    await fs.writeFile(cfgFile, JSON.stringify({ ...cfg, version: 2, compression: { algorithm: 'zstd', level: 2 } }));
    await gvOk(v2, ['backup', img, '--name', 't']);
    const entries = await chunkEntries(v2);
    expect(entries.every((e) => e.compression !== 2)).toBe(true);
    expect(JSON.parse(await fs.readFile(cfgFile, 'utf8')).version).toBe(2);
    expect(await restoreSum(v2, 't@latest')).toBe(sum);
    // (What groups save is a property of real data: scripts/bench measures it on a disk
    // image. This synthetic text of 16 words compresses better per chunk at level 2,
    // where zstd picks shorter minimum matches for inputs under 256 KiB.)

    // A group setting in a version-2 config is refused, in one line.
    await fs.writeFile(cfgFile, JSON.stringify({ ...cfg, version: 2 }));
    const r = await gv(v2, ['list']);
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/"compression.group" needs format version 3/);
  });

  it('damage in a group frame: verify --full and restore name every member, nothing else', async () => {
    const groups = [...groupsOf(await chunkEntries(repo)).values()];
    const members = groups[1]!;
    const g = members[0]!;
    const file = packFile(repo, g.pack);
    const at = g.offset + 52 + g.stored - 100; // inside the zstd frame
    await flipByte(file, at);
    try {
      expect((await gv(repo, ['verify'])).code).toBe(0); // header and member table intact
      const r = await gv(repo, ['verify', '--full', '--json']);
      expect(r.code).toBe(1);
      const rep = JSON.parse(r.stdout);
      expect(rep.damagedChunks.map((d: { digest: string }) => d.digest).sort()).toEqual(members.map((m) => m.digest).sort());
      const out = s.path('damaged.img');
      const rr = await gv(repo, ['restore', 't@latest', out]);
      expect(rr.code).toBe(1);
      expect(oneLine(rr.stderr)).toMatch(new RegExp(`${members.length} damaged chunk\\(s\\)`));
      await expect(fs.stat(out)).rejects.toThrow();
    } finally {
      await flipByte(file, at);
    }
    // Readers remembered the damage; a good read and a verify clear it.
    expect((await gv(repo, ['verify', '--full'])).code).toBe(0);
    expect(await restoreSum(repo, 't@latest')).toBe(sum);
  });

  it('damage in a member table: the index check finds it', async () => {
    const groups = [...groupsOf(await chunkEntries(repo)).values()];
    const g = groups[2]![0]!;
    const file = packFile(repo, g.pack);
    const at = g.offset + 52 + 4 + 5; // in the first member's digest
    await flipByte(file, at);
    try {
      const r = await gv(repo, ['verify', '--json']);
      expect(r.code).toBe(1);
      const rep = JSON.parse(r.stdout);
      expect(rep.damagedChunks.length).toBeGreaterThanOrEqual(1);
      for (const d of rep.damagedChunks) expect(d.problem).toMatch(/member table|does not match the index/);
    } finally {
      await flipByte(file, at);
    }
    expect((await gv(repo, ['verify', '--full'])).code).toBe(0);
  });
});

describe('gc and group records', () => {
  it('copies a group whose members are partly dead once and whole; what is left restores and verifies', async () => {
    const repo = s.path('repo-gc');
    await gvOk(repo, ['init']);
    const keep = text(20, 1536 << 10);
    const x = s.path('x.img');
    const y = s.path('y.img');
    await fs.writeFile(x, Buffer.concat([keep, text(21, 4608 << 10)]));
    await fs.writeFile(y, Buffer.concat([keep, text(22, 1 << 20)]));
    const ySum = await sha256File(y);
    await gvOk(repo, ['backup', x, '--name', 'x']);
    const xPacks = new Set((await chunkEntries(repo)).map((e) => e.pack));
    await gvOk(repo, ['backup', y, '--name', 'y']);
    await gvOk(repo, ['forget', 'x@latest', '--force-young']);
    const before = new Map((await chunkEntries(repo)).map((e) => [e.digest, e]));

    const r = JSON.parse(await gvOk(repo, ['gc', '--json', '--repack-threshold', '100']));
    expect(r.chunksRemoved).toBeGreaterThan(0);
    expect(r.packsRepacked).toBe(1);
    const after = await chunkEntries(repo);
    // The records x's pack still had live chunks in, each counted once, whole.
    const moved = after.filter((e) => xPacks.has(before.get(e.digest)!.pack));
    expect(moved.length).toBeGreaterThan(0);
    const records = new Map<number, number>();
    for (const e of moved) {
      const old = before.get(e.digest)!;
      records.set(old.offset, 52 + old.stored);
    }
    expect(r.bytesCopied).toBe([...records.values()].reduce((a, b) => a + b, 0));
    // A group with a dead member was copied (its live members moved together, inner kept).
    const partly = [...groupsOf(moved).values()].filter((m) => m.reduce((a, e) => a + e.raw, 0) < m[0]!.groupRaw!);
    expect(partly.length).toBeGreaterThanOrEqual(1);
    for (const m of partly) {
      expect(new Set(m.map((e) => `${e.pack}:${e.offset}`)).size).toBe(1);
      for (const e of m) expect(e.inner).toBe(before.get(e.digest)!.inner);
    }

    expect(await restoreSum(repo, 'y@latest')).toBe(ySum);
    const v = await gv(repo, ['verify', '--full']);
    expect(v.code, v.stdout + v.stderr).toBe(0);
  });
});

/** `data` as an image file, backed up as `name` into a new repository; returns the repository. */
async function backedUp(name: string, data: Buffer): Promise<string> {
  const repo = s.path(`repo-${name}`);
  const img = s.path(`${name}.img`);
  await fs.writeFile(img, data);
  await gvOk(repo, ['init']);
  await gvOk(repo, ['backup', img, '--name', name]);
  return repo;
}

/** Read the newest generation of `name` in this process, as the mount does. */
async function withReader(
  repo: string,
  name: string,
  cacheBytes: number,
  readAhead: boolean,
  fn: (
    reader: { read(out: Buffer, at: number, length: number): Promise<number> },
    loader: { batches: { slab: number; fresh: number } },
  ) => Promise<void>,
): Promise<void> {
  const { Repository } = await import('../dist/repository/repository.js');
  const { ChunkLoader, ImageReader } = await import('../dist/read/reader.js');
  const r = await Repository.open(repo);
  try {
    const [gen] = await r.generations(name);
    const loader = new ChunkLoader(r, cacheBytes, readAhead);
    await fn(await ImageReader.open(r, gen!, loader, readAhead ? undefined : 0), loader);
  } finally {
    await r.close();
  }
}

const MiB = 1 << 20;

describe('read-ahead into shared slabs (the mount)', () => {
  it('decodes nearly every batch into recycled slabs, and the bytes stay right', async () => {
    // Before batches shared slabs, each 1 MiB batch held a 2 MiB slab until its last chunk
    // left the cache: a cache of 48 MiB pinned more slabs than the pool's 40, and most
    // batches of a long sequential read fell back to fresh buffers (garbage the workers'
    // and the mount's collectors let pile up: a mount server peaked at 420-500 MiB).
    const data = Buffer.concat([text(11, 96 * MiB), prng(12, 16 * MiB), text(13, 16 * MiB)]);
    const repo = await backedUp('slabs', data);
    await withReader(repo, 'slabs', 48 * MiB, true, async (reader, loader) => {
      const out = Buffer.alloc(128 * 1024);
      for (let at = 0; at < data.length; at += out.length) {
        const n = await reader.read(out, at, out.length);
        expect(n).toBe(Math.min(out.length, data.length - at));
        if (!out.subarray(0, n).equals(data.subarray(at, at + n))) throw new Error(`wrong bytes at ${at}`);
      }
      const { slab, fresh } = loader.batches;
      expect(slab).toBeGreaterThan(100);
      expect(fresh).toBeLessThanOrEqual(slab / 20);
    });
  });
});

describe('random reads of group members (the mount)', () => {
  it('decode a group only up to the member asked for, and the bytes stay right in any order', async () => {
    // A miss for one member decodes its group frame only as far as that member when it lies
    // in the first three quarters; a later member of the same group then decodes it whole.
    // Reads in a shuffled order through a tiny chunk cache reach all of these paths.
    const data = Buffer.concat([text(21, 6 * MiB), prng(22, MiB), text(23, 3 * MiB)]);
    const repo = await backedUp('random', data);
    expect(groupsOf(await chunkEntries(repo)).size).toBeGreaterThan(3);
    await withReader(repo, 'random', 64 * 1024, false, async (reader) => {
      const rand = prng(24, 4 * 4000);
      const out = Buffer.alloc(4096);
      for (let i = 0; i < 4000; i++) {
        const at = (rand.readUInt32LE(i * 4) % Math.floor(data.length / 4096)) * 4096;
        expect(await reader.read(out, at, 4096)).toBe(4096);
        if (!out.equals(data.subarray(at, at + 4096))) throw new Error(`wrong bytes at ${at} (read ${i})`);
      }
    });
  });
});

describe('read-ahead and group records (the mount)', () => {
  /** The newest generation read through a loader whose worker requests are recorded. */
  async function recorded(repo: string, name: string, fn: (reader: { read(out: Buffer, at: number, length: number): Promise<number> }) => Promise<void>) {
    const { Repository } = await import('../dist/repository/repository.js');
    const { ChunkLoader, ImageReader } = await import('../dist/read/reader.js');
    const r = await Repository.open(repo);
    const batches: Array<Array<{ file: string; offset: number; compression: number; rawLength: number }>> = [];
    try {
      const pool = r.pool as { run(req: { op: string; items?: never[] }): Promise<unknown> };
      const run = pool.run.bind(pool);
      pool.run = (req) => {
        if (req.op === 'loadMany') batches.push(req.items!);
        return run(req);
      };
      const gen = (await r.generations(name)).sort((a, b) => a.created.localeCompare(b.created)).pop();
      await fn(await ImageReader.open(r, gen!, new ChunkLoader(r, 256 * MiB, true), 8 * MiB));
    } finally {
      await r.close();
    }
    return batches;
  }

  it('a sequential read of a next-day generation hands each group record to one batch, and random reads start no read-ahead (a miss near the last read loads its group record whole)', async () => {
    // The next day's chunks sit between the members of the first day's groups. Read-ahead
    // handed out a FUSE read (128 KiB) at a time split those groups between batches, and
    // each worker decoded the whole group for its part: a cold `dd` decoded 2.5 times the
    // image's bytes. A fixed window from every read near the last one made a loop-mounted
    // file system decode twelve times what it read.
    const day0 = text(31, 24 * MiB);
    const day1 = Buffer.from(day0);
    const rand = prng(32, 400 * 4);
    for (let i = 0; i < 400; i++) prng(33 + i, 4096).copy(day1, (rand.readUInt32LE(i * 4) % (day1.length / 4096)) * 4096);
    const repo = await backedUp('nextday', day0);
    const img = s.path('nextday.img');
    await fs.writeFile(img, day1);
    await gvOk(repo, ['backup', img, '--name', 'nextday']);

    const seq = await recorded(repo, 'nextday', async (reader) => {
      const out = Buffer.alloc(128 * 1024);
      for (let at = 0; at < day1.length; at += out.length) {
        expect(await reader.read(out, at, out.length)).toBe(out.length);
        if (!out.equals(day1.subarray(at, at + out.length))) throw new Error(`wrong bytes at ${at}`);
      }
    });
    const batchOf = new Map<string, number>();
    let split = 0;
    seq.forEach((items, b) => {
      for (const it of items) {
        if (it.compression !== 2) continue;
        const k = `${it.file}:${it.offset}`;
        if (batchOf.has(k) && batchOf.get(k) !== b) split++;
        batchOf.set(k, b);
      }
    });
    // Before: 57 splits of 47 groups, batches of 0.39 MiB on average. Splits that remain:
    // the next day's own groups, whose members lie far apart in the image.
    expect(batchOf.size).toBeGreaterThan(10);
    expect(split).toBeLessThanOrEqual(batchOf.size / 4);
    const raw = seq.reduce((a, items) => a + items.reduce((x, it) => x + it.rawLength, 0), 0);
    expect(raw / seq.length).toBeGreaterThan(0.6 * MiB);

    const random = await recorded(repo, 'nextday', async (reader) => {
      const out = Buffer.alloc(4096);
      for (let i = 0; i < 50; i++) {
        const at = (((i * 7919) % 49) + 1) * Math.floor(day1.length / 50 / 4096) * 4096; // never 0: a read there starts a sequential reader
        expect(await reader.read(out, at, 4096)).toBe(4096);
        if (!out.equals(day1.subarray(at, at + 4096))) throw new Error(`wrong bytes at ${at}`);
      }
    });
    // No read-ahead: a miss near the last read loads only its own group record's members.
    expect(random.length).toBeLessThanOrEqual(50);
    for (const items of random) expect(new Set(items.map((it) => `${it.file}:${it.offset}`)).size).toBe(1);
  });
});

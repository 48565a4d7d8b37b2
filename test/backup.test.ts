/**
 * Back up real GPT + ext4 disk images and restore them byte-identical, through the CLI
 * as a user would run it.
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Generation } from '../src/format/generation.js';
import { Repository } from '../src/repository/repository.js';
import { CLI, Scratch, gv, gvOk, makeDisk, must, prng, sha256File, withMountedDisk, writeFiles } from './helpers.js';

let s: Scratch;
let repo: string;
let disk: string;
let disk1: string;
const sums: Record<string, string> = {};

beforeAll(async () => {
  s = await Scratch.create();
  repo = s.path('repo');
  disk = s.path('vm1.img');
  disk1 = s.path('vm1-day2.img');
  await makeDisk(s, disk, 96, async (dir) => {
    await writeFiles(dir, 1, 120, 300_000);
  });
  await must('cp', ['--sparse=always', disk, disk1]);
  // next day: some files changed in place, a few added and deleted
  await withMountedDisk(s, disk1, async (dir) => {
    const files = (await fs.readdir(path.join(dir, 'd1'))).map((f) => path.join(dir, 'd1', f));
    for (const f of files.slice(0, 4)) {
      const fh = await fs.open(f, 'r+');
      await fh.write(prng(99, 5000), 0, 5000, 1000);
      await fh.close();
    }
    await fs.rm(files[5]!);
    await writeFiles(path.join(dir, 'new'), 2, 10, 200_000);
  });
  sums.gen0 = await sha256File(disk);
  sums.gen1 = await sha256File(disk1);
  await gvOk(repo, ['init']);
});

afterAll(async () => {
  await s?.cleanup();
});

describe('backup and restore of a disk image', () => {
  // vm1's three generations, made here so that every test below can run on its own: the
  // image, the same image again, and the next day's image.
  let first: Generation;
  let second: Generation;
  let nextDay: Generation;

  beforeAll(async () => {
    first = JSON.parse(await gvOk(repo, ['backup', disk, '--name', 'vm1', '--tag', 'daily', '--json']));
    second = JSON.parse(await gvOk(repo, ['backup', disk, '--name', 'vm1', '--json']));
    nextDay = JSON.parse(await gvOk(repo, ['backup', disk1, '--name', 'vm1', '--json']));
  });

  it('backs up, and a second backup of the unchanged image stores under 1% new bytes', () => {
    expect(first.size).toBe(96 << 20);
    expect(first.stats.newBytes).toBeGreaterThan(10 << 20);
    expect(first.tags).toEqual(['daily']);
    expect(second.stats.newStored).toBeLessThan(0.01 * second.size);
    expect(second.parent).toBe(first.id);
  });

  it('stores only the changed data of the next day', () => {
    expect(nextDay.parent).toBe(second.id);
    expect(nextDay.stats.newBytes).toBeGreaterThan(1 << 20); // the new files at least
    expect(nextDay.stats.newBytes).toBeLessThan(12 << 20);
  });

  it('restores every generation byte-identical, sparse', async () => {
    const list = JSON.parse(await gvOk(repo, ['list', 'vm1', '--json']));
    expect(list).toHaveLength(3);
    const expected = [sums.gen0, sums.gen0, sums.gen1];
    for (let i = 0; i < 3; i++) {
      const out = s.path(`restore-${i}.img`);
      await gvOk(repo, ['restore', `vm1@${list[i].id}`, out]);
      expect(await sha256File(out)).toBe(expected[i]);
      const st = await fs.stat(out);
      expect(st.size).toBe(96 << 20);
      expect(st.blocks * 512).toBeLessThan(st.size); // holes where the disk is empty
      await fs.rm(out);
    }
  });

  it('reads packs with O_DIRECT in restore, cat and verify --full (no page-cache churn)', async () => {
    const out = s.path('direct.img');
    const log = s.path('direct.strace');
    await must('strace', ['-f', '-qq', '-e', 'trace=openat', '-o', log, process.execPath, CLI, '-r', repo, 'restore', 'vm1@latest', out]);
    const opens = (await fs.readFile(log, 'utf8')).split('\n').filter((l) => l.includes('.pack"'));
    expect(opens.length).toBeGreaterThan(0);
    expect(opens.every((l) => l.includes('O_DIRECT')), opens.join('\n')).toBe(true);
    expect(await sha256File(out)).toBe(sums.gen1);
    await fs.rm(out);
    // cat and verify --full read every chunk once too (verify's index check reads the
    // record headers through the cache: only its chunk reads are direct)
    for (const args of [['cat', 'vm1@latest'], ['verify', '--full']]) {
      await must('sh', ['-c', 'exec strace -f -qq -e trace=openat -o "$0" "$@" >/dev/null', log, process.execPath, CLI, '-r', repo, ...args]);
      const packs = (await fs.readFile(log, 'utf8')).split('\n').filter((l) => l.includes('.pack"'));
      const direct = packs.filter((l) => l.includes('O_DIRECT'));
      expect(direct.length, args.join(' ')).toBeGreaterThan(0);
      if (args[0] === 'cat') expect(direct.length, packs.join('\n')).toBe(packs.length);
    }
  });

  it('streams a generation with cat and accepts every kind of revision spec', async () => {
    const out = s.path('cat.img');
    const list = JSON.parse(await gvOk(repo, ['list', 'vm1', '--json']));
    const sh = await import('node:child_process');
    await new Promise<void>((resolve, reject) => {
      const c = sh.spawn('sh', ['-c', `"${process.execPath}" "${path.resolve('dist/cli/main.js')}" -r "${repo}" cat vm1@2 > "${out}"`]);
      c.on('exit', (code) => (code === 0 ? resolve() : reject(new Error(`cat exited ${code}`))));
    });
    expect(await sha256File(out)).toBe(sums.gen0);
    const info = (spec: string) => gvOk(repo, ['info', spec, '--json']).then((t) => JSON.parse(t).id);
    expect(await info('vm1@latest')).toBe(list[2].id);
    expect(await info('vm1@0')).toBe(list[2].id);
    expect(await info(`vm1@${list[0].id.slice(0, 10)}`)).toBe(list[0].id);
    expect(await info(`vm1@${list[2].created}`)).toBe(list[2].id);
    const unknown = await gv(repo, ['info', 'vm1@zzzz']);
    expect(unknown.code).toBe(1);
    expect(unknown.stderr.trim().split('\n')).toHaveLength(1);
    expect(unknown.stderr).toMatch(/unknown revision/);
  });

  it('backs up from stdin', async () => {
    const data = await fs.readFile(disk1);
    const r = await gv(repo, ['backup', '-', '--name', 'piped', '--json'], { input: data });
    expect(r.code, r.stderr).toBe(0);
    const g = JSON.parse(r.stdout);
    expect(g.size).toBe(data.length);
    expect(g.stats.newBytes).toBe(0); // every chunk already stored via vm1
    const out = s.path('piped.img');
    await gvOk(repo, ['restore', 'piped@latest', out]);
    expect(await sha256File(out)).toBe(sums.gen1);
  });

  it('prints human tables and JSON', async () => {
    const human = await gvOk(repo, ['list', 'vm1']);
    expect(human).toMatch(/IMAGE\s+REV\s+ID/);
    expect(human.match(/^vm1 /gm)).toHaveLength(3);
    const info = await gvOk(repo, ['info', 'vm1@latest']);
    expect(info).toMatch(/deduplicated/);
    expect(info).toMatch(/\nunchanged +\d.* as in the parent generation \(recognised by BLAKE3/);
    expect(info).toMatch(/\nzero +\d.*holes of the source file, not read/);
  });
});

describe('change detection (BLAKE3 against the parent generation)', () => {
  /** Leaf digests of the newest generation of `name`: equal lists mean byte-identical maps. */
  async function mapOf(dir: string, name: string): Promise<{ leaves: string[]; withFast: number; chunks: number }> {
    const r = await Repository.open(dir);
    try {
      const g = (await r.generations(name)).at(-1)!;
      const m = await r.chunkMap(g);
      let withFast = 0;
      let chunks = 0;
      for (let i = 0; i < m.refs.length; i++) {
        const leaf = await m.leaf(i);
        chunks += leaf.lengths.length;
        withFast += leaf.hasFast.reduce((a, b) => a + b, 0);
      }
      return { leaves: m.refs.map((x) => x.digest.toString('hex')), withFast, chunks };
    } finally {
      await r.close();
    }
  }

  it('takes unchanged chunks from the parent and builds the same map as hashing everything', async () => {
    const a = s.path('cd-a');
    const b = s.path('cd-b');
    await gvOk(a, ['init']);
    await gvOk(b, ['init']);
    const g0 = JSON.parse(await gvOk(a, ['backup', disk, '--name', 'vm1', '--json']));
    expect(g0.stats.unchangedBytes).toBe(0); // no parent
    const g1 = JSON.parse(await gvOk(a, ['backup', disk1, '--name', 'vm1', '--json']));
    const data = g1.stats.bytesRead - g1.stats.zeroBytes;
    expect(g1.stats.unchangedBytes).toBeGreaterThan(0.5 * data);
    expect(g1.stats.unchangedBytes).toBeLessThan(data); // the changed chunks were hashed
    const fresh = JSON.parse(await gvOk(b, ['backup', disk1, '--name', 'vm1', '--json']));
    expect(fresh.stats.unchangedBytes).toBe(0);
    // Every SHA-256 and BLAKE3 the detector carried over is what hashing gives.
    const ma = await mapOf(a, 'vm1');
    const mb = await mapOf(b, 'vm1');
    expect(ma.leaves).toEqual(mb.leaves);
    expect(ma.withFast).toBeGreaterThan(0.5 * ma.chunks);
    const out = s.path('cd.img');
    await gvOk(a, ['restore', 'vm1@latest', out]);
    expect(await sha256File(out)).toBe(sums.gen1);
    await fs.rm(out);
  });

  it('hashes a chunk whose bytes changed at the same offset and length', async () => {
    const dir = s.path('cd-same-length');
    await gvOk(dir, ['init']);
    const img = s.path('cd-raw.img');
    const bytes = prng(77, 16 << 20);
    await fs.writeFile(img, bytes);
    const g0 = JSON.parse(await gvOk(dir, ['backup', img, '--name', 'raw', '--json']));
    // Byte 100 of a block is not among the words the chunker samples, so boundaries stay
    // put and exactly one chunk keeps its offset and length with new content.
    bytes[(9 << 20) + 100] ^= 0xff;
    await fs.writeFile(img, bytes);
    const g1 = JSON.parse(await gvOk(dir, ['backup', img, '--name', 'raw', '--json']));
    expect(g1.stats.chunks).toBe(g0.stats.chunks);
    expect(g1.stats.newChunks).toBe(1);
    expect(g1.stats.unchangedBytes).toBe(g1.stats.bytesRead - g1.stats.newBytes);
    const out = s.path('cd-raw.out');
    await gvOk(dir, ['restore', 'raw@latest', out]);
    expect(await sha256File(out)).toBe(await sha256File(img));
  });

  it('leaves format-1 repositories in format 1 (no BLAKE3 in their maps)', async () => {
    const dir = s.path('cd-v1');
    await gvOk(dir, ['init']);
    const cfgFile = path.join(dir, 'config.json');
    const cfg = JSON.parse(await fs.readFile(cfgFile, 'utf8'));
    expect(cfg.version).toBe(5);
    await fs.writeFile(cfgFile, JSON.stringify({ ...cfg, version: 1, compression: { algorithm: 'zstd', level: 3 } }));
    await gvOk(dir, ['backup', disk, '--name', 'vm1']);
    const g1 = JSON.parse(await gvOk(dir, ['backup', disk1, '--name', 'vm1', '--json']));
    expect(g1.stats.unchangedBytes).toBeUndefined();
    expect((await mapOf(dir, 'vm1')).withFast).toBe(0);
    expect(JSON.parse(await fs.readFile(cfgFile, 'utf8')).version).toBe(1);
    const out = s.path('cd-v1.img');
    await gvOk(dir, ['restore', 'vm1@latest', out]);
    expect(await sha256File(out)).toBe(sums.gen1);
  });
});

describe('many small packs', () => {
  it('commits every map leaf and chunk when packs roll over during the backup', async () => {
    // 1 MiB packs: index batches are written while the backup goes on adding leaves.
    const prepo = s.path('small-packs');
    await gvOk(prepo, ['init']);
    const cfgFile = path.join(prepo, 'config.json');
    const cfg = JSON.parse(await fs.readFile(cfgFile, 'utf8'));
    await fs.writeFile(cfgFile, JSON.stringify({ ...cfg, packTargetSize: 1 << 20, leaf: { minChunks: 1, maxChunks: 4 } }));
    // First a base image, then one that alternates known and new 8 MiB segments: the
    // known ones let the backup run ahead while new ones roll packs over.
    const base = s.path('packs-base.img');
    const known = prng(41, 48 << 20);
    await fs.writeFile(base, known);
    await gvOk(prepo, ['backup', base, '--name', 'base']);
    const parts: Buffer[] = [];
    for (let i = 0; i < 6; i++) parts.push(known.subarray(i * (8 << 20), (i + 1) * (8 << 20)), prng(50 + i, 8 << 20));
    const img = s.path('packs.img');
    await fs.writeFile(img, Buffer.concat(parts));
    const g = JSON.parse(await gvOk(prepo, ['backup', img, '--name', 'p', '--json']));
    expect(g.leaves).toBeGreaterThan(2);
    const packs = (await fs.readdir(path.join(prepo, 'packs'), { recursive: true })).filter((f) => String(f).endsWith('.pack'));
    expect(packs.length).toBeGreaterThan(5);
    const out = s.path('packs.out');
    await gvOk(prepo, ['restore', 'p@latest', out]);
    expect(await sha256File(out)).toBe(await sha256File(img));
    const again = JSON.parse(await gvOk(prepo, ['backup', img, '--name', 'p', '--json']));
    expect(again.stats.newBytes).toBe(0);
  });
});

describe('a source that shrinks while it is read', () => {
  it('fails with one line and leaves no generation, for plain and sparse files', async () => {
    // From dist/: the backup's worker threads load dist/work/worker.js.
    const { openLocalSource } = await import('../dist/source/local.js');
    const { backup } = await import('../dist/backup/backup.js');
    const { Repository: DistRepository } = await import('../dist/repository/repository.js');
    const dir = s.path('shrink-repo');
    await gvOk(dir, ['init']);
    const MiB = 1 << 20;
    for (const sparse of [false, true]) {
      const img = s.path(`shrink-${sparse}.img`);
      const fh = await fs.open(img, 'w');
      await fh.write(prng(70, 24 * MiB), 0, 24 * MiB, 0);
      if (sparse) await fh.truncate(64 * MiB); // 40 MiB of hole after the data
      else await fh.write(prng(71, 40 * MiB), 0, 40 * MiB, 24 * MiB);
      await fh.close();
      const src = await openLocalSource(img);
      expect(src.size).toBe(64 * MiB);
      await fs.truncate(img, 20 * MiB); // after the size was taken, before any read
      const r = await DistRepository.open(dir);
      try {
        await expect(backup(r, src, { name: `shrink-${sparse}` })).rejects.toThrow(/source ended after \d+ of 67108864 bytes/);
        expect(await r.generations(`shrink-${sparse}`)).toHaveLength(0);
      } finally {
        await src.close();
        await r.close();
      }
    }
  });
});

describe('a read error in the worker that reads a segment', () => {
  it('fails with one line naming the source and offset, and leaves no generation', async () => {
    const { backup } = await import('../dist/backup/backup.js');
    const { Repository: DistRepository } = await import('../dist/repository/repository.js');
    const dir = s.path('readerr-repo');
    await gvOk(dir, ['init']);
    // A descriptor whose reads fail (EISDIR), handed out as the segment's data.
    const dirFh = await fs.open(s.dir, 'r');
    const src = {
      description: 'file:/broken.img',
      size: 32 << 20,
      read: async () => 0,
      directRead: async (position: number, length: number) => ({
        fd: dirFh.fd, length, extents: position === 0 ? null : [[4096, 8192]] as Array<[number, number]>, what: '/broken.img',
      }),
      close: async () => undefined,
    };
    const r = await DistRepository.open(dir);
    try {
      await expect(backup(r, src, { name: 'broken' })).rejects.toThrow(/^backup of broken failed: reading \/broken.img at offset \d+: is a directory$/);
      expect(await r.generations('broken')).toHaveLength(0);
    } finally {
      await dirFh.close();
      await r.close();
    }
  });
});

describe('sparse images', () => {
  it('skips the holes of a sparse file and restores it byte-identical', async () => {
    // Data at unaligned places, segments that are all hole, part hole, and a partial last
    // block; data before the holes, so stale bytes in reused buffers would show.
    const img = s.path('holey.img');
    const fh = await fs.open(img, 'w');
    const MiB = 1 << 20;
    // 48 MiB of data first: every reused segment buffer holds data before the holes come.
    await fh.write(prng(61, 48 * MiB), 0, 48 * MiB, 0);
    await fh.write(prng(62, 5000), 0, 5000, 48 * MiB + 100_000);
    await fh.write(prng(63, 8 * MiB), 0, 8 * MiB, 72 * MiB);
    await fh.write(prng(64, 3000), 0, 3000, 83 * MiB - 3000);
    await fh.close();
    const st = await fs.stat(img);
    expect(st.size).toBe(83 * MiB);
    expect(st.blocks * 512).toBeLessThan(60 * MiB); // really sparse here
    const dir = s.path('holey-repo');
    await gvOk(dir, ['init']);
    const g = JSON.parse(await gvOk(dir, ['backup', img, '--name', 'h', '--json']));
    // 56-72 MiB is two whole segments of hole; 48-56 and 80-83 MiB are partly hole.
    expect(g.stats.holeBytes).toBeGreaterThanOrEqual(16 * MiB);
    expect(g.stats.zeroBytes).toBeGreaterThan(24 * MiB);
    const out = s.path('holey.out');
    await gvOk(dir, ['restore', 'h@latest', out]);
    expect(await sha256File(out)).toBe(await sha256File(img));
    // The same bytes from a pipe (no hole information) give the same generation map.
    const piped = JSON.parse(
      (await gv(dir, ['backup', '-', '--name', 'h2', '--json'], { input: await fs.readFile(img) })).stdout,
    );
    expect(piped.stats.holeBytes).toBeUndefined();
    expect(piped.stats.newBytes).toBe(0);
    const r = await Repository.open(dir);
    try {
      const [a, b] = await Promise.all(['h', 'h2'].map(async (n) => (await r.chunkMap((await r.generations(n)).at(-1)!)).refs));
      expect(a!.map((x) => x.digest.toString('hex'))).toEqual(b!.map((x) => x.digest.toString('hex')));
    } finally {
      await r.close();
    }
  });

  it('stores a 16 GiB image holding ~100 MiB of data in under 150 MiB and restores it sparse', async () => {
    const big = s.path('sparse.img');
    const fh = await fs.open(big, 'w');
    await fh.truncate(16 * 1024 ** 3);
    // ~100 MiB of data in 25 places across the disk
    for (let i = 0; i < 25; i++) {
      await fh.write(i % 2 ? prng(i + 10, 4 << 20) : Buffer.alloc(4 << 20, `block ${i} `), 0, 4 << 20, i * 650 * 1024 * 1024 + i * 4096 * 3);
    }
    await fh.close();
    const srepo = s.path('sparse-repo');
    await gvOk(srepo, ['init']);
    const g = JSON.parse(await gvOk(srepo, ['backup', big, '--name', 'big', '--json']));
    expect(g.size).toBe(16 * 1024 ** 3);
    const du = Number((await must('du', ['-sb', srepo])).split('\t')[0]);
    expect(du).toBeLessThan(150 << 20);
    const out = s.path('sparse-restored.img');
    await gvOk(srepo, ['restore', 'big@latest', out]);
    const st = await fs.stat(out);
    expect(st.size).toBe(16 * 1024 ** 3);
    expect(st.blocks * 512).toBeLessThan(200 << 20);
    // Compare the data regions and their surroundings; the rest are holes by construction
    // (checked by the allocated size above). Hashing 2 x 16 GiB of holes would take minutes.
    const a = await fs.open(big, 'r');
    const b = await fs.open(out, 'r');
    for (let i = 0; i < 25; i++) {
      const at = Math.max(0, i * 650 * 1024 * 1024 + i * 4096 * 3 - 65536);
      const x = Buffer.alloc((4 << 20) + 131072);
      const y = Buffer.alloc(x.length);
      await a.read(x, 0, x.length, at);
      await b.read(y, 0, y.length, at);
      expect(x.equals(y)).toBe(true);
    }
    await a.close();
    await b.close();
    await fs.rm(out);
    await fs.rm(big);
  }, 300_000);
});

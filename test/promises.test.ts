/**
 * README promises that no other test file checks, each with real parts:
 *
 *  1. a block device (a loop device over a GPT+ext4 disk) as a backup source;
 *  2. progress bars on a terminal (a pseudo-terminal from `script`), one summary line without;
 *  3. `mount --foreground` stays in the foreground, serves, and SIGTERM unmounts and exits 0;
 *  4. damage found by a restore, and by a read through the mount, is remembered in the
 *     index ('d' keys, FORMAT.md) and healed by the next backup of the same source;
 *  5. pack data is fdatasynced before the LevelDB write that commits its chunk entries
 *     (seen with strace in the backup process, which leads the index).
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openDb } from '../src/index/db.js';
import { K_CHUNK, K_DAMAGED } from '../src/format/keys.js';
import { decodeLocation } from '../src/format/pack.js';
import { dataPackFiles, flipByte, gv, gvOk, isMounted, makeDisk, must, oneLine, packFiles, prng, sh, sha256File, writeFiles, CLI, Scratch } from './helpers.js';

let s: Scratch;

beforeAll(async () => {
  s = await Scratch.create('genvault-promises-');
});

afterAll(async () => {
  await s?.cleanup();
});

/** Poll `cond` every 50 ms until it holds; fail naming `what` after `ms`. */
async function waitFor(what: string, cond: () => Promise<boolean> | boolean, ms = 15_000): Promise<void> {
  const t0 = Date.now();
  while (!(await cond())) {
    if (Date.now() - t0 > ms) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** The environment of a command run the way a user or cron runs it: progress not turned off. */
const userEnv = { GENVAULT_NO_PROGRESS: undefined };

async function unmountQuietly(dir: string, env: NodeJS.ProcessEnv = {}): Promise<void> {
  if (!(await isMounted(dir))) return;
  await gv(null, ['umount', dir], { env });
  if (await isMounted(dir)) await sh('fusermount', ['-uz', dir]);
}

interface IndexView {
  /** Chunk digest (hex) -> location. */
  chunks: Map<string, ReturnType<typeof decodeLocation>>;
  /** 'd' keys: damaged chunks (hex digest) and what their value says. */
  damaged: Array<{ digest: string; found: string; by: string }>;
}

/** Read the chunk entries and damage marks of a repository's index (no other process may be writing). */
async function readIndex(repo: string): Promise<IndexView> {
  const db = await openDb(path.join(repo, 'index'));
  try {
    const chunks = new Map<string, ReturnType<typeof decodeLocation>>();
    for await (const [k, v] of db.iterator({ gte: Buffer.of(K_CHUNK), lt: Buffer.of(K_CHUNK + 1) })) {
      chunks.set(k.subarray(1).toString('hex'), decodeLocation(v));
    }
    const damaged: IndexView['damaged'] = [];
    for await (const [k, v] of db.iterator({ gte: Buffer.of(K_DAMAGED), lt: Buffer.of(K_DAMAGED + 1) })) {
      damaged.push({ digest: k.subarray(1).toString('hex'), ...JSON.parse(v.toString()) });
    }
    return { chunks, damaged };
  } finally {
    await db.close();
  }
}

/** The digest of the chunk whose record starts at `offset` in pack file `pack`. */
function chunkAt(ix: IndexView, pack: string, offset: number): string {
  const id = path.basename(pack, '.pack');
  const hits = [...ix.chunks].filter(([, l]) => l.packId === id && l.offset === offset);
  expect(hits, `chunk entries at ${id}:${offset}`).toHaveLength(1);
  return hits[0]![0];
}

describe('a block device as the backup source', () => {
  it('is recorded as a device, restores byte-identical, and a second backup after file changes dedups', async () => {
    const img = s.path('blk.img');
    await makeDisk(s, img, 64, async (dir) => {
      await fs.mkdir(path.join(dir, 'etc'));
      await fs.writeFile(path.join(dir, 'etc', 'app.conf'), 'version 1\n');
      await writeFiles(dir, 31, 60, 300_000);
    });
    const dev = await s.loopAttach(img);
    const st = await fs.stat(dev);
    expect(st.isBlockDevice()).toBe(true);
    const repo = s.path('blk-repo');
    await gvOk(repo, ['init']);

    const g1 = JSON.parse(await gvOk(repo, ['backup', dev, '--name', 'blk', '--json']));
    expect(g1.source).toBe(`device:${dev}`);
    expect(g1.size).toBe(64 << 20);
    const info = JSON.parse(await gvOk(repo, ['info', 'blk@latest', '--json']));
    expect(info.source).toBe(`device:${dev}`);
    const out1 = s.path('blk-1.out');
    await gvOk(repo, ['restore', 'blk@latest', out1]);
    const dev1 = await sha256File(dev);
    expect(await sha256File(out1)).toBe(dev1);

    // Change files through a mount of the device's partition, then back the device up again.
    const part = await s.partition(dev);
    const mnt = s.path('blk-mnt');
    await fs.mkdir(mnt);
    await must('mount', [part, mnt]);
    try {
      await fs.writeFile(path.join(mnt, 'etc', 'app.conf'), 'version 2, changed the next day\n');
      await writeFiles(path.join(mnt, 'new'), 32, 5, 100_000);
      await fs.rm(path.join(mnt, 'd3'), { recursive: true });
    } finally {
      await must('umount', [mnt]);
    }
    // The partition's writes bypass the whole disk's page cache: drop it so every reader sees the device.
    await must('blockdev', ['--flushbufs', dev]);
    const dev2 = await sha256File(dev);
    expect(dev2).not.toBe(dev1);

    const g2 = JSON.parse(await gvOk(repo, ['backup', dev, '--name', 'blk', '--json']));
    expect(g2.source).toBe(`device:${dev}`);
    expect(g2.parent).toBe(g1.id);
    expect(g2.stats.bytesRead).toBe(64 << 20);
    // New: the changed files and file system metadata (~1.3 MiB), far below the disk (64 MiB; its
    // non-zero bytes, ~19 MiB, were all new in the first backup).
    expect(g2.stats.newBytes).toBeGreaterThan(0);
    expect(g2.stats.newBytes, JSON.stringify(g2.stats)).toBeLessThan((64 << 20) / 16);
    const out2 = s.path('blk-2.out');
    await gvOk(repo, ['restore', 'blk@latest', out2]);
    expect(await sha256File(out2)).toBe(dev2);
    await gvOk(repo, ['restore', `blk@${g1.id}`, s.path('blk-1b.out')]);
    expect(await sha256File(s.path('blk-1b.out'))).toBe(dev1);
  });
});

describe('progress bars on a terminal, one line without', () => {
  let repo: string;
  let img: string;

  beforeAll(async () => {
    repo = s.path('prog-repo');
    img = s.path('prog.img');
    await fs.writeFile(img, prng(51, 64 << 20)); // 8 segments: 8 progress updates
    await gvOk(repo, ['init']);
  });

  /** Run genvault under a pseudo-terminal (util-linux script), progress not turned off; stdout and stderr both land on the terminal. */
  async function onTerminal(args: string[]): Promise<{ code: number; out: string }> {
    const q = (a: string) => `'${a.replace(/'/g, `'\\''`)}'`;
    const cmd = [process.execPath, CLI, '-r', repo, ...args].map(q).join(' ');
    const r = await sh('script', ['-qec', cmd, '/dev/null'], { env: userEnv });
    expect(r.stderr).toBe('');
    return { code: r.code, out: r.stdout };
  }

  /** The bar lines drawn: each starts with CR and erase-line (the bar fits the terminal's width: 24 or fewer). */
  const draws = (out: string, label: string) =>
    [...out.matchAll(new RegExp(`\\r\\x1b\\[K${label} \\[([#.]{1,24})\\] +(\\d+)%`, 'g'))].map((m) => ({ bar: m[1]!, pct: Number(m[2]) }));

  it('backup and restore draw and redraw a bar on a terminal, then clear it for the summary', async () => {
    const b = await onTerminal(['backup', img, '--name', 'p']);
    expect(b.code, b.out).toBe(0);
    const bd = draws(b.out, 'backup p');
    expect(bd.length, JSON.stringify(b.out)).toBeGreaterThanOrEqual(2); // drawn, then redrawn in place
    expect(bd.at(-1)).toEqual({ bar: '#'.repeat(bd.at(-1)!.bar.length), pct: 100 });
    expect(bd[0]!.pct).toBeLessThan(100);
    // The bar is erased, and the summary line is what stays on the terminal.
    expect(b.out).toMatch(/\r\x1b\[Kp@[0-9a-f]{16}: 64\.0 MiB read in .*\r\n$/);

    const r = await onTerminal(['restore', 'p@latest', s.path('prog-tty.out')]);
    expect(r.code, r.out).toBe(0);
    const rd = draws(r.out, 'restore p');
    expect(rd.length, JSON.stringify(r.out)).toBeGreaterThanOrEqual(1);
    expect(r.out).toMatch(/\r\x1b\[Krestored p@[0-9a-f]{16} to .*\r\n$/);
    expect(await sha256File(s.path('prog-tty.out'))).toBe(await sha256File(img));
  });

  it('without a terminal (cron), backup and restore print exactly one summary line and nothing else', async () => {
    const b = await sh(process.execPath, [CLI, '-r', repo, 'backup', img, '--name', 'p'], { env: userEnv });
    expect(b.code, b.stderr).toBe(0);
    expect(b.stderr).toBe('');
    expect(b.stdout).toMatch(/^p@[0-9a-f]{16}: 64\.0 MiB read in [^\r\n\x1b]*, 0 B new \(0 B stored\)[^\r\n\x1b]*\n$/);

    const out = s.path('prog-pipe.out');
    const r = await sh(process.execPath, [CLI, '-r', repo, 'restore', 'p@latest', out], { env: userEnv });
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toBe('');
    expect(r.stdout).toMatch(new RegExp(`^restored p@[0-9a-f]{16} to ${out}: 64\\.0 MiB in [^\\r\\n\\x1b]*\\n$`));
  });
});

describe('mount --foreground', () => {
  it('stays in the foreground serving the mount; SIGTERM unmounts and exits 0', async () => {
    const repo = s.path('fg-repo');
    const mnt = s.path('fg-mnt');
    const runDir = s.path('fg-run');
    const env = { GENVAULT_RUN_DIR: runDir };
    await fs.mkdir(mnt);
    const img = s.path('fg.img');
    await fs.writeFile(img, Buffer.concat([prng(61, 6 << 20), Buffer.alloc(2 << 20), prng(62, 1 << 20)]));
    await gvOk(repo, ['init']);
    await gvOk(repo, ['backup', img, '--name', 'fg']);

    const child = spawn(process.execPath, [CLI, '-r', repo, 'mount', mnt, '--foreground'], {
      env: { ...process.env, ...env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    child.stdout.on('data', (d) => (out += d));
    child.stderr.on('data', (d) => (out += d));
    const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
      child.once('exit', (code, signal) => resolve({ code, signal })),
    );
    let gone = false;
    void exited.then(() => (gone = true));
    s.onCleanup(async () => {
      if (!gone) child.kill('SIGKILL');
      await unmountQuietly(mnt, env);
    });

    const pidFiles = async () => (await fs.readdir(runDir).catch(() => [])).filter((f) => /^mount-.*\.pid$/.test(f));
    // Ready: mounted, and its pid file written (just after the mount).
    await waitFor('the mount to appear', async () => gone || ((await isMounted(mnt)) && (await pidFiles()).length > 0));
    expect(gone, `mount --foreground exited: ${out}`).toBe(false);
    // The process we started is the server: it holds /dev/fuse, and its pid is the one recorded.
    const fds = await fs.readdir(`/proc/${child.pid}/fd`);
    const targets = await Promise.all(fds.map((f) => fs.readlink(`/proc/${child.pid}/fd/${f}`).catch(() => '')));
    expect(targets).toContain('/dev/fuse');
    const [pidFile, ...more] = await pidFiles();
    expect(more).toEqual([]);
    expect(Number(await fs.readFile(path.join(runDir, pidFile!), 'utf8'))).toBe(child.pid);

    expect(await fs.readdir(path.join(mnt, 'fg'))).toContain('latest');
    expect(await sha256File(path.join(mnt, 'fg', 'latest'))).toBe(await sha256File(img));
    expect(gone, `mount --foreground exited: ${out}`).toBe(false);

    child.kill('SIGTERM');
    const end = await Promise.race([exited, new Promise<null>((r) => setTimeout(() => r(null), 20_000))]);
    expect(end, 'no exit within 20 s of SIGTERM').not.toBeNull();
    expect(end, out).toEqual({ code: 0, signal: null });
    expect(await isMounted(mnt)).toBe(false);
    expect(await fs.readdir(mnt)).toEqual([]); // the empty directory under it, no stale FUSE mount
    expect(await pidFiles()).toEqual([]);
    // Its index holder went with it.
    const holder = await sh('pgrep', ['-f', `index-holder.js ${path.join(repo, 'index')}`]);
    expect(holder.stdout.trim()).toBe('');
  });
});

describe('damage found by restore or by the mount is remembered and healed by the next backup', () => {
  /** A repository with one generation of an 8 MiB image whose first chunk's payload has a flipped byte. */
  async function damagedRepo(tag: string, seed: number) {
    const repo = s.path(`${tag}-repo`);
    const img = s.path(`${tag}.img`);
    const data = prng(seed, 8 << 20);
    await fs.writeFile(img, data);
    await gvOk(repo, ['init']);
    const g = JSON.parse(await gvOk(repo, ['backup', img, '--name', tag, '--json']));
    const pack = (await dataPackFiles(repo))[0]!;
    const before = await readIndex(repo);
    const digest = chunkAt(before, pack, 24); // the first record: the chunk at image offset 0
    const loc = before.chunks.get(digest)!;
    expect(loc.compression).toBe(0); // random bytes: stored raw, so the flip lands in the chunk's bytes
    expect(before.damaged).toEqual([]);
    await flipByte(pack, 24 + 52 + 1000, 0x01);
    return { repo, img, data, gen: g, digest, length: loc.rawLength };
  }

  /** The next backup of the same source stores a good copy: the mark goes, restore is identical, verify --full clean. */
  async function healsByBackup(repo: string, name: string, img: string, length: number) {
    const g = JSON.parse(await gvOk(repo, ['backup', img, '--name', name, '--json']));
    expect(g.stats.newBytes).toBe(length); // exactly the damaged chunk, stored again
    expect((await readIndex(repo)).damaged).toEqual([]);
    const out = s.path(`${name}-healed.out`);
    await gvOk(repo, ['restore', `${name}@latest`, out]);
    expect(await sha256File(out)).toBe(await sha256File(img));
    // The older generation, sharing the chunk, is healed too.
    const first = s.path(`${name}-healed-1.out`);
    await gvOk(repo, ['restore', `${name}@1`, first]);
    expect(await sha256File(first)).toBe(await sha256File(img));
    const v = await gv(repo, ['verify', '--full']);
    expect(v.code, v.stdout + v.stderr).toBe(0);
  }

  it('restore: fails naming the damage (--ignore-damage writes zeros there), marks the chunk, a backup heals it', async () => {
    const d = await damagedRepo('dr', 71);
    const end = d.length - 1;

    const out = s.path('dr.out');
    const r = await gv(d.repo, ['restore', 'dr@latest', out]);
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toBe(
      `genvault: dr@${d.gen.id}: 1 damaged chunk(s) at image bytes 0-${end}; use --ignore-damage to restore the rest with zeros there`,
    );
    await expect(fs.stat(out)).rejects.toThrow(/ENOENT/);
    const marked = (await readIndex(d.repo)).damaged;
    expect(marked).toEqual([{ digest: d.digest, found: expect.any(String), by: 'restore' }]);

    const ig = await gv(d.repo, ['restore', 'dr@latest', out, '--ignore-damage']);
    expect(ig.code).toBe(1);
    expect(ig.stderr).toBe(`genvault: damaged chunk: image bytes 0-${end} written as zeros\n`);
    const got = await fs.readFile(out);
    expect(got.length).toBe(d.data.length);
    expect(got.subarray(0, d.length).equals(Buffer.alloc(d.length))).toBe(true);
    expect(got.subarray(d.length).equals(d.data.subarray(d.length))).toBe(true);

    await healsByBackup(d.repo, 'dr', d.img, d.length);
  });

  it('gc: the damage mark of a chunk it removes goes with it; marks of chunks still used stay', async () => {
    const d = await damagedRepo('dg', 73);
    const keep = await damagedRepo('dk', 74);
    // Both repositories' damage marked by verify; in one the generation is then forgotten.
    for (const repo of [d.repo, keep.repo]) expect((await gv(repo, ['verify', '--full'])).code).toBe(1);
    expect((await readIndex(d.repo)).damaged).toEqual([{ digest: d.digest, found: expect.any(String), by: 'verify' }]);
    await gvOk(d.repo, ['forget', `dg@${d.gen.id}`, '--force-young']);
    for (const repo of [d.repo, keep.repo]) await gvOk(repo, ['gc']);
    expect((await readIndex(d.repo)).damaged).toEqual([]);
    expect((await readIndex(d.repo)).chunks.size).toBe(0);
    expect((await readIndex(keep.repo)).damaged).toEqual([{ digest: keep.digest, found: expect.any(String), by: 'verify' }]);
  });

  it('mount: a read of the damaged range is EIO and logged, marks the chunk, a backup heals it', async () => {
    const d = await damagedRepo('dm', 72);
    const mnt = s.path('dm-mnt');
    const log = s.path('dm-mount.log');
    const env = { GENVAULT_RUN_DIR: s.path('dm-run') };
    await fs.mkdir(mnt);
    const m = await gv(d.repo, ['mount', mnt, '--log', log], { env });
    expect(m.code, m.stderr).toBe(0);
    s.onCleanup(() => unmountQuietly(mnt, env));
    const f = await fs.open(path.join(mnt, 'dm', 'latest'), 'r');
    const failed: number[] = [];
    try {
      const b = Buffer.alloc(65536);
      for (let off = 0; off < d.data.length; off += b.length) {
        try {
          const { bytesRead } = await f.read(b, 0, b.length, off);
          expect(bytesRead).toBe(b.length);
          expect(b.equals(d.data.subarray(off, off + b.length)), `bytes at ${off}`).toBe(true);
        } catch (e) {
          expect((e as NodeJS.ErrnoException).code).toBe('EIO');
          failed.push(off);
        }
      }
    } finally {
      await f.close();
    }
    // EIO exactly for the reads touching the damaged chunk [0, length).
    expect(failed).toEqual(Array.from({ length: Math.ceil(d.length / 65536) }, (_, i) => i * 65536));
    const u = await gv(null, ['umount', mnt], { env });
    expect(u.code, u.stderr).toBe(0);
    expect(await fs.readFile(log, 'utf8')).toMatch(new RegExp(`EIO reading dm@${d.gen.id} at offset 0: .*damaged`));

    const marked = (await readIndex(d.repo)).damaged;
    expect(marked).toEqual([{ digest: d.digest, found: expect.any(String), by: 'mount' }]);
    await healsByBackup(d.repo, 'dm', d.img, d.length);
  });
});

describe('commit order', () => {
  /** One traced system call: where it started and ended in the strace output. */
  interface Call {
    pid: number;
    name: string;
    path: string;
    data: Buffer | null;
    start: number;
    end: number;
    result: string;
  }

  /** strace -xx escapes every byte as \xHH (paths from -y too). */
  const unhex = (t: string) => Buffer.from(t.replace(/\\x/g, ''), 'hex');

  function parseStrace(text: string): Call[] {
    const calls: Call[] = [];
    const pending = new Map<number, Call>();
    text.split('\n').forEach((line, i) => {
      const m = /^(\d+) +(.*)$/.exec(line);
      if (!m) return;
      const pid = Number(m[1]);
      const rest = m[2]!;
      const resumed = /^<\.\.\. (\w+) resumed>.*\) += (.+)$/.exec(rest);
      if (resumed) {
        const c = pending.get(pid);
        if (c && c.name === resumed[1]) {
          c.end = i;
          c.result = resumed[2]!;
          pending.delete(pid);
        }
        return;
      }
      const call = /^(\w+)\(\d+<((?:\\x[0-9a-f]{2})*)>(?:, "((?:\\x[0-9a-f]{2})*)")?/.exec(rest);
      if (!call) return;
      const c: Call = { pid, name: call[1]!, path: unhex(call[2]!).toString(), data: call[3] !== undefined ? unhex(call[3]) : null, start: i, end: -1, result: '' };
      calls.push(c);
      if (rest.endsWith('<unfinished ...>')) pending.set(pid, c);
      else {
        c.end = i;
        c.result = /\) += (.+)$/.exec(rest)?.[1] ?? '';
      }
    });
    return calls;
  }

  it("the pack is fdatasynced before the index's log write that commits its chunk entries, and that write is synced", async () => {
    const repo = s.path('sync-repo');
    const img = s.path('sync.img');
    await fs.writeFile(img, prng(81, 2 << 20));
    await gvOk(repo, ['init']);
    // No other process holds the repository, so the backup leads the index and does its LevelDB writes itself.
    const trace = s.path('sync.strace');
    const r = await sh('strace', [
      '-f', '-qq', '-y', '-xx', '-s', '65536', '-e', 'trace=fdatasync,fsync,pwrite64,write,rename', '-o', trace,
      process.execPath, CLI, '-r', repo, 'backup', img, '--name', 'sync',
    ], { env: { GENVAULT_NO_PROGRESS: '1' } });
    expect(r.code, r.stderr).toBe(0);

    const packs = await dataPackFiles(repo);
    expect(packs).toHaveLength(1);
    const pack = await fs.realpath(packs[0]!);
    const id = path.basename(pack, '.pack');
    const ix = await readIndex(repo);
    const keys = [...ix.chunks].filter(([, l]) => l.packId === id).map(([d]) => Buffer.concat([Buffer.of(K_CHUNK), Buffer.from(d, 'hex')]));
    expect(keys.length).toBeGreaterThan(10);

    const calls = parseStrace(await fs.readFile(trace, 'utf8'));
    const indexDir = path.join(await fs.realpath(repo), 'index');
    const isLog = (c: Call) => path.dirname(c.path) === indexDir && /^\d+\.log$/.test(path.basename(c.path));
    const commit = calls.find((c) => c.name === 'write' && isLog(c) && keys.some((k) => c.data!.includes(k)));
    expect(commit, 'no write of the chunk entries to the index log: was the backup not the index leader?').toBeDefined();

    const packWrites = calls.filter((c) => c.name === 'pwrite64' && c.path === pack);
    const packSyncs = calls.filter((c) => (c.name === 'fdatasync' || c.name === 'fsync') && c.path === pack && c.result === '0');
    expect(packWrites.length).toBeGreaterThan(0);
    // A pack sync finished before the commit started, after every write of the pack's data.
    const synced = packSyncs.filter((c) => c.end >= 0 && c.end < commit!.start);
    expect(synced.length, 'pack fdatasync before the chunk entries were written to the index').toBeGreaterThan(0);
    const lastSync = synced.at(-1)!;
    const before = packWrites.filter((w) => w.start < commit!.start);
    for (const w of before) expect(w.end, 'a pack write after its sync').toBeLessThan(lastSync.start);
    // Format 4 then writes the generation's map and record, into a pack of their own
    // (FORMAT.md, "Version 4"): every write of every pack, those included, is synced before
    // the next write to the index log.
    const allPacks = await Promise.all((await packFiles(repo)).map((f) => fs.realpath(f)));
    expect(allPacks).toHaveLength(2);
    const anyPackWrites = calls.filter((c) => c.name === 'pwrite64' && allPacks.includes(c.path));
    expect(anyPackWrites.some((w) => w.data?.includes('GVG1') && w.path !== pack)).toBe(true);
    const logWrites = calls.filter((c) => c.name === 'write' && isLog(c));
    for (const w of anyPackWrites) {
      const next = logWrites.find((l) => l.start > w.end);
      expect(next, 'a pack write that no index write follows').toBeDefined();
      const synced = calls.some((c) => (c.name === 'fdatasync' || c.name === 'fsync') && c.path === w.path && c.result === '0' && c.start > w.end && c.end >= 0 && c.end < next!.start);
      expect(synced, 'a pack write not synced before the next index write').toBe(true);
    }
    // The commit is durable: an fdatasync of that log follows the write.
    const logSync = calls.find((c) => (c.name === 'fdatasync' || c.name === 'fsync') && c.path === commit!.path && c.start > commit!.end && c.result === '0');
    expect(logSync, 'fdatasync of the index log after the commit').toBeDefined();

    const out = s.path('sync.out');
    await gvOk(repo, ['restore', 'sync@latest', out]);
    expect(await sha256File(out)).toBe(await sha256File(img));
  });
});

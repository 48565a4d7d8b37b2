/**
 * The FUSE mount, driven from this process while a separate genvault process serves it:
 * dd, loop devices with a read-only ext4 mount, cmp between generations, concurrent
 * readers, EIO on damage, stale mounts.
 */
import { execFile, spawnSync } from 'node:child_process';
import fs from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { dataPackFiles, flipByte, gv, gvOk, isMounted, makeDisk, must, prng, sh, sha256File, waitGone, withMountedDisk, writeFiles, Scratch, readAroundDamage, chunkExtentsAt } from './helpers.js';

const exec = promisify(execFile);
let s: Scratch;
let repo: string;
let mnt: string;
const disks: Record<string, string> = {};
let secret: Buffer;

async function unmountQuietly(dir: string) {
  await gv(null, ['umount', dir]);
  if (await isMounted(dir)) await sh('fusermount', ['-uz', dir]);
}

beforeAll(async () => {
  s = await Scratch.create();
  repo = s.path('repo');
  mnt = s.path('mnt');
  await fs.mkdir(mnt);
  s.onCleanup(() => unmountQuietly(mnt));
  secret = Buffer.from(`the file an admin lost ${Date.now()}\n`);
  disks.gen0 = s.path('vm1-0.img');
  disks.gen1 = s.path('vm1-1.img');
  disks.other = s.path('vm2.img');
  await makeDisk(s, disks.gen0, 64, async (dir) => {
    await fs.mkdir(path.join(dir, 'etc'));
    await fs.writeFile(path.join(dir, 'etc', 'important.conf'), secret);
    await writeFiles(dir, 5, 60, 300_000);
  });
  await must('cp', ['--sparse=always', disks.gen0, disks.gen1]);
  await withMountedDisk(s, disks.gen1, async (dir) => {
    await fs.writeFile(path.join(dir, 'etc', 'important.conf'), 'changed the next day\n');
    await writeFiles(path.join(dir, 'new'), 6, 5, 100_000);
  });
  await makeDisk(s, disks.other, 40, async (dir) => {
    await writeFiles(dir, 7, 30, 200_000);
  });
  await gvOk(repo, ['init']);
  await gvOk(repo, ['backup', disks.gen0, '--name', 'vm1']);
  await gvOk(repo, ['backup', disks.gen1, '--name', 'vm1']);
  await gvOk(repo, ['backup', disks.other, '--name', 'vm2']);
  const r = await gv(repo, ['mount', mnt]);
  expect(r.code, r.stderr).toBe(0);
  mountOutput = r.stdout + r.stderr;
});

/** What `genvault mount` printed for the shared mount (it names the server's pid). */
let mountOutput = '';

afterAll(async () => {
  await s?.cleanup();
});


async function genFiles(name: string): Promise<string[]> {
  return (await fs.readdir(path.join(mnt, name))).filter((f) => f.endsWith('.img')).sort();
}

describe('mounted repository', () => {
  it('shows one directory per image, files sorted by time, and latest', async () => {
    expect((await fs.readdir(mnt)).sort()).toEqual(['vm1', 'vm2']);
    const list = JSON.parse(await gvOk(repo, ['list', 'vm1', '--json']));
    const files = await genFiles('vm1');
    expect(files).toEqual(list.map((g: { file: string }) => g.file));
    expect(await fs.readlink(path.join(mnt, 'vm1', 'latest'))).toBe(files[1]);
    const st = await fs.stat(path.join(mnt, 'vm1', files[0]!));
    expect(st.size).toBe(64 << 20);
    expect(st.mtime.toISOString()).toBe(list[0].created);
    expect(st.mode & 0o222).toBe(0);
    await expect(fs.open(path.join(mnt, 'vm1', files[0]!), 'r+')).rejects.toThrow(/EROFS|EACCES|EPERM/);
  });

  it('a mount without --cache-size serves a local repository with the 24 MiB default', async () => {
    const pid = /\(pid (\d+)\)/.exec(mountOutput)?.[1];
    expect(pid, mountOutput).toBeTruthy();
    const argv = (await fs.readFile(`/proc/${pid}/cmdline`, 'utf8')).split('\0');
    expect(argv[argv.indexOf('--cache-size') + 1]).toBe(String(24 << 20));
  });

  it('dd of each generation is byte-identical to its source', async () => {
    const files = await genFiles('vm1');
    for (const [f, src] of [[files[0]!, disks.gen0], [files[1]!, disks.gen1]] as const) {
      const out = s.path('dd.out');
      await exec('dd', [`if=${path.join(mnt, 'vm1', f)}`, `of=${out}`, 'bs=4M', 'status=none']);
      expect(await sha256File(out)).toBe(await sha256File(src));
      await fs.rm(out);
    }
  });

  it('restores a single file through a read-only loop device and ext4 mount', async () => {
    // The server (root here) raised the kernel's read-ahead for its files from 128 KiB.
    const dev = (await sh('mountpoint', ['-d', mnt])).stdout.trim();
    expect(await fs.readFile(`/sys/class/bdi/${dev}/read_ahead_kb`, 'utf8')).toBe('1024\n');
    const files = await genFiles('vm1');
    const loop = await s.loopAttach(path.join(mnt, 'vm1', files[0]!), true);
    const part = await s.partition(loop);
    const fsdir = s.path('restore-fs');
    await s.mount(part, fsdir, 'ro');
    expect(await fs.readFile(path.join(fsdir, 'etc', 'important.conf'))).toEqual(secret);
    await must('umount', [fsdir]);
    await must('losetup', ['-d', loop]);
  });

  it('keeps the raised kernel read-ahead when libfuse sends its INIT reply late', async () => {
    // The kernel lowers the read-ahead to the INIT reply's 128 KiB when that reply arrives;
    // the server must raise it after, not merely after fuse-native reports the mount.
    const late = s.path('mnt-late-init');
    const pause = s.path('init.pause');
    await fs.mkdir(late);
    await fs.writeFile(pause, '');
    s.onCleanup(() => unmountQuietly(late));
    const held = setTimeout(() => void fs.rm(pause, { force: true }), 1500);
    try {
      const r = await gv(repo, ['mount', late], { env: { GENVAULT_MOUNT_PAUSE_FILE: pause } });
      expect(r.code, r.stderr).toBe(0);
      const dev = (await sh('mountpoint', ['-d', late])).stdout.trim();
      expect(await fs.readFile(`/sys/class/bdi/${dev}/read_ahead_kb`, 'utf8')).toBe('1024\n');
      expect(await fs.readdir(late)).toEqual(['vm1', 'vm2']);
    } finally {
      clearTimeout(held);
      await unmountQuietly(late);
    }
  });

  it('cmp of two generations shows exactly the changed bytes', async () => {
    const files = await genFiles('vm1');
    const count = async (a: string, b: string) => {
      const r = await sh('sh', ['-c', `cmp -l "${a}" "${b}" | wc -l`]);
      return Number(r.stdout.trim());
    };
    const viaMount = await count(path.join(mnt, 'vm1', files[0]!), path.join(mnt, 'vm1', files[1]!));
    const direct = await count(disks.gen0, disks.gen1);
    expect(direct).toBeGreaterThan(0);
    expect(viaMount).toBe(direct);
  });

  it('serves several generations of several images at once', async () => {
    const v1 = await genFiles('vm1');
    const v2 = await genFiles('vm2');
    const sums = await Promise.all([
      sha256File(path.join(mnt, 'vm1', v1[0]!)),
      sha256File(path.join(mnt, 'vm1', v1[1]!)),
      sha256File(path.join(mnt, 'vm2', v2[0]!)),
      sha256File(path.join(mnt, 'vm1', 'latest')),
    ]);
    expect(sums).toEqual([
      await sha256File(disks.gen0),
      await sha256File(disks.gen1),
      await sha256File(disks.other),
      await sha256File(disks.gen1),
    ]);
  });

  it('with a cache far smaller than the images, recycled read-ahead memory never yields wrong bytes', async () => {
    // 24 MiB of cache, under the 32 MiB read-ahead: decoded chunks wait in the cache for
    // their reader while the read-ahead slabs (src/read/reader.ts) are reused many times
    // over by four sequential readers and a random reader. (Releasing a slab as soon as
    // its batch arrives, instead of when its last chunk leaves the cache, fails here; with
    // a 2 MiB cache it would not, since chunks are evicted before anyone waits for them.)
    const small = s.path('mnt-small-cache');
    await fs.mkdir(small);
    s.onCleanup(() => unmountQuietly(small));
    const r = await gv(repo, ['mount', small, '--cache-size', '24M']);
    expect(r.code, r.stderr).toBe(0);
    try {
      const v1 = await genFiles('vm1');
      const v2 = await genFiles('vm2');
      const src = await fs.readFile(disks.gen1);
      const randomReads = (async () => {
        const fh = await fs.open(path.join(small, 'vm1', v1[1]!), 'r');
        try {
          let seed = 12345;
          for (let i = 0; i < 400; i++) {
            seed = (seed * 1103515245 + 12345) >>> 0;
            const off = seed % (src.length - 300_000);
            const len = 1 + (seed % 300_000);
            const b = Buffer.alloc(len);
            const { bytesRead } = await fh.read(b, 0, len, off);
            if (bytesRead !== len || !b.equals(src.subarray(off, off + len))) return `wrong bytes at ${off}+${len}`;
          }
          return 'ok';
        } finally {
          await fh.close();
        }
      })();
      const sums = await Promise.all([
        sha256File(path.join(small, 'vm1', v1[0]!)),
        sha256File(path.join(small, 'vm1', v1[1]!)),
        sha256File(path.join(small, 'vm2', v2[0]!)),
        sha256File(path.join(small, 'vm1', v1[0]!)),
      ]);
      expect(await randomReads).toBe('ok');
      const [g0, g1, o] = [await sha256File(disks.gen0), await sha256File(disks.gen1), await sha256File(disks.other)];
      expect(sums).toEqual([g0, g1, o, g0]);
    } finally {
      await unmountQuietly(small);
    }
  });

  it('reads any offset and length, including the end and past it', async () => {
    const file = path.join(mnt, 'vm2', 'latest');
    const src = await fs.readFile(disks.other);
    const fh = await fs.open(file, 'r');
    try {
      for (const [off, len] of [[0, 1], [4095, 2], [1_000_003, 300_000], [src.length - 100, 4096], [src.length, 10], [src.length + 5000, 10]] as const) {
        const b = Buffer.alloc(len);
        const { bytesRead } = await fh.read(b, 0, len, off);
        const want = src.subarray(off, off + len);
        expect(bytesRead).toBe(want.length);
        expect(b.subarray(0, bytesRead).equals(want)).toBe(true);
      }
    } finally {
      await fh.close();
    }
  });

  it('shows a generation committed by another process within 2 seconds, and latest follows', async () => {
    // Another generation of vm2 with the same bytes: what the other tests read stays the same.
    const before = await fs.readlink(path.join(mnt, 'vm2', 'latest'));
    await gvOk(repo, ['backup', disks.other, '--name', 'vm2']);
    const list = JSON.parse(await gvOk(repo, ['list', 'vm2', '--json']));
    const newest = list.at(-1).file;
    expect(newest).not.toBe(before);
    const t0 = Date.now();
    let seen = false;
    while (Date.now() - t0 < 2000 && !seen) {
      seen = (await fs.readlink(path.join(mnt, 'vm2', 'latest')).catch(() => '')) === newest;
      if (!seen) await new Promise((r) => setTimeout(r, 100));
    }
    expect(seen).toBe(true);
    expect(await sha256File(path.join(mnt, 'vm2', newest))).toBe(await sha256File(disks.other));
  });

  it.skipIf(!deviceMapperWorks())('kpartx -av maps the partitions of a mounted generation', async () => {
    const file = path.join(mnt, 'vm1', 'latest');
    try {
      const r = await must('kpartx', ['-av', file]);
      expect(r).toMatch(/add map/);
    } finally {
      await sh('kpartx', ['-d', file]);
    }
  });
});

/**
 * Whether kpartx can map partitions here: it needs the kernel's device-mapper, which
 * `dmsetup version` talks to. /dev/mapper/control alone proves nothing: libdevmapper
 * creates that node itself, also on a kernel without device-mapper (then opening it fails
 * with ENODEV and kpartx exits 1, "prerequisites not met"). Synchronous: it decides a skip
 * while tests are collected; the mount is served by another process anyway.
 */
function deviceMapperWorks(): boolean {
  const dm = spawnSync('dmsetup', ['version'], { encoding: 'utf8' });
  const kpartx = spawnSync('kpartx', ['-h'], { encoding: 'utf8' });
  let why: string | null = null;
  if (dm.error) why = `dmsetup cannot run (${dm.error.message})`;
  else if (dm.status !== 0 || !/^Driver version:/m.test(dm.stdout)) {
    const said = `${dm.stdout}${dm.stderr}`.trim().split('\n').filter((l) => !/^Library version:/.test(l));
    why = `dmsetup version exits ${dm.status}: the kernel's device-mapper does not answer (${said.slice(0, 2).join('; ')})`;
  } else if (kpartx.error) why = `kpartx cannot run (${kpartx.error.message})`;
  if (why) console.log(`kpartx test skipped: ${why}; losetup -r -P is tested instead`);
  return why === null;
}

describe('access for other users', () => {
  it('only the mounting user can read by default; --allow-other opens it to others', async () => {
    const asNobody = (file: string) => sh('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', 'head', '-c', '16', file]);
    await fs.chmod(s.dir, 0o755); // so only the mount itself can refuse
    const denied = await asNobody(path.join(mnt, 'vm2', 'latest'));
    expect(denied.code).not.toBe(0);
    expect(denied.stderr).toMatch(/Permission denied/);
    const omnt = s.path('mnt-other');
    await fs.mkdir(omnt);
    const r = await gv(repo, ['mount', omnt, '--allow-other']);
    expect(r.code, r.stderr).toBe(0);
    s.onCleanup(() => unmountQuietly(omnt));
    const ok = await asNobody(path.join(omnt, 'vm2', 'latest'));
    expect(ok.code, ok.stderr).toBe(0);
    expect(Buffer.from(ok.stdout, 'latin1').length).toBeGreaterThan(0);
    await unmountQuietly(omnt);
  });
});

describe('damage and stale mounts', () => {
  it('returns EIO for exactly the damaged chunk, right bytes everywhere else, and logs it', async () => {
    const drepo = s.path('drepo');
    const dmnt = s.path('dmnt');
    await fs.mkdir(dmnt);
    const img = s.path('d.img');
    const data = Buffer.concat([prng(21, 4 << 20), prng(22, 4 << 20)]);
    await fs.writeFile(img, data);
    await gvOk(drepo, ['init']);
    await gvOk(drepo, ['backup', img, '--name', 'd']);
    const pack = (await dataPackFiles(drepo))[0]!;
    const flipAt = 200_000;
    // Where the damage lands in the image: the extents of the chunks whose pack record
    // holds the flipped byte (from the generation's map and the index, before any reader
    // has seen the damage). One chunk of random data: block-aligned, at most 512 KiB
    // (chunking.max).
    const damaged = await chunkExtentsAt(drepo, 'd', path.basename(pack, '.pack'), flipAt);
    expect(damaged).toHaveLength(1);
    const [start, end] = damaged[0]!;
    expect(start % 4096).toBe(0);
    expect(end - start).toBeGreaterThan(0);
    expect(end - start).toBeLessThanOrEqual(512 << 10);
    await flipByte(pack, flipAt);
    const log = s.path('mount.log');
    await gvOk(drepo, ['mount', dmnt, '--log', log]);
    s.onCleanup(() => unmountQuietly(dmnt));
    // Every 4 KiB block: EIO where it overlaps the damaged chunk, the source's bytes elsewhere.
    const { wrong, eio } = await readAroundDamage(path.join(dmnt, 'd', 'latest'), data, start, end);
    expect(wrong.slice(0, 20), `${wrong.length} wrong block(s)`).toEqual([]);
    expect(eio).toBe((end - start) / 4096);
    // The image's map (format 2) carries BLAKE3 per chunk, which reads check instead of SHA-256.
    expect(await fs.readFile(log, 'utf8')).toMatch(/EIO reading d@[0-9a-f]+ at offset \d+: .*damaged: content does not match its BLAKE3 digest/);
    await unmountQuietly(dmnt);
  });

  it('clears a stale mount left by a killed server, and umount stops the server', async () => {
    const pids = (await sh('pgrep', ['-f', `mount ${mnt}`])).stdout.trim().split('\n').filter(Boolean).map(Number);
    expect(pids.length).toBeGreaterThan(0);
    for (const p of pids) process.kill(p, 'SIGKILL');
    await waitGone(pids);
    await expect(fs.stat(path.join(mnt, 'vm1'))).rejects.toThrow(/ENOTCONN/);
    const r = await gv(repo, ['mount', mnt]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toMatch(/stale mount/);
    expect((await fs.readdir(mnt)).sort()).toEqual(['vm1', 'vm2']);
    const u = await gv(null, ['umount', mnt]);
    expect(u.code, u.stderr).toBe(0);
    expect(await isMounted(mnt)).toBe(false);
    const left = (await sh('pgrep', ['-f', `mount ${mnt}`])).stdout.trim();
    expect(left).toBe('');
    // The index holder goes with its mount, both after kill -9 of the mount and after umount.
    let holders = '';
    for (let i = 0; i < 50; i++) {
      holders = (await sh('pgrep', ['-f', `index-holder.js ${path.join(repo, 'index')}`])).stdout.trim();
      if (!holders) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    expect(holders).toBe('');
    const again = await gv(null, ['umount', mnt]);
    expect(again.code).toBe(1);
    expect(again.stderr).toMatch(/is not mounted/);
  });
});

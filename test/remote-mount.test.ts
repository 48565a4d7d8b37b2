/**
 * The mount of an ssh:// repository (issue 24): `genvault -r ssh://... mount MNT` against a
 * real OpenSSH sshd on 127.0.0.1 whose forced command is `genvault serve --namespace NS
 * --permissions read`. Byte-identical generations and `latest`, another namespace hidden,
 * a file restored through a read-only loop device and ext4 mount of a mounted generation,
 * and a killed connection: EIO (not a hang), one log line, and `genvault umount` still works.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CLI, CliProcess, Scratch, dataPackFiles, flipByte, gv, gvOk, isMounted, makeDisk, must, prng, sh, sha256File, waitGone, writeFiles, writeImage, readAroundDamage, chunkExtentsAt } from './helpers.js';
import { Sshd, keygen, startSshd } from './sshd.js';

const exec = promisify(execFile);
let s: Scratch;
let sshd: Sshd;
let repo: string;
let mnt: string;
const keys: Record<string, string> = {};
const images: Record<string, string> = {};
let secret: Buffer;

/** A client key whose forced command is `genvault serve` with these options. */
async function clientKey(name: string, serveArgs: string, repoDir = repo): Promise<string> {
  const k = s.path(`key-${name}`);
  await keygen(k);
  await sshd.authorize(`${k}.pub`, `command="${process.execPath} ${CLI} serve --repo ${repoDir} ${serveArgs}",restrict`);
  return k;
}

/** genvault against the ssh:// repository with one client key. */
function rgv(key: string, args: string[]) {
  return gv(sshd.url('/srv/ignored'), ['--repo-identity', key, '--repo-known-hosts', sshd.knownHosts, ...args]);
}

async function rgvOk(key: string, args: string[]): Promise<string> {
  const r = await rgv(key, args);
  if (r.code !== 0) throw new Error(`genvault ${args.join(' ')} failed (${r.code}): ${r.stderr.trim()}`);
  return r.stdout;
}

async function unmountQuietly(dir: string) {
  await gv(null, ['umount', dir]);
  if (await isMounted(dir)) await sh('fusermount', ['-uz', dir]);
}

/** pids of `genvault serve` processes of the test repository. */
async function servePids(): Promise<number[]> {
  const r = await sh('pgrep', ['-f', `serve --repo ${repo} `]);
  return r.stdout.split('\n').filter(Boolean).map(Number);
}


beforeAll(async () => {
  s = await Scratch.create('genvault-rmount-');
  sshd = await startSshd(s);
  s.onCleanup(() => sshd.stop()); // the first registered, so the last undone: after the mounts
  repo = s.path('repo');
  mnt = s.path('mnt');
  await fs.mkdir(mnt);
  await gvOk(repo, ['init']);
  keys.kvm1 = await clientKey('kvm1', '--namespace kvm1 --permissions append');
  keys.kvm2 = await clientKey('kvm2', '--namespace kvm2 --permissions append');
  keys.reader = await clientKey('reader', '--namespace kvm1 --permissions read');

  // Random data, a run of zeros, and a tail that ends mid-block.
  images.raw = s.path('raw.img');
  await writeImage(images.raw, [prng(31, 20 << 20), Buffer.alloc(8 << 20), prng(32, 123457)]);
  secret = Buffer.from(`the file an admin lost, remotely ${Date.now()}\n`);
  images.disk = s.path('disk.img');
  await makeDisk(s, images.disk, 48, async (dir) => {
    await fs.mkdir(path.join(dir, 'etc'));
    await fs.writeFile(path.join(dir, 'etc', 'important.conf'), secret);
    await writeFiles(dir, 5, 40, 200_000);
  });
  images.other = s.path('other.img');
  await writeImage(images.other, [prng(41, 3 << 20)]);
  await rgvOk(keys.kvm1!, ['backup', images.raw, '--name', 'raw']);
  await rgvOk(keys.kvm1!, ['backup', images.disk, '--name', 'vm1']);
  await rgvOk(keys.kvm2!, ['backup', images.other, '--name', 'other']);

  s.onCleanup(() => unmountQuietly(mnt));
  const r = await rgv(keys.reader!, ['mount', mnt, '--log', s.path('mount.log')]);
  expect(r.code, r.stderr).toBe(0);
  expect(r.stdout).toMatch(/^mounted ssh:\/\/.* on /);
}, 180_000);

afterAll(async () => {
  await s?.cleanup();
});

describe('mount of an ssh:// repository', () => {
  it('shows the namespace\'s generations byte-identical to their sources, with latest, and no other namespace', async () => {
    expect((await fs.readdir(mnt)).sort()).toEqual(['raw', 'vm1']);
    const list = JSON.parse(await rgvOk(keys.reader!, ['list', '--json'])) as Array<{ name: string; file: string }>;
    for (const name of ['raw', 'vm1']) {
      const file = list.find((g) => g.name === name)!.file;
      expect((await fs.readdir(path.join(mnt, name))).sort()).toEqual([file, 'latest']);
      expect(await fs.readlink(path.join(mnt, name, 'latest'))).toBe(file);
    }
    await expect(fs.stat(path.join(mnt, 'other'))).rejects.toThrow(/ENOENT/);
    await expect(fs.stat(path.join(mnt, 'kvm2:other'))).rejects.toThrow(/ENOENT/);

    for (const name of ['raw', 'vm1']) {
      const out = s.path(`${name}.dd`);
      const t0 = process.hrtime.bigint();
      await exec('dd', [`if=${path.join(mnt, name, 'latest')}`, `of=${out}`, 'bs=4M', 'status=none']);
      const secs = Number(process.hrtime.bigint() - t0) / 1e9;
      const bytes = (await fs.stat(out)).size;
      console.log(`dd of ${name} (${(bytes / 2 ** 20).toFixed(0)} MiB) through the ssh:// mount: ${(bytes / 1e6 / secs).toFixed(0)} MB/s`);
      expect(await sha256File(out)).toBe(await sha256File(images[name === 'raw' ? 'raw' : 'disk']!));
      await fs.rm(out);
    }
  }, 120_000);

  it('reads any offset and length, across blocks, at the end and past it', async () => {
    const src = await fs.readFile(images.raw!);
    const fh = await fs.open(path.join(mnt, 'raw', 'latest'), 'r');
    try {
      const cases = [[0, 1], [(1 << 20) - 3, 10], [(3 << 20) - 5000, (2 << 20) + 9000], [(20 << 20) - 100, 300], [src.length - 100, 4096], [src.length, 10], [src.length + 5000, 10]] as const;
      for (const [off, len] of cases) {
        const b = Buffer.alloc(len);
        const { bytesRead } = await fh.read(b, 0, len, off);
        const want = src.subarray(off, off + len);
        expect(bytesRead, `at ${off}`).toBe(want.length);
        expect(b.subarray(0, bytesRead).equals(want), `at ${off}`).toBe(true);
      }
    } finally {
      await fh.close();
    }
  });

  it('with a cache far smaller than the images, concurrent sequential and random readers get the right bytes', async () => {
    // 6 MiB of cache: read-ahead of 3 MiB, runs of 3 blocks evicted while other readers
    // still come back to them.
    const small = s.path('mnt-small');
    await fs.mkdir(small);
    s.onCleanup(() => unmountQuietly(small));
    const r = await rgv(keys.reader!, ['mount', small, '--cache-size', '6M']);
    expect(r.code, r.stderr).toBe(0);
    try {
      const src = await fs.readFile(images.raw!);
      const randomReads = (async () => {
        const fh = await fs.open(path.join(small, 'raw', 'latest'), 'r');
        try {
          let seed = 4242;
          for (let i = 0; i < 150; i++) {
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
        sha256File(path.join(small, 'raw', 'latest')),
        sha256File(path.join(small, 'vm1', 'latest')),
        sha256File(path.join(small, 'raw', 'latest')),
      ]);
      expect(await randomReads).toBe('ok');
      const [raw, disk] = [await sha256File(images.raw!), await sha256File(images.disk!)];
      expect(sums).toEqual([raw, disk, raw]);
    } finally {
      await unmountQuietly(small);
    }
  }, 90_000);

  it('restores a single file through a read-only loop device and ext4 mount of a mounted generation', async () => {
    const dev = (await must('losetup', ['-r', '-P', '--show', '-f', path.join(mnt, 'vm1', 'latest')])).trim();
    const fsdir = s.path('restore-fs');
    await fs.mkdir(fsdir, { recursive: true });
    let mounted = false;
    try {
      const part = await s.partition(dev);
      await must('mount', ['-o', 'ro,noload', part, fsdir]);
      mounted = true;
      expect(await fs.readFile(path.join(fsdir, 'etc', 'important.conf'))).toEqual(secret);
      // A few more files, compared with the source disk's own (mounted read-only too).
      const files = (await fs.readdir(path.join(fsdir, 'd3'))).sort().slice(0, 4);
      expect(files.length).toBeGreaterThan(0);
      const srcDev = (await must('losetup', ['-r', '-P', '--show', '-f', images.disk!])).trim();
      const srcDir = s.path('source-fs');
      await fs.mkdir(srcDir, { recursive: true });
      let srcMounted = false;
      try {
        await must('mount', ['-o', 'ro,noload', await s.partition(srcDev), srcDir]);
        srcMounted = true;
        for (const f of files) expect(await sha256File(path.join(fsdir, 'd3', f)), f).toBe(await sha256File(path.join(srcDir, 'd3', f)));
      } finally {
        if (srcMounted) await sh('umount', [srcDir]);
        await sh('losetup', ['-d', srcDev]);
      }
    } finally {
      // The filesystem before its loop device, the loop device before the FUSE mount.
      if (mounted) await sh('umount', [fsdir]);
      await sh('losetup', ['-d', dev]);
    }
  }, 60_000);

  it('serves in the foreground until SIGTERM, and shows a new generation within 3 seconds', async () => {
    const fmnt = s.path('mnt-fg');
    await fs.mkdir(fmnt);
    s.onCleanup(() => unmountQuietly(fmnt));
    const url = sshd.url('/srv/ignored');
    const p = new CliProcess(['-r', url, '--repo-identity', keys.reader!, '--repo-known-hosts', sshd.knownHosts, 'mount', '--foreground', fmnt]);
    s.onCleanup(async () => {
      p.kill('SIGKILL');
      await p.exited;
    });
    for (let i = 0; i < 200 && !(await isMounted(fmnt)); i++) {
      if (!p.running) throw new Error(`the mount exited: ${p.out}`);
      await new Promise((r) => setTimeout(r, 100));
    }
    expect(await isMounted(fmnt)).toBe(true);
    expect((await fs.readdir(fmnt)).sort()).toEqual(['raw', 'vm1']);
    // Another generation of raw with the same bytes: what the other tests read stays the same.
    const before = await fs.readlink(path.join(fmnt, 'raw', 'latest'));
    const gen = JSON.parse(await rgvOk(keys.kvm1!, ['backup', images.raw!, '--name', 'raw', '--json'])) as { id: string };
    const t0 = Date.now();
    let now = before;
    while (Date.now() - t0 < 3000 && now === before) {
      await new Promise((r) => setTimeout(r, 100));
      now = await fs.readlink(path.join(fmnt, 'raw', 'latest'));
    }
    expect(now).not.toBe(before);
    expect(now).toContain(gen.id.slice(0, 8));
    expect(await sha256File(path.join(fmnt, 'raw', now))).toBe(await sha256File(images.raw!));
    p.kill('SIGTERM');
    expect((await p.waitExit(15_000)).code, p.out).toBe(0);
    expect(await isMounted(fmnt)).toBe(false);
  }, 60_000);

  it('a damaged chunk on the server: EIO for exactly the reads that touch it, right bytes elsewhere, logged', async () => {
    const drepo = s.path('drepo');
    await gvOk(drepo, ['init']);
    const img = s.path('d.img');
    const data = Buffer.concat([prng(21, 4 << 20), prng(22, 4 << 20)]);
    await fs.writeFile(img, data);
    await gvOk(drepo, ['backup', img, '--name', 'd']);
    const pack = (await dataPackFiles(drepo))[0]!;
    const flipAt = 200_000;
    const damaged = await chunkExtentsAt(drepo, 'd', path.basename(pack, '.pack'), flipAt);
    expect(damaged).toHaveLength(1);
    const [start, end] = damaged[0]!;
    expect(start % 4096).toBe(0);
    await flipByte(pack, flipAt);
    const dkey = await clientKey('damaged', '--permissions read', drepo);
    const dmnt = s.path('mnt-damaged');
    await fs.mkdir(dmnt);
    s.onCleanup(() => unmountQuietly(dmnt));
    const log = s.path('damaged.log');
    const r = await rgv(dkey, ['mount', dmnt, '--log', log]);
    expect(r.code, r.stderr).toBe(0);
    const { wrong, eio } = await readAroundDamage(path.join(dmnt, 'd', 'latest'), data, start, end);
    expect(wrong.slice(0, 20), `${wrong.length} wrong block(s)`).toEqual([]);
    expect(eio).toBe((end - start) / 4096);
    expect(await fs.readFile(log, 'utf8')).toMatch(/EIO reading d@[0-9a-f]+ at offset \d+: .*damaged/);
    await unmountQuietly(dmnt);
  }, 60_000);

  it('a key the server refuses: one error line, nothing mounted, no process left', async () => {
    const bmnt = s.path('mnt-refused');
    await fs.mkdir(bmnt);
    s.onCleanup(() => unmountQuietly(bmnt));
    const r = await rgv(sshd.otherKey, ['mount', bmnt]);
    expect(r.code).toBe(1);
    expect(r.stderr.trim().split('\n'), r.stderr).toHaveLength(1);
    expect(r.stderr).toMatch(/^genvault: cannot mount .*mnt-refused: /);
    expect(await isMounted(bmnt)).toBe(false);
    expect((await sh('pgrep', ['-f', `mount ${bmnt}`])).stdout.trim()).toBe('');
  }, 60_000);

  it('read-ahead follows the reader: 4 KiB reads 2 MiB apart bring their blocks, not the whole image', async () => {
    // A loop-mounted file system hops like this between files. The rule before the read
    // streak (src/read/streak.ts) read a whole window ahead of every read within 4 MiB of
    // the last: here all 20 MiB of data, against the 11 blocks these reads touch and the
    // first read's 2 MiB.
    const hmnt = s.path('mnt-hops');
    await fs.mkdir(hmnt);
    s.onCleanup(() => unmountQuietly(hmnt));
    const r = await rgv(keys.reader!, ['mount', hmnt]);
    expect(r.code, r.stderr).toBe(0);
    const pid = Number((await sh('pgrep', ['-f', `mount ${hmnt}`])).stdout.trim().split('\n')[0]);
    const rchar = async () => Number(/^rchar: (\d+)$/m.exec(await fs.readFile(`/proc/${pid}/io`, 'utf8'))![1]);
    const before = await rchar();
    // fadvise(RANDOM): the kernel's own read-ahead stays out of the count.
    const py = 'import os,sys\nfd=os.open(sys.argv[1],os.O_RDONLY)\nos.posix_fadvise(fd,0,0,os.POSIX_FADV_RANDOM)\n' +
      'sys.stdout.buffer.write(b"".join(os.pread(fd,4096,k<<21) for k in range(10)))';
    const got = await exec('python3', ['-c', py, path.join(hmnt, 'raw', 'latest')], { encoding: 'buffer', maxBuffer: 1 << 20 });
    const fetched = (await rchar()) - before;
    const src = await fs.readFile(images.raw!);
    expect(got.stdout.equals(Buffer.concat(Array.from({ length: 10 }, (_, k) => src.subarray(k << 21, (k << 21) + 4096))))).toBe(true);
    expect(fetched).toBeGreaterThan(10 << 20);
    expect(fetched).toBeLessThan(16 << 20);
    const u = await gv(null, ['umount', hmnt]);
    expect(u.code, u.stderr).toBe(0);
  }, 60_000);

  it('a killed connection makes reads fail with EIO, logged once, and umount still works', async () => {
    const kmnt = s.path('mnt-killed');
    await fs.mkdir(kmnt);
    s.onCleanup(() => unmountQuietly(kmnt));
    const log = s.path('killed.log');
    const before = new Set(await servePids());
    // An 8 MiB cache reads 4 MiB ahead: most of the image is still on the server when the connection dies.
    const r = await rgv(keys.reader!, ['mount', kmnt, '--cache-size', '8M', '--log', log]);
    expect(r.code, r.stderr).toBe(0);
    const serve = (await servePids()).filter((p) => !before.has(p));
    expect(serve).toHaveLength(1);
    const session = await sshd.sessionOf(serve[0]!);
    expect(session.length).toBeGreaterThan(0);

    const rawFile = path.join(kmnt, 'raw', 'latest');
    const fh = await fs.open(rawFile, 'r');
    try {
      const b = Buffer.alloc(65536);
      expect((await fh.read(b, 0, b.length, 0)).bytesRead).toBe(b.length);
      for (const p of session) process.kill(p, 'SIGKILL');
      await waitGone(serve);
      const within = <T>(p: Promise<T>, what: string) =>
        Promise.race([p, new Promise<never>((_r, reject) => setTimeout(() => reject(new Error(`${what} hung`)), 20_000))]);
      // Far from what was read ahead: not in any cache.
      await expect(within(fh.read(b, 0, b.length, 24 << 20), 'read')).rejects.toThrow(/EIO/);
      await expect(within(fh.read(b, 0, b.length, 16 << 20), 'read')).rejects.toThrow(/EIO/);
      // A file not open yet cannot be opened on the server: EIO too; the tree is still there.
      await expect(within(fs.readFile(path.join(kmnt, 'vm1', 'latest')), 'open')).rejects.toThrow(/EIO/);
      expect((await fs.readdir(kmnt)).sort()).toEqual(['raw', 'vm1']);
    } finally {
      await fh.close();
    }
    const text = await fs.readFile(log, 'utf8');
    expect(text.match(/lost the connection/g), text).toHaveLength(1);
    expect(text).not.toMatch(/EIO reading/);
    const pid = Number((await sh('pgrep', ['-f', `mount ${kmnt}`])).stdout.trim().split('\n')[0]);
    const u = await gv(null, ['umount', kmnt]);
    expect(u.code, u.stderr).toBe(0);
    expect(await isMounted(kmnt)).toBe(false);
    if (pid) await waitGone([pid], 10_000);
  }, 90_000);
});

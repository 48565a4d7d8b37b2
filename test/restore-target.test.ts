/**
 * What a restore may write to: regular files (through a temporary name) and block devices
 * named explicitly with --force, never one in use; nothing else on the host. And what an
 * interrupted restore leaves behind: nothing. Real devices: /dev/null, FIFOs, loop devices,
 * ext4 mounts, swap, a symlink planted by an unprivileged user, signals mid-write.
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CLI, Scratch, gv, gvOk, makeDisk, must, oneLine, prng, sh, sha256File, writeFiles } from './helpers.js';
import { sharedStickyDir, unprivUser } from './unpriv.js';

const IMAGE_MIB = 24;
const IMAGE = IMAGE_MIB << 20;

let s: Scratch;
let repo: string;
let imageSum: string;

beforeAll(async () => {
  s = await Scratch.create();
  repo = s.path('repo');
  const img = s.path('vm.img');
  await makeDisk(s, img, IMAGE_MIB, (dir) => writeFiles(dir, 5, 30, 100_000).then(() => undefined));
  imageSum = await sha256File(img);
  await gvOk(repo, ['init']);
  await gvOk(repo, ['backup', img, '--name', 'vm']);
});

afterAll(async () => {
  await s?.cleanup();
});

/** sha256 of the first `n` bytes of a file or device. */
async function sha256Head(file: string, n: number): Promise<string> {
  const h = createHash('sha256');
  for await (const d of createReadStream(file, { start: 0, end: n - 1 })) h.update(d as Buffer);
  return h.digest('hex');
}

/** A loop device over a fresh file of zeros a little larger than the image. */
async function loopDevice(name: string): Promise<string> {
  const file = s.path(`${name}.backing`);
  await must('truncate', ['-s', `${IMAGE_MIB + 8}M`, file]);
  return s.loopAttach(file);
}

async function partials(dir: string): Promise<string[]> {
  return (await fs.readdir(dir)).filter((f) => f.includes('genvault-partial'));
}

/** blkid's probe of a device (bypassing its cache), e.g. 'ext4', 'swap', or '' for none. */
async function fsType(dev: string): Promise<string> {
  return (await sh('blkid', ['-p', '-o', 'value', '-s', 'TYPE', dev])).stdout.trim();
}

describe('restore targets that are not regular files or free block devices', () => {
  it('refuses /dev/null and leaves it the character device it was', async () => {
    const before = await fs.stat('/dev/null');
    const r = await gv(repo, ['restore', 'vm@latest', '/dev/null']);
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/^genvault: \/dev\/null is a character device; .*nothing written/);
    const after = await fs.stat('/dev/null');
    expect(after.isCharacterDevice()).toBe(true);
    expect(after.rdev).toBe(before.rdev);
    expect(after.ino).toBe(before.ino);
    expect(await partials('/dev')).toEqual([]);
  });

  it('refuses a FIFO without opening it', async () => {
    const dir = s.path('fifo');
    await fs.mkdir(dir);
    const fifo = path.join(dir, 'pipe');
    await must('mkfifo', [fifo]);
    // Opening a FIFO for writing with no reader would block: the restore must return.
    const r = await gv(repo, ['restore', 'vm@latest', fifo, '--force']);
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toBe(`genvault: ${fifo} is a FIFO; restore writes only to a regular file or a block device (nothing written)`);
    expect((await fs.lstat(fifo)).isFIFO()).toBe(true);
    expect(await partials(dir)).toEqual([]);
  });

  it('refuses a directory', async () => {
    const dir = s.path('a-dir');
    await fs.mkdir(dir);
    const r = await gv(repo, ['restore', 'vm@latest', dir, '--force']);
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/ is a directory; restore writes only to a regular file or a block device/);
    expect((await fs.lstat(dir)).isDirectory()).toBe(true);
    expect(await fs.readdir(dir)).toEqual([]);
    expect(await partials(s.dir)).toEqual([]);
  });

  it('writes a block device only with --force, byte-identical', async () => {
    const dev = await loopDevice('plain');
    const zeros = await sha256Head(dev, IMAGE);
    const r = await gv(repo, ['restore', 'vm@latest', dev]);
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toBe(`genvault: ${dev} is a block device; use --force to overwrite it`);
    expect(await sha256Head(dev, IMAGE)).toBe(zeros);
    const ok = await gv(repo, ['restore', 'vm@latest', dev, '--force']);
    expect(ok.code, ok.stderr).toBe(0);
    expect(ok.stdout).toMatch(new RegExp(`^restored vm@\\w+ to ${dev}: `));
    expect(await sha256Head(dev, IMAGE)).toBe(imageSum);
  });

  it('refuses a mounted block device even with --force, also when a partition is mounted', async () => {
    const dev = await loopDevice('mounted');
    // The whole device holds a mounted ext4.
    await must('mkfs.ext4', ['-q', '-F', dev]);
    const mnt = s.path('mnt-whole');
    await s.mount(dev, mnt);
    let r = await gv(repo, ['restore', 'vm@latest', dev, '--force']);
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toBe(`genvault: ${dev} is mounted on ${mnt}; refusing to overwrite it, even with --force`);
    expect(await fsType(dev)).toBe('ext4');
    await must('umount', [mnt]);
    // One partition of the device holds a mounted ext4 (the loop device has -P).
    const part = await sh('sfdisk', ['-q', dev], { input: 'label: gpt\nstart=2048, size=8192, type=L\n' });
    expect(part.code, part.stderr).toBe(0);
    const p1 = await s.partition(dev);
    await must('mkfs.ext4', ['-q', '-F', p1]);
    const mnt1 = s.path('mnt-part');
    await s.mount(p1, mnt1);
    const before = await sha256Head(dev, IMAGE);
    r = await gv(repo, ['restore', 'vm@latest', dev, '--force']);
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toBe(`genvault: ${dev} is mounted (partition ${p1}) on ${mnt1}; refusing to overwrite it, even with --force`);
    expect(await fsType(p1)).toBe('ext4');
    expect(await sha256Head(dev, IMAGE)).not.toBe(imageSum);
    expect(before).not.toBe(imageSum);
  });

  it('refuses an active swap device even with --force', async (ctx) => {
    const dev = await loopDevice('swap');
    await must('mkswap', [dev]);
    const on = await sh('swapon', [dev]);
    if (on.code !== 0) {
      console.log(`skipped: swapon is not permitted here (${on.stderr.trim()})`);
      ctx.skip();
    }
    s.onCleanup(() => sh('swapoff', [dev]));
    try {
      const r = await gv(repo, ['restore', 'vm@latest', dev, '--force']);
      expect(r.code).toBe(1);
      expect(oneLine(r.stderr)).toBe(`genvault: ${dev} is active swap; refusing to overwrite it, even with --force`);
      expect(await fsType(dev)).toBe('swap');
    } finally {
      await sh('swapoff', [dev]);
    }
  });

  it('refuses a symlink planted by another user in a shared directory, --force or not', async () => {
    const dev = await loopDevice('planted');
    const before = await sha256Head(dev, IMAGE);
    const u = await unprivUser();
    const shared = await sharedStickyDir(s);
    const link = path.join(shared, 'vm.img');
    const ln = await u.run('ln', ['-s', dev, link]);
    expect(ln.code, ln.stderr).toBe(0);
    expect((await fs.lstat(link)).uid).toBe(u.uid);
    for (const force of [[], ['--force']]) {
      const r = await gv(repo, ['restore', 'vm@latest', link, ...force]);
      expect(r.code).toBe(1);
      expect(oneLine(r.stderr)).toBe(`genvault: ${link} is a symlink owned by uid ${u.uid} in the shared directory ${shared}: refusing to follow it`);
    }
    expect(await sha256Head(dev, IMAGE)).toBe(before);
    // The admin's own symlink is followed, and the message names where it leads.
    const own = s.path('own-link.img');
    await fs.symlink(dev, own);
    const r = await gv(repo, ['restore', 'vm@latest', own]);
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toBe(`genvault: ${dev} (via symlink ${own}) is a block device; use --force to overwrite it`);
    expect(await sha256Head(dev, IMAGE)).toBe(before);
    expect((await fs.lstat(link)).isSymbolicLink()).toBe(true);
    expect(await partials(shared)).toEqual([]);
  });

  it('writes the image to stdout for -, and no file named -', async () => {
    const cwd = s.path('dash');
    await fs.mkdir(cwd);
    const child = spawn(process.execPath, [CLI, '-r', repo, 'restore', 'vm@latest', '-'], {
      cwd,
      env: { ...process.env, GENVAULT_NO_PROGRESS: '1' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const h = createHash('sha256');
    let n = 0;
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => {
      h.update(d);
      n += d.length;
    });
    child.stderr.on('data', (d: Buffer) => (stderr += d));
    const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
    expect(code, stderr).toBe(0);
    expect(stderr).toBe('');
    expect(n).toBe(IMAGE);
    expect(h.digest('hex')).toBe(imageSum);
    expect(await fs.readdir(cwd)).toEqual([]);
  });
});

describe('a restore interrupted by a signal', () => {
  const BIG_MIB = 512;

  beforeAll(async () => {
    // Random data (no dedup, no compression): a restore long enough to signal mid-write.
    const big = s.path('big.img');
    const fh = await fs.open(big, 'w');
    for (let i = 0; i < BIG_MIB / 32; i++) await fh.write(prng(1000 + i, 32 << 20));
    await fh.close();
    await gvOk(repo, ['backup', big, '--name', 'big']);
    await fs.rm(big);
  });

  it.each(['SIGINT', 'SIGTERM'] as const)('%s mid-write removes the partial file and exits', async (sig) => {
    const dir = s.path(`signal-${sig}`);
    await fs.mkdir(dir);
    const target = path.join(dir, 'big.img');
    const child = spawn(process.execPath, [CLI, '-r', repo, 'restore', 'big@latest', target], {
      env: { ...process.env, GENVAULT_NO_PROGRESS: '1' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d));
    const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
      child.on('close', (code, signal) => resolve({ code, signal })),
    );
    let running = true;
    void exited.then(() => (running = false));
    // Wait until the partial file exists and its allocated blocks grow (it is sparse and
    // has its full size from the start): the restore is writing.
    let seen = -1;
    let growing = false;
    while (running && !growing) {
      const [name] = await partials(dir);
      const st = name ? await fs.stat(path.join(dir, name)).catch(() => null) : null;
      if (st) {
        if (seen >= 0 && st.blocks > seen) growing = true;
        seen = Math.max(seen, st.blocks);
      }
      if (!growing) await new Promise((r) => setImmediate(r));
    }
    expect(growing, `restore ended before it was seen writing: ${stderr}`).toBe(true);
    child.kill(sig);
    const timeout = setTimeout(() => child.kill('SIGKILL'), 60_000);
    const end = await exited;
    clearTimeout(timeout);
    expect(end.signal, stderr).toBeNull(); // exited by itself, not killed
    expect(await fs.readdir(dir)).toEqual([]); // no partial file, no target
    expect(end.code).toBe(1);
    expect(oneLine(stderr)).toBe(`genvault: restore interrupted by ${sig}; ${target} not written (partial file removed)`);
  });
});

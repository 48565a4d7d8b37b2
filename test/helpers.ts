/**
 * Test helpers: run the built CLI as a real process, build real GPT disk images with an
 * ext4 partition holding real files, and clean up loop devices and mounts even when a
 * test fails.
 */
import { scanPack } from '../src/format/scan.js';
import { RECORD_HEADER_SIZE } from '../src/format/pack.js';
import { Repository } from '../src/repository/repository.js';
import { ChildProcess, execFile, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { expect } from 'vitest';

const execFileP = promisify(execFile);

export const ROOT = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
export const CLI = path.join(ROOT, 'dist', 'cli', 'main.js');

export interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

/** Run a command; never throws on a non-zero exit. */
export async function sh(cmd: string, args: string[], opts: { input?: Buffer | string; env?: NodeJS.ProcessEnv; cwd?: string } = {}): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { env: { ...process.env, ...opts.env }, cwd: opts.cwd, stdio: ['pipe', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (d) => out.push(d));
    child.stderr.on('data', (d) => err.push(d));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code: code ?? -1, stdout: Buffer.concat(out).toString(), stderr: Buffer.concat(err).toString() }));
    child.stdin.on('error', () => undefined);
    if (opts.input !== undefined) child.stdin.end(opts.input);
    else child.stdin.end();
  });
}

/** Run a command and throw with its stderr if it fails. */
export async function must(cmd: string, args: string[]): Promise<string> {
  const r = await sh(cmd, args);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.code}): ${r.stderr.trim()}`);
  return r.stdout;
}

/** genvault CLI against a repository. */
export function gv(repo: string | null, args: string[], opts: { input?: Buffer | string; env?: NodeJS.ProcessEnv } = {}): Promise<Run> {
  // The suite's byte-exact expectations are about unencrypted repositories (format 5);
  // test/encryption.test.ts asks for encryption by giving --encryption itself.
  if (args[0] === 'init' && !args.includes('--encryption')) args = [...args, '--encryption', 'none'];
  const full = repo ? ['-r', repo, ...args] : args;
  return sh(process.execPath, [CLI, ...full], { ...opts, env: { GENVAULT_NO_PROGRESS: '1', ...opts.env } });
}

export async function gvOk(repo: string, args: string[]): Promise<string> {
  const r = await gv(repo, args);
  if (r.code !== 0) throw new Error(`genvault ${args.join(' ')} failed (${r.code}): ${r.stderr.trim()}`);
  return r.stdout;
}

export async function sha256File(file: string): Promise<string> {
  const h = createHash('sha256');
  for await (const d of createReadStream(file)) h.update(d as Buffer);
  return h.digest('hex');
}

/** Write an image made of `parts`; returns its SHA-256. */
export async function writeImage(file: string, parts: Buffer[]): Promise<string> {
  await fs.writeFile(file, Buffer.concat(parts));
  return sha256File(file);
}

/** Deterministic pseudo-random bytes (xorshift32), fast enough for tens of MiB. */
export function prng(seed: number, n: number): Buffer {
  const out = Buffer.allocUnsafe(n + 4);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < n; i += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out.writeUInt32LE(x >>> 0, i);
  }
  return out.subarray(0, n);
}

/** Seeded generator of floats in [0, 1) (mulberry32), for random choices a seed can replay. */
export function seededRandom(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const WORDS = 'alpha beta gamma delta kernel disk block inode extent journal backup restore mount image chunk generation'.split(' ');

/** Compressible text, deterministic per seed. */
export function text(seed: number, n: number): Buffer {
  const r = prng(seed, Math.ceil(n / 4) + 8);
  const parts: string[] = [];
  let len = 0;
  for (let i = 0; len < n; i++) {
    const w = WORDS[r[i % r.length]! % WORDS.length]!;
    parts.push(w);
    len += w.length + 1;
  }
  return Buffer.from(parts.join(' ')).subarray(0, n);
}

/** Scratch space that undoes mounts and loop devices on cleanup, in reverse order. */
export class Scratch {
  private undo: Array<() => Promise<unknown>> = [];
  private constructor(readonly dir: string) {}

  static async create(prefix = 'genvault-test-'): Promise<Scratch> {
    // /var/tmp: on disk, not tmpfs (sparse files, sizes).
    return new Scratch(await fs.mkdtemp(path.join('/var/tmp', prefix)));
  }

  path(...p: string[]): string {
    return path.join(this.dir, ...p);
  }

  onCleanup(fn: () => Promise<unknown>): void {
    this.undo.push(fn);
  }

  async loopAttach(file: string, readOnly = false): Promise<string> {
    const args = ['-P', '--show', '-f', file];
    if (readOnly) args.unshift('-r');
    const dev = (await must('losetup', args)).trim();
    this.onCleanup(() => sh('losetup', ['-d', dev]));
    return dev;
  }

  /** Partition device of a loop device, waiting for udev-less systems with partx. */
  async partition(dev: string, n = 1): Promise<string> {
    const part = `${dev}p${n}`;
    for (let i = 0; i < 50; i++) {
      try {
        await fs.stat(part);
        return part;
      } catch {
        if (i === 5) await sh('partx', ['-a', dev]);
        await new Promise((r) => setTimeout(r, 100));
      }
    }
    throw new Error(`${part} did not appear`);
  }

  async mount(dev: string, dir: string, options = ''): Promise<void> {
    await fs.mkdir(dir, { recursive: true });
    await must('mount', options ? ['-o', options, dev, dir] : [dev, dir]);
    this.onCleanup(() => sh('umount', ['-l', dir]));
  }

  async cleanup(): Promise<void> {
    while (this.undo.length) {
      await this.undo.pop()!().catch(() => undefined);
    }
    await fs.rm(this.dir, { recursive: true, force: true }).catch(() => undefined);
  }
}

/**
 * Make a GPT disk image with one ext4 partition (from 1 MiB to the end) and let
 * `populate` write files into the mounted filesystem.
 */
export async function makeDisk(s: Scratch, file: string, sizeMiB: number, populate: (dir: string) => Promise<void>): Promise<void> {
  await must('truncate', ['-s', `${sizeMiB}M`, file]);
  await sh('sfdisk', ['-q', file], { input: 'label: gpt\nstart=2048, type=L\n' }).then((r) => {
    if (r.code) throw new Error(`sfdisk: ${r.stderr}`);
  });
  await withMountedDisk(s, file, async (dir) => populate(dir), true);
}

/** Loop-attach a disk image, mount its first partition read-write, run fn, unmount, detach. */
export async function withMountedDisk(s: Scratch, file: string, fn: (dir: string) => Promise<void>, mkfs = false): Promise<void> {
  const dev = (await must('losetup', ['-P', '--show', '-f', file])).trim();
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'gv-mnt-'));
  let mounted = false;
  try {
    const part = await s.partition(dev);
    if (mkfs) await must('mkfs.ext4', ['-q', '-F', '-E', 'lazy_itable_init=0,lazy_journal_init=0', part]);
    await must('mount', [part, dir]);
    mounted = true;
    await fn(dir);
    await must('sync', []);
  } finally {
    if (mounted) await sh('umount', [dir]);
    await sh('losetup', ['-d', dev]);
    await fs.rm(dir, { recursive: true, force: true });
  }
}

/** Write a tree of files: text and random binaries, deterministic per seed. */
export async function writeFiles(dir: string, seed: number, count: number, avgBytes: number): Promise<string[]> {
  const names: string[] = [];
  const r = prng(seed, count * 8);
  for (let i = 0; i < count; i++) {
    const sub = path.join(dir, `d${i % 7}`);
    await fs.mkdir(sub, { recursive: true });
    const size = Math.max(1, Math.floor(((r.readUInt32LE(i * 8) % 1000) / 500) * avgBytes));
    const data = i % 3 === 0 ? prng(seed * 7919 + i, size) : text(seed * 104729 + i, size);
    const name = path.join(sub, `f${seed}-${i}.${i % 3 === 0 ? 'bin' : 'txt'}`);
    await fs.writeFile(name, data);
    names.push(name);
  }
  return names;
}

export async function isMounted(dir: string): Promise<boolean> {
  const info = await fs.readFile('/proc/self/mountinfo', 'utf8');
  return info.split('\n').some((l) => l.split(' ')[4] === dir);
}

/**
 * Wait until none of `pids` runs any more: gone, or a zombie in every thread (then its
 * files are closed, and a FUSE server's connection with them). Throws after `timeoutMs`.
 */
export async function waitGone(pids: number[], timeoutMs = 30_000): Promise<void> {
  const running = async (pid: number) => {
    const tasks = await fs.readdir(`/proc/${pid}/task`).catch(() => [] as string[]);
    for (const t of tasks) {
      const stat = await fs.readFile(`/proc/${pid}/task/${t}/stat`, 'utf8').catch(() => null);
      if (stat !== null && !'ZX'.includes(stat[stat.lastIndexOf(')') + 2]!)) return true;
    }
    return false;
  };
  const t0 = Date.now();
  for (;;) {
    const left: number[] = [];
    for (const p of pids) if (await running(p)) left.push(p);
    if (!left.length) return;
    if (Date.now() - t0 > timeoutMs) throw new Error(`processes ${left.join(', ')} still run after ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** An error output that is exactly one line and no stack trace; returns that line. */
export function oneLine(stderr: string): string {
  const lines = stderr.trim().split('\n');
  expect(lines, stderr).toHaveLength(1);
  expect(stderr).not.toMatch(/\s+at .*\(.*:\d+:\d+\)/);
  return lines[0]!;
}

/** The pack files of a repository, sorted by path. */
export async function packFiles(repo: string): Promise<string[]> {
  const out: string[] = [];
  const dir = path.join(repo, 'packs');
  for (const sub of await fs.readdir(dir)) {
    for (const f of await fs.readdir(path.join(dir, sub))) out.push(path.join(dir, sub, f));
  }
  return out.sort();
}

/**
 * The pack files that hold chunk data, sorted by path: a backup also writes a small pack
 * of its own for its generation's map and record (format 4 and later), and protect,
 * unprotect, forget and prune write packs of change records.
 */
export async function dataPackFiles(repo: string): Promise<string[]> {
  const out: string[] = [];
  for (const f of await packFiles(repo)) {
    const fh = await fs.open(f, 'r');
    try {
      const size = (await fh.stat()).size;
      const items = scanPack(async (b, o, l, at) => (await fh.read(b, o, l, at)).bytesRead, size, path.basename(f, '.pack'));
      for await (const item of items) {
        if (item.kind === 'chunk' || item.kind === 'group') {
          out.push(f);
          break;
        }
      }
    } finally {
      await fh.close();
    }
  }
  return out;
}

/** Simulate bit rot: XOR one byte of a file with `mask`. */
export async function flipByte(file: string, at: number, mask = 0xff): Promise<void> {
  const fh = await fs.open(file, 'r+');
  const b = Buffer.alloc(1);
  await fh.read(b, 0, 1, at);
  b[0] ^= mask;
  await fh.write(b, 0, 1, at);
  await fh.close();
}

export { execFileP };

/**
 * A genvault process running in the background (a daemon, a job run held by a hook),
 * with its output collected. Waits are event-driven and bounded: `waitFor` resolves when
 * the output matches, and fails at once if the process exits first, or after `ms`.
 */
export class CliProcess {
  readonly child: ChildProcess;
  out = '';
  exit: { code: number | null; signal: NodeJS.Signals | null } | null = null;
  /** Resolves when the process has exited (never rejects). */
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  private listeners = new Set<() => void>();

  constructor(args: string[], env: NodeJS.ProcessEnv = {}) {
    this.child = spawn(process.execPath, [CLI, ...args], { env: { ...process.env, GENVAULT_NO_PROGRESS: '1', ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    const onData = (b: Buffer) => {
      this.out += b.toString();
      for (const l of [...this.listeners]) l();
    };
    this.child.stdout!.on('data', onData);
    this.child.stderr!.on('data', onData);
    this.exited = new Promise((resolve) => {
      this.child.on('close', (code, signal) => {
        this.exit = { code, signal };
        for (const l of [...this.listeners]) l();
        resolve(this.exit);
      });
    });
  }

  get pid(): number {
    return this.child.pid!;
  }

  get running(): boolean {
    return this.exit === null && this.child.exitCode === null && this.child.signalCode === null;
  }

  /** Wait until the output matches `re` (at least `count` times). */
  waitFor(re: RegExp, ms: number, count = 1): Promise<void> {
    const g = new RegExp(re.source, re.flags.includes('g') ? re.flags : `${re.flags}g`);
    const matched = () => (this.out.match(g) ?? []).length >= count;
    return new Promise<void>((resolve, reject) => {
      const done = (err?: Error) => {
        clearTimeout(timer);
        this.listeners.delete(check);
        if (err) reject(err);
        else resolve();
      };
      const check = () => {
        if (matched()) done();
        else if (this.exit) done(new Error(`exited (${JSON.stringify(this.exit)}) before printing ${re}${count > 1 ? ` ${count} times` : ''}; output:\n${this.out}`));
      };
      const timer = setTimeout(() => done(new Error(`no ${re}${count > 1 ? ` ${count} times` : ''} within ${ms} ms; output:\n${this.out}`)), ms);
      this.listeners.add(check);
      check();
    });
  }

  /** Wait for the exit, at most `ms` (then SIGKILL it and fail). */
  async waitExit(ms: number): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<null>((r) => (timer = setTimeout(() => r(null), ms)));
    const r = await Promise.race([this.exited, late]);
    clearTimeout(timer);
    if (r) return r;
    this.kill('SIGKILL');
    throw new Error(`did not exit within ${ms} ms; output:\n${this.out}`);
  }

  kill(sig: NodeJS.Signals = 'SIGTERM'): void {
    if (this.running) this.child.kill(sig);
  }
}

/** Wait until `file` exists (inotify on its directory, plus a slow re-check), at most `ms`. */
export async function waitForFile(file: string, ms: number): Promise<void> {
  const exists = () => fs.access(file).then(() => true, () => false);
  const ac = new AbortController();
  let wake = null as (() => void) | null; // set by the waiting loop below
  void (async () => {
    try {
      for await (const ev of fs.watch(path.dirname(file), { signal: ac.signal })) if (ev.filename === path.basename(file)) wake?.();
    } catch {
      /* aborted, or the directory went away: the re-check still runs */
    }
  })();
  const deadline = Date.now() + ms;
  try {
    while (!(await exists())) {
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`${file} did not appear within ${ms} ms`);
      // Wake on the inotify event, or re-check after at most 250 ms.
      await new Promise<void>((r) => {
        const t = setTimeout(r, Math.min(250, left));
        wake = () => {
          clearTimeout(t);
          r();
        };
      });
      wake = null;
    }
  } finally {
    ac.abort();
  }
}

/** The images test/fixtures/format3-repo holds, by name and generation (oldest first): deterministic. */
export function format3Images(): Array<[string, Buffer]> {
  const MiB = 1 << 20;
  const a = Buffer.alloc(8 * MiB);
  text(1, 3 * MiB).copy(a, 1 * MiB);
  prng(2, MiB / 4).copy(a, 4 * MiB);
  text(3, 3 * MiB + (3 * MiB) / 4).copy(a, 4 * MiB + MiB / 4);
  const b = Buffer.from(a);
  text(4, 64 << 10).copy(b, 2 * MiB);
  b.fill(0, 6 * MiB, 6 * MiB + MiB / 2);
  const odd = text(5, 2 * MiB + 1234); // not a multiple of the 4 KiB block
  return [
    ['disk', a],
    ['disk', b],
    ['odd', odd],
  ];
}

/**
 * Read `file` 4 KiB at a time against `data`: each block overlapping the damaged range
 * [start, end) must fail with EIO, every other must hold data's bytes. Returns what was
 * wrong (empty when all was as it should be) and how many blocks gave EIO.
 */
export async function readAroundDamage(file: string, data: Buffer, start: number, end: number): Promise<{ wrong: string[]; eio: number }> {
  const f = await fs.open(file, 'r');
  const wrong: string[] = [];
  let eio = 0;
  try {
    const b = Buffer.alloc(4096);
    for (let off = 0; off < data.length; off += 4096) {
      const inDamage = off < end && off + 4096 > start;
      try {
        const { bytesRead } = await f.read(b, 0, 4096, off);
        if (inDamage) wrong.push(`${off}: read ${bytesRead} bytes inside the damaged chunk ${start}-${end}`);
        else if (bytesRead !== 4096 || !b.equals(data.subarray(off, off + 4096))) wrong.push(`${off}: wrong bytes`);
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code;
        if (!inDamage || code !== 'EIO') wrong.push(`${off}: ${code} ${inDamage ? 'inside' : 'outside'} the damaged chunk ${start}-${end}`);
        else eio++;
      }
    }
  } finally {
    await f.close();
  }
  return { wrong, eio };
}

/**
 * Image extents [start, end) of the chunks of `name`'s newest generation whose record in
 * pack `packId` holds byte `at` of the pack file, read from the map and the index (the mount tests' damaged range).
 */
export async function chunkExtentsAt(repoDir: string, name: string, packId: string, at: number): Promise<Array<[number, number]>> {
  const r = await Repository.open(repoDir);
  try {
    const map = await r.chunkMap((await r.generations(name)).at(-1)!);
    const out: Array<[number, number]> = [];
    let pos = 0;
    for (let i = 0; i < map.refs.length; i++) {
      const leaf = await map.leaf(i);
      for (let j = 0; j < leaf.lengths.length; j++) {
        const len = leaf.lengths[j]!;
        const loc = leaf.zero[j] ? null : await r.location(leaf.digests.subarray(j * 32, j * 32 + 32));
        if (loc && loc.packId === packId && loc.offset <= at && at < loc.offset + RECORD_HEADER_SIZE + loc.storedLength) out.push([pos, pos + len]);
        pos += len;
      }
    }
    return out;
  } finally {
    await r.close();
  }
}

/** Processes other than this one with `file` open, from /proc. */
export async function openersOf(file: string): Promise<number[]> {
  const out: number[] = [];
  for (const d of await fs.readdir('/proc')) {
    if (!/^\d+$/.test(d) || Number(d) === process.pid) continue;
    const fds = await fs.readdir(`/proc/${d}/fd`).catch(() => [] as string[]);
    for (const fd of fds) {
      if ((await fs.readlink(`/proc/${d}/fd/${fd}`).catch(() => '')) === file) {
        out.push(Number(d));
        break;
      }
    }
  }
  return out;
}

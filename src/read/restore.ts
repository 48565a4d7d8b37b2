/**
 * Restore a generation to a file (sparse: zero chunks are holes), a block device, or a
 * stream (cat). Chunks are loaded many at a time by the worker pool, ahead of the writer.
 * A file target is written under a temporary name and renamed only when complete, so a
 * failed restore leaves nothing that looks like a good image. Nothing else is written to:
 * character devices, FIFOs, sockets and directories are refused, symlinks are resolved
 * first, and a block device needs --force and must not be in use (mounted, swap, held).
 */
import fsSync from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';
import { randomBytes } from 'node:crypto';
import type { Writable } from 'node:stream';
import { DamageError, GenvaultError, describeFsError } from '../util/errors.js';
import { blockDeviceSizeOf } from '../util/blockdev.js';
import { walkChunks } from '../format/chunkmap.js';
import { markDamaged } from '../index/db.js';
import { packObject, sameGroupRecord } from '../format/pack.js';
import { Generation } from '../format/generation.js';
import { ChunkLoader } from './reader.js';
import type { RestoreItem } from '../work/protocol.js';
import { Repository } from '../repository/repository.js';

export interface RestoreOptions {
  force?: boolean;
  /** Write zeros where chunks are damaged and report the ranges instead of failing. */
  ignoreDamage?: boolean;
  onProgress?: (done: number, total: number) => void;
  /** Called with the resolved target once it passed every check, before anything is written. */
  onTarget?: (t: RestoreTarget) => void;
}

export interface RestoreResult {
  bytes: number;
  target: string;
  /** The path given, when a symlink led to `target`. */
  via?: string;
  damaged: Array<{ offset: number; length: number }>;
  sparse: boolean;
}

export type Sink = {
  /** Write data at offset (data may be null for a zero chunk). Called in offset order. */
  write(offset: number, length: number, data: Buffer | null): Promise<void>;
};

const ZERO = Buffer.alloc(1 << 20);
const ftruncate = promisify(fsSync.ftruncate);
const fdatasync = promisify(fsSync.fdatasync);
const close = promisify(fsSync.close);

/** Hand every chunk to `sink` in order, loading up to `window` bytes ahead. */
export async function streamChunks(
  repo: Repository,
  gen: Generation,
  sink: Sink,
  opts: RestoreOptions,
): Promise<Array<{ offset: number; length: number }>> {
  const map = await repo.chunkMap(gen);
  const loader = new ChunkLoader(repo, 0, false, true);
  const damaged: Array<{ offset: number; length: number }> = [];
  const window = 32 << 20;
  const queue: Array<{ offset: number; length: number; data: Promise<Buffer | null> }> = [];
  let queued = 0;
  let done = 0;
  const drainOne = async () => {
    const q = queue.shift()!;
    queued -= q.length;
    let data: Buffer | null;
    try {
      data = await q.data;
    } catch (e) {
      if (!(e instanceof DamageError)) throw e;
      const range = { offset: q.offset, length: q.length };
      if (!opts.ignoreDamage) {
        // Collect every damaged range so the message names them all.
        damaged.push(range);
        for (const r of queue) r.data.catch(() => undefined);
        for await (const c of walkChunks(map)) {
          if (c.offset <= q.offset || c.zero) continue;
          await loader.load(Buffer.from(c.digest)).catch((err) => {
            if (err instanceof DamageError) damaged.push({ offset: c.offset, length: c.length });
          });
        }
        throw damageError(gen, damaged);
      }
      damaged.push(range);
      data = null;
    }
    await sink.write(q.offset, q.length, data);
    done += q.length;
    opts.onProgress?.(done, gen.size);
  };
  // Chunks are handed to the workers a batch (~1 MiB) at a time, then queued in order.
  let pending: Array<{ offset: number; length: number; zero: boolean; digest: Buffer }> = [];
  let pendingBytes = 0;
  const submit = async () => {
    loader.prefetch(pending.filter((c) => !c.zero).map((c) => c.digest));
    for (const c of pending) {
      const data = c.zero ? Promise.resolve(null) : loader.load(c.digest);
      data.catch(() => undefined); // handled when drained
      queue.push({ offset: c.offset, length: c.length, data });
      queued += c.length;
    }
    pending = [];
    pendingBytes = 0;
    while (queued > window) await drainOne();
  };
  // Each leaf's chunk locations are looked up in one round trip before its chunks.
  for await (const c of walkChunks(map, (leaf) => loader.warm(leaf))) {
    pending.push({ offset: c.offset, length: c.length, zero: c.zero, digest: Buffer.from(c.digest) });
    if (!c.zero) pendingBytes += c.length;
    if (pendingBytes >= 1 << 20 || pending.length >= 64) await submit();
  }
  await submit();
  while (queue.length) await drainOne();
  return damaged;
}

/**
 * Write a generation into an open file descriptor. Workers decode and write the chunks
 * themselves (pwrite at the chunk's offset), so no chunk data passes through the main
 * thread: it only plans batches. With `writeZeros` (block devices) zero chunks are written
 * too; otherwise they stay holes. Damaged chunks are collected; without ignoreDamage the
 * restore fails at the end naming every damaged range.
 */
/** Image bytes loaded in pack order at a time (see restoreToFd): 16 MiB found all but 5% of
 * the repeated group decodes of the benchmark's next-day image (performance.md). */
const RESTORE_WINDOW = 16 << 20;

/**
 * The items of a restore batch that a worker found damaged: gc may have moved the chunk to
 * another pack since we looked it up, so retry there; the rest are damaged (`damaged` and a
 * damage mark).
 */
async function settleDamaged(
  repo: Repository,
  pool: Repository['pool'],
  loader: ChunkLoader,
  fd: number,
  items: RestoreItem[],
  found: number[],
  damaged: Array<{ offset: number; length: number }>,
): Promise<void> {
  for (const i of found) {
    // gc may have moved the chunk to another pack since we looked it up: retry there.
    const it = items[i]!;
    const fresh = await repo.location(Buffer.from(it.digest));
    if (fresh && (packObject(fresh.packId) !== it.file || fresh.offset !== it.offset)) {
      const again = await pool.run({
        op: 'restoreMany',
        fd,
        items: [{ ...loader.item(fresh, Buffer.from(it.digest)), at: it.at, zero: false }],
      });
      if (!again.damaged.length) continue;
    }
    damaged.push({ offset: it.at, length: it.rawLength });
    await markDamaged(repo.db, it.digest, 'restore');
  }
}

/** Pack order: by pack file, record offset, and place inside a group record. */
function byRecord(a: RestoreItem, b: RestoreItem): number {
  if (a.file !== b.file) return a.file < b.file ? -1 : 1;
  return a.offset - b.offset || (a.inner ?? 0) - (b.inner ?? 0) || a.at - b.at;
}

async function restoreToFd(
  repo: Repository,
  gen: Generation,
  fd: number,
  writeZeros: boolean,
  opts: RestoreOptions,
): Promise<Array<{ offset: number; length: number }>> {
  const map = await repo.chunkMap(gen);
  const loader = new ChunkLoader(repo, 0);
  const pool = repo.pool;
  const damaged: Array<{ offset: number; length: number }> = [];
  const running = new Set<Promise<void>>();
  let done = 0;
  let failure: unknown = null;
  let batch: RestoreItem[] = [];
  let batchBytes = 0;
  let full = false;
  const submit = async () => {
    full = false;
    if (!batch.length) return;
    const items = batch;
    const bytes = batchBytes;
    batch = [];
    batchBytes = 0;
    const p = pool.run({ op: 'restoreMany', fd, items, direct: true }).then(
      async (r) => {
        if (r.damaged.length) await settleDamaged(repo, pool, loader, fd, items, r.damaged, damaged);
        done += bytes;
        opts.onProgress?.(done, gen.size);
      },
      (e) => {
        failure ??= e;
      },
    );
    const tracked = p.finally(() => running.delete(tracked));
    running.add(tracked);
    while (running.size >= pool.size * 3) await Promise.race(running);
  };
  const noLoc = { file: '', offset: 0, storedLength: 0, compression: 0, digest: new Uint8Array(32) };
  const add = async (item: RestoreItem, length: number) => {
    // A full batch is sent before the next chunk, unless that is another member of the
    // same group record: a group split between two workers is decoded by both.
    if (full && !sameGroupRecord(batch[batch.length - 1], item)) await submit();
    batch.push(item);
    batchBytes += length;
    full = batchBytes >= 2 << 20 || batch.length >= 64;
  };
  // Chunks are written with pwrite at their own offsets, so they can be loaded in any order.
  // Each window of the image is loaded in pack order: the members of a group record that
  // the image uses in several places (a next-day image whose changed chunks cut through the
  // groups of the first day, a chunk repeated nearby) then come together and the group is
  // read and decoded once, not once per place; reads also run forward through each pack.
  let window: RestoreItem[] = [];
  let windowBytes = 0;
  const flushWindow = async () => {
    window.sort(byRecord);
    for (const item of window) await add(item, item.rawLength);
    window = [];
    windowBytes = 0;
  };
  for await (const c of walkChunks(map, (leaf) => loader.warm(leaf))) {
    if (failure) break;
    if (c.zero) {
      if (writeZeros) await add({ ...noLoc, rawLength: c.length, at: c.offset, zero: true }, c.length);
      else done += c.length;
      continue;
    }
    const digest = Buffer.from(c.digest);
    const loc = await loader.locationOf(digest);
    if (!loc) {
      damaged.push({ offset: c.offset, length: c.length });
      await markDamaged(repo.db, digest, 'restore');
      if (writeZeros) await add({ ...noLoc, rawLength: c.length, at: c.offset, zero: true }, c.length);
      else done += c.length;
      continue;
    }
    window.push({ ...loader.item(loc, digest), at: c.offset, zero: false });
    windowBytes += c.length;
    if (windowBytes >= RESTORE_WINDOW) await flushWindow();
  }
  await flushWindow();
  await submit();
  await Promise.all(running);
  if (failure) throw failure;
  damaged.sort((a, b) => a.offset - b.offset);
  if (damaged.length && writeZeros && opts.ignoreDamage) {
    // Devices may hold old data where a damaged chunk was skipped: zero those ranges.
    batch = damaged.map((d) => ({ ...noLoc, rawLength: d.length, at: d.offset, zero: true }));
    await submit();
    await Promise.all(running);
    if (failure) throw failure;
  }
  if (damaged.length && !opts.ignoreDamage) throw damageError(gen, damaged);
  return damaged;
}

function damageError(gen: Generation, damaged: Array<{ offset: number; length: number }>): GenvaultError {
  return new GenvaultError(
    `${gen.name}@${gen.id}: ${damaged.length} damaged chunk(s) at image bytes ${damaged
      .slice(0, 5)
      .map((r) => `${r.offset}-${r.offset + r.length - 1}`)
      .join(', ')}${damaged.length > 5 ? ', ...' : ''}; use --ignore-damage to restore the rest with zeros there`,
    'DAMAGED',
  );
}

/** A restore target once symlinks are resolved: where the bytes go and how. */
export interface RestoreTarget {
  kind: 'file' | 'device';
  /** The resolved path (no symlinks). */
  path: string;
  /** The path as given, when it differs from `path` (a symlink was followed). */
  via?: string;
  /** A file target: whether it exists, and its size. */
  exists: boolean;
  size: number;
  /** A device target: its device number. */
  rdev: number;
}

/** The target as a user reads it: `/dev/loop3 (via symlink /x/y)`. */
export function showTarget(t: Pick<RestoreTarget, 'path' | 'via'>): string {
  return t.via ? `${t.path} (via symlink ${t.via})` : t.path;
}

function kindOf(st: fsSync.Stats): string {
  if (st.isDirectory()) return 'a directory';
  if (st.isCharacterDevice()) return 'a character device';
  if (st.isFIFO()) return 'a FIFO';
  if (st.isSocket()) return 'a socket';
  return 'not a regular file';
}

/**
 * A symlink in a sticky world-writable directory (/tmp, /var/tmp) owned by someone other
 * than us or the directory's owner was planted by another user: followed, it would let
 * them choose what root overwrites, --force or not. The kernel's fs.protected_symlinks
 * refuses the same links, but it is off in some containers.
 */
async function refusePlantedSymlink(abs: string, lst: fsSync.Stats): Promise<void> {
  const dir = await fs.stat(path.dirname(abs)).catch(() => null);
  if (!dir || (dir.mode & 0o1002) !== 0o1002) return;
  const me = process.getuid?.() ?? 0;
  if (lst.uid === me || lst.uid === dir.uid) return;
  throw new GenvaultError(`${abs} is a symlink owned by uid ${lst.uid} in the shared directory ${path.dirname(abs)}: refusing to follow it`, 'EPERM');
}

/**
 * Resolve a restore target and refuse anything but a regular file (or a new name in an
 * existing directory) and a block device. Nothing is opened or written here.
 */
export async function resolveTarget(target: string): Promise<RestoreTarget> {
  const abs = path.resolve(target);
  let lst: fsSync.Stats | null = null;
  try {
    lst = await fs.lstat(abs);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw describeFsError(e, abs);
  }
  let real: string;
  let st: fsSync.Stats | null;
  if (lst?.isSymbolicLink()) {
    await refusePlantedSymlink(abs, lst);
    try {
      real = await fs.realpath(abs);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') {
        const to = await fs.readlink(abs).catch(() => '?');
        throw new GenvaultError(`${abs} is a symlink to ${to}, which does not exist; nothing written`, 'ENOENT');
      }
      throw describeFsError(e, abs);
    }
    st = await fs.stat(real).catch((e) => {
      throw describeFsError(e, real);
    });
  } else {
    // Symlinked directories on the way (/home -> /data/home) are not worth a mention: the
    // temporary file and the rename go through them to the same place.
    real = abs;
    st = lst;
  }
  const via = real !== abs ? abs : undefined;
  const shown = showTarget({ path: real, via });
  if (!st) return { kind: 'file', path: real, via, exists: false, size: 0, rdev: 0 };
  if (st.isFile()) return { kind: 'file', path: real, via, exists: true, size: st.size, rdev: 0 };
  if (st.isBlockDevice()) return { kind: 'device', path: real, via, exists: true, size: 0, rdev: st.rdev };
  throw new GenvaultError(
    `${shown} is ${kindOf(st)}; restore writes only to a regular file or a block device (nothing written)`,
    st.isDirectory() ? 'EISDIR' : 'NOT_A_TARGET',
  );
}

/** major:minor of a device number, as /proc and /sys spell it (glibc's encoding). */
function majMin(rdev: number): string {
  const major = (Math.floor(rdev / 0x100) & 0xfff) | (Math.floor(rdev / 0x100000000) & ~0xfff);
  const minor = (rdev & 0xff) | (Math.floor(rdev / 0x1000) & ~0xff);
  return `${major >>> 0}:${minor >>> 0}`;
}

/** Undo the octal escapes (\040 for a space) of /proc/self/mountinfo and /proc/swaps. */
function unescapeProc(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}

async function readOrEmpty(file: string): Promise<string> {
  return fs.readFile(file, 'utf8').catch(() => '');
}

/**
 * Refuse a block device that is in use: mounted (it or one of its partitions), holding
 * LVM, md or device-mapper devices, or active swap. Not even --force overrides this.
 */
async function checkDeviceFree(t: RestoreTarget): Promise<void> {
  const shown = showTarget(t);
  const mm = majMin(t.rdev);
  // The device and its partitions, by major:minor, with the name to report.
  const devs = new Map<string, string>([[mm, t.path]]);
  const sys = `/sys/dev/block/${mm}`;
  for (const e of await fs.readdir(sys).catch(() => [] as string[])) {
    const d = (await readOrEmpty(path.join(sys, e, 'partition'))) && (await readOrEmpty(path.join(sys, e, 'dev'))).trim();
    if (d) devs.set(d, `/dev/${e}`);
  }
  const refuse = (why: string) =>
    new GenvaultError(`${shown} ${why}; refusing to overwrite it, even with --force`, 'IN_USE');
  const which = (d: string) => (d === mm ? '' : ` (partition ${devs.get(d)})`);
  const rdevOf = async (p: string) => {
    const st = await fs.stat(p).catch(() => null);
    return st?.isBlockDevice() ? majMin(st.rdev) : null;
  };
  for (const line of (await readOrEmpty('/proc/self/mountinfo')).split('\n')) {
    const f = line.split(' ');
    const sep = f.indexOf('-', 6);
    if (sep < 0) continue;
    let d = f[2]!;
    // btrfs and others report an anonymous device number: the source names the device.
    const source = unescapeProc(f[sep + 2] ?? '');
    if (!devs.has(d) && source.startsWith('/dev/')) d = (await rdevOf(source)) ?? d;
    if (devs.has(d)) throw refuse(`is mounted${which(d)} on ${unescapeProc(f[4]!)}`);
  }
  for (const [d, name] of devs) {
    const holders = await fs.readdir(`/sys/dev/block/${d}/holders`).catch(() => [] as string[]);
    if (holders.length) {
      const by = d === mm ? '' : ` (partition ${name})`;
      throw refuse(`is in use${by} by ${holders.join(', ')} (LVM, md or device-mapper)`);
    }
  }
  for (const line of (await readOrEmpty('/proc/swaps')).split('\n').slice(1)) {
    const file = line.trim() && unescapeProc(line.split(/\s+/)[0]!);
    if (!file) continue;
    const d = await rdevOf(file);
    if (d && devs.has(d)) throw refuse(`is active swap${which(d)}`);
  }
}

/**
 * What a signal has to undo: the temporary files of restores under way (removed) and the
 * devices being written (reported). Kept here, filled and emptied synchronously around
 * each open and rename, so that a signal handler sees exactly the names that exist.
 */
const underWay = new Map<string, { target: string; partial: boolean }>();

/**
 * Remove the temporary files of every restore under way, synchronously (for a signal
 * handler that exits next). Returns one note per restore for the user.
 */
export function abandonRestores(): string[] {
  const notes: string[] = [];
  for (const [name, { target, partial }] of underWay) {
    if (!partial) {
      notes.push(`${target} is partly written`);
      continue;
    }
    try {
      fsSync.unlinkSync(name);
      notes.push(`${target} not written (partial file removed)`);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') notes.push(`could not remove the partial file ${name}: ${(e as Error).message}`);
    }
  }
  underWay.clear();
  return notes;
}

export async function restoreToPath(
  repo: Repository,
  gen: Generation,
  target: string,
  opts: RestoreOptions = {},
): Promise<RestoreResult> {
  return restoreToPathWith(gen, target, opts, (fd, writeZeros) => restoreToFd(repo, gen, fd, writeZeros, opts));
}

/**
 * Writes an image into an open descriptor at its offsets (zeros too with `writeZeros`, for
 * devices; else they stay holes); returns the damaged ranges. The repository's restoreToFd,
 * or a remote repository's reads (src/remote).
 */
export type Filler = (fd: number, writeZeros: boolean) => Promise<Array<{ offset: number; length: number }>>;

/** restoreToPath with the bytes from `fill`: the target's checks, temporary name and rename are the same. */
export async function restoreToPathWith(
  gen: Pick<Generation, 'size'>,
  target: string,
  opts: RestoreOptions,
  fill: Filler,
): Promise<RestoreResult> {
  const t = await resolveTarget(target);
  const shown = showTarget(t);
  if (t.kind === 'device') {
    await checkDeviceFree(t);
    if (!opts.force) throw new GenvaultError(`${shown} is a block device; use --force to overwrite it`, 'EXISTS');
    opts.onTarget?.(t);
    return restoreToDevice(gen, t, fill);
  }
  if (t.exists && t.size > 0 && !opts.force) {
    throw new GenvaultError(`${shown} exists and is not empty; use --force to overwrite it`, 'EXISTS');
  }
  opts.onTarget?.(t);
  const final = t.path;
  const tmp = path.join(path.dirname(final), `.${path.basename(final)}.genvault-partial-${randomBytes(4).toString('hex')}`);
  // Opened and renamed synchronously, registered in between: a signal handler running at
  // any point removes exactly the file that exists (see abandonRestores).
  let fd: number;
  try {
    underWay.set(tmp, { target: shown, partial: true });
    const { O_WRONLY, O_CREAT, O_EXCL, O_NOFOLLOW } = fsSync.constants;
    fd = fsSync.openSync(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0o600);
  } catch (e) {
    underWay.delete(tmp);
    throw describeFsError(e, `cannot create ${shown}`);
  }
  let open = true;
  try {
    await ftruncate(fd, gen.size);
    const damaged = await fill(fd, false);
    await fdatasync(fd);
    open = false;
    await close(fd);
    // Whatever took the target's name meanwhile must still be a regular file to be replaced.
    const now = fsSync.lstatSync(final, { throwIfNoEntry: false });
    if (now && !now.isFile()) throw new GenvaultError(`${shown} changed while restoring and is ${kindOf(now)} now; nothing written`, 'CHANGED');
    fsSync.renameSync(tmp, final);
    underWay.delete(tmp);
    return { bytes: gen.size, target: final, via: t.via, damaged, sparse: true };
  } catch (e) {
    if (open) await close(fd).catch(() => undefined);
    fsSync.rmSync(tmp, { force: true });
    underWay.delete(tmp);
    throw describeFsError(e, `writing ${shown}`);
  }
}

async function restoreToDevice(gen: Pick<Generation, 'size'>, t: RestoreTarget, fill: Filler): Promise<RestoreResult> {
  const shown = showTarget(t);
  // O_EXCL on a block device: the kernel refuses it while anything holds the device
  // (a mount, swap, md, device-mapper, another exclusive opener, in any namespace), and
  // holds it off them while we write.
  const fh = await fs.open(t.path, fsSync.constants.O_RDWR | fsSync.constants.O_EXCL).catch((e) => {
    if ((e as NodeJS.ErrnoException).code === 'EBUSY') {
      throw new GenvaultError(`${shown} is in use (the kernel refuses exclusive access); refusing to overwrite it, even with --force`, 'IN_USE');
    }
    throw describeFsError(e, `cannot open ${shown}`);
  });
  try {
    const st = await fh.stat();
    if (!st.isBlockDevice() || st.rdev !== t.rdev) throw new GenvaultError(`${shown} changed while it was checked; nothing written`, 'CHANGED');
    const size = await blockDeviceSizeOf(t.path);
    if (size !== null && size < gen.size) {
      throw new GenvaultError(`${shown} holds ${size} bytes, the image needs ${gen.size}`, 'TOO_SMALL');
    }
    underWay.set(t.path, { target: shown, partial: false });
    // Devices may hold old data: zero chunks must be written as zeros.
    const damaged = await fill(fh.fd, true);
    await fh.sync();
    return { bytes: gen.size, target: t.path, via: t.via, damaged, sparse: false };
  } finally {
    underWay.delete(t.path);
    await fh.close().catch(() => undefined);
  }
}

/** A sink for a raw byte stream: data as it is, zero chunks as zeros, through `write`. */
export function rawSink(write: (b: Buffer) => Promise<void>): Sink {
  return {
    async write(_offset, length, data) {
      if (data) return write(data);
      for (let left = length; left > 0; left -= ZERO.length) await write(ZERO.subarray(0, Math.min(left, ZERO.length)));
    },
  };
}

/** Stream the raw image (zeros included) to a writable, honouring backpressure. */
export async function restoreToStream(repo: Repository, gen: Generation, out: Writable, opts: RestoreOptions = {}): Promise<RestoreResult> {
  const damaged = await streamChunks(repo, gen, rawSink(writerOf(out)), opts);
  return { bytes: gen.size, target: 'stdout', damaged, sparse: false };
}

/** Writes to a stream, resolving once it takes more (backpressure) and rejecting on its error. */
export function writerOf(out: Writable): (b: Buffer) => Promise<void> {
  return (b: Buffer) =>
    new Promise<void>((resolve, reject) => {
      const onErr = (e: Error) => reject(e);
      out.once('error', onErr);
      const ok = out.write(b, (err) => {
        if (err) reject(err);
      });
      const done = () => {
        out.off('error', onErr);
        resolve();
      };
      if (ok) done();
      else out.once('drain', done);
    });
}

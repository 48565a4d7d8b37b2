/**
 * Restore a generation to a file (sparse: zero chunks are holes), a block device, or a
 * stream (cat). Chunks are loaded many at a time by the worker pool, ahead of the writer.
 * A file target is written under a temporary name and renamed only when complete, so a
 * failed restore leaves nothing that looks like a good image.
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import type { Writable } from 'node:stream';
import { DamageError, GenvaultError, describeFsError } from '../util/errors.js';
import { walkChunks } from './chunkmap.js';
import { markDamaged } from './db.js';
import { packPath, sameGroupRecord } from './pack.js';
import { Generation } from './generation.js';
import { ChunkLoader } from './reader.js';
import type { RestoreItem } from './worker.js';
import { Repository } from './repository.js';

export interface RestoreOptions {
  force?: boolean;
  /** Write zeros where chunks are damaged and report the ranges instead of failing. */
  ignoreDamage?: boolean;
  onProgress?: (done: number, total: number) => void;
}

export interface RestoreResult {
  bytes: number;
  target: string;
  damaged: Array<{ offset: number; length: number }>;
  sparse: boolean;
}

export type Sink = {
  /** Write data at offset (data may be null for a zero chunk). Called in offset order. */
  write(offset: number, length: number, data: Buffer | null): Promise<void>;
};

const ZERO = Buffer.alloc(1 << 20);

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
    const p = pool.run<{ damaged: number[] }>({ op: 'restoreMany', fd, items, direct: true }).then(
      async (r) => {
        for (const i of r.damaged) {
          // gc may have moved the chunk to another pack since we looked it up: retry there.
          const it = items[i]!;
          const fresh = await repo.location(Buffer.from(it.digest));
          if (fresh && (packPath(repo.dir, fresh.packId) !== it.file || fresh.offset !== it.offset)) {
            const again = await pool.run<{ damaged: number[] }>({
              op: 'restoreMany',
              fd,
              items: [{ ...loader.item(fresh, Buffer.from(it.digest)), at: it.at, zero: false }],
            });
            if (!again.damaged.length) continue;
          }
          damaged.push({ offset: it.at, length: it.rawLength });
          await markDamaged(repo.db, it.digest, 'restore');
        }
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

export async function restoreToPath(
  repo: Repository,
  gen: Generation,
  target: string,
  opts: RestoreOptions = {},
): Promise<RestoreResult> {
  const abs = path.resolve(target);
  let st: import('node:fs').Stats | null = null;
  try {
    st = await fs.stat(abs);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw describeFsError(e, abs);
  }
  if (st?.isBlockDevice()) return restoreToDevice(repo, gen, abs, opts);
  if (st?.isDirectory()) throw new GenvaultError(`${abs}: is a directory`, 'EISDIR');
  if (st && st.size > 0 && !opts.force) {
    throw new GenvaultError(`${abs} exists and is not empty; use --force to overwrite it`, 'EXISTS');
  }
  const tmp = path.join(path.dirname(abs), `.${path.basename(abs)}.genvault-partial-${randomBytes(4).toString('hex')}`);
  let fh: fs.FileHandle;
  try {
    fh = await fs.open(tmp, 'wx', 0o600);
  } catch (e) {
    throw describeFsError(e, `cannot create ${abs}`);
  }
  try {
    await fh.truncate(gen.size);
    const damaged = await restoreToFd(repo, gen, fh.fd, false, opts);
    await fh.datasync();
    await fh.close();
    await fs.rename(tmp, abs);
    return { bytes: gen.size, target: abs, damaged, sparse: true };
  } catch (e) {
    await fh.close().catch(() => undefined);
    await fs.rm(tmp, { force: true });
    throw describeFsError(e, `writing ${abs}`);
  }
}

async function restoreToDevice(repo: Repository, gen: Generation, dev: string, opts: RestoreOptions): Promise<RestoreResult> {
  const fh = await fs.open(dev, 'r+').catch((e) => {
    throw describeFsError(e, `cannot open ${dev}`);
  });
  try {
    const { blockDeviceSizeOf } = await import('../source/local.js');
    const size = await blockDeviceSizeOf(dev);
    if (size !== null && size < gen.size) {
      throw new GenvaultError(`${dev} holds ${size} bytes, the image needs ${gen.size}`, 'TOO_SMALL');
    }
    // Devices may hold old data: zero chunks must be written as zeros.
    const damaged = await restoreToFd(repo, gen, fh.fd, true, opts);
    await fh.sync();
    return { bytes: gen.size, target: dev, damaged, sparse: false };
  } finally {
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
  const write = (b: Buffer) =>
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
  const damaged = await streamChunks(repo, gen, rawSink(write), opts);
  return { bytes: gen.size, target: 'stdout', damaged, sparse: false };
}

/**
 * Reading generations of a remote repository: whole images (restore, cat) as a pipeline
 * of READ requests kept several deep (the round trip hidden behind the transfer), zero
 * runs crossing as one byte each. The server checks every chunk against its digest as a
 * local restore does; a damaged chunk is an ERROR naming it.
 */
import fsSync from 'node:fs';
import { promisify } from 'node:util';
import type { Generation } from '../format/generation.js';
import type { RemoteRepository } from './client.js';
import { MAX_READ } from './protocol.js';

const pwrite = promisify(fsSync.write);

/** Requests in flight while streaming a whole image: 8 x 4 MiB. */
const DEPTH = 8;

/**
 * Every block of the generation, in order: `each(offset, data)` with data null for a run
 * of zeros. Reads run DEPTH ahead of `each`.
 */
export async function streamRemote(
  remote: RemoteRepository,
  gen: Generation,
  each: (offset: number, length: number, data: Buffer | null) => Promise<void>,
  onProgress?: (done: number, total: number) => void,
): Promise<void> {
  await remote.openGeneration(gen.id);
  try {
    const q: Array<{ offset: number; length: number; data: Promise<Buffer | null> }> = [];
    let next = 0;
    const fillQueue = () => {
      while (q.length < DEPTH && next < gen.size) {
        const length = Math.min(MAX_READ, gen.size - next);
        const data = remote.read(gen.id, next, length);
        data.catch(() => undefined);
        q.push({ offset: next, length, data });
        next += length;
      }
    };
    fillQueue();
    while (q.length) {
      const r = q.shift()!;
      const data = await r.data;
      fillQueue();
      await each(r.offset, r.length, data);
      onProgress?.(r.offset + r.length, gen.size);
    }
  } finally {
    if (!remote.lost) await remote.closeGeneration(gen.id).catch(() => undefined);
  }
}

const ZERO = Buffer.alloc(MAX_READ);

/** A Filler (read/restore.ts) for a remote generation: data written at its offset, zeros only to devices. */
export function remoteFiller(remote: RemoteRepository, gen: Generation, onProgress?: (done: number, total: number) => void) {
  return async (fd: number, writeZeros: boolean): Promise<Array<{ offset: number; length: number }>> => {
    await streamRemote(
      remote,
      gen,
      async (offset, length, data) => {
        const b = data ?? (writeZeros ? ZERO.subarray(0, length) : null);
        if (!b) return;
        for (let at = 0; at < b.length; ) at += (await pwrite(fd, b, at, b.length - at, offset + at)).bytesWritten;
      },
      onProgress,
    );
    return [];
  };
}

/** Local sources: an image file, a block device, or standard input. */
import fs from 'node:fs/promises';
import path from 'node:path';
import { describeFsError, GenvaultError } from '../util/errors.js';
import type { Source } from './types.js';
import { HoleSeeker, holeSeeker } from '../util/holes.js';

/** Size of a block device from sysfs (stat reports 0 for devices). */
async function blockDeviceSize(rdev: number): Promise<number | null> {
  const major = Math.floor(rdev / 256) & 0xfff;
  const minor = (rdev & 0xff) | ((rdev >> 12) & 0xfff00);
  try {
    const sectors = await fs.readFile(`/sys/dev/block/${major}:${minor}/size`, 'utf8');
    return Number(sectors.trim()) * 512;
  } catch {
    return null;
  }
}

/** Size of a block device given its path, or null if unknown. */
export async function blockDeviceSizeOf(dev: string): Promise<number | null> {
  const st = await fs.stat(dev);
  return st.isBlockDevice() ? blockDeviceSize(st.rdev) : null;
}

const ZEROS = Buffer.alloc(1 << 20);

/** buf[from, to) = 0. Copies from a zero buffer: fill() on shared memory goes element by element (8x slower). */
function zeroFill(buf: Buffer, from: number, to: number): void {
  for (let at = from; at < to; at += ZEROS.length) ZEROS.copy(buf, at, 0, Math.min(ZEROS.length, to - at));
}

class FileSource implements Source {
  private pos = 0;
  constructor(
    readonly description: string,
    readonly size: number | null,
    private fh: fs.FileHandle,
    private what: string,
    /** Set for sparse regular files: holes are skipped, not read. */
    private holes: HoleSeeker | null = null,
  ) {}

  /** Sequential read from the current position (holes of sparse files come back as zeros). */
  async read(buf: Buffer, length: number): Promise<number> {
    let n: number;
    if (this.size === null) n = await this.readAll(buf, 0, null, length);
    else {
      const len = Math.max(0, Math.min(length, this.size - this.pos));
      n = this.holes ? await this.readSparse(buf, this.pos, len, this.seek('data', this.pos)) : await this.readAll(buf, 0, this.pos, len);
    }
    this.pos += n;
    return n;
  }

  /**
   * Positional read of [position, position + length) clipped to the size; independent of
   * read() and of other readAt calls, so several may run at once (a backup keeps one per
   * segment in flight, and the page-cache copies then run on several cores). When that
   * range is all hole in a sparse file, returns `hole: true` without touching buf.
   */
  async readAt(buf: Buffer, position: number, length: number): Promise<{ length: number; hole: boolean }> {
    if (this.size === null) throw new Error('readAt on a stream');
    const len = Math.max(0, Math.min(length, this.size - position));
    if (len === 0) return { length: 0, hole: false };
    if (!this.holes) return { length: await this.readAll(buf, 0, position, len), hole: false };
    const data = this.seek('data', position);
    if (data === Infinity) {
      // No data from here on: holes up to the end, or the file shrank since it was opened
      // (its tail is gone, not zero; the caller must see a short read).
      const now = (await this.fh.stat()).size;
      if (now < position + len) return { length: Math.max(0, now - position), hole: false };
    }
    if (data !== null && data >= position + len) return { length: len, hole: true };
    return { length: await this.readSparse(buf, position, len, data), hole: false };
  }

  /**
   * The next offset at or after `off` where data (Infinity: none follows) or a hole (the
   * file end counts as one) starts; null when the file system cannot seek holes, and from
   * then on holes are read like data.
   */
  private seek(what: 'data' | 'hole', off: number): number | null {
    if (!this.holes) return null;
    try {
      if (what === 'hole') return this.holes.seekHole(this.fh.fd, off);
      const d = this.holes.seekData(this.fh.fd, off);
      return d < 0 ? Infinity : d;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EINVAL') throw e;
      this.holes = null;
      return null;
    }
  }

  /**
   * Fill buf[0, length) with the file's bytes at [start, start + length), reading only its
   * data extents; holes become zeros in the buffer without a read (a hole read through
   * the page cache costs a zero-filled page per 4 KiB and a copy). Extents are asked for
   * afresh on every call (every segment), so data written into a hole shortly before we
   * reach it is read.
   * @param firstData seek('data', start), which the caller already asked
   */
  private async readSparse(buf: Buffer, start: number, length: number, firstData: number | null): Promise<number> {
    const end = start + length;
    let nextData = firstData; // start of the next data at or after off; null: read the rest as data
    let off = start;
    while (off < end) {
      if (nextData !== null && nextData < off) nextData = this.seek('data', off);
      if (nextData === null) {
        off += await this.readAll(buf, off - start, off, end - off);
        break;
      }
      if (nextData > off) {
        const to = Math.min(nextData, end);
        zeroFill(buf, off - start, to - start);
        off = to;
        continue;
      }
      let hole = Math.min(this.seek('hole', off) ?? end, end);
      // Data here, yet a hole here too: the file changed between the two seeks. Read a
      // block as data, which is always correct, and ask again after it.
      if (hole <= off) hole = Math.min(off + 4096, end);
      const want = hole - off;
      const got = await this.readAll(buf, off - start, off, want);
      off += got;
      if (got < want) break; // the file shrank while we read it
    }
    return off - start;
  }

  /**
   * Read up to `length` bytes at `position` (null: a stream's current position) into
   * buf[at...]; fewer only at the end of the file.
   */
  private async readAll(buf: Buffer, at: number, position: number | null, length: number): Promise<number> {
    let got = 0;
    while (got < length) {
      let n: number;
      const where = position === null ? null : position + got;
      try {
        ({ bytesRead: n } = await this.fh.read(buf, at + got, length - got, where));
      } catch (e) {
        throw describeFsError(e, `reading ${this.what} at offset ${where ?? this.pos + got}`);
      }
      if (n === 0) break;
      got += n;
    }
    return got;
  }

  async close(): Promise<void> {
    await this.fh.close();
  }
}

export async function openLocalSource(spec: string): Promise<Source> {
  if (spec === '-') return openStdinSource();
  const abs = path.resolve(spec);
  let fh: fs.FileHandle;
  try {
    fh = await fs.open(abs, 'r');
  } catch (e) {
    throw describeFsError(e, `cannot read source ${abs}`);
  }
  const st = await fh.stat();
  if (st.isDirectory()) {
    await fh.close();
    throw new GenvaultError(`cannot read source ${abs}: is a directory`, 'EISDIR');
  }
  if (st.isBlockDevice()) {
    return new FileSource(`device:${abs}`, await blockDeviceSize(st.rdev), fh, abs);
  }
  if (st.isFile()) {
    // Fewer blocks allocated than the size needs: a sparse file, whose holes are skipped.
    const sparse = st.blocks * 512 < st.size;
    return new FileSource(`file:${abs}`, st.size, fh, abs, sparse ? holeSeeker() : null);
  }
  // A pipe or character device: read to the end, size unknown.
  return new FileSource(`stream:${abs}`, null, fh, abs);
}

/** stdin as a stream; works for pipes and redirected files alike. */
export function openStdinSource(): Source {
  const stream = process.stdin;
  let ended = false;
  let error: Error | null = null;
  let pending: Buffer[] = [];
  let pendingBytes = 0;
  let waiter: (() => void) | null = null;
  const wake = () => {
    const w = waiter;
    waiter = null;
    w?.();
  };
  stream.on('data', (d: Buffer) => {
    pending.push(d);
    pendingBytes += d.length;
    if (pendingBytes > 32 << 20) stream.pause();
    wake();
  });
  stream.on('end', () => {
    ended = true;
    wake();
  });
  stream.on('error', (e) => {
    error = e;
    wake();
  });
  return {
    description: 'stdin',
    size: null,
    async read(buf: Buffer, length: number): Promise<number> {
      let got = 0;
      while (got < length) {
        if (error) throw describeFsError(error, 'reading standard input');
        if (pending.length) {
          const d = pending[0]!;
          const n = Math.min(d.length, length - got);
          d.copy(buf, got, 0, n);
          got += n;
          pendingBytes -= n;
          if (n === d.length) pending.shift();
          else pending[0] = d.subarray(n);
          continue;
        }
        if (ended) break;
        stream.resume();
        await new Promise<void>((r) => (waiter = r));
      }
      return got;
    },
    async close() {
      pending = [];
      stream.pause();
      stream.destroy();
    },
  };
}

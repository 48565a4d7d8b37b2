/** Local sources: an image file, a block device, or standard input. */
import fs from 'node:fs/promises';
import path from 'node:path';
import { describeFsError, GenvaultError, UsageError } from '../util/errors.js';
import type { DirectRead, Source } from '../backup/source.js';
import { HoleSeeker, holeSeeker } from '../util/holes.js';
import { blockDeviceSize } from '../util/blockdev.js';

/** Extents cut to the first `length` bytes. */
function clip(extents: Array<[number, number]>, length: number): Array<[number, number]> {
  return extents.filter(([from]) => from < length).map(([from, to]) => [from, Math.min(to, length)]);
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

  /** Sequential read from the current position. */
  async read(buf: Buffer, length: number): Promise<number> {
    const len = this.size === null ? length : Math.max(0, Math.min(length, this.size - this.pos));
    const n = await this.readAll(buf, 0, this.size === null ? null : this.pos, len);
    this.pos += n;
    return n;
  }

  /**
   * Where the data of [position, position + length) lies, for a worker thread that reads
   * it itself. In a sparse file the holes are found with SEEK_DATA/SEEK_HOLE and are not
   * read at all (a hole read through the page cache costs a zero-filled page per 4 KiB
   * and a copy). Extents are asked for afresh for every range, so data written into a
   * hole shortly before the backup reaches it is read.
   */
  async directRead(position: number, length: number): Promise<DirectRead> {
    try {
      return await this.planRead(position, length);
    } catch (e) {
      throw describeFsError(e, `reading ${this.what} at offset ${position}`);
    }
  }

  private async planRead(position: number, length: number): Promise<DirectRead> {
    if (this.size === null) throw new Error('directRead on a stream');
    const len = Math.max(0, Math.min(length, this.size - position));
    const plan: DirectRead = { fd: this.fh.fd, length: len, extents: null, what: this.what };
    if (!this.holes || len === 0) return plan;
    const end = position + len;
    const extents: Array<[number, number]> = [];
    let off = position;
    while (off < end) {
      const data = this.seek('data', off);
      if (data === null) {
        // The file system stopped answering hole seeks: read the rest as data.
        extents.push([off - position, len]);
        break;
      }
      if (data === Infinity) {
        // No data from here on: holes up to the end, or the file shrank since it was
        // opened (its tail is gone, not zero; the caller must see a short range).
        const now = (await this.fh.stat()).size;
        if (now < end) {
          plan.length = Math.max(0, now - position);
          return { ...plan, extents: clip(extents, plan.length) };
        }
        break;
      }
      if (data >= end) break;
      let hole = this.seek('hole', data) ?? end;
      // Data here, yet a hole here too: the file changed between the two seeks. Read a
      // block as data, which is always correct, and ask again after it.
      if (hole <= data) hole = data + 4096;
      hole = Math.min(hole, end);
      extents.push([data - position, hole - position]);
      off = hole;
    }
    plan.extents = extents;
    return plan;
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

export interface LocalSourceOptions {
  /** The bound the caller enforces (--max-size); a character device is refused without one. */
  maxSize?: number;
}

export async function openLocalSource(spec: string, opts: LocalSourceOptions = {}): Promise<Source> {
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
  // A character device (/dev/zero, /dev/urandom) may never end: only with a bound.
  if (st.isCharacterDevice() && opts.maxSize === undefined) {
    await fh.close();
    throw new UsageError(`${abs}: a character device has no size; give --max-size`);
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

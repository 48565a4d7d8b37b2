/** Local sources: an image file, a block device, or standard input. */
import fs from 'node:fs/promises';
import path from 'node:path';
import { describeFsError, GenvaultError } from '../util/errors.js';
import type { Source } from './types.js';

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

class FileSource implements Source {
  private pos = 0;
  constructor(
    readonly description: string,
    readonly size: number | null,
    private fh: fs.FileHandle,
    private what: string,
  ) {}

  async read(buf: Buffer, length: number): Promise<number> {
    let got = 0;
    while (got < length) {
      let n: number;
      try {
        ({ bytesRead: n } = await this.fh.read(buf, got, length - got, this.pos));
      } catch (e) {
        throw describeFsError(e, `reading ${this.what} at offset ${this.pos}`);
      }
      if (n === 0) break;
      got += n;
      this.pos += n;
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
  if (st.isFile()) return new FileSource(`file:${abs}`, st.size, fh, abs);
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

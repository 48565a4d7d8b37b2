/**
 * Fixed-size records spilled to disk in buckets, for passes that must not hold an object
 * per chunk in memory: verify sorts the chunk references of every map into buckets (by
 * digest, then by pack) and works through one bucket at a time. Appends are buffered per
 * bucket and written by `drain()`, which the caller awaits between batches, so the bytes
 * held at once stay bounded by the buffers plus one batch.
 *
 * Spill files are the process's own (a fresh private directory named after its pid, removed
 * by `close()`): nothing in them is read back except what this process wrote. A process
 * killed before `close()` leaves its directory; the next spill of the same kind removes it.
 */
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

/** All bucket buffers together stay under this. */
const BUFFERS_BYTES = 32 << 20;
const MAX_BUFFER = 64 << 10;

/**
 * Where passes spill: $TMPDIR when set, else /var/tmp (a disk: /tmp is memory on many
 * systems, and a spill of tens of millions of chunks takes gigabytes), else the OS default.
 */
export async function spillParent(): Promise<string> {
  if (process.env.TMPDIR) return process.env.TMPDIR;
  const ok = await fs.access('/var/tmp', fs.constants.W_OK).then(
    () => true,
    () => false,
  );
  return ok ? '/var/tmp' : os.tmpdir();
}

export class Spill {
  private bufs: Array<Buffer | null>;
  private fill: Int32Array;
  private full: Array<{ bucket: number; buf: Buffer }> = [];
  private readonly bufSize: number;
  /** Records appended per bucket. */
  readonly counts: Float64Array;
  /** Bytes in full buffers not yet written. */
  pendingBytes = 0;

  private constructor(
    readonly dir: string,
    readonly buckets: number,
    readonly recordSize: number,
  ) {
    this.bufs = new Array<Buffer | null>(buckets).fill(null);
    this.fill = new Int32Array(buckets);
    this.counts = new Float64Array(buckets);
    const per = Math.min(MAX_BUFFER, Math.floor(BUFFERS_BYTES / buckets));
    this.bufSize = Math.max(1, Math.floor(per / recordSize)) * recordSize;
  }

  /** A spill of `buckets` buckets of `recordSize`-byte records, in a new directory named after `prefix`. */
  static async create(prefix: string, buckets: number, recordSize: number): Promise<Spill> {
    const parent = await spillParent();
    await removeStale(parent, prefix);
    const dir = await fs.mkdtemp(path.join(parent, `${prefix}-${process.pid}-`));
    return new Spill(dir, buckets, recordSize);
  }

  /** Append `rec` (the first recordSize bytes) to bucket b. */
  append(b: number, rec: Buffer): void {
    let buf = this.bufs[b];
    if (!buf) buf = this.bufs[b] = Buffer.allocUnsafe(this.bufSize);
    rec.copy(buf, this.fill[b]!, 0, this.recordSize);
    this.fill[b]! += this.recordSize;
    this.counts[b]!++;
    if (this.fill[b] === this.bufSize) {
      this.full.push({ bucket: b, buf });
      this.pendingBytes += buf.length;
      this.bufs[b] = null;
      this.fill[b] = 0;
    }
  }

  /** Write the full buffers. */
  async drain(): Promise<void> {
    const full = this.full;
    this.full = [];
    this.pendingBytes = 0;
    for (const { bucket, buf } of full) await fs.appendFile(this.file(bucket), buf);
  }

  /** Write everything appended: after this, `read` sees every record. */
  async finish(): Promise<void> {
    for (let b = 0; b < this.buckets; b++) {
      if (this.fill[b]) this.full.push({ bucket: b, buf: this.bufs[b]!.subarray(0, this.fill[b]) });
      this.bufs[b] = null;
      this.fill[b] = 0;
    }
    await this.drain();
  }

  /** Bucket b's records, in the order appended; its file is removed (each bucket is read once). */
  async read(b: number): Promise<Buffer> {
    if (!this.counts[b]) return Buffer.alloc(0);
    const f = this.file(b);
    const data = await fs.readFile(f);
    await fs.rm(f, { force: true });
    if (data.length !== this.counts[b]! * this.recordSize) throw new Error(`spill bucket ${b} has ${data.length} bytes, not ${this.counts[b]! * this.recordSize}`);
    return data;
  }

  async close(): Promise<void> {
    this.bufs.fill(null);
    this.full = [];
    await fs.rm(this.dir, { recursive: true, force: true });
  }

  private file(b: number): string {
    return path.join(this.dir, String(b));
  }
}

/** Spill directories of this kind whose process is gone (killed before it could remove them). */
async function removeStale(parent: string, prefix: string): Promise<void> {
  const names = await fs.readdir(parent).catch(() => [] as string[]);
  for (const name of names) {
    const m = name.startsWith(`${prefix}-`) ? /^(\d+)-/.exec(name.slice(prefix.length + 1)) : null;
    if (!m || alive(Number(m[1]))) continue;
    await fs.rm(path.join(parent, name), { recursive: true, force: true }).catch(() => undefined);
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM'; // someone else's: leave it
  }
}

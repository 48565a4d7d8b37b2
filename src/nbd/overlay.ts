/**
 * The copy-on-write overlay of a writable NBD export: one file beside the repository
 * (REPO/overlays/ by default) that holds every block a client wrote, so the generation
 * itself is never touched. `genvault backup OVERLAY --from-nbd-overlay` reads the
 * generation through it (source.ts) and stores the result as a new generation.
 *
 *   0       4 KiB header: "GVNBDOV1", then JSON {version, name, generation, size, block}
 *   4096    the block map, 2 bits per 4 KiB block (0: the generation's bytes, 1: written
 *           here, 2: zeros), padded to 4 KiB
 *   data    block i at data + i * 4096; a sparse file, only written blocks take space
 *
 * Writes that cover part of a block read the block first (read-modify-write) under the
 * overlay's write lock; data is written before the map marks the block, so a crash
 * leaves a block either as it was or as written. TRIM and WRITE_ZEROES of whole blocks
 * only change the map. FLUSH (and FUA) fdatasync the file.
 */
import { constants as C } from 'node:fs';
import fs from 'node:fs/promises';
import type { FileHandle } from 'node:fs/promises';
import { GenvaultError } from '../util/errors.js';
import { currentOwner, ownerAlive, type Owner } from '../util/proc.js';

const MAGIC = 'GVNBDOV1';
const HEADER = 4096;
export const OVERLAY_BLOCK = 4096;
const S_BASE = 0;
const S_DATA = 1;
const S_ZERO = 2;

export interface OverlayHeader {
  version: 1;
  name: string;
  generation: string;
  size: number;
  block: number;
  created: string;
}

/** Reads the base image (the generation) into out[0, length) from `offset`. */
export type BaseRead = (out: Buffer, offset: number, length: number) => Promise<void>;
export type BaseExtents = (offset: number, length: number, maxRuns: number) => Promise<Array<{ length: number; zero: boolean }>>;

function mapBytesFor(size: number): number {
  const blocks = Math.ceil(size / OVERLAY_BLOCK);
  return Math.ceil(Math.ceil(blocks / 4) / 4096) * 4096;
}

export class Overlay {
  private chain: Promise<unknown> = Promise.resolve();
  private readonly dataStart: number;
  private readonly blocks: number;

  private constructor(
    readonly file: string,
    readonly header: OverlayHeader,
    private fh: FileHandle,
    private map: Buffer,
  ) {
    this.dataStart = HEADER + map.length;
    this.blocks = Math.ceil(header.size / OVERLAY_BLOCK);
  }

  get size(): number {
    return this.header.size;
  }

  /** A new, empty overlay of generation `gen` (fails if the file exists). */
  static async create(file: string, h: Omit<OverlayHeader, 'version' | 'block' | 'created'>): Promise<Overlay> {
    const header: OverlayHeader = { version: 1, ...h, block: OVERLAY_BLOCK, created: new Date().toISOString() };
    const fh = await fs.open(file, C.O_RDWR | C.O_CREAT | C.O_EXCL | C.O_NOFOLLOW, 0o600);
    try {
      const head = Buffer.alloc(HEADER);
      head.write(MAGIC, 0, 'latin1');
      head.write(JSON.stringify(header), 8, 'utf8');
      await fh.write(head, 0, HEADER, 0);
      const map = Buffer.alloc(mapBytesFor(header.size));
      await fh.truncate(HEADER + map.length + header.size);
      await fh.sync();
      return new Overlay(file, header, fh, map);
    } catch (e) {
      await fh.close();
      await fs.rm(file, { force: true });
      throw e;
    }
  }

  /** Read an overlay's header only. */
  static async readHeader(file: string): Promise<OverlayHeader> {
    const fh = await fs.open(file, C.O_RDONLY | C.O_NOFOLLOW);
    try {
      return await Overlay.header(fh, file);
    } finally {
      await fh.close();
    }
  }

  private static async header(fh: FileHandle, file: string): Promise<OverlayHeader> {
    const head = Buffer.alloc(HEADER);
    const { bytesRead } = await fh.read(head, 0, HEADER, 0);
    const bad = () => new GenvaultError(`${file}: not a genvault NBD overlay`, 'BAD_OVERLAY');
    if (bytesRead < HEADER || head.toString('latin1', 0, 8) !== MAGIC) throw bad();
    let h: OverlayHeader;
    try {
      h = JSON.parse(head.toString('utf8', 8, head.indexOf(0, 8) < 0 ? HEADER : head.indexOf(0, 8))) as OverlayHeader;
    } catch {
      throw bad();
    }
    if (h.version !== 1 || h.block !== OVERLAY_BLOCK || !Number.isSafeInteger(h.size) || h.size < 0 || typeof h.name !== 'string' || !/^[0-9a-f]{16}$/.test(h.generation)) throw bad();
    const st = await fh.stat();
    if (st.size < HEADER + mapBytesFor(h.size) + h.size) throw new GenvaultError(`${file}: overlay is truncated`, 'BAD_OVERLAY');
    return h;
  }

  /** Open an existing overlay (read-write, or read-only for a backup of it). */
  static async open(file: string, writable: boolean): Promise<Overlay> {
    const fh = await fs.open(file, (writable ? C.O_RDWR : C.O_RDONLY) | C.O_NOFOLLOW);
    try {
      const h = await Overlay.header(fh, file);
      const map = Buffer.alloc(mapBytesFor(h.size));
      await fh.read(map, 0, map.length, HEADER);
      return new Overlay(file, h, fh, map);
    } catch (e) {
      await fh.close();
      throw e;
    }
  }

  async close(): Promise<void> {
    await this.chain.catch(() => undefined);
    await this.fh.close();
  }

  private state(i: number): number {
    return (this.map[i >> 2]! >> ((i & 3) * 2)) & 3;
  }

  private setState(i: number, s: number): void {
    const sh = (i & 3) * 2;
    this.map[i >> 2] = (this.map[i >> 2]! & ~(3 << sh)) | (s << sh);
  }

  /** Runs of blocks in one state over [offset, end), clipped to the range: [from, to, state]. */
  private *runs(offset: number, end: number): Generator<[number, number, number]> {
    let pos = offset;
    while (pos < end) {
      const b = Math.floor(pos / OVERLAY_BLOCK);
      const s = this.state(b);
      let nb = b + 1;
      while (nb * OVERLAY_BLOCK < end && this.state(nb) === s) nb++;
      const to = Math.min(end, nb * OVERLAY_BLOCK);
      yield [pos, to, s];
      pos = to;
    }
  }

  /** The runs of [offset, end) the overlay changes (written or zeroed), in order. */
  changedRuns(offset: number, end: number): Array<{ from: number; to: number }> {
    const out: Array<{ from: number; to: number }> = [];
    for (const [from, to, st] of this.runs(offset, end)) {
      if (st === S_BASE) continue;
      const last = out[out.length - 1];
      if (last && last.to === from) last.to = to;
      else out.push({ from, to });
    }
    return out;
  }

  /** The image as the overlay shows it: written blocks from here, the rest from the base. */
  async read(out: Buffer, offset: number, length: number, base: BaseRead): Promise<void> {
    const waits: Array<Promise<unknown>> = [];
    for (const [from, to, s] of this.runs(offset, offset + length)) {
      const dst = out.subarray(from - offset, to - offset);
      if (s === S_ZERO) dst.fill(0);
      else if (s === S_DATA) waits.push(this.readData(dst, from));
      else waits.push(base(dst, from, to - from));
    }
    await Promise.all(waits);
  }

  private async readData(dst: Buffer, offset: number): Promise<void> {
    let got = 0;
    while (got < dst.length) {
      const { bytesRead } = await this.fh.read(dst, got, dst.length - got, this.dataStart + offset + got);
      if (bytesRead === 0) throw new GenvaultError(`${this.file}: overlay ends early`, 'BAD_OVERLAY');
      got += bytesRead;
    }
  }

  async extents(offset: number, length: number, maxRuns: number, base: BaseExtents): Promise<Array<{ length: number; zero: boolean }>> {
    const out: Array<{ length: number; zero: boolean }> = [];
    const add = (n: number, zero: boolean) => {
      const last = out[out.length - 1];
      if (last && last.zero === zero) last.length += n;
      else out.push({ length: n, zero });
    };
    for (const [from, to, s] of this.runs(offset, offset + length)) {
      if (s === S_BASE) for (const x of await base(from, to - from, maxRuns)) add(x.length, x.zero);
      else add(to - from, s === S_ZERO);
      if (out.length >= maxRuns) break;
    }
    if (out.length > maxRuns) out.length = maxRuns;
    return out;
  }

  private locked<T>(fn: () => Promise<T>): Promise<T> {
    const p = this.chain.then(fn);
    this.chain = p.catch(() => undefined);
    return p;
  }

  /** Write `data` at `offset` (whole blocks; the parts of the first and last block it leaves are kept). */
  write(data: Buffer, offset: number, fua: boolean, base: BaseRead): Promise<void> {
    return this.locked(async () => {
      const first = Math.floor(offset / OVERLAY_BLOCK);
      const last = Math.floor((offset + data.length - 1) / OVERLAY_BLOCK);
      const start = first * OVERLAY_BLOCK;
      const end = Math.min(this.size, (last + 1) * OVERLAY_BLOCK);
      const buf = Buffer.allocUnsafe(end - start);
      // The first and last block as they read now, where the write leaves part of them.
      if (offset > start) await this.read(buf.subarray(0, OVERLAY_BLOCK), start, Math.min(OVERLAY_BLOCK, end - start), base);
      const tail = last * OVERLAY_BLOCK;
      if (offset + data.length < end && (last > first || offset === start)) await this.read(buf.subarray(tail - start), tail, end - tail, base);
      data.copy(buf, offset - start);
      await this.writeAll(buf, this.dataStart + start);
      for (let b = first; b <= last; b++) this.setState(b, S_DATA);
      await this.saveMap(first, last, fua);
    });
  }

  /** Zeros over [offset, offset + length): whole blocks in the map only, partial ones written. */
  zero(offset: number, length: number, fua: boolean, base: BaseRead): Promise<void> {
    if (length === 0) return Promise.resolve();
    const end = offset + length;
    const firstWhole = Math.ceil(offset / OVERLAY_BLOCK);
    const lastWhole = Math.floor(end / OVERLAY_BLOCK) - 1; // the image's last block is whole when it ends there
    const endWhole = end === this.size ? Math.ceil(end / OVERLAY_BLOCK) - 1 : lastWhole;
    const parts: Array<Promise<void>> = [];
    if (firstWhole > endWhole) return this.write(Buffer.alloc(length), offset, fua, base);
    if (offset < firstWhole * OVERLAY_BLOCK) parts.push(this.write(Buffer.alloc(firstWhole * OVERLAY_BLOCK - offset), offset, false, base));
    const wholeEnd = Math.min(end, (endWhole + 1) * OVERLAY_BLOCK);
    if (wholeEnd < end) parts.push(this.write(Buffer.alloc(end - wholeEnd), wholeEnd, false, base));
    parts.push(
      this.locked(async () => {
        for (let b = firstWhole; b <= endWhole; b++) this.setState(b, S_ZERO);
        await this.saveMap(firstWhole, endWhole, false);
      }),
    );
    return Promise.all(parts).then(() => (fua ? this.flush() : undefined));
  }

  async flush(): Promise<void> {
    await this.locked(() => this.fh.datasync());
  }

  private async writeAll(buf: Buffer, at: number): Promise<void> {
    let done = 0;
    while (done < buf.length) done += (await this.fh.write(buf, done, buf.length - done, at + done)).bytesWritten;
  }

  private async saveMap(first: number, last: number, sync: boolean): Promise<void> {
    const from = first >> 2;
    const to = (last >> 2) + 1;
    await this.writeAll(this.map.subarray(from, to), HEADER + from);
    if (sync) await this.fh.datasync();
  }

  /** How many blocks were written or zeroed (for messages). */
  changedBlocks(): number {
    let n = 0;
    for (let i = 0; i < this.blocks; i++) if (this.state(i) !== S_BASE) n++;
    return n;
  }
}

/**
 * The lock file of an overlay in use by a server (FILE.lock, the owner's pid): a second
 * server, or a backup of an overlay still being written to, is refused.
 */
export async function lockOverlay(file: string): Promise<() => Promise<void>> {
  const lock = `${file}.lock`;
  const owner = await currentOwner();
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      const fh = await fs.open(lock, C.O_WRONLY | C.O_CREAT | C.O_EXCL | C.O_NOFOLLOW, 0o600);
      await fh.writeFile(JSON.stringify(owner));
      await fh.close();
      return () => fs.rm(lock, { force: true });
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
      const holder = await overlayHolder(file);
      if (holder) throw new GenvaultError(`${file} is in use by process ${holder.pid}`, 'BUSY');
      await fs.rm(lock, { force: true });
    }
  }
  throw new GenvaultError(`${file}: cannot take its lock file`, 'BUSY');
}

/** The live process serving an overlay, or null. */
export async function overlayHolder(file: string): Promise<Owner | null> {
  const text = await fs.readFile(`${file}.lock`, 'utf8').catch(() => null);
  if (text === null) return null;
  try {
    const o = JSON.parse(text) as Owner;
    return (await ownerAlive(o)) ? o : null;
  } catch {
    return null;
  }
}

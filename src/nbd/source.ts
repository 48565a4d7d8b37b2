/**
 * Backup sources of the NBD kind (the backup pipeline reads them as streams, src/backup):
 *
 * - an NBD export (nbd://, nbd+unix://), optionally with a QEMU dirty bitmap: then only
 *   the extents the bitmap marks dirty are read over NBD; the previous generation's
 *   chunks that no dirty extent touches are reused by digest without being read
 *   (NbdDirtySource, a ChunkedSource), and the clean bytes around dirty extents come from
 *   the previous generation (src/read's reader, checked against their digests).
 *   Without a bitmap, or when it cannot be used (first backup, bitmap not exported, size
 *   changed), the whole disk is read, skipping what base:allocation reports as zeros.
 * - a writable export's overlay (overlay.ts) over its generation: the VM's writes kept.
 */
import { createHash } from 'node:crypto';
import { blake3 } from '@napi-rs/blake-hash';
import { GenvaultError } from '../util/errors.js';
import { chunkIndexAt } from '../format/chunkmap.js';
import { chunkSegment } from '../format/chunker.js';
import type { ChunkingParams } from '../format/config.js';
import type { ChunkedSegment, ChunkedSource, NeedFn, RemoteChunk } from '../backup/chunked-source.js';
import type { Generation } from '../format/generation.js';
import type { Source } from '../backup/source.js';
import { ChunkLoader, ImageReader } from '../read/reader.js';
import type { Repository } from '../repository/repository.js';
import { NbdClient, parseNbdUri } from './client.js';
import { BASE_ALLOCATION, DIRTY_BITMAP_PREFIX, STATE_ZERO } from './protocol.js';
import { Overlay, overlayHolder } from './overlay.js';

/** Largest single READ asked of the server (qemu-nbd and nbdkit accept 32 MiB). */
const READ_PIECE = 4 << 20;
/** Unit of --verify-hints' sample: a block of a clean extent is re-read over NBD whole or not at all. */
const VERIFY_BLOCK = 64 << 10;

export interface NbdReadStats {
  /** 'dirty-bitmap': only dirty extents were read; 'full': the whole disk (but its zero extents). */
  mode: 'dirty-bitmap' | 'full';
  /** Why a dirty bitmap that was asked for was not used. */
  fullReason: string | null;
  /** The generation unchanged extents were taken from. */
  parent: string | null;
  /** Bytes read over NBD. */
  nbdBytes: number;
  /** Bytes the bitmap marked dirty. */
  dirtyBytes: number;
  /** Bytes taken from the previous generation. */
  parentBytes: number;
  /** Bytes the server reported as zeros (base:allocation), not read. */
  zeroBytes: number;
  /** --verify-hints: bytes of clean extents read over NBD as well and compared with the previous generation. */
  verifiedBytes: number;
}

type Piece = { from: number; to: number; kind: 'nbd' | 'zero' | 'parent' };

export class NbdSource implements Source {
  protected pos = 0;
  protected readonly dirtyContext: string | null;

  protected constructor(
    readonly description: string,
    protected client: NbdClient,
    protected parent: ImageReader | null,
    readonly stats: NbdReadStats,
    protected bitmap: string | null,
    /** Share (0-1) of clean bytes re-read over NBD and compared (--verify-hints). */
    protected verify: number,
  ) {
    this.dirtyContext = bitmap && parent ? DIRTY_BITMAP_PREFIX + bitmap : null;
  }

  get size(): number {
    return this.client.size;
  }

  static async open(repo: Repository, uri: string, opts: { name: string; bitmap?: string; verifyPercent?: number }): Promise<NbdSource> {
    const addr = parseNbdUri(uri);
    const bitmap = opts.bitmap ?? null;
    const contexts = [BASE_ALLOCATION, ...(bitmap ? [DIRTY_BITMAP_PREFIX + bitmap] : [])];
    const client = await NbdClient.connect(addr, uri, contexts);
    try {
      const prev: Generation | null = (await repo.generations(opts.name)).at(-1) ?? null;
      let why: string | null = null;
      if (bitmap) {
        if (!client.contexts.has(DIRTY_BITMAP_PREFIX + bitmap)) why = `the server does not export the dirty bitmap ${bitmap}`;
        else if (!prev) why = `${opts.name} has no generation yet`;
        else if (prev.size !== client.size) why = `the disk is ${client.size} bytes, ${opts.name}@${prev.id} was ${prev.size}`;
      }
      const useBitmap = bitmap !== null && why === null;
      const parent = useBitmap ? await ImageReader.open(repo, prev!, new ChunkLoader(repo, 64 << 20), 32 << 20) : null;
      const stats: NbdReadStats = {
        mode: useBitmap ? 'dirty-bitmap' : 'full', fullReason: why, parent: useBitmap ? prev!.id : null,
        nbdBytes: 0, dirtyBytes: 0, parentBytes: 0, zeroBytes: 0, verifiedBytes: 0,
      };
      const description = `nbd:${uri}${bitmap ? ` bitmap ${bitmap}` : ''}`;
      const verify = (opts.verifyPercent ?? 0) / 100;
      if (useBitmap) return new NbdDirtySource(description, client, parent, stats, bitmap, verify, repo.config.chunking, repo.config.version);
      return new NbdSource(description, client, parent, stats, null, verify);
    } catch (e) {
      await client.close().catch(() => undefined);
      throw e;
    }
  }

  /** What to do with each part of [offset, offset + length): read over NBD, zeros, or the parent's bytes. */
  protected async plan(offset: number, length: number): Promise<Piece[]> {
    const ctx = this.dirtyContext ?? (this.client.contexts.has(BASE_ALLOCATION) ? BASE_ALLOCATION : null);
    if (!ctx) return [{ from: offset, to: offset + length, kind: 'nbd' }];
    const out: Piece[] = [];
    const end = offset + length;
    let pos = offset;
    while (pos < end) {
      for (const r of await this.client.blockStatus(ctx, pos, end - pos)) {
        let kind: Piece['kind'];
        if (this.dirtyContext) kind = r.flags & 1 ? 'nbd' : 'parent';
        else kind = r.flags & STATE_ZERO ? 'zero' : 'nbd';
        const last = out[out.length - 1];
        if (last && last.kind === kind && last.to === pos) last.to = pos + r.length;
        else out.push({ from: pos, to: pos + r.length, kind });
        pos += r.length;
      }
    }
    return out;
  }

  async read(buf: Buffer, length: number): Promise<number> {
    const n = Math.max(0, Math.min(length, this.size - this.pos));
    if (n === 0) return 0;
    await this.fill(buf.subarray(0, n), this.pos, await this.plan(this.pos, n));
    this.pos += n;
    return n;
  }

  /** Fill dst with the image's bytes from `at`, each piece (inside that range) from where the plan says. */
  protected async fill(dst0: Buffer, at: number, pieces: Piece[]): Promise<void> {
    const waits: Array<Promise<void>> = [];
    for (const p of pieces) {
      const dst = dst0.subarray(p.from - at, p.to - at);
      const len = p.to - p.from;
      if (p.kind === 'zero') {
        dst.fill(0);
        this.stats.zeroBytes += len;
      } else if (p.kind === 'parent') {
        this.stats.parentBytes += len;
        waits.push(this.fromParent(dst, p.from, len));
      } else {
        if (this.dirtyContext) this.stats.dirtyBytes += len;
        for (let o = 0; o < len; o += READ_PIECE) waits.push(this.fromServer(dst.subarray(o), p.from + o, Math.min(READ_PIECE, len - o)));
      }
    }
    await Promise.all(waits);
  }

  protected async fromServer(dst: Buffer, offset: number, length: number): Promise<void> {
    (await this.client.read(offset, length)).copy(dst);
    this.stats.nbdBytes += length;
  }

  protected async fromParent(dst: Buffer, offset: number, length: number): Promise<void> {
    const got = await this.parent!.read(dst, offset, length);
    if (got !== length) throw new GenvaultError(`previous generation ended at ${offset + got}`, 'SHORT_READ');
    if (this.verify > 0) await this.check(dst, offset, length);
  }

  /**
   * --verify-hints: a random sample of the clean blocks is read over NBD too and must equal
   * the previous generation's bytes. A difference means the bitmap missed a write: the
   * backup fails (nothing is committed) instead of storing stale bytes.
   */
  protected async check(parentBytes: Buffer, offset: number, length: number): Promise<void> {
    const end = offset + length;
    for (let b = offset; b < end; b = (Math.floor(b / VERIFY_BLOCK) + 1) * VERIFY_BLOCK) {
      if (Math.random() >= this.verify) continue;
      const to = Math.min(end, (Math.floor(b / VERIFY_BLOCK) + 1) * VERIFY_BLOCK);
      const theirs = await this.client.read(b, to - b);
      this.stats.nbdBytes += to - b;
      this.stats.verifiedBytes += to - b;
      const ours = parentBytes.subarray(b - offset, to - offset);
      if (!theirs.equals(ours)) {
        let i = 0;
        while (theirs[i] === ours[i]) i++;
        throw this.stale(`byte ${b + i} differs`, '--verify-hints');
      }
    }
  }

  /** The failure of a bitmap found to have missed a write. */
  protected stale(where: string, how: string): GenvaultError {
    return new GenvaultError(
      `the dirty bitmap ${this.bitmap} missed a change: ${where} from ${this.stats.parent} (${how}); nothing was committed: back up without --bitmap and start a new bitmap`,
      'STALE_BITMAP',
    );
  }

  async close(): Promise<void> {
    await this.client.close();
  }
}

/** A chunk of a segment being delivered by NbdDirtySource. */
interface SegChunk extends RemoteChunk {
  /** Taken as the previous generation's chunk at the same place: its bytes not read. */
  clean: boolean;
  /** The bytes, when they were read (chunks of dirty regions). */
  bytes: Buffer | null;
}

/**
 * The dirty-bitmap source as the backup pipeline prefers it: a ChunkedSource
 * (src/backup/chunked-source.ts). Each segment is delivered as chunks: the previous
 * generation's chunks that no dirty extent touches are offered by digest and never read
 * (nor decompressed); the runs of its chunks that a dirty extent touches are read (dirty
 * bytes over NBD, the rest from the previous generation), chunked and hashed here. So a
 * next-day backup costs the dirty bytes, not the disk.
 */
export class NbdDirtySource extends NbdSource implements ChunkedSource {
  readonly transferred = { raw: 0, wire: 0 };

  constructor(
    description: string, client: NbdClient, parent: ImageReader | null, stats: NbdReadStats, bitmap: string | null, verify: number,
    readonly chunking: ChunkingParams,
    private readonly version: number,
  ) {
    super(description, client, parent, stats, bitmap, verify);
  }

  async readSegment(need: NeedFn): Promise<ChunkedSegment | null> {
    const at = this.pos;
    const len = Math.min(this.chunking.segment, this.size - at);
    if (len <= 0) return null;
    const dirty = (await this.plan(at, len)).filter((p) => p.kind === 'nbd');
    const chunks: SegChunk[] = [];
    let region: [number, number] | null = null;
    const flush = async () => {
      if (region) chunks.push(...(await this.chunkRegion(region[0], region[1], at, dirty)));
      region = null;
    };
    // The previous generation's chunks tile the segment when it was cut the same way; if
    // not, the whole segment is one region.
    const prev = await this.parentChunks(at, len);
    for (const c of prev ?? [{ start: 0, length: len, zero: false, digest: null, fast: null, data: null, clean: false, bytes: null }]) {
      const from = at + c.start;
      const to = from + c.length;
      if (!prev || dirty.some((d) => d.from < to && d.to > from)) {
        region = region ? [region[0], to] : [from, to];
        continue;
      }
      await flush();
      chunks.push(c);
      this.stats.parentBytes += c.length;
    }
    await flush();
    await this.deliver(at, chunks, need);
    this.pos += len;
    this.transferred.raw += chunks.reduce((n, c) => n + (c.data?.length ?? 0), 0);
    return { offset: at, length: len, chunks: chunks.map(({ start, length, zero, digest, data, fast }) => ({ start, length, zero, digest, data, fast })) };
  }

  /** Ask which data chunks the repository lacks and give those their bytes; check a sample of the clean ones. */
  private async deliver(at: number, chunks: SegChunk[], need: NeedFn): Promise<void> {
    const data = chunks.filter((c) => !c.zero);
    const answers = data.length ? await need(at, data.map((c) => ({ start: c.start, length: c.length, digest: c.digest! }))) : [];
    for (let k = 0; k < data.length; k++) {
      const c = data[k]!;
      if (!answers[k]) continue;
      // A clean chunk the repository cannot reuse (damaged, or condemned by a running gc):
      // the disk still holds its bytes, if the bitmap is right.
      c.data = c.clean ? await this.cleanFromServer(at, c) : c.bytes;
    }
    if (this.verify <= 0) return;
    for (const c of chunks) if (c.clean && !c.data && Math.random() < this.verify) await this.cleanFromServer(at, c, true);
  }

  /** A clean chunk's bytes over NBD, which must be the previous generation's. */
  private async cleanFromServer(at: number, c: SegChunk, sample = false): Promise<Buffer> {
    const b = Buffer.alloc(c.length);
    await this.fromServer(b, at + c.start, c.length);
    if (sample) this.stats.verifiedBytes += c.length;
    const ok = c.zero ? b.every((x) => x === 0) : createHash('sha256').update(b).digest().equals(c.digest!);
    if (ok) return b;
    const ours = Buffer.alloc(c.length);
    const got = await this.parent!.read(ours, at + c.start, c.length).catch(() => 0);
    let i = 0;
    while (i < got && b[i] === ours[i]) i++;
    throw this.stale(got ? `byte ${at + c.start + i} differs` : `bytes ${at + c.start}-${at + c.start + c.length - 1} differ`, sample ? '--verify-hints' : 'a chunk read again');
  }

  /** The previous generation's chunks of [at, at + len), relative to at, if they tile it exactly. */
  private async parentChunks(at: number, len: number): Promise<SegChunk[] | null> {
    const map = this.parent!.map;
    const out: SegChunk[] = [];
    let pos = at;
    while (pos < at + len) {
      const li = map.leafIndexAt(pos);
      const leaf = await map.leaf(li);
      const base = map.leafStarts[li]!;
      let ci = chunkIndexAt(leaf, pos - base);
      if (base + leaf.starts[ci]! !== pos) return null;
      for (; ci < leaf.lengths.length && pos < at + len; ci++) {
        const zero = leaf.zero[ci] === 1;
        const d = (x: Buffer) => Buffer.from(x.subarray(ci * 32, ci * 32 + 32));
        const fast = !zero && leaf.hasFast[ci] ? d(leaf.fast) : null;
        out.push({ start: pos - at, length: leaf.lengths[ci]!, zero, digest: zero ? null : d(leaf.digests), fast, data: null, clean: true, bytes: null });
        pos += leaf.lengths[ci]!;
      }
    }
    return pos === at + len ? out : null;
  }

  /** Read [from, to) (dirty bytes over NBD, the rest from the previous generation), chunk and hash it. */
  private async chunkRegion(from: number, to: number, at: number, dirty: Piece[]): Promise<SegChunk[]> {
    const pieces: Piece[] = [];
    let pos = from;
    for (const d of dirty) {
      const a = Math.max(d.from, from);
      const b = Math.min(d.to, to);
      if (b <= a) continue;
      if (a > pos) pieces.push({ from: pos, to: a, kind: 'parent' });
      pieces.push({ from: a, to: b, kind: 'nbd' });
      pos = b;
    }
    if (pos < to) pieces.push({ from: pos, to, kind: 'parent' });
    const bytes = Buffer.alloc(to - from);
    await this.fill(bytes, from, pieces);
    return chunkSegment(bytes, bytes.length, this.chunking).map((sp) => {
      const b = bytes.subarray(sp.start, sp.start + sp.length);
      return {
        start: from - at + sp.start, length: sp.length, zero: sp.zero, clean: false, data: null,
        digest: sp.zero ? null : createHash('sha256').update(b).digest(),
        fast: sp.zero || this.version < 2 ? null : blake3(b),
        bytes: sp.zero ? null : b,
      };
    });
  }
}

/** A writable export's overlay read over its generation, for `backup --from-nbd-overlay`. */
export class OverlaySource implements Source {
  private pos = 0;
  private constructor(
    readonly description: string,
    readonly overlay: Overlay,
    readonly base: Generation,
    private reader: ImageReader,
  ) {}

  get size(): number {
    return this.overlay.size;
  }

  static async open(repo: Repository, file: string): Promise<OverlaySource> {
    const h = await Overlay.readHeader(file);
    const holder = await overlayHolder(file);
    if (holder) throw new GenvaultError(`${file} is still being served by process ${holder.pid}: stop that genvault nbd first`, 'BUSY');
    const gen = (await repo.generations(h.name, true)).find((g) => g.id === h.generation);
    if (!gen) throw new GenvaultError(`${file}: its generation ${h.name}@${h.generation} is no longer in the repository`, 'NOT_FOUND');
    const overlay = await Overlay.open(file, false);
    const reader = await ImageReader.open(repo, gen, new ChunkLoader(repo, 64 << 20), 32 << 20);
    return new OverlaySource(`nbd-overlay:${file} over ${gen.name}@${gen.id}`, overlay, gen, reader);
  }

  async read(buf: Buffer, length: number): Promise<number> {
    const n = Math.max(0, Math.min(length, this.size - this.pos));
    if (n === 0) return 0;
    await this.overlay.read(buf.subarray(0, n), this.pos, n, async (out, offset, len) => {
      const got = await this.reader.read(out, offset, len);
      if (got !== len) throw new GenvaultError(`${this.base.name}@${this.base.id} ended at ${offset + got}`, 'SHORT_READ');
    });
    this.pos += n;
    return n;
  }

  async close(): Promise<void> {
    await this.overlay.close();
  }
}

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
import type { RepoKeys } from '../format/crypto.js';
import { GenvaultError } from '../util/errors.js';
import type { ChunkingParams } from '../format/config.js';
import type { ChunkedSegment, ChunkedSource, NeedFn } from '../backup/chunked-source.js';
import { ChunkReuse, sampleDiffers, type Run } from '../backup/reuse.js';
import type { Generation } from '../format/generation.js';
import type { Source } from '../backup/source.js';
import { ChunkLoader, ImageReader } from '../read/reader.js';
import type { Repository } from '../repository/repository.js';
import { NbdClient, parseNbdUri } from './client.js';
import { BASE_ALLOCATION, DIRTY_BITMAP_PREFIX, STATE_ZERO } from './protocol.js';
import { Overlay, overlayHolder } from './overlay.js';

/** Largest single READ asked of the server (qemu-nbd and nbdkit accept 32 MiB). */
const READ_PIECE = 4 << 20;

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

/** How much of the dirty bitmap is asked for at once. */
const PLAN_AHEAD = 64 << 20;

/** nbd: read over NBD; around: clean bytes next to dirty ones, read over NBD too; zero; parent: from the previous generation. */
type Piece = { from: number; to: number; kind: 'nbd' | 'around' | 'zero' | 'parent' };

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
      if (useBitmap) return new NbdDirtySource(description, client, parent!, stats, bitmap, verify, repo.config.chunking, repo.config.version, repo.keys);
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
        if (this.dirtyContext && p.kind === 'nbd') this.stats.dirtyBytes += len;
        for (let o = 0; o < len; o += READ_PIECE) waits.push(this.fromServer(dst.subarray(o), p.from + o, Math.min(READ_PIECE, len - o)));
      }
    }
    await Promise.all(waits);
  }

  protected async fromServer(dst: Buffer, offset: number, length: number): Promise<void> {
    await this.client.read(offset, length, dst.subarray(0, length));
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
    const at = await sampleDiffers(parentBytes.subarray(0, length), offset, this.verify, (b, n) => this.client.read(b, n), (n) => {
      this.stats.nbdBytes += n;
      this.stats.verifiedBytes += n;
    });
    if (at !== null) throw this.stale(`byte ${at} differs`, '--verify-hints');
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

/**
 * The dirty-bitmap source as the backup pipeline prefers it: a ChunkedSource. The previous
 * generation's chunks that no dirty extent touches are reused by digest, never read;
 * the runs of them that dirty extents touch are rebuilt from the dirty bytes (over NBD)
 * and the previous generation's other bytes (src/backup/reuse.ts). A reused chunk the repository
 * cannot give is read over NBD and must hash as before.
 */
export class NbdDirtySource extends NbdSource implements ChunkedSource {
  readonly transferred = { raw: 0, wire: 0 };
  private readonly reuse: ChunkReuse;

  constructor(
    description: string, client: NbdClient, parent: ImageReader, stats: NbdReadStats, bitmap: string | null, verify: number,
    readonly chunking: ChunkingParams,
    version: number,
    keys: RepoKeys | null,
  ) {
    super(description, client, parent, stats, bitmap, verify);
    this.reuse = new ChunkReuse(parent.map, chunking, version, keys, {
      changed: (at, len) => this.dirtyRuns(at, len),
      // The clean bytes of a dirty chunk's neighbourhood are read over NBD as well: the
      // previous generation's copies are mostly members of group records, and decoding a
      // group for each cost far more than reading the bytes again (native-notes/
      // performance.md, "NBD export and dirty-bitmap backups").
      readRegion: (dst, from, dirty) => {
        const pieces: Piece[] = [];
        let pos = from;
        for (const d of dirty) {
          if (d.from > pos) pieces.push({ from: pos, to: d.from, kind: 'around' });
          pieces.push({ from: d.from, to: d.to, kind: 'nbd' });
          pos = d.to;
        }
        if (pos < from + dst.length) pieces.push({ from: pos, to: from + dst.length, kind: 'around' });
        return this.fill(dst, from, pieces);
      },
      readUnchanged: (dst, offset) => this.fromServer(dst, offset, dst.length),
      stale: (where, how) => this.stale(where, how),
      readParent: (dst, offset) => parent.read(dst, offset, dst.length),
    }, stats, verify);
  }

  /** The last block status asked for, PLAN_AHEAD bytes from where it was asked. */
  private planned: { from: number; to: number; pieces: Piece[] } | null = null;

  /**
   * The dirty runs of [at, at + len): the bitmap is asked PLAN_AHEAD bytes at a time, not
   * once per segment (each ask is a round trip to the server).
   */
  private async dirtyRuns(at: number, len: number): Promise<Run[]> {
    const end = at + len;
    if (!this.planned || at < this.planned.from || end > this.planned.to) {
      const to = Math.min(this.size, Math.max(end, at + PLAN_AHEAD));
      this.planned = { from: at, to, pieces: await this.plan(at, to - at) };
    }
    return this.planned.pieces
      .filter((p) => p.kind === 'nbd' && p.from < end && p.to > at)
      .map((p) => ({ from: Math.max(p.from, at), to: Math.min(p.to, end) }));
  }

  async readSegment(need: NeedFn): Promise<ChunkedSegment | null> {
    const seg = await this.reuse.segmentAt(this.pos, this.size, need, this.transferred);
    if (seg) this.pos += seg.length;
    return seg;
  }
}

/**
 * A writable export's overlay over its generation, for `backup --from-nbd-overlay`: a
 * ChunkedSource whose changes are the blocks the overlay holds (src/backup/reuse.ts), so keeping what
 * a VM wrote costs about what it wrote.
 */
export class OverlaySource implements ChunkedSource {
  private pos = 0;
  readonly transferred = { raw: 0, wire: 0 };
  /** Bytes of the generation's chunks reused without being read. */
  readonly stats = { parentBytes: 0, verifiedBytes: 0 };
  private readonly reuse: ChunkReuse;

  private constructor(
    readonly description: string,
    readonly overlay: Overlay,
    readonly base: Generation,
    private reader: ImageReader,
    readonly chunking: ChunkingParams,
    version: number,
    keys: RepoKeys | null,
  ) {
    this.reuse = new ChunkReuse(reader.map, chunking, version, keys, {
      changed: async (at, len) => overlay.changedRuns(at, at + len),
      readRegion: (dst, from) => overlay.read(dst, from, dst.length, this.baseRead),
      readUnchanged: (dst, offset) => this.baseRead(dst, offset, dst.length),
      stale: (where) => new GenvaultError(`${this.base.name}@${this.base.id}: ${where} from its own chunk`, 'DAMAGE'),
      readParent: (dst, offset) => reader.read(dst, offset, dst.length),
    }, this.stats);
  }

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
    return new OverlaySource(`nbd-overlay:${file} over ${gen.name}@${gen.id}`, overlay, gen, reader, repo.config.chunking, repo.config.version, repo.keys);
  }

  private baseRead = async (out: Buffer, offset: number, len: number): Promise<void> => {
    const got = await this.reader.read(out, offset, len);
    if (got !== len) throw new GenvaultError(`${this.base.name}@${this.base.id} ended at ${offset + got}`, 'SHORT_READ');
  };

  async readSegment(need: NeedFn): Promise<ChunkedSegment | null> {
    const seg = await this.reuse.segmentAt(this.pos, this.size, need, this.transferred);
    if (seg) this.pos += seg.length;
    return seg;
  }

  async read(buf: Buffer, length: number): Promise<number> {
    const n = Math.max(0, Math.min(length, this.size - this.pos));
    if (n === 0) return 0;
    await this.overlay.read(buf.subarray(0, n), this.pos, n, this.baseRead);
    this.pos += n;
    return n;
  }

  async close(): Promise<void> {
    await this.overlay.close();
  }
}

/**
 * The reader: the source's segments in image order, each handed to a worker to be chunked
 * and hashed as soon as its bytes are there, DEPTH - 1 of them ahead of the main loop (one
 * buffer is always left for compression to finish). Three ways in:
 * - files and block devices (direct): the worker that chunks a segment reads it itself;
 * - streams: read here, one segment after the other, then chunked on a worker;
 * - chunked sources (the SSH agent): the far end chunks, and sends only the chunks the
 *   repository lacks.
 */
import { GenvaultError, describeFsError } from '../util/errors.js';
import type { ChunkingParams } from '../format/config.js';
import { zeroSegment } from '../format/chunker.js';
import type { AdoptedRecords, ChunkedSegment, OfferedChunk } from './chunked-source.js';
import type { ChunkAnswer, ChunkTable, ParentWindow, SegmentReadFailure } from '../work/protocol.js';
import type { DirectRead, Source } from './source.js';
import { BufferPool, DEPTH } from './buffer-pool.js';
import { ParentCursor } from './parent-cursor.js';
import type { BackupRun } from './run.js';

/** What a worker returns for a chunked segment. */
export interface ChunkResult {
  table: Int32Array;
  digests: Uint8Array;
  /** BLAKE3 per chunk, when the repository keeps them (format 2, local sources). */
  fast?: Uint8Array | null;
  /** Bytes whose SHA-256 was taken from the parent after a BLAKE3 match. */
  unchanged?: number;
  /** A chunked source's new chunks as records ready for a pack (a remote writer's). */
  records?: AdoptedRecords;
  /** Per chunk, 1 where `fast` holds its BLAKE3 (absent: wherever `fast` is given). */
  hasFast?: Uint8Array;
}

/**
 * A segment read (or being read) into `buf`, its chunking under way in `res`.
 * `sent`: for chunked sources, 1 for each chunk whose bytes were requested (the new ones).
 */
export interface Segment {
  buf: SharedArrayBuffer;
  len: number;
  res: Promise<ChunkResult>;
  sent?: Uint8Array;
}

/** A chunk op's answer, or the one-line error of a worker's failed read. */
export function chunksRead(r: ChunkAnswer, source: Source, read: DirectRead | undefined): ChunkTable {
  if ('readError' in r) {
    const e = Object.assign(new Error(r.readError.message), { code: r.readError.code });
    throw describeFsError(e, `reading ${read?.what ?? source.description} at offset ${r.readError.offset}`);
  }
  if ('short' in r) throw new GenvaultError(`source ended after ${r.short} of ${source.size} bytes`, 'SHORT_READ');
  return r;
}

/** The chunk table of a segment known to be all zeros (what a worker returns for one). */
export function zeroChunks(len: number, params: ChunkingParams): ChunkResult {
  const spans = zeroSegment(len, params);
  const table = new Int32Array(spans.length * 3);
  spans.forEach((s, i) => {
    table[i * 3] = s.start;
    table[i * 3 + 1] = s.length;
    table[i * 3 + 2] = 1;
  });
  return { table, digests: new Uint8Array(spans.length * 32) };
}

export class SegmentReader {
  /** Digests the reader asked the far end for, whose segment the main loop has not reached. */
  readonly requested = new Set<string>();
  private readonly segSize: number;
  private readonly segments: Array<Promise<Segment | null>> = [];
  private taken = 0;
  private eof = false;
  /** Sequential sources: each read waits for the one before. */
  private readChain: Promise<unknown> = Promise.resolve();
  /** Files and block devices, read by the workers (see readDirect). */
  private readonly direct: boolean;
  private nextAt = 0;
  private windows: Promise<unknown> = Promise.resolve();
  /** The parent, for the workers' change detector (windows in image order). */
  private readonly windowParent: ParentCursor;
  /**
   * The parent, for deciding which chunks a chunked source sends: a cursor of its own, as
   * cursors only move forward and the reader runs ahead of the main loop.
   */
  private readonly readerParent: ParentCursor;

  constructor(
    private readonly run: BackupRun,
    /** Shared with the compression, which frees a segment's buffer once it is done with it. */
    private readonly segBufs: BufferPool,
    /** Whether this run already wrote (or is writing) the chunk with this digest. */
    private readonly ours: (ds: string) => boolean,
  ) {
    this.segSize = run.cfg.chunking.segment;
    this.readerParent = new ParentCursor(run.parentMap);
    this.windowParent = new ParentCursor(run.parentMap);
    const { source } = run;
    this.direct = !run.chunked && source.directRead !== undefined && source.size !== null;
  }

  /** Starts reading: `DEPTH - 1` segments ahead. */
  start(): void {
    for (let i = 0; i < DEPTH - 1; i++) this.schedule();
  }

  /** The next segment in image order, null at the end; schedules the read of one more. */
  async next(): Promise<Segment | null> {
    const seg = await this.segments[this.taken++]!;
    if (!seg) return null;
    if (this.run.failure) throw this.run.failure;
    this.schedule();
    return seg;
  }

  /** Waits for the last sequential read to settle (its failure is the main loop's). */
  async drain(): Promise<void> {
    await this.readChain.catch(() => undefined);
  }

  private schedule(): void {
    let p: Promise<Segment | null>;
    if (this.direct) {
      p = this.readDirect(this.nextAt);
      this.nextAt += this.segSize;
    } else {
      p = this.readChain.then(() => this.readNext());
      this.readChain = p.catch(() => null);
    }
    p.catch(() => undefined); // awaited in order by next(); ones after a failure are not
    this.segments.push(p);
  }

  /** Sequential sources (streams, the SSH agent): one read after the other. */
  private async readNext(): Promise<Segment | null> {
    const { run, segSize } = this;
    const buf = await this.segBufs.acquire();
    if (this.eof || run.failure) {
      this.segBufs.release(buf);
      return null;
    }
    const view = Buffer.from(buf);
    if (run.chunked) return this.readChunked(buf, view);
    const len = await run.source.read(view, segSize);
    if (len < segSize) this.eof = true;
    if (len === 0) {
      this.segBufs.release(buf);
      return null;
    }
    const at = run.stats.bytesRead;
    return this.chunkSegmentOf(buf, at, len, run.fastDetect ? this.windowParent.window(at, at + len) : undefined);
  }

  /**
   * Files and block devices: each segment is read by the worker that chunks it, piece by
   * piece, hashing every chunk while its bytes are still in the CPU cache; the segments
   * in flight are read at once, on both cores, with no copy through the main thread.
   * Parent windows are still asked for in image order, as ParentCursor requires.
   */
  private readDirect(at: number): Promise<Segment | null> {
    const len = Math.min(this.segSize, this.run.source.size! - at);
    if (len <= 0) return Promise.resolve(null);
    let win: Promise<ParentWindow | undefined> | undefined;
    if (this.run.fastDetect) {
      win = this.windows.then(() => this.windowParent.window(at, at + len));
      this.windows = win.catch(() => undefined);
    }
    return this.directSegment(at, len, win);
  }

  private async directSegment(at: number, len: number, win: Promise<ParentWindow | undefined> | undefined): Promise<Segment | null> {
    const { source } = this.run;
    const buf = await this.segBufs.acquire();
    if (this.run.failure) {
      this.segBufs.release(buf);
      return null;
    }
    let plan: DirectRead;
    try {
      plan = await source.directRead!(at, len);
    } catch (e) {
      this.segBufs.release(buf);
      throw describeFsError(e, `reading ${source.description} at offset ${at}`);
    }
    if (plan.length < len) {
      this.segBufs.release(buf);
      throw new GenvaultError(`source ended after ${at + plan.length} of ${source.size} bytes`, 'SHORT_READ');
    }
    return this.chunkSegmentOf(buf, at, len, win, plan);
  }

  /**
   * Chunk a segment on a worker: bytes already in buf, or read there by the worker
   * itself (`read`); a segment that is all hole in a sparse file is neither read nor
   * chunked.
   */
  private async chunkSegmentOf(
    buf: SharedArrayBuffer, at: number, len: number, win?: Promise<ParentWindow | undefined>, read?: DirectRead,
  ): Promise<Segment> {
    const { run } = this;
    const { cfg, stats, source, fastDetect, pool } = run;
    run.read(len);
    if (read?.extents?.length === 0) {
      stats.holeBytes = (stats.holeBytes ?? 0) + len;
      return { buf, len, res: Promise.resolve(zeroChunks(len, cfg.chunking)) };
    }
    const parentWin = win ? await win : undefined;
    const res = pool
      .run({
        op: 'chunk', seg: buf, len, params: cfg.chunking, fast: fastDetect, parent: parentWin,
        read: read && { fd: read.fd, position: at, extents: read.extents },
      })
      .then((r) => chunksRead(r, source, read));
    res.catch(() => undefined); // awaited in order by the main loop
    return { buf, len, res };
  }

  /**
   * One segment from a chunked source. Only chunks that are new to the repository are
   * requested (see need()); the main loop then treats exactly the requested chunks as new.
   */
  private async readChunked(buf: SharedArrayBuffer, view: Buffer): Promise<Segment | null> {
    const seg = await this.run.chunked!.readSegment((offset, offered) => this.need(offset, offered));
    if (!seg || seg.length === 0) {
      this.eof = true;
      this.segBufs.release(buf);
      return null;
    }
    if (seg.length < this.segSize) this.eof = true;
    const n = seg.chunks.length;
    const table = new Int32Array(n * 3);
    const digests = new Uint8Array(n * 32);
    const sent = new Uint8Array(n);
    seg.chunks.forEach((c, i) => {
      table[i * 3] = c.start;
      table[i * 3 + 1] = c.length;
      table[i * 3 + 2] = c.zero ? 1 : 0;
      if (c.digest) digests.set(c.digest, i * 32);
      if (c.data) {
        c.data.copy(view, c.start);
        sent[i] = 1;
      } else if (c.inRecords) {
        sent[i] = 1;
      }
    });
    const at = this.run.stats.bytesRead;
    this.run.read(seg.length);
    // The parent's BLAKE3 for the chunks it has at the same place (in image order: this
    // read runs after the one before).
    const win = this.run.cfg.version >= 2 ? await this.windowParent.window(at, at + seg.length) : undefined;
    // Records are checked on a worker meanwhile; the main loop takes them with the table.
    const res = (seg.records ?? Promise.resolve(undefined)).then((records) => ({ table, digests, ...this.chunkedFasts(seg, digests, win, records), records }));
    res.catch(() => undefined); // awaited in order by the main loop
    return { buf, len: seg.length, res, sent };
  }

  /**
   * A chunked segment's BLAKE3 digests for the map (format 2 on), each chunk's from
   * wherever it is known: the far end computed it (the SSH agent), the server hashed the
   * bytes that came (records), or the parent has the same chunk at the same place.
   * A chunk with none is kept without (the next backup identifies it by its bytes).
   */
  private chunkedFasts(seg: ChunkedSegment, digests: Uint8Array, win: ParentWindow | undefined, records: AdoptedRecords | undefined): { fast: Uint8Array | null; hasFast?: Uint8Array } {
    if (this.run.cfg.version < 2) return { fast: null };
    const n = seg.chunks.length;
    const fast = new Uint8Array(n * 32);
    const hasFast = new Uint8Array(n);
    let wi = 0;
    seg.chunks.forEach((c, i) => {
      if (c.zero) return;
      let f: Uint8Array | undefined;
      if (c.fast?.length === 32) f = c.fast;
      else if (records?.hasFast?.[i]) f = records.fast!.subarray(i * 32, i * 32 + 32);
      else if (win) {
        while (wi < win.starts.length && win.starts[wi]! < c.start) wi++;
        const d = digests.subarray(i * 32, i * 32 + 32);
        if (win.starts[wi] === c.start && win.lengths[wi] === c.length && Buffer.from(win.sha.buffer, win.sha.byteOffset + wi * 32, 32).equals(d)) {
          f = win.fast.subarray(wi * 32, wi * 32 + 32);
        }
      }
      if (!f) return;
      fast.set(f, i * 32);
      hasFast[i] = 1;
    });
    return { fast, hasFast };
  }

  /**
   * Which offered chunks a chunked source must send: those not at the same offset in the
   * parent, not requested earlier in this run (still ahead of the main loop, or already
   * inflight/uncommitted/committing behind it), and absent from the index (or condemned by
   * a running gc, or damaged).
   */
  private async need(offset: number, offered: OfferedChunk[]): Promise<boolean[]> {
    const { run, requested } = this;
    const need = new Array<boolean>(offered.length).fill(false);
    const ask: number[] = [];
    const askedHere = new Set<string>();
    for (let k = 0; k < offered.length; k++) {
      const c = offered[k]!;
      const ds = c.digest.toString('binary');
      if (!run.isDamaged(ds) && (await this.readerParent.has(offset + c.start, c.length, c.digest))) continue;
      if (requested.has(ds) || askedHere.has(ds) || this.ours(ds)) continue;
      askedHere.add(ds);
      ask.push(k);
    }
    if (ask.length) {
      const missing = await run.lacking(ask.map((k) => offered[k]!.digest));
      ask.forEach((k, j) => {
        if (!missing[j]) return;
        need[k] = true;
        requested.add(offered[k]!.digest.toString('binary'));
      });
    }
    return need;
  }
}

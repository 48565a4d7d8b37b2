/**
 * The backup pipeline:
 *
 *   [worker] read segment, chunk + hash -> dedup lookup -> [worker] zstd -> pack append
 *
 * Segments go into a fixed set of shared buffers (bounded memory), several in flight.
 * Files and block devices are read by the workers themselves, which chunk and hash along
 * (BLAKE3 against the parent generation, SHA-256 for what changed); streams and SSH
 * sources are read here, one segment after the other. Dedup asks, in order: the previous
 * generation of the image at the same offset (a next-day backup resolves nearly every
 * chunk there without touching the index), the chunks this run already wrote, then the
 * index.
 *
 * Durability: index entries for new chunks are committed only after their pack data
 * is fsynced, in batches (bounding memory), and the generation itself in one final
 * atomic batch after everything it references is durable. A run that dies leaves no
 * visible generation; its uncommitted pack tails are removed by the next writer.
 */
import { randomBytes } from 'node:crypto';
import { GenvaultError, describeFsError, isNoSpace } from '../util/errors.js';
import { damagedSet } from '../index/db.js';
import { chunkKey, condemnedKey, damagedKey, leafKey, packKey } from '../format/keys.js';
import { ChunkMap, Leaf, LeafBuilder, LeafRef, encodeTop } from '../format/chunkmap.js';
import type { ParentWindow } from '../work/protocol.js';
import { checkImageName, type ChunkingParams } from '../format/config.js';
import { zeroSegment } from '../format/chunker.js';
import { workerCores } from '../work/pool.js';
import { Generation, GenerationStats } from '../format/generation.js';
import { ImageLock, WriterRegistration, cleanupDeadWriters, gcRunning } from '../repository/locks.js';
import { COMP_GROUP, ChunkLocation, RECORD_HEADER_SIZE, encodeLocation } from '../format/pack.js';
import { PackWriter } from '../store/pack-writer.js';
import { testPause, testTrace } from '../util/testhooks.js';
import { Repository } from '../repository/repository.js';
import type { DirectRead, Source } from './source.js';
import { isChunkedSource, sameChunking } from './chunked-source.js';

/** backup() consumes ChunkedSource.readSegment: only chunks the repository lacks are transferred. */
export const SUPPORTS_CHUNKED_SOURCES = true;

export interface BackupOptions {
  name: string;
  tags?: string[];
  /** Wait for another backup of the same image instead of failing. */
  wait?: boolean;
  /** The image lock, already taken by the caller (a job holds it across its hooks); left held. */
  lock?: ImageLock;
  onProgress?: (bytesRead: number, total: number | null) => void;
  /** Commit chunk index entries once this many are pending (tests use small values). */
  flushEntries?: number;
  /**
   * Fail (committing nothing) if the source is or yields more than this many bytes: the
   * bound of a source without a size (--max-size). A cut-off image would be a wrong backup.
   */
  maxSize?: number;
  /** Runs the one batch that makes the generation visible (the CLI holds signals across it). */
  commit?: (run: () => Promise<void>) => Promise<void>;
}

/** Walks the parent generation's chunks in offset order, for positional dedup. */
class ParentCursor {
  private li = 0;
  private ci = 0;
  private leaf: Leaf | null = null;
  private base = 0;
  constructor(private map: ChunkMap | null) {}

  /** The leaf the cursor is in (loaded on first use), or null past the parent's end. */
  private async currentLeaf(m: ChunkMap): Promise<Leaf | null> {
    if (!this.leaf) {
      if (this.li >= m.refs.length) return null;
      this.leaf = await m.leaf(this.li);
      this.base = m.leafStarts[this.li]!;
      this.ci = 0;
    }
    return this.leaf;
  }

  private nextLeaf(): void {
    this.leaf = null;
    this.li++;
  }

  /** True when the parent has a chunk at exactly `offset` with this length and digest. */
  async has(offset: number, length: number, digest: Uint8Array): Promise<boolean> {
    const m = this.map;
    if (!m || offset >= m.size) return false;
    for (;;) {
      const l = await this.currentLeaf(m);
      if (!l) return false;
      while (this.ci < l.lengths.length && this.base + l.starts[this.ci]! + l.lengths[this.ci]! <= offset) this.ci++;
      if (this.ci < l.lengths.length) break;
      this.nextLeaf();
    }
    const l = this.leaf!;
    if (this.base + l.starts[this.ci]! !== offset || l.lengths[this.ci] !== length || l.zero[this.ci]) return false;
    const d = l.digests;
    const at = this.ci * 32;
    for (let i = 0; i < 32; i++) if (d[at + i] !== digest[i]) return false;
    return true;
  }

  /**
   * The parent's chunks that lie wholly inside [start, end) and carry a BLAKE3 digest,
   * for the worker's change detector (offsets relative to start). Windows must be asked
   * for in increasing, non-overlapping order; a chunk crossing `end` can match nothing in
   * this window or the next, and is passed over.
   */
  async window(start: number, end: number): Promise<ParentWindow | undefined> {
    const m = this.map;
    if (!m) return undefined;
    const starts: number[] = [];
    const lengths: number[] = [];
    const picks: Array<[Leaf, number]> = [];
    scan: for (;;) {
      const l = await this.currentLeaf(m);
      if (!l) break;
      for (; this.ci < l.lengths.length; this.ci++) {
        const off = this.base + l.starts[this.ci]!;
        if (off >= end) break scan;
        if (off >= start && off + l.lengths[this.ci]! <= end && l.hasFast[this.ci]) {
          starts.push(off - start);
          lengths.push(l.lengths[this.ci]!);
          picks.push([l, this.ci]);
        }
      }
      this.nextLeaf();
    }
    if (!picks.length) return undefined;
    const fast = new Uint8Array(picks.length * 32);
    const sha = new Uint8Array(picks.length * 32);
    picks.forEach(([l, ci], k) => {
      fast.set(l.fast.subarray(ci * 32, ci * 32 + 32), k * 32);
      sha.set(l.digests.subarray(ci * 32, ci * 32 + 32), k * 32);
    });
    return { starts: Int32Array.from(starts), lengths: Int32Array.from(lengths), fast, sha };
  }
}

/**
 * A fixed set of shared buffers; acquire() waits while all are in use. Strictly first
 * come, first served: segments take buffers in image order, so a later segment can never
 * hold the buffer an earlier one (which the main loop waits for) needs.
 */
class BufferPool {
  private free: SharedArrayBuffer[];
  private waiters: Array<(b: SharedArrayBuffer) => void> = [];
  constructor(count: number, size: number) {
    this.free = Array.from({ length: count }, () => new SharedArrayBuffer(size));
  }
  acquire(): Promise<SharedArrayBuffer> {
    const b = this.free.pop();
    return b ? Promise.resolve(b) : new Promise((r) => this.waiters.push(r));
  }
  release(b: SharedArrayBuffer): void {
    const w = this.waiters.shift();
    if (w) w(b);
    else this.free.push(b);
  }
}

interface ChunkResult {
  table: Int32Array;
  digests: Uint8Array;
  /** BLAKE3 per chunk, when the repository keeps them (format 2, local sources). */
  fast?: Uint8Array | null;
  /** Bytes whose SHA-256 was taken from the parent after a BLAKE3 match. */
  unchanged?: number;
}

interface CompressResult {
  out: Uint8Array;
  table: Int32Array;
}

/** The chunk table of a segment known to be all zeros (what a worker returns for one). */
function zeroChunks(len: number, params: ChunkingParams): ChunkResult {
  const spans = zeroSegment(len, params);
  const table = new Int32Array(spans.length * 3);
  spans.forEach((s, i) => {
    table[i * 3] = s.start;
    table[i * 3 + 1] = s.length;
    table[i * 3 + 2] = 1;
  });
  return { table, digests: new Uint8Array(spans.length * 32) };
}

/** Flush chunk index entries once this many are pending (bounds memory on huge first backups). */
const FLUSH_ENTRIES = 65536;

/**
 * Test hooks (src/util/testhooks.ts), for the crash loop and gc's race tests: with
 * GENVAULT_BACKUP_PAUSE_FILE set, a backup waits while that file exists at the point named
 * by GENVAULT_BACKUP_PAUSE_AT:
 * - 'flushed-N': the index batch of its Nth flush has returned (pack synced, its chunk
 *   entries and leaves committed; flushes happen when a pack is full and once at the end);
 * - 'before-commit' (the default): the whole source is read, every chunk looked up and
 *   made durable, the generation not yet committed (the moment a concurrent gc must wait for);
 * - 'committed': the generation is committed; its packs are not yet closed, its
 *   registration and image lock still held.
 * GENVAULT_BACKUP_TRACE=1 prints 'backup-trace: commit' just before the batch that commits
 * the generation.
 */
const hook = (point: string) => testPause('backup', point, 'before-commit');

export async function backup(repo: Repository, source: Source, opts: BackupOptions): Promise<Generation> {
  repo.requireWritable('a backup');
  const name = checkImageName(opts.name);
  try {
    return await backupImage(repo, source, opts, name);
  } catch (e) {
    // A full file system, wherever it struck (a pack, the index, a lock file): one line
    // about the repository. What was written is trimmed (or left to the next writer).
    if (isNoSpace(e)) throw new GenvaultError(`${repo.dir}: no space left on device (backup of ${name} failed; nothing was committed)`, 'ENOSPC');
    throw e;
  }
}

// max-lines waiver: to be split into named steps (the house issue); the reader, dedup maps, compression pipeline, pack appends and commit share one run's state as closures
async function backupImage(repo: Repository, source: Source, opts: BackupOptions, name: string): Promise<Generation> {
  const started = Date.now();
  const cfg = repo.config;
  const segSize = cfg.chunking.segment;
  const lock = opts.lock ?? (await ImageLock.acquire(repo.dir, name, opts.wait ?? false));
  let writer: WriterRegistration | null = null;
  const packs: PackWriter[] = [];
  let pack: PackWriter | null = null;
  try {
    const { maxSize } = opts;
    if (maxSize !== undefined && source.size !== null && source.size > maxSize) {
      throw new GenvaultError(`${source.description} is ${source.size} bytes, more than --max-size ${maxSize}`, 'TOO_BIG');
    }
    await cleanupDeadWriters(repo.dir, repo.db, repo.store);
    writer = await WriterRegistration.register(repo.dir, `backup ${name}`);

    // Registered first, then checked: a gc that starts after this check waits for us.
    const underGc = await gcRunning(repo.dir);
    // Chunks found damaged (by verify, restore or the mount): never reuse them; storing the
    // bytes we read now replaces their index entry and heals every generation using them.
    const damaged = await damagedSet(repo.db);
    const healed: string[] = [];
    const prev = (await repo.generations(name)).at(-1) ?? null;
    const parentMap = prev && !underGc ? await repo.chunkMap(prev) : null;
    const parent = new ParentCursor(parentMap);
    // A source that chunks at the far end (SSH agent) asks which chunks to send. The
    // reader decides that with its own cursor on the parent map (cursors only move
    // forward, and the reader runs ahead of the main loop).
    const chunked = isChunkedSource(source) ? source : null;
    if (chunked && !sameChunking(chunked.chunking, cfg.chunking)) {
      throw new GenvaultError('the source chunks differently from the repository', 'CHUNKING');
    }
    const readerParent = new ParentCursor(parentMap);
    // Format 2 keeps each chunk's BLAKE3 in the map, and a local source lets the workers
    // see the bytes: then unchanged chunks are recognised by BLAKE3 against the parent.
    const fastDetect = cfg.version >= 2 && !chunked;
    // Group records (format 3): new chunks compressed together, up to this many raw bytes.
    const group = cfg.version >= 3 ? (cfg.compression.group ?? 0) : 0;
    const windowParent = new ParentCursor(parentMap);
    // Digests the reader asked the far end for, whose segment the main loop has not reached.
    const requested = new Set<string>();
    repo.workerCount ??= Math.max(2, workerCores()); // no effect once the pool exists
    const pool = repo.pool;
    // Segments in flight: bounds memory (4 x 8 MiB, and as many output buffers) while
    // keeping the workers fed. Every page of these buffers is a fresh page once, which
    // costs ~13 us in this VM: 6 instead of 4 took 30-35 MB more RSS and 8-10k more page
    // faults for the same times (bench disk, 5 alternating rounds: first backups 7.96 s
    // against 7.97 s, next-day 2.57 s against 2.60 s).
    const depth = 4;
    const segBufs = new BufferPool(depth, segSize);
    // Output buffers for compressed records, reused like the segments: a worker writes a
    // segment's records into one, the pack append reads from it, then it is free again.
    // Fixed memory and no garbage, whatever the image size.
    const outSize = segSize + (segSize >>> 6) + (segSize / cfg.chunking.min) * (RECORD_HEADER_SIZE + 64) + (1 << 16);
    const outBufs = new BufferPool(depth, outSize);
    const release = (b: SharedArrayBuffer) => segBufs.release(b);

    const stats: GenerationStats = {
      bytesRead: 0, zeroBytes: 0, chunks: 0, newChunks: 0, newBytes: 0, newStored: 0, durationMs: 0,
    };
    // digest (binary string) -> location, for chunks written by this run and not yet in the index
    let uncommitted = new Map<string, ChunkLocation>();
    // digests being compressed right now: a repeat of one is not new
    const inflight = new Set<string>();
    let pendingLeaves: Array<{ key: Buffer; value: Buffer }> = [];
    const leafRefs: LeafRef[] = [];
    const leaves = new LeafBuilder(cfg.leaf.minChunks, cfg.leaf.maxChunks);
    let appendChain: Promise<void> = Promise.resolve();
    let failure: unknown = null;

    // digest -> location of chunks whose index batch is being written right now
    let committing = new Map<string, ChunkLocation>();
    /** Written by this run: appended, being compressed, or being committed right now. */
    const ours = (ds: string) => uncommitted.has(ds) || inflight.has(ds) || committing.has(ds);
    const isDamaged = (ds: string) => damaged.size > 0 && damaged.has(ds);
    /**
     * For each digest, whether the repository lacks a copy this generation may use: no
     * index entry, condemned by a running gc, or marked damaged. gc's 'x' marks are read
     * before the entries: gc removes an entry only after marking it, so a chunk read as
     * present here cannot vanish before this generation commits.
     */
    const lacking = async (digests: Buffer[]): Promise<boolean[]> => {
      const condemned = underGc ? await repo.db.getMany(digests.map((d) => condemnedKey(d))) : [];
      const found = await repo.db.getMany(digests.map((d) => chunkKey(d)));
      return digests.map((d, k) => found[k] === undefined || found[k] === null || !!condemned[k] || isDamaged(d.toString('binary')));
    };

    let flushes = 0;
    /** Make everything appended so far durable and commit its index entries. */
    const flush = async () => {
      // Take what is pending before the first await: the main loop keeps adding leaves
      // (and lookups must keep seeing chunks in flight) while this batch is written.
      const entries = uncommitted;
      const leavesNow = pendingLeaves;
      uncommitted = new Map();
      pendingLeaves = [];
      committing = entries;
      const ops: Array<{ type: 'put'; key: Buffer; value: Buffer }> = [];
      if (pack) {
        await pack.sync();
        ops.push({ type: 'put', key: packKey(pack.packId), value: Buffer.from(JSON.stringify({ size: pack.size })) });
      }
      for (const [d, loc] of entries) ops.push({ type: 'put', key: chunkKey(Buffer.from(d, 'binary')), value: encodeLocation(loc) });
      for (const l of leavesNow) ops.push({ type: 'put', ...l });
      if (ops.length) await repo.db.batch(ops, { sync: true } as object);
      committing = new Map();
      await hook(`flushed-${++flushes}`);
    };

    const appendRecords = (res: CompressResult, digests: string[], rawLengths: number[], done: () => void) => {
      appendChain = appendChain.then(async () => {
        if (failure) return;
        if (!pack || pack.size > cfg.packTargetSize) {
          if (pack) {
            await flush();
            await pack.close();
          }
          pack = await PackWriter.create(repo.store).catch((e) => { throw describeFsError(e, `creating a pack file in ${repo.dir}`); });
          packs.push(pack);
          await writer!.addPack(pack.packId);
        }
        const p = pack;
        const base = await p.append(Buffer.from(res.out.buffer, res.out.byteOffset, res.out.byteLength)).catch((e) => {
          throw describeFsError(e, `writing ${repo.store.describe(p.name)}`);
        });
        // Per chunk: record offset, stored length, compression, offset in the group, group raw length.
        const t = res.table;
        for (let i = 0; i < digests.length; i++) {
          const stored = t[i * 5 + 1]!;
          const compression = t[i * 5 + 2]!;
          const loc: ChunkLocation = { packId: p.packId, offset: base + t[i * 5]!, storedLength: stored, rawLength: rawLengths[i]!, compression };
          if (compression === COMP_GROUP) {
            loc.inner = t[i * 5 + 3]!;
            loc.groupRaw = t[i * 5 + 4]!;
          }
          uncommitted.set(digests[i]!, loc);
          inflight.delete(digests[i]!);
          // A group record counts once, with its first member.
          if (compression !== COMP_GROUP || loc.inner === 0) stats.newStored += stored + RECORD_HEADER_SIZE;
        }
        if (uncommitted.size >= (opts.flushEntries ?? FLUSH_ENTRIES)) await flush();
      }).catch((e) => {
        failure ??= e;
      }).finally(done);
    };

    // Reader: segments in order, each handed to a worker as soon as it is read. Reads are
    // chained (the source is sequential); chunking runs in parallel on the workers.
    // `sent`: for chunked sources, 1 for each chunk whose bytes were requested (the new ones).
    type Segment = { buf: SharedArrayBuffer; len: number; res: Promise<ChunkResult>; sent?: Uint8Array };
    const segments: Array<Promise<Segment | null>> = [];
    let eof = false;
    /** A source never yields more than its size, nor more than --max-size. */
    const checkBound = () => {
      if (maxSize !== undefined && stats.bytesRead > maxSize) {
        throw new GenvaultError(`${source.description} yields more than --max-size ${maxSize} bytes`, 'TOO_BIG');
      }
      if (source.size !== null && stats.bytesRead > source.size) {
        throw new GenvaultError(`${source.description} yields more than its size of ${source.size} bytes`, 'LONG_READ');
      }
    };
    /**
     * Chunk a segment on a worker: bytes already in buf, or read there by the worker
     * itself (`read`); a segment that is all hole in a sparse file is neither read nor
     * chunked.
     */
    const chunkSegmentOf = async (
      buf: SharedArrayBuffer, at: number, len: number, win?: Promise<ParentWindow | undefined>, read?: DirectRead,
    ): Promise<Segment> => {
      stats.bytesRead += len;
      checkBound();
      opts.onProgress?.(stats.bytesRead, source.size);
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
        .then((r) => {
          if ('readError' in r) {
            const e = Object.assign(new Error(r.readError.message), { code: r.readError.code });
            throw describeFsError(e, `reading ${read!.what} at offset ${r.readError.offset}`);
          }
          if ('short' in r) throw new GenvaultError(`source ended after ${r.short} of ${source.size} bytes`, 'SHORT_READ');
          return r;
        });
      res.catch(() => undefined); // awaited in order below
      return { buf, len, res };
    };
    /** Sequential sources (streams, the SSH agent): one read after the other. */
    let readChain: Promise<unknown> = Promise.resolve();
    const readNext = async (): Promise<Segment | null> => {
      const buf = await segBufs.acquire();
      if (eof || failure) {
        release(buf);
        return null;
      }
      const view = Buffer.from(buf);
      if (chunked) return readChunked(buf, view);
      const len = await source.read(view, segSize);
      if (len < segSize) eof = true;
      if (len === 0) {
        release(buf);
        return null;
      }
      const at = stats.bytesRead;
      return chunkSegmentOf(buf, at, len, fastDetect ? windowParent.window(at, at + len) : undefined);
    };
    /**
     * Files and block devices: each segment is read by the worker that chunks it, piece by
     * piece, hashing every chunk while its bytes are still in the CPU cache; the segments
     * in flight are read at once, on both cores, with no copy through the main thread.
     * Parent windows are still asked for in image order, as ParentCursor requires.
     */
    const size = source.size;
    const direct = !chunked && source.directRead !== undefined && size !== null;
    let nextAt = 0;
    let windows: Promise<unknown> = Promise.resolve();
    const readDirect = (at: number): Promise<Segment | null> => {
      const len = Math.min(segSize, size! - at);
      if (len <= 0) return Promise.resolve(null);
      let win: Promise<ParentWindow | undefined> | undefined;
      if (fastDetect) {
        win = windows.then(() => windowParent.window(at, at + len));
        windows = win.catch(() => undefined);
      }
      return (async () => {
        const buf = await segBufs.acquire();
        if (failure) {
          release(buf);
          return null;
        }
        let plan: DirectRead;
        try {
          plan = await source.directRead!(at, len);
        } catch (e) {
          release(buf);
          throw describeFsError(e, `reading ${source.description} at offset ${at}`);
        }
        if (plan.length < len) {
          release(buf);
          throw new GenvaultError(`source ended after ${at + plan.length} of ${size} bytes`, 'SHORT_READ');
        }
        return chunkSegmentOf(buf, at, len, win, plan);
      })();
    };
    /**
     * One segment from a chunked source. Only chunks that are new to the repository are
     * requested: not at the same offset in the parent, not requested earlier in this run
     * (still ahead of the main loop, or already inflight/uncommitted/committing behind
     * it), and absent from the index (or condemned by a running gc, or damaged). The main
     * loop then treats exactly the requested chunks as new.
     */
    const readChunked = async (buf: SharedArrayBuffer, view: Buffer): Promise<Segment | null> => {
      const seg = await chunked!.readSegment(async (offset, offered) => {
        const need = new Array<boolean>(offered.length).fill(false);
        const ask: number[] = [];
        const askedHere = new Set<string>();
        for (let k = 0; k < offered.length; k++) {
          const c = offered[k]!;
          const ds = c.digest.toString('binary');
          if (!isDamaged(ds) && (await readerParent.has(offset + c.start, c.length, c.digest))) continue;
          if (requested.has(ds) || askedHere.has(ds) || ours(ds)) continue;
          askedHere.add(ds);
          ask.push(k);
        }
        if (ask.length) {
          const missing = await lacking(ask.map((k) => offered[k]!.digest));
          ask.forEach((k, j) => {
            if (!missing[j]) return;
            need[k] = true;
            requested.add(offered[k]!.digest.toString('binary'));
          });
        }
        return need;
      });
      if (!seg || seg.length === 0) {
        eof = true;
        release(buf);
        return null;
      }
      if (seg.length < segSize) eof = true;
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
        }
      });
      stats.bytesRead += seg.length;
      checkBound();
      opts.onProgress?.(stats.bytesRead, source.size);
      return { buf, len: seg.length, res: Promise.resolve({ table, digests }), sent };
    };
    // Keep `depth - 1` segments read ahead; one buffer is always left for compression to finish.
    const schedule = () => {
      let p: Promise<Segment | null>;
      if (direct) {
        p = readDirect(nextAt);
        nextAt += segSize;
      } else {
        p = readChain.then(() => readNext());
        readChain = p.catch(() => null);
      }
      p.catch(() => undefined); // awaited in order below; ones after a failure are not
      segments.push(p);
    };
    for (let i = 0; i < depth - 1; i++) schedule();

    let segOffset = 0;
    const compressTasks: Promise<void>[] = [];
    for (let si = 0; ; si++) {
      const seg = await segments[si]!;
      if (!seg) break;
      if (failure) throw failure;
      schedule();
      const { table, digests, fast, unchanged } = await seg.res;
      if (fastDetect) stats.unchangedBytes = (stats.unchangedBytes ?? 0) + (unchanged ?? 0);
      const n = table.length / 3;
      const unknown: number[] = [];
      const entryDigest: Array<Buffer | null> = new Array(n);
      const newIdx: number[] = [];
      if (seg.sent) {
        // Chunked source: the reader already decided; the requested chunks are the new ones.
        for (let i = 0; i < n; i++) {
          stats.chunks++;
          if (table[i * 3 + 2]) {
            stats.zeroBytes += table[i * 3 + 1]!;
            entryDigest[i] = null;
            continue;
          }
          const d = Buffer.from(digests.buffer, digests.byteOffset + i * 32, 32);
          entryDigest[i] = d;
          if (!seg.sent[i]) continue;
          const ds = d.toString('binary');
          requested.delete(ds);
          if (isDamaged(ds)) {
            damaged.delete(ds);
            healed.push(ds);
          }
          newIdx.push(i);
        }
      }
      for (let i = 0; i < n && !seg.sent; i++) {
        const start = table[i * 3]!;
        const length = table[i * 3 + 1]!;
        stats.chunks++;
        if (table[i * 3 + 2]) {
          stats.zeroBytes += length;
          entryDigest[i] = null;
          continue;
        }
        const d = Buffer.from(digests.buffer, digests.byteOffset + i * 32, 32);
        entryDigest[i] = d;
        const ds = d.toString('binary');
        if (ours(ds)) continue;
        if (!isDamaged(ds) && (await parent.has(segOffset + start, length, d))) continue;
        unknown.push(i);
      }
      // Ask the index about the rest in one round trip.
      if (unknown.length) {
        // A chunk condemned by a running gc or marked damaged counts as absent: storing a
        // fresh copy (which replaces its index entry) is what keeps this generation whole.
        const missing = await lacking(unknown.map((i) => entryDigest[i]!));
        const seen = new Set<string>();
        unknown.forEach((i, k) => {
          if (!missing[k]) return;
          const ds = entryDigest[i]!.toString('binary');
          if (isDamaged(ds)) {
            damaged.delete(ds); // one fresh copy is enough
            healed.push(ds);
          }
          if (seen.has(ds) || ours(ds)) return;
          seen.add(ds);
          newIdx.push(i);
        });
      }
      for (let i = 0; i < n; i++) {
        const length = table[i * 3 + 1]!;
        const f = fast && entryDigest[i] ? Buffer.from(fast.buffer, fast.byteOffset + i * 32, 32) : null;
        const done = leaves.add({ length, zero: entryDigest[i] === null, digest: entryDigest[i] ?? null, fast: f });
        if (done) {
          leafRefs.push(done.ref);
          pendingLeaves.push({ key: leafKey(done.ref.digest), value: done.encoded });
        }
      }
      if (newIdx.length) {
        const spans = new Int32Array(newIdx.length * 2);
        const ds = new Uint8Array(newIdx.length * 32);
        const names: string[] = [];
        newIdx.forEach((i, k) => {
          spans[k * 2] = table[i * 3]!;
          spans[k * 2 + 1] = table[i * 3 + 1]!;
          ds.set(entryDigest[i]!, k * 32);
          const s = entryDigest[i]!.toString('binary');
          names.push(s);
          inflight.add(s);
          stats.newChunks++;
          stats.newBytes += table[i * 3 + 1]!;
        });
        const buf = seg.buf;
        const rawLengths = newIdx.map((i) => table[i * 3 + 1]!);
        const out = await outBufs.acquire();
        compressTasks.push(
          pool
            .run({ op: 'compress', seg: buf, spans, digests: ds, level: cfg.compression.level, group, out })
            .then((res) => {
              release(buf);
              appendRecords(res, names, rawLengths, () => outBufs.release(out));
            })
            .catch((e) => {
              release(buf);
              outBufs.release(out);
              failure ??= e;
            }),
        );
      } else {
        release(seg.buf);
      }
      segOffset += seg.len;
      if (compressTasks.length > 256) await Promise.all(compressTasks.splice(0, 128));
    }
    await Promise.all(compressTasks);
    await appendChain;
    await readChain.catch(() => undefined);
    if (failure) throw failure;
    if (source.size !== null && stats.bytesRead !== source.size) {
      throw new GenvaultError(`source ended after ${stats.bytesRead} of ${source.size} bytes`, 'SHORT_READ');
    }
    const last = leaves.finish();
    if (last) {
      leafRefs.push(last.ref);
      pendingLeaves.push({ key: leafKey(last.ref.digest), value: last.encoded });
    }
    await flush();
    await hook('before-commit');

    stats.durationMs = Date.now() - started;
    const gen: Generation = {
      id: randomBytes(8).toString('hex'),
      name,
      created: new Date().toISOString(),
      size: stats.bytesRead,
      chunking: { block: cfg.chunking.block, min: cfg.chunking.min, max: cfg.chunking.max, maskBits: cfg.chunking.maskBits },
      leaves: leafRefs.length,
      tags: opts.tags ?? [],
      source: source.description,
      parent: prev?.id ?? null,
      stats,
    };
    if (prev && Date.parse(gen.created) <= Date.parse(prev.created)) {
      // Keep creation times strictly increasing per image (clock steps, fast runs).
      gen.created = new Date(Date.parse(prev.created) + 1).toISOString();
    }
    // The one atomic commit that makes the generation visible (and clears the damage marks of
    // chunks it stored again: their index entries now point to the fresh copies).
    const commit = () =>
      repo.db.batch([
        ...healed.map((d) => ({ type: 'del' as const, key: damagedKey(Buffer.from(d, 'binary')) })),
        { type: 'put', key: Repository.mapKey(gen.id), value: encodeTop(leafRefs) },
        { type: 'put', key: Repository.generationKey(gen), value: Buffer.from(JSON.stringify(gen)) },
      ], { sync: true } as object);
    testTrace('backup', 'commit');
    await (opts.commit ? opts.commit(commit) : commit());
    await hook('committed');
    for (const p of packs) await p.close().catch(() => undefined);
    await writer.release();
    writer = null;
    return gen;
  } catch (e) {
    for (const p of packs) await p.close().catch(() => undefined);
    if (writer) {
      // Remove what this run wrote but never committed; committed chunks stay for reuse.
      // If that fails (the index went with the disk), the registration stays: the next
      // writer, finding this process gone, does it.
      const { trimPacks } = await import('../repository/locks.js');
      const trimmed = await trimPacks(repo.store, repo.db, writer.record.packs).then(() => true, () => false);
      if (trimmed) await writer.release().catch(() => undefined);
    }
    if (e instanceof GenvaultError) throw new GenvaultError(`backup of ${name} failed: ${e.message}`, e.code, e.exitCode);
    throw describeFsError(e, `backup of ${name} failed`);
  } finally {
    if (!opts.lock) await lock.release().catch(() => undefined);
  }
}

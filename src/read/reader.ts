/**
 * Reading generations: chunk loading (pack read, decompress and SHA-256 check in a worker
 * thread, never on the event loop), a byte-bounded cache of decoded chunks shared by all
 * open images, and ImageReader for random access with read-ahead (used by the mount).
 */
import { DamageError, GenvaultError } from '../util/errors.js';
import { ChunkMap, chunkIndexAt, Leaf } from '../format/chunkmap.js';
import { markDamaged } from '../index/db.js';
import { chunkKey } from '../format/keys.js';
import { Generation } from '../format/generation.js';
import { COMP_GROUP, ChunkLocation, decodeLocation, packObject } from '../format/pack.js';
import { Lru } from '../util/lru.js';
import { ReadStreak } from './streak.js';
import { Repository } from '../repository/repository.js';
import type { LoadResult } from '../work/protocol.js';

/** Decoded chunks by digest, bounded in bytes. */
export class ChunkCache extends Lru<string, Buffer> {
  constructor(readonly maxBytes: number) {
    super(maxBytes, (b) => b.length);
  }
}

/**
 * Shared memory the workers decode read-ahead batches into, recycled instead of a new
 * ArrayBuffer per batch. A cold `dd` through the mount moved ~4 GiB through fresh 1 MiB
 * buffers, and V8 answered with ~10 major collections a second (17% of the mount's CPU).
 *
 * A slab is reused only when none of its chunks is in the cache any more, and only from
 * the next turn of the event loop (setImmediate): a read that was handed one of its
 * chunks copies it out in the same turn (ImageReader copies synchronously, or in the
 * promise callback that receives the chunk), so no reader can see a slab being refilled.
 * Loaders whose chunks are held across awaits (restore, cat) do not use slabs.
 *
 * The pool is the mount's memory for decoded chunks: it makes no more slabs than the cache
 * holds bytes (plus SLAB_SPARE), and a batch that finds none free waits for one (see
 * ChunkLoader.room) instead of decoding into fresh memory, which stayed in the process
 * (native-notes/performance.md, "Where the mount server's memory goes").
 */
class SlabPool {
  private free: SharedArrayBuffer[] = [];
  private made = 0;
  private lastTake = 0;
  private trim: NodeJS.Timeout | null = null;
  /** Slabs given back and not yet free (until the next turn), and who waits for one. */
  cooling = 0;
  private waiters: Array<() => void> = [];
  constructor(
    readonly slabBytes: number,
    private maxSlabs: number,
  ) {}
  /** Whether take() would return a slab now. */
  get available(): boolean {
    return this.free.length > 0 || this.made < this.maxSlabs;
  }
  take(): SharedArrayBuffer | null {
    this.lastTake = Date.now();
    if (this.free.length) return this.free.pop()!;
    if (this.made >= this.maxSlabs) return null;
    this.made++;
    return new SharedArrayBuffer(this.slabBytes);
  }
  /** Resolves when a slab comes back or a batch has landed in the cache (see room). */
  changed(): Promise<void> {
    return new Promise((resolve) => this.waiters.push(resolve));
  }
  /** A batch's chunks are going into the cache (they do so in promise callbacks): wake room() after. */
  landed(): void {
    if (this.waiters.length) setImmediate(() => this.wake());
  }
  private wake(): void {
    for (const w of this.waiters.splice(0)) w();
  }
  give(slab: SharedArrayBuffer): void {
    this.cooling++;
    setImmediate(() => {
      this.cooling--;
      this.free.push(slab);
      this.wake();
    });
    // A mount stays up for days: let the garbage collector have idle slabs back.
    this.trim ??= setInterval(() => {
      if (Date.now() - this.lastTake < 10_000) return;
      this.made -= this.free.length;
      this.free = [];
      clearInterval(this.trim!);
      this.trim = null;
    }, 10_000).unref();
  }
}

/** Slabs beyond the cache's bytes: batches being decoded, and the unused tails of slabs. */
const SLAB_SPARE = 2;

/**
 * One slab being filled: batches take consecutive pieces of it, so a 2 MiB slab holds two
 * or three 1 MiB read-ahead batches rather than one. (One batch per slab left half of each
 * slab unused; a 128 MiB cache then pinned more slabs than the pool had, and 7 of 8 batches
 * of a cold `dd` fell back to fresh buffers: the mount server peaked at 420-500 MiB.)
 */
interface SlabUse {
  slab: SharedArrayBuffer;
  /** Bytes handed out to batches so far. */
  used: number;
  /** Chunks of the slab in the cache, plus batches still being decoded into it. */
  refs: number;
  /** No more batches go into it: it returns to the pool once refs reaches 0. */
  sealed: boolean;
}

export class ChunkLoader {
  private slabs: SlabPool | null = null;
  private slabOf = new WeakMap<Buffer, SlabUse>();
  /** The slab read-ahead batches are being given pieces of. */
  private filling: SlabUse | null = null;
  /** Batches waiting for room in a slab, in order (see room). */
  private queue: Promise<void> = Promise.resolve();
  /** Read-ahead batches decoded into slabs, and into fresh buffers (no slab to spare). */
  readonly batches = { slab: 0, fresh: 0 };
  private inflight = new Map<string, Promise<Buffer>>();
  readonly cache: ChunkCache;
  /** Chunk locations, fetched a whole leaf at a time (one index round trip per ~256 chunks). */
  private locations = new Lru<string, ChunkLocation>(1 << 17);
  /** BLAKE3 of chunks whose map entries carry one (format 2): reads verify with it. */
  private fasts = new Lru<string, Buffer>(1 << 17);
  private warmed = new WeakSet<Leaf>();
  /** Who found damage, as the chunk's 'd' key records it (FORMAT.md): cat and restore to stdout, or the mount. */
  damageBy: 'restore' | 'mount' = 'restore';

  /**
   * @param useSlabs decode read-ahead into recycled shared memory (see SlabPool). Only for
   *   callers that never keep a chunk buffer past the turn it was handed over (the mount).
   * @param direct read packs with O_DIRECT: for callers that read each chunk once (cat),
   *   not for the mount, whose readers come back to cached data.
   */
  constructor(
    readonly repo: Repository,
    cacheBytes = 64 << 20,
    useSlabs = false,
    private readonly direct = false,
  ) {
    this.cache = new ChunkCache(cacheBytes);
    if (useSlabs && cacheBytes > 0) {
      const slabBytes = 2 << 20;
      this.slabs = new SlabPool(slabBytes, Math.ceil(cacheBytes / slabBytes) + SLAB_SPARE);
      this.cache.onEvict = (v) => {
        const use = this.slabOf.get(v);
        if (use) this.unref(use);
      };
    }
  }

  /** A piece of shared memory for a batch of `bytes`, or null (no slabs, or all in use). */
  private slabPiece(bytes: number): { use: SlabUse; at: number } | null {
    if (!this.slabs || bytes > this.slabs.slabBytes) return null;
    if (!this.fits(bytes)) {
      this.sealFilling();
      const slab = this.slabs.take();
      if (!slab) return null;
      this.filling = { slab, used: 0, refs: 0, sealed: false };
    }
    const use = this.filling!; // it fits, or was just taken
    const at = use.used;
    use.used += bytes;
    use.refs++; // the batch itself, until its chunks are in the cache
    return { use, at };
  }

  /** Whether the slab being filled has room for a batch of `bytes`. */
  private fits(bytes: number): boolean {
    const f = this.filling;
    return !!f && f.slab.byteLength - f.used >= bytes;
  }

  /** No more batches go into the slab being filled; it returns to the pool once unused. */
  private sealFilling(): void {
    const use = this.filling;
    this.filling = null;
    if (!use) return;
    use.sealed = true;
    if (use.refs === 0) this.slabs!.give(use.slab);
  }

  /**
   * Wait until a batch of `bytes` can have a piece of a slab. While none is free, the least
   * recently used chunks leave the cache (what the batch's chunks would push out anyway)
   * until a slab is given back. With the cache empty, every slab is held by a batch being
   * decoded: wait until one lands, and look again (its chunks are then in the cache and can
   * leave it; waiting for a slab alone would wait for ever). So the slabs bound the memory
   * for decoded chunks, and the cache may hold less than its bytes when chunks it keeps pin
   * slabs.
   */
  private async room(bytes: number): Promise<void> {
    const pool = this.slabs!;
    for (;;) {
      if (this.fits(bytes) || pool.available) return;
      this.sealFilling();
      while (!pool.available && pool.cooling === 0 && this.cache.evictOldest());
      if (!pool.available) await pool.changed();
    }
  }

  private unref(use: SlabUse): void {
    if (--use.refs === 0 && use.sealed) this.slabs!.give(use.slab);
  }

  /** A decoded chunk if it is in the cache right now. */
  cached(digest: Buffer): Buffer | undefined {
    return this.cache.get(digest.toString('binary'));
  }

  /** The raw bytes of a chunk, verified against its digest. Throws DamageError if it is bad. */
  load(digest: Buffer): Promise<Buffer> {
    const k = digest.toString('binary');
    const hit = this.cache.get(k);
    if (hit) return Promise.resolve(hit);
    const pending = this.inflight.get(k);
    if (pending) return pending.catch((e) => this.retryMoved(digest, e));
    const p = this.fetch(digest).then(
      (b) => {
        this.inflight.delete(k);
        this.cache.set(k, b);
        return b;
      },
      (e) => {
        this.inflight.delete(k);
        throw e;
      },
    );
    this.inflight.set(k, p);
    return p.catch((e) => this.retryMoved(digest, e));
  }

  /**
   * A chunk that failed to load from a remembered location may have been moved by gc
   * (repacked into a new pack): look it up again and, if the index now says elsewhere,
   * load it from there. Only when the index still names the failing place is it damage.
   */
  private async retryMoved(digest: Buffer, err: unknown): Promise<Buffer> {
    if (!(err instanceof DamageError)) throw err;
    const k = digest.toString('binary');
    const old = this.locations.get(k);
    const fresh = await this.repo.location(digest);
    if (!fresh || !old || (old.packId === fresh.packId && old.offset === fresh.offset)) {
      await markDamaged(this.repo.db, digest, this.damageBy);
      throw err;
    }
    this.locations.set(k, fresh);
    const b = await this.fetch(digest);
    this.cache.set(k, b);
    return b;
  }

  /** Look up the locations of all data chunks of a leaf in one getMany. */
  async warm(leaf: Leaf): Promise<void> {
    if (this.warmed.has(leaf)) return;
    this.warmed.add(leaf);
    const keys: Buffer[] = [];
    const names: string[] = [];
    for (let i = 0; i < leaf.lengths.length; i++) {
      if (leaf.zero[i]) continue;
      const d = leaf.digests.subarray(i * 32, i * 32 + 32);
      const k = d.toString('binary');
      if (leaf.hasFast[i] && !this.fasts.get(k)) this.fasts.set(k, Buffer.from(leaf.fast.subarray(i * 32, i * 32 + 32)));
      if (this.locations.get(k)) continue;
      keys.push(chunkKey(d));
      names.push(k);
    }
    if (!keys.length) return;
    const vals = await this.repo.db.getMany(keys);
    vals.forEach((v, i) => {
      if (v) this.locations.set(names[i]!, decodeLocation(v));
    });
  }

  /**
   * Whether chunk `ci` of a warmed leaf, or one of the two after it, is a member of the
   * group record `last` belongs to: a read-ahead step that ended there takes them along, so
   * that no group is split between two batches (two workers would each decode it whole).
   * Up to two others may sit between, as the next day's chunks do among the first day's.
   */
  groupGoesOn(leaf: Leaf, ci: number, last: Buffer): boolean {
    const g = this.locations.get(last.toString('binary'));
    if (!g || g.compression !== COMP_GROUP) return false;
    for (let c = ci; c < Math.min(ci + 3, leaf.lengths.length); c++) {
      if (!leaf.zero[c] && this.inGroup(leaf, c, g)) return true;
    }
    return false;
  }

  /** Whether chunk `c` of a warmed leaf is a member of the group record at `g`. */
  private inGroup(leaf: Leaf, c: number, g: ChunkLocation): boolean {
    const l = this.locations.get(leaf.digests.subarray(c * 32, c * 32 + 32).toString('binary'));
    return !!l && l.compression === COMP_GROUP && l.packId === g.packId && l.offset === g.offset;
  }

  /** Whether a chunk is neither decoded in the cache nor on its way there. */
  missing(digest: Buffer): boolean {
    const k = digest.toString('binary');
    return !this.inflight.has(k) && !this.cache.get(k);
  }

  /**
   * The chunks of a warmed leaf within `reach` of chunk `ci` that are members of the same
   * group record as it, in order (only `ci` itself when it is not a group member).
   */
  groupAround(leaf: Leaf, ci: number, reach = 64): Buffer[] {
    const at = (c: number) => leaf.digests.subarray(c * 32, c * 32 + 32);
    const g = this.locations.get(at(ci).toString('binary'));
    if (!g || g.compression !== COMP_GROUP) return [at(ci)];
    const out: Buffer[] = [];
    for (let c = Math.max(0, ci - reach); c < Math.min(leaf.lengths.length, ci + reach + 1); c++) {
      if (!leaf.zero[c] && this.inGroup(leaf, c, g)) out.push(at(c));
    }
    return out;
  }

  /** Where a chunk is (after warm(), without a round trip); null if the index lacks it. */
  async locationOf(digest: Buffer): Promise<ChunkLocation | null> {
    return this.locations.get(digest.toString('binary')) ?? (await this.repo.location(digest));
  }

  item(loc: ChunkLocation, digest: Buffer) {
    const fast = this.fasts.get(digest.toString('binary'));
    return {
      file: packObject(loc.packId),
      offset: loc.offset,
      storedLength: loc.storedLength,
      rawLength: loc.rawLength,
      compression: loc.compression,
      inner: loc.inner,
      groupRaw: loc.groupRaw,
      // Copies with their own 32-byte buffers: posting a view would clone its whole backing store.
      digest: Uint8Array.from(digest),
      fast: fast ? Uint8Array.from(fast) : null,
    };
  }

  private result(digest: Buffer, res: LoadResult): Buffer {
    if (res.damaged) throw new DamageError(`chunk ${digest.toString('hex')} is damaged: ${res.damaged}`, digest.toString('hex'));
    const d = res.data!;
    return Buffer.from(d.buffer, d.byteOffset, d.byteLength);
  }

  private async fetch(digest: Buffer): Promise<Buffer> {
    const loc = this.locations.get(digest.toString('binary')) ?? (await this.repo.location(digest));
    if (!loc) throw new DamageError(`chunk ${digest.toString('hex')} is missing from the index`, digest.toString('hex'));
    const res = await this.repo.pool.run({ op: 'load', direct: this.direct, ...this.item(loc, digest) });
    return this.result(digest, res);
  }

  /**
   * Start loading many chunks, a batch of them per worker message (a message costs tens of
   * microseconds each way, a chunk about a hundred). Results land in the cache.
   */
  prefetch(digests: Buffer[], batchBytes = 1 << 20): void {
    let batch: Array<{ digest: Buffer; loc: ChunkLocation; key: string }> = [];
    let bytes = 0;
    const flushBatch = () => {
      if (!batch.length) return;
      const b = batch;
      batch = [];
      bytes = 0;
      const settle: Array<{ resolve: (v: Buffer) => void; reject: (e: unknown) => void }> = [];
      for (const it of b) {
        const p = new Promise<Buffer>((resolve, reject) => settle.push({ resolve, reject }));
        const tracked = p.then(
          (v) => {
            this.inflight.delete(it.key);
            this.cache.set(it.key, v);
            return v;
          },
          (e) => {
            this.inflight.delete(it.key);
            throw e;
          },
        );
        tracked.catch(() => undefined);
        this.inflight.set(it.key, tracked);
      }
      const rawBytes = b.reduce((a, it) => a + it.loc.rawLength, 0);
      if (!this.slabs || rawBytes > this.slabs.slabBytes) return this.runBatch(b, settle, rawBytes);
      // In order, each once a slab has room for it.
      this.queue = this.queue.then(() => this.room(rawBytes)).then(() => this.runBatch(b, settle, rawBytes));
    };
    // The members of one group record go out in one batch, wherever they lie among the
    // digests: a group split between two batches is decoded by two workers. (A next-day
    // image reads the previous day's groups with its own new chunks between their members.)
    const units = new Map<string, Array<{ digest: Buffer; loc: ChunkLocation; key: string }>>();
    const seen = new Set<string>();
    for (const digest of digests) {
      const key = digest.toString('binary');
      if (seen.has(key) || this.inflight.has(key) || this.cache.get(key)) continue;
      seen.add(key);
      const loc = this.locations.get(key);
      if (!loc) continue; // not warmed: load() will fetch it on demand
      const unit = loc.compression === COMP_GROUP ? `${loc.offset} ${loc.packId}` : key;
      const it = { digest: Buffer.from(digest), loc, key };
      const members = units.get(unit);
      if (members) members.push(it);
      else units.set(unit, [it]);
    }
    for (const members of units.values()) {
      const unitBytes = members.reduce((a, it) => a + it.loc.rawLength, 0);
      if (bytes > 0 && bytes + unitBytes > batchBytes) flushBatch();
      for (const it of members) {
        batch.push(it);
        bytes += it.loc.rawLength;
      }
    }
    flushBatch();
  }

  /** Decode a batch (into a piece of a slab if there is one) and settle its chunks' promises. */
  private runBatch(b: Array<{ digest: Buffer; loc: ChunkLocation; key: string }>, settle: Array<{ resolve: (v: Buffer) => void; reject: (e: unknown) => void }>, rawBytes: number): void {
    const piece = this.slabPiece(rawBytes);
    if (this.slabs) this.batches[piece ? 'slab' : 'fresh']++;
    const into = piece ? { into: piece.use.slab, intoAt: piece.at } : {};
    // A location that cannot become a request (a damaged index) fails this batch's chunks, not
    // the batches queued behind it (an exception here would stop the queue for good).
    const run = Promise.resolve().then(() => this.repo.pool.run({ op: 'loadMany', items: b.map((it) => this.item(it.loc, it.digest)), ...into, direct: this.direct }));
    run.then(
      ({ all, results }) => {
        const whole = piece ? Buffer.from(piece.use.slab, piece.at, rawBytes) : Buffer.from(all!.buffer, all!.byteOffset, all!.byteLength);
        results.forEach((r, i) => {
          if (r.damaged) settle[i]!.reject(new DamageError(`chunk ${b[i]!.digest.toString('hex')} is damaged: ${r.damaged}`, b[i]!.digest.toString('hex')));
          else {
            const v = whole.subarray(r.offset!, r.offset! + r.length!);
            if (piece) {
              piece.use.refs++;
              this.slabOf.set(v, piece.use);
            }
            settle[i]!.resolve(v);
          }
        });
        if (piece) this.unref(piece.use);
        this.slabs?.landed();
      },
      (e) => {
        if (piece) this.unref(piece.use);
        settle.forEach((x) => x.reject(e));
        this.slabs?.landed();
      },
    );
  }
}

/** A read this close to the last one is near it (see ImageReader.read). */
const NEAR_READS = 16 << 20;
/** The first read-ahead window of a reader going on (see ImageReader.noteRead). */
const READAHEAD_START = 1 << 20;

/** Random access to one generation's bytes. */
export class ImageReader {
  private lastLeaf = -1;
  private lastLeafData: Leaf | null = null;
  private prefetchedTo = 0;
  private target = 0;
  private pumping = false;
  /** Where the reader goes on, for read-ahead (see noteRead). */
  private streak = new ReadStreak();

  private constructor(
    readonly gen: Generation,
    readonly map: ChunkMap,
    private loader: ChunkLoader,
    private readahead: number,
  ) {}

  static async open(repo: Repository, gen: Generation, loader: ChunkLoader, readahead = 16 << 20): Promise<ImageReader> {
    // Read-ahead lands in the cache: more of it than half the cache evicts what was read
    // ahead before the reader gets there (native-notes/fuse.md, memory).
    return new ImageReader(gen, await repo.chunkMap(gen), loader, Math.min(readahead, Math.floor(loader.cache.maxBytes / 2)));
  }

  get size(): number {
    return this.map.size;
  }

  private async leafAt(li: number): Promise<Leaf> {
    if (li !== this.lastLeaf) {
      const leaf = await this.map.leaf(li);
      await this.loader.warm(leaf);
      this.lastLeafData = leaf;
      this.lastLeaf = li;
    }
    return this.lastLeafData!;
  }

  /**
   * The fast path for the mount: if every chunk the read needs is already decoded (the
   * read-ahead's job) and in the current leaf, copy synchronously and return the byte
   * count; otherwise return null and let the caller use read(). No promises, no awaits:
   * the FUSE loop answers one request at a time, so this path's latency is the mount's speed.
   */
  tryRead(out: Buffer, offset: number, length: number): number | null {
    const size = this.map.size;
    if (offset >= size || length <= 0) return 0;
    const leaf = this.lastLeafData;
    if (!leaf) return null;
    const base = this.map.leafStarts[this.lastLeaf]!;
    const end = Math.min(size, offset + length);
    if (offset < base || end > base + leaf.bytes) return null;
    let ci = chunkIndexAt(leaf, offset - base);
    // First pass: everything present?
    const parts: Array<Buffer | null> = [];
    for (let c = ci, pos = offset; pos < end; c++) {
      if (leaf.zero[c]) parts.push(null);
      else {
        const data = this.loader.cached(leaf.digests.subarray(c * 32, c * 32 + 32));
        if (!data) return null;
        parts.push(data);
      }
      pos = base + leaf.starts[c]! + leaf.lengths[c]!;
    }
    let pos = offset;
    for (const data of parts) {
      const cStart = base + leaf.starts[ci]!;
      const cEnd = cStart + leaf.lengths[ci]!;
      const n = Math.min(cEnd, end) - pos;
      const dst = pos - offset;
      if (data) data.copy(out, dst, pos - cStart, pos - cStart + n);
      else out.fill(0, dst, dst + n);
      pos += n;
      ci++;
    }
    this.noteRead(offset, end);
    return end - offset;
  }

  /**
   * Read ahead only for sequential access, and only as far as the reader has shown it reads
   * on (ReadStreak: from READAHEAD_START up to `readahead`).
   */
  private noteRead(offset: number, end: number): void {
    const window = this.streak.note(offset, end, READAHEAD_START, this.readahead);
    if (window) this.prefetch(end, window);
  }

  /**
   * Read up to `length` bytes at `offset` into `out` (which must be that large).
   * Returns the number of bytes (short only at the end of the image).
   */
  async read(out: Buffer, offset: number, length: number): Promise<number> {
    const size = this.map.size;
    if (offset >= size || length <= 0) return 0;
    const end = Math.min(size, offset + length);
    let pos = offset;
    const waits: Array<Promise<void>> = [];
    // A miss near the last read (a file system hopping between nearby files) loads the
    // members of its group record around it too: one decode of the group serves the reads
    // that follow. A random read far away decodes only as far as its own chunk.
    const near = this.streak.lastEnd >= 0 && Math.abs(offset - this.streak.lastEnd) <= NEAR_READS;
    while (pos < end) {
      const li = this.map.leafIndexAt(pos);
      const leaf = await this.leafAt(li);
      const base = this.map.leafStarts[li]!;
      let ci = chunkIndexAt(leaf, pos - base);
      for (; ci < leaf.lengths.length && pos < end; ci++) {
        const cStart = base + leaf.starts[ci]!;
        const cEnd = cStart + leaf.lengths[ci]!;
        const from = pos - cStart;
        const n = Math.min(cEnd, end) - pos;
        const dst = pos - offset;
        if (leaf.zero[ci]) {
          out.fill(0, dst, dst + n);
        } else {
          const digest = leaf.digests.subarray(ci * 32, ci * 32 + 32);
          if (near && this.loader.missing(digest)) this.loader.prefetch(this.loader.groupAround(leaf, ci));
          waits.push(
            this.loader.load(digest).then(
              (data) => {
                data.copy(out, dst, from, from + n);
              },
              (e) => {
                if (e instanceof DamageError) {
                  throw new DamageError(
                    `${this.gen.name}@${this.gen.id}: ${e.message} (image bytes ${cStart}-${cEnd - 1})`,
                    e.digest,
                    [{ offset: cStart, length: cEnd - cStart }],
                  );
                }
                throw e;
              },
            ),
          );
        }
        pos += n;
      }
    }
    this.noteRead(offset, end);
    await Promise.all(waits);
    return end - offset;
  }

  /**
   * Which parts of [offset, offset + length) are zero chunks (stored as nothing) and which
   * hold data, as runs in order, adjacent runs of the same kind merged; at most `maxRuns`
   * runs (the last one then ends early). Only the map is read, never a chunk: this is what
   * an NBD client's block status query (base:allocation) is answered from.
   */
  async extents(offset: number, length: number, maxRuns = 1024): Promise<Array<{ length: number; zero: boolean }>> {
    const end = Math.min(this.map.size, offset + length);
    const out: Array<{ length: number; zero: boolean }> = [];
    let pos = offset;
    while (pos < end) {
      const li = this.map.leafIndexAt(pos);
      const leaf = await this.map.leaf(li);
      const base = this.map.leafStarts[li]!;
      for (let ci = chunkIndexAt(leaf, pos - base); ci < leaf.lengths.length && pos < end; ci++) {
        const n = Math.min(base + leaf.starts[ci]! + leaf.lengths[ci]!, end) - pos;
        const zero = leaf.zero[ci] === 1;
        const last = out[out.length - 1];
        if (last && last.zero === zero) last.length += n;
        else if (out.length >= maxRuns) return out;
        else out.push({ length: n, zero });
        pos += n;
      }
    }
    return out;
  }

  /**
   * Sequential read-ahead: one pump per reader walks the map from where it stopped to
   * `from + window` (window > 0, from noteRead), handing chunks to the workers in batches. A single cursor leaves
   * no gaps, so a sequential reader finds every chunk decoded or on its way.
   */
  private prefetch(from: number, window: number): void {
    const until = Math.min(this.map.size, from + window);
    if (from > this.prefetchedTo || from + 2 * this.readahead < this.prefetchedTo) {
      // the reader jumped: start over from here
      this.prefetchedTo = from;
      this.target = until;
    } else if (until > this.target) this.target = until;
    if (this.pumping) return;
    // Hand out read-ahead in steps of a quarter of it, not a FUSE read at a time: small
    // steps made batches of one or two chunks and split group records between workers,
    // each decoding the whole group for its part (native-notes/fuse.md, read-ahead).
    if (this.prefetchedTo > from && this.target - this.prefetchedTo < window / 4) return;
    this.pumping = true;
    void (async () => {
      try {
        while (this.prefetchedTo < this.target) {
          const pos = this.prefetchedTo;
          const li = this.map.leafIndexAt(pos);
          const leaf = await this.map.leaf(li);
          await this.loader.warm(leaf);
          const base = this.map.leafStarts[li]!;
          const want: Buffer[] = [];
          let end = pos;
          // Up to the target, and past it the rest of a group record the step ends in (see groupGoesOn).
          const goesOn = (ci: number) => end < this.target || (want.length > 0 && this.loader.groupGoesOn(leaf, ci, want[want.length - 1]!));
          for (let ci = chunkIndexAt(leaf, pos - base); ci < leaf.lengths.length && goesOn(ci); ci++) {
            if (!leaf.zero[ci]) want.push(leaf.digests.subarray(ci * 32, ci * 32 + 32));
            end = base + leaf.starts[ci]! + leaf.lengths[ci]!;
          }
          this.loader.prefetch(want);
          this.prefetchedTo = Math.max(end, this.prefetchedTo);
        }
      } catch {
        /* a failing read reports it; read-ahead just stops */
      } finally {
        this.pumping = false;
      }
    })();
  }
}

export function damageSummary(e: unknown): string {
  if (e instanceof DamageError) return e.message;
  if (e instanceof GenvaultError) return e.message;
  return String(e);
}

/**
 * Reading generations: chunk loading (pack read, decompress and SHA-256 check in a worker
 * thread, never on the event loop), a byte-bounded cache of decoded chunks shared by all
 * open images, and ImageReader for random access with read-ahead (used by the mount).
 */
import { DamageError, GenvaultError } from '../util/errors.js';
import { ChunkMap, chunkIndexAt, Leaf } from './chunkmap.js';
import { Generation } from './generation.js';
import { packPath } from './pack.js';
import { Repository } from './repository.js';

/** Decoded chunks by digest, bounded in bytes. */
export class ChunkCache {
  private m = new Map<string, Buffer>();
  private bytes = 0;
  constructor(readonly maxBytes: number) {}
  get(k: string): Buffer | undefined {
    const v = this.m.get(k);
    if (v) {
      this.m.delete(k);
      this.m.set(k, v);
    }
    return v;
  }
  set(k: string, v: Buffer): void {
    if (v.length > this.maxBytes) return;
    const old = this.m.get(k);
    if (old) {
      this.bytes -= old.length;
      this.m.delete(k);
    }
    this.m.set(k, v);
    this.bytes += v.length;
    while (this.bytes > this.maxBytes) {
      const [ok, ov] = this.m.entries().next().value as [string, Buffer];
      this.m.delete(ok);
      this.bytes -= ov.length;
    }
  }
}

export class ChunkLoader {
  private inflight = new Map<string, Promise<Buffer>>();
  readonly cache: ChunkCache;

  constructor(
    readonly repo: Repository,
    cacheBytes = 64 << 20,
  ) {
    this.cache = new ChunkCache(cacheBytes);
  }

  /** The raw bytes of a chunk, verified against its digest. Throws DamageError if it is bad. */
  load(digest: Buffer): Promise<Buffer> {
    const k = digest.toString('binary');
    const hit = this.cache.get(k);
    if (hit) return Promise.resolve(hit);
    let p = this.inflight.get(k);
    if (p) return p;
    p = this.fetch(digest).then(
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
    return p;
  }

  private async fetch(digest: Buffer): Promise<Buffer> {
    const hex = digest.toString('hex');
    const loc = await this.repo.location(digest);
    if (!loc) throw new DamageError(`chunk ${hex} is missing from the index`, hex);
    const res: { data?: Uint8Array; damaged?: string } = await this.repo.pool.run<{ data?: Uint8Array; damaged?: string }>({
      op: 'load',
      file: packPath(this.repo.dir, loc.packId),
      offset: loc.offset,
      storedLength: loc.storedLength,
      rawLength: loc.rawLength,
      compression: loc.compression,
      digest,
    }).catch((e: NodeJS.ErrnoException) => {
      if (e.code === 'ENOENT') return { damaged: `pack ${loc.packId} is missing` };
      throw e;
    });
    if (res.damaged) throw new DamageError(`chunk ${hex} is damaged: ${res.damaged}`, hex);
    const d = res.data!;
    return Buffer.from(d.buffer, d.byteOffset, d.byteLength);
  }
}

/** Random access to one generation's bytes. */
export class ImageReader {
  private lastLeaf = -1;
  private lastLeafData: Leaf | null = null;
  private prefetchedTo = 0;
  private lastEnd = -1;

  private constructor(
    readonly gen: Generation,
    readonly map: ChunkMap,
    private loader: ChunkLoader,
    private readahead: number,
  ) {}

  static async open(repo: Repository, gen: Generation, loader: ChunkLoader, readahead = 16 << 20): Promise<ImageReader> {
    return new ImageReader(gen, await repo.chunkMap(gen), loader, readahead);
  }

  get size(): number {
    return this.map.size;
  }

  private async leafAt(li: number): Promise<Leaf> {
    if (li !== this.lastLeaf) {
      this.lastLeafData = await this.map.leaf(li);
      this.lastLeaf = li;
    }
    return this.lastLeafData!;
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
    // Read ahead only for sequential access; random 4 KiB reads would waste it.
    if (offset === this.lastEnd || offset === 0) this.prefetch(end);
    this.lastEnd = end;
    await Promise.all(waits);
    return end - offset;
  }

  /** Start loading the chunks after `from` so sequential readers find them decoded. */
  private prefetch(from: number): void {
    if (this.readahead <= 0) return;
    const until = Math.min(this.map.size, from + this.readahead);
    if (this.prefetchedTo >= until && this.prefetchedTo - from <= this.readahead) return;
    const start = Math.max(from, this.prefetchedTo > from ? this.prefetchedTo : from);
    this.prefetchedTo = until;
    void (async () => {
      let pos = start;
      while (pos < until) {
        const li = this.map.leafIndexAt(pos);
        const leaf = await this.map.leaf(li);
        const base = this.map.leafStarts[li]!;
        for (let ci = chunkIndexAt(leaf, pos - base); ci < leaf.lengths.length && pos < until; ci++) {
          if (!leaf.zero[ci]) this.loader.load(leaf.digests.subarray(ci * 32, ci * 32 + 32)).catch(() => undefined);
          pos = base + leaf.starts[ci]! + leaf.lengths[ci]!;
        }
      }
    })().catch(() => undefined);
  }
}

export function damageSummary(e: unknown): string {
  if (e instanceof DamageError) return e.message;
  if (e instanceof GenvaultError) return e.message;
  return String(e);
}

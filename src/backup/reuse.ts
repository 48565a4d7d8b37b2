/**
 * Segments for a ChunkedSource (src/backup/chunked-source.ts) built from a previous
 * generation and a map of what changed since: the previous generation's chunks that no
 * changed run touches are offered by digest and never read (nor decompressed); each run
 * of its chunks that a change touches is read as it is now, cut into chunks and hashed
 * here (SHA-256, and BLAKE3 for the map in format 2). So a backup costs about the changed
 * bytes, not the image. Used by dirty-bitmap NBD sources and overlays of writable exports
 * (src/nbd/source.ts) and by LVM thin hints (src/source/thin.ts).
 */
import { Blake3Hasher, blake3 } from '@napi-rs/blake-hash';
import { chunkIdentity, type RepoKeys } from '../format/crypto.js';
import { chunkIndexAt, type ChunkMap } from '../format/chunkmap.js';
import { UNSEEDED, chunkSegment } from '../format/chunker.js';
import type { ChunkingParams } from '../format/config.js';
import type { ChunkedSegment, NeedFn, RemoteChunk } from './chunked-source.js';

export type Run = { from: number; to: number };

/** Unit of --verify-hints' sample: a block of an unchanged extent is read again whole or not at all. */
const VERIFY_BLOCK = 64 << 10;

/**
 * --verify-hints for bytes taken from the previous generation (`ours`, at image `offset`):
 * each VERIFY_BLOCK-aligned block of it is, with probability `share`, read again from the
 * source (`theirs(at, length)`) and compared. Returns the image offset of the first byte
 * that differs, or null; `onRead` counts what was read again.
 */
export async function sampleDiffers(
  ours: Buffer,
  offset: number,
  share: number,
  theirs: (at: number, length: number) => Promise<Buffer>,
  onRead: (length: number) => void,
): Promise<number | null> {
  const end = offset + ours.length;
  for (let b = offset; b < end; b = (Math.floor(b / VERIFY_BLOCK) + 1) * VERIFY_BLOCK) {
    if (Math.random() >= share) continue;
    const to = Math.min(end, (Math.floor(b / VERIFY_BLOCK) + 1) * VERIFY_BLOCK);
    const t = await theirs(b, to - b);
    onRead(to - b);
    const o = ours.subarray(b - offset, to - offset);
    if (!t.equals(o)) {
      let i = 0;
      while (t[i] === o[i]) i++;
      return b + i;
    }
  }
  return null;
}

export interface ReuseHooks {
  /** The changed runs [from, to) within [at, at + len), in order. */
  changed(at: number, len: number): Promise<Run[]>;
  /** The current bytes of [from, from + dst.length), whose changed runs are given. */
  readRegion(dst: Buffer, from: number, changed: Run[]): Promise<void>;
  /**
   * The current bytes of an unchanged chunk, when the repository cannot reuse it (damaged,
   * or condemned by a running gc) or for --verify-hints; they must hash as before.
   */
  readUnchanged(dst: Buffer, offset: number): Promise<void>;
  /** The failure when an unchanged chunk's bytes differ from the previous generation's. */
  stale(where: string, how: string): Error;
  /** The previous generation's bytes (to name the first byte that differs); returns how many were read. */
  readParent(dst: Buffer, offset: number): Promise<number>;
}

/** A chunk of a segment being delivered. */
interface SegChunk extends RemoteChunk {
  /** The previous generation's chunk at the same place: its bytes not read. */
  reused: boolean;
  /** The bytes, when they were read (chunks of changed regions). */
  bytes: Buffer | null;
}

export class ChunkReuse {
  constructor(
    /** The previous generation's map. */
    private map: ChunkMap,
    readonly chunking: ChunkingParams,
    /** The repository's format: BLAKE3 goes into the map from 2 on. */
    private version: number,
    /** An encrypted repository's keys (format 6): keyed identities, BLAKE3 and chunker, as the workers use. */
    private keys: RepoKeys | null,
    private hooks: ReuseHooks,
    private stats: { parentBytes: number; verifiedBytes: number },
    /** Share (0-1) of the reused chunks read again and checked (--verify-hints). */
    private verify = 0,
  ) {}

  /**
   * The readSegment of every source built on ChunkReuse: the segment of an image of `size`
   * bytes that starts at `at` (null past its end), the bytes it read counted in
   * `transferred.raw`.
   */
  async segmentAt(at: number, size: number, need: NeedFn, transferred: { raw: number }): Promise<ChunkedSegment | null> {
    const len = Math.min(this.chunking.segment, size - at);
    if (len <= 0) return null;
    const ahead = this.ahead;
    this.ahead = null;
    const chunks = await (ahead?.at === at ? ahead.chunks : this.chunksOf(at, len));
    // The next segment's reads and hashing go on while the pipeline decides about this
    // one (the source's round trips and this thread's hashing overlap instead of taking
    // turns); one segment ahead at most.
    const next = at + len;
    if (next < size) {
      const p = this.chunksOf(next, Math.min(this.chunking.segment, size - next));
      p.catch(() => undefined); // a backup that stops before asking for it
      this.ahead = { at: next, chunks: p };
    }
    await this.deliver(at, chunks, need);
    const seg = { offset: at, length: len, chunks: chunks.map(({ start, length, zero, digest, data, fast }) => ({ start, length, zero, digest, data, fast })) };
    transferred.raw += seg.chunks.reduce((n, c) => n + (c.data?.length ?? 0), 0);
    return seg;
  }

  /** The next segment's chunks, on their way (see segmentAt). */
  private ahead: { at: number; chunks: Promise<SegChunk[]> } | null = null;

  /**
   * The segment [at, at + len) as chunks: reused, or read and hashed. The regions that
   * changes touch are read all at once (each read is a round trip to the source), then cut
   * into chunks in order.
   */
  private async chunksOf(at: number, len: number): Promise<SegChunk[]> {
    const changed = await this.hooks.changed(at, len);
    const parts: Array<SegChunk | Promise<SegChunk[]>> = [];
    let region: [number, number] | null = null;
    const flush = () => {
      if (region) parts.push(this.chunkRegion(region[0], region[1], at, changed));
      region = null;
    };
    // The previous generation's chunks tile the segment when it was cut the same way; if
    // not, the whole segment is one region.
    const prev = await this.parentChunks(at, len);
    for (const c of prev ?? [{ start: 0, length: len, zero: false, digest: null, fast: null, data: null, reused: false, bytes: null }]) {
      const from = at + c.start;
      const to = from + c.length;
      if (!prev || changed.some((d) => d.from < to && d.to > from)) {
        region = region ? [region[0], to] : [from, to];
        continue;
      }
      flush();
      parts.push(c);
      this.stats.parentBytes += c.length;
    }
    flush();
    return (await Promise.all(parts)).flat();
  }

  /** Ask which data chunks the repository lacks and give those their bytes; check a sample of the reused ones. */
  private async deliver(at: number, chunks: SegChunk[], need: NeedFn): Promise<void> {
    const data = chunks.filter((c) => !c.zero);
    const answers = data.length ? await need(at, data.map((c) => ({ start: c.start, length: c.length, digest: c.digest! }))) : [];
    for (let k = 0; k < data.length; k++) {
      const c = data[k]!;
      if (answers[k]) c.data = c.reused ? await this.unchanged(at, c) : c.bytes;
    }
    if (this.verify <= 0) return;
    for (const c of chunks) if (c.reused && !c.data && Math.random() < this.verify) await this.unchanged(at, c, true);
  }

  /** A reused chunk's current bytes, which must be the previous generation's. */
  private async unchanged(at: number, c: SegChunk, sample = false): Promise<Buffer> {
    const b = Buffer.alloc(c.length);
    await this.hooks.readUnchanged(b, at + c.start);
    if (sample) this.stats.verifiedBytes += c.length;
    const ok = c.zero ? b.every((x) => x === 0) : chunkIdentity(this.keys, b).equals(c.digest!);
    if (ok) return b;
    const ours = Buffer.alloc(c.length);
    const got = await this.hooks.readParent(ours, at + c.start).catch(() => 0);
    let i = 0;
    while (i < got && b[i] === ours[i]) i++;
    const where = got ? `byte ${at + c.start + i} differs` : `bytes ${at + c.start}-${at + c.start + c.length - 1} differ`;
    throw this.hooks.stale(where, sample ? '--verify-hints' : 'a chunk read again');
  }

  /** The previous generation's chunks of [at, at + len), relative to at, if they tile it exactly. */
  private async parentChunks(at: number, len: number): Promise<SegChunk[] | null> {
    const map = this.map;
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
        out.push({ start: pos - at, length: leaf.lengths[ci]!, zero, digest: zero ? null : d(leaf.digests), fast, data: null, reused: true, bytes: null });
        pos += leaf.lengths[ci]!;
      }
    }
    return pos === at + len ? out : null;
  }

  /** Read [from, to) as it is now, chunk and hash it. */
  private async chunkRegion(from: number, to: number, at: number, changed: Run[]): Promise<SegChunk[]> {
    const bytes = Buffer.alloc(to - from);
    await this.hooks.readRegion(bytes, from, changed.filter((d) => d.from < to && d.to > from).map((d) => ({ from: Math.max(d.from, from), to: Math.min(d.to, to) })));
    return chunkSegment(bytes, bytes.length, this.chunking, this.keys ? this.keys.chunkSeed : UNSEEDED).map((sp) => {
      const b = bytes.subarray(sp.start, sp.start + sp.length);
      return {
        start: from - at + sp.start, length: sp.length, zero: sp.zero, reused: false, data: null,
        digest: sp.zero ? null : chunkIdentity(this.keys, b),
        fast: sp.zero || this.version < 2 ? null : this.keys ? Blake3Hasher.newKeyed(Buffer.from(this.keys.fast)).update(b).digestBuffer() : blake3(b),
        bytes: sp.zero ? null : b,
      };
    });
  }
}

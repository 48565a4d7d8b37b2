/**
 * A generation's chunk map, in two levels so that its cost grows with what changed,
 * not with the image size (a 1 TB disk must not add hundreds of MB of map per day):
 *
 * - Leaves: runs of consecutive chunk entries, cut where a data chunk's digest starts
 *   with a zero byte (content-defined, about every 256 chunks), so an unchanged stretch
 *   of disk yields byte-identical leaves in every generation. Leaves are stored once,
 *   under their own SHA-256, and shared.
 * - Top level: one 44-byte entry per leaf (digest, bytes covered, chunk count), stored
 *   per generation: about 26 KB per 100 GB of image.
 *
 * Leaf  : "GVL1" | count u32 | count x ( length u32 | kind u8 | digest(32) if kind>=1 | blake3(32) if kind=2 )
 *         kind 0 = zero chunk, 1 = data, 2 = data with its BLAKE3 (format version 2)
 * Top   : count x ( leaf digest(32) | bytes u64 | chunks u32 )
 */
import { createHash } from 'node:crypto';
import { GenvaultError, REPAIR_HINT } from '../util/errors.js';

/**
 * A map leaf that is missing, fails its digest or its structure, or does not fit its
 * generation's map: damage in the index, reported with the generation it breaks.
 */
export class LeafDamage extends GenvaultError {
  constructor(
    readonly digest: Buffer,
    readonly problem: string,
    generation = '',
  ) {
    super(`index damaged: map leaf ${digest.toString('hex')}${generation ? ` of ${generation}` : ''}: ${problem} (run 'genvault verify'; ${REPAIR_HINT})`, 'DAMAGED');
  }
}

export const LEAF_MAGIC = 0x314c5647; // "GVL1"
export const TOP_ENTRY = 44;

export interface LeafRef {
  digest: Buffer;
  bytes: number;
  chunks: number;
}

export interface ChunkEntry {
  length: number;
  zero: boolean;
  digest: Buffer | null;
  /**
   * BLAKE3 of the chunk's bytes: the next backup's change detector. A chunk at the same
   * offset with the same length and BLAKE3 takes this chunk's SHA-256 without computing it.
   */
  fast?: Buffer | null;
}

/** Builds leaves from a stream of chunk entries. */
export class LeafBuilder {
  private entries: ChunkEntry[] = [];
  private bytes = 0;
  private encodedSize = 8;

  constructor(
    private minChunks: number,
    private maxChunks: number,
  ) {}

  /** Add one chunk; returns a finished leaf when this chunk ends one. */
  add(e: ChunkEntry): { ref: LeafRef; encoded: Buffer } | null {
    this.entries.push(e);
    this.bytes += e.length;
    this.encodedSize += e.zero ? 5 : e.fast ? 69 : 37;
    const n = this.entries.length;
    const cut = n >= this.maxChunks || (n >= this.minChunks && !e.zero && e.digest![0] === 0);
    return cut ? this.finish() : null;
  }

  /** Finish the pending leaf (at image end); null when there is none. */
  finish(): { ref: LeafRef; encoded: Buffer } | null {
    if (!this.entries.length) return null;
    const buf = Buffer.allocUnsafe(this.encodedSize);
    buf.writeUInt32LE(LEAF_MAGIC, 0);
    buf.writeUInt32LE(this.entries.length, 4);
    let at = 8;
    for (const e of this.entries) {
      buf.writeUInt32LE(e.length, at);
      buf[at + 4] = e.zero ? 0 : e.fast ? 2 : 1;
      at += 5;
      if (!e.zero) {
        e.digest!.copy(buf, at);
        at += 32;
        if (e.fast) {
          e.fast.copy(buf, at);
          at += 32;
        }
      }
    }
    const ref: LeafRef = {
      digest: createHash('sha256').update(buf).digest(),
      bytes: this.bytes,
      chunks: this.entries.length,
    };
    this.entries = [];
    this.bytes = 0;
    this.encodedSize = 8;
    return { ref, encoded: buf };
  }
}

/** A decoded leaf: parallel arrays, offsets relative to the leaf start. */
export interface Leaf {
  starts: Float64Array;
  lengths: Uint32Array;
  /** 32 bytes per chunk; all-zero for zero chunks. */
  digests: Buffer;
  zero: Uint8Array;
  /** BLAKE3 per chunk (32 bytes each), valid where hasFast[i] is 1. */
  fast: Buffer;
  hasFast: Uint8Array;
  bytes: number;
}

/**
 * 32 bytes from `src` at `from` to `dst` at `to`, in JavaScript: Buffer.copy is a call into
 * C++ per digest, most of decodeLeaf's time when repair decodes every leaf (performance.md).
 */
function copy32(src: Buffer, from: number, dst: Buffer, to: number): void {
  for (let i = 0; i < 32; i++) dst[to + i] = src[from + i]!;
}

/** Most chunks a leaf may hold: far above what LeafBuilder writes (config `leaf.maxChunks`). */
const MAX_LEAF_CHUNKS = 1 << 20;

/** A leaf's chunk count, after checking its magic and that the count is plausible. */
function leafCount(buf: Buffer): number {
  if (buf.length < 8 || buf.readUInt32LE(0) !== LEAF_MAGIC) throw new Error('map leaf is corrupt (bad magic)');
  const n = buf.readUInt32LE(4);
  if (n === 0 || n > MAX_LEAF_CHUNKS || 8 + 5 * n > buf.length) throw new Error(`map leaf is corrupt (count ${n})`);
  return n;
}

/**
 * Walk an encoded leaf, checking its structure: magic, a plausible count, every entry
 * whole and of a known kind, every chunk non-empty, and nothing after the last entry. A
 * leaf that fails any of these is damaged (thrown as an Error naming what is wrong). `fn`
 * gets each entry: its index, length, kind (0 zero, 1 digest, 2 digest and BLAKE3) and
 * where its digest starts in `buf`. Returns the chunk count. Passes over every leaf that
 * only check it or look its digests up (repair) walk it instead of decoding it: the arrays
 * decodeLeaf fills were most of their time (performance.md, "Rebuilding the index").
 */
export function walkLeaf(buf: Buffer, fn?: (i: number, length: number, kind: number, at: number) => void): number {
  const n = leafCount(buf);
  let at = 8;
  for (let i = 0; i < n; i++) {
    if (at + 5 > buf.length) throw new Error('map leaf is corrupt (truncated)');
    const len = buf.readUInt32LE(at);
    const kind = buf[at + 4]!;
    if (len === 0) throw new Error('map leaf is corrupt (empty chunk)');
    if (kind > 2) throw new Error(`map leaf is corrupt (chunk kind ${kind})`);
    at += 5;
    if (at + 32 * kind > buf.length) throw new Error('map leaf is corrupt (truncated)');
    fn?.(i, len, kind, at);
    at += 32 * kind;
  }
  if (at !== buf.length) throw new Error(`map leaf is corrupt (${buf.length - at} bytes after its last entry)`);
  return n;
}

/** Decode a leaf, checking its structure (walkLeaf). */
export function decodeLeaf(buf: Buffer): Leaf {
  const n = leafCount(buf);
  const starts = new Float64Array(n);
  const lengths = new Uint32Array(n);
  const zero = new Uint8Array(n);
  const digests = Buffer.alloc(n * 32);
  const hasFast = new Uint8Array(n);
  let fast: Buffer | null = null;
  let off = 0;
  walkLeaf(buf, (i, len, kind, at) => {
    starts[i] = off;
    lengths[i] = len;
    off += len;
    if (kind === 0) {
      zero[i] = 1;
      return;
    }
    copy32(buf, at, digests, i * 32);
    if (kind === 2) {
      fast ??= Buffer.alloc(n * 32);
      copy32(buf, at + 32, fast, i * 32);
      hasFast[i] = 1;
    }
  });
  return { starts, lengths, digests, zero, fast: fast ?? Buffer.alloc(0), hasFast, bytes: off };
}

/**
 * A leaf as read from the index, checked before any reader uses it: its bytes must hash to
 * the digest it was looked up by (the index's own checksums are not verified on reads, so a
 * flipped bit would otherwise shift every later chunk of the image), its structure must
 * decode, and it must cover what the generation map says it covers. Throws an Error saying
 * which check failed.
 */
export function checkedLeaf(raw: Buffer, digest: Buffer, want?: { bytes: number; chunks: number }): Leaf {
  if (!createHash('sha256').update(raw).digest().equals(digest)) throw new Error('map leaf does not match its digest');
  const leaf = decodeLeaf(raw);
  if (want && (leaf.bytes !== want.bytes || leaf.lengths.length !== want.chunks)) {
    throw new Error(`map leaf holds ${leaf.lengths.length} chunks / ${leaf.bytes} bytes, the map says ${want.chunks} / ${want.bytes}`);
  }
  return leaf;
}

export function encodeTop(refs: LeafRef[]): Buffer {
  const buf = Buffer.allocUnsafe(refs.length * TOP_ENTRY);
  refs.forEach((r, i) => {
    const at = i * TOP_ENTRY;
    r.digest.copy(buf, at);
    buf.writeBigUInt64LE(BigInt(r.bytes), at + 32);
    buf.writeUInt32LE(r.chunks, at + 40);
  });
  return buf;
}

export function decodeTop(buf: Buffer): LeafRef[] {
  if (buf.length % TOP_ENTRY) throw new Error('generation map is corrupt (length)');
  const refs: LeafRef[] = [];
  for (let at = 0; at < buf.length; at += TOP_ENTRY) {
    const bytes = buf.readBigUInt64LE(at + 32);
    const chunks = buf.readUInt32LE(at + 40);
    if (bytes === 0n || bytes > BigInt(Number.MAX_SAFE_INTEGER) || chunks === 0 || chunks > MAX_LEAF_CHUNKS) {
      throw new Error(`generation map is corrupt (leaf ${at / TOP_ENTRY}: ${bytes} bytes, ${chunks} chunks)`);
    }
    refs.push({ digest: Buffer.from(buf.subarray(at, at + 32)), bytes: Number(bytes), chunks });
  }
  return refs;
}

/**
 * A generation's top-level map, checked against its record: the leaves must add up to the
 * image size and their number must be the record's `leaves`. (The map has no digest of
 * its own; these two sums catch a damaged entry, and each leaf is then checked against
 * its entry when it is loaded.)
 */
export function checkedTop(buf: Buffer, gen: { size: number; leaves?: number }): LeafRef[] {
  const refs = decodeTop(buf);
  const covered = refs.reduce((a, r) => a + r.bytes, 0);
  if (covered !== gen.size) throw new Error(`generation map covers ${covered} bytes, the image has ${gen.size}`);
  if (typeof gen.leaves === 'number' && gen.leaves !== refs.length) throw new Error(`generation map has ${refs.length} leaves, the record says ${gen.leaves}`);
  return refs;
}

/** Random access over a generation's map; leaves are fetched through `loadLeaf` (cached by the caller). */
export class ChunkMap {
  readonly leafStarts: Float64Array;
  readonly size: number;

  /**
   * @param loadLeaf fetches a leaf by digest, checked against it (Repository.loadLeaf)
   * @param label the generation (NAME@ID) named in damage reports
   */
  constructor(
    readonly refs: LeafRef[],
    private loadLeaf: (digest: Buffer) => Promise<Leaf>,
    private label = '',
  ) {
    this.leafStarts = new Float64Array(refs.length + 1);
    let off = 0;
    refs.forEach((r, i) => {
      this.leafStarts[i] = off;
      off += r.bytes;
    });
    this.leafStarts[refs.length] = off;
    this.size = off;
  }

  /** Index of the leaf holding image offset `off` (off < size). */
  leafIndexAt(off: number): number {
    return lastAtOrBefore(this.leafStarts, this.refs.length, off);
  }

  /** Leaf i, checked to cover exactly what the map says (chunk count and bytes). */
  async leaf(i: number): Promise<Leaf> {
    const ref = this.refs[i]!;
    let leaf: Leaf;
    try {
      leaf = await this.loadLeaf(ref.digest);
    } catch (e) {
      if (e instanceof LeafDamage && this.label) throw new LeafDamage(ref.digest, e.problem, this.label);
      throw e;
    }
    if (leaf.bytes !== ref.bytes || leaf.lengths.length !== ref.chunks) {
      throw new LeafDamage(ref.digest, `holds ${leaf.lengths.length} chunks / ${leaf.bytes} bytes, the map says ${ref.chunks} / ${ref.bytes}`, this.label);
    }
    return leaf;
  }
}

/** Index of the chunk holding relative offset `off` inside a leaf. */
export function chunkIndexAt(leaf: Leaf, off: number): number {
  return lastAtOrBefore(leaf.starts, leaf.starts.length, off);
}

/** Largest i < n with starts[i] <= x (binary search over ascending start offsets). */
function lastAtOrBefore(starts: Float64Array, n: number, x: number): number {
  let lo = 0;
  let hi = n - 1;
  while (lo < hi) {
    const mid = (lo + hi + 1) >>> 1;
    if (starts[mid]! <= x) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

/** Position in a map addressed chunk by chunk, for walking a whole generation in order. */
export interface ChunkRef {
  offset: number;
  length: number;
  zero: boolean;
  digest: Buffer;
}

/** Walk every chunk of a map in order; `onLeaf` runs before each leaf's chunks are yielded. */
export async function* walkChunks(map: ChunkMap, onLeaf?: (leaf: Leaf) => Promise<void>): AsyncGenerator<ChunkRef> {
  for (let li = 0; li < map.refs.length; li++) {
    const leaf = await map.leaf(li);
    await onLeaf?.(leaf);
    const base = map.leafStarts[li]!;
    for (let ci = 0; ci < leaf.lengths.length; ci++) {
      yield {
        offset: base + leaf.starts[ci]!,
        length: leaf.lengths[ci]!,
        zero: leaf.zero[ci] === 1,
        digest: leaf.digests.subarray(ci * 32, ci * 32 + 32),
      };
    }
  }
}

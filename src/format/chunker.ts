/**
 * Block-aligned content-defined chunking.
 *
 * Disk images hold filesystems that place file data at block-aligned offsets, so a
 * boundary only ever falls at a multiple of `block` (4 KiB). Whether a block ends a chunk
 * depends on a hash of that block alone, so the same file content produces the same
 * chunks wherever the filesystem put it (unlike fixed chunks, which see under 10% of a
 * re-laid-out disk as duplicate). Runs of all-zero blocks become separate zero chunks
 * (up to `max` bytes each) that store nothing.
 *
 * A segment (a fixed-size window of the image, e.g. 8 MiB) is chunked independently of
 * its neighbours, which lets two worker threads chunk and hash in parallel; the forced
 * cut at each segment edge costs under 1% of dedup.
 */
import type { ChunkingParams } from './config.js';

export interface ChunkSpan {
  /** Offset inside the segment. */
  start: number;
  length: number;
  zero: boolean;
}

const ZERO_PAGE = Buffer.alloc(65536);

/** True when buf[start, start+len) is all zero bytes. memcmp stops at the first non-zero. */
export function isZero(buf: Buffer, start: number, len: number): boolean {
  while (len > 0) {
    const n = len < ZERO_PAGE.length ? len : ZERO_PAGE.length;
    if (buf.compare(ZERO_PAGE, 0, n, start, start + n) !== 0) return false;
    start += n;
    len -= n;
  }
  return true;
}

/**
 * Hash of 16 words sampled across the block (one per 256 bytes). Only chunk placement
 * depends on it, never correctness, so sampling is enough and keeps chunking far
 * cheaper than the SHA-256 that follows.
 */
function blockHash(words: Int32Array, w0: number, wordsPerBlock: number, s0: number, s1: number): number {
  let h = s0;
  const step = wordsPerBlock >>> 4 || 1;
  for (let i = 0; i < wordsPerBlock; i += step) {
    h = Math.imul(h ^ words[w0 + i]! ^ s1, 0x85ebca6b);
    h ^= h >>> 13;
  }
  h = Math.imul(h, 0xc2b2ae35);
  return h ^ (h >>> 16);
}

/**
 * The chunks chunkSegment makes of `len` zero bytes, without looking at any: zero chunks
 * of `max` bytes and the rest. Used for segments a sparse source reports as all hole.
 */
export function zeroSegment(len: number, p: ChunkingParams): ChunkSpan[] {
  const out: ChunkSpan[] = [];
  for (let start = 0; start < len; start += p.max) out.push({ start, length: Math.min(p.max, len - start), zero: true });
  return out;
}

/**
 * The block hash's seeds in repositories without keys. An encrypted repository (format 6)
 * takes both from its key instead, so that chunk sizes do not fingerprint a known file.
 */
export const UNSEEDED: readonly [number, number] = [0x9e3779b9 | 0, 0];

/** Cut buf[0, len) into chunks. `len` need not be a multiple of the block size (image end). */
export function chunkSegment(buf: Buffer, len: number, p: ChunkingParams, seed: readonly [number, number] = UNSEEDED): ChunkSpan[] {
  const c = new SegmentChunker(buf, len, p, seed);
  const out: ChunkSpan[] = [];
  c.advance(len, (s) => out.push(s));
  return out;
}

/**
 * chunkSegment, fed as the segment's bytes arrive: advance(limit) decides every block that
 * lies wholly below `limit` and reports the chunks that end there. A worker that reads
 * a segment piece by piece hashes each chunk while its bytes are still in the CPU cache.
 * Whether a block ends a chunk depends only on the blocks up to it, so the chunks are the
 * same however the segment is fed.
 */
export class SegmentChunker {
  private readonly words: Int32Array;
  private readonly B: number;
  private readonly mask: number;
  private readonly wordsPerBlock: number;
  private start = 0;
  private zeroRun = false;
  private pos = 0;

  constructor(
    private readonly buf: Buffer,
    private readonly len: number,
    private readonly p: ChunkingParams,
    private readonly seed: readonly [number, number] = UNSEEDED,
  ) {
    this.B = p.block;
    this.mask = (1 << p.maskBits) - 1;
    this.wordsPerBlock = p.block >>> 2;
    // An unaligned buffer (never one of the backup's segments) is fed whole: a copy of it.
    this.words = buf.byteOffset % 4 === 0
      ? new Int32Array(buf.buffer, buf.byteOffset, Math.floor(len / 4))
      : new Int32Array(Uint8Array.from(buf.subarray(0, len - (len % 4))).buffer);
  }

  /** Decide the blocks below `limit` (len: all, and the last chunk ends); calls emit per chunk. */
  advance(limit: number, emit: (s: ChunkSpan) => void): void {
    const { buf, len, p, B, words } = this;
    let { start, zeroRun, pos } = this;
    while (pos < len) {
      const blen = Math.min(B, len - pos);
      if (pos + blen > limit) break;
      // Data blocks nearly always have a non-zero first word: decided without a call into
      // C++, whose per-call cost added up to a real share of chunking (performance.md,
      // "Figures behind code comments").
      const z = blen === B && words[pos >>> 2] !== 0 ? false : isZero(buf, pos, blen);
      const cur = pos - start;
      if (cur > 0) {
        if (zeroRun && !z) {
          // Data after zeros: a long zero run becomes its own chunk, a short one is absorbed.
          if (cur >= p.min) {
            emit({ start, length: cur, zero: true });
            start = pos;
          } else zeroRun = false;
        } else if (!zeroRun && z && cur >= p.min) {
          // Zeros after data: cut, so the zero run stores nothing.
          emit({ start, length: cur, zero: false });
          start = pos;
        }
      }
      if (pos === start) zeroRun = z;
      pos += blen;
      const size = pos - start;
      if (size >= p.max) {
        emit({ start, length: size, zero: zeroRun });
        start = pos;
        continue;
      }
      if (!zeroRun && !z && size >= p.min && blen === B) {
        if ((blockHash(words, (pos - B) >>> 2, this.wordsPerBlock, this.seed[0], this.seed[1]) & this.mask) === 0) {
          emit({ start, length: size, zero: false });
          start = pos;
        }
      }
    }
    if (pos >= len && pos > start) {
      emit({ start, length: pos - start, zero: zeroRun });
      start = pos;
    }
    this.start = start;
    this.zeroRun = zeroRun;
    this.pos = pos;
  }
}

/** The `chunk` op: chunking + SHA-256 (and BLAKE3) of a source segment, read here first when asked. */
import fs from 'node:fs';
import { SegmentChunker, type ChunkSpan } from '../format/chunker.js';
import type { ChunkAnswer, ChunkRequest, Reply, SegmentRead, SegmentReadFailure } from './protocol.js';
import { ZEROS } from './zeros.js';
import { chunkSeed, fastOf, identityOf } from './keys.js';

/** Bytes read per step while chunking along (a piece and its chunks stay in the CPU's L2). */
const READ_PIECE = 1 << 20;

/**
 * A segment's chunk table and digests, reused from request to request (the answer carries
 * copies cut to size). Fresh ones per segment were garbage that only the GC returned, so
 * malloc kept taking new pages for them, and fresh pages are expensive in this VM
 * (native-notes/performance.md, worker threads, "Chunk tables").
 */
function newChunkTables(most: number) {
  return { table: new Int32Array(most * 3), digests: new Uint8Array(most * 32), fast: new Uint8Array(most * 32) };
}
let chunkTables = newChunkTables(0);

export function handleChunk(req: ChunkRequest): Reply<ChunkAnswer> {
  const buf = Buffer.from(req.seg, 0, req.len);
  // At most one chunk per block, plus the last: tables sized for that, then cut.
  const most = Math.ceil(req.len / req.params.block) + 1;
  if (chunkTables.table.length < most * 3) chunkTables = newChunkTables(most);
  const { table, digests } = chunkTables;
  // Change detection: BLAKE3 runs much faster than SHA-256 here (figures in
  // native-notes/performance.md, worker threads, "BLAKE3 first"). A chunk whose
  // offset, length and BLAKE3 equal the parent's takes the parent's SHA-256; any other
  // chunk is hashed with SHA-256 as always. Both are collision-resistant, so a match
  // means the same bytes.
  const fast = req.fast ? chunkTables.fast : null;
  const p = req.parent;
  let pi = 0;
  let unchanged = 0;
  let n = 0;
  const hashChunk = (s: ChunkSpan) => {
    const i = n++;
    table[i * 3] = s.start;
    table[i * 3 + 1] = s.length;
    table[i * 3 + 2] = s.zero ? 1 : 0;
    if (s.zero) {
      // Zero chunks have no digests; the reused tables hold an earlier segment's here.
      digests.fill(0, i * 32, i * 32 + 32);
      fast?.fill(0, i * 32, i * 32 + 32);
      return;
    }
    const data = buf.subarray(s.start, s.start + s.length);
    if (fast) {
      const b3 = fastOf(data);
      fast.set(b3, i * 32);
      if (p) {
        while (pi < p.starts.length && p.starts[pi]! < s.start) pi++;
        if (pi < p.starts.length && p.starts[pi] === s.start && p.lengths[pi] === s.length && b3.equals(p.fast.subarray(pi * 32, pi * 32 + 32))) {
          digests.set(p.sha.subarray(pi * 32, pi * 32 + 32), i * 32);
          unchanged += s.length;
          return;
        }
      }
    }
    digests.set(identityOf(data), i * 32);
  };
  const chunker = new SegmentChunker(buf, req.len, req.params, chunkSeed);
  if (req.read) {
    // Read piece by piece and chunk and hash along: each chunk is hashed right after
    // its bytes arrived, while they are still in the CPU cache.
    const r = readSegment(req.read, buf, req.len, (upTo) => chunker.advance(upTo, hashChunk));
    if (r) return { result: r, transfer: [] };
  }
  chunker.advance(req.len, hashChunk);
  const cut = { table: table.slice(0, n * 3), digests: digests.slice(0, n * 32), fast: fast ? fast.slice(0, n * 32) : null };
  const transfer = [cut.table.buffer as ArrayBuffer, cut.digests.buffer as ArrayBuffer];
  if (cut.fast) transfer.push(cut.fast.buffer as ArrayBuffer);
  return { result: { ...cut, unchanged }, transfer };
}

/**
 * Fill buf[0, len) from the source: its data extents read in READ_PIECE steps (calling
 * `arrived` with how far the bytes are complete), holes zeroed. Returns null when all
 * went well, or what went wrong: a read error, or a file that ended early (it shrank).
 */
function readSegment(
  r: SegmentRead,
  buf: Buffer,
  len: number,
  arrived: (upTo: number) => void,
): SegmentReadFailure | null {
  let done = 0; // buf[0, done) is final
  const zeroTo = (to: number) => {
    for (let at = done; at < to; at += ZEROS.length) buf.set(ZEROS.subarray(0, Math.min(ZEROS.length, to - at)), at);
    done = to;
  };
  for (const [from, to] of r.extents ?? [[0, len]]) {
    zeroTo(from);
    while (done < to) {
      const want = Math.min(READ_PIECE, to - done);
      let got: number;
      try {
        got = fs.readSync(r.fd, buf, done, want, r.position + done);
      } catch (e) {
        const err = e as NodeJS.ErrnoException;
        return { readError: { code: err.code, message: err.message, offset: r.position + done } };
      }
      if (got === 0) return { short: r.position + done };
      done += got;
      arrived(done);
    }
  }
  zeroTo(len);
  return null;
}

/**
 * Worker thread for the CPU-heavy work: chunking + SHA-256 of source segments,
 * zstd compression of new chunks, and reading + decompressing + verifying chunks for
 * restore and the FUSE mount. Running these here keeps the main event loop (which
 * serves FUSE requests and LevelDB) free, and uses both cores.
 * Sync fs calls are fine here: this thread never serves the mount.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { createHash } from 'node:crypto';
import { blake3 } from '@napi-rs/blake-hash';
import fs from 'node:fs';
import os from 'node:os';
import { createRequire } from 'node:module';
import { SegmentChunker, type ChunkSpan } from '../format/chunker.js';
import type { ChunkingParams } from '../format/config.js';
import { alignSkipper } from '../util/holes.js';
import {
  COMP_GROUP,
  COMP_RAW,
  COMP_ZSTD,
  GROUP_MAX_MEMBERS,
  GROUP_MEMBER_SIZE,
  RECORD_HEADER_SIZE,
  checkGroupMember,
  checkRecord,
  checkRecordHeader,
  encodeRecordHeader,
} from '../format/pack.js';

export type WorkerRequest =
  | { op: 'chunk'; seg: SharedArrayBuffer; len: number; params: ChunkingParams; fast?: boolean; parent?: ParentWindow; read?: SegmentRead }
  | { op: 'compress'; seg: SharedArrayBuffer; spans: Int32Array; digests: Uint8Array; level: number; group?: number; out?: SharedArrayBuffer }
  | ({ op: 'load'; direct?: boolean } & LoadItem)
  | { op: 'loadMany'; items: LoadItem[]; into?: SharedArrayBuffer; intoAt?: number; direct?: boolean }
  | { op: 'restoreMany'; fd: number; items: RestoreItem[]; direct?: boolean };

/**
 * The parent generation's chunks inside a segment that carry a BLAKE3 digest: start
 * (relative to the segment), length, BLAKE3 and SHA-256 of each, in offset order.
 */
export interface ParentWindow {
  starts: Int32Array;
  lengths: Int32Array;
  fast: Uint8Array;
  sha: Uint8Array;
}

/**
 * Read the segment from the source's descriptor first (a DirectRead of it): only the data
 * extents are read, the rest is zeroed.
 */
export interface SegmentRead {
  fd: number;
  /** Image offset of the segment. */
  position: number;
  extents: Array<[number, number]> | null;
}

/** What a chunk op that read its segment returns instead of chunks when the read failed. */
export type SegmentReadFailure = { readError: { code?: string; message: string; offset: number } } | { short: number };

/** Bytes read per step while chunking along (a piece and its chunks stay in the CPU's L2). */
const READ_PIECE = 1 << 20;

/** A chunk to decode and write at `at` in the file descriptor (zero: write zeros, or skip if `hole`). */
export interface RestoreItem extends LoadItem {
  at: number;
  zero: boolean;
}

export interface LoadItem {
  file: string;
  offset: number;
  storedLength: number;
  rawLength: number;
  compression: number;
  /** Group members: where the chunk starts in the group's decoded bytes, and their total. */
  inner?: number;
  groupRaw?: number;
  digest: Uint8Array;
  /**
   * The chunk's BLAKE3 from the generation's map, when it has one: reads check that
   * instead of the SHA-256 (2.4x cheaper). The record header must still name `digest`.
   */
  fast?: Uint8Array | null;
  /** Check the SHA-256 as well as the BLAKE3 (verify --full). */
  alsoSha?: boolean;
}

export type LoadResult = { data?: Uint8Array; damaged?: string; offset?: number; length?: number };

// Run below the main thread: in a mount the main thread answers FUSE requests one at a
// time, and its latency, not the workers' throughput, bounds `dd` through the mount.
// Linux applies setpriority() to a single thread when given its thread id.
try {
  const tid = Number(fs.readlinkSync('/proc/thread-self').split('/').pop());
  const nice = Number((workerData as { nice?: number } | null)?.nice ?? 5);
  if (tid > 0 && nice > 0) os.setPriority(tid, Math.min(19, os.getPriority(tid) + nice));
} catch {
  /* not Linux, or not permitted: run at normal priority */
}

// zstd-napi's low-level binding compresses into and decompresses out of buffers we
// provide: no intermediate Buffer per chunk, so workers make little garbage.
interface ZstdBinding {
  CCtx: new () => { compress(dst: Uint8Array, src: Uint8Array, level: number): number };
  DCtx: new () => {
    decompress(dst: Uint8Array, src: Uint8Array): number;
    /** [bytes left to flush (0: frame done), bytes written, bytes consumed] */
    decompressStream(dst: Uint8Array, src: Uint8Array): [number, number, number];
    reset(directive: number): void;
  };
  ResetDirective: { sessionOnly: number };
  compressBound(n: number): number;
}
const zstd = createRequire(import.meta.url)('zstd-napi/binding.js') as ZstdBinding;
const cctx = new zstd.CCtx();
const dctx = new zstd.DCtx();
/** For decoding a group frame only as far as one member (it keeps a frame's state between calls). */
const prefixDctx = new zstd.DCtx();
/** A group's members gathered for compression. */
let groupBuf = Buffer.allocUnsafe(0);
/**
 * The last group records this worker decoded, most recent first: a restore or read-ahead
 * asks for a group's members one after the other, and each is cut from one decoded copy.
 * More than one: a later generation's restore meets an old group's members with its own
 * new chunks (in their own groups) between them. Keyed by pack file and offset; each
 * member is hashed when it is taken.
 */
const GROUP_CACHE = 4;
/** `valid`: how many bytes from the group's start are decoded (see decodeGroupMember). */
const decodedGroups: Array<{ file: string; offset: number; data: Uint8Array; valid: number }> = [];
/** Open pack descriptors, buffered and O_DIRECT ones apart; all dropped past 64 of a kind. */
const fds = { buffered: new Map<string, number>(), direct: new Map<string, number>() };

function fdFor(file: string, direct = false): number {
  const open = direct ? fds.direct : fds.buffered;
  let fd = open.get(file);
  if (fd === undefined) {
    if (open.size > 64) {
      for (const v of open.values()) fs.closeSync(v);
      open.clear();
    }
    fd = fs.openSync(file, direct ? fs.constants.O_RDONLY | fs.constants.O_DIRECT : 'r');
    open.set(file, fd);
  }
  return fd;
}

/**
 * A segment's chunk table and digests, reused from request to request (the answer carries
 * copies cut to size). Fresh ones per segment were garbage that only the GC returned, so
 * malloc kept taking new pages for them (fresh pages cost ~13 us each in this VM).
 */
function newChunkTables(most: number) {
  return { table: new Int32Array(most * 3), digests: new Uint8Array(most * 32), fast: new Uint8Array(most * 32) };
}
let chunkTables = newChunkTables(0);

/** pread until `length` bytes are in or the file ends; returns how many were read. */
function preadFull(fd: number, buf: Uint8Array, offset: number, length: number, position: number): number {
  let got = 0;
  while (got < length) {
    const n = fs.readSync(fd, buf, offset + got, length - got, position + got);
    if (n === 0) break;
    got += n;
  }
  return got;
}

/** What a request handler returns: the answer and the buffers to transfer with it. */
type WorkerReply = { result: unknown; transfer: ArrayBuffer[] };

function handle(req: WorkerRequest): WorkerReply {
  switch (req.op) {
    case 'chunk':
      return handleChunk(req);
    case 'compress':
      return handleCompress(req);
    case 'load':
      return handleLoad(req);
    case 'restoreMany':
      return handleRestoreMany(req);
    case 'loadMany':
      return handleLoadMany(req);
  }
}

function handleChunk(req: Extract<WorkerRequest, { op: 'chunk' }>): WorkerReply {
  const buf = Buffer.from(req.seg, 0, req.len);
  // At most one chunk per block, plus the last: tables sized for that, then cut.
  const most = Math.ceil(req.len / req.params.block) + 1;
  if (chunkTables.table.length < most * 3) chunkTables = newChunkTables(most);
  const { table, digests } = chunkTables;
  // Change detection: BLAKE3 runs at ~2.4x the speed of SHA-256 here. A chunk whose
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
      const b3 = blake3(data);
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
    digests.set(createHash('sha256').update(data).digest(), i * 32);
  };
  const chunker = new SegmentChunker(buf, req.len, req.params);
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

function handleCompress(req: Extract<WorkerRequest, { op: 'compress' }>): WorkerReply {
  const seg = Buffer.from(req.seg);
  const n = req.spans.length / 2;
  const group = req.group ?? 0;
  const lenOf = (i: number) => req.spans[i * 2 + 1]!;
  const rawOf = (i: number) => seg.subarray(req.spans[i * 2]!, req.spans[i * 2]! + lenOf(i));
  const digestOf = (i: number) => req.digests.subarray(i * 32, i * 32 + 32);
  // Groups: runs of consecutive new chunks up to `group` raw bytes (at least two chunks).
  const groups: Array<[number, number]> = []; // [first, end) chunk indexes
  for (let i = 0; i < n; ) {
    let j = i + 1;
    let bytes = lenOf(i);
    while (group > 0 && j < n && j - i < GROUP_MAX_MEMBERS && bytes + lenOf(j) <= group) bytes += lenOf(j++);
    groups.push([i, j]);
    i = j;
  }
  let bound = 0;
  for (const [i, j] of groups) {
    let raw = 0;
    for (let k = i; k < j; k++) raw += lenOf(k);
    // Enough for the group record, or for each member as a record of its own.
    bound += (j - i) * RECORD_HEADER_SIZE + 4 + (j - i) * GROUP_MEMBER_SIZE + zstd.compressBound(raw) + (j - i) * 64;
  }
  // One output buffer for the whole request (the caller's shared one when it is big
  // enough), records written straight into it.
  const shared = req.out !== undefined && req.out.byteLength >= bound;
  const out = shared ? Buffer.from(req.out!) : Buffer.from(new ArrayBuffer(bound));
  // Per chunk: record offset in out, stored length, compression, offset in the group, group raw length.
  const table = new Int32Array(n * 5);
  let at = 0;
  // One record per chunk, zstd where it saves at least 1/128 (0.8%), raw otherwise:
  // decoding raw chunks is free, and on the bench disk no chunk saves less than that but
  // more than nothing. A 3% cut stored 2.1 MiB more of a 4 GiB disk.
  const single = (i: number, tryZstd: boolean) => {
    const raw = rawOf(i);
    const payloadAt = at + RECORD_HEADER_SIZE;
    const zlen = tryZstd ? cctx.compress(out.subarray(payloadAt), raw, req.level) : raw.length;
    const useZ = tryZstd && zlen < raw.length - (raw.length >>> 7);
    if (!useZ) raw.copy(out, payloadAt);
    const stored = useZ ? zlen : raw.length;
    encodeRecordHeader(out, at, useZ ? COMP_ZSTD : COMP_RAW, raw.length, stored, digestOf(i));
    table.set([at, stored, useZ ? COMP_ZSTD : COMP_RAW, 0, 0], i * 5);
    at += RECORD_HEADER_SIZE + stored;
  };
  for (const [i, j] of groups) {
    if (j - i === 1) {
      single(i, true);
      continue;
    }
    // The members, one after the other, compressed as one frame after the member table.
    let raw = 0;
    for (let k = i; k < j; k++) raw += lenOf(k);
    if (groupBuf.length < raw) groupBuf = Buffer.allocUnsafe(Math.max(raw, group));
    const payloadAt = at + RECORD_HEADER_SIZE;
    const tableLen = 4 + (j - i) * GROUP_MEMBER_SIZE;
    out.writeUInt32LE(j - i, payloadAt);
    let inner = 0;
    for (let k = i; k < j; k++) {
      const e = payloadAt + 4 + (k - i) * GROUP_MEMBER_SIZE;
      out.set(digestOf(k), e);
      out.writeUInt32LE(lenOf(k), e + 32);
      rawOf(k).copy(groupBuf, inner);
      inner += lenOf(k);
    }
    const zlen = cctx.compress(out.subarray(payloadAt + tableLen), groupBuf.subarray(0, raw), req.level);
    if (zlen >= raw - (raw >>> 7)) {
      // The group does not compress: its members will not either; store them raw.
      for (let k = i; k < j; k++) single(k, false);
      continue;
    }
    const stored = tableLen + zlen;
    const tableDigest = createHash('sha256').update(out.subarray(payloadAt, payloadAt + tableLen)).digest();
    encodeRecordHeader(out, at, COMP_GROUP, raw, stored, tableDigest);
    inner = 0;
    for (let k = i; k < j; k++) {
      table.set([at, stored, COMP_GROUP, inner, raw], k * 5);
      inner += lenOf(k);
    }
    at += RECORD_HEADER_SIZE + stored;
  }
  const result = new Uint8Array(out.buffer, 0, at);
  const transfer = shared ? [table.buffer as ArrayBuffer] : [out.buffer as ArrayBuffer, table.buffer as ArrayBuffer];
  return { result: { out: result, table }, transfer };
}

function handleLoad(req: Extract<WorkerRequest, { op: 'load' }>): WorkerReply {
  const r = loadRun([req], undefined, req.direct)[0]!; // one item, buffered: loadRun calls loadChunk
  return { result: r, transfer: r.data ? [r.data.buffer as ArrayBuffer] : [] };
}

function handleRestoreMany(req: Extract<WorkerRequest, { op: 'restoreMany' }>): WorkerReply {
  // Decode and write here: no chunk data crosses threads, the main thread only plans.
  // The fd belongs to the process, so the main thread's descriptor works here.
  const damaged: number[] = [];
  const data = req.items.filter((it) => !it.zero);
  const need = data.reduce((a, it) => a + it.rawLength, 0);
  if (scratch.length < need) scratch = new Uint8Array(need);
  const offs: number[] = [];
  let total = 0;
  for (const it of data) {
    offs.push(total);
    total += it.rawLength;
  }
  const loaded = loadRun(data, (i) => scratch.subarray(offs[i]!, offs[i]! + data[i]!.rawLength), req.direct);
  // Chunks that follow each other in the image lie next to each other in scratch too:
  // write each such run with one pwrite (a tenth fewer core-seconds for a restore).
  let runFrom = -1; // scratch offset of the pending run
  let runAt = 0;
  let runLen = 0;
  const flush = () => {
    if (runLen > 0) writeAll(req.fd, scratch.subarray(runFrom, runFrom + runLen), runLen, runAt);
    runLen = 0;
  };
  let k = 0;
  req.items.forEach((it, i) => {
    if (it.zero) {
      flush();
      writeAll(req.fd, ZEROS, it.rawLength, it.at);
      return;
    }
    const r = loaded[k]!;
    const from = offs[k++]!;
    if (r.damaged) {
      flush();
      damaged.push(i);
      return;
    }
    if (runLen > 0 && runAt + runLen === it.at && runFrom + runLen === from) runLen += it.rawLength;
    else {
      flush();
      runFrom = from;
      runAt = it.at;
      runLen = it.rawLength;
    }
  });
  flush();
  return { result: { damaged }, transfer: [] };
}

function handleLoadMany(req: Extract<WorkerRequest, { op: 'loadMany' }>): WorkerReply {
  // Many chunks per message: a message costs tens of microseconds each way.
  // All chunks go back in one buffer: one transfer and one object for the GC per batch.
  // Decode each chunk straight into its place in the one buffer sent back.
  const offsets: number[] = [];
  let total = 0;
  for (const it of req.items) {
    offsets.push(total);
    total += it.rawLength;
  }
  // Into the caller's shared slab when it gave one (nothing to send back but offsets).
  const at = req.intoAt ?? 0;
  const shared = req.into !== undefined && req.into.byteLength - at >= total;
  const all = shared ? new Uint8Array(req.into!, at, total) : new Uint8Array(total);
  const results = loadRun(req.items, (i) => all.subarray(offsets[i]!, offsets[i]! + req.items[i]!.rawLength), req.direct);
  const out: LoadResult[] = results.map((r, i) =>
    r.data ? { offset: offsets[i]!, length: r.data.length } : { damaged: r.damaged },
  );
  if (shared) return { result: { results: out }, transfer: [] };
  return { result: { all, results: out }, transfer: [all.buffer as ArrayBuffer] };
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

const ZEROS = new Uint8Array(1 << 20);
/** Reused decode buffer for restores (grows to the largest batch). */
let scratch = new Uint8Array(4 << 20);

/**
 * Restore writes into one file take turns on a lock word shared by the pool's workers.
 * The kernel serialises them anyway (the inode lock), but its waiters spin while the
 * holder copies into fresh pages; here they sleep, and their core decodes for the others.
 * Cold restores of the bench disk, 10 alternating rounds: median 3.83-4.04 s against
 * 3.89-4.33 s, CPU 6.0-6.3 against 6.3-7.1 s.
 */
const writeLock = (workerData as { writeLock?: SharedArrayBuffer } | null)?.writeLock;
const lockWord = writeLock ? new Int32Array(writeLock) : null;

function writeAll(fd: number, data: Uint8Array, length: number, at: number): void {
  if (lockWord) {
    while (Atomics.compareExchange(lockWord, 0, 0, 1) !== 0) Atomics.wait(lockWord, 0, 1);
  }
  try {
    writeAllUnlocked(fd, data, length, at);
  } finally {
    if (lockWord) {
      Atomics.store(lockWord, 0, 0);
      Atomics.notify(lockWord, 0, 1);
    }
  }
}

function writeAllUnlocked(fd: number, data: Uint8Array, length: number, at: number): void {
  let done = 0;
  while (done < length) {
    const src = data === ZEROS ? ZEROS.subarray(0, Math.min(ZEROS.length, length - done)) : data.subarray(done, length);
    done += fs.writeSync(fd, src, 0, src.length, at + done);
  }
}

/**
 * O_DIRECT pack reads, for readers that pass over data once (restore, cat, verify): the pack
 * bytes go straight into this worker's buffer, with no page-cache pages to allocate and
 * fill and nothing of the machine's cache evicted by a multi-terabyte restore. Cold
 * restores of the bench disk: 3.5-3.6 s against 4.2-4.9 s, 5.6 against 7.8 core-seconds.
 * Offsets, lengths and memory must be aligned; without the addon that finds a buffer's
 * address, or on a file system that refuses O_DIRECT, packs are read through the cache.
 */
const DIRECT_ALIGN = 4096;
const alignSkip = alignSkipper();
let directOk = alignSkip !== null;
let directBuf = Buffer.alloc(0);
let directSkip = 0;

/** Pack bytes [start, end) read with O_DIRECT; null when that cannot be done here (read them buffered). */
function readDirect(file: string, start: number, end: number): { span: Buffer; got: number } | null {
  if (!directOk) return null;
  const a0 = start - (start % DIRECT_ALIGN);
  const need = Math.ceil(end / DIRECT_ALIGN) * DIRECT_ALIGN - a0;
  if (directBuf.length - directSkip < need) {
    directBuf = Buffer.allocUnsafeSlow(need + DIRECT_ALIGN);
    directSkip = alignSkip!(directBuf, DIRECT_ALIGN);
  }
  let got: number;
  try {
    // At the end of the pack the last read may stop anywhere.
    got = preadFull(fdFor(file, true), directBuf, directSkip, need, a0);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'EINVAL') directOk = false; // no O_DIRECT here
    return null; // the buffered read reports any real error
  }
  const lead = start - a0;
  return { span: directBuf.subarray(directSkip + lead, directSkip + lead + (end - start)), got: Math.max(0, got - lead) };
}

/**
 * Load chunks, reading records that lie next to each other in one pack with one read:
 * a cold sequential restore then reads packs in large pieces instead of ~30 KiB each.
 */
let spanBuf = Buffer.allocUnsafe(1 << 20);

function loadRun(items: LoadItem[], dest?: (i: number) => Uint8Array, direct = false): LoadResult[] {
  const results: LoadResult[] = new Array(items.length);
  let i = 0;
  while (i < items.length) {
    let j = i + 1;
    let end = items[i]!.offset + RECORD_HEADER_SIZE + items[i]!.storedLength;
    while (
      j < items.length &&
      items[j]!.file === items[i]!.file &&
      // the next record, or the same group record again (another member of it)
      (items[j]!.offset >= end || items[j]!.offset === items[j - 1]!.offset) &&
      items[j]!.offset - end <= 65536 &&
      items[j]!.offset + RECORD_HEADER_SIZE + items[j]!.storedLength - items[i]!.offset <= 8 << 20
    ) {
      end = Math.max(end, items[j]!.offset + RECORD_HEADER_SIZE + items[j]!.storedLength);
      j++;
    }
    const start = items[i]!.offset;
    const viaDirect = direct ? readDirect(items[i]!.file, start, end) : null;
    if (j - i === 1 && !viaDirect) {
      results[i] = loadChunk(items[i]!, dest?.(i));
    } else {
      let span: Buffer;
      let got = 0;
      if (viaDirect) ({ span, got } = viaDirect);
      else {
        if (spanBuf.length < end - start) spanBuf = Buffer.allocUnsafe(end - start);
        span = spanBuf.subarray(0, end - start); // reused: decoding copies out of it
        try {
          got = preadFull(fdFor(items[i]!.file), span, 0, span.length, start);
        } catch {
          got = -1;
        }
      }
      for (let k = i; k < j; k++) {
        const it = items[k]!;
        const from = it.offset - start;
        const to = from + RECORD_HEADER_SIZE + it.storedLength;
        if (got >= to && dest && it.compression === COMP_GROUP) {
          const m = wholeGroupInPlace(items, k, j, dest);
          if (m > 0) {
            decodeGroupInPlace(items, k, m, span.subarray(from, to), dest, results);
            k += m - 1;
            continue;
          }
        }
        results[k] = got >= to ? decodeRecord(it, span.subarray(from, to), dest?.(k)) : loadChunk(it, dest?.(k));
      }
    }
    i = j;
  }
  return results;
}

function loadChunk(req: LoadItem, into?: Uint8Array): LoadResult {
  const total = RECORD_HEADER_SIZE + req.storedLength;
  if (spanBuf.length < total) spanBuf = Buffer.allocUnsafe(total);
  const buf = spanBuf.subarray(0, total); // reused: decoding copies out of it
  let fd: number;
  try {
    fd = fdFor(req.file);
  } catch (e) {
    return { damaged: `cannot open pack: ${(e as Error).message}` };
  }
  const got = preadFull(fd, buf, 0, total, req.offset);
  if (got < total) return { damaged: `pack record truncated (${got} of ${total} bytes)` };
  return decodeRecord(req, buf, into);
}

/**
 * Check a record (header + payload) against the index entry, decompress, verify the
 * content: BLAKE3 when the map gave one, else SHA-256.
 * With `into`, the raw bytes are written there (it must hold rawLength bytes).
 */
function decodeRecord(req: LoadItem, buf: Buffer, into?: Uint8Array): LoadResult {
  if (req.compression === COMP_GROUP) return decodeGroupMember(req, buf, into);
  const c = checkRecord(buf, req, { headerCompression: true });
  if ('problem' in c) return { damaged: c.problem };
  const h = c.header;
  const payload = c.payload;
  const raw = into ? into.subarray(0, req.rawLength) : new Uint8Array(req.rawLength);
  let n: number;
  if (h.compression === COMP_ZSTD) {
    try {
      n = dctx.decompress(raw, payload);
    } catch (e) {
      return { damaged: `zstd: ${(e as Error).message}` };
    }
  } else {
    n = payload.length;
    if (n === raw.length) raw.set(payload);
  }
  if (n !== req.rawLength) return { damaged: `decoded ${n} bytes, expected ${req.rawLength}` };
  return checkContent(req, raw);
}

/** Hash a decoded chunk: BLAKE3 when the map gave one, else (or also, for verify) SHA-256. */
function checkContent(req: LoadItem, raw: Uint8Array): LoadResult {
  if ((!req.fast || req.alsoSha) && !createHash('sha256').update(raw).digest().equals(req.digest)) {
    return { damaged: 'content does not match its SHA-256 digest' };
  }
  if (req.fast && !blake3(raw).equals(req.fast)) return { damaged: 'content does not match its BLAKE3 digest' };
  return { data: raw };
}

/**
 * How many items from k on are all the members of one group record, in order, with
 * destinations that lie one after the other in one buffer (a restore or read-ahead of a
 * stretch the group was written from); 0 if they are not. The group can then be decoded
 * straight into place, without the copy out of decodedGroups.
 */
function wholeGroupInPlace(items: LoadItem[], k: number, end: number, dest: (i: number) => Uint8Array): number {
  const first = items[k]!;
  const groupRaw = first.groupRaw;
  if (groupRaw === undefined || first.inner !== 0) return 0;
  const d0 = dest(k);
  let at = 0;
  let x = k;
  while (x < end && at < groupRaw) {
    const it = items[x]!;
    if (it.offset !== first.offset || it.file !== first.file || it.inner !== at) return 0;
    const d = dest(x);
    if (d.buffer !== d0.buffer || d.byteOffset !== d0.byteOffset + at || d.length < it.rawLength) return 0;
    at += it.rawLength;
    x++;
  }
  return at === groupRaw && d0.byteOffset + groupRaw <= d0.buffer.byteLength ? x - k : 0;
}

/** Decode a group record straight into its members' destinations (see wholeGroupInPlace). */
function decodeGroupInPlace(items: LoadItem[], k: number, m: number, rec: Buffer, dest: (i: number) => Uint8Array, results: LoadResult[]): void {
  const first = items[k]!;
  const fail = (why: string) => {
    for (let x = k; x < k + m; x++) results[x] = { damaged: why };
  };
  // The header against the first member's entry (inner 0, groupRaw set: see wholeGroupInPlace).
  const hc = checkRecordHeader(rec, first);
  if ('problem' in hc) return fail(hc.problem);
  const h = hc.header;
  const payload = rec.subarray(RECORD_HEADER_SIZE);
  const d0 = dest(k);
  const whole = new Uint8Array(d0.buffer, d0.byteOffset, h.rawLength);
  let frameAt = -1;
  for (let x = k; x < k + m; x++) {
    const it = items[x]!;
    const member = checkGroupMember(payload, h.rawLength, it.digest, it.inner!, it.rawLength);
    if ('problem' in member) {
      // Name exactly the members the table gets wrong: take them one by one.
      for (let y = k; y < k + m; y++) results[y] = decodeRecord(items[y]!, rec, dest(y));
      return;
    }
    frameAt = member.frameAt;
  }
  let n: number;
  try {
    n = dctx.decompress(whole, payload.subarray(frameAt));
  } catch (e) {
    return fail(`zstd: ${(e as Error).message}`);
  }
  if (n !== h.rawLength) return fail(`decoded ${n} bytes, expected ${h.rawLength}`);
  for (let x = k; x < k + m; x++) results[x] = checkContent(items[x]!, dest(x).subarray(0, items[x]!.rawLength));
}

/**
 * One member of a group record: the member table must name it at its place, the group is
 * decoded once (kept in decodedGroups for the members that follow) and the member's bytes are
 * hashed like any chunk's.
 */
function decodeGroupMember(req: LoadItem, buf: Buffer, into?: Uint8Array): LoadResult {
  const inner = req.inner ?? 0;
  const member = checkRecord(buf, req);
  if ('problem' in member) return { damaged: member.problem };
  const { payload } = member;
  const groupRaw = member.header.rawLength;
  const need = inner + req.rawLength;
  let hit = decodedGroups.findIndex((g) => g.offset === req.offset && g.file === req.file);
  if (hit < 0 || decodedGroups[hit]!.valid < need) {
    // Decode into the least recently used slot (a new one until there are GROUP_CACHE), or
    // again into this group's slot when it holds only a part before this member.
    const again = hit >= 0;
    if (!again) {
      const slot = decodedGroups.length < GROUP_CACHE ? { file: '', offset: -1, data: new Uint8Array(0), valid: 0 } : decodedGroups.pop()!;
      if (slot.data.length < groupRaw) slot.data = new Uint8Array(Math.max(groupRaw, 1 << 20));
      decodedGroups.push(slot);
      hit = decodedGroups.length - 1;
    }
    const slot = decodedGroups[hit]!;
    slot.offset = -1;
    slot.valid = 0;
    const frame = payload.subarray(member.frameAt);
    // A member in the first three quarters of a group is decoded only up to its end: a
    // random read through the mount costs about half a group's decoding instead of all of
    // it. A second member past that part (reads going forward) decodes the whole group.
    const partial = !again && need <= groupRaw - (groupRaw >>> 2);
    let n: number;
    try {
      n = partial ? decodePrefix(slot.data.subarray(0, groupRaw), frame, need) : dctx.decompress(slot.data.subarray(0, groupRaw), frame);
    } catch (e) {
      return { damaged: `zstd: ${(e as Error).message}` };
    }
    if (partial ? n < need : n !== groupRaw) return { damaged: `decoded ${n} bytes, expected ${partial ? `at least ${need}` : groupRaw}` };
    slot.file = req.file;
    slot.offset = req.offset;
    slot.valid = n;
  }
  const g = decodedGroups[hit]!;
  if (hit > 0) decodedGroups.unshift(...decodedGroups.splice(hit, 1));
  const part = g.data.subarray(inner, inner + req.rawLength);
  const raw = into ? into.subarray(0, req.rawLength) : new Uint8Array(req.rawLength);
  raw.set(part);
  return checkContent(req, raw);
}

/**
 * Decode a zstd frame into dst until `until` bytes are out (or the frame ends); returns how
 * many bytes are.
 */
function decodePrefix(dst: Uint8Array, frame: Uint8Array, until: number): number {
  prefixDctx.reset(zstd.ResetDirective.sessionOnly);
  let out = 0;
  let used = 0;
  while (out < until) {
    // Room for only what is asked: given room for the whole frame, zstd decodes all of it in one pass.
    const [left, wrote, read] = prefixDctx.decompressStream(dst.subarray(out, until), frame.subarray(used));
    out += wrote;
    used += read;
    if (left === 0 || (wrote === 0 && read === 0)) break; // frame done, or stuck (truncated input)
  }
  return out;
}

parentPort!.on('message', (msg: { id: number; req: WorkerRequest }) => {
  try {
    const { result, transfer } = handle(msg.req);
    parentPort!.postMessage({ id: msg.id, result }, transfer);
  } catch (e) {
    const err = e as NodeJS.ErrnoException;
    parentPort!.postMessage({ id: msg.id, error: { message: err.message, code: err.code } });
  }
});

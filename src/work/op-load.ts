/**
 * The `load` and `loadMany` ops, and the pack reader under them and under `restoreMany`:
 * reads of neighbouring records in one go (O_DIRECT or through the cache), record checks,
 * zstd decoding (group records whole, in place, or cached), content hashes.
 */
import { workerData } from 'node:worker_threads';
import { openSyncReader } from '../store/open.js';
import type { StoreSpec, SyncReader } from '../store/store.js';
import {
  COMP_GROUP,
  COMP_ZSTD,
  RECORD_HEADER_SIZE,
  checkGroupMember,
  checkRecord,
  checkRecordHeader,
} from '../format/pack.js';
import type { LoadAnswer, LoadItem, LoadManyAnswer, LoadManyRequest, LoadRequest, LoadResult, Reply } from './protocol.js';
import { zstd } from './zstd.js';
import { fastOf, identityOf, keys } from './keys.js';
import { SEAL_BROKEN, SEAL_OVERHEAD, openInto, recordAd } from '../format/crypto.js';
import { SpanReader, type PackSpan } from './spans.js';

const dctx = new zstd.DCtx();
/** For decoding a group frame only as far as one member (it keeps a frame's state between calls). */
const prefixDctx = new zstd.DCtx();
/**
 * The last group records this worker decoded, most recent first: a restore or read-ahead
 * asks for a group's members one after the other, and each is cut from one decoded copy.
 * More than one: a later generation's restore meets an old group's members with its own
 * new chunks (in their own groups) between them. Keyed by pack file and offset; each
 * member is hashed when it is taken.
 */
const GROUP_CACHE = 4;
/**
 * `valid`: how many bytes from the group's start are decoded (see decodeGroupMember).
 * `frame` (`frameLength` bytes, 0: none): a sealed group's opened zstd frame, kept while only
 * a part of it is decoded, so that the members past that part do not open it again.
 */
interface GroupSlot {
  file: string;
  offset: number;
  data: Uint8Array;
  valid: number;
  frame: Uint8Array;
  frameLength: number;
}
const decodedGroups: GroupSlot[] = [];
/**
 * The packs, read synchronously (this thread never serves the mount) through the store the
 * pool was made for, its descriptors cached.
 *
 * O_DIRECT pack reads (`direct`), for readers that pass over data once (restore, cat,
 * verify): the pack bytes go straight into this worker's buffer, with no page-cache pages
 * to allocate and fill and nothing of the machine's cache evicted by a multi-terabyte
 * restore. Cold restores are faster and take fewer core-seconds (native-notes/performance.md,
 * worker threads, "O_DIRECT"). Where the store cannot (no aligning addon, a file system
 * that refuses O_DIRECT), readDirect says so and packs are read through the cache.
 */
const packs: SyncReader | null = (() => {
  const spec = (workerData as { store?: StoreSpec } | null)?.store;
  return spec ? openSyncReader(spec) : null;
})();

/** The spans the current request carries (a store without synchronous reads: spans.ts). */
let provided: SpanReader | null = null;

/** Run a request's handler reading from the spans it carries, if any. */
export function withSpans<T>(spans: PackSpan[] | undefined, fn: () => T): T {
  provided = spans ? new SpanReader(spans) : null;
  try {
    return fn();
  } finally {
    provided = null;
  }
}

function packReader(): SyncReader {
  if (provided) return provided;
  // A store whose reads are not local system calls has no sync reader (store.ts): its
  // requests carry the spans the main thread read (spans.ts).
  if (!packs) throw new Error('this worker pool cannot read packs (no store, or a store without synchronous reads)');
  return packs;
}

export function handleLoad(req: LoadRequest): Reply<LoadAnswer> {
  const r = loadRun([req], undefined, req.direct)[0]!; // one item, buffered: loadRun calls loadChunk
  return { result: r, transfer: r.data ? [r.data.buffer as ArrayBuffer] : [] };
}

export function handleLoadMany(req: LoadManyRequest): Reply<LoadManyAnswer> {
  // Many chunks per message: a message has a cost of its own each way (figures in
  // native-notes/performance.md, worker threads, "Batches").
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
 * Load chunks, reading records that lie next to each other in one pack with one read:
 * a cold sequential restore then reads packs in large pieces instead of a record at a time
 * (native-notes/performance.md, worker threads, "Neighbouring records").
 */
let spanBuf = Buffer.allocUnsafe(1 << 20);

export function loadRun(items: LoadItem[], dest?: (i: number) => Uint8Array, direct = false): LoadResult[] {
  const results: LoadResult[] = new Array(items.length);
  groupNeeds = items.length > 1 ? needsOf(items) : null;
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
    const viaDirect = direct ? packReader().readDirect(items[i]!.file, start, end) : null;
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
          got = packReader().read(items[i]!.file, span, 0, span.length, start);
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

/**
 * How far into each group record the request's members reach (by pack and offset): a
 * group several members of one request come from is decoded once, as far as the last of
 * them, instead of only as far as the first and then again whole.
 */
let groupNeeds: Map<string, number> | null = null;

function needsOf(items: LoadItem[]): Map<string, number> | null {
  let needs: Map<string, number> | null = null;
  for (const it of items) {
    if (it.compression !== COMP_GROUP) continue;
    needs ??= new Map();
    const k = groupKey(it.file, it.offset);
    needs.set(k, Math.max(needs.get(k) ?? 0, (it.inner ?? 0) + it.rawLength));
  }
  return needs;
}

function groupKey(file: string, offset: number): string {
  return `${offset} ${file}`;
}

function loadChunk(req: LoadItem, into?: Uint8Array): LoadResult {
  const total = RECORD_HEADER_SIZE + req.storedLength;
  if (spanBuf.length < total) spanBuf = Buffer.allocUnsafe(total);
  const buf = spanBuf.subarray(0, total); // reused: decoding copies out of it
  let got: number;
  try {
    got = packReader().read(req.file, buf, 0, total, req.offset);
  } catch (e) {
    return { damaged: `cannot read pack: ${(e as Error).message}` };
  }
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
  const payload = keys ? openPlain(c.payload, recordAd(keys, 0, h.compression, h.rawLength, h.digest)) : c.payload;
  if (!payload) return { damaged: SEAL_BROKEN };
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
  if ((!req.fast || req.alsoSha) && !identityOf(raw).equals(req.digest)) {
    return { damaged: `content does not match its ${keys ? 'identity' : 'SHA-256 digest'}` };
  }
  if (req.fast && !fastOf(raw).equals(req.fast)) return { damaged: 'content does not match its BLAKE3 digest' };
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
  const frame = openFrame(payload.subarray(frameAt), h);
  if (!frame) return fail(SEAL_BROKEN);
  let n: number;
  try {
    n = dctx.decompress(whole, frame);
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
  // The request's furthest member of this group (at least this one's end).
  const reach = Math.max(need, groupNeeds?.get(groupKey(req.file, req.offset)) ?? 0);
  let hit = decodedGroups.findIndex((g) => g.offset === req.offset && g.file === req.file);
  if (hit < 0 || decodedGroups[hit]!.valid < need) {
    // Decode into the least recently used slot (a new one until there are GROUP_CACHE), or
    // again into this group's slot when it holds only a part before this member.
    const again = hit >= 0;
    if (!again) {
      const slot = decodedGroups.length < GROUP_CACHE ? { file: '', offset: -1, data: new Uint8Array(0), valid: 0, frame: new Uint8Array(0), frameLength: 0 } : decodedGroups.pop()!;
      if (slot.data.length < groupRaw) slot.data = new Uint8Array(Math.max(groupRaw, 1 << 20));
      decodedGroups.push(slot);
      hit = decodedGroups.length - 1;
    }
    const slot = decodedGroups[hit]!;
    slot.offset = -1;
    slot.valid = 0;
    const frame = again && slot.frameLength ? slot.frame.subarray(0, slot.frameLength) : openFrame(payload.subarray(member.frameAt), member.header);
    slot.frameLength = 0;
    if (!frame) return { damaged: SEAL_BROKEN };
    // A member in the first three quarters of a group is decoded only up to its end: a
    // random read through the mount costs about half a group's decoding instead of all of
    // it. A second member past that part (reads going forward) decodes the whole group.
    const partial = !again && reach <= groupRaw - (groupRaw >>> 2);
    let n: number;
    try {
      n = partial ? decodePrefix(slot.data.subarray(0, groupRaw), frame, reach) : dctx.decompress(slot.data.subarray(0, groupRaw), frame);
    } catch (e) {
      return { damaged: `zstd: ${(e as Error).message}` };
    }
    if (partial ? n < reach : n !== groupRaw) return { damaged: `decoded ${n} bytes, expected ${partial ? `at least ${reach}` : groupRaw}` };
    if (partial && keys) keepFrame(slot, frame);
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
 * Keep a sealed group's opened frame with its slot: opening it authenticates (and costs a
 * pass over) the whole record, which the members past the decoded part would pay again.
 */
function keepFrame(slot: GroupSlot, frame: Uint8Array): void {
  if (slot.frame.length < frame.length) slot.frame = new Uint8Array(Math.max(frame.length, 1 << 20));
  slot.frame.set(frame);
  slot.frameLength = frame.length;
}

/** A group's zstd frame: opened (format 6; null when it does not authenticate), or as it is. */
function openFrame(stored: Buffer, h: { rawLength: number; digest: Buffer }): Buffer | null {
  return keys ? openPlain(stored, recordAd(keys, 0, COMP_GROUP, h.rawLength, h.digest)) : stored;
}

/**
 * A sealed payload opened into this worker's reused buffer (valid until the next call), or
 * null when it does not authenticate. Never into the caller's destination: bytes that fail
 * their tag must not be left where a reader might take them.
 */
let plainBuf = Buffer.allocUnsafe(0);

function openPlain(sealed: Buffer, ad: Buffer): Buffer | null {
  const need = sealed.length - SEAL_OVERHEAD;
  if (need < 0) return null;
  if (plainBuf.length < need) plainBuf = Buffer.allocUnsafe(Math.max(need, 1 << 20));
  const n = openInto(keys!, sealed, ad, plainBuf);
  return n === null ? null : plainBuf.subarray(0, n);
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

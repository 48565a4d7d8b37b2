/**
 * Reading a pack from its first byte to its last without the index: what `repair`
 * rebuilds the index from, and what `verify` compares the index with. Every record is
 * taken from its header (pack.ts); a group record's member table and a metadata record's
 * payload (meta.ts) are read and checked against the header's digest. Chunk payloads are
 * not read: their header names their SHA-256, and `verify --full` checks the bytes.
 *
 * Nothing read is trusted: a header that fails its CRC, a length that runs past the end,
 * a table or payload that fails its digest become a `damaged` item naming the bytes it
 * covers, and the scan looks for the next well-formed record header after them (a
 * record's header is 52 bytes with a CRC, so a false match needs a 32-bit CRC collision
 * at a place that also holds the record magic). Bytes after the last whole record are the
 * `tail`: a writer that died mid-append leaves one.
 *
 * A pack that ends in a table of contents (format 5, toc.ts) is read from its TOCs
 * instead: a few reads at its end, then only the metadata records' payloads. Unless the
 * caller asks for every header (`readAll`: verify, `repair --read-all-packs`), chunk
 * records are then taken from the TOC without reading their headers; anything wrong with
 * the TOCs and the pack is read from start to end as above.
 */
import { createHash } from 'node:crypto';
import {
  COMP_GROUP,
  GROUP_MAX_MEMBERS,
  GROUP_MEMBER_SIZE,
  PACK_HEADER_SIZE,
  PACK_MAGIC,
  RECORD_HEADER_SIZE,
  RECORD_MAGIC,
  decodeRecordHeader,
  type RecordHeader,
} from './pack.js';
import { REC_CHUNK, decodeMetaPayload, type MetaRecord } from './meta.js';
import { SEAL_BROKEN, metaAd, open, tocDigest, type RepoKeys } from './crypto.js';
import { REC_TOC, TOC_TRAILER, checkTocPayload, tocEntries, tocTrailer, type TocEntry } from './toc.js';

/** Read `length` bytes of the pack at `position` into buf at `offset`; returns how many were read. */
export type PackRead = (buf: Buffer, offset: number, length: number, position: number) => Promise<number>;

export interface GroupMember {
  digest: Buffer;
  /** Where the member starts in the group's decoded bytes. */
  inner: number;
  rawLength: number;
}

export type ScanItem =
  | { kind: 'chunk'; offset: number; header: RecordHeader }
  | { kind: 'group'; offset: number; header: RecordHeader; members: GroupMember[] }
  /**
   * `plainDigest`: the SHA-256 of the record's plaintext payload (a leaf's digest); the
   * header's digest, except in a sealed record (format 6), where that is the sealed bytes'.
   */
  | { kind: 'meta'; offset: number; header: RecordHeader; record: MetaRecord; plainDigest: Buffer }
  | { kind: 'damaged'; offset: number; length: number; problem: string };

export interface ScanEnd {
  /** Bytes up to the end of the last whole record. */
  end: number;
  /** Bytes after it (a torn append), 0 normally. */
  tail: number;
  /** Why the tail is not a record (its header damaged, or the record cut off). */
  tailProblem?: string;
  /** The pack was read from its tables of contents (not header by header). */
  viaToc?: boolean;
}

export interface ScanOptions {
  /** Read every record header even when the pack has tables of contents. */
  readAll?: boolean;
  /** An encrypted repository's keys: metadata records are opened with them (format 6). */
  keys?: RepoKeys | null;
}

const WINDOW = 64 << 10;
const EMPTY = Buffer.alloc(0);
const MAGIC_BYTES = Buffer.alloc(4);
MAGIC_BYTES.writeUInt32LE(RECORD_MAGIC);

/** A read-through window over the pack, so that small reads of nearby headers cost one pread. */
class Window {
  private buf: Buffer = EMPTY;
  /** `buf` is not the window's own (over()): never read into. */
  private shared = false;
  private start = 0;
  private len = 0;

  constructor(
    private read: PackRead,
    readonly size: number,
    /** The keys metadata records are opened with (format 6), carried along the scan. */
    readonly keys: RepoKeys | null = null,
  ) {}

  /**
   * A window over `bytes`, read from pack offset `start`: what they hold is served from
   * them, anything else as far as they reach (fewer bytes, as at a pack's end).
   */
  static over(bytes: Buffer, start: number, size: number, keys: RepoKeys | null): Window {
    const w = new Window(async (b, o, l, pos) => bytes.copy(b, o, pos - start, Math.min(pos - start + l, bytes.length)), size, keys);
    w.buf = bytes;
    w.shared = true;
    w.start = start;
    w.len = bytes.length;
    return w;
  }

  /** Bytes [pos, pos + n) of the pack, or fewer at its end. */
  async at(pos: number, n: number): Promise<Buffer> {
    if (pos >= this.size) return this.buf.subarray(0, 0);
    if (pos >= this.start && pos + n <= this.start + this.len) return this.buf.subarray(pos - this.start, pos - this.start + n);
    const want = Math.min(Math.max(n, WINDOW), this.size - pos);
    if (this.shared || this.buf.length < want) {
      this.buf = Buffer.allocUnsafe(want);
      this.shared = false;
    }
    let got = 0;
    while (got < want) {
      const r = await this.read(this.buf, got, want - got, pos + got);
      if (r === 0) break;
      got += r;
    }
    this.start = pos;
    this.len = got;
    return this.buf.subarray(0, Math.min(n, got));
  }
}

/**
 * Every record of a pack of `size` bytes, in order. `packId`: the id its file name gives,
 * which its header must repeat.
 */
export async function* scanPack(read: PackRead, size: number, packId: string, opts: ScanOptions = {}): AsyncGenerator<ScanItem, ScanEnd> {
  const w = new Window(read, size, opts.keys ?? null);
  const spans = opts.readAll ? null : await tocChain(w, packId);
  if (!spans) return yield* scanWhole(w, packId);
  // One TOC's entries at a time: a pack of millions of small records has as many entries.
  for (const sp of spans) {
    const toc = await tocAt(w, sp.at, sp.end);
    if (!toc || sp.start + toc.covered !== sp.at) {
      yield { kind: 'damaged', offset: sp.start, length: sp.end - sp.start, problem: 'table of contents changed while it was read' };
      continue;
    }
    yield* tocItems(read, w, toc.payload, sp.start);
  }
  return { end: size, tail: 0, viaToc: true };
}

/** Metadata records read ahead of the one being taken: each read is a round trip, and on a cold disk they overlap. */
const META_AHEAD = 16;

/** The records one TOC lists, in order; its metadata records are read META_AHEAD at a time. */
async function* tocItems(read: PackRead, w: Window, payload: Buffer, start: number): AsyncGenerator<ScanItem> {
  const metas: TocEntry[] = [];
  for (const e of tocEntries(payload, start)) if (e.type !== REC_CHUNK) metas.push(e);
  const ahead = new Map<number, Promise<ScanItem>>();
  let started = 0;
  let taken = 0;
  for (const e of tocEntries(payload, start)) {
    if (e.type === REC_CHUNK) {
      yield chunkItem(e);
      continue;
    }
    for (; started < metas.length && started < taken + META_AHEAD; started++) {
      const m = metas[started]!;
      const p = recordAlone(read, w, m.offset, RECORD_HEADER_SIZE + m.storedLength);
      p.catch(() => undefined); // awaited below, in order; not an unhandled rejection meanwhile
      ahead.set(m.offset, p);
    }
    taken++;
    const item = await ahead.get(e.offset)!;
    ahead.delete(e.offset);
    yield asListed(item, e);
  }
}

/**
 * The record at `offset` (`length` bytes, header included), read by itself (not through
 * the scan's window `w`, which other reads move meanwhile) and checked as the scan checks
 * it, with its keys.
 */
async function recordAlone(read: PackRead, w: Window, offset: number, length: number): Promise<ScanItem> {
  const buf = Buffer.allocUnsafe(length);
  let got = 0;
  while (got < length) {
    const r = await read(buf, got, length - got, offset + got);
    if (r === 0) break;
    got += r;
  }
  // A window over the bytes read, not one reading them again into a buffer of its own
  // (WINDOW bytes): one such per metadata record was a visible share of a rebuild's
  // allocations (performance.md, "Rebuilding the index").
  return recordAt(Window.over(buf.subarray(0, got), offset, w.size, w.keys), offset);
}

/** A TOC record (at..end) and the bytes it lists (start..at). */
interface TocSpan {
  start: number;
  at: number;
  end: number;
}

/** Every record, header by header from the pack header on. */
async function* scanWhole(w: Window, packId: string): AsyncGenerator<ScanItem, ScanEnd> {
  const size = w.size;
  const head = await w.at(0, PACK_HEADER_SIZE);
  let pos = PACK_HEADER_SIZE;
  if (head.length < PACK_HEADER_SIZE || !head.subarray(0, 8).equals(PACK_MAGIC) || head.toString('hex', 8, 24) !== packId) {
    const next = await nextHeader(w, 0);
    yield { kind: 'damaged', offset: 0, length: next, problem: head.length < PACK_HEADER_SIZE ? 'pack header cut off' : 'pack header does not name this pack' };
    pos = next;
  }
  let end = pos;
  let tailProblem: string | undefined;
  while (pos + RECORD_HEADER_SIZE <= size) {
    const item = await recordAt(w, pos);
    if (item.kind === 'damaged') {
      const next = await nextHeader(w, pos + 1);
      if (next >= size) {
        tailProblem = item.problem; // nothing whole after it: the rest is the tail
        break;
      }
      yield { ...item, length: next - pos };
      pos = next;
      continue;
    }
    yield item;
    pos += RECORD_HEADER_SIZE + item.header.storedLength;
    end = pos;
  }
  if (end < size) tailProblem ??= 'record header cut off';
  return { end, tail: size - end, ...(end < size ? { tailProblem } : {}) };
}

/**
 * The pack's tables of contents, first to last, when the pack (of w.size bytes) ends in a
 * TOC, its header names it, and every TOC is whole, decodes, and lists exactly the bytes
 * between the one before it (or the pack header) and itself; null otherwise. Each TOC is
 * read whole here and again when its records are taken (scanPack): only its place is
 * kept, so memory does not grow with the pack.
 */
async function tocChain(w: Window, packId: string): Promise<TocSpan[] | null> {
  const size = w.size;
  if (size < PACK_HEADER_SIZE + RECORD_HEADER_SIZE + TOC_TRAILER) return null;
  const head = Buffer.from(await w.at(0, PACK_HEADER_SIZE));
  if (head.length < PACK_HEADER_SIZE || !head.subarray(0, 8).equals(PACK_MAGIC) || head.toString('hex', 8, 24) !== packId) return null;
  await w.at(Math.max(0, size - WINDOW), WINDOW); // the last TOC is usually in it
  const len = tocTrailer(Buffer.from(await w.at(size - TOC_TRAILER, TOC_TRAILER)));
  if (len === null) return null;
  const spans: TocSpan[] = [];
  for (let at = size - RECORD_HEADER_SIZE - len, end = size; ; ) {
    const toc = await tocAt(w, at, end);
    if (!toc) return null;
    let start = PACK_HEADER_SIZE;
    if (toc.prev !== 0) {
      const h = toc.prev >= PACK_HEADER_SIZE && toc.prev < at ? decodeRecordHeader(Buffer.from(await w.at(toc.prev, RECORD_HEADER_SIZE))) : null;
      if (!h) return null;
      start = toc.prev + RECORD_HEADER_SIZE + h.storedLength;
    }
    if (start + toc.covered !== at) return null;
    spans.unshift({ start, at, end });
    if (toc.prev === 0) return spans;
    end = start;
    at = toc.prev;
  }
}

/** The TOC record at `at`, which must end exactly at `end`: its payload, checked, or null. */
async function tocAt(w: Window, at: number, end: number): Promise<(ReturnType<typeof checkTocPayload> & { payload: Buffer }) | null> {
  if (at < PACK_HEADER_SIZE) return null;
  const h = decodeRecordHeader(Buffer.from(await w.at(at, RECORD_HEADER_SIZE)));
  if (!h || h.type !== REC_TOC || h.compression !== 0 || h.rawLength !== h.storedLength || at + RECORD_HEADER_SIZE + h.storedLength !== end) return null;
  const payload = Buffer.from(await w.at(at + RECORD_HEADER_SIZE, h.storedLength));
  if (payload.length !== h.storedLength || !tocDigest(w.keys, payload).equals(h.digest)) return null;
  try {
    return { ...checkTocPayload(payload), payload };
  } catch {
    return null;
  }
}

/**
 * A chunk or group record as its TOC lists it, not read: a group's member table is the
 * TOC's copy, checked against the digest the TOC gives, as the scan checks the one in the
 * pack.
 */
function chunkItem(e: TocEntry): ScanItem {
  // The digest is a view into the TOC's payload: consumers copy what they keep.
  const header = { type: e.type, compression: e.compression, rawLength: e.rawLength, storedLength: e.storedLength, digest: e.digest };
  if (e.compression !== COMP_GROUP) return { kind: 'chunk', offset: e.offset, header };
  const members = membersOf(e.table!, header);
  return typeof members === 'string' ? { kind: 'damaged', offset: e.offset, length: RECORD_HEADER_SIZE + e.storedLength, problem: members } : { kind: 'group', offset: e.offset, header, members };
}

/** A metadata record as read, which must be what its TOC entry says. */
function asListed(item: ScanItem, e: TocEntry): ScanItem {
  const length = RECORD_HEADER_SIZE + e.storedLength;
  if (item.kind === 'damaged') return { ...item, length };
  if (item.header.type !== e.type || !item.header.digest.equals(e.digest) || item.header.storedLength !== e.storedLength) {
    return { kind: 'damaged', offset: e.offset, length, problem: 'record does not match the table of contents' };
  }
  return item;
}

/** The record at `pos`: its header checked, a group's table and a metadata record's payload read and checked. */
async function recordAt(w: Window, pos: number): Promise<ScanItem> {
  const damaged = (problem: string): ScanItem => ({ kind: 'damaged', offset: pos, length: 0, problem });
  const h = decodeRecordHeader(await w.at(pos, RECORD_HEADER_SIZE));
  if (!h) return damaged('record header damaged');
  if (pos + RECORD_HEADER_SIZE + h.storedLength > w.size) return damaged('record runs past the end of the pack');
  const payloadAt = pos + RECORD_HEADER_SIZE;
  if (h.type === REC_CHUNK && h.compression !== COMP_GROUP) return { kind: 'chunk', offset: pos, header: h };
  if (h.type === REC_CHUNK) {
    const members = await groupTable(w, payloadAt, h);
    return typeof members === 'string' ? damaged(members) : { kind: 'group', offset: pos, header: h, members };
  }
  if (h.compression !== 0 || h.rawLength !== h.storedLength) return damaged(`metadata record of type ${h.type} is not stored raw`);
  const payload = Buffer.from(await w.at(payloadAt, h.storedLength));
  if (payload.length < h.storedLength) return damaged('record cut off');
  const digest = h.type === REC_TOC ? tocDigest(w.keys, payload) : createHash('sha256').update(payload).digest();
  if (!digest.equals(h.digest)) return damaged(`metadata record of type ${h.type} does not match its digest`);
  let plain: Buffer | null = payload;
  // A table of contents is never sealed (FORMAT.md): it copies the plaintext headers.
  if (w.keys && h.type !== REC_TOC) plain = open(w.keys, payload, metaAd(w.keys, h.type));
  if (!plain) return damaged(`metadata record of type ${h.type}: ${SEAL_BROKEN}`);
  try {
    const record = decodeMetaPayload(h.type, plain);
    const plainDigest = plain === payload ? h.digest : createHash('sha256').update(plain).digest();
    return { kind: 'meta', offset: pos, header: h, record, plainDigest };
  } catch (e) {
    return damaged((e as Error).message);
  }
}

/** A group record's member table, read from the pack and checked against the header; or what is wrong. */
async function groupTable(w: Window, at: number, h: RecordHeader): Promise<GroupMember[] | string> {
  const countBuf = await w.at(at, 4);
  if (countBuf.length < 4) return 'group member table cut off';
  const n = countBuf.readUInt32LE(0);
  const tableLen = 4 + n * GROUP_MEMBER_SIZE;
  if (n < 2 || n > GROUP_MAX_MEMBERS || tableLen > h.storedLength) return 'group member table damaged';
  const table = Buffer.from(await w.at(at, tableLen));
  if (table.length < tableLen) return 'group member table cut off';
  return membersOf(table, h);
}

/** The members of a whole member table (count u32 | members), checked against the record header; or what is wrong. */
function membersOf(table: Buffer, h: RecordHeader): GroupMember[] | string {
  if (!createHash('sha256').update(table).digest().equals(h.digest)) return 'group member table does not match its digest';
  const n = table.readUInt32LE(0);
  const members: GroupMember[] = [];
  let inner = 0;
  for (let k = 0; k < n; k++) {
    const e = 4 + k * GROUP_MEMBER_SIZE;
    const rawLength = table.readUInt32LE(e + 32);
    if (rawLength === 0) return 'group member table damaged';
    members.push({ digest: table.subarray(e, e + 32), inner, rawLength }); // views: consumers copy what they keep
    inner += rawLength;
  }
  if (inner !== h.rawLength) return 'group member table does not match the record header';
  return members;
}

/** The offset of the next well-formed record header at or after `from` whose record fits in the pack; the size if none. */
async function nextHeader(w: Window, from: number): Promise<number> {
  for (let pos = from; pos + RECORD_HEADER_SIZE <= w.size; ) {
    const chunk = await w.at(pos, WINDOW);
    if (chunk.length < RECORD_HEADER_SIZE) break;
    const i = chunk.indexOf(MAGIC_BYTES);
    if (i < 0) {
      pos += chunk.length - 3; // a magic may straddle the window's end
      continue;
    }
    const at = pos + i;
    const h = decodeRecordHeader(await w.at(at, RECORD_HEADER_SIZE));
    if (h && at + RECORD_HEADER_SIZE + h.storedLength <= w.size) return at;
    pos = at + 1;
  }
  return w.size;
}

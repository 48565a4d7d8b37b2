/**
 * A pack's table of contents (format 5): a metadata record of type 5 that a writer appends
 * before each sync, listing every record appended since the previous one, so that a
 * reader without the index (`genvault repair`, gc's metadata scan) learns what a pack
 * holds from a few reads at its end instead of one read per record header through the
 * whole pack. restic's pack header, at the end of each pack file, serves the same purpose.
 *
 *   payload = "GVT1" | previous TOC's offset u64 (0: none, this one starts after the pack
 *             header) | count u32 | count x entry | payload length u32 | "GVTE"
 *   entry   = header bytes 5..47 of the record (compression u8 | type u16 | raw length
 *             u32 | stored length u32 | digest 32), 43 bytes; a group record (compression
 *             2) is followed by its member table (count u32 | count x (digest 32 | raw
 *             length u32)), as at the start of its payload
 *
 * The record ends the pack's committed bytes (its `p` size), so the last 8 bytes of the
 * committed pack find it; each TOC names the one before it. Records appended after the
 * last TOC (a writer killed before its sync) are not in any TOC: the reader then reads
 * the pack from start to end (scan.ts), as it does for packs written before format 5.
 *
 * Nothing read is trusted: a TOC must pass its header's CRC and digest, decode exactly,
 * and its entries must cover the bytes between the previous TOC (or the pack header) and
 * itself exactly; anything else and the reader falls back to the full scan, which reports
 * what is damaged.
 */
import { tocDigest, type RepoKeys } from './crypto.js';
import { COMP_GROUP, COMP_RAW, GROUP_MAX_MEMBERS, GROUP_MEMBER_SIZE, RECORD_HEADER_SIZE, decodeRecordHeader, encodeRecordHeader } from './pack.js';

/** The record type of a table of contents (meta.ts numbers the others). */
export const REC_TOC = 5;
/** The first format version whose writers append tables of contents. */
export const TOC_FROM_VERSION = 5;

const MAGIC = Buffer.from('GVT1');
const END_MAGIC = Buffer.from('GVTE');
export const TOC_TRAILER = 8;
const ENTRY = 43;
/** A TOC larger than this is taken for damage (a writer syncs every 65536 chunks). */
export const TOC_MAX_PAYLOAD = 64 << 20;

/** One record a TOC lists, with where it starts. */
export interface TocEntry {
  offset: number;
  type: number;
  compression: number;
  rawLength: number;
  storedLength: number;
  digest: Buffer;
  /** A group's member table (count u32 | members), as in its payload. */
  table?: Buffer;
}

/**
 * The entries of whole records in `buf` (appended at pack offset `at`), encoded for a
 * TOC. Throws when the bytes are not whole, well-formed records: a writer hands over
 * nothing else.
 */
export function tocEntriesOf(buf: Buffer, at: number): Array<{ offset: number; bytes: Buffer }> {
  const out: Array<{ offset: number; bytes: Buffer }> = [];
  for (let pos = 0; pos < buf.length; ) {
    const h = decodeRecordHeader(buf, pos);
    const end = h ? pos + RECORD_HEADER_SIZE + h.storedLength : Infinity;
    if (!h || end > buf.length) throw new Error(`pack writer: bytes appended at ${at + pos} are not a whole record`);
    let bytes = buf.subarray(pos + 5, pos + 48);
    if (h.compression === COMP_GROUP) {
      const n = buf.readUInt32LE(pos + RECORD_HEADER_SIZE);
      bytes = Buffer.concat([bytes, buf.subarray(pos + RECORD_HEADER_SIZE, pos + RECORD_HEADER_SIZE + 4 + n * GROUP_MEMBER_SIZE)]);
    } else {
      bytes = Buffer.from(bytes);
    }
    out.push({ offset: at + pos, bytes });
    pos = end;
  }
  return out;
}

/** A TOC's payload: entries already encoded by tocEntriesOf. */
export function encodeTocPayload(prev: number, entries: Buffer[]): Buffer {
  const head = Buffer.alloc(16);
  MAGIC.copy(head, 0);
  head.writeBigUInt64LE(BigInt(prev), 4);
  head.writeUInt32LE(entries.length, 12);
  const body = Buffer.concat([head, ...entries, Buffer.alloc(TOC_TRAILER)]);
  body.writeUInt32LE(body.length, body.length - TOC_TRAILER);
  END_MAGIC.copy(body, body.length - 4);
  return body;
}

/** A whole TOC record (header and payload) for the pack; with keys (format 6) its digest is keyed (tocDigest). */
export function encodeTocRecord(prev: number, entries: Buffer[], keys: RepoKeys | null = null): Buffer {
  const payload = encodeTocPayload(prev, entries);
  const out = Buffer.allocUnsafe(RECORD_HEADER_SIZE + payload.length);
  encodeRecordHeader(out, 0, COMP_RAW, payload.length, payload.length, tocDigest(keys, payload), REC_TOC);
  payload.copy(out, RECORD_HEADER_SIZE);
  return out;
}

/** The payload length a TOC's trailer (the last 8 bytes of a committed pack) names, or null. */
export function tocTrailer(last8: Buffer): number | null {
  if (last8.length !== TOC_TRAILER || !last8.subarray(4).equals(END_MAGIC)) return null;
  const n = last8.readUInt32LE(0);
  return n >= 16 + TOC_TRAILER && n <= TOC_MAX_PAYLOAD ? n : null;
}

/**
 * Check a TOC payload (already checked against its header's digest) from end to end
 * without keeping its entries: the previous TOC's offset, the number of entries and the
 * bytes of pack they cover (headers and payloads). Throws on anything that does not decode
 * exactly.
 */
export function checkTocPayload(p: Buffer): { prev: number; count: number; covered: number } {
  const bad = (why: string) => new Error(`table of contents: ${why}`);
  if (p.length < 16 + TOC_TRAILER || !p.subarray(0, 4).equals(MAGIC)) throw bad('bad magic');
  if (p.readUInt32LE(p.length - TOC_TRAILER) !== p.length || !p.subarray(p.length - 4).equals(END_MAGIC)) throw bad('bad trailer');
  const count = p.readUInt32LE(12);
  const end = p.length - TOC_TRAILER;
  let pos = 16;
  let covered = 0;
  for (let i = 0; i < count; i++) {
    if (pos + ENTRY > end) throw bad('cut off');
    const stored = p.readUInt32LE(pos + 7);
    covered += RECORD_HEADER_SIZE + stored;
    if (p[pos] === COMP_GROUP) {
      if (pos + ENTRY + 4 > end) throw bad('cut off');
      const n = p.readUInt32LE(pos + ENTRY);
      const len = 4 + n * GROUP_MEMBER_SIZE;
      if (n < 2 || n > GROUP_MAX_MEMBERS || pos + ENTRY + len > end || len > stored) throw bad('bad group member table');
      pos += len;
    }
    pos += ENTRY;
  }
  if (pos !== end) throw bad('bytes after the last entry');
  return { prev: Number(p.readBigUInt64LE(4)), count, covered };
}

/**
 * The entries of a payload that checkTocPayload accepted, one at a time, placed from
 * `start` (where the bytes it covers begin). Lazily: a TOC may list tens of thousands of
 * records, and objects for all of them at once outlive the young generation.
 */
export function* tocEntries(p: Buffer, start: number): Generator<TocEntry> {
  const count = p.readUInt32LE(12);
  let pos = 16;
  let offset = start;
  for (let i = 0; i < count; i++) {
    const e: TocEntry = {
      offset,
      compression: p[pos]!,
      type: p.readUInt16LE(pos + 1),
      rawLength: p.readUInt32LE(pos + 3),
      storedLength: p.readUInt32LE(pos + 7),
      digest: p.subarray(pos + 11, pos + 43),
    };
    pos += ENTRY;
    if (e.compression === COMP_GROUP) {
      const len = 4 + p.readUInt32LE(pos) * GROUP_MEMBER_SIZE;
      e.table = p.subarray(pos, pos + len);
      pos += len;
    }
    offset += RECORD_HEADER_SIZE + e.storedLength;
    yield e;
  }
}


/**
 * Pack files: append-only files of chunk records. Each writer process creates its own
 * packs and never appends to another's, so writers need no lock between them.
 *
 *   pack header   : "GVPACK01" (8) | pack id (16)                                = 24 bytes
 *   record header : "GVCK" | ver u8 | compression u8 | reserved u16 |
 *                   raw length u32 | stored length u32 | sha256 of raw (32) |
 *                   crc32 of the preceding 48 bytes u32                          = 52 bytes
 *   payload       : stored length bytes (zstd frame or raw)
 *
 * A group record (format 3, compression 2) holds several chunks in one zstd frame, which
 * compresses 2.5-5% better than one frame per chunk: its raw length is the members'
 * total, its digest the SHA-256 of the member table, and its payload
 *   member table  : count u32 | count x ( sha256(32) | raw length u32 )
 *   frame         : zstd frame of the members' bytes, one after the other
 *
 * The digest in each header lets `verify`/recovery rebuild the chunk index from packs.
 */
import { crc32 } from 'node:zlib';
import { createHash, randomBytes } from 'node:crypto';

export const PACK_MAGIC = Buffer.from('GVPACK01');
export const PACK_HEADER_SIZE = 24;
export const RECORD_MAGIC = 0x4b435647; // "GVCK" little-endian
export const RECORD_HEADER_SIZE = 52;
export const COMP_RAW = 0;
export const COMP_ZSTD = 1;
/** A group record (format 3): several chunks in one zstd frame, after a member table. */
export const COMP_GROUP = 2;
/** Most members a group record holds (bounds its member table to 9,220 bytes). */
export const GROUP_MAX_MEMBERS = 256;
export const GROUP_MEMBER_SIZE = 36;

/** Bytes of a pack id; written as 32 lowercase hex digits in file names and lock files. */
export const PACK_ID_BYTES = 16;
const PACK_ID_RE = /^[0-9a-f]{32}$/;

export function newPackId(): string {
  return randomBytes(PACK_ID_BYTES).toString('hex');
}

/** A pack id as it may appear in a file name: exactly 32 lowercase hex digits. */
export function isPackId(v: unknown): v is string {
  return typeof v === 'string' && PACK_ID_RE.test(v);
}

/**
 * The object name of a pack in the repository's store. Ids also come from files under
 * locks/ (writer registrations); one that is not a pack id would name an object elsewhere,
 * so it is refused here as well as where those files are read.
 */
export function packObject(packId: string): string {
  if (!isPackId(packId)) throw new Error(`invalid pack id ${JSON.stringify(packId)}`);
  return `packs/${packId.slice(0, 2)}/${packId}.pack`;
}

export function encodeRecordHeader(
  out: Buffer,
  at: number,
  compression: number,
  rawLength: number,
  storedLength: number,
  digest: Uint8Array,
  type = 0,
): void {
  out.writeUInt32LE(RECORD_MAGIC, at);
  out[at + 4] = 1;
  out[at + 5] = compression;
  out.writeUInt16LE(type, at + 6);
  out.writeUInt32LE(rawLength, at + 8);
  out.writeUInt32LE(storedLength, at + 12);
  out.set(digest, at + 16);
  out.writeUInt32LE(crc32(out.subarray(at, at + 48)), at + 48);
}

export interface RecordHeader {
  /** 0: a chunk or a group (all that format 3 and older wrote); others: meta.ts. */
  type: number;
  compression: number;
  rawLength: number;
  storedLength: number;
  digest: Buffer;
}

/** Parse and check a record header; returns null if it is not a sane header. */
export function decodeRecordHeader(buf: Buffer, at = 0): RecordHeader | null {
  if (buf.length - at < RECORD_HEADER_SIZE) return null;
  if (buf.readUInt32LE(at) !== RECORD_MAGIC || buf[at + 4] !== 1) return null;
  if (buf.readUInt32LE(at + 48) !== crc32(buf.subarray(at, at + 48))) return null;
  const compression = buf[at + 5]!;
  if (compression !== COMP_RAW && compression !== COMP_ZSTD && compression !== COMP_GROUP) return null;
  return {
    type: buf.readUInt16LE(at + 6),
    compression,
    rawLength: buf.readUInt32LE(at + 8),
    storedLength: buf.readUInt32LE(at + 12),
    digest: Buffer.from(buf.subarray(at + 16, at + 48)),
  };
}

/** Where a chunk lives. Stored in the chunk index under its digest. */
export interface ChunkLocation {
  packId: string;
  /** Offset of the record header in the pack (of the group record, for a group member). */
  offset: number;
  /** The record's payload length (the whole group record's, for a member). */
  storedLength: number;
  /** The chunk's length. */
  rawLength: number;
  compression: number;
  /** Group members only: where the chunk starts in the group's decoded bytes. */
  inner?: number;
  /** Group members only: the group's decoded length (all members). */
  groupRaw?: number;
}

/**
 * 16 pack id | u64 offset | u32 stored | u32 raw | u8 compression = 33 bytes;
 * group members add u32 inner | u32 group raw length = 41 bytes.
 */
export function encodeLocation(l: ChunkLocation): Buffer {
  const group = l.compression === COMP_GROUP;
  const b = Buffer.allocUnsafe(group ? 41 : 33); // every byte is written below
  b.write(l.packId, 0, 16, 'hex');
  // The u64 as two u32 halves: a BigInt per location was a visible cost of repair, which
  // encodes one for every chunk (performance.md).
  b.writeUInt32LE(l.offset % 0x1_0000_0000, 16);
  b.writeUInt32LE(Math.floor(l.offset / 0x1_0000_0000), 20);
  b.writeUInt32LE(l.storedLength, 24);
  b.writeUInt32LE(l.rawLength, 28);
  b[32] = l.compression;
  if (group) {
    b.writeUInt32LE(l.inner ?? 0, 33);
    b.writeUInt32LE(l.groupRaw ?? 0, 37);
  }
  return b;
}

/** Whether an index value has the shape of a chunk location (33 bytes, or 41 for a group member). */
export function isLocation(b: Uint8Array | null | undefined): b is Uint8Array {
  if (!b) return false;
  return b.length === 41 ? b[32] === COMP_GROUP : b.length === 33 && b[32] !== COMP_GROUP;
}

/** A location's record offset, without decoding the rest (passes over millions of entries). */
export function locationOffset(b: Uint8Array): number {
  const buf = Buffer.from(b.buffer, b.byteOffset, b.byteLength);
  // The u64 as two u32 halves, as encodeLocation writes it: no BigInt per location.
  return buf.readUInt32LE(16) + buf.readUInt32LE(20) * 0x1_0000_0000;
}

export function decodeLocation(b: Uint8Array): ChunkLocation {
  const buf = Buffer.from(b.buffer, b.byteOffset, b.byteLength);
  const l: ChunkLocation = {
    packId: buf.toString('hex', 0, 16),
    offset: locationOffset(buf),
    storedLength: buf.readUInt32LE(24),
    rawLength: buf.readUInt32LE(28),
    compression: buf[32]!,
  };
  if (buf.length >= 41) {
    l.inner = buf.readUInt32LE(33);
    l.groupRaw = buf.readUInt32LE(37);
  }
  return l;
}

/**
 * The pack bytes an index value accounts for: its record (header and payload), or for a
 * group member its share of the group record, in proportion to its raw length.
 */
export function recordShare(v: Uint8Array): number {
  const buf = Buffer.from(v.buffer, v.byteOffset, v.byteLength);
  const rec = RECORD_HEADER_SIZE + buf.readUInt32LE(24);
  if (buf.length < 41) return rec;
  const groupRaw = buf.readUInt32LE(37);
  return groupRaw > 0 ? Math.round((rec * buf.readUInt32LE(28)) / groupRaw) : rec;
}

/** Whether two chunks to be read are members of one group record (read and decode it once). */
export function sameGroupRecord(
  a: { file: string; offset: number; compression: number } | undefined,
  b: { file: string; offset: number; compression: number },
): boolean {
  return a !== undefined && a.compression === COMP_GROUP && b.compression === COMP_GROUP && a.offset === b.offset && a.file === b.file;
}

/** Bytes of a group record's payload to read for its member table, at most. */
export const GROUP_TABLE_MAX = 4 + GROUP_MAX_MEMBERS * GROUP_MEMBER_SIZE;

/**
 * Check a group record's member table (the start of its payload) against a member's index
 * entry: the member at `inner` must have this digest and length, and the members' lengths
 * must add up to the header's raw length. Returns where the zstd frame starts, or what is wrong.
 */
export function checkGroupMember(
  payload: Uint8Array,
  groupRaw: number,
  digest: Uint8Array,
  inner: number,
  rawLength: number,
): { frameAt: number } | { problem: string } {
  const buf = Buffer.from(payload.buffer, payload.byteOffset, payload.byteLength);
  if (buf.length < 4) return { problem: 'group member table cut off' };
  const n = buf.readUInt32LE(0);
  if (n < 1 || n > GROUP_MAX_MEMBERS || buf.length < 4 + n * GROUP_MEMBER_SIZE) return { problem: 'group member table damaged' };
  let at = 0;
  let found = false;
  for (let k = 0; k < n; k++) {
    const e = 4 + k * GROUP_MEMBER_SIZE;
    const len = buf.readUInt32LE(e + 32);
    if (at === inner && len === rawLength && buf.subarray(e, e + 32).equals(digest)) found = true;
    at += len;
  }
  if (at !== groupRaw) return { problem: 'group member table does not match the record header' };
  if (!found) return { problem: RECORD_NOT_INDEX };
  return { frameAt: 4 + n * GROUP_MEMBER_SIZE };
}

/** What a record is checked against: a chunk's index entry and the digest it is stored under. */
export type RecordEntry = Pick<ChunkLocation, 'storedLength' | 'rawLength' | 'compression' | 'inner' | 'groupRaw'> & {
  digest: Uint8Array;
};

export interface RecordCheckOptions {
  /**
   * A record that is not a group's: do not compare the header's compression with the
   * entry's; the header's says how to decode it. The worker's reads have always done so;
   * verify's header pass and gc compare it.
   */
  headerCompression?: boolean;
  /** A group member: also check the member table against the header's digest (verify). */
  tableDigest?: boolean;
}

/** The problems the record checks report (the workers, verify and the mount name these). */
export const RECORD_HEADER_BAD = 'record header checksum mismatch';
export const RECORD_NOT_INDEX = 'record header does not match the index';
export const GROUP_TABLE_NOT_DIGEST = 'group member table does not match its digest';

/**
 * Check a record header against a chunk's index entry: magic, version, CRC and compression
 * (decodeRecordHeader), the stored and raw lengths, and the digest; for a group member the
 * group's stored and raw lengths, and that the member lies inside the group. Returns the
 * header, or what is wrong.
 */
export function checkRecordHeader(rec: Buffer, entry: RecordEntry, opts?: RecordCheckOptions): { header: RecordHeader } | { problem: string } {
  const h = decodeRecordHeader(rec, 0);
  if (!h) return { problem: RECORD_HEADER_BAD };
  // A chunk's entry never points at a metadata record (format 4), even one holding the same bytes.
  if (h.type !== 0) return { problem: RECORD_NOT_INDEX };
  if (entry.compression === COMP_GROUP) {
    if (h.compression !== COMP_GROUP || h.storedLength !== entry.storedLength || (entry.groupRaw !== undefined && entry.groupRaw !== h.rawLength)) {
      return { problem: RECORD_NOT_INDEX };
    }
    if ((entry.inner ?? 0) + entry.rawLength > h.rawLength) return { problem: RECORD_NOT_INDEX };
  } else if (
    h.storedLength !== entry.storedLength ||
    h.rawLength !== entry.rawLength ||
    (!opts?.headerCompression && h.compression !== entry.compression) ||
    !h.digest.equals(entry.digest)
  ) {
    return { problem: RECORD_NOT_INDEX };
  }
  return { header: h };
}

/**
 * Check a record (its header and as much of its payload as `rec` holds: a group member's
 * needs at least the member table) against a chunk's index entry: checkRecordHeader, and
 * for a group member checkGroupMember (and with `tableDigest` the table's SHA-256). Returns
 * the header, the payload and where the zstd frame starts in it (0 unless a group), or
 * what is wrong. The payload's bytes are not decoded or hashed here.
 */
export function checkRecord(
  rec: Buffer,
  entry: RecordEntry,
  opts?: RecordCheckOptions,
): { header: RecordHeader; payload: Buffer; frameAt: number } | { problem: string } {
  const hc = checkRecordHeader(rec, entry, opts);
  if ('problem' in hc) return hc;
  const payload = rec.subarray(RECORD_HEADER_SIZE);
  if (entry.compression !== COMP_GROUP) return { header: hc.header, payload, frameAt: 0 };
  const m = checkGroupMember(payload, hc.header.rawLength, entry.digest, entry.inner ?? 0, entry.rawLength);
  if ('problem' in m) return m;
  if (opts?.tableDigest && !createHash('sha256').update(payload.subarray(0, m.frameAt)).digest().equals(hc.header.digest)) {
    return { problem: GROUP_TABLE_NOT_DIGEST };
  }
  return { header: hc.header, payload, frameAt: m.frameAt };
}

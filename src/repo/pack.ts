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
 * The digest in each header lets `verify`/recovery rebuild the chunk index from packs.
 */
import { crc32 } from 'node:zlib';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';

export const PACK_MAGIC = Buffer.from('GVPACK01');
export const PACK_HEADER_SIZE = 24;
export const RECORD_MAGIC = 0x4b435647; // "GVCK" little-endian
export const RECORD_HEADER_SIZE = 52;
export const COMP_RAW = 0;
export const COMP_ZSTD = 1;

export function newPackId(): string {
  return randomBytes(16).toString('hex');
}

export function packPath(repoDir: string, packId: string): string {
  return path.join(repoDir, 'packs', packId.slice(0, 2), `${packId}.pack`);
}

export function encodeRecordHeader(
  out: Buffer,
  at: number,
  compression: number,
  rawLength: number,
  storedLength: number,
  digest: Uint8Array,
): void {
  out.writeUInt32LE(RECORD_MAGIC, at);
  out[at + 4] = 1;
  out[at + 5] = compression;
  out.writeUInt16LE(0, at + 6);
  out.writeUInt32LE(rawLength, at + 8);
  out.writeUInt32LE(storedLength, at + 12);
  out.set(digest, at + 16);
  out.writeUInt32LE(crc32(out.subarray(at, at + 48)), at + 48);
}

export interface RecordHeader {
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
  if (compression !== COMP_RAW && compression !== COMP_ZSTD) return null;
  return {
    compression,
    rawLength: buf.readUInt32LE(at + 8),
    storedLength: buf.readUInt32LE(at + 12),
    digest: Buffer.from(buf.subarray(at + 16, at + 48)),
  };
}

/** Where a chunk lives. Stored in the chunk index under its digest. */
export interface ChunkLocation {
  packId: string;
  /** Offset of the record header in the pack. */
  offset: number;
  storedLength: number;
  rawLength: number;
  compression: number;
}

/** 16 pack id | u64 offset | u32 stored | u32 raw | u8 compression = 33 bytes */
export function encodeLocation(l: ChunkLocation): Buffer {
  const b = Buffer.alloc(33);
  b.write(l.packId, 0, 16, 'hex');
  b.writeBigUInt64LE(BigInt(l.offset), 16);
  b.writeUInt32LE(l.storedLength, 24);
  b.writeUInt32LE(l.rawLength, 28);
  b[32] = l.compression;
  return b;
}

export function decodeLocation(b: Uint8Array): ChunkLocation {
  const buf = Buffer.from(b.buffer, b.byteOffset, b.byteLength);
  return {
    packId: buf.toString('hex', 0, 16),
    offset: Number(buf.readBigUInt64LE(16)),
    storedLength: buf.readUInt32LE(24),
    rawLength: buf.readUInt32LE(28),
    compression: buf[32]!,
  };
}

/**
 * Appends records to one pack file. Not durable until sync(); callers commit index
 * entries pointing into the pack only after sync() has returned.
 */
export class PackWriter {
  private constructor(
    readonly packId: string,
    readonly file: string,
    private fh: fs.FileHandle,
    public size: number,
  ) {}

  static async create(repoDir: string): Promise<PackWriter> {
    const packId = newPackId();
    const file = packPath(repoDir, packId);
    await fs.mkdir(path.dirname(file), { recursive: true });
    const fh = await fs.open(file, 'wx', 0o600);
    const header = Buffer.alloc(PACK_HEADER_SIZE);
    PACK_MAGIC.copy(header, 0);
    header.write(packId, 8, 16, 'hex');
    await fh.write(header, 0, header.length, 0);
    return new PackWriter(packId, file, fh, PACK_HEADER_SIZE);
  }

  /** Append pre-encoded records (headers included); returns the offset they start at. */
  async append(records: Buffer): Promise<number> {
    const at = this.size;
    let done = 0;
    while (done < records.length) {
      const { bytesWritten } = await this.fh.write(records, done, records.length - done, at + done);
      done += bytesWritten;
    }
    this.size += records.length;
    return at;
  }

  async sync(): Promise<void> {
    await this.fh.datasync();
  }

  async close(): Promise<void> {
    await this.fh.close();
  }
}

/**
 * The NBD wire protocol (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md),
 * the parts genvault speaks as a server (server.ts) and as a client (client.ts): the fixed
 * newstyle handshake, options, requests, simple and structured replies. Pure encoding and
 * decoding, no I/O; every decoder checks lengths and throws NbdProtocolError on what does
 * not parse, so a hostile peer costs its own connection only.
 */

export const NBDMAGIC = 0x4e42444d41474943n; // "NBDMAGIC"
export const IHAVEOPT = 0x49484156454f5054n; // "IHAVEOPT"
export const OPT_REPLY_MAGIC = 0x3e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

/** Handshake flags (server) and client flags. */
export const FLAG_FIXED_NEWSTYLE = 1;
export const FLAG_NO_ZEROES = 2;

export const OPT = {
  EXPORT_NAME: 1, ABORT: 2, LIST: 3, STARTTLS: 5, INFO: 6, GO: 7, STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9, SET_META_CONTEXT: 10,
} as const;

const ERR = 0x80000000;
export const REP = {
  ACK: 1, SERVER: 2, INFO: 3, META_CONTEXT: 4,
  ERR_UNSUP: ERR + 1, ERR_POLICY: ERR + 2, ERR_INVALID: ERR + 3, ERR_PLATFORM: ERR + 4,
  ERR_TLS_REQD: ERR + 5, ERR_UNKNOWN: ERR + 6, ERR_SHUTDOWN: ERR + 7, ERR_TOO_BIG: ERR + 9,
} as const;

export const INFO = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 } as const;

/** Transmission flags. */
export const TFLAG = {
  HAS_FLAGS: 1, READ_ONLY: 2, SEND_FLUSH: 4, SEND_FUA: 8, SEND_TRIM: 32, SEND_WRITE_ZEROES: 64,
  SEND_DF: 128, CAN_MULTI_CONN: 256,
} as const;

export const CMD = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, TRIM: 4, CACHE: 5, WRITE_ZEROES: 6, BLOCK_STATUS: 7 } as const;
export const CMD_FLAG = { FUA: 1, NO_HOLE: 2, DF: 4, REQ_ONE: 8, FAST_ZERO: 16 } as const;

export const REPLY_FLAG_DONE = 1;
export const REPLY = { NONE: 0, OFFSET_DATA: 1, OFFSET_HOLE: 2, BLOCK_STATUS: 5, ERROR: 0x8001, ERROR_OFFSET: 0x8002 } as const;

/** NBD error values (as errno on Linux). */
export const NBD_ERR = { EPERM: 1, EIO: 5, ENOMEM: 12, EINVAL: 22, ENOSPC: 28, EOVERFLOW: 75, ENOTSUP: 95, ESHUTDOWN: 108 } as const;

/** base:allocation status bits. */
export const STATE_HOLE = 1;
export const STATE_ZERO = 2;

export const BASE_ALLOCATION = 'base:allocation';
export const DIRTY_BITMAP_PREFIX = 'qemu:dirty-bitmap:';

export const REQUEST_BYTES = 28;
export const SIMPLE_REPLY_BYTES = 16;
export const STRUCTURED_HEADER_BYTES = 20;
export const OPTION_HEADER_BYTES = 16;
export const OPTION_REPLY_HEADER_BYTES = 20;

/** The payload any request may carry or ask for; larger ones get EINVAL (or, for a WRITE, the connection closes). */
export const MAX_PAYLOAD = 32 << 20;
/** Option data larger than this is not read: names are at most 4 KiB by the spec. */
export const MAX_OPTION_DATA = 64 << 10;
/** Longest name (export or meta context) accepted. */
export const MAX_NAME = 4096;

export class NbdProtocolError extends Error {}

/** The server's first 18 bytes: NBDMAGIC, IHAVEOPT, handshake flags. */
export function serverGreeting(): Buffer {
  const b = Buffer.alloc(18);
  b.writeBigUInt64BE(NBDMAGIC, 0);
  b.writeBigUInt64BE(IHAVEOPT, 8);
  b.writeUInt16BE(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, 16);
  return b;
}

export interface OptionHeader {
  option: number;
  length: number;
}

export function encodeOption(option: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const h = Buffer.alloc(OPTION_HEADER_BYTES);
  h.writeBigUInt64BE(IHAVEOPT, 0);
  h.writeUInt32BE(option, 8);
  h.writeUInt32BE(data.length, 12);
  return Buffer.concat([h, data]);
}

export function decodeOptionHeader(b: Buffer): OptionHeader {
  if (b.length < OPTION_HEADER_BYTES) throw new NbdProtocolError('short option header');
  if (b.readBigUInt64BE(0) !== IHAVEOPT) throw new NbdProtocolError('bad option magic');
  return { option: b.readUInt32BE(8), length: b.readUInt32BE(12) };
}

export function encodeOptionReply(option: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const h = Buffer.alloc(OPTION_REPLY_HEADER_BYTES);
  h.writeBigUInt64BE(OPT_REPLY_MAGIC, 0);
  h.writeUInt32BE(option, 8);
  h.writeUInt32BE(type >>> 0, 12);
  h.writeUInt32BE(data.length, 16);
  return Buffer.concat([h, data]);
}

export interface OptionReplyHeader {
  option: number;
  type: number;
  length: number;
}

export function decodeOptionReplyHeader(b: Buffer): OptionReplyHeader {
  if (b.length < OPTION_REPLY_HEADER_BYTES || b.readBigUInt64BE(0) !== OPT_REPLY_MAGIC) throw new NbdProtocolError('bad option reply magic');
  return { option: b.readUInt32BE(8), type: b.readUInt32BE(12), length: b.readUInt32BE(16) };
}

/** A reader over option data that throws NbdProtocolError instead of reading past its end. */
export class Cursor {
  pos = 0;
  constructor(readonly b: Buffer) {}
  need(n: number): void {
    if (this.pos + n > this.b.length) throw new NbdProtocolError('option data too short');
  }
  u16(): number {
    this.need(2);
    this.pos += 2;
    return this.b.readUInt16BE(this.pos - 2);
  }
  u32(): number {
    this.need(4);
    this.pos += 4;
    return this.b.readUInt32BE(this.pos - 4);
  }
  u64(): number {
    this.need(8);
    this.pos += 8;
    return Number(this.b.readBigUInt64BE(this.pos - 8));
  }
  bytes(n: number): Buffer {
    this.need(n);
    this.pos += n;
    return this.b.subarray(this.pos - n, this.pos);
  }
  /** A u32-length-prefixed UTF-8 string of at most MAX_NAME bytes. */
  name(): string {
    const n = this.u32();
    if (n > MAX_NAME) throw new NbdProtocolError('name too long');
    return this.bytes(n).toString('utf8');
  }
  get done(): boolean {
    return this.pos === this.b.length;
  }
}

const u32 = (v: number) => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0);
  return b;
};
const u16 = (v: number) => {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(v);
  return b;
};
const u64 = (v: number) => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(v));
  return b;
};
const lenString = (s: string) => {
  const b = Buffer.from(s, 'utf8');
  return Buffer.concat([u32(b.length), b]);
};

/** INFO/GO option data: the export name and the information requests. */
export function encodeInfoRequest(name: string, infos: number[] = []): Buffer {
  return Buffer.concat([lenString(name), u16(infos.length), ...infos.map(u16)]);
}

export function decodeInfoRequest(data: Buffer): { name: string; infos: number[] } {
  const c = new Cursor(data);
  const name = c.name();
  const n = c.u16();
  const infos: number[] = [];
  for (let i = 0; i < n; i++) infos.push(c.u16());
  if (!c.done) throw new NbdProtocolError('trailing bytes in INFO/GO option');
  return { name, infos };
}

/** LIST_META_CONTEXT / SET_META_CONTEXT option data. */
export function encodeMetaContextRequest(name: string, queries: string[]): Buffer {
  return Buffer.concat([lenString(name), u32(queries.length), ...queries.map(lenString)]);
}

export function decodeMetaContextRequest(data: Buffer): { name: string; queries: string[] } {
  const c = new Cursor(data);
  const name = c.name();
  const n = c.u32();
  if (n > 64) throw new NbdProtocolError('too many meta context queries');
  const queries: string[] = [];
  for (let i = 0; i < n; i++) queries.push(c.name());
  if (!c.done) throw new NbdProtocolError('trailing bytes in meta context option');
  return { name, queries };
}

export const infoExport = (size: number, flags: number) => Buffer.concat([u16(INFO.EXPORT), u64(size), u16(flags)]);
export const infoBlockSize = (min: number, preferred: number, max: number) => Buffer.concat([u16(INFO.BLOCK_SIZE), u32(min), u32(preferred), u32(max)]);
export const infoName = (name: string) => Buffer.concat([u16(INFO.NAME), Buffer.from(name, 'utf8')]);
export const infoDescription = (d: string) => Buffer.concat([u16(INFO.DESCRIPTION), Buffer.from(d, 'utf8')]);
export const repServer = (name: string) => lenString(name);
export const repMetaContext = (id: number, name: string) => Buffer.concat([u32(id), Buffer.from(name, 'utf8')]);

/** What NBD_OPT_EXPORT_NAME is answered with (no option reply: size, flags, and maybe 124 zeros). */
export function exportNameReply(size: number, flags: number, noZeroes: boolean): Buffer {
  return Buffer.concat([u64(size), u16(flags), noZeroes ? Buffer.alloc(0) : Buffer.alloc(124)]);
}

export interface Request {
  flags: number;
  type: number;
  /** The client's opaque handle, echoed in replies. */
  handle: Buffer;
  offset: number;
  length: number;
}

export function encodeRequest(r: Request): Buffer {
  const b = Buffer.alloc(REQUEST_BYTES);
  b.writeUInt32BE(REQUEST_MAGIC, 0);
  b.writeUInt16BE(r.flags, 4);
  b.writeUInt16BE(r.type, 6);
  r.handle.copy(b, 8, 0, 8);
  b.writeBigUInt64BE(BigInt(r.offset), 16);
  b.writeUInt32BE(r.length, 24);
  return b;
}

export function decodeRequest(b: Buffer): Request {
  if (b.length < REQUEST_BYTES) throw new NbdProtocolError('short request');
  if (b.readUInt32BE(0) !== REQUEST_MAGIC) throw new NbdProtocolError('bad request magic');
  const off = b.readBigUInt64BE(16);
  // Past 2^53 no image of ours reaches; keep it as a number that is certainly out of range.
  const offset = off > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(off);
  return { flags: b.readUInt16BE(4), type: b.readUInt16BE(6), handle: Buffer.from(b.subarray(8, 16)), offset, length: b.readUInt32BE(24) };
}

export function simpleReply(handle: Buffer, error: number): Buffer {
  const b = Buffer.alloc(SIMPLE_REPLY_BYTES);
  b.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error, 4);
  handle.copy(b, 8, 0, 8);
  return b;
}

export function structuredHeader(handle: Buffer, flags: number, type: number, length: number): Buffer {
  const b = Buffer.alloc(STRUCTURED_HEADER_BYTES);
  b.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  handle.copy(b, 8, 0, 8);
  b.writeUInt32BE(length, 16);
  return b;
}

export function structuredError(handle: Buffer, error: number, message: string): Buffer {
  const msg = Buffer.from(message.slice(0, 200), 'utf8');
  const body = Buffer.concat([u32(error), u16(msg.length), msg]);
  return Buffer.concat([structuredHeader(handle, REPLY_FLAG_DONE, REPLY.ERROR, body.length), body]);
}

/** A BLOCK_STATUS chunk: the context id, then (length, flags) per extent. */
export function blockStatusChunk(handle: Buffer, done: boolean, contextId: number, extents: Array<{ length: number; flags: number }>): Buffer {
  const body = Buffer.alloc(4 + 8 * extents.length);
  body.writeUInt32BE(contextId, 0);
  extents.forEach((e, i) => {
    body.writeUInt32BE(e.length, 4 + i * 8);
    body.writeUInt32BE(e.flags, 8 + i * 8);
  });
  return Buffer.concat([structuredHeader(handle, done ? REPLY_FLAG_DONE : 0, REPLY.BLOCK_STATUS, body.length), body]);
}

export interface ReplyHeader {
  structured: boolean;
  handle: Buffer;
  /** Simple replies: the error. */
  error: number;
  /** Structured replies. */
  flags: number;
  type: number;
  length: number;
}

/** Bytes of the reply header that starts `b` (at least 4 bytes of it must be there), or throws. */
export function replyHeaderBytes(b: Buffer): number {
  const magic = b.readUInt32BE(0);
  if (magic === SIMPLE_REPLY_MAGIC) return SIMPLE_REPLY_BYTES;
  if (magic === STRUCTURED_REPLY_MAGIC) return STRUCTURED_HEADER_BYTES;
  throw new NbdProtocolError(`bad reply magic 0x${magic.toString(16)}`);
}

export function decodeReplyHeader(b: Buffer): ReplyHeader {
  const structured = b.readUInt32BE(0) === STRUCTURED_REPLY_MAGIC;
  if (structured) return { structured, handle: Buffer.from(b.subarray(8, 16)), error: 0, flags: b.readUInt16BE(4), type: b.readUInt16BE(6), length: b.readUInt32BE(16) };
  if (b.readUInt32BE(0) !== SIMPLE_REPLY_MAGIC) throw new NbdProtocolError('bad reply magic');
  return { structured, handle: Buffer.from(b.subarray(8, 16)), error: b.readUInt32BE(4), flags: REPLY_FLAG_DONE, type: REPLY.NONE, length: 0 };
}

/** Decode a BLOCK_STATUS chunk's payload. */
export function decodeBlockStatus(b: Buffer): { contextId: number; extents: Array<{ length: number; flags: number }> } {
  if (b.length < 12 || (b.length - 4) % 8 !== 0) throw new NbdProtocolError('malformed block status chunk');
  const extents: Array<{ length: number; flags: number }> = [];
  for (let at = 4; at < b.length; at += 8) extents.push({ length: b.readUInt32BE(at), flags: b.readUInt32BE(at + 4) });
  return { contextId: b.readUInt32BE(0), extents };
}

/** Bytes received and not yet consumed, as a list of buffers: take() copies only what it returns. */
export class ByteQueue {
  private parts: Buffer[] = [];
  length = 0;

  push(b: Buffer): void {
    if (!b.length) return;
    this.parts.push(b);
    this.length += b.length;
  }

  /** The first n bytes, removed from the queue (n <= length). */
  take(n: number): Buffer {
    if (n > this.length) throw new RangeError('ByteQueue.take past its end');
    const first = this.parts[0];
    if (first && first.length >= n) {
      const out = first.subarray(0, n);
      if (first.length === n) this.parts.shift();
      else this.parts[0] = first.subarray(n);
      this.length -= n;
      return out;
    }
    const out = Buffer.allocUnsafe(n);
    this.takeInto(out);
    return out;
  }

  /** The first dst.length bytes copied into dst and removed from the queue (dst.length <= length). */
  takeInto(dst: Buffer): void {
    const n = dst.length;
    if (n > this.length) throw new RangeError('ByteQueue.takeInto past its end');
    let got = 0;
    while (got < n) {
      const p = this.parts[0]!;
      const k = Math.min(p.length, n - got);
      p.copy(dst, got, 0, k);
      got += k;
      if (k === p.length) this.parts.shift();
      else this.parts[0] = p.subarray(k);
    }
    this.length -= n;
  }

  /** The first n bytes without removing them. */
  peek(n: number): Buffer {
    const out = this.take(n);
    this.parts.unshift(out);
    this.length += n;
    return out;
  }
}

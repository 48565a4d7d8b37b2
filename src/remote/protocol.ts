/**
 * The remote repository protocol, spoken by `genvault serve` (server.ts) on its stdin and
 * stdout, run by OpenSSH (usually as a forced command), and by clients (client.ts) over an
 * SSH exec channel. Frames as in frames.ts; `id` pairs a request with its answer, so a
 * client may keep several requests outstanding (the mount's reads do).
 *
 *   client -> server
 *     HELLO    JSON {protocol, path}                   first frame, once
 *     CALL     JSON {op, ...}                          answered by RESULT or ERROR, same id
 *     READ     gen id (8) | offset u64 | length u32    answered by DATA or ERROR, same id
 *     SEGMENT  count u32 | count x (length u32 | zero u8 | digest(32) if data)
 *                                                      a backup's next segment (id: its number)
 *     CHUNKS   coding u8 (0 raw, 1 zstd, 2 records) | the chunks NEED asked for, in order:
 *              their bytes as they are, as one zstd frame, or (2, when WELCOME offers
 *              `records`) as unsealed pack records, compressed as the repository would
 *              (FORMAT.md; the server checks each and seals it) (id: the segment's number)
 *     END      JSON {bytes}                            the backup's source ended (id: the backup's CALL)
 *     RECORD   u32 n | JSON {location, digest} (n bytes) | a stored record   sync: append it (RESULT)
 *     RECREAD  a location (base64 of its index encoding)  sync: a stored record (DATA)
 *   server -> client
 *     WELCOME  JSON {protocol, version, namespace, permissions, chunking, identity?, records?}
 *              records: {level, group}: the repository's compression, for coding 2
 *     RESULT   JSON                                    the answer to a CALL
 *     ERROR    JSON {message, code}                    a request failed (the session goes on)
 *     DATA     zero u8 | bytes                         zero = 1: `length` zeros, no bytes follow
 *     NEED     one byte per chunk of the segment: 1 = send its bytes
 *     FATAL    utf-8 message                           the session ends (protocol abuse)
 *
 * A backup: CALL {op: 'backup', name, size, ...} opens it; the client then sends SEGMENT n
 * (n = 0, 1, ...), the server answers NEED n, the client sends CHUNKS n, and so on with up
 * to WINDOW segments described ahead of the answers; END closes the source, and the CALL's
 * RESULT (the generation) or ERROR comes once the server committed or gave up.
 *
 * `genvault sync` to or from a served repository uses CALLs named sync-* (sync-server.ts)
 * and the RECORD and RECREAD frames: stored records cross as they are.
 */
import { ProtocolError } from './frames.js';

export const PROTOCOL_VERSION = 1;

export const T = {
  HELLO: 1,
  WELCOME: 2,
  CALL: 3,
  RESULT: 4,
  ERROR: 5,
  READ: 6,
  DATA: 7,
  SEGMENT: 8,
  NEED: 9,
  CHUNKS: 10,
  END: 11,
  FATAL: 12,
  RECORD: 13,
  RECREAD: 14,
} as const;

/**
 * Segments a backup client describes ahead of the server's answers: a next-day backup needs
 * almost nothing sent, and its pace is then set by round trips (8 were faster than 4, 16
 * no faster than 8: native-notes/performance.md, "Remote repositories").
 */
export const WINDOW = 8;

/** CHUNKS payload codings: disk images compress ~3:1, and the wire is the slow part. */
export const CODING_RAW = 0;
export const CODING_ZSTD = 1;
/** zstd level of CHUNKS payloads: the fastest (the server compresses again for storage). */
export const WIRE_ZSTD_LEVEL = 1;
/**
 * Pack records built by the client: the chunks cross compressed as they will be stored,
 * so that neither side compresses twice (a server that offers `records` in WELCOME).
 */
export const CODING_RECORDS = 2;

/** Largest READ: the server decodes at most this much for one request. */
export const MAX_READ = 4 << 20;

export type Permission = 'read' | 'append' | 'full';
export const PERMISSIONS: readonly Permission[] = ['read', 'append', 'full'];

export function parseJson(payload: Buffer, what: string): Record<string, unknown> {
  let v: unknown;
  try {
    v = JSON.parse(payload.toString('utf8'));
  } catch {
    throw new ProtocolError(`${what}: not valid JSON`);
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new ProtocolError(`${what}: not a JSON object`);
  return v as Record<string, unknown>;
}

export function json(v: unknown): Buffer {
  return Buffer.from(JSON.stringify(v));
}

export function str(o: Record<string, unknown>, k: string, what: string, opt = false): string | undefined {
  const v = o[k];
  if (v === undefined && opt) return undefined;
  if (typeof v !== 'string' || v.length > 4096) throw new ProtocolError(`${what}: "${k}" must be a string`);
  return v;
}

export function num(o: Record<string, unknown>, k: string, what: string, opt = false): number | undefined {
  const v = o[k];
  if (v === undefined && opt) return undefined;
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) throw new ProtocolError(`${what}: "${k}" must be a non-negative integer`);
  return v;
}

export function strList(o: Record<string, unknown>, k: string, what: string): string[] {
  const v = o[k];
  if (v === undefined) return [];
  if (!Array.isArray(v) || v.length > 1024 || v.some((s) => typeof s !== 'string' || s.length > 1024)) throw new ProtocolError(`${what}: "${k}" must be a list of strings`);
  return v as string[];
}

export interface ReadRequest {
  id: string;
  offset: number;
  length: number;
}

export function encodeRead(genId: string, offset: number, length: number): Buffer {
  const b = Buffer.alloc(20);
  b.write(genId, 0, 8, 'hex');
  b.writeBigUInt64BE(BigInt(offset), 8);
  b.writeUInt32BE(length, 16);
  return b;
}

export function decodeRead(p: Buffer): ReadRequest {
  if (p.length !== 20) throw new ProtocolError(`READ of ${p.length} bytes (20 expected)`);
  const offset = p.readBigUInt64BE(8);
  if (offset > BigInt(Number.MAX_SAFE_INTEGER)) throw new ProtocolError('READ offset out of range');
  const length = p.readUInt32BE(16);
  if (length === 0 || length > MAX_READ) throw new ProtocolError(`READ of ${length} bytes (1 to ${MAX_READ})`);
  return { id: p.toString('hex', 0, 8), offset: Number(offset), length };
}

/** One chunk of a described segment. */
export interface Described {
  length: number;
  zero: boolean;
  digest: Buffer | null;
}

export function encodeSegment(chunks: Described[]): Buffer {
  let n = 4;
  for (const c of chunks) n += 5 + (c.zero ? 0 : 32);
  const b = Buffer.allocUnsafe(n);
  b.writeUInt32BE(chunks.length, 0);
  let at = 4;
  for (const c of chunks) {
    b.writeUInt32BE(c.length, at);
    b[at + 4] = c.zero ? 1 : 0;
    at += 5;
    if (!c.zero) {
      c.digest!.copy(b, at);
      at += 32;
    }
  }
  return b;
}

/**
 * A segment description, checked: every chunk 1..max bytes, the whole at most `segment`
 * bytes, flags 0 or 1, nothing left over.
 */
export function decodeSegment(p: Buffer, limits: { max: number; segment: number }): Described[] {
  if (p.length < 4) throw new ProtocolError('SEGMENT too short');
  const n = p.readUInt32BE(0);
  if (n === 0 || n > limits.segment) throw new ProtocolError(`SEGMENT of ${n} chunks`);
  const out: Described[] = [];
  let at = 4;
  let total = 0;
  for (let i = 0; i < n; i++) {
    if (at + 5 > p.length) throw new ProtocolError('SEGMENT truncated');
    const length = p.readUInt32BE(at);
    const flag = p[at + 4]!;
    at += 5;
    if (flag > 1) throw new ProtocolError('SEGMENT: bad zero flag');
    if (length === 0 || length > limits.max) throw new ProtocolError(`SEGMENT: chunk of ${length} bytes (at most ${limits.max})`);
    total += length;
    let digest: Buffer | null = null;
    if (!flag) {
      if (at + 32 > p.length) throw new ProtocolError('SEGMENT truncated');
      digest = p.subarray(at, at + 32);
      at += 32;
    }
    out.push({ length, zero: flag === 1, digest });
  }
  if (at !== p.length) throw new ProtocolError('SEGMENT: trailing bytes');
  if (total > limits.segment) throw new ProtocolError(`SEGMENT of ${total} bytes (at most ${limits.segment})`);
  return out;
}

/**
 * Checking a record read from the source before it is copied: the source is untrusted,
 * and a record copied unchecked would become the destination's damage. The checks are
 * those of a reader, on the very bytes that are then appended: the header (magic,
 * version, CRC) against the source's index entry, a group's member table against the
 * entry and the header's digest, then the payload opened (format 6: it must authenticate
 * under the shared keys), decompressed, and every chunk it holds hashed against its
 * identity. Returns the chunks the record holds, or throws what is wrong.
 */
import { GenvaultError } from '../util/errors.js';
import {
  COMP_GROUP,
  COMP_ZSTD,
  GROUP_MEMBER_SIZE,
  RECORD_HEADER_SIZE,
  checkRecord,
  type ChunkLocation,
} from '../format/pack.js';
import { SEAL_BROKEN, chunkIdentity, open, recordAd, type RepoKeys } from '../format/crypto.js';
import { zstd } from '../work/zstd.js';
import type { RecordMember } from './endpoint.js';

const dctx = new zstd.DCtx();
let scratch = Buffer.allocUnsafe(1 << 20);

function damaged(what: string, problem: string): GenvaultError {
  return new GenvaultError(`source damaged: ${what}: ${problem}; nothing of it was copied (run 'genvault verify' on the source)`, 'DAMAGED');
}

/** Decode a (possibly sealed) payload into scratch; returns the raw bytes (valid until the next call). */
function decode(what: string, stored: Buffer, compression: number, rawLength: number, ad: Buffer | null, keys: RepoKeys | null): Buffer {
  let payload: Buffer = stored;
  if (keys) {
    const p = open(keys, stored, ad!);
    if (!p) throw damaged(what, SEAL_BROKEN);
    payload = p;
  }
  if (compression !== COMP_ZSTD && compression !== COMP_GROUP) {
    if (payload.length !== rawLength) throw damaged(what, `raw record holds ${payload.length} bytes, its header says ${rawLength}`);
    return payload;
  }
  if (scratch.length < rawLength) scratch = Buffer.allocUnsafe(rawLength);
  let n: number;
  try {
    n = dctx.decompress(scratch.subarray(0, rawLength), payload);
  } catch (e) {
    throw damaged(what, `zstd: ${(e as Error).message}`);
  }
  if (n !== rawLength) throw damaged(what, `decoded ${n} bytes, expected ${rawLength}`);
  return scratch.subarray(0, rawLength);
}

/**
 * Check `rec` (header and payload, as read from the source at `loc`) for the chunk
 * `digest`, in full. Returns every chunk the record holds: the chunk itself, or all the
 * members of a group record (each hashed), with their places in it.
 */
export function checkSourceRecord(rec: Buffer, loc: ChunkLocation, digest: Buffer, keys: RepoKeys | null): RecordMember[] {
  const what = `the record of chunk ${digest.toString('hex')} in pack ${loc.packId} at ${loc.offset}`;
  if (rec.length !== RECORD_HEADER_SIZE + loc.storedLength) throw damaged(what, `cut off (${rec.length} of ${RECORD_HEADER_SIZE + loc.storedLength} bytes)`);
  const c = checkRecord(rec, { ...loc, digest }, { tableDigest: true });
  if ('problem' in c) throw damaged(what, c.problem);
  const h = c.header;
  if (h.compression !== COMP_GROUP) {
    const ad = keys ? recordAd(keys, 0, h.compression, h.rawLength, h.digest) : null;
    const raw = decode(what, c.payload, h.compression, h.rawLength, ad, keys);
    if (!chunkIdentity(keys, raw).equals(digest)) throw damaged(what, `content does not match its ${keys ? 'identity' : 'SHA-256 digest'}`);
    return [{ digest, rawLength: h.rawLength }];
  }
  // A group: the member table was checked against the header's digest and the entry.
  const n = c.payload.readUInt32LE(0);
  const members: RecordMember[] = [];
  let at = 0;
  for (let k = 0; k < n; k++) {
    const e = 4 + k * GROUP_MEMBER_SIZE;
    const len = c.payload.readUInt32LE(e + 32);
    if (len === 0) throw damaged(what, 'group member of length 0');
    members.push({ digest: Buffer.from(c.payload.subarray(e, e + 32)), rawLength: len, inner: at });
    at += len;
  }
  const ad = keys ? recordAd(keys, 0, COMP_GROUP, h.rawLength, h.digest) : null;
  const raw = decode(what, c.payload.subarray(c.frameAt), COMP_GROUP, h.rawLength, ad, keys);
  for (const m of members) {
    const bytes = raw.subarray(m.inner!, m.inner! + m.rawLength);
    if (!chunkIdentity(keys, bytes).equals(m.digest)) throw damaged(what, `group member ${m.digest.toString('hex')} does not match its ${keys ? 'identity' : 'SHA-256 digest'}`);
  }
  return members;
}


/**
 * Chunk and group records put together in an output buffer: the one place that does it for
 * the `compress` op (a backup's new chunks) and the `adopt` op (records a remote writer
 * sent, checked), so that both write them alike (FORMAT.md, pack records).
 */
import { RECORD_HEADER_SIZE, encodeRecordHeader } from '../format/pack.js';
import { recordAd, sealInto, type RepoKeys } from '../format/crypto.js';

/** `bytes` at `p` in `out`, copied unless they lie there already; their length. */
function placeAt(out: Buffer, p: number, bytes: Uint8Array): number {
  if (bytes.buffer !== out.buffer || bytes.byteOffset !== out.byteOffset + p) out.set(bytes, p);
  return bytes.length;
}

/**
 * The record at `at` in `out`: its header, the plaintext `prefix` (a group's member table,
 * keyed identities and lengths), then `payload`, sealed with `keys` (format 6: bound to the
 * record's compression, raw length and identity) or as it is. Returns the stored length.
 */
export function putRecord(
  out: Buffer, at: number, compression: number, rawLength: number, digest: Uint8Array, payload: Uint8Array, keys: RepoKeys | null, prefix?: Uint8Array,
): number {
  const p = at + RECORD_HEADER_SIZE + (prefix ? placeAt(out, at + RECORD_HEADER_SIZE, prefix) : 0);
  const body = keys ? sealInto(keys, payload, recordAd(keys, 0, compression, rawLength, digest), out, p) : placeAt(out, p, payload);
  const stored = p - at - RECORD_HEADER_SIZE + body;
  encodeRecordHeader(out, at, compression, rawLength, stored, digest);
  return stored;
}

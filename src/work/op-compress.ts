/** The `compress` op: new chunks of a segment into pack records (zstd, groups), written into one buffer. */
import { createHash } from 'node:crypto';
import {
  COMP_GROUP,
  COMP_RAW,
  COMP_ZSTD,
  GROUP_MAX_MEMBERS,
  GROUP_MEMBER_SIZE,
  RECORD_HEADER_SIZE,
} from '../format/pack.js';
import type { CompressAnswer, CompressRequest, Reply } from './protocol.js';
import { zstd } from './zstd.js';
import { keys as poolKeys } from './keys.js';
import { SEAL_OVERHEAD } from '../format/crypto.js';
import { putRecord } from './record-out.js';

const cctx = new zstd.CCtx();
/** A group's members gathered for compression. */
let groupBuf = Buffer.allocUnsafe(0);
/**
 * Where a payload to be sealed is compressed: sealed from here straight into the output,
 * a payload compressed into the output would have to be copied aside first (sealInto).
 */
let sealBuf = Buffer.allocUnsafe(0);
function sealSource(bound: number): Buffer {
  if (sealBuf.length < bound) sealBuf = Buffer.allocUnsafe(Math.max(bound, 1 << 20));
  return sealBuf;
}

export function handleCompress(req: CompressRequest): Reply<CompressAnswer> {
  const keys = req.seal === false ? null : poolKeys;
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
    bound += (j - i) * (RECORD_HEADER_SIZE + SEAL_OVERHEAD) + 4 + (j - i) * GROUP_MEMBER_SIZE + zstd.compressBound(raw) + (j - i) * 64;
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
  // more than nothing; a higher cut stored more (native-notes/performance.md, worker
  // threads, "zstd or raw").
  const single = (i: number, tryZstd: boolean) => {
    const raw = rawOf(i);
    const payloadAt = at + RECORD_HEADER_SIZE;
    const zdst = keys ? sealSource(zstd.compressBound(raw.length)) : out.subarray(payloadAt);
    const zlen = tryZstd ? cctx.compress(zdst, raw, req.level) : raw.length;
    const useZ = tryZstd && zlen < raw.length - (raw.length >>> 7);
    const comp = useZ ? COMP_ZSTD : COMP_RAW;
    const stored = putRecord(out, at, comp, raw.length, digestOf(i), useZ ? zdst.subarray(0, zlen) : raw, keys);
    table.set([at, stored, comp, 0, 0], i * 5);
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
    const zdst = keys ? sealSource(zstd.compressBound(raw)) : out.subarray(payloadAt + tableLen);
    const zlen = cctx.compress(zdst, groupBuf.subarray(0, raw), req.level);
    if (zlen >= raw - (raw >>> 7)) {
      // The group does not compress: its members will not either; store them raw.
      for (let k = i; k < j; k++) single(k, false);
      continue;
    }
    const tableDigest = createHash('sha256').update(out.subarray(payloadAt, payloadAt + tableLen)).digest();
    // Format 6: the frame sealed, the member table (keyed identities, lengths) left plaintext.
    const stored = putRecord(out, at, COMP_GROUP, raw, tableDigest, zdst.subarray(0, zlen), keys, out.subarray(payloadAt, payloadAt + tableLen));
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

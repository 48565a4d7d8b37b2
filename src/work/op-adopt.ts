/**
 * The `adopt` op: pack records a remote writer built (genvault serve, src/remote/upload.ts),
 * checked and made this repository's. The client compressed its new chunks into records
 * as the `compress` op writes them without keys, so that the server does not compress a
 * second time; the server trusts none of it: every header is parsed within bounds, every
 * payload decoded into exactly the raw length its header gives, and every chunk's identity
 * computed here and compared with the chunk the server asked for at that place. Only then
 * is the record sealed (format 6) and written to `out`, ready for the pack.
 *
 * Chunks asked for only as a namespace's proof (`keep` 0) are checked and dropped: a
 * record of such chunks alone is not written; a group that mixes them with kept chunks is
 * written whole (a group cannot be split without compressing again), its extra members
 * unreferenced until gc repacks the pack.
 */
import { createHash } from 'node:crypto';
import { COMP_GROUP, COMP_RAW, COMP_ZSTD, GROUP_MAX_MEMBERS, GROUP_MEMBER_SIZE, RECORD_HEADER_SIZE, decodeRecordHeader } from '../format/pack.js';
import type { AdoptAnswer, AdoptRequest, Reply } from './protocol.js';
import { keys, fastOf, identityOf } from './keys.js';
import { zstd } from './zstd.js';
import { putRecord } from './record-out.js';

const dctx = new zstd.DCtx();
let scratch = Buffer.allocUnsafe(0);

function bad(why: string): never {
  throw Object.assign(new Error(`the client's records: ${why}`), { code: 'PROTOCOL' });
}

/** A zstd payload decoded into exactly `raw` bytes (a bomb cannot grow past them). */
function decoded(payload: Buffer, raw: number): Buffer {
  if (scratch.length < raw + 1) scratch = Buffer.allocUnsafe(Math.max(raw + 1, 1 << 20));
  let n: number;
  try {
    n = dctx.decompress(scratch.subarray(0, raw + 1), payload);
  } catch (e) {
    bad(`a payload does not decode: ${(e as Error).message}`);
  }
  if (n !== raw) bad(`a payload decodes to ${n} bytes, its header says ${raw}`);
  return scratch.subarray(0, raw);
}

export function handleAdopt(req: AdoptRequest): Reply<AdoptAnswer> {
  const recs = Buffer.from(req.recs, req.at, req.len);
  const out = Buffer.from(req.out);
  const n = req.lengths.length;
  const digestOf = (k: number) => req.digests.subarray(k * 32, k * 32 + 32);
  // Per kept chunk: record offset in out, stored length, compression, offset in the group, group raw length.
  const table = new Int32Array(n * 5);
  let rows = 0;
  // BLAKE3 of every chunk checked, while its bytes are still in the cache.
  const fast = req.fast ? new Uint8Array(n * 32) : null;
  let k = 0; // the next chunk asked for
  let o = 0; // where the next record goes in out
  for (let at = 0; at < recs.length; ) {
    const h = decodeRecordHeader(recs, at);
    if (!h || h.type !== 0) bad(`no chunk record at byte ${at}`);
    const payloadAt = at + RECORD_HEADER_SIZE;
    if (h.storedLength > recs.length - payloadAt) bad(`a record runs past the end (byte ${at})`);
    const payload = recs.subarray(payloadAt, payloadAt + h.storedLength);
    at = payloadAt + h.storedLength;
    if (h.compression !== COMP_GROUP) {
      if (k >= n) bad('more chunks than were asked for');
      if (h.rawLength !== req.lengths[k] || !h.digest.equals(digestOf(k))) bad(`chunk ${k} is not the one asked for`);
      if (h.compression === COMP_RAW && h.storedLength !== h.rawLength) bad(`raw chunk ${k} has a stored length of ${h.storedLength}`);
      const raw = h.compression === COMP_ZSTD ? decoded(payload, h.rawLength) : payload;
      if (!identityOf(raw).equals(h.digest)) bad(`chunk ${k} does not match its identity`);
      fast?.set(fastOf(raw), k * 32);
      if (req.keep[k]) {
        const stored = putRecord(out, o, h.compression, h.rawLength, h.digest, payload, keys);
        table.set([o, stored, h.compression, 0, 0], rows++ * 5);
        o += RECORD_HEADER_SIZE + stored;
      }
      k++;
      continue;
    }
    // A group: member table (count, then identity and length per member), then one zstd frame.
    if (req.group <= 0) bad('a group record where the repository makes none');
    if (payload.length < 4) bad('a group record without its member table');
    const members = payload.readUInt32LE(0);
    const tableLen = 4 + members * GROUP_MEMBER_SIZE;
    if (members < 2 || members > GROUP_MAX_MEMBERS || tableLen > payload.length) bad(`a group of ${members} members`);
    if (members > n - k) bad('more chunks than were asked for');
    if (h.rawLength > req.group) bad(`a group of ${h.rawLength} bytes, more than the repository's ${req.group}`);
    const memberTable = payload.subarray(0, tableLen);
    if (!createHash('sha256').update(memberTable).digest().equals(h.digest)) bad('a group whose header does not name its member table');
    let sum = 0;
    for (let m = 0; m < members; m++) {
      const e = 4 + m * GROUP_MEMBER_SIZE;
      if (!memberTable.subarray(e, e + 32).equals(digestOf(k + m)) || memberTable.readUInt32LE(e + 32) !== req.lengths[k + m]) bad(`chunk ${k + m} is not the one asked for`);
      sum += req.lengths[k + m]!;
    }
    if (sum !== h.rawLength) bad('a group whose members do not add up to its length');
    const raw = decoded(payload.subarray(tableLen), h.rawLength);
    let keptHere = false;
    for (let m = 0, inner = 0; m < members; m++) {
      const len = req.lengths[k + m]!;
      const member = raw.subarray(inner, inner + len);
      if (!identityOf(member).equals(digestOf(k + m))) bad(`chunk ${k + m} does not match its identity`);
      fast?.set(fastOf(member), (k + m) * 32);
      inner += len;
      keptHere ||= req.keep[k + m] === 1;
    }
    if (keptHere) {
      const stored = putRecord(out, o, COMP_GROUP, h.rawLength, h.digest, payload.subarray(tableLen), keys, memberTable);
      for (let m = 0, inner = 0; m < members; m++) {
        if (req.keep[k + m]) table.set([o, stored, COMP_GROUP, inner, h.rawLength], rows++ * 5);
        inner += req.lengths[k + m]!;
      }
      o += RECORD_HEADER_SIZE + stored;
    }
    k += members;
  }
  if (k !== n) bad(`${n - k} of the chunks asked for are missing`);
  const cut = table.slice(0, rows * 5);
  const transfer = [cut.buffer as ArrayBuffer];
  if (fast) transfer.push(fast.buffer as ArrayBuffer);
  return { result: { out: new Uint8Array(req.out, 0, o), table: cut, fast }, transfer };
}

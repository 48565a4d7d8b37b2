/**
 * The pack record checks (checkRecordHeader, checkRecord in pack.ts) that the workers,
 * verify and gc share: records built in memory with the writer's encoding, no repository.
 */
import { createHash } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import {
  COMP_GROUP,
  COMP_RAW,
  COMP_ZSTD,
  GROUP_MEMBER_SIZE,
  GROUP_TABLE_NOT_DIGEST,
  RECORD_HEADER_BAD,
  RECORD_HEADER_SIZE,
  RECORD_NOT_INDEX,
  type RecordEntry,
  checkRecord,
  checkRecordHeader,
  encodeRecordHeader,
} from '../src/format/pack.js';
import { prng } from './helpers.js';

const sha = (b: Uint8Array) => createHash('sha256').update(b).digest();

/** A record as the backup workers write it: header, then the payload. */
function record(compression: number, rawLength: number, payload: Buffer, digest: Uint8Array): Buffer {
  const rec = Buffer.alloc(RECORD_HEADER_SIZE + payload.length);
  encodeRecordHeader(rec, 0, compression, rawLength, payload.length, digest);
  payload.copy(rec, RECORD_HEADER_SIZE);
  return rec;
}

/** A member table for these members (digest, length). */
function memberTable(members: Array<[Buffer, number]>): Buffer {
  const t = Buffer.alloc(4 + members.length * GROUP_MEMBER_SIZE);
  t.writeUInt32LE(members.length, 0);
  members.forEach(([d, len], k) => {
    d.copy(t, 4 + k * GROUP_MEMBER_SIZE);
    t.writeUInt32LE(len, 4 + k * GROUP_MEMBER_SIZE + 32);
  });
  return t;
}

describe('a record of one chunk', () => {
  const data = prng(7, 5000);
  const digest = sha(data);
  const rec = record(COMP_RAW, data.length, data, digest);
  const entry: RecordEntry = { storedLength: data.length, rawLength: data.length, compression: COMP_RAW, digest };

  it('passes when it matches its index entry', () => {
    const c = checkRecord(rec, entry);
    if ('problem' in c) throw new Error(c.problem);
    expect(c.header).toEqual({ type: 0, compression: COMP_RAW, rawLength: data.length, storedLength: data.length, digest });
    expect(c.payload.equals(data)).toBe(true);
    expect(c.frameAt).toBe(0);
    expect('header' in checkRecordHeader(rec, entry)).toBe(true);
  });

  it('bad magic, version or CRC, or a cut-off header: the header is bad', () => {
    for (const at of [0, 3, 4, 9, 20, 50]) {
      const bad = Buffer.from(rec);
      bad[at]! ^= 0x01;
      expect(checkRecord(bad, entry), `byte ${at}`).toEqual({ problem: RECORD_HEADER_BAD });
    }
    // A sane header with the CRC recomputed but an unknown compression.
    const odd = Buffer.from(rec);
    encodeRecordHeader(odd, 0, 3, data.length, data.length, digest);
    expect(checkRecord(odd, entry)).toEqual({ problem: RECORD_HEADER_BAD });
    expect(checkRecord(rec.subarray(0, RECORD_HEADER_SIZE - 1), entry)).toEqual({ problem: RECORD_HEADER_BAD });
  });

  it('lengths, compression or digest other than the entry says: it does not match the index', () => {
    expect(checkRecord(rec, { ...entry, storedLength: data.length - 1 })).toEqual({ problem: RECORD_NOT_INDEX });
    expect(checkRecord(rec, { ...entry, rawLength: data.length + 1 })).toEqual({ problem: RECORD_NOT_INDEX });
    expect(checkRecord(rec, { ...entry, compression: COMP_ZSTD })).toEqual({ problem: RECORD_NOT_INDEX });
    const other = Buffer.from(digest);
    other[31]! ^= 0x80;
    expect(checkRecord(rec, { ...entry, digest: other })).toEqual({ problem: RECORD_NOT_INDEX });
  });

  it('headerCompression: the header says how it is stored (the workers read so)', () => {
    expect('header' in checkRecord(rec, { ...entry, compression: COMP_ZSTD }, { headerCompression: true })).toBe(true);
    // The rest is still compared.
    expect(checkRecord(rec, { ...entry, rawLength: 1 }, { headerCompression: true })).toEqual({ problem: RECORD_NOT_INDEX });
  });

  it('the payload is not hashed: damage there is for the decoder to find', () => {
    const bad = Buffer.from(rec);
    bad[RECORD_HEADER_SIZE + 10]! ^= 0xff;
    expect('header' in checkRecord(bad, entry)).toBe(true);
  });
});

describe('a group record', () => {
  const lens = [3000, 1234, 4096];
  const members = lens.map((n, k) => prng(100 + k, n));
  const digests = members.map(sha);
  const groupRaw = lens.reduce((a, b) => a + b, 0);
  const table = memberTable(digests.map((d, k) => [d, lens[k]!]));
  const frame = prng(9, 777); // not decoded by the checks
  const payload = Buffer.concat([table, frame]);
  const rec = record(COMP_GROUP, groupRaw, payload, sha(table));
  const inners = [0, lens[0]!, lens[0]! + lens[1]!];
  const entry = (k: number): RecordEntry => ({
    storedLength: payload.length,
    rawLength: lens[k]!,
    compression: COMP_GROUP,
    inner: inners[k],
    groupRaw,
    digest: digests[k]!,
  });

  it('each member passes, with the frame after the member table', () => {
    for (let k = 0; k < lens.length; k++) {
      const c = checkRecord(rec, entry(k), { tableDigest: true });
      if ('problem' in c) throw new Error(c.problem);
      expect(c.frameAt).toBe(table.length);
      expect(c.payload.subarray(c.frameAt).equals(frame)).toBe(true);
      expect(c.header.rawLength).toBe(groupRaw);
    }
    // Only the header and the member table are needed (verify reads no more).
    expect('header' in checkRecord(rec.subarray(0, RECORD_HEADER_SIZE + table.length), entry(1))).toBe(true);
  });

  it('a bad header CRC: the header is bad', () => {
    const bad = Buffer.from(rec);
    bad[48]! ^= 1;
    expect(checkRecord(bad, entry(0))).toEqual({ problem: RECORD_HEADER_BAD });
  });

  it("the header's compression, stored or group length other than the entry's: it does not match the index", () => {
    expect(checkRecord(rec, { ...entry(0), storedLength: payload.length + 1 })).toEqual({ problem: RECORD_NOT_INDEX });
    expect(checkRecord(rec, { ...entry(0), groupRaw: groupRaw - 1 })).toEqual({ problem: RECORD_NOT_INDEX });
    // A member reaching past the group's end.
    expect(checkRecord(rec, { ...entry(2), inner: inners[2]! + 1 })).toEqual({ problem: RECORD_NOT_INDEX });
    const raw = record(COMP_RAW, groupRaw, payload, sha(table));
    expect(checkRecord(raw, entry(0))).toEqual({ problem: RECORD_NOT_INDEX });
  });

  it('the member table does not name the chunk at its place: it does not match the index', () => {
    const other = Buffer.from(digests[1]!);
    other[0]! ^= 1;
    expect(checkRecord(rec, { ...entry(1), digest: other })).toEqual({ problem: RECORD_NOT_INDEX });
    expect(checkRecord(rec, { ...entry(1), inner: inners[1]! - 1 })).toEqual({ problem: RECORD_NOT_INDEX });
    expect(checkRecord(rec, { ...entry(1), rawLength: lens[1]! - 1 })).toEqual({ problem: RECORD_NOT_INDEX });
    expect(checkRecord(rec, { ...entry(1), digest: digests[0]! })).toEqual({ problem: RECORD_NOT_INDEX });
  });

  it("member lengths that do not add up to the header's: the table does not match the header", () => {
    const t = memberTable(digests.map((d, k) => [d, lens[k]! + (k === 2 ? 1 : 0)]));
    const p = Buffer.concat([t, frame]);
    const bad = record(COMP_GROUP, groupRaw, p, sha(t));
    expect(checkRecord(bad, entry(0))).toEqual({ problem: 'group member table does not match the record header' });
  });

  it('a member table cut off or with a bad count is damaged', () => {
    const cut = record(COMP_GROUP, groupRaw, payload, sha(table)).subarray(0, RECORD_HEADER_SIZE + 3);
    // The header names the whole payload; the buffer ends inside the count.
    expect(checkRecord(cut, entry(0))).toEqual({ problem: 'group member table cut off' });
    for (const count of [0, 257, lens.length + 1000]) {
      const bad = Buffer.from(rec);
      bad.writeUInt32LE(count, RECORD_HEADER_SIZE);
      expect(checkRecord(bad, entry(0)), `count ${count}`).toEqual({ problem: 'group member table damaged' });
    }
    expect(checkRecord(rec.subarray(0, RECORD_HEADER_SIZE + table.length - 1), entry(0))).toEqual({ problem: 'group member table damaged' });
  });

  it('tableDigest: a member table other than the header digest names is found (verify)', () => {
    const bad = record(COMP_GROUP, groupRaw, payload, sha(frame));
    expect(checkRecord(bad, entry(1), { tableDigest: true })).toEqual({ problem: GROUP_TABLE_NOT_DIGEST });
    expect('header' in checkRecord(bad, entry(1))).toBe(true); // the readers do not hash the table
  });
});

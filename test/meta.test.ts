/**
 * Metadata records (format 4) and the pack scanner, in-process: each record type reads
 * back what was written; damage of any kind is reported as damage with the bytes it
 * covers, the scan finds the next whole record after it, and a torn append is the tail.
 */
import { createHash } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { COMP_GROUP, COMP_RAW, COMP_ZSTD, GROUP_MEMBER_SIZE, PACK_HEADER_SIZE, PACK_MAGIC, RECORD_HEADER_SIZE, RECORD_NOT_INDEX, checkRecordHeader, encodeRecordHeader, newPackId } from '../src/format/pack.js';
import { LeafBuilder, encodeTop } from '../src/format/chunkmap.js';
import { REC_CHANGE, REC_GENERATION, REC_GENMAP, REC_LEAF, decodeMetaPayload, encodeMetaRecord, type MetaRecord } from '../src/format/meta.js';
import { scanPack, type ScanEnd, type ScanItem } from '../src/format/scan.js';
import type { Generation } from '../src/format/generation.js';
import { prng } from './helpers.js';

const sha = (b: Uint8Array) => createHash('sha256').update(b).digest();

function leafBytes(seed: number): { leaf: Buffer; digest: Buffer; bytes: number; chunks: number } {
  const b = new LeafBuilder(1000, 1000);
  const r = prng(seed, 8 * 32);
  for (let i = 0; i < 8; i++) b.add({ length: 4096 * (i + 1), zero: i === 3, digest: i === 3 ? null : Buffer.from(r.subarray(i * 32, i * 32 + 32)) });
  const { ref, encoded } = b.finish()!;
  return { leaf: encoded, digest: ref.digest, bytes: ref.bytes, chunks: ref.chunks };
}

const GEN: Generation = {
  id: '00112233445566ff',
  name: 'vm1',
  created: '2026-12-01T01:02:03.004Z',
  size: 4096 * 36,
  chunking: { block: 4096, min: 16384, max: 524288, maskBits: 5 },
  leaves: 1,
  tags: ['daily'],
  source: 'file:/x.img',
  parent: null,
  stats: { bytesRead: 1, zeroBytes: 0, chunks: 8, newChunks: 7, newBytes: 1, newStored: 1, durationMs: 5 },
};

function records(): MetaRecord[] {
  const l = leafBytes(1);
  return [
    { type: REC_LEAF, leaf: l.leaf },
    { type: REC_GENMAP, id: GEN.id, top: encodeTop([{ digest: l.digest, bytes: l.bytes, chunks: l.chunks }]) },
    { type: REC_GENERATION, generation: GEN, json: Buffer.from(JSON.stringify(GEN)) },
    { type: REC_CHANGE, change: { id: GEN.id, name: GEN.name, created: GEN.created, rev: 2, at: '2026-12-02T00:00:00.000Z', tags: ['kept'], protected: true } },
    { type: REC_CHANGE, change: { id: GEN.id, name: GEN.name, created: GEN.created, rev: 3, at: '2026-12-03T00:00:00.000Z', forgotten: true } },
  ];
}

describe('metadata records', () => {
  it('read back what was written, each type, with the header naming type, length and digest', () => {
    for (const rec of records()) {
      const enc = encodeMetaRecord(rec);
      const payload = enc.subarray(RECORD_HEADER_SIZE);
      expect(enc.readUInt16LE(6)).toBe(rec.type);
      expect(enc.readUInt32LE(8)).toBe(payload.length);
      expect(enc.subarray(16, 48)).toEqual(sha(payload));
      expect(decodeMetaPayload(rec.type, Buffer.from(payload))).toEqual(rec);
    }
  });

  it('are never taken for a chunk, even when a chunk has the same bytes', () => {
    const rec = encodeMetaRecord(records()[0]!);
    const payload = rec.subarray(RECORD_HEADER_SIZE);
    const entry = { storedLength: payload.length, rawLength: payload.length, compression: COMP_RAW, digest: sha(payload) };
    expect(checkRecordHeader(rec, entry)).toEqual({ problem: RECORD_NOT_INDEX });
    const asChunk = Buffer.from(rec);
    encodeRecordHeader(asChunk, 0, COMP_RAW, payload.length, payload.length, sha(payload));
    expect(checkRecordHeader(asChunk, entry)).toHaveProperty('header');
  });

  it('refuse payloads that do not parse exactly', () => {
    const [leaf, genmap, gen, change] = records().map((r) => Buffer.from(encodeMetaRecord(r).subarray(RECORD_HEADER_SIZE)));
    expect(() => decodeMetaPayload(REC_LEAF, Buffer.concat([leaf!, Buffer.of(1)]))).toThrow(/after its last entry/);
    expect(() => decodeMetaPayload(REC_GENMAP, Buffer.concat([genmap!, Buffer.of(1)]))).toThrow(/generation map is corrupt/);
    expect(() => decodeMetaPayload(REC_GENMAP, Buffer.from('GVX1........'))).toThrow(/bad magic/);
    const other = Buffer.from(gen!);
    other.write('vm2', other.indexOf('vm1'));
    expect(decodeMetaPayload(REC_GENERATION, other)).toMatchObject({ generation: { name: 'vm2' } });
    expect(() => decodeMetaPayload(REC_GENERATION, Buffer.concat([Buffer.from('GVG1'), Buffer.from('{"id":"x"}')]))).toThrow(/missing name|bad/);
    expect(() => decodeMetaPayload(REC_GENERATION, Buffer.from('GVG1{'))).toThrow(/not JSON/);
    const badRev = Buffer.from(change!.toString().replace('"rev":2', '"rev":0'));
    expect(() => decodeMetaPayload(REC_CHANGE, badRev)).toThrow(/bad rev/);
    const badName = Buffer.from(change!.toString().replace('"name":"vm1"', '"name":"../x"'));
    expect(() => decodeMetaPayload(REC_CHANGE, badName)).toThrow();
    expect(() => decodeMetaPayload(9, leaf!)).toThrow(/unknown record type 9/);
  });
});

/** A pack in memory: header, then the given records. */
function pack(id: string, recs: Buffer[]): Buffer {
  const head = Buffer.alloc(PACK_HEADER_SIZE);
  PACK_MAGIC.copy(head);
  head.write(id, 8, 'hex');
  return Buffer.concat([head, ...recs]);
}

function chunkRecord(seed: number, len: number, comp = COMP_RAW): Buffer {
  const data = prng(seed, len);
  const rec = Buffer.alloc(RECORD_HEADER_SIZE + len);
  encodeRecordHeader(rec, 0, comp, comp === COMP_RAW ? len : len * 2, len, sha(data));
  data.copy(rec, RECORD_HEADER_SIZE);
  return rec;
}

function groupRecord(lengths: number[]): { rec: Buffer; digests: Buffer[] } {
  const digests = lengths.map((l, i) => sha(prng(100 + i, l)));
  const table = Buffer.alloc(4 + lengths.length * GROUP_MEMBER_SIZE);
  table.writeUInt32LE(lengths.length);
  lengths.forEach((l, i) => {
    digests[i]!.copy(table, 4 + i * GROUP_MEMBER_SIZE);
    table.writeUInt32LE(l, 4 + i * GROUP_MEMBER_SIZE + 32);
  });
  const frame = prng(7, 300); // not decoded by the scan
  const rec = Buffer.alloc(RECORD_HEADER_SIZE + table.length + frame.length);
  encodeRecordHeader(rec, 0, COMP_GROUP, lengths.reduce((a, b) => a + b, 0), table.length + frame.length, sha(table));
  table.copy(rec, RECORD_HEADER_SIZE);
  frame.copy(rec, RECORD_HEADER_SIZE + table.length);
  return { rec, digests };
}

async function scan(buf: Buffer, id: string, size = buf.length): Promise<{ items: ScanItem[]; end: ScanEnd }> {
  // Short reads on purpose: at most 1000 bytes per call, as a network store may answer.
  const read = async (into: Buffer, off: number, len: number, pos: number) => buf.copy(into, off, pos, Math.min(pos + Math.min(len, 1000), size));
  const it = scanPack(read, size, id);
  const items: ScanItem[] = [];
  for (;;) {
    const r = await it.next();
    if (r.done) return { items, end: r.value };
    items.push(r.value);
  }
}

describe('scanning a pack', () => {
  const id = newPackId();
  const c1 = chunkRecord(1, 5000);
  const g = groupRecord([4096, 8192, 100]);
  const c2 = chunkRecord(2, 70_000, COMP_ZSTD);
  const metas = records().map((r) => encodeMetaRecord(r));
  const whole = pack(id, [c1, g.rec, metas[0]!, c2, ...metas.slice(1)]);
  const offsets: number[] = [];
  for (let at = PACK_HEADER_SIZE, i = 0, all = [c1, g.rec, metas[0]!, c2, ...metas.slice(1)]; i < all.length; at += all[i]!.length, i++) offsets.push(at);

  it('yields every record in order: chunks by header, group members from the table, metadata decoded', async () => {
    const { items, end } = await scan(whole, id);
    expect(end).toEqual({ end: whole.length, tail: 0 });
    expect(items.map((i) => i.kind)).toEqual(['chunk', 'group', 'meta', 'chunk', 'meta', 'meta', 'meta', 'meta']);
    expect(items.map((i) => i.offset)).toEqual(offsets);
    const grp = items[1] as Extract<ScanItem, { kind: 'group' }>;
    expect(grp.members).toEqual([
      { digest: g.digests[0], inner: 0, rawLength: 4096 },
      { digest: g.digests[1], inner: 4096, rawLength: 8192 },
      { digest: g.digests[2], inner: 12288, rawLength: 100 },
    ]);
    expect((items[0] as Extract<ScanItem, { kind: 'chunk' }>).header.digest).toEqual(sha(prng(1, 5000)));
    expect(items.filter((i) => i.kind === 'meta').map((i) => (i as Extract<ScanItem, { kind: 'meta' }>).record)).toEqual(records());
  });

  it('stops at a torn append and reports the tail', async () => {
    const cut = offsets[5]! + 30; // inside the header of the 6th record
    const { items, end } = await scan(whole, id, cut);
    expect(items.length).toBe(5);
    expect(end).toMatchObject({ end: offsets[5], tail: 30 });
    const cut2 = offsets[3]! + RECORD_HEADER_SIZE + 10; // inside the big chunk's payload
    const r2 = await scan(whole, id, cut2);
    expect(r2.items.length).toBe(3);
    expect(r2.end).toMatchObject({ end: offsets[3], tail: RECORD_HEADER_SIZE + 10, tailProblem: 'record runs past the end of the pack' });
  });

  it('reports a damaged record with the bytes it covers and resumes at the next whole one', async () => {
    for (const [i, at, problem] of [
      [0, 20, /record header damaged/], // the first chunk's digest: the header CRC fails
      [1, RECORD_HEADER_SIZE + 10, /table does not match its digest/], // a member digest in the group table
      [2, RECORD_HEADER_SIZE + 12, /metadata record of type 1 does not match its digest/], // the leaf's payload
      [4, RECORD_HEADER_SIZE + 40, /does not match its digest/], // the generation map's payload
    ] as Array<[number, number, RegExp]>) {
      const bad = Buffer.from(whole);
      bad[offsets[i]! + at]! ^= 0x10;
      const { items, end } = await scan(bad, id);
      expect(end.tail, `record ${i}`).toBe(0);
      const d = items.find((x) => x.kind === 'damaged') as Extract<ScanItem, { kind: 'damaged' }>;
      expect(d, `record ${i}`).toMatchObject({ offset: offsets[i], length: offsets[i + 1]! - offsets[i]! });
      expect(d.problem).toMatch(problem);
      expect(items.length, `record ${i}`).toBe(8); // every other record still found
      expect(items.filter((x) => x.kind !== 'damaged').map((x) => x.offset)).toEqual(offsets.filter((_, k) => k !== i));
    }
  });

  it('refuses a pack header that names another pack, and still finds the records', async () => {
    const { items } = await scan(whole, newPackId());
    expect(items[0]).toMatchObject({ kind: 'damaged', offset: 0, length: PACK_HEADER_SIZE, problem: 'pack header does not name this pack' });
    expect(items.slice(1).map((i) => i.offset)).toEqual(offsets);
  });

  it('never yields a record from garbage: random bytes give damage or nothing', async () => {
    const junk = pack(id, [prng(9, 200_000)]);
    const { items, end } = await scan(junk, id);
    expect(items.filter((i) => i.kind !== 'damaged')).toEqual([]);
    expect(end.end + end.tail).toBe(junk.length);
  });
});

/**
 * Tables of contents (format 5, src/format/toc.ts): a pack written by PackWriter with
 * TOCs reads the same from them as header by header, and a pack whose TOCs are missing,
 * damaged, forged or cut off is read header by header instead, never taken at the TOC's
 * word. Real files through the local store, no repository.
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { COMP_GROUP, COMP_RAW, COMP_ZSTD, GROUP_MEMBER_SIZE, RECORD_HEADER_SIZE, encodeRecordHeader } from '../src/format/pack.js';
import { REC_GENMAP, REC_LEAF, REC_TOC, encodeMetaRecord } from '../src/format/meta.js';
import { LeafBuilder } from '../src/format/chunkmap.js';
import { checkTocPayload, encodeTocRecord, tocEntries, tocEntriesOf } from '../src/format/toc.js';
import type { ScanEnd, ScanItem } from '../src/format/scan.js';
import { LocalStore } from '../src/store/local.js';
import { PackWriter } from '../src/store/pack-writer.js';
import { scanStoredPack, type StoredPack } from '../src/store/pack-reader.js';
import { Scratch, prng } from './helpers.js';

const sha = (b: Uint8Array) => createHash('sha256').update(b).digest();

function record(compression: number, rawLength: number, payload: Buffer, digest: Uint8Array, type = 0): Buffer {
  const rec = Buffer.alloc(RECORD_HEADER_SIZE + payload.length);
  encodeRecordHeader(rec, 0, compression, rawLength, payload.length, digest, type);
  payload.copy(rec, RECORD_HEADER_SIZE);
  return rec;
}

/** A group record of these members (its frame is not a real zstd frame: the scan never decodes it). */
function group(members: Buffer[]): Buffer {
  const t = Buffer.alloc(4 + members.length * GROUP_MEMBER_SIZE);
  t.writeUInt32LE(members.length, 0);
  members.forEach((m, k) => {
    sha(m).copy(t, 4 + k * GROUP_MEMBER_SIZE);
    t.writeUInt32LE(m.length, 4 + k * GROUP_MEMBER_SIZE + 32);
  });
  const raw = members.reduce((a, m) => a + m.length, 0);
  return record(COMP_GROUP, raw, Buffer.concat([t, prng(9, 300)]), sha(t));
}

function chunk(seed: number, n: number, compression = COMP_RAW): Buffer {
  const data = prng(seed, n);
  return record(compression, compression === COMP_RAW ? n : n * 2, data, sha(data));
}

function leafRecord(seed: number): Buffer {
  const b = new LeafBuilder(1, 2);
  b.add({ length: 4096, zero: false, digest: sha(prng(seed, 8)) });
  const leaf = b.add({ length: 8192, zero: true, digest: null })!;
  return encodeMetaRecord({ type: REC_LEAF, leaf: leaf.encoded });
}

let s: Scratch;
let store: LocalStore;

beforeAll(async () => {
  s = await Scratch.create();
  store = new LocalStore(s.dir);
});
afterAll(() => s?.cleanup());

/** A pack written in two syncs: chunks, a group, a leaf, then more chunks and a map. */
async function writePack(toc: boolean): Promise<StoredPack> {
  const w = await PackWriter.create(store, { toc, register: async () => undefined });
  await w.append(Buffer.concat([chunk(1, 5000), chunk(2, 3000, COMP_ZSTD)]));
  await w.append(group([prng(3, 4000), prng(4, 5000), prng(5, 100)]));
  await w.append(leafRecord(6));
  await w.sync();
  await w.append(chunk(7, 7000));
  await w.append(encodeMetaRecord({ type: REC_GENMAP, id: '0123456789abcdef', top: Buffer.alloc(0) }));
  await w.sync();
  await w.close();
  return stored(w.packId, w.size);
}

function stored(packId: string, size: number): StoredPack {
  return { packId, name: `packs/${packId.slice(0, 2)}/${packId}.pack`, size };
}

async function scan(p: StoredPack, readAll = false): Promise<{ items: ScanItem[]; end: ScanEnd }> {
  const it = scanStoredPack(store, p, p.size, { readAll });
  const items: ScanItem[] = [];
  let r = await it.next();
  for (; !r.done; r = await it.next()) items.push(r.value);
  return { items, end: r.value };
}

/** What a scan found, TOC records aside (a header-by-header scan meets them, a TOC lists none). */
const summary = (items: ScanItem[]) =>
  items
    .filter((i) => !(i.kind === 'meta' && i.record.type === REC_TOC))
    .map((i) => (i.kind === 'damaged' ? ['damaged', i.offset, i.problem] : [i.kind, i.offset, i.header.type, i.header.digest.toString('hex'), i.kind === 'group' ? i.members : null]));

const flip = async (p: StoredPack, at: number) => {
  const file = path.join(s.dir, p.name);
  const b = await fs.readFile(file);
  b[at]! ^= 0x40;
  await fs.writeFile(file, b);
};

describe('a pack with tables of contents', () => {
  it('reads the same from its TOCs as header by header, and its TOCs chain', async () => {
    const p = await writePack(true);
    const fast = await scan(p);
    const whole = await scan(p, true);
    expect(fast.end).toEqual({ end: p.size, tail: 0, viaToc: true });
    expect(whole.end).toEqual({ end: p.size, tail: 0 });
    expect(summary(fast.items)).toEqual(summary(whole.items));
    expect(fast.items.map((i) => i.kind)).toEqual(['chunk', 'chunk', 'group', 'meta', 'chunk', 'meta']);
    const tocs = whole.items.filter((i) => i.kind === 'meta' && i.record.type === REC_TOC);
    expect(tocs.map((t) => (t.kind === 'meta' && t.record.type === REC_TOC ? [t.record.prev, t.record.count] : null))).toEqual([
      [0, 4],
      [tocs[0]!.offset, 2],
    ]);
  });

  it('a pack written without TOCs (format 4) is read header by header', async () => {
    const p = await writePack(false);
    const r = await scan(p);
    expect(r.end.viaToc).toBeUndefined();
    expect(r.items.map((i) => i.kind)).toEqual(['chunk', 'chunk', 'group', 'meta', 'chunk', 'meta']);
  });

  it('a damaged byte in either TOC, or bytes after the last one: read header by header, same records', async () => {
    const good = await writePack(true);
    const want = summary((await scan(good, true)).items);
    const tocs = (await scan(good, true)).items.filter((i) => i.kind === 'meta' && i.record.type === REC_TOC);
    for (const at of [tocs[0]!.offset + 10, tocs[0]!.offset + RECORD_HEADER_SIZE + 20, tocs[1]!.offset + RECORD_HEADER_SIZE + 5, good.size - 2]) {
      const p = await writePack(true);
      await flip(p, at);
      const r = await scan(p);
      expect(r.end.viaToc, `flip at ${at}`).toBeUndefined();
      // The header-by-header scan reports the damaged TOC; every other record is found.
      expect(summary(r.items).filter((i) => i[0] !== 'damaged')).toEqual(want);
    }
    const p = await writePack(true);
    await fs.appendFile(path.join(s.dir, p.name), chunk(8, 100));
    const r = await scan({ ...p, size: p.size + RECORD_HEADER_SIZE + 100 });
    expect(r.end.viaToc).toBeUndefined();
    expect(r.items.map((i) => i.kind)).toEqual(['chunk', 'chunk', 'group', 'meta', 'meta', 'chunk', 'meta', 'meta', 'chunk']);
  });

  it('a forged TOC (valid checksums) that does not cover its bytes exactly is not believed', async () => {
    const w = await PackWriter.create(store, { toc: false, register: async () => undefined });
    const recs = Buffer.concat([chunk(11, 2000), chunk(12, 3000)]);
    await w.append(recs);
    // Lists only the first record: the second would be hidden.
    const entries = tocEntriesOf(recs, 24).slice(0, 1).map((e) => e.bytes);
    await w.append(encodeTocRecord(0, entries));
    await w.sync();
    await w.close();
    const r = await scan(stored(w.packId, w.size));
    expect(r.end.viaToc).toBeUndefined();
    expect(r.items.filter((i) => i.kind === 'chunk')).toHaveLength(2);
  });

  it('a TOC that lies about a metadata record: that record is reported damaged', async () => {
    const w = await PackWriter.create(store, { toc: false, register: async () => undefined });
    const leaf = leafRecord(13);
    await w.append(leaf);
    const entry = tocEntriesOf(leaf, 24)[0]!.bytes;
    entry[20]! ^= 1; // a digest byte
    await w.append(encodeTocRecord(0, [entry]));
    await w.sync();
    await w.close();
    const r = await scan(stored(w.packId, w.size));
    expect(r.end.viaToc).toBe(true);
    expect(r.items).toMatchObject([{ kind: 'damaged', offset: 24, problem: 'record does not match the table of contents' }]);
  });

  it('a rewind behind a TOC ends the chain: no more TOCs, read header by header', async () => {
    const w = await PackWriter.create(store, { toc: true, register: async () => undefined });
    await w.append(chunk(14, 1000));
    await w.sync();
    const synced = w.size;
    await w.append(chunk(15, 1000));
    await w.rewind(synced - 10);
    await w.rewind(24 + RECORD_HEADER_SIZE + 1000);
    await w.append(chunk(16, 1000));
    await w.sync();
    await w.close();
    const r = await scan(stored(w.packId, w.size));
    expect(r.end.viaToc).toBeUndefined();
    expect(r.items.map((i) => i.kind)).toEqual(['chunk', 'chunk']);
  });

  it('a rewind after the last TOC keeps the chain', async () => {
    const w = await PackWriter.create(store, { toc: true, register: async () => undefined });
    await w.append(chunk(17, 1000));
    await w.sync();
    const synced = w.size;
    await w.append(chunk(18, 1000));
    await w.rewind(synced);
    await w.append(chunk(19, 1000));
    await w.sync();
    await w.close();
    const r = await scan(stored(w.packId, w.size));
    expect(r.end.viaToc).toBe(true);
    expect(r.items.map((i) => i.kind === 'chunk' && i.header.digest.equals(sha(prng(19, 1000))))).toEqual([false, true]);
  });
});

describe('TOC payloads', () => {
  it('decode exactly or throw', () => {
    const recs = Buffer.concat([chunk(20, 10), group([prng(21, 10), prng(22, 10)])]);
    const entries = tocEntriesOf(recs, 24).map((e) => e.bytes);
    const payload = encodeTocRecord(77, entries).subarray(RECORD_HEADER_SIZE);
    const d = checkTocPayload(payload);
    expect(d).toEqual({ prev: 77, count: 2, covered: recs.length });
    expect([...tocEntries(payload, 24)].map((e) => [e.offset, e.type, e.compression, e.table?.length ?? 0])).toEqual([
      [24, 0, COMP_RAW, 0],
      [24 + RECORD_HEADER_SIZE + 10, 0, COMP_GROUP, 4 + 2 * GROUP_MEMBER_SIZE],
    ]);
    const bad = (f: (b: Buffer) => void) => {
      const b = Buffer.from(payload);
      f(b);
      return () => checkTocPayload(b);
    };
    expect(bad((b) => b.writeUInt32LE(1e9, 12))).toThrow(/cut off/); // a huge count
    expect(bad((b) => b.writeUInt32LE(1, 12))).toThrow(/after the last entry/);
    expect(bad((b) => (b[0] = 0))).toThrow(/magic/);
    expect(bad((b) => b.writeUInt32LE(5, b.length - 8))).toThrow(/trailer/);
    expect(bad((b) => b.writeUInt32LE(9999, 16 + 2 * 43))).toThrow(/group member table/); // a group's member count
    expect(() => tocEntriesOf(Buffer.alloc(60), 24)).toThrow(/not a whole record/);
  });
});

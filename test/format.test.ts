/**
 * The on-disk format's pure parts, in-process (no repository, no threads): pack record
 * headers, chunk locations, map leaves and the top-level map, generation records and
 * their keys, index keys, and the repository config. Each encoding is checked both ways
 * (what is written reads back) and against hostile input (what is damaged is refused
 * with an error, never read as something else). FORMAT.md is the description these
 * follow.
 */
import { createHash } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import {
  COMP_GROUP,
  COMP_RAW,
  COMP_ZSTD,
  RECORD_HEADER_SIZE,
  decodeLocation,
  decodeRecordHeader,
  encodeLocation,
  encodeRecordHeader,
  isLocation,
  isPackId,
  newPackId,
  packObject,
  recordShare,
} from '../src/format/pack.js';
import { LeafBuilder, checkedLeaf, checkedTop, chunkIndexAt, decodeLeaf, decodeTop, encodeTop, type ChunkEntry } from '../src/format/chunkmap.js';
import { describeGenerationKey, generationFileName, generationKey, parseGenerationRecord, parseTarget, resolveRevision, type Generation } from '../src/format/generation.js';
import { K_GEN, chunkKey, key, packKey, prefixEnd } from '../src/format/keys.js';
import { FORMAT_VERSION, PLAIN_FORMAT_VERSION, checkConfig, checkImageName, defaultConfig } from '../src/format/config.js';
import { prng } from './helpers.js';

const sha = (b: Uint8Array) => createHash('sha256').update(b).digest();

describe('record headers', () => {
  it('read back what was written, for each compression', () => {
    for (const comp of [COMP_RAW, COMP_ZSTD, COMP_GROUP]) {
      const buf = Buffer.alloc(RECORD_HEADER_SIZE + 10);
      const digest = sha(Buffer.from([comp]));
      encodeRecordHeader(buf, 10, comp, 123456, 654, digest);
      expect(decodeRecordHeader(buf, 10)).toEqual({ type: 0, compression: comp, rawLength: 123456, storedLength: 654, digest });
    }
  });

  it('refuse any single flipped bit, a short buffer and an unknown compression', () => {
    const buf = Buffer.alloc(RECORD_HEADER_SIZE);
    encodeRecordHeader(buf, 0, COMP_ZSTD, 65536, 4000, sha(Buffer.from('x')));
    for (let bit = 0; bit < RECORD_HEADER_SIZE * 8; bit++) {
      const bad = Buffer.from(buf);
      bad[bit >> 3]! ^= 1 << (bit & 7);
      expect(decodeRecordHeader(bad), `bit ${bit}`).toBeNull();
    }
    expect(decodeRecordHeader(buf.subarray(0, RECORD_HEADER_SIZE - 1))).toBeNull();
    const unknown = Buffer.alloc(RECORD_HEADER_SIZE);
    encodeRecordHeader(unknown, 0, 7, 1, 1, sha(Buffer.from('y')));
    expect(decodeRecordHeader(unknown)).toBeNull();
  });
});

describe('chunk locations', () => {
  it('round-trip a single record (33 bytes) and a group member (41 bytes)', () => {
    const packId = newPackId();
    const single = { packId, offset: 2 ** 40 + 24, storedLength: 1000, rawLength: 4096, compression: COMP_ZSTD };
    const member = { packId, offset: 24, storedLength: 9000, rawLength: 65536, compression: COMP_GROUP, inner: 131072, groupRaw: 1 << 20 };
    const a = encodeLocation(single);
    const b = encodeLocation(member);
    expect([a.length, b.length]).toEqual([33, 41]);
    expect(decodeLocation(a)).toEqual(single);
    expect(decodeLocation(b)).toEqual(member);
    expect(isLocation(a) && isLocation(b)).toBe(true);
  });

  it('tell a location from other index values by length and compression', () => {
    expect(isLocation(null)).toBe(false);
    expect(isLocation(Buffer.alloc(32))).toBe(false);
    const group33 = Buffer.alloc(33);
    group33[32] = COMP_GROUP;
    expect(isLocation(group33)).toBe(false);
    const raw41 = Buffer.alloc(41);
    raw41[32] = COMP_RAW;
    expect(isLocation(raw41)).toBe(false);
  });

  it("count a group member's share of its record in proportion to its raw length", () => {
    const packId = newPackId();
    expect(recordShare(encodeLocation({ packId, offset: 24, storedLength: 948, rawLength: 4096, compression: COMP_ZSTD }))).toBe(1000);
    const m = encodeLocation({ packId, offset: 24, storedLength: 1948, rawLength: 1024, compression: COMP_GROUP, inner: 0, groupRaw: 4096 });
    expect(recordShare(m)).toBe(500);
  });

  it('name packs only by well-formed ids', () => {
    const id = newPackId();
    expect(isPackId(id)).toBe(true);
    expect(packObject(id)).toBe(`packs/${id.slice(0, 2)}/${id}.pack`);
    for (const bad of ['../../etc/passwd', id.toUpperCase(), id.slice(1), `${id}0`, 42]) {
      expect(isPackId(bad)).toBe(false);
    }
    expect(() => packObject('../' + id.slice(3))).toThrow(/invalid pack id/);
  });
});

function entries(n: number, seed: number): ChunkEntry[] {
  const r = prng(seed, n * 64);
  return Array.from({ length: n }, (_, i) =>
    i % 7 === 3
      ? { length: 65536, zero: true, digest: null }
      : { length: 4096 * (1 + (r[i * 64]! % 32)), zero: false, digest: Buffer.from(r.subarray(i * 64, i * 64 + 32)), fast: i % 2 ? Buffer.from(r.subarray(i * 64 + 32, i * 64 + 64)) : null },
  );
}

function buildLeaves(list: ChunkEntry[], min = 4, max = 16) {
  const b = new LeafBuilder(min, max);
  const out = [];
  for (const e of list) {
    const l = b.add(e);
    if (l) out.push(l);
  }
  const last = b.finish();
  if (last) out.push(last);
  return out;
}

describe('map leaves', () => {
  it('cut at the max, or past the min where a data digest starts with a zero byte, and decode to the same entries', () => {
    const list = entries(200, 1);
    list[9]!.digest![0] = 0; // a content-defined cut after the 10th entry
    const leaves = buildLeaves(list);
    expect(leaves[0]!.ref.chunks).toBe(10);
    let i = 0;
    for (const { ref, encoded } of leaves) {
      expect(ref.chunks).toBeLessThanOrEqual(16);
      expect(ref.digest).toEqual(sha(encoded));
      const leaf = checkedLeaf(encoded, ref.digest, { bytes: ref.bytes, chunks: ref.chunks });
      let off = 0;
      for (let c = 0; c < ref.chunks; c++, i++) {
        const e = list[i]!;
        expect(leaf.starts[c]).toBe(off);
        expect(leaf.lengths[c]).toBe(e.length);
        expect(leaf.zero[c]).toBe(e.zero ? 1 : 0);
        if (!e.zero) expect(leaf.digests.subarray(c * 32, c * 32 + 32)).toEqual(e.digest);
        expect(leaf.hasFast[c]).toBe(e.fast ? 1 : 0);
        if (e.fast) expect(leaf.fast.subarray(c * 32, c * 32 + 32)).toEqual(e.fast);
        expect(chunkIndexAt(leaf, off)).toBe(c);
        expect(chunkIndexAt(leaf, off + e.length - 1)).toBe(c);
        off += e.length;
      }
      expect(leaf.bytes).toBe(ref.bytes);
    }
    expect(i).toBe(list.length);
  });

  it('are byte-identical for the same run of chunks wherever it starts in the image', () => {
    const list = entries(120, 2);
    list[19]!.digest![0] = 0;
    const a = buildLeaves(list);
    const b = buildLeaves([...entries(5, 3).map((e) => ({ ...e, digest: e.digest && Buffer.concat([Buffer.of(0), e.digest.subarray(1)]) })), ...list.slice(20)]);
    // The first builder cuts at 16 (the max) and after entry 19 (content); the second after
    // its 5 lead-in entries (data digests starting with a zero byte, past the min of 4).
    // From entry 20 on both meet the same entries from a fresh leaf.
    expect([a[0]!.ref.chunks, a[1]!.ref.chunks, b[0]!.ref.chunks]).toEqual([16, 4, 5]);
    const hex = (ls: typeof a) => ls.map((l) => l.ref.digest.toString('hex'));
    expect(hex(b.slice(1))).toEqual(hex(a.slice(2)));
  });

  it('refuse a wrong digest, damaged structure and a wrong coverage with an error, never another reading', () => {
    const [{ ref, encoded }] = buildLeaves(entries(10, 4), 4, 10);
    expect(() => checkedLeaf(encoded, sha(Buffer.from('other')))).toThrow(/does not match its digest/);
    expect(() => checkedLeaf(encoded, ref.digest, { bytes: ref.bytes + 1, chunks: ref.chunks })).toThrow(/the map says/);
    expect(() => decodeLeaf(Buffer.concat([encoded, Buffer.of(0)]))).toThrow(/after its last entry/);
    expect(() => decodeLeaf(encoded.subarray(0, encoded.length - 1))).toThrow(/truncated|count/);
    const badMagic = Buffer.from(encoded);
    badMagic[0]! ^= 1;
    expect(() => decodeLeaf(badMagic)).toThrow(/bad magic/);
    const badKind = Buffer.from(encoded);
    badKind[8 + 4] = 9;
    expect(() => decodeLeaf(badKind)).toThrow(/chunk kind 9/);
    const empty = Buffer.from(encoded);
    empty.writeUInt32LE(0, 8);
    expect(() => decodeLeaf(empty)).toThrow(/empty chunk/);
    const zeroCount = Buffer.from(encoded);
    zeroCount.writeUInt32LE(0, 4);
    expect(() => decodeLeaf(zeroCount)).toThrow(/count 0/);
    // Every single flipped bit fails one of the checks.
    for (let bit = 0; bit < encoded.length * 8; bit += 7) {
      const bad = Buffer.from(encoded);
      bad[bit >> 3]! ^= 1 << (bit & 7);
      expect(() => checkedLeaf(bad, ref.digest, ref), `bit ${bit}`).toThrow();
    }
  });
});

describe('top-level maps', () => {
  const refs = buildLeaves(entries(100, 5)).map((l) => l.ref);
  const size = refs.reduce((a, r) => a + r.bytes, 0);

  it('round-trip, and are checked against the generation record', () => {
    const top = encodeTop(refs);
    expect(decodeTop(top)).toEqual(refs);
    expect(checkedTop(top, { size, leaves: refs.length })).toEqual(refs);
    expect(() => checkedTop(top, { size: size + 1, leaves: refs.length })).toThrow(/covers/);
    expect(() => checkedTop(top, { size, leaves: refs.length + 1 })).toThrow(/leaves/);
  });

  it('refuse a torn entry, an empty leaf and an impossible size', () => {
    const top = encodeTop(refs);
    expect(() => decodeTop(top.subarray(1))).toThrow(/length/);
    const zero = Buffer.from(top);
    zero.writeBigUInt64LE(0n, 32);
    expect(() => decodeTop(zero)).toThrow(/corrupt/);
    const huge = Buffer.from(top);
    huge.writeBigUInt64LE(2n ** 60n, 32);
    expect(() => decodeTop(huge)).toThrow(/corrupt/);
  });
});

function gen(over: Partial<Generation> = {}): Generation {
  return {
    id: '0123456789abcdef',
    name: 'db',
    created: '2026-03-01T10:00:00.000Z',
    size: 1 << 30,
    chunking: { block: 4096, min: 65536, max: 1 << 20, maskBits: 17 },
    leaves: 3,
    tags: [],
    source: '/dev/x',
    parent: null,
    stats: { bytesRead: 0, zeroBytes: 0, chunks: 0, newChunks: 0, newBytes: 0, newStored: 0, durationMs: 0 },
    ...over,
  };
}

describe('generation records', () => {
  it('sort by name, then time, in their keys, and parse back only under their own key', () => {
    const a = gen();
    const b = gen({ created: '2026-03-02T10:00:00.000Z', id: 'fedcba9876543210' });
    const c = gen({ name: 'dc' });
    expect(Buffer.compare(generationKey(a), generationKey(b))).toBe(-1);
    expect(Buffer.compare(generationKey(b), generationKey(c))).toBe(-1);
    expect(generationKey(a)[0]).toBe(K_GEN);
    const v = Buffer.from(JSON.stringify(a));
    expect(parseGenerationRecord(generationKey(a), v)).toEqual(a);
    expect(() => parseGenerationRecord(generationKey(b), v)).toThrow(/another key/);
    expect(describeGenerationKey(generationKey(b))).toEqual({ name: 'db', id: 'fedcba9876543210' });
    expect(describeGenerationKey(Buffer.of(K_GEN, 1, 2))).toEqual({ name: '?', id: '?' });
  });

  it('refuse records of the wrong shape', () => {
    const k = generationKey(gen());
    for (const bad of [gen({ id: 'xyz' }), gen({ size: -1 }), gen({ leaves: 1.5 }), gen({ created: 'yesterday' })]) {
      expect(() => parseGenerationRecord(k, Buffer.from(JSON.stringify(bad)))).toThrow();
    }
    expect(() => parseGenerationRecord(k, Buffer.from('null'))).toThrow(/not an object/);
    expect(() => parseGenerationRecord(k, Buffer.from('{'))).toThrow();
  });

  it('resolve NAME@REV: latest, a count back, a date, an id prefix; unknown and ambiguous ones are errors', () => {
    const gens = [
      gen({ id: 'aa00000000000001', created: '2026-03-01T10:00:00.000Z' }),
      gen({ id: 'aa00000000000002', created: '2026-03-02T10:00:00.000Z' }),
      gen({ id: 'bb00000000000003', created: '2026-03-03T10:00:00.000Z' }),
    ];
    expect(parseTarget('db')).toEqual({ name: 'db', rev: 'latest' });
    expect(parseTarget('db@2')).toEqual({ name: 'db', rev: '2' });
    expect(() => parseTarget('@1')).toThrow(/missing image name/);
    expect(() => parseTarget('db@')).toThrow(/missing revision/);
    expect(() => parseTarget('../x@1')).toThrow();
    expect(resolveRevision(gens, 'db', 'latest').id).toBe('bb00000000000003');
    expect(resolveRevision(gens, 'db', '2').id).toBe('aa00000000000001');
    expect(() => resolveRevision(gens, 'db', '3')).toThrow(/only 3 generation/);
    expect(resolveRevision(gens, 'db', '2026-03-02').id).toBe('aa00000000000002');
    expect(resolveRevision(gens, 'db', '2026-03-02T09:59').id).toBe('aa00000000000001');
    expect(() => resolveRevision(gens, 'db', '2026-02-01')).toThrow(/no generation at or before/);
    expect(resolveRevision(gens, 'db', 'bb').id).toBe('bb00000000000003');
    expect(resolveRevision(gens, 'db', 'id:aa00000000000002').id).toBe('aa00000000000002');
    expect(() => resolveRevision(gens, 'db', 'aa')).toThrow(/ambiguous/);
    expect(() => resolveRevision(gens, 'db', 'cc')).toThrow(/unknown revision/);
    expect(() => resolveRevision([], 'db', 'latest')).toThrow(/no generations/);
    expect(generationFileName(gens[0]!)).toBe('2026-03-01T100000.000Z-aa000000.img');
  });
});

describe('index keys', () => {
  it('start with their prefix byte and bound their prefix range', () => {
    const d = sha(Buffer.from('k'));
    expect(chunkKey(d)).toEqual(Buffer.concat([Buffer.from('c'), d]));
    expect(packKey('00ff'.repeat(8))).toEqual(Buffer.concat([Buffer.from('p'), Buffer.from('00ff'.repeat(8), 'hex')]));
    expect(key(0x67, 'db', Buffer.of(0))).toEqual(Buffer.from('gdb\0', 'binary'));
    expect(prefixEnd(Buffer.from('c'))).toEqual(Buffer.from('d'));
    expect(prefixEnd(Buffer.of(1, 0xff, 0xff))).toEqual(Buffer.of(2));
    expect(prefixEnd(Buffer.of(0xff))).toEqual(Buffer.of(0xff, 0xff));
    const p = Buffer.from('gdb\0');
    const inside = Buffer.concat([p, Buffer.alloc(16, 0xff)]);
    expect(Buffer.compare(inside, prefixEnd(p))).toBe(-1);
  });
});

describe('repository config', () => {
  it('accepts the default and refuses what is damaged or newer, naming the file', () => {
    const good = { ...defaultConfig(), id: 'ab'.repeat(16) };
    expect(good.version).toBe(PLAIN_FORMAT_VERSION);
    expect(checkConfig(JSON.parse(JSON.stringify(good)), 'c.json')).toEqual(good);
    // Format 6 is exactly "encrypted" (FORMAT.md): an old genvault never takes one for a repository it knows.
    const encryption = { cipher: 'aes-256-gcm', identity: 'hmac-sha256', keyCheck: 'cd'.repeat(16) } as const;
    const sealed = { ...good, version: FORMAT_VERSION, encryption };
    expect(checkConfig(JSON.parse(JSON.stringify(sealed)), 'c.json')).toEqual(sealed);
    const cases: Array<[object | null, RegExp]> = [
      [null, /not a JSON object/],
      [{ ...good, format: 'borg' }, /"format"/],
      [{ ...good, version: FORMAT_VERSION + 1 }, /newer than this genvault supports/],
      [{ ...good, version: 0 }, /unknown format version/],
      [{ ...good, id: 'x' }, /"id"/],
      [{ ...good, digest: 'md5' }, /unsupported digest/],
      [{ ...good, chunking: { ...good.chunking, min: 1000 } }, /multiples of the block size/],
      [{ ...good, compression: { ...good.compression, group: 32 << 20 } }, /compression.group/],
      [{ ...good, version: 2 }, /needs format version 3/],
      [{ ...good, guards: { minAge: 'soon' } }, /guards.minAge/],
      [{ ...good, group: '../x' }, /"group"/],
      [{ ...good, version: 6 }, /version 6 must be encrypted/],
      [{ ...good, encryption }, /version 5 cannot be encrypted/],
      [{ ...sealed, encryption: { ...encryption, cipher: 'rot13' } }, /"encryption" invalid/],
      [{ ...sealed, encryption: { ...encryption, keyCheck: 'x' } }, /keyCheck/],
    ];
    for (const [raw, re] of cases) expect(() => checkConfig(raw, 'c.json'), String(re)).toThrow(re);
    expect(() => checkConfig(null, '/r/config.json')).toThrow(/^\/r\/config.json: /);
  });

  it('accepts image names that are safe as file names only', () => {
    expect(checkImageName('db-01.img')).toBe('db-01.img');
    for (const bad of ['', '.hidden', '../x', 'a/b', 'a b', 'x'.repeat(129)]) expect(() => checkImageName(bad), bad).toThrow();
  });
});

/**
 * Encryption's pure parts (src/format/crypto.ts, format 6): key derivation, identities,
 * sealing and key slots against known answers computed independently (Python's hmac,
 * hashlib.scrypt and the cryptography package's AESGCM), and every kind of tampering
 * failing to open; the paper key backup; the keyed chunker; sealed metadata records read
 * back through the pack scanner.
 */
import { createCipheriv, createHash } from 'node:crypto';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import {
  SEAL_OVERHEAD,
  checkSlot,
  chunkIdentity,
  deriveKeys,
  exportText,
  keyCheck,
  keyMatches,
  metaAd,
  open,
  openInto,
  parseExport,
  recordAd,
  seal,
  sealInto,
  tocDigest,
  unwrapMaster,
  wrapMaster,
  type KeySlot,
} from '../src/format/crypto.js';
import { chunkSegment } from '../src/format/chunker.js';
import { REC_GENMAP, REC_LEAF, encodeMetaRecord } from '../src/format/meta.js';
import { scanPack, type ScanEnd } from '../src/format/scan.js';
import { encodeTocRecord, tocEntriesOf } from '../src/format/toc.js';
import { PACK_HEADER_SIZE, PACK_MAGIC } from '../src/format/pack.js';
import { LeafBuilder } from '../src/format/chunkmap.js';
import { prng, sh } from './helpers.js';
import { nativeGcm } from '../src/util/gcm.js';

const MASTER = Buffer.from(Array.from({ length: 32 }, (_, i) => i));
const REPO = '00112233445566778899aabbccddeeff';
const hex = (b: Uint8Array) => Buffer.from(b).toString('hex');

describe('key derivation and identities (known answers)', () => {
  const k = deriveKeys(MASTER, REPO);
  it('derives each key as HMAC-SHA256(master, label)', () => {
    expect(hex(k.identity)).toBe('16e207aaf7bd72de70c3e7a57347ed5bee91e5c881b038b84c63932dfa49236c');
    expect(hex(k.fast)).toBe('a7291e0cd0a7088ed643b470166d3782573bffd8efb8f84417115754d5906da3');
    expect(hex(k.seal)).toBe('14c7d7f595a8a23e22c4ad69414a9e2e0aa63a0d217b5154dc8fae68f3bffc31');
    const seed = Buffer.from('d0f6911d5660024c', 'hex');
    expect(k.chunkSeed).toEqual([seed.readInt32LE(0), seed.readInt32LE(4)]);
    expect(hex(k.toc)).toBe('e79a5173ae5727a3949f120a1a7fc4bca9df4094a8f4621d79fb8005ef1f9e60');
    expect(hex(tocDigest(k, Buffer.from('GVT1 payload')))).toBe('62f31c914f73b455cf238fbeeac42221bf88e4ff8dc5374236a3c87dcf161223');
    expect(keyCheck(MASTER)).toBe('7828930b82260af00dab8f5fbe76f4b64a8079303750d8921fe96bd67d2d8a78'.slice(0, 32));
    expect(keyMatches(MASTER, keyCheck(MASTER))).toBe(true);
    expect(keyMatches(Buffer.alloc(32), keyCheck(MASTER))).toBe(false);
  });
  it('keys chunk identities; without keys they are SHA-256', () => {
    expect(hex(chunkIdentity(k, Buffer.from('abc')))).toBe('c5c27b3386b2ced2668be64e7fddb8f3e5e63e2a9b6f86a52ef670f6435bba4b');
    expect(hex(chunkIdentity(null, Buffer.from('abc')))).toBe(createHash('sha256').update('abc').digest('hex'));
  });
});

describe('sealing', () => {
  const k = deriveKeys(MASTER, REPO);
  const digest = Buffer.alloc(32, 7);
  const ad = recordAd(k, 0, 1, 5, digest);
  it('lays out the associated data as FORMAT.md says', () => {
    expect(hex(ad)).toBe('4756413600112233445566778899aabbccddeeff000001050000000707070707070707070707070707070707070707070707070707070707070707');
  });
  it('opens a record sealed elsewhere (nonce | ciphertext | tag)', () => {
    const sealed = Buffer.from('000102030405060708090a0b06c7e8a75973ed597ee1e4545edb1161b10c42ca5a', 'hex');
    expect(open(k, sealed, ad)?.toString()).toBe('hello');
  });
  it('round-trips with fresh nonces, and refuses every change', () => {
    const plain = prng(1, 10000);
    const a = seal(k, plain, ad);
    const b = seal(k, plain, ad);
    expect(a.length).toBe(plain.length + SEAL_OVERHEAD);
    expect(a.equals(b)).toBe(false); // random nonces
    expect(open(k, a, ad)?.equals(plain)).toBe(true);
    for (const at of [0, 11, 12, 5000, a.length - 1]) {
      const x = Buffer.from(a);
      x[at]! ^= 1;
      expect(open(k, x, ad)).toBeNull();
    }
    expect(open(k, a.subarray(0, a.length - 1), ad)).toBeNull();
    expect(open(k, a, recordAd(k, 0, 0, 5, digest))).toBeNull(); // another compression
    expect(open(k, a, recordAd(k, 0, 1, 6, digest))).toBeNull(); // another length
    expect(open(k, a, recordAd(k, 0, 1, 5, Buffer.alloc(32, 8)))).toBeNull(); // another identity
    expect(open(k, a, metaAd(k, 1))).toBeNull(); // another type
    expect(open(deriveKeys(MASTER, 'ff'.repeat(16)), a, recordAd(deriveKeys(MASTER, 'ff'.repeat(16)), 0, 1, 5, digest))).toBeNull(); // another repository, same key
    expect(open(deriveKeys(Buffer.alloc(32, 1), REPO), a, ad)).toBeNull(); // another key
  });
});

describe('sealing in place, in pieces', () => {
  const k = deriveKeys(MASTER, REPO);
  const ad = metaAd(k, 1);
  it('seals a plaintext lying where its ciphertext goes, and opens into a buffer, for sizes around the piece size', () => {
    for (const n of [0, 1, 32767, 32768, 32769, 100_000, 1 << 20]) {
      const plain = prng(n + 1, n);
      const out = Buffer.alloc(n + SEAL_OVERHEAD + 8);
      plain.copy(out, 8);
      const len = sealInto(k, out.subarray(8, 8 + n), ad, out, 8);
      expect(len).toBe(n + SEAL_OVERHEAD);
      const sealed = out.subarray(8, 8 + len);
      expect(open(k, sealed, ad)?.equals(plain)).toBe(true);
      const dst = Buffer.alloc(n + 4);
      expect(openInto(k, sealed, ad, dst)).toBe(n);
      expect(dst.subarray(0, n).equals(plain)).toBe(true);
      if (n) sealed[n >> 1]! ^= 4;
      else sealed[0]! ^= 4;
      expect(openInto(k, sealed, ad, dst)).toBeNull();
    }
  });
});

describe('AES-256-GCM through the addon (src/native/gcm.c)', () => {
  const k = deriveKeys(MASTER, REPO);
  it('is built, and writes what node:crypto writes, in place and shifted as sealInto uses it; refuses every change', () => {
    const gcm = nativeGcm();
    expect(gcm, 'scripts/setup builds src/native/build/Release/gcm.node').not.toBeNull();
    for (const n of [0, 1, 15, 16, 17, 32769, 1 << 20, (3 << 20) + 7]) {
      for (const adLen of [0, 61]) {
        const plain = prng(n + 7, n);
        const ad = prng(adLen + 3, adLen);
        const nonce = prng(n + 11, 12);
        const c = createCipheriv('aes-256-gcm', k.seal, nonce);
        c.setAAD(ad);
        const ref = Buffer.concat([c.update(plain), c.final()]);
        const refTag = c.getAuthTag();
        const dst = Buffer.alloc(n);
        const tag = Buffer.alloc(16);
        expect(gcm!(true, k.seal, nonce, ad, plain, dst, tag)).toBe(true);
        expect(dst.equals(ref) && tag.equals(refTag)).toBe(true);
        const buf = Buffer.alloc(n + 12);
        plain.copy(buf);
        gcm!(true, k.seal, nonce, ad, buf.subarray(0, n), buf.subarray(12), tag);
        expect(buf.subarray(12).equals(ref)).toBe(true);
        const back = Buffer.alloc(n);
        expect(gcm!(false, k.seal, nonce, ad, ref, back, refTag)).toBe(true);
        expect(back.equals(plain)).toBe(true);
        const badTag = Buffer.from(refTag);
        badTag[15]! ^= 1;
        expect(gcm!(false, k.seal, nonce, ad, ref, back, badTag)).toBe(false);
        if (n) {
          const bad = Buffer.from(ref);
          bad[n - 1]! ^= 0x80;
          expect(gcm!(false, k.seal, nonce, ad, bad, back, refTag)).toBe(false);
        }
        if (adLen) expect(gcm!(false, k.seal, nonce, Buffer.alloc(adLen), ref, back, refTag)).toBe(false);
      }
    }
    expect(() => gcm!(true, k.seal.subarray(1), Buffer.alloc(12), Buffer.alloc(0), Buffer.alloc(1), Buffer.alloc(1), Buffer.alloc(16))).toThrow(/expected/);
    expect(() => gcm!(true, k.seal, Buffer.alloc(12), Buffer.alloc(0), Buffer.alloc(2), Buffer.alloc(1), Buffer.alloc(16))).toThrow(/expected/);
  });
  it('records sealed with node:crypto (GENVAULT_NATIVE_GCM=0) open through the addon, and the other way round', async () => {
    const plain = prng(5, 300_000);
    const ad = metaAd(k, 1);
    const mine = seal(k, plain, ad);
    const code = `
      const { deriveKeys, seal, open, metaAd } = await import(${JSON.stringify(path.resolve('dist/format/crypto.js'))});
      const k = deriveKeys(Buffer.from(process.argv[1], 'hex'), process.argv[2]);
      const chunks = [];
      for await (const c of process.stdin) chunks.push(c);
      const theirs = open(k, Buffer.concat(chunks), metaAd(k, 1));
      process.stdout.write(JSON.stringify({ opened: theirs && theirs.toString('base64'), sealed: seal(k, theirs, metaAd(k, 1)).toString('base64') }));`;
    const r = await sh(process.execPath, ['--input-type=module', '-e', code, MASTER.toString('hex'), REPO], { input: mine, env: { GENVAULT_NATIVE_GCM: '0' } });
    expect(r.code, r.stderr).toBe(0);
    const out = JSON.parse(r.stdout) as { opened: string; sealed: string };
    expect(Buffer.from(out.opened, 'base64').equals(plain)).toBe(true);
    expect(open(k, Buffer.from(out.sealed, 'base64'), ad)?.equals(plain)).toBe(true);
  });
});

describe('key slots', () => {
  const cost = { N: 1024, r: 8, p: 1 };
  it('opens a slot made elsewhere (scrypt, AES-256-GCM, slot AD)', async () => {
    const slot: KeySlot = {
      id: '0102030405060708',
      kind: 'password',
      created: '2026-12-06T00:00:00.000Z',
      kdf: { name: 'scrypt', ...cost, salt: 'AAAAAAAAAAAAAAAAAAAAAA==' },
      nonce: 'CQkJCQkJCQkJCQkJ',
      wrapped: '/j58xxUTZDuTIEQuc70UySDA0tTd+oECFQCrCHV+EtEieaFjkARWLe/ERd0UQK9e',
    };
    expect((await unwrapMaster(checkSlot(slot, slot.id), Buffer.from('pw'), REPO))?.equals(MASTER)).toBe(true);
    expect(await unwrapMaster(slot, Buffer.from('pW'), REPO)).toBeNull();
    expect(await unwrapMaster(slot, Buffer.from('pw'), 'ff'.repeat(16))).toBeNull();
    expect(await unwrapMaster({ ...slot, id: '0102030405060709' }, Buffer.from('pw'), REPO)).toBeNull();
  });
  it('wraps and unwraps; refuses malformed and truncated slots', async () => {
    const slot = await wrapMaster(MASTER, Buffer.from('secret'), REPO, 'key-file', cost);
    expect((await unwrapMaster(slot, Buffer.from('secret'), REPO))?.equals(MASTER)).toBe(true);
    const text = JSON.stringify(slot);
    expect(() => JSON.parse(text.slice(0, text.length - 10))).toThrow();
    expect(() => checkSlot({ ...slot, id: 'x' }, slot.id)).toThrow(/id/);
    expect(() => checkSlot({ ...slot, kdf: { ...slot.kdf, N: 1 << 30 } }, slot.id)).toThrow(/out of range/);
    expect(() => checkSlot({ ...slot, nonce: 'AAAA' }, slot.id)).toThrow(/nonce/);
    expect(await unwrapMaster({ ...slot, wrapped: slot.wrapped.slice(0, 20) }, Buffer.from('secret'), REPO)).toBeNull();
  });
});

describe('paper backup of the master key', () => {
  it('round-trips, ignores spacing and case, and catches a typo', () => {
    const text = exportText(MASTER, REPO);
    expect(text).toMatch(/^key 1: 0001 0203 0405 0607$/m);
    expect(parseExport(text)).toEqual({ master: MASTER, repoId: REPO });
    const retyped = text.replace(/^(key \d+: )(.*)$/gm, (_l, head: string, groups: string) => head + groups.replace(/ /g, '').toUpperCase());
    expect(parseExport(retyped).master.equals(MASTER)).toBe(true);
    expect(() => parseExport(text.replace('key 2: 0809', 'key 2: 0808'))).toThrow(/check/);
    expect(() => parseExport('hello')).toThrow(/not a genvault/);
  });
});

describe('keyed chunker', () => {
  it('places boundaries by the key; unkeyed stays as before', () => {
    const p = { block: 4096, min: 16384, maskBits: 5, max: 524288, segment: 8 << 20 };
    const buf = prng(42, 4 << 20);
    const plain = chunkSegment(buf, buf.length, p);
    const keyed = chunkSegment(buf, buf.length, p, deriveKeys(MASTER, REPO).chunkSeed);
    const other = chunkSegment(buf, buf.length, p, deriveKeys(Buffer.alloc(32, 9), REPO).chunkSeed);
    const sizes = (c: typeof plain) => c.map((s) => s.length).join(',');
    expect(sizes(keyed)).not.toBe(sizes(plain));
    expect(sizes(keyed)).not.toBe(sizes(other));
    expect(keyed.reduce((a, s) => a + s.length, 0)).toBe(buf.length);
    // Same keyed boundaries whatever else: the same bytes dedup within the repository.
    expect(sizes(chunkSegment(Buffer.from(buf), buf.length, p, deriveKeys(MASTER, REPO).chunkSeed))).toBe(sizes(keyed));
  });
});

describe('sealed metadata records', () => {
  const k = deriveKeys(MASTER, REPO);
  const packId = 'ab'.repeat(16);
  const leaf = (() => {
    const b = new LeafBuilder(1, 2);
    b.add({ length: 16384, zero: false, digest: Buffer.alloc(32, 3) });
    return b.add({ length: 8192, zero: true, digest: null })!.encoded;
  })();
  const pack = (recs: Buffer[]) => Buffer.concat([PACK_MAGIC, Buffer.from(packId, 'hex'), ...recs]);
  const scan = async (p: Buffer, keys = k) => {
    const items = [];
    const it = scanPack(async (buf, off, len, pos) => p.copy(buf, off, pos, Math.min(p.length, pos + len)), p.length, packId, { keys });
    for (let r = await it.next(); !r.done; r = await it.next()) items.push(r.value);
    return items;
  };
  it('hold no plaintext, and read back with the key, the leaf under its own digest', async () => {
    const rec = encodeMetaRecord({ type: REC_LEAF, leaf }, k);
    expect(rec.includes(Buffer.alloc(32, 3))).toBe(false);
    const items = await scan(pack([rec, encodeMetaRecord({ type: REC_GENMAP, id: '0123456789abcdef', top: Buffer.alloc(0) }, k)]));
    expect(items[0]).toMatchObject({ kind: 'meta', offset: PACK_HEADER_SIZE });
    expect(items[0]!.kind === 'meta' && items[0]!.plainDigest.equals(createHash('sha256').update(leaf).digest())).toBe(true);
  });
  it('a table of contents is authenticated with the key: one without it, or from another repository, is not taken', async () => {
    const recs = Buffer.concat([encodeMetaRecord({ type: REC_LEAF, leaf }, k), encodeMetaRecord({ type: REC_GENMAP, id: '0123456789abcdef', top: Buffer.alloc(0) }, k)]);
    const entries = tocEntriesOf(recs, PACK_HEADER_SIZE).map((e) => e.bytes);
    const viaToc = async (toc: Buffer) => {
      const p = pack([recs, toc]);
      const it = scanPack(async (buf, off, len, pos) => p.copy(buf, off, pos, Math.min(p.length, pos + len)), p.length, packId, { keys: k });
      const items = [];
      let r = await it.next();
      for (; !r.done; r = await it.next()) items.push(r.value);
      return { end: r.value as ScanEnd, items };
    };
    const good = await viaToc(encodeTocRecord(0, entries, k));
    expect(good.end.viaToc).toBe(true);
    for (const forged of [encodeTocRecord(0, entries), encodeTocRecord(0, entries, deriveKeys(MASTER, 'ff'.repeat(16)))]) {
      const r = await viaToc(forged);
      expect(r.end.viaToc).toBeFalsy();
      // read record by record instead: the forged TOC is no record (the pack's tail), the others read as before
      expect(r.end.tail).toBe(forged.length);
      expect(r.items.map((i) => i.kind)).toEqual(['meta', 'meta']);
    }
  });

  it('a sealed payload moved under another header, or from another repository, is damage', async () => {
    const a = encodeMetaRecord({ type: REC_LEAF, leaf }, k);
    const other = encodeMetaRecord({ type: REC_LEAF, leaf }, deriveKeys(MASTER, 'ff'.repeat(16)));
    // (a good record after each: a damaged last record would be read as a torn tail)
    expect((await scan(pack([other, a])))[0]).toMatchObject({ kind: 'damaged', problem: expect.stringMatching(/does not authenticate/) });
    const flipped = Buffer.from(a);
    flipped[flipped.length - 1]! ^= 1;
    expect((await scan(pack([flipped, a])))[0]).toMatchObject({ kind: 'damaged' });
    // The same record without the key is not taken for plaintext either.
    expect((await scan(pack([a, a]), null))[0]).toMatchObject({ kind: 'damaged' });
  });
});

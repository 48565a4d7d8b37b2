/**
 * The sealed index's pure parts (src/format/index-seal.ts, format 7): index key derivation
 * and name tags against known answers computed independently (Python's hmac), sealed
 * values bound to their key and repository, and GenerationIndex in its three forms
 * (plain, sealed, sealed without the key): keys without names, prefix scans by image,
 * values swapped between keys refused, damage thrown as one Error, never a record.
 */
import { describe, expect, it } from 'vitest';
import {
  LOCKED_GENERATIONS,
  PLAIN_GENERATIONS,
  SEALED_GEN_KEY_BYTES,
  deriveIndexKeys,
  generationIndex,
  indexAd,
  indexSealed,
  nameTag,
  openIndexValue,
  sealIndexValue,
  sealedGenerations,
} from '../src/format/index-seal.js';
import { generationKey, type Generation } from '../src/format/generation.js';
import { prefixEnd } from '../src/format/keys.js';

const MASTER = Buffer.from(Array.from({ length: 32 }, (_, i) => i));
const REPO = '00112233445566778899aabbccddeeff';
const ik = deriveIndexKeys(MASTER, REPO);

function gen(name: string, created: string, id: string, extra: Partial<Generation> = {}): Generation {
  return {
    id,
    name,
    created,
    size: 4096,
    chunking: { block: 4096, min: 16384, max: 524288, maskBits: 5 },
    leaves: 1,
    tags: ['confidential-tag'],
    source: 'file:/var/lib/images/web-server.img',
    parent: null,
    stats: { bytesRead: 4096, zeroBytes: 0, chunks: 1, newChunks: 1, newBytes: 4096, newStored: 100, durationMs: 1 },
    ...extra,
  };
}

describe('index keys', () => {
  it('derive from the master key by the documented labels (known answers)', () => {
    expect(ik.name.toString('hex')).toBe('9f5feea1d7db4740ddb5f685d916bb7bf482e9045b37826b5435a4d74b6adbc8');
    expect(ik.seal.toString('hex')).toBe('05cde21194fff937e0e4cabf76038defa19fb3dbb7a5b0a15625897574fd2d63');
    expect(ik.repoId.toString('hex')).toBe(REPO);
    expect(() => deriveIndexKeys(MASTER.subarray(1), REPO)).toThrow(/32 bytes/);
  });

  it('name tags: 16 bytes of HMAC-SHA256(name key, kind | name), per kind (known answers)', () => {
    expect(nameTag(ik, 0x67, 'web-server').toString('hex')).toBe('9d452d86ea397721af2154caefc5019e');
    expect(nameTag(ik, 0x6a, 'web-server').toString('hex')).toBe('f9e422fe8bb7368047820793882f23df');
    expect(nameTag(deriveIndexKeys(Buffer.alloc(32, 7), REPO), 0x67, 'web-server').equals(nameTag(ik, 0x67, 'web-server'))).toBe(false);
  });

  it('only format 7 encrypted repositories seal their index', () => {
    const encryption = { cipher: 'aes-256-gcm' as const, identity: 'hmac-sha256' as const, keyCheck: '0'.repeat(32) };
    expect(indexSealed({ version: 5 })).toBe(false);
    expect(indexSealed({ version: 6, encryption })).toBe(false);
    expect(indexSealed({ version: 7, encryption })).toBe(true);
    expect(generationIndex({ version: 6, encryption }, ik)).toBe(PLAIN_GENERATIONS);
    expect(generationIndex({ version: 7, encryption }, null)).toBe(LOCKED_GENERATIONS);
    expect(generationIndex({ version: 7, encryption }, ik).sealed).toBe(true);
  });
});

describe('sealed index values', () => {
  const k = Buffer.from('g-some-key');
  it('open under their key and repository only; any flipped byte fails', () => {
    const v = sealIndexValue(ik, k, Buffer.from('{"a":1}'));
    expect(v.length).toBe(7 + 28);
    expect(openIndexValue(ik, k, v)!.toString()).toBe('{"a":1}');
    expect(indexAd(ik, k).equals(Buffer.concat([Buffer.from('GVI7'), Buffer.from(REPO, 'hex'), k]))).toBe(true);
    expect(openIndexValue(ik, Buffer.from('g-other-key'), v)).toBeNull();
    expect(openIndexValue(deriveIndexKeys(MASTER, 'ff'.repeat(16)), k, v)).toBeNull();
    for (let i = 0; i < v.length; i++) {
      const bad = Buffer.from(v);
      bad[i]! ^= 0x01;
      expect(openIndexValue(ik, k, bad)).toBeNull();
    }
    expect(openIndexValue(ik, k, v.subarray(0, 27))).toBeNull();
    expect(openIndexValue(ik, k, Buffer.alloc(0))).toBeNull();
  });

  it('two sealings of the same value differ (random nonces)', () => {
    const p = Buffer.from('same');
    expect(sealIndexValue(ik, k, p).equals(sealIndexValue(ik, k, p))).toBe(false);
  });
});

describe('GenerationIndex', () => {
  const sealed = sealedGenerations(ik);
  const a = gen('web-server', '2026-01-02T03:04:05.678Z', '0123456789abcdef');
  const b = gen('web-server', '2026-01-03T00:00:00.000Z', '1111111111111111');
  const c = gen('db-server', '2026-01-02T00:00:00.000Z', '2222222222222222');

  it('plain: the format 1-6 layout', () => {
    expect(PLAIN_GENERATIONS.key(a).equals(generationKey(a))).toBe(true);
    expect(PLAIN_GENERATIONS.parse(generationKey(a), PLAIN_GENERATIONS.value(a))).toEqual(a);
    expect(PLAIN_GENERATIONS.describe(generationKey(a))).toEqual({ name: 'web-server', id: a.id });
    expect(PLAIN_GENERATIONS.createdOf(generationKey(a))).toBe(Date.parse(a.created));
  });

  it('sealed: keys without the name, in time order per image, one prefix scan per image', () => {
    const ka = sealed.key(a);
    expect(ka.length).toBe(SEALED_GEN_KEY_BYTES);
    expect(ka.includes(Buffer.from('web-server'))).toBe(false);
    expect(ka.subarray(1, 17).equals(nameTag(ik, 0x67, 'web-server'))).toBe(true);
    expect(ka.subarray(-8).toString('hex')).toBe(a.id);
    expect(sealed.createdOf(ka)).toBe(Date.parse(a.created));
    const p = sealed.prefix('web-server');
    const inRange = (k: Buffer) => Buffer.compare(k, p) >= 0 && Buffer.compare(k, prefixEnd(p)) < 0;
    expect(inRange(ka) && inRange(sealed.key(b))).toBe(true);
    expect(inRange(sealed.key(c))).toBe(false);
    expect(Buffer.compare(ka, sealed.key(b))).toBeLessThan(0);
    expect(sealed.describe(ka).id).toBe(a.id);
    expect(sealed.describe(ka).name).not.toContain('web-server');
  });

  it('sealed: values hold no name, source or tag in the clear, and parse back checked', () => {
    const v = sealed.value(a);
    for (const s of ['web-server', 'var/lib/images', 'confidential-tag']) expect(v.includes(Buffer.from(s))).toBe(false);
    expect(sealed.parse(sealed.key(a), v)).toEqual(a);
    expect(JSON.parse(sealed.json(sealed.key(a), v).toString())).toEqual(a);
  });

  it('sealed: values swapped between keys, flipped, or from a plain index are errors, never a record', () => {
    const [ka, kb] = [sealed.key(a), sealed.key(b)];
    const [va, vb] = [sealed.value(a), sealed.value(b)];
    expect(() => sealed.parse(ka, vb)).toThrow(/does not authenticate/);
    expect(() => sealed.parse(kb, va)).toThrow(/does not authenticate/);
    const flipped = Buffer.from(va);
    flipped[20]! ^= 1;
    expect(() => sealed.parse(ka, flipped)).toThrow(/does not authenticate/);
    expect(() => sealed.parse(generationKey(a), PLAIN_GENERATIONS.value(a))).toThrow(/not a generation key/);
    expect(() => sealed.parse(ka, PLAIN_GENERATIONS.value(a))).toThrow(/does not authenticate/);
    // A record sealed under its key must also be the one its key names.
    const other = sealIndexValue(ik, ka, Buffer.from(JSON.stringify(b)));
    expect(() => sealed.parse(ka, other)).toThrow(/stored under another key/);
    const notJson = sealIndexValue(ik, ka, Buffer.from('{'));
    expect(() => sealed.parse(ka, notJson)).toThrow(/not valid JSON/);
    const badShape = sealIndexValue(ik, ka, Buffer.from('{"id":"zz"}'));
    expect(() => sealed.parse(ka, badShape)).toThrow(/bad id/);
  });

  it('without the key: times and ids from keys; names, values and new keys need the key', () => {
    const ka = sealed.key(a);
    expect(LOCKED_GENERATIONS.readable).toBe(false);
    expect(LOCKED_GENERATIONS.createdOf(ka)).toBe(Date.parse(a.created));
    expect(LOCKED_GENERATIONS.describe(ka).id).toBe(a.id);
    expect(() => LOCKED_GENERATIONS.parse(ka, sealed.value(a))).toThrow(/need its key/);
    expect(() => LOCKED_GENERATIONS.key(a)).toThrow(/need its key/);
    expect(() => LOCKED_GENERATIONS.prefix('web-server')).toThrow(/need its key/);
    expect(LOCKED_GENERATIONS.createdOf(Buffer.of(0x67, 1, 2))).toBeNull();
  });
});

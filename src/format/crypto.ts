/**
 * Encryption (format 6, FORMAT.md "Version 6: encryption"): the keys derived from a
 * repository's master key, sealing and opening of pack records (AES-256-GCM, random
 * nonces, associated data binding the repository, the record type and its identity),
 * keyed chunk identities, and key slots (the master key wrapped under a passphrase or key
 * file through scrypt). Pure: no files; the slots' files are repository/keys.ts's.
 */
import { createCipheriv, createDecipheriv, createHash, createHmac, randomBytes, scrypt, timingSafeEqual } from 'node:crypto';
import { nativeGcm } from '../util/gcm.js';

export const MASTER_KEY_BYTES = 32;
export const NONCE_BYTES = 12;
export const TAG_BYTES = 16;
/** Bytes a sealed payload has more than its plaintext. */
export const SEAL_OVERHEAD = NONCE_BYTES + TAG_BYTES;
const AD_MAGIC = Buffer.from('GVA6');
const ZERO_DIGEST = Buffer.alloc(32);

/**
 * What the workers and the main thread need of a repository's master key (never the
 * master key itself). Plain data, so that it crosses into worker threads by structured
 * clone (Buffers arrive as Uint8Arrays: `asKeys` turns them back).
 */
export interface RepoKeys {
  /** The repository id (16 bytes), part of every record's associated data. */
  repoId: Uint8Array;
  /** HMAC-SHA256 key of chunk identities. */
  identity: Uint8Array;
  /** Key of the keyed BLAKE3 in kind 2 map entries. */
  fast: Uint8Array;
  /** AES-256-GCM key of pack records. */
  seal: Uint8Array;
  /** The chunker's two 32-bit seeds. */
  chunkSeed: [number, number];
  /** HMAC-SHA256 key of tables of contents (authenticated, not sealed). */
  toc: Uint8Array;
}

/** What a remote writer's client holds of an encrypted repository's keys (genvault serve's WELCOME). */
export type IdentityKeys = Pick<RepoKeys, 'identity' | 'chunkSeed'> & { fast?: Uint8Array };

function sub(master: Uint8Array, label: string): Buffer {
  return createHmac('sha256', master).update(label).digest();
}

export function deriveKeys(master: Uint8Array, repoIdHex: string): RepoKeys {
  if (master.length !== MASTER_KEY_BYTES) throw new Error('master key must be 32 bytes');
  const seed = sub(master, 'genvault-6 chunker');
  return {
    repoId: Buffer.from(repoIdHex, 'hex'),
    identity: sub(master, 'genvault-6 identity'),
    fast: sub(master, 'genvault-6 blake3'),
    seal: sub(master, 'genvault-6 seal'),
    chunkSeed: [seed.readInt32LE(0), seed.readInt32LE(4)],
    toc: sub(master, 'genvault-6 toc'),
  };
}

/** config.json's `encryption.keyCheck`: ties a master key to its repository. */
export function keyCheck(master: Uint8Array): string {
  return sub(master, 'genvault-6 check').toString('hex', 0, 16);
}

export function keyMatches(master: Uint8Array, check: string): boolean {
  const a = Buffer.from(keyCheck(master), 'hex');
  const b = Buffer.from(check, 'hex');
  return a.length === b.length && timingSafeEqual(a, b);
}

/** A chunk's identity: HMAC-SHA256 with the identity key, or SHA-256 without keys (formats 1-5). */
export function chunkIdentity(keys: RepoKeys | null, data: Uint8Array): Buffer {
  return keys ? createHmac('sha256', keys.identity).update(data).digest() : createHash('sha256').update(data).digest();
}

/**
 * The digest in a table of contents' header: SHA-256 of its payload, or with keys
 * HMAC-SHA256(toc key, repository id | payload), so that a forged or moved TOC is not
 * taken for one (a TOC copies plaintext headers: it is authenticated, not sealed).
 */
export function tocDigest(keys: RepoKeys | null, payload: Uint8Array): Buffer {
  return keys ? createHmac('sha256', keys.toc).update(keys.repoId).update(payload).digest() : createHash('sha256').update(payload).digest();
}

/** The associated data of a record (FORMAT.md): repository, type, compression, raw length, digest. */
export function recordAd(keys: RepoKeys, type: number, compression: number, rawLength: number, digest: Uint8Array): Buffer {
  const ad = Buffer.allocUnsafe(4 + 16 + 2 + 1 + 4 + 32);
  AD_MAGIC.copy(ad, 0);
  ad.set(keys.repoId, 4);
  ad.writeUInt16LE(type, 20);
  ad[22] = compression;
  ad.writeUInt32LE(rawLength, 23);
  ad.set(digest, 27);
  return ad;
}

/** The associated data of a metadata record (types 1-4): its plaintext carries its identity. */
export function metaAd(keys: RepoKeys, type: number): Buffer {
  return recordAd(keys, type, 0, 0, ZERO_DIGEST);
}

/** What sealing needs of a set of keys: record keys (RepoKeys) or the index's (index-seal.ts). */
export type SealKey = Pick<RepoKeys, 'seal'>;

let sealScratch = Buffer.allocUnsafe(0);

/**
 * Seal `plain` into out[at, at + plain.length + SEAL_OVERHEAD): nonce | ciphertext | tag.
 * `plain` may lie in `out` at `at` (it is read before anything is written over it).
 * Returns the sealed length.
 */
export function sealInto(keys: SealKey, plain: Uint8Array, ad: Uint8Array, out: Uint8Array, at: number): number {
  const nonce = randomBytes(NONCE_BYTES);
  const n = plain.length;
  const native = nativeGcm();
  if (native) {
    // Ciphered where it belongs (over the plaintext, when it lies there); the nonce last.
    native(true, keys.seal, nonce, ad, plain, out.subarray(at + NONCE_BYTES, at + NONCE_BYTES + n), out.subarray(at + NONCE_BYTES + n, at + SEAL_OVERHEAD + n));
    out.set(nonce, at);
    return n + SEAL_OVERHEAD;
  }
  const c = createCipheriv('aes-256-gcm', keys.seal, nonce);
  c.setAAD(ad);
  // The ciphertext lands 12 bytes past where the plaintext may lie (in `out` at `at`):
  // such a plaintext is read from a copy in a reused buffer.
  let src = plain;
  if (plain.buffer === out.buffer) {
    if (sealScratch.length < plain.length) sealScratch = Buffer.allocUnsafe(Math.max(plain.length, 1 << 20));
    sealScratch.set(plain);
    src = sealScratch.subarray(0, plain.length);
  }
  cryptPieces(c, src, out, at + NONCE_BYTES);
  c.final();
  out.set(nonce, at);
  out.set(c.getAuthTag(), at + NONCE_BYTES + n);
  return n + SEAL_OVERHEAD;
}

/**
 * Bytes per update() call. Node allocates each call's output; pieces this small come from
 * malloc's arena, reused, where a whole record's would be fresh pages, which cost a fault
 * each in this VM (native-notes/performance.md, "Encryption").
 */
const PIECE = 32 << 10;

function cryptPieces(c: { update(d: Uint8Array): Buffer }, src: Uint8Array, out: Uint8Array, at: number): number {
  let n = 0;
  for (let o = 0; o < src.length; o += PIECE) {
    const part = c.update(src.subarray(o, Math.min(src.length, o + PIECE)));
    out.set(part, at + n);
    n += part.length;
  }
  return n;
}

/**
 * Open a sealed payload into out (from 0; it must hold sealed.length - SEAL_OVERHEAD
 * bytes). Returns the plaintext's length, or null when it does not authenticate: then out
 * holds unauthenticated bytes, which the caller must not use.
 */
export function openInto(keys: SealKey, sealed: Uint8Array, ad: Uint8Array, out: Uint8Array): number | null {
  if (sealed.length < SEAL_OVERHEAD) return null;
  const s = Buffer.from(sealed.buffer, sealed.byteOffset, sealed.byteLength);
  const nonce = s.subarray(0, NONCE_BYTES);
  const body = s.subarray(NONCE_BYTES, s.length - TAG_BYTES);
  const tag = s.subarray(s.length - TAG_BYTES);
  const native = nativeGcm();
  if (native) return native(false, keys.seal, nonce, ad, body, out.subarray(0, body.length), tag) ? body.length : null;
  const d = createDecipheriv('aes-256-gcm', keys.seal, nonce);
  d.setAAD(ad);
  d.setAuthTag(tag);
  const n = cryptPieces(d, body, out, 0);
  try {
    d.final();
  } catch {
    return null;
  }
  return n;
}

export function seal(keys: SealKey, plain: Uint8Array, ad: Uint8Array): Buffer {
  const out = Buffer.allocUnsafe(plain.length + SEAL_OVERHEAD);
  sealInto(keys, plain, ad, out, 0);
  return out;
}

/** The plaintext of a sealed payload, or null when it does not authenticate (damage). */
export function open(keys: SealKey, sealed: Uint8Array, ad: Uint8Array): Buffer | null {
  if (sealed.length < SEAL_OVERHEAD) return null;
  const out = Buffer.allocUnsafe(sealed.length - SEAL_OVERHEAD);
  return openInto(keys, sealed, ad, out) === null ? null : out;
}

/** What a record that fails to open is reported as. */
export const SEAL_BROKEN = 'record does not authenticate (altered, moved, or sealed by another repository)';

/** Turn keys that crossed a thread boundary (Uint8Arrays) back into what node:crypto takes. */
export function asKeys(k: RepoKeys): RepoKeys {
  const b = (u: Uint8Array) => Buffer.from(u.buffer, u.byteOffset, u.byteLength);
  return { repoId: b(k.repoId), identity: b(k.identity), fast: b(k.fast), seal: b(k.seal), chunkSeed: [k.chunkSeed[0], k.chunkSeed[1]], toc: b(k.toc) };
}

// ---- key slots ----

export type SlotKind = 'password' | 'key-file';

export interface KeySlot {
  id: string;
  kind: SlotKind;
  created: string;
  kdf: { name: 'scrypt'; N: number; r: number; p: number; salt: string };
  nonce: string;
  wrapped: string;
}

/** scrypt's cost: 32 MiB and about a tenth of a second per try on this project's machine. */
export const SCRYPT = { N: 1 << 15, r: 8, p: 1 };
export const SLOT_ID_RE = /^[0-9a-f]{16}$/;

function kdf(secret: Uint8Array, k: KeySlot['kdf']): Promise<Buffer> {
  return new Promise((resolve, reject) =>
    scrypt(secret, Buffer.from(k.salt, 'base64'), 32, { N: k.N, r: k.r, p: k.p, maxmem: 256 * k.N * k.r + (1 << 20) }, (e, key) =>
      e ? reject(e) : resolve(key),
    ),
  );
}

function slotAd(repoIdHex: string, slotId: string): Buffer {
  return Buffer.concat([Buffer.from('genvault key slot'), Buffer.from(repoIdHex, 'hex'), Buffer.from(slotId, 'hex')]);
}

/** A new key slot wrapping `master` under `secret`. */
export async function wrapMaster(master: Uint8Array, secret: Uint8Array, repoIdHex: string, kind: SlotKind, cost = SCRYPT): Promise<KeySlot> {
  const id = randomBytes(8).toString('hex');
  const k = { name: 'scrypt' as const, ...cost, salt: randomBytes(16).toString('base64') };
  const wrapKey = await kdf(secret, k);
  const nonce = randomBytes(NONCE_BYTES);
  const c = createCipheriv('aes-256-gcm', wrapKey, nonce);
  c.setAAD(slotAd(repoIdHex, id));
  const ct = Buffer.concat([c.update(master), c.final(), c.getAuthTag()]);
  return { id, kind, created: new Date().toISOString(), kdf: k, nonce: nonce.toString('base64'), wrapped: ct.toString('base64') };
}

/** The master key a slot holds when `secret` opens it, else null. */
export async function unwrapMaster(slot: KeySlot, secret: Uint8Array, repoIdHex: string): Promise<Buffer | null> {
  const wrapKey = await kdf(secret, slot.kdf);
  const ct = Buffer.from(slot.wrapped, 'base64');
  if (ct.length !== MASTER_KEY_BYTES + TAG_BYTES) return null;
  const d = createDecipheriv('aes-256-gcm', wrapKey, Buffer.from(slot.nonce, 'base64'));
  d.setAAD(slotAd(repoIdHex, slot.id));
  d.setAuthTag(ct.subarray(MASTER_KEY_BYTES));
  const master = d.update(ct.subarray(0, MASTER_KEY_BYTES));
  try {
    d.final();
  } catch {
    return null;
  }
  return master;
}

/** A parsed keys/ID.json, checked; throws saying what is wrong. */
export function checkSlot(raw: unknown, id: string): KeySlot {
  const s = raw as KeySlot;
  const bad = (why: string) => new Error(`key slot ${id}: ${why}`);
  if (typeof s !== 'object' || s === null) throw bad('not a JSON object');
  if (s.id !== id || !SLOT_ID_RE.test(s.id)) throw bad('"id" does not match its file name');
  if (s.kind !== 'password' && s.kind !== 'key-file') throw bad('"kind" invalid');
  if (typeof s.created !== 'string' || Number.isNaN(Date.parse(s.created))) throw bad('"created" invalid');
  const k = s.kdf;
  if (typeof k !== 'object' || k === null || k.name !== 'scrypt' || typeof k.salt !== 'string') throw bad('"kdf" invalid');
  for (const n of [k.N, k.r, k.p]) if (!Number.isInteger(n) || n < 1) throw bad('"kdf" invalid');
  // Bounds, so that a planted slot cannot make every command spend minutes or gigabytes.
  if (k.N > 1 << 20 || (k.N & (k.N - 1)) !== 0 || k.r > 32 || k.p > 16) throw bad('"kdf" parameters out of range');
  if (typeof s.nonce !== 'string' || Buffer.from(s.nonce, 'base64').length !== NONCE_BYTES) throw bad('"nonce" invalid');
  if (typeof s.wrapped !== 'string') throw bad('"wrapped" invalid');
  return s;
}

// ---- paper backup of the master key ----

const EXPORT_HEAD = 'genvault master key';

/**
 * A printable backup of the master key: the repository id, the key in groups of four hex
 * digits (four groups a line), and a check over both, so that a mistyped line is caught.
 */
export function exportText(master: Uint8Array, repoIdHex: string): string {
  const hex = Buffer.from(master).toString('hex');
  const groups = hex.match(/.{4}/g)!;
  const lines: string[] = [];
  for (let i = 0; i < groups.length; i += 4) lines.push(groups.slice(i, i + 4).join(' '));
  const check = exportCheck(master, repoIdHex);
  return [
    `${EXPORT_HEAD} (keep it secret: it opens every backup in this repository)`,
    `repository: ${repoIdHex}`,
    ...lines.map((l, i) => `key ${i + 1}: ${l}`),
    `check: ${check}`,
    '',
  ].join('\n');
}

function exportCheck(master: Uint8Array, repoIdHex: string): string {
  return createHash('sha256').update(Buffer.from(repoIdHex, 'hex')).update(master).digest('hex').slice(0, 8);
}

/** The master key and repository id of an exportText backup (spaces and case ignored); throws on a typo. */
export function parseExport(text: string): { master: Buffer; repoId: string } {
  const repo = /repository:\s*([0-9a-fA-F]{32})/.exec(text);
  const check = /check:\s*([0-9a-fA-F]{8})/.exec(text);
  const keyHex = [...text.matchAll(/^\s*key \d+:\s*([0-9a-fA-F ]+)$/gm)].map((m) => m[1]!.replace(/\s+/g, '')).join('');
  if (!repo || !check || keyHex.length !== MASTER_KEY_BYTES * 2) throw new Error('not a genvault master key backup (repository, key and check lines)');
  const master = Buffer.from(keyHex, 'hex');
  const repoId = repo[1]!.toLowerCase();
  if (exportCheck(master, repoId) !== check[1]!.toLowerCase()) throw new Error('the key backup does not match its check line (a typo?)');
  return { master, repoId };
}

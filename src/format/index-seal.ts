/**
 * Format 7 ("index sealed", FORMAT.md "Version 7: sealed index"): what an encrypted
 * repository's LevelDB index says about images and jobs is keyed or sealed.
 *
 * - Names in keys (images in `g`, jobs in `j`) are replaced by a name tag: the first 16
 *   bytes of HMAC-SHA256(index name key, kind | name), so that the generations of one image
 *   (the runs of one job) are still one prefix scan, and equal names give equal tags.
 * - Values that carry names, sources, tags or hook output (generation records, job runs)
 *   are sealed with AES-256-GCM under the index seal key, with associated data
 *   "GVI7" | repository id (16) | the whole key (its first byte is the kind), so that a
 *   value moved under another key, or copied from another repository, does not open.
 *
 * Pure: no index access. GenerationIndex is how every reader and writer of `g` entries
 * makes and reads them, in every format (formats 1-6: the plain layout of generation.ts).
 */
import { createHmac } from 'node:crypto';
import { GenvaultError } from '../util/errors.js';
import { MASTER_KEY_BYTES, open, seal } from './crypto.js';
import { INDEX_SEALED_VERSION, type RepoConfig } from './config.js';
import { K_GEN, key } from './keys.js';
import { checkGenerationShape, describeGenerationKey, generationKey, type Generation } from './generation.js';

/** Bytes of a name tag (in place of a name in a key). */
export const NAME_TAG_BYTES = 16;
const AD_MAGIC = Buffer.from('GVI7');

/** The index keys of a format 7 repository, derived from its master key. */
export interface IndexKeys {
  repoId: Buffer;
  /** HMAC-SHA256 key of name tags. */
  name: Buffer;
  /** AES-256-GCM key of sealed index values. */
  seal: Buffer;
}

export function deriveIndexKeys(master: Uint8Array, repoIdHex: string): IndexKeys {
  if (master.length !== MASTER_KEY_BYTES) throw new Error('master key must be 32 bytes');
  const sub = (label: string) => createHmac('sha256', master).update(label).digest();
  return { repoId: Buffer.from(repoIdHex, 'hex'), name: sub('genvault-7 index name'), seal: sub('genvault-7 index seal') };
}

/** A name's tag in keys of kind `kind` (the key's prefix byte): equal names, equal tags; without the key, no name. */
export function nameTag(k: IndexKeys, kind: number, name: string): Buffer {
  return createHmac('sha256', k.name).update(Buffer.of(kind)).update(name, 'utf8').digest().subarray(0, NAME_TAG_BYTES);
}

/** The associated data of a sealed index value: the repository and the whole key (whose first byte is the kind). */
export function indexAd(k: IndexKeys, indexKey: Uint8Array): Buffer {
  return Buffer.concat([AD_MAGIC, k.repoId, indexKey]);
}

/** nonce (12) | ciphertext | tag (16), bound to `indexKey`: sealed as pack records are (crypto.ts). */
export function sealIndexValue(k: IndexKeys, indexKey: Uint8Array, plain: Uint8Array): Buffer {
  return seal(k, plain, indexAd(k, indexKey));
}

/** The plaintext of a sealed index value, or null when it does not authenticate under `indexKey`. */
export function openIndexValue(k: IndexKeys, indexKey: Uint8Array, sealed: Uint8Array): Buffer | null {
  return open(k, sealed, indexAd(k, indexKey));
}

/** What a sealed index value that does not open is reported as. */
export const INDEX_SEAL_BROKEN = 'sealed value does not authenticate (altered, moved under another key, or of another repository)';

/** Said where a format 7 repository opened without its key cannot show names. */
export const NAMES_NEED_KEY = 'image names, sources and tags are sealed in this repository: they need its key';

/** Whether a repository of this config seals its index (format 7, encrypted). */
export function indexSealed(config: Pick<RepoConfig, 'version' | 'encryption'>): boolean {
  return config.version >= INDEX_SEALED_VERSION && config.encryption !== undefined;
}

/** How one repository's `g` entries are keyed and stored. */
export interface GenerationIndex {
  /** Format 7: keys hold name tags, values are sealed. */
  readonly sealed: boolean;
  /** False when sealed and opened without the key: keys give times and ids only. */
  readonly readable: boolean;
  /** The key of a generation's record. */
  key(g: Pick<Generation, 'name' | 'created' | 'id'>): Buffer;
  /** The prefix of every record of one image, or of all (no name). */
  prefix(name?: string): Buffer;
  /** The value stored for `g` under its key: its JSON (`json`, or g's), sealed in format 7. */
  value(g: Generation, json?: Buffer): Buffer;
  /** The JSON bytes of a stored value; throws an Error saying what is wrong. */
  json(k: Buffer, v: Buffer): Buffer;
  /** A stored record, checked (shape, and stored under the key it makes); throws an Error saying what is wrong. */
  parse(k: Buffer, v: Buffer): Generation;
  /** What a key says without its value, for reports. */
  describe(k: Buffer): { name: string; id: string };
  /** The creation time (ms) a well-formed key holds, or null. */
  createdOf(k: Buffer): number | null;
}

function parseChecked(keyOf: GenerationIndex['key'], k: Buffer, json: Buffer): Generation {
  let raw: unknown;
  try {
    raw = JSON.parse(json.toString('utf8'));
  } catch {
    throw new Error('not valid JSON');
  }
  const g = checkGenerationShape(raw);
  if (!keyOf(g).equals(k)) throw new Error('stored under another key');
  return g;
}

const createdAt = (k: Buffer, at: number): number | null => (k.length >= at + 16 ? Number(k.readBigUInt64BE(at)) : null);

/** Formats 1-6: 'g' name 0x00 created id, JSON values (generation.ts). */
export const PLAIN_GENERATIONS: GenerationIndex = {
  sealed: false,
  readable: true,
  key: generationKey,
  prefix: (name) => (name === undefined ? Buffer.of(K_GEN) : key(K_GEN, name, Buffer.of(0))),
  value: (g, json) => json ?? Buffer.from(JSON.stringify(g)),
  json: (_k, v) => v,
  parse: (k, v) => parseChecked(generationKey, k, v),
  describe: describeGenerationKey,
  createdOf: (k) => (k.length > 17 && k[k.length - 17] === 0 ? createdAt(k, k.length - 16) : null),
};

/** The length of a format 7 generation key: 'g' | tag (16) | created u64 BE | id (8). */
export const SEALED_GEN_KEY_BYTES = 1 + NAME_TAG_BYTES + 8 + 8;

function sealedKey(prefixTag: Buffer, created: string, id: string): Buffer {
  const k = Buffer.alloc(SEALED_GEN_KEY_BYTES);
  prefixTag.copy(k, 0);
  k.writeBigUInt64BE(BigInt(Date.parse(created)), 1 + NAME_TAG_BYTES);
  Buffer.from(id, 'hex').copy(k, 1 + NAME_TAG_BYTES + 8);
  return k;
}

const describeSealed = (k: Buffer) => ({
  name: k.length === SEALED_GEN_KEY_BYTES ? `[image ${k.toString('hex', 1, 9)}]` : '?',
  id: k.length === SEALED_GEN_KEY_BYTES ? k.toString('hex', k.length - 8) : '?',
});

const createdSealed = (k: Buffer) => (k.length === SEALED_GEN_KEY_BYTES ? createdAt(k, 1 + NAME_TAG_BYTES) : null);

/** Format 7 with its keys. */
export function sealedGenerations(ik: IndexKeys): GenerationIndex {
  const prefix = (name?: string) => (name === undefined ? Buffer.of(K_GEN) : Buffer.concat([Buffer.of(K_GEN), nameTag(ik, K_GEN, name)]));
  const keyOf = (g: Pick<Generation, 'name' | 'created' | 'id'>) => sealedKey(prefix(g.name), g.created, g.id);
  const json = (k: Buffer, v: Buffer) => {
    if (k.length !== SEALED_GEN_KEY_BYTES) throw new Error('not a generation key of this format');
    const plain = openIndexValue(ik, k, v);
    if (!plain) throw new Error(INDEX_SEAL_BROKEN);
    return plain;
  };
  return {
    sealed: true,
    readable: true,
    key: keyOf,
    prefix,
    value: (g, j) => sealIndexValue(ik, keyOf(g), j ?? Buffer.from(JSON.stringify(g))),
    json,
    parse: (k, v) => parseChecked(keyOf, k, json(k, v)),
    describe: describeSealed,
    createdOf: createdSealed,
  };
}

/** Format 7 opened without its key: keys give times and ids, nothing gives names. */
export const LOCKED_GENERATIONS: GenerationIndex = {
  sealed: true,
  readable: false,
  key: () => {
    throw new GenvaultError(NAMES_NEED_KEY, 'NO_KEY');
  },
  prefix: (name) => {
    if (name !== undefined) throw new GenvaultError(NAMES_NEED_KEY, 'NO_KEY');
    return Buffer.of(K_GEN);
  },
  value: () => {
    throw new GenvaultError(NAMES_NEED_KEY, 'NO_KEY');
  },
  json: () => {
    throw new GenvaultError(NAMES_NEED_KEY, 'NO_KEY');
  },
  parse: () => {
    throw new GenvaultError(NAMES_NEED_KEY, 'NO_KEY');
  },
  describe: describeSealed,
  createdOf: createdSealed,
};

/** The GenerationIndex of a repository of `config`, opened with `keys` (null: without its key, or unencrypted). */
export function generationIndex(config: Pick<RepoConfig, 'version' | 'encryption'>, keys: IndexKeys | null): GenerationIndex {
  if (!indexSealed(config)) return PLAIN_GENERATIONS;
  return keys ? sealedGenerations(keys) : LOCKED_GENERATIONS;
}

/**
 * Metadata records (format 4): what the index holds besides chunk locations, written into
 * packs as records of their own so that the packs alone describe the repository and the
 * index can be rebuilt from them (`genvault repair`).
 *
 * A metadata record has the chunk record's 52-byte header (pack.ts) with its type in the
 * u16 at offset 6, which format 3 and older always wrote as 0 (a chunk or a group):
 *
 *   1 map leaf          payload = the leaf's bytes, exactly as stored under 'l'
 *   2 generation map    payload = "GVM1" | generation id (8) | top-level map bytes
 *   3 generation record payload = "GVG1" | the generation record's JSON, as stored under 'g'
 *   4 generation change payload = "GVC1" | JSON of a GenerationChange
 *   5 table of contents (format 5; toc.ts): what the pack holds, written by its writer
 *
 * The header's digest is the SHA-256 of the payload, its raw and stored lengths the
 * payload's length, compression 0 (raw): metadata is small and leaves are mostly digests,
 * which do not compress. Decoding is strict: anything that does not parse exactly is
 * damage, reported, never taken for another record.
 */
import { createHash } from 'node:crypto';
import { COMP_RAW, RECORD_HEADER_SIZE, encodeRecordHeader } from './pack.js';
import { decodeTop, walkLeaf } from './chunkmap.js';
import { generationKey, parseGenerationRecord, type Generation } from './generation.js';
import { checkImageName } from './config.js';
import { REC_TOC, checkTocPayload } from './toc.js';
import { metaAd, seal, type RepoKeys } from './crypto.js';

export const REC_CHUNK = 0;
export const REC_LEAF = 1;
export const REC_GENMAP = 2;
export const REC_GENERATION = 3;
export const REC_CHANGE = 4;
export { REC_TOC };

const MAGIC_GENMAP = Buffer.from('GVM1');
const MAGIC_GENERATION = Buffer.from('GVG1');
const MAGIC_CHANGE = Buffer.from('GVC1');

/**
 * A change to a generation after its backup committed it: tags or protection set, or the
 * generation forgotten (by `forget` or `prune`). `rev` counts the generation's changes
 * (1 for the first); a rebuild applies, per generation, the change with the highest
 * `rev`, and a forgotten generation stays forgotten whatever else it finds.
 */
export interface GenerationChange {
  id: string;
  name: string;
  created: string;
  rev: number;
  /** When the change was made (ISO-8601 UTC): for reports only, never for ordering. */
  at: string;
  tags?: string[];
  protected?: boolean;
  forgotten?: boolean;
}

export type MetaRecord =
  | { type: typeof REC_LEAF; leaf: Buffer }
  | { type: typeof REC_GENMAP; id: string; top: Buffer }
  | { type: typeof REC_GENERATION; generation: Generation; json: Buffer }
  | { type: typeof REC_CHANGE; change: GenerationChange }
  | { type: typeof REC_TOC; prev: number; count: number };

/** The records written through encodeMetaRecord (a table of contents is toc.ts's encodeTocRecord). */
export type WrittenMetaRecord = Exclude<MetaRecord, { type: typeof REC_TOC }>;

/**
 * A whole record (header and payload) for a pack. With keys (format 6) the payload is
 * sealed, and the header's digest is the SHA-256 of the sealed bytes (FORMAT.md).
 */
export function encodeMetaRecord(rec: WrittenMetaRecord, keys: RepoKeys | null = null): Buffer {
  const plain = metaPayload(rec);
  const payload = keys ? seal(keys, plain, metaAd(keys, rec.type)) : plain;
  const out = Buffer.allocUnsafe(RECORD_HEADER_SIZE + payload.length);
  encodeRecordHeader(out, 0, COMP_RAW, payload.length, payload.length, createHash('sha256').update(payload).digest(), rec.type);
  payload.copy(out, RECORD_HEADER_SIZE);
  return out;
}

function metaPayload(rec: WrittenMetaRecord): Buffer {
  switch (rec.type) {
    case REC_LEAF:
      return rec.leaf;
    case REC_GENMAP:
      return Buffer.concat([MAGIC_GENMAP, idBytes(rec.id), rec.top]);
    case REC_GENERATION:
      return Buffer.concat([MAGIC_GENERATION, rec.json]);
    case REC_CHANGE:
      return Buffer.concat([MAGIC_CHANGE, Buffer.from(JSON.stringify(rec.change))]);
  }
}

function idBytes(id: string): Buffer {
  if (!/^[0-9a-f]{16}$/.test(id)) throw new Error(`invalid generation id ${JSON.stringify(id)}`);
  return Buffer.from(id, 'hex');
}

/**
 * Decode a metadata record's payload (already checked against the header's digest).
 * Throws an Error saying what is wrong.
 */
export function decodeMetaPayload(type: number, payload: Buffer): MetaRecord {
  switch (type) {
    case REC_LEAF:
      walkLeaf(payload); // structure only: its digest is the record's
      return { type, leaf: payload };
    case REC_GENMAP: {
      expectMagic(payload, MAGIC_GENMAP, 'generation map');
      if (payload.length < 12) throw new Error('generation map record cut off');
      const top = payload.subarray(12);
      decodeTop(top);
      return { type, id: payload.toString('hex', 4, 12), top };
    }
    case REC_GENERATION: {
      expectMagic(payload, MAGIC_GENERATION, 'generation record');
      const json = payload.subarray(4);
      const g = parseJson(json, 'generation record') as Generation;
      // parseGenerationRecord checks the shape and that name, time and id make its key.
      const generation = parseGenerationRecord(generationKeyOf(g), json);
      return { type, generation, json };
    }
    case REC_CHANGE: {
      expectMagic(payload, MAGIC_CHANGE, 'generation change');
      return { type, change: checkChange(parseJson(payload.subarray(4), 'generation change')) };
    }
    case REC_TOC: {
      const toc = checkTocPayload(payload);
      return { type, prev: toc.prev, count: toc.count };
    }
    default:
      throw new Error(`unknown record type ${type}`);
  }
}

function expectMagic(payload: Buffer, magic: Buffer, what: string): void {
  if (payload.length < magic.length || !payload.subarray(0, magic.length).equals(magic)) throw new Error(`${what} record: bad magic`);
}

function parseJson(b: Buffer, what: string): unknown {
  try {
    return JSON.parse(b.toString('utf8'));
  } catch {
    throw new Error(`${what} record: not JSON`);
  }
}

function generationKeyOf(g: Generation): Buffer {
  if (typeof g !== 'object' || g === null || typeof g.name !== 'string' || typeof g.created !== 'string' || typeof g.id !== 'string') {
    throw new Error('generation record: missing name, created or id');
  }
  if (Number.isNaN(Date.parse(g.created)) || !/^[0-9a-f]{16}$/.test(g.id)) throw new Error('generation record: bad created or id');
  return generationKey(g);
}

function checkChange(raw: unknown): GenerationChange {
  const bad = (why: string) => new Error(`generation change record: ${why}`);
  if (typeof raw !== 'object' || raw === null) throw bad('not an object');
  const c = raw as GenerationChange;
  if (typeof c.id !== 'string' || !/^[0-9a-f]{16}$/.test(c.id)) throw bad('bad id');
  if (typeof c.name !== 'string') throw bad('bad name');
  checkImageName(c.name);
  if (typeof c.created !== 'string' || Number.isNaN(Date.parse(c.created))) throw bad('bad created');
  if (!Number.isSafeInteger(c.rev) || c.rev < 1) throw bad('bad rev');
  if (typeof c.at !== 'string' || Number.isNaN(Date.parse(c.at))) throw bad('bad at');
  if (c.tags !== undefined && (!Array.isArray(c.tags) || !c.tags.every((t) => typeof t === 'string'))) throw bad('bad tags');
  if (c.protected !== undefined && typeof c.protected !== 'boolean') throw bad('bad protected');
  if (c.forgotten !== undefined && c.forgotten !== true) throw bad('bad forgotten');
  return c;
}

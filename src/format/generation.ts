/** Generation records and revision specs (NAME@REV). */
import { GenvaultError, UsageError } from '../util/errors.js';
import { K_GEN, key } from './keys.js';
import { checkImageName } from './config.js';

export interface GenerationStats {
  bytesRead: number;
  zeroBytes: number;
  chunks: number;
  newChunks: number;
  /** Raw bytes of chunks this generation added to the repository. */
  newBytes: number;
  /** What those chunks take in pack files (compressed, with record headers). */
  newStored: number;
  /**
   * Bytes the change detector found unchanged since the parent generation (same offset,
   * length and BLAKE3), so their SHA-256 was not computed. Absent before format 2.
   */
  unchangedBytes?: number;
  /** Bytes of holes in a sparse source file that were skipped, not read. */
  holeBytes?: number;
  durationMs: number;
}

export interface Generation {
  id: string;
  name: string;
  created: string;
  size: number;
  chunking: { block: number; min: number; max: number; maskBits: number };
  leaves: number;
  tags: string[];
  source: string;
  parent: string | null;
  stats: GenerationStats;
  protected?: boolean;
  /** Removed by forget/prune while a reader had it open (pinned): hidden, kept until gc. */
  removed?: boolean;
  /**
   * How many changes (protect, unprotect) the record has had since its backup (format 4:
   * each wrote a change record with this rev into a pack; a rebuild applies the highest).
   * Absent: 0.
   */
  rev?: number;
}

/** The index key of a generation record: 'g' name 0x00 created (ms, u64 BE) id (8 bytes). */
export function generationKey(g: Pick<Generation, 'name' | 'created' | 'id'>): Buffer {
  const t = Buffer.alloc(8);
  t.writeBigUInt64BE(BigInt(Date.parse(g.created)));
  return key(K_GEN, g.name, Buffer.of(0), t, Buffer.from(g.id, 'hex'));
}

/**
 * A generation record as read from the index, checked before use: JSON of the expected
 * shape, stored under the key its own name, time and id give (so a damaged key or record
 * cannot pass for another generation). Throws an Error saying what is wrong.
 */
export function parseGenerationRecord(k: Buffer, v: Buffer): Generation {
  const g = checkGenerationShape(JSON.parse(v.toString('utf8')));
  if (!generationKey(g).equals(k)) throw new Error('stored under another key');
  return g;
}

/** A parsed generation record's shape, checked (not its key); throws an Error saying what is wrong. */
export function checkGenerationShape(raw: unknown): Generation {
  const g = raw as Generation;
  if (typeof g !== 'object' || g === null) throw new Error('not an object');
  if (typeof g.id !== 'string' || !/^[0-9a-f]{16}$/.test(g.id)) throw new Error('bad id');
  if (typeof g.name !== 'string' || typeof g.created !== 'string' || Number.isNaN(Date.parse(g.created))) throw new Error('bad name or created');
  if (!Number.isSafeInteger(g.size) || g.size < 0) throw new Error('bad size');
  if (!Number.isSafeInteger(g.leaves) || g.leaves < 0) throw new Error('bad leaf count');
  return g;
}

/** What a damaged generation record's key still says (for reports). */
export function describeGenerationKey(k: Buffer): { name: string; id: string } {
  return {
    name: k.length > 17 && k[k.length - 17] === 0 ? k.subarray(1, k.length - 17).toString('utf8') : '?',
    id: k.length > 17 ? k.subarray(k.length - 8).toString('hex') : '?',
  };
}

export function parseTarget(spec: string): { name: string; rev: string } {
  const at = spec.lastIndexOf('@');
  const name = at < 0 ? spec : spec.slice(0, at);
  const rev = at < 0 ? 'latest' : spec.slice(at + 1);
  if (!name) throw new UsageError(`missing image name in ${JSON.stringify(spec)} (expected NAME@REV)`);
  checkImageName(name);
  if (!rev) throw new UsageError(`missing revision after '@' in ${JSON.stringify(spec)}`);
  return { name, rev };
}

const ISO_RE = /^\d{4}-\d{2}-\d{2}([T ]\d{2}(:\d{2}(:\d{2}(\.\d+)?)?)?)?(Z|[+-]\d{2}:?\d{2})?$/;

/**
 * Resolve a revision among one image's generations (sorted oldest first):
 * `latest`; N (0 = newest); an ISO date or time (newest at or before it; a bare date
 * means the end of that day, UTC unless a zone is given); a full id or unique prefix.
 */
export function resolveRevision(gens: Generation[], name: string, rev: string): Generation {
  if (!gens.length) throw new GenvaultError(`image ${name} has no generations`, 'NOT_FOUND');
  const newestFirst = [...gens].reverse();
  if (rev === 'latest') return newestFirst[0]!;
  if (/^\d{1,6}$/.test(rev)) {
    const n = Number(rev);
    const g = newestFirst[n];
    if (!g) throw new GenvaultError(`${name}@${rev}: only ${gens.length} generation(s) (0 is the newest)`, 'NOT_FOUND');
    return g;
  }
  if (ISO_RE.test(rev)) {
    let s = rev.replace(' ', 'T');
    const hasZone = /(Z|[+-]\d{2}:?\d{2})$/.test(s);
    let t: number;
    if (/^\d{4}-\d{2}-\d{2}$/.test(s)) t = Date.parse(`${s}T23:59:59.999Z`);
    else {
      if (!hasZone) s += 'Z';
      t = Date.parse(s);
    }
    if (Number.isNaN(t)) throw new UsageError(`${name}@${rev}: not a valid date or time`);
    const g = newestFirst.find((x) => Date.parse(x.created) <= t);
    if (!g) throw new GenvaultError(`${name}@${rev}: no generation at or before ${new Date(t).toISOString()}`, 'NOT_FOUND');
    return g;
  }
  const id = rev.startsWith('id:') ? rev.slice(3) : rev;
  if (!/^[0-9a-f]+$/i.test(id)) throw new GenvaultError(`${name}@${rev}: unknown revision`, 'NOT_FOUND');
  const matches = gens.filter((g) => g.id.startsWith(id.toLowerCase()));
  if (matches.length === 1) return matches[0]!;
  if (matches.length > 1) {
    throw new GenvaultError(
      `${name}@${rev}: ambiguous revision, matches ${matches.map((m) => m.id).join(', ')}`,
      'AMBIGUOUS',
    );
  }
  throw new GenvaultError(`${name}@${rev}: unknown revision`, 'NOT_FOUND');
}

/**
 * Name of a generation's file in the mount: UTC creation time to the millisecond (creation
 * times are strictly increasing per image), so `ls` sorts the files by time.
 */
export function generationFileName(g: Generation): string {
  const t = g.created.replace(/:/g, '');
  return `${t}-${g.id.slice(0, 8)}.img`;
}

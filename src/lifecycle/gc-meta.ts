/**
 * gc and the metadata records of format 4 (FORMAT.md, "Version 4" and "Garbage
 * collection", step 9): before a pack is deleted or rewritten, its metadata records are
 * read from the pack (the index does not say where they are) and the live ones are copied
 * into gc's new pack, unchanged.
 *
 * Live (read once, after the leaf sweep, before the first pack is touched):
 *   leaf              its digest is under 'l'
 *   generation map    its generation id is under 'g'
 *   generation record the key its name, created and id give is under 'g'
 *   change            forgotten (always), or its generation is under 'g' and its rev is the
 *                     record's (absent: 0)
 * Between that reading and the unlink of the old pack, a record taken for dead cannot
 * become live: ids are never reused, revs only grow, a forgotten change is always kept,
 * and a leaf absent from 'l' after the leaf sweep is put back only by a backup that looked
 * it up after the sweep took it (it registers first, and the sweep gives up while any
 * writer runs), found it missing and so wrote a leaf record of its own.
 */
import { createHash } from 'node:crypto';
import { K_GEN, K_LEAF } from '../format/keys.js';
import { REC_CHANGE, REC_GENERATION, REC_GENMAP, REC_LEAF, REC_TOC, type MetaRecord } from '../format/meta.js';
import { PACK_HEADER_SIZE, RECORD_HEADER_SIZE, decodeRecordHeader, isPackId, packObject } from '../format/pack.js';
import { readRecordSpan, scanStoredPack } from '../store/pack-reader.js';
import type { Repository } from '../repository/repository.js';

/** What makes a metadata record live, as the index says it now. */
export interface MetaLiveness {
  /** Leaf digests (latin1) under 'l'. */
  leaves: Set<string>;
  /** Generation keys (latin1) under 'g', with the record's rev (-1: unreadable, every change kept). */
  generations: Map<string, number>;
  /** Generation ids (hex) under 'g'. */
  ids: Set<string>;
  /** The 'g' key of a generation (the repository's format: see Repository.genIndex). */
  keyOf: (g: { name: string; created: string; id: string }) => Buffer;
}

const prefixRange = (prefix: number) => ({ gte: Buffer.of(prefix), lt: Buffer.of(prefix + 1) });

/**
 * Read the liveness sets. `leaves`: the leaves to take for live instead of those under 'l'
 * (the dry run: the leaves the generations reference, which a real run would keep).
 */
export async function readLiveness(repo: Repository, leaves?: Set<string>): Promise<MetaLiveness> {
  const gi = repo.genIndex;
  const live: MetaLiveness = { leaves: leaves ?? new Set(), generations: new Map(), ids: new Set(), keyOf: gi.key };
  if (!leaves) for await (const k of repo.db.keys(prefixRange(K_LEAF))) live.leaves.add(k.toString('latin1', 1));
  for await (const [k, v] of repo.db.iterator(prefixRange(K_GEN))) {
    if (k.length < 1 + 1 + 8 + 8) continue; // not a generation key: names no generation
    let rev = -1;
    try {
      const r = (JSON.parse(gi.json(k, v).toString('utf8')) as { rev?: unknown }).rev ?? 0;
      if (Number.isSafeInteger(r)) rev = r as number;
    } catch {
      /* unreadable: its changes are all kept (verify reports the record) */
    }
    live.generations.set(k.toString('latin1'), rev);
    live.ids.add(k.toString('hex', k.length - 8));
  }
  return live;
}

export function isLive(rec: MetaRecord, digest: Buffer, live: MetaLiveness): boolean {
  switch (rec.type) {
    case REC_LEAF:
      return live.leaves.has(digest.toString('latin1'));
    case REC_GENMAP:
      return live.ids.has(rec.id);
    case REC_GENERATION:
      return live.generations.has(live.keyOf(rec.generation).toString('latin1'));
    case REC_CHANGE: {
      if (rec.change.forgotten) return true;
      const rev = live.generations.get(live.keyOf(rec.change).toString('latin1'));
      return rev !== undefined && (rev === -1 || rev === rec.change.rev);
    }
    case REC_TOC:
      return false; // it lists its own pack's records; gc's new pack gets its own
  }
}

/** A pack's metadata records, as gc sees them before deleting or rewriting it. */
export interface MetaScan {
  /** Why the pack must be left alone (a damaged record, a cut-off end), or null. */
  problem: string | null;
  /** Live records: offset and length (header + payload), in pack order. */
  live: Array<{ offset: number; length: number }>;
  liveBytes: number;
  dropped: number;
  /** Bytes of the pack's tables of contents: neither live nor dead (a rewrite writes its own). */
  tocBytes: number;
}

/** Scan the committed part of a pack (`size` bytes) for its metadata records. */
export async function scanMeta(repo: Repository, packId: string, size: number, live: MetaLiveness): Promise<MetaScan> {
  const out: MetaScan = { problem: null, live: [], liveBytes: 0, dropped: 0, tocBytes: 0 };
  let listed = 0;
  if (!isPackId(packId)) return { ...out, problem: 'not a pack id' };
  const it = scanStoredPack(repo.store, { packId, name: packObject(packId), size }, size, { keys: repo.keys });
  const next = () =>
    it.next().catch((e: NodeJS.ErrnoException) => {
      out.problem = `cannot be read (${e.code ?? e.message})`;
      return null;
    });
  let r = await next();
  for (; r && !r.done; r = await next()) {
    const item = r.value;
    if (item.kind === 'damaged') {
      out.problem = `damaged record at offset ${item.offset} (${item.problem})`;
      return out;
    }
    const length = RECORD_HEADER_SIZE + item.header.storedLength;
    if (item.kind !== 'meta' || item.record.type !== REC_TOC) listed += length;
    if (item.kind !== 'meta') continue;
    if (isLive(item.record, item.plainDigest, live)) {
      out.live.push({ offset: item.offset, length });
      out.liveBytes += length;
    } else if (item.record.type !== REC_TOC) {
      out.dropped++;
    }
  }
  if (!r) return out;
  // The index says `size` bytes are committed: a torn end inside them is damage, not a tail.
  if (r.value.tail) out.problem = `record cut off at offset ${r.value.end} (${r.value.tailProblem ?? 'pack shorter than committed'})`;
  else if (size < PACK_HEADER_SIZE) out.problem = 'pack header cut off';
  else out.tocBytes = size - PACK_HEADER_SIZE - listed;
  return out;
}

/**
 * The live metadata records of a pack, read again for copying: each checked (header CRC,
 * payload digest) so that bytes that changed since the scan are not copied as good.
 * Returns the records' bytes one after the other, or a problem.
 */
export async function readLiveMeta(repo: Repository, packId: string, scan: MetaScan): Promise<Buffer | string> {
  const parts: Buffer[] = [];
  for (const { offset, length } of scan.live) {
    const buf = Buffer.alloc(length);
    const got = await readRecordSpan(repo.store, packId, offset, length, buf);
    const h = got === length ? decodeRecordHeader(buf) : null;
    if (!h || RECORD_HEADER_SIZE + h.storedLength !== length || !createHash('sha256').update(buf.subarray(RECORD_HEADER_SIZE)).digest().equals(h.digest)) {
      return `the metadata record at offset ${offset} is damaged`;
    }
    parts.push(buf);
  }
  return Buffer.concat(parts);
}

/**
 * `genvault sync`: copy generations from one repository to another at the level of stored
 * records. For each generation the destination lacks (by generation id), oldest first per
 * image: its map leaves are read from the source, the chunks they name that the
 * destination lacks are looked up in batches, each record holding one is read from the
 * source pack, checked in full (check.ts) and appended unchanged to a destination pack
 * (a group record once, every member it lacks getting its entry), then the leaves the
 * destination lacks; then the destination commits the generation as a backup does
 * (endpoint.ts, local-destination.ts). Killed at any moment, a rerun finds what was
 * committed and copies the rest: the same end result.
 *
 * Both repositories must chunk alike and, encrypted, share their repository id and keys
 * (`genvault init --like`), so that identities, dedup and sealed records hold across the
 * copy; anything else is refused before anything is written.
 *
 * Test hooks (src/util/testhooks.ts), tool SYNC: GENVAULT_SYNC_TRACE=1 prints the phases
 * `flushed-N` (the Nth flush of chunk entries is committed), `commit` (a generation's map
 * and record are durable, its batch is next) and `committed-N` (the Nth generation is
 * visible); GENVAULT_SYNC_PAUSE_FILE waits at the point named by GENVAULT_SYNC_PAUSE_AT:
 * `flushed-N`, `before-commit` (the default) or `committed-N`. GENVAULT_SYNC_FLUSH_ENTRIES=N
 * flushes every N chunk entries instead of 65536 (cli/sync.ts), for kills between flushes.
 */
import { GenvaultError } from '../util/errors.js';
import { testPause, testTrace } from '../util/testhooks.js';
import { configMinAge, type RepoConfig } from '../format/config.js';
import { checkedLeaf } from '../format/chunkmap.js';
import type { ChunkLocation } from '../format/pack.js';
import type { Generation } from '../format/generation.js';
import { applyRetention, checkRules, type RetentionRules } from '../lifecycle/retention.js';
import { checkSourceRecord } from './check.js';
import type { PinnedGeneration, SyncDestination, SyncSource } from './endpoint.js';

export interface SyncOptions {
  /** Images to copy (default: all the source has). */
  names?: string[];
  /** Retention applied at the destination after the copy (null: none). */
  rules?: RetentionRules | null;
  /** Minimum age for the retention (default: the destination's guards.minAge). */
  minAgeMs?: number;
  dryRun?: boolean;
  now?: number;
  /** Bytes of images covered so far, of the total to copy. */
  onProgress?: (done: number, total: number) => void;
}

export interface SyncedGeneration {
  name: string;
  id: string;
  created: string;
  size: number;
}

export interface SyncResult {
  dryRun: boolean;
  /** Generations copied (dry run: that would be). */
  copied: SyncedGeneration[];
  /** Generations the destination has already (same id). */
  skipped: number;
  /** Of those, the ones whose tags or protection were brought up to the source's. */
  updated: number;
  /** Source generations not copied because the retention rules would remove them at once. */
  notKept: number;
  /** Generations forgotten at the source while the sync ran (not copied). */
  vanished: number;
  /** Chunks given index entries at the destination, and the stored bytes of their records. */
  chunks: number;
  chunkBytes: number;
  /** Map leaves copied. */
  leaves: number;
  /** Bytes read from the source and handed to the destination: chunk records and map leaves. */
  bytesSent: number;
  /** Bytes appended to the destination's packs (records, metadata, tables of contents). */
  storedAdded: number;
  /** Generations the retention rules removed at the destination (dry run: would). */
  pruned: SyncedGeneration[];
}

/** Chunk lookups and record copies are done this many map leaves at a time (bounded memory). */
const LEAVES_PER_BATCH = 32;
/** Record bytes sent to a served destination before waiting for its answers. */
const INFLIGHT_BYTES = 32 << 20;

/** Largest record a source may hand over (a group's 16 MiB and its member table, sealed, with room). */
const MAX_RECORD = 32 << 20;

const brief = (g: Generation): SyncedGeneration => ({ name: g.name, id: g.id, created: g.created, size: g.size });

function sameChunking(a: RepoConfig, b: RepoConfig): boolean {
  const x = a.chunking;
  const y = b.chunking;
  return x.algorithm === y.algorithm && x.block === y.block && x.min === y.min && x.max === y.max && x.maskBits === y.maskBits && x.segment === y.segment;
}

/**
 * Refuse, in one line, repositories between which stored records cannot be copied as
 * they are: different chunking, encryption or keys; a destination that keeps no metadata
 * in its packs (format 3 and older) or is older than the source (it might not read all the
 * source's records: group records, kind 2 map entries).
 */
export function checkCompatible(src: { description: string; config: RepoConfig }, dst: { description: string; config: RepoConfig }): void {
  const s = src.config;
  const d = dst.config;
  const like = `make the destination with 'genvault -r ${dst.description} init --like ${src.description}' (into an empty directory)`;
  if (!sameChunking(s, d)) throw new GenvaultError(`${dst.description} chunks differently from ${src.description}: sync copies stored records only between repositories made alike; ${like}`, 'INCOMPATIBLE');
  if (!!s.encryption !== !!d.encryption) {
    throw new GenvaultError(`${s.encryption ? src.description : dst.description} is encrypted and ${s.encryption ? dst.description : src.description} is not: sealed records cannot be copied as they are; ${like}`, 'INCOMPATIBLE');
  }
  if (s.encryption && (s.id !== d.id || s.encryption.keyCheck !== d.encryption!.keyCheck)) {
    throw new GenvaultError(`${dst.description} has other keys than ${src.description}: sealed records cannot be copied without them; ${like}`, 'INCOMPATIBLE');
  }
  if (d.version < 4) throw new GenvaultError(`${dst.description} is format ${d.version}, which keeps no metadata in its packs: run 'genvault upgrade' on it first`, 'INCOMPATIBLE');
  if (d.version < s.version) {
    throw new GenvaultError(`${dst.description} is format ${d.version}, older than ${src.description} (format ${s.version}): run 'genvault upgrade' on it first`, 'INCOMPATIBLE');
  }
}

/** What the copy loop counts. */
interface Counters {
  chunks: number;
  chunkBytes: number;
  leaves: number;
  leafBytes: number;
  done: number;
  total: number;
}

/** Decide what to copy: generations the destination lacks, less those the retention rules would remove at once. */
async function plan(src: SyncSource, dst: SyncDestination, opts: SyncOptions, now: number) {
  const srcGens = await src.generations(opts.names);
  const images = [...new Set(srcGens.map((g) => g.name))].sort();
  const dstGens = await dst.generations(images);
  const have = new Map(dstGens.map((g) => [g.id, g]));
  let candidates = srcGens.filter((g) => !have.has(g.id));
  let notKept = 0;
  /** Destination generations the rules would remove (what a dry run reports as pruned). */
  let prunable: Generation[] = [];
  if (opts.rules) {
    const minAgeMs = opts.minAgeMs ?? configMinAge(dst.config).ms;
    const keep = new Set(
      applyRetention([...dstGens, ...candidates], opts.rules, { now, minAgeMs })
        .filter((d) => d.keep)
        .map((d) => d.gen.id),
    );
    const before = candidates.length;
    candidates = candidates.filter((g) => keep.has(g.id));
    notKept = before - candidates.length;
    prunable = dstGens.filter((g) => !keep.has(g.id));
  }
  const existing = srcGens.filter((g) => have.has(g.id)).map((g) => ({ src: g, dst: have.get(g.id)! }));
  return { images, candidates, existing, notKept, prunable };
}

function stateDiffers(a: Generation, b: Generation): boolean {
  return Boolean(a.protected) !== Boolean(b.protected) || a.tags.length !== b.tags.length || a.tags.some((t, i) => t !== b.tags[i]);
}

export async function sync(src: SyncSource, dst: SyncDestination, opts: SyncOptions = {}): Promise<SyncResult> {
  checkCompatible(src, dst);
  // Same id and key check (checked above): the destination's index keys read the source's index.
  if (dst.indexKeys) src.adoptIndexKeys?.(dst.indexKeys);
  if (opts.rules) checkRules(opts.rules);
  const now = opts.now ?? Date.now();
  const p = await plan(src, dst, opts, now);
  const res: SyncResult = {
    dryRun: opts.dryRun === true,
    copied: [],
    skipped: p.existing.length,
    updated: 0,
    notKept: p.notKept,
    vanished: 0,
    chunks: 0,
    chunkBytes: 0,
    leaves: 0,
    bytesSent: 0,
    storedAdded: 0,
    pruned: [],
  };
  const changed = p.existing.filter((e) => stateDiffers(e.src, e.dst));
  if (opts.dryRun) {
    res.copied = p.candidates.map(brief);
    res.updated = changed.length;
    res.pruned = p.prunable.map(brief);
    return res;
  }
  const c: Counters = { chunks: 0, chunkBytes: 0, leaves: 0, leafBytes: 0, done: 0, total: p.candidates.reduce((a, g) => a + g.size, 0) };
  await dst.begin();
  try {
    let committed = 0;
    for (const name of p.images) {
      const gens = p.candidates.filter((g) => g.name === name);
      if (!gens.length) continue;
      await dst.lockImage(name);
      for (const g of gens) {
        const pinned = await src.pin(g);
        if (!pinned) {
          res.vanished++;
          c.done += g.size;
          continue;
        }
        try {
          await copyGeneration(src, dst, pinned, c, opts);
          if (await dst.commitGeneration(pinned.gen, pinned.top)) res.copied.push(brief(pinned.gen));
          else res.skipped++;
        } finally {
          await pinned.release();
        }
        testTrace('sync', `committed-${++committed}`);
        await testPause('sync', `committed-${committed}`, 'before-commit');
      }
      await dst.unlockImage();
    }
    await dst.end();
  } catch (e) {
    await dst.abort();
    throw e;
  }
  for (const e of changed) if (await dst.updateState(e.dst, { tags: e.src.tags, protected: e.src.protected === true })) res.updated++;
  res.chunks = c.chunks;
  res.chunkBytes = c.chunkBytes;
  res.leaves = c.leaves;
  res.bytesSent = c.chunkBytes + c.leafBytes;
  res.storedAdded = dst.storedBytes;
  if (opts.rules) {
    // Only images the destination has (prune refuses a name it does not know).
    const present = [...new Set((await dst.generations(p.images)).map((g) => g.name))];
    res.pruned = (await dst.prune(present, opts.rules, { minAgeMs: opts.minAgeMs })).map(brief);
  }
  return res;
}

/** Copy what the destination lacks of one generation's chunks and leaves (the commit is the caller's). */
async function copyGeneration(src: SyncSource, dst: SyncDestination, p: PinnedGeneration, c: Counters, opts: SyncOptions): Promise<void> {
  const label = `${p.gen.name}@${p.gen.id}`;
  const seenLeaves = new Set<string>();
  for (let i = 0; i < p.refs.length; i += LEAVES_PER_BATCH) {
    const refs = p.refs.slice(i, i + LEAVES_PER_BATCH).filter((r) => {
      const k = r.digest.toString('binary');
      if (seenLeaves.has(k)) return false;
      seenLeaves.add(k);
      return true;
    });
    const covered = p.refs.slice(i, i + LEAVES_PER_BATCH).reduce((a, r) => a + r.bytes, 0);
    if (refs.length) {
      const bytes = await src.leaves(refs.map((r) => r.digest));
      const chunks = new Map<string, Buffer>();
      refs.forEach((r, k) => {
        let leaf;
        try {
          leaf = checkedLeaf(bytes[k]!, r.digest, r);
        } catch (e) {
          throw new GenvaultError(`source damaged: map leaf ${r.digest.toString('hex')} of ${label}: ${(e as Error).message}`, 'DAMAGED');
        }
        for (let j = 0; j < leaf.lengths.length; j++) {
          if (leaf.zero[j]) continue;
          const d = leaf.digests.subarray(j * 32, j * 32 + 32);
          chunks.set(d.toString('binary'), Buffer.from(d));
        }
      });
      await copyChunks(src, dst, [...chunks.values()], c, label);
      const lacking = await dst.lackingLeaves(refs.map((r) => r.digest));
      const put = refs.map((r, k) => ({ digest: r.digest, bytes: bytes[k]! })).filter((_, k) => lacking[k]);
      await dst.putLeaves(put);
      c.leaves += put.length;
      c.leafBytes += put.reduce((a, l) => a + l.bytes.length, 0);
    }
    c.done += covered;
    opts.onProgress?.(c.done, c.total);
  }
}

/** Copy the records of the chunks the destination lacks, each record once, checked. */
async function copyChunks(src: SyncSource, dst: SyncDestination, digests: Buffer[], c: Counters, label: string): Promise<void> {
  if (!digests.length) return;
  const lacking = await dst.lackingChunks(digests);
  const need = digests.filter((_, k) => lacking[k]);
  if (!need.length) return;
  const locs = await src.locate(need);
  const records = new Map<string, { loc: ChunkLocation; digest: Buffer }>();
  need.forEach((d, k) => {
    const loc = locs[k];
    if (!loc) throw new GenvaultError(`source damaged: chunk ${d.toString('hex')} of ${label} has no index entry (run 'genvault verify' on the source)`, 'DAMAGED');
    const key = `${loc.packId}:${loc.offset}`;
    if (!records.has(key)) records.set(key, { loc, digest: d });
  });
  const inflight: Promise<void>[] = [];
  let inflightBytes = 0;
  // In pack order: reads go forward through each source pack.
  const order = [...records.values()].sort((a, b) => (a.loc.packId < b.loc.packId ? -1 : a.loc.packId > b.loc.packId ? 1 : a.loc.offset - b.loc.offset));
  for (const { loc, digest } of order) {
    if (loc.storedLength > MAX_RECORD) throw new GenvaultError(`source damaged: the index entry of chunk ${digest.toString('hex')} of ${label} names a record of ${loc.storedLength} bytes`, 'DAMAGED');
    let rec: Buffer;
    try {
      rec = await src.readRecord(loc);
    } catch (e) {
      throw new GenvaultError(`source damaged: cannot read pack ${loc.packId} for ${label}: ${(e as Error).message}`, 'DAMAGED');
    }
    if (dst.copyRecord) {
      // A served destination: records stream, several in flight (it takes them in order).
      const sent = dst.copyRecord(rec, loc, digest).then((n) => {
        if (!n) return;
        c.chunks += n;
        c.chunkBytes += rec.length;
      });
      sent.catch(() => undefined); // its failure is thrown by the Promise.all that waits for it
      inflight.push(sent);
      inflightBytes += rec.length;
      if (inflightBytes > INFLIGHT_BYTES) {
        await Promise.all(inflight.splice(0));
        inflightBytes = 0;
      }
      continue;
    }
    const members = checkSourceRecord(rec, loc, digest, dst.keys);
    // Entries for every chunk of the record the destination lacks (a group's other members too).
    const want = members.length > 1 ? await dst.lackingChunks(members.map((m) => m.digest)) : [true];
    const put = members.filter((_, k) => want[k]);
    if (!put.length) continue; // an earlier group of this batch held it
    await dst.putRecord(rec, put);
    c.chunks += put.length;
    c.chunkBytes += rec.length;
  }
  await Promise.all(inflight);
}


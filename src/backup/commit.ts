/**
 * The end of a run. A run that read its whole source commits its generation in one atomic
 * index batch, after everything the generation references is durable (packs fsynced, their
 * chunk entries and the map leaves committed by the flushes). A run that failed commits
 * nothing: it removes what it wrote but never committed.
 */
import { randomBytes } from 'node:crypto';
import { GenvaultError, describeFsError } from '../util/errors.js';
import { damagedKey, leafKey } from '../format/keys.js';
import { REC_GENERATION, REC_GENMAP, REC_LEAF, encodeMetaRecord } from '../format/meta.js';
import { encodeTop, type LeafRef } from '../format/chunkmap.js';
import type { Generation } from '../format/generation.js';
import { testTrace } from '../util/testhooks.js';
import { Repository } from '../repository/repository.js';
import type { MapBuilder } from './map-builder.js';
import type { PackSink, PutOp } from './packs.js';
import { hook, type BackupRun } from './run.js';

/**
 * What the commit batch puts: the generation's record (as JSON, the exact bytes stored
 * under `g` and, in format 4, in its record in a pack), its map's top level, and the `p`
 * entry of the pack holding those records.
 */
export interface Commit {
  gen: Generation;
  json: Buffer;
  top: Buffer;
  /** The map's leaves, in order (the top level decoded). */
  refs: LeafRef[];
  packOps: PutOp[];
}

/** The generation's record, for what the run read. */
export function generationRecord(run: BackupRun, map: MapBuilder): Commit {
  const { cfg, stats, prev } = run;
  stats.durationMs = Date.now() - run.started;
  const gen: Generation = {
    id: randomBytes(8).toString('hex'),
    name: run.name,
    created: new Date().toISOString(),
    size: stats.bytesRead,
    chunking: { block: cfg.chunking.block, min: cfg.chunking.min, max: cfg.chunking.max, maskBits: cfg.chunking.maskBits },
    leaves: map.refs.length,
    tags: run.opts.tags ?? [],
    source: run.source.description,
    parent: prev?.id ?? null,
    stats,
  };
  if (prev && Date.parse(gen.created) <= Date.parse(prev.created)) {
    // Keep creation times strictly increasing per image (clock steps, fast runs).
    gen.created = new Date(Date.parse(prev.created) + 1).toISOString();
  }
  return { gen, json: Buffer.from(JSON.stringify(gen)), top: encodeTop(map.refs), refs: map.refs, packOps: [] };
}

/** Leaf records are appended this many at a time when a run catches up (bounded memory). */
const LEAVES_PER_APPEND = 256;

/**
 * Format 4: the generation's map and record written into a pack of their own and synced,
 * so they are durable before the commit batch (which carries the pack's `p` size). With
 * `allLeaves`, first a leaf record for every leaf of the map: see catchUpAfterUpgrade.
 */
export async function writeGenerationRecords(run: BackupRun, sink: PackSink, c: Commit, allLeaves = false): Promise<void> {
  run.repo.assertStoreLock(`backup of ${c.gen.name}`); // before the generation's pack reaches the store
  await sink.generationPack();
  if (allLeaves) await writeAllLeaves(run, sink, c.refs);
  const recs = Buffer.concat([
    encodeMetaRecord({ type: REC_GENMAP, id: c.gen.id, top: c.top }, run.repo.keys),
    encodeMetaRecord({ type: REC_GENERATION, generation: c.gen, json: c.json }, run.repo.keys),
  ]);
  c.packOps = [await sink.finalRecords(recs)];
}

async function writeAllLeaves(run: BackupRun, sink: PackSink, refs: LeafRef[]): Promise<void> {
  const unique = new Map<string, Buffer>();
  for (const r of refs) unique.set(r.digest.toString('hex'), r.digest);
  const digests = [...unique.values()];
  for (let i = 0; i < digests.length; i += LEAVES_PER_APPEND) {
    const part = digests.slice(i, i + LEAVES_PER_APPEND);
    const leaves = await run.repo.db.getMany(part.map((d) => leafKey(d)));
    const recs = leaves.map((l, k) => {
      // Every leaf of the map was committed by the run's flushes (or found in the index).
      if (!l) throw new GenvaultError(`map leaf ${part[k]!.toString('hex')} is missing from the index`, 'DAMAGED');
      return encodeMetaRecord({ type: REC_LEAF, leaf: Buffer.from(l) }, run.repo.keys);
    });
    await sink.appendRecords(Buffer.concat(recs));
  }
}

/**
 * A run that decided on format 3 (config.json said 3 when it registered) asks again just
 * before its commit: if `genvault upgrade` has made the repository format 4 meanwhile, the
 * upgrade may not have seen this run's leaves and will not see its generation (an upgrade
 * killed before it waited for the writers), so the run writes records for all of its map's
 * leaves, not only those it put, then the map and the record.
 */
export async function catchUpAfterUpgrade(run: BackupRun, sink: PackSink, c: Commit): Promise<void> {
  if (run.meta || (await Repository.readConfig(run.repo.dir)).version < 4) return;
  run.meta = true;
  await writeGenerationRecords(run, sink, c, true);
}

/**
 * The one atomic commit that makes the generation visible (and clears the damage marks of
 * chunks it stored again: their index entries now point to the fresh copies); then the
 * run's packs are closed and its registration released.
 */
export async function commitGeneration(run: BackupRun, c: Commit): Promise<void> {
  const { repo, opts } = run;
  const commit = () =>
    repo.db.batch([
      ...run.healed.map((d) => ({ type: 'del' as const, key: damagedKey(Buffer.from(d, 'binary')) })),
      ...c.packOps,
      { type: 'put', key: Repository.mapKey(c.gen.id), value: c.top },
      { type: 'put', key: repo.generationKey(c.gen), value: repo.genIndex.value(c.gen, c.json) },
    ], { sync: true } as object);
  testTrace('backup', 'commit');
  repo.assertStoreLock(`backup of ${c.gen.name}`);
  await (opts.commit ? opts.commit(commit) : commit());
  await hook('committed');
  await closePacks(run);
  await run.writer!.release();
  run.writer = null;
}

async function closePacks(run: BackupRun): Promise<void> {
  for (const p of run.packs) await p.close().catch(() => undefined);
}

/**
 * After a failure: close the packs and remove what this run wrote but never committed
 * (committed chunks stay for reuse). If that fails (the index went with the disk), the
 * registration stays: the next writer, finding this process gone, does it. Returns the
 * error to throw, naming the backup.
 */
export async function abort(run: BackupRun, e: unknown): Promise<Error> {
  await closePacks(run);
  const { repo, writer } = run;
  if (writer) {
    const { trimPacks } = await import('../repository/locks.js');
    const trimmed = await trimPacks(repo.store, repo.db, writer.record.packs).then(() => true, () => false);
    if (trimmed) await writer.release().catch(() => undefined);
  }
  if (e instanceof GenvaultError) return new GenvaultError(`backup of ${run.name} failed: ${e.message}`, e.code, e.exitCode);
  return describeFsError(e, `backup of ${run.name} failed`);
}

/**
 * The end of a run. A run that read its whole source commits its generation in one atomic
 * index batch, after everything the generation references is durable (packs fsynced, their
 * chunk entries and the map leaves committed by the flushes). A run that failed commits
 * nothing: it removes what it wrote but never committed.
 */
import { randomBytes } from 'node:crypto';
import { GenvaultError, describeFsError } from '../util/errors.js';
import { damagedKey } from '../format/keys.js';
import { encodeTop } from '../format/chunkmap.js';
import type { Generation } from '../format/generation.js';
import { testTrace } from '../util/testhooks.js';
import { Repository } from '../repository/repository.js';
import type { MapBuilder } from './map-builder.js';
import { hook, type BackupRun } from './run.js';

/** The generation's record, for what the run read. */
export function generationRecord(run: BackupRun, map: MapBuilder): Generation {
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
  return gen;
}

/**
 * The one atomic commit that makes the generation visible (and clears the damage marks of
 * chunks it stored again: their index entries now point to the fresh copies); then the
 * run's packs are closed and its registration released.
 */
export async function commitGeneration(run: BackupRun, gen: Generation, map: MapBuilder): Promise<void> {
  const { repo, opts } = run;
  const commit = () =>
    repo.db.batch([
      ...run.healed.map((d) => ({ type: 'del' as const, key: damagedKey(Buffer.from(d, 'binary')) })),
      { type: 'put', key: Repository.mapKey(gen.id), value: encodeTop(map.refs) },
      { type: 'put', key: Repository.generationKey(gen), value: Buffer.from(JSON.stringify(gen)) },
    ], { sync: true } as object);
  testTrace('backup', 'commit');
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

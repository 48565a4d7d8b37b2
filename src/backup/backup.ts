/**
 * The backup pipeline:
 *
 *   [worker] read segment, chunk + hash -> dedup lookup -> [worker] zstd -> pack append
 *
 * Segments go into a fixed set of shared buffers (bounded memory), several in flight.
 * Files and block devices are read by the workers themselves, which chunk and hash along
 * (BLAKE3 against the parent generation, SHA-256 for what changed); streams and SSH
 * sources are read here, one segment after the other. Dedup asks, in order: the previous
 * generation of the image at the same offset (a next-day backup resolves nearly every
 * chunk there without touching the index), the chunks this run already wrote, then the
 * index.
 *
 * Durability: index entries for new chunks are committed only after their pack data
 * is fsynced, in batches (bounding memory), and the generation itself in one final
 * atomic batch after everything it references is durable. A run that dies leaves no
 * visible generation; its uncommitted pack tails are removed by the next writer. In
 * format 4 the packs also get the run's new map leaves (each flush) and, at the end, the
 * generation's map and record (FORMAT.md, "Version 4"), synced before the batch that
 * puts the same bytes into the index.
 *
 * The steps, one file each: run.ts (the run's state and its plan), reader.ts (read and
 * chunk segments), dedup.ts (which chunks are new), map-builder.ts (the generation's
 * chunk map), packs.ts (compress, append, flush), commit.ts (commit or clean up).
 */
import { GenvaultError, isNoSpace } from '../util/errors.js';
import { checkImageName } from '../format/config.js';
import type { Generation } from '../format/generation.js';
import { ImageLock } from '../repository/locks.js';
import type { Repository } from '../repository/repository.js';
import type { Source } from './source.js';
import { BufferPool, DEPTH } from './buffer-pool.js';
import { abort, catchUpAfterUpgrade, commitGeneration, generationRecord, writeGenerationRecords } from './commit.js';
import { Dedup } from './dedup.js';
import { MapBuilder } from './map-builder.js';
import { PackSink } from './packs.js';
import { SegmentReader } from './reader.js';
import { BackupRun, hook, type BackupOptions } from './run.js';

export type { BackupOptions } from './run.js';

/** backup() consumes ChunkedSource.readSegment: only chunks the repository lacks are transferred. */
export const SUPPORTS_CHUNKED_SOURCES = true;

/*
 * Test hooks (src/util/testhooks.ts; hook() in run.ts), for the crash loop and gc's race
 * tests: with GENVAULT_BACKUP_PAUSE_FILE set, a backup waits while that file exists at the
 * point named by GENVAULT_BACKUP_PAUSE_AT:
 * - 'flushed-N': the index batch of its Nth flush has returned (pack synced, its chunk
 *   entries and leaves committed; flushes happen when a pack is full and once at the end);
 * - 'before-commit' (the default): the whole source is read, every chunk looked up and
 *   made durable, the generation not yet committed (the moment a concurrent gc must wait for);
 *   in format 4 its map and record are in its pack, synced, beyond the committed size;
 * - 'committed': the generation is committed; its packs are not yet closed, its
 *   registration and image lock still held.
 * GENVAULT_BACKUP_TRACE=1 prints 'backup-trace: commit' just before the batch that commits
 * the generation.
 */

export async function backup(repo: Repository, source: Source, opts: BackupOptions): Promise<Generation> {
  repo.requireWritable('a backup');
  const name = checkImageName(opts.name);
  try {
    return await backupImage(repo, source, opts, name);
  } catch (e) {
    // A full file system, wherever it struck (a pack, the index, a lock file): one line
    // about the repository. What was written is trimmed (or left to the next writer).
    if (isNoSpace(e)) throw new GenvaultError(`${repo.dir}: no space left on device (backup of ${name} failed; nothing was committed)`, 'ENOSPC');
    throw e;
  }
}

async function backupImage(repo: Repository, source: Source, opts: BackupOptions, name: string): Promise<Generation> {
  const run = new BackupRun(repo, source, opts, name);
  const lock = opts.lock ?? (await ImageLock.acquire(repo.dir, name, opts.wait ?? false, repo.imageLockName(name)));
  try {
    await run.plan();
    const map = new MapBuilder(run.cfg);
    const segBufs = new BufferPool(DEPTH, run.cfg.chunking.segment);
    const sink = new PackSink(run, map, segBufs);
    const ours = (ds: string) => sink.ours(ds);
    const reader = new SegmentReader(run, segBufs, ours);
    const dedup = new Dedup(run, ours, reader.requested);
    reader.start();
    await backupSegments(run, reader, dedup, map, sink);
    await sink.drain();
    await reader.drain();
    checkComplete(run);
    map.finish();
    await sink.flush();
    const commit = generationRecord(run, map);
    if (run.meta) await writeGenerationRecords(run, sink, commit);
    await hook('before-commit');
    await catchUpAfterUpgrade(run, sink, commit);
    await commitGeneration(run, commit);
    return commit.gen;
  } catch (e) {
    throw await abort(run, e);
  } finally {
    if (!opts.lock) await lock.release().catch(() => undefined);
  }
}

/**
 * The main loop: each segment in image order, as the reader delivers it chunked, through
 * dedup into the map, its new chunks handed on to be compressed and appended to a pack.
 */
async function backupSegments(run: BackupRun, reader: SegmentReader, dedup: Dedup, map: MapBuilder, sink: PackSink): Promise<void> {
  const { stats } = run;
  let segOffset = 0;
  for (;;) {
    const seg = await reader.next();
    if (!seg) break;
    const chunks = await seg.res;
    if (run.fastDetect) stats.unchangedBytes = (stats.unchangedBytes ?? 0) + (chunks.unchanged ?? 0);
    const { entryDigest, newIdx } = await dedup.lookup(seg, chunks, segOffset);
    map.addSegment(chunks.table, entryDigest, chunks.fast, chunks.hasFast);
    if (chunks.records) sink.storeRecords(seg, entryDigest, newIdx, chunks.records);
    else await sink.store(seg, chunks.table, entryDigest, newIdx);
    segOffset += seg.len;
  }
}

/** After the main loop and every stage beside it: throws their failure, or a source that was cut short. */
function checkComplete(run: BackupRun): void {
  const { source, stats } = run;
  if (run.failure) throw run.failure;
  if (source.size !== null && stats.bytesRead !== source.size) {
    throw new GenvaultError(`source ended after ${stats.bytesRead} of ${source.size} bytes`, 'SHORT_READ');
  }
}

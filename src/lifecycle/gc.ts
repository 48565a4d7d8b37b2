/**
 * Garbage collection: remove the chunks and map leaves no generation references and give
 * their pack space back, while backups keep running (the protocol is in FORMAT.md,
 * "Garbage collection"). In short:
 *
 *   lock      locks/gc.json (GcLock), a writer registration of our own
 *   recover   leftovers of a gc that died: 'y' leaves put back, 'x' keys resolved
 *   mark      every chunk and leaf the generations reference
 *   condemn   'x' + digest = current location, for every unreferenced 'c' entry; backups
 *             that start from now on store fresh copies of those chunks
 *   wait      for the writers that were running when condemning ended (they may have
 *             reused a condemned chunk before its 'x' key existed)
 *   re-mark   condemned chunks referenced now (generations committed meanwhile) are spared
 *   sweep     'c' entries still at their condemned location are deleted; a backup commit
 *             landing in the middle of a batch undoes that batch (see sweepChunks)
 *   leaves    unreferenced leaves are removed, only while no backup runs (see sweepLeaves)
 *   repack    packs with no live record are deleted; packs mostly dead are rewritten
 *             (format 4: a pack's live metadata records are copied with its live chunks,
 *             and count as live bytes; see gc-meta.ts)
 *   finish    the 'x' keys of swept chunks are deleted, locks released
 *
 * Crash safety: a pack is unlinked only after no 'c' entry points into it; everything else
 * a dead gc leaves behind is finished or undone by the next one (recoverLeftovers) or by
 * cleanupDeadWriters (uncommitted repack output, packs whose 'p' entry was deleted).
 */
import { TOC_FROM_VERSION } from '../format/toc.js';
import fs from 'node:fs/promises';
import path from 'node:path';
import { GenvaultError, REPAIR_HINT, describeFsError } from '../util/errors.js';
import { bytes } from '../util/format.js';
import { testPause as hookPause, testTrace } from '../util/testhooks.js';
import { ownerAlive } from '../util/proc.js';
import { LeafRef, checkedLeaf, checkedTop, decodeTop } from '../format/chunkmap.js';
import { damagedSet, getManyInKeyOrder, getOrNull, slices } from '../index/db.js';
import { K_CHUNK, K_CONDEMNED, K_GEN, K_GENMAP, K_LEAF, K_MOVED_LEAF, K_PACK, chunkKey, condemnedKey, damagedKey, key, leafKey, movedLeafKey, packKey, packSizeOf } from '../format/keys.js';
import { GcLock, WriterRegistration, cleanupDeadWriters, liveWriters, pinnedGenerations, trimPacks } from '../repository/locks.js';
import { COMP_GROUP, PACK_HEADER_SIZE, RECORD_HEADER_SIZE, checkRecord, decodeLocation, encodeLocation, isLocation, locationOffset, packObject, PACK_ID_BYTES, recordShare } from '../format/pack.js';
import { PackWriter } from '../store/pack-writer.js';
import { listPacks, readRecordSpan } from '../store/pack-reader.js';
import { Repository } from '../repository/repository.js';
import { MarkSet, placeKey } from '../util/mark-set.js';
import { Spill } from '../util/spill.js';
import { exposeGc, heapGuard } from '../util/heap.js';
import { type MetaLiveness, type MetaScan, readLiveMeta, readLiveness, scanMeta } from './gc-meta.js';

export interface GcOptions {
  dryRun?: boolean;
  /**
   * Rewrite packs whose live records are under this percentage of their committed data
   * (default 50; 0 never rewrites, 100 rewrites every pack holding any dead record).
   */
  repackThreshold?: number;
  /** One line describing what gc is doing now (phase changes and periodic updates). */
  onProgress?: (line: string) => void;
  /** Poll interval while waiting for running backups (ms). */
  pollMs?: number;
  /**
   * An object store: packs written less than this long ago (by the store's clock) are
   * neither deleted nor rewritten (default 1 hour). A writer whose lock went stale (a host
   * paused past the lock's 30 minutes) may still commit a generation into them.
   */
  graceMs?: number;
}

/** See GcOptions.graceMs. */
export const OBJECT_STORE_GRACE_MS = 3600_000;

export interface GcResult {
  dryRun: boolean;
  generations: number;
  /** Distinct data chunks and map leaves the generations reference. */
  referencedChunks: number;
  referencedLeaves: number;
  /** Index entries removed (dry run: that would be), and their stored bytes (records with headers). */
  chunksRemoved: number;
  chunkBytesRemoved: number;
  /** Condemned, then referenced by a generation committed while gc ran: kept. */
  chunksSpared: number;
  /** Condemned and unreferenced, but a backup committed during their batch: kept for the next gc. */
  chunksDeferred: number;
  leavesRemoved: number;
  /** Unreferenced leaves kept because backups were running (removed by a later gc). */
  leavesDeferred: number;
  packsDeleted: number;
  packsRepacked: number;
  packsWritten: number;
  /** Live record bytes copied into new packs (chunk and metadata records). */
  bytesCopied: number;
  /**
   * Format 4: metadata records found in the packs deleted or rewritten, copied into a new
   * pack (kept) or left behind because nothing needs them any more (dropped).
   */
  metadataKept: number;
  metadataDropped: number;
  /** Pack file bytes given back (dry run: an estimate). */
  bytesFreed: number;
  /** Running backups gc waited for before sweeping. */
  waitedFor: number;
  /** An object store: unfinished multipart uploads aborted and spool files removed (writers killed mid-upload). */
  uploadsAborted: number;
  spoolsRemoved: number;
  /** An object store: packs kept whole because they are younger than the grace period. */
  packsTooYoung: number;
  /** Leftovers of an earlier gc that died: 'c' entries and leaves put back. */
  recovered: { chunks: number; leaves: number; condemned: number };
  warnings: string[];
  durationMs: number;
}

const BATCH = 2048;
/**
 * Writes that no reader waits for between batches (condemning, finishing) go in larger
 * batches: each is one LevelDB write and one sync, and a request to the leader when
 * another process leads the index.
 */
const WRITE_BATCH = 16384;
const LEAF_BATCH = 256;
const SYNC = { sync: true } as object;
const WINDOW = 8 << 20;
const MAX_GAP = 256 << 10;

type Op = { type: 'put'; key: Buffer; value: Buffer } | { type: 'del'; key: Buffer };

const bin = (b: Uint8Array): string => Buffer.from(b.buffer, b.byteOffset, b.byteLength).toString('latin1');
const prefixRange = (prefix: number) => ({ gte: Buffer.of(prefix), lt: Buffer.of(prefix + 1) });

let guard: (() => void) | null = null;
/** Called once per batch of every pass: collects the heap past 64 MiB of growth (util/heap.ts). */
const keepHeapSmall = (): void => (guard ??= heapGuard())();
/**
 * A pass over every key with a prefix: entries fetched from LevelDB 1 MiB at a time (not
 * classic-level's 16 KiB), and the blocks read not kept in its cache, which a pass would
 * only flush. Options a process that is not the index's leader cannot pass are ignored.
 */
const pass = (prefix: number) => ({ ...prefixRange(prefix), highWaterMarkBytes: 1 << 20, fillCache: false });
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function emptyResult(dryRun: boolean): GcResult {
  return {
    dryRun,
    generations: 0,
    referencedChunks: 0,
    referencedLeaves: 0,
    chunksRemoved: 0,
    chunkBytesRemoved: 0,
    chunksSpared: 0,
    chunksDeferred: 0,
    leavesRemoved: 0,
    leavesDeferred: 0,
    packsDeleted: 0,
    packsRepacked: 0,
    packsWritten: 0,
    bytesCopied: 0,
    metadataKept: 0,
    metadataDropped: 0,
    bytesFreed: 0,
    waitedFor: 0,
    uploadsAborted: 0,
    spoolsRemoved: 0,
    packsTooYoung: 0,
    recovered: { chunks: 0, leaves: 0, condemned: 0 },
    warnings: [],
    durationMs: 0,
  };
}

/** Test hook (src/util/testhooks.ts): GENVAULT_GC_TRACE=1 prints each phase on stderr. */
function trace(phase: string): void {
  testTrace('gc', phase);
}

function damaged(what: string): GenvaultError {
  return new GenvaultError(`index damaged: ${what}; gc removes nothing until 'genvault verify' finds no damage (${REPAIR_HINT})`, 'DAMAGED');
}

interface Marks {
  /** Referenced data chunks (errs only towards "referenced": util/mark-set.ts). */
  chunks: MarkSet;
  leaves: Set<string>;
  generations: number;
}

/** Every data chunk and map leaf referenced by the generations that exist now (chunks into `reuse`, emptied first, when given). */
async function mark(repo: Repository, report: (line: string) => void, label: string, reuse?: MarkSet): Promise<Marks> {
  reuse?.clear();
  const chunks = reuse ?? new MarkSet();
  const leaves = new Set<string>();
  const gens = await repo.generations(undefined, true); // pinned removed ones too
  if (repo.damagedRecords) throw damaged(`${repo.damagedRecords} generation record(s) are corrupt`);
  let n = 0;
  for (const g of gens) {
    n++;
    const top = await getOrNull(repo.db, Repository.mapKey(g.id));
    if (!top) {
      if (await getOrNull(repo.db, repo.generationKey(g))) throw damaged(`the map of ${g.name}@${g.id} is missing`);
      continue; // removed meanwhile by forget or prune
    }
    let refs;
    try {
      refs = checkedTop(top, g);
    } catch (e) {
      throw damaged(`the map of ${g.name}@${g.id} is corrupt: ${(e as Error).message}`);
    }
    // Leaves are content-addressed: a leaf already marked contributes the same chunks again.
    // A leaf that decoded but was wrong would mark the wrong chunks and let the sweep delete
    // live ones: every leaf is checked against its digest and its map entry first.
    const todo: LeafRef[] = [];
    for (const r of refs) {
      const s = bin(r.digest);
      if (leaves.has(s)) continue;
      leaves.add(s);
      todo.push(r);
    }
    for (let at = 0; at < todo.length; at += 256) {
      keepHeapSmall();
      const part = todo.slice(at, at + 256);
      const vals = await repo.db.getMany(part.map((r) => leafKey(r.digest)));
      part.forEach((r, k) => {
        const v = vals[k];
        const d = r.digest;
        if (!v) throw damaged(`map leaf ${d.toString('hex')} of ${g.name}@${g.id} is missing`);
        let leaf;
        try {
          leaf = checkedLeaf(v, d, r);
        } catch (e) {
          throw damaged(`map leaf ${d.toString('hex')} of ${g.name}@${g.id} is corrupt: ${(e as Error).message}`);
        }
        for (let c = 0; c < leaf.lengths.length; c++) {
          if (!leaf.zero[c]) chunks.add(leaf.digests, c * 32);
        }
      });
    }
    report(`gc: ${label}: generation ${n}/${gens.length}, ${chunks.size} chunks in use`);
  }
  return { chunks, leaves, generations: gens.length };
}

/** Committed size of every pack with a 'p' entry. */
async function packSizes(repo: Repository): Promise<Map<string, number>> {
  const out = new Map<string, number>();
  for await (const [k, v] of repo.db.iterator(prefixRange(K_PACK))) {
    if (k.length !== 1 + PACK_ID_BYTES) continue; // not a pack key: nothing to name a file by
    try {
      out.set(k.toString('hex', 1), packSizeOf(v));
    } catch {
      /* a corrupt pack record: verify reports it; gc leaves that pack alone */
    }
  }
  return out;
}

/** All 'p' entries as one string: it changes whenever a writer commits chunk entries. */
async function packFingerprint(repo: Repository): Promise<string> {
  const parts: string[] = [];
  for await (const [k, v] of repo.db.iterator(prefixRange(K_PACK))) parts.push(`${k.toString('hex')}=${v.toString('latin1')}`);
  return parts.join('\n');
}

async function generationKeys(repo: Repository): Promise<Set<string>> {
  const out = new Set<string>();
  for await (const k of repo.db.keys(prefixRange(K_GEN))) out.add(bin(k));
  return out;
}

/** A writer registration's file is there (locks/ are plain files, outside the store). */
async function lockFileExists(file: string): Promise<boolean> {
  return fs.stat(file).then(
    () => true,
    () => false,
  );
}

/** A pack's size in the store; null when it is missing or cannot be looked at. */
async function packFileSize(repo: Repository, id: string): Promise<number | null> {
  return repo.store.stat(packObject(id)).then(
    (st) => st?.size ?? null,
    () => null,
  );
}

/**
 * Finish or undo what a gc that died left in the index:
 * - 'y' (leaves being removed): put back under 'l' (identical bytes; an unreferenced leaf
 *   is removed again by this run).
 * - 'x' (condemned): if the 'c' entry is gone, the dead gc deleted it in a sweep batch it
 *   may not have checked; put it back when its pack still holds the record (a pack is
 *   deleted only after its records are unreferenced, so otherwise nothing can need it).
 */
async function recoverLeftovers(repo: Repository, res: GcResult): Promise<void> {
  let ops: Op[] = [];
  for await (const [k, v] of repo.db.iterator(prefixRange(K_MOVED_LEAF))) {
    ops.push({ type: 'put', key: leafKey(k.subarray(1)), value: Buffer.from(v) }, { type: 'del', key: Buffer.from(k) });
    res.recovered.leaves++;
    if (ops.length >= BATCH) {
      await repo.db.batch(ops, SYNC);
      ops = [];
    }
  }
  if (ops.length) await repo.db.batch(ops, SYNC);
  const sizes = await packSizes(repo);
  let pending: Array<[Buffer, Buffer]> = [];
  const flush = async () => {
    const cur = await repo.db.getMany(pending.map(([d]) => chunkKey(d)));
    const batch: Op[] = [];
    pending.forEach(([d, loc], i) => {
      if (!cur[i] && isLocation(loc)) {
        const l = decodeLocation(loc);
        const size = sizes.get(l.packId);
        if (size !== undefined && l.offset + RECORD_HEADER_SIZE + l.storedLength <= size) {
          batch.push({ type: 'put', key: chunkKey(d), value: loc });
          res.recovered.chunks++;
        }
      }
      batch.push({ type: 'del', key: condemnedKey(d) });
      res.recovered.condemned++;
    });
    await repo.db.batch(batch, SYNC);
    pending = [];
  };
  for await (const [k, v] of repo.db.iterator(prefixRange(K_CONDEMNED))) {
    pending.push([Buffer.from(k.subarray(1)), Buffer.from(v)]);
    if (pending.length >= BATCH) await flush();
  }
  if (pending.length) await flush();
}

export async function gc(repo: Repository, opts: GcOptions = {}): Promise<GcResult> {
  const threshold = opts.repackThreshold ?? 50;
  if (!(threshold >= 0 && threshold <= 100)) throw new GenvaultError(`repack threshold must be 0-100, not ${threshold}`, 'USAGE', 2);
  const report = opts.onProgress ?? (() => undefined);
  if (!opts.dryRun) repo.requireWritable('gc');
  await refuseOnIndexDamage(repo);
  const young = await youngPacks(repo, opts.graceMs ?? OBJECT_STORE_GRACE_MS);
  const r = await (opts.dryRun ? dryRun(repo, threshold, report, young) : run(repo, threshold, report, opts.pollMs ?? 500, young));
  r.packsTooYoung = young.size;
  return r;
}

/**
 * gc decides what is garbage from the index alone: a generation the index lost (a record
 * LevelDB dropped, a corrupt record, a map without its record) would have all its chunks
 * taken for garbage, destroying the data a repair could still bring back.
 */
async function refuseOnIndexDamage(repo: Repository): Promise<void> {
  if (repo.indexDamage) throw damaged('LevelDB dropped or found corrupt records when it last recovered the index (index/genvault-damage.log)');
  const lost = await repo.lostGenerationMaps();
  if (lost.length) throw damaged(`generation map(s) ${lost.join(', ')} have no generation record`);
  await repo.generations(undefined, true);
  if (repo.damagedRecords) throw damaged(`${repo.damagedRecords} generation record(s) are corrupt`);
}

async function run(repo: Repository, threshold: number, report: (line: string) => void, pollMs: number, young: Set<string>): Promise<GcResult> {
  const started = Date.now();
  const res = emptyResult(false);
  const db = repo.db;
  const lock = await GcLock.acquire(repo.dir);
  let writer: WriterRegistration | null = null;
  let ok = false;
  try {
    trace('locked');
    await cleanupDeadWriters(repo.dir, db, repo.store);
    await objectStoreLeftovers(repo, res);
    writer = await WriterRegistration.register(repo.dir, 'gc');
    const self = writer.record.id;

    report('gc: checking for leftovers of an interrupted gc');
    await recoverLeftovers(repo, res);
    await dropUnpinnedRemoved(repo);

    trace('mark');
    const condemned = await condemnAndSpare(repo, self, res, report, pollMs);

    await testPause('before-sweep');

    trace('sweep');
    await sweepChunks(repo, condemned, res, report);

    trace('leaves');
    await sweepLeaves(repo, self, res, report);

    trace('repack');
    await cleanupDeadWriters(repo.dir, db, repo.store);
    await repack(repo, writer, threshold, res, report, young);

    trace('finish');
    await finishSwept(repo);
    ok = true;
    trace('done');
  } catch (e) {
    throw describeFsError(e, 'gc failed');
  } finally {
    if (!ok) {
      // Leave nothing a backup or the next gc has to guess about.
      await recoverLeftovers(repo, emptyResult(false)).catch(() => undefined);
      if (writer) await trimPacks(repo.store, db, writer.record.packs).catch(() => undefined);
    }
    await writer?.release().catch(() => undefined);
    await lock.release().catch(() => undefined);
  }
  res.durationMs = Date.now() - started;
  return res;
}

/**
 * Mark, condemn every unreferenced chunk entry, wait for the writers that may have reused
 * one, mark again and spare what generations committed meanwhile use. Returns how many
 * chunks stay condemned. A function of its own so that the marks (up to 512 MiB) are
 * garbage once it returns, not held through the sweep and the repack.
 */
async function condemnAndSpare(repo: Repository, self: string, res: GcResult, report: (line: string) => void, pollMs: number): Promise<number> {
  const first = await mark(repo, report, 'marking');
  const condemned = await condemnUnreferenced(repo, first, report);
  await waitForWriters(repo, self, res, report, pollMs);
  // The second marking reuses the first one's memory.
  await spareRemarked(repo, first.chunks, res, report);
  return condemned - res.chunksSpared;
}

/**
 * Generations hidden by forget/prune while a reader had them open: drop those whose
 * readers are gone; the pinned ones stay marked.
 */
async function dropUnpinnedRemoved(repo: Repository): Promise<void> {
  const pinned = await pinnedGenerations(repo.dir);
  const dropOps: Op[] = [];
  for (const g of await repo.generations(undefined, true)) {
    if (!g.removed || pinned.has(g.id)) continue;
    dropOps.push({ type: 'del', key: repo.generationKey(g) }, { type: 'del', key: Repository.mapKey(g.id) });
  }
  if (dropOps.length) await repo.db.batch(dropOps, { sync: true } as object);
}

/**
 * Condemn every chunk entry the marking did not reach: an 'x' key for each, holding the
 * location it had. The 'x' keys are the condemned set from here on (recoverLeftovers left
 * none of an earlier gc, and only gc writes them), read back in batches: at tens of
 * millions of chunks no list of them fits in memory. Returns how many.
 */
async function condemnUnreferenced(repo: Repository, first: Marks, report: (line: string) => void): Promise<number> {
  const db = repo.db;
  trace('condemn');
  let n = 0;
  let ops: Op[] = [];
  for await (const part of slices(db, pass(K_CHUNK))) {
    keepHeapSmall();
    for (const [k, v] of part) {
      if (first.chunks.has(k, 1)) continue;
      ops.push({ type: 'put', key: condemnedKey(k.subarray(1)), value: v });
      n++;
    }
    if (ops.length >= WRITE_BATCH) {
      await db.batch(ops, SYNC);
      ops = [];
      report(`gc: condemning unreferenced chunks: ${n}`);
    }
  }
  if (ops.length) await db.batch(ops, SYNC);
  return n;
}

/**
 * The condemned chunks ('x' keys: digest, location when condemned), BATCH at a time in
 * key order. Each batch is read by an iterator of its own that starts past the last key
 * of the one before, so a long sweep pins no old LevelDB snapshot and sees what the
 * batches before it deleted.
 */
async function* condemnedBatches(repo: Repository): AsyncGenerator<Array<{ d: Buffer; loc: Buffer }>> {
  let after: Buffer | null = null;
  for (;;) {
    const range = after ? { gt: condemnedKey(after), lt: Buffer.of(K_CONDEMNED + 1), limit: BATCH } : { ...prefixRange(K_CONDEMNED), limit: BATCH };
    let entries: Array<[Buffer, Buffer]> = [];
    for await (const first of slices(repo.db, range, BATCH)) {
      entries = first;
      break;
    }
    if (!entries.length) return;
    const part = entries.map(([k, v]) => ({ d: k.subarray(1), loc: v }));
    after = part[part.length - 1]!.d;
    keepHeapSmall();
    yield part;
  }
}

/**
 * Wait for every writer that may have looked a condemned chunk up before its 'x' key
 * existed: those running now. Writers registering from now on see gc.json and the 'x'
 * keys, and store fresh copies instead of reusing a condemned chunk.
 */
async function waitForWriters(repo: Repository, self: string, res: GcResult, report: (line: string) => void, pollMs: number): Promise<void> {
  const noted = await liveWriters(repo.dir, self);
  trace('wait');
  res.waitedFor = noted.length;
  for (;;) {
    let running = 0;
    for (const w of noted) {
      if ((await lockFileExists(path.join(repo.dir, 'locks', `writer-${w.id}.json`))) && (await ownerAlive(w.owner))) running++;
    }
    if (!running) break;
    report(`gc: waiting for ${running} running backup(s)`);
    await sleep(pollMs);
  }
  await cleanupDeadWriters(repo.dir, repo.db, repo.store); // writers that died meanwhile
}

/**
 * Re-mark: generations committed meanwhile may use condemned chunks (forget and prune
 * may also have removed some generations: that only makes more garbage, left for later).
 * Those chunks are spared: their 'x' keys deleted.
 */
async function spareRemarked(repo: Repository, marks: MarkSet, res: GcResult, report: (line: string) => void): Promise<void> {
  trace('remark');
  const second = await mark(repo, report, 'marking again', marks);
  res.generations = second.generations;
  res.referencedChunks = second.chunks.size;
  res.referencedLeaves = second.leaves.size;
  for await (const part of condemnedBatches(repo)) {
    const spare = part.filter((p) => second.chunks.has(p.d));
    if (spare.length) await repo.db.batch(spare.map((p) => ({ type: 'del' as const, key: condemnedKey(p.d) })), SYNC);
    res.chunksSpared += spare.length;
  }
}

/**
 * The 'x' keys of swept chunks last until here, so that a backup which found a 'c'
 * entry just before the sweep deleted it still finds the 'x' key when it looks next.
 * Damage marks of swept chunks go too: nothing uses them any more. Every 'x' key left is
 * a swept chunk's: the sweep deleted those of the chunks it kept, the re-mark those it spared.
 * Only marks that exist are deleted (normally none): a delete per swept chunk wrote as many
 * tombstones as there are swept chunks, for LevelDB to carry down its levels. A mark made
 * after the marks were read stays, harmless: it names a chunk the index no longer has.
 */
async function finishSwept(repo: Repository): Promise<void> {
  const marked = await damagedSet(repo.db);
  let ops: Op[] = [];
  for await (const part of condemnedBatches(repo)) {
    for (const p of part) {
      ops.push({ type: 'del', key: condemnedKey(p.d) });
      if (marked.has(bin(p.d))) ops.push({ type: 'del', key: damagedKey(p.d) });
    }
    if (ops.length >= WRITE_BATCH) {
      await repo.db.batch(ops, SYNC);
      ops = [];
    }
  }
  if (ops.length) await repo.db.batch(ops, SYNC);
}

/**
 * Test hook (src/util/testhooks.ts): with GENVAULT_GC_PAUSE_FILE set, gc waits while that
 * file exists when it reaches the point named by GENVAULT_GC_PAUSE_AT: 'before-sweep' (the
 * default: after the last marking), 'sweep-read' (in the first sweep batch, between reading
 * the entries and deleting them), 'leaves-move' (before moving the first batch of leaves),
 * 'repack-commit' (the first rewritten pack written and synced, the entries not yet moved
 * into it) or 'pack-unlink' (the first pack given up: its 'p' entry deleted, the file not
 * yet unlinked).
 */
async function testPause(point: string): Promise<void> {
  await hookPause('gc', point, 'before-sweep');
}

/**
 * Delete the 'c' entries of condemned chunks that still point where they did when
 * condemned. LevelDB has no compare-and-delete: a backup may store a fresh copy of such
 * a chunk (a new 'c' entry, committed in one batch with its pack's 'p' entry) between our
 * read and our delete. So each batch reads all 'p' entries before and after; if any
 * changed, the batch's entries are put back as they were (their records are still in
 * place: packs are touched only later) and left for the next gc. The 'x' keys of the
 * deleted entries stay until the end of the run (finishSwept).
 */
async function sweepChunks(repo: Repository, total: number, res: GcResult, report: (line: string) => void): Promise<void> {
  const db = repo.db;
  let done = 0;
  // The batches are read as the sweep goes: each starts past the 'x' keys it has left (swept ones stay until finishSwept).
  for await (const part of condemnedBatches(repo)) {
    const before = await packFingerprint(repo);
    const cur = await db.getMany(part.map((p) => chunkKey(p.d)));
    await testPause('sweep-read');
    const gone: typeof part = [];
    const moved: typeof part = [];
    part.forEach((p, i) => (cur[i] && Buffer.from(cur[i]!).equals(p.loc) ? gone : moved).push(p));
    if (gone.length) await db.batch(gone.map((p) => ({ type: 'del' as const, key: chunkKey(p.d) })), SYNC);
    const after = await packFingerprint(repo);
    const undo: Op[] = [];
    if (gone.length && after !== before) {
      for (const p of gone) undo.push({ type: 'put', key: chunkKey(p.d), value: p.loc }, { type: 'del', key: condemnedKey(p.d) });
      res.chunksDeferred += gone.length;
    } else {
      for (const p of gone) {
        res.chunksRemoved++;
        res.chunkBytesRemoved += recordShare(p.loc);
      }
    }
    // A different entry (a fresh copy some backup stored) or none: the chunk is not ours to remove.
    for (const p of moved) undo.push({ type: 'del', key: condemnedKey(p.d) });
    if (undo.length) await db.batch(undo, SYNC);
    done += part.length;
    report(`gc: removing unreferenced chunks: ${Math.min(done, total)}/${total}`);
  }
}

/**
 * Remove map leaves no generation references. Backups write their leaves blindly (put,
 * not "put if absent") before committing the generation that uses them, and a leaf is
 * identical wherever the same stretch of disk recurs, so a running backup may be about to
 * reference any unreferenced leaf. Leaves are therefore removed only while no backup
 * runs: each batch is moved from 'l' to 'y', then if a backup is running or a generation
 * appeared, the batch is moved back and the rest waits for the next gc; otherwise the
 * 'y' keys are deleted. A gc that dies between the two steps leaves 'y' keys, which the
 * next gc puts back first.
 */
async function sweepLeaves(repo: Repository, self: string, res: GcResult, report: (line: string) => void): Promise<void> {
  const db = repo.db;
  const countUnreferenced = async (ref: Set<string>) => {
    let n = 0;
    for await (const k of db.keys(prefixRange(K_LEAF))) if (!ref.has(bin(k.subarray(1)))) n++;
    return n;
  };
  const busy = async (g0: Set<string>) => {
    if ((await liveWriters(repo.dir, self)).length) return true;
    for (const k of await generationKeys(repo)) if (!g0.has(k)) return true;
    return false;
  };
  const g0 = await generationKeys(repo);
  const ref = new Set<string>();
  for (const k of g0) {
    const id = Buffer.from(k, 'latin1').subarray(-8);
    const top = await getOrNull(db, key(K_GENMAP, id));
    if (!top) {
      if (await getOrNull(db, Buffer.from(k, 'latin1'))) throw damaged(`the map of generation ${id.toString('hex')} is missing`);
      continue;
    }
    for (const r of decodeTop(top)) ref.add(bin(r.digest));
  }
  if (await busy(g0)) {
    res.leavesDeferred = await countUnreferenced(ref);
    return;
  }
  let batch: Array<[Buffer, Buffer]> = [];
  let stopped = false;
  const flush = async () => {
    await testPause('leaves-move');
    const move: Op[] = [];
    for (const [d, v] of batch) move.push({ type: 'del', key: leafKey(d) }, { type: 'put', key: movedLeafKey(d), value: v });
    await db.batch(move, SYNC);
    const back: Op[] = [];
    if (await busy(g0)) {
      for (const [d, v] of batch) back.push({ type: 'put', key: leafKey(d), value: v }, { type: 'del', key: movedLeafKey(d) });
      res.leavesDeferred += batch.length;
      stopped = true;
    } else {
      for (const [d] of batch) back.push({ type: 'del', key: movedLeafKey(d) });
      res.leavesRemoved += batch.length;
    }
    await db.batch(back, SYNC);
    batch = [];
    report(`gc: removing unreferenced map leaves: ${res.leavesRemoved}`);
  };
  for await (const [k, v] of db.iterator(prefixRange(K_LEAF))) {
    const d = k.subarray(1);
    if (ref.has(bin(d))) continue;
    if (stopped) {
      res.leavesDeferred++;
      continue;
    }
    batch.push([Buffer.from(d), Buffer.from(v)]);
    if (batch.length >= LEAF_BATCH) await flush();
  }
  if (batch.length && !stopped) await flush();
}

interface PackPlan {
  sizes: Map<string, number>;
  /** Live bytes of chunk records per pack (a group sharing a place with another may go uncounted: see planPacks). */
  live: Map<string, number>;
  /** Live chunk entries per pack, exact: a pack with any is never deleted. */
  liveEntries: Map<string, number>;
  remove: string[];
  rewrite: string[];
}

/**
 * Whether a pack with `live` live bytes (record headers included) out of `size` committed
 * bytes is rewritten. Metadata records count as live like chunk records: they are copied
 * just the same, and a pack that is mostly live metadata (an upgrade's pack of leaves, or a
 * pack whose chunks all died but whose generation records live on) stays where it is
 * instead of being copied again by every gc. A pack that is all live is never rewritten,
 * so the output of a rewrite is not rewritten by the next gc unless something in it died.
 */
function worthRewriting(live: number, size: number, threshold: number): boolean {
  const data = Math.max(0, size - PACK_HEADER_SIZE);
  return threshold > 0 && live < data && live * 100 < threshold * data;
}

/**
 * Which packs to delete (no live chunk record) and which to rewrite (live fraction under
 * the threshold), by their chunk records; in format 4 their metadata records are looked
 * at next (triage). Only packs with a 'p' entry that no running writer lists: nobody
 * appends to them or commits entries into them any more, so their live set can only shrink.
 * With `referenced` (dry run), entries not in it count as already removed.
 */
async function planPacks(repo: Repository, self: string | null, threshold: number, young: Set<string>, referenced?: MarkSet): Promise<PackPlan & { deadBytes: number; deadChunks: number }> {
  const sizes = await packSizes(repo);
  for (const w of await liveWriters(repo.dir, self)) for (const p of w.packs) sizes.delete(p);
  for (const p of young) sizes.delete(p);
  const live = new Map<string, number>();
  const liveEntries = new Map<string, number>();
  let deadBytes = 0;
  let deadChunks = 0;
  // A group record stays whole while any member lives: it counts once, in full. Groups
  // seen are kept as 8-byte keys of their place, in bounded memory; two places sharing a
  // key (1 in 2^64) leave one group's bytes uncounted, which can only make a pack look
  // emptier than it is, so deleting is decided by liveEntries, which is exact.
  const liveGroups = new MarkSet();
  const place = Buffer.alloc(8);
  for await (const part of slices(repo.db, pass(K_CHUNK))) {
    keepHeapSmall();
    for (const [k, v] of part) {
      if (!isLocation(v)) continue;
      if (referenced && !referenced.has(k, 1)) {
        deadBytes += recordShare(v);
        deadChunks++;
        continue;
      }
      const id = v.toString('hex', 0, 16);
      if (!sizes.has(id)) continue;
      liveEntries.set(id, (liveEntries.get(id) ?? 0) + 1);
      if (v[32] === COMP_GROUP) {
        if (liveGroups.has(placeKey(v, place))) continue;
        liveGroups.add(place);
      }
      live.set(id, (live.get(id) ?? 0) + RECORD_HEADER_SIZE + v.readUInt32LE(24));
    }
  }
  const remove: string[] = [];
  const rewrite: string[] = [];
  for (const [id, size] of [...sizes].sort((a, b) => (a[0] < b[0] ? -1 : 1))) {
    const l = live.get(id) ?? 0;
    if (!liveEntries.get(id)) remove.push(id);
    else if (worthRewriting(l, size, threshold)) rewrite.push(id);
  }
  return { sizes, live, liveEntries, remove, rewrite, deadBytes, deadChunks };
}

type Triage = { action: 'delete' | 'rewrite' | 'keep'; scan: MetaScan | null } | { action: 'damaged'; problem: string };

/**
 * What to do with a pack the chunk records made a candidate: in format 4 its metadata
 * records are scanned first. A damaged one leaves the pack alone; live ones count as live
 * bytes, and a pack with live metadata is rewritten (or kept), never deleted.
 */
async function triage(repo: Repository, plan: PackPlan, id: string, threshold: number, meta: MetaLiveness | null): Promise<Triage> {
  const chunkLive = plan.live.get(id) ?? 0;
  const size = plan.sizes.get(id) ?? 0;
  const scan = meta ? await scanMeta(repo, id, size, meta) : null;
  // Damaged bytes may be a live metadata record whose type cannot be told any more (even
  // where the index says a dead chunk was): the pack stays for verify and repair.
  if (scan?.problem) return { action: 'damaged', problem: scan.problem };
  const live = chunkLive + (scan?.liveBytes ?? 0);
  if (!plan.liveEntries.get(id) && !scan?.live.length && live === 0) return { action: 'delete', scan };
  return { action: worthRewriting(live, size - (scan?.tocBytes ?? 0), threshold) ? 'rewrite' : 'keep', scan };
}

interface LiveRecord {
  d: Buffer;
  loc: Buffer;
  offset: number;
  length: number; // header + stored
}

async function repack(repo: Repository, writer: WriterRegistration, threshold: number, res: GcResult, report: (line: string) => void, young: Set<string>): Promise<void> {
  const plan = await planPacks(repo, writer.record.id, threshold, young);
  // After planning: a writer not among those the plan left out has committed everything it
  // will commit into the planned packs, and its generations are under 'g' by now.
  const meta = repo.config.version >= 4 ? await readLiveness(repo) : null;
  const rewrite: Array<{ id: string; scan: MetaScan | null }> = [];
  let deleted = 0;
  for (const id of [...plan.remove, ...plan.rewrite]) {
    const t = await triage(repo, plan, id, threshold, meta);
    if (t.action === 'damaged') res.warnings.push(`pack ${id}: ${t.problem}; pack left in place (run 'genvault verify')`);
    else if (t.action === 'rewrite') rewrite.push({ id, scan: t.scan });
    else if (t.action === 'delete') {
      await deletePack(repo, writer, id, res);
      res.metadataDropped += t.scan?.dropped ?? 0;
      report(`gc: deleted ${++deleted} empty pack(s)`);
    }
  }
  if (!rewrite.length) return;

  const out: { w: PackWriter | null } = { w: null };
  const records = await liveRecords(repo, rewrite.map((r) => r.id));
  // A pack's rewrite leaves its records, moves and lookups behind as garbage, and V8 let
  // that pile up over several packs before collecting (native-notes/performance.md).
  const collect = exposeGc();
  try {
    for (let n = 0; n < rewrite.length; n++) {
      const { id, scan } = rewrite[n]!;
      if (n) collect?.();
      await rewritePack(repo, writer, out, id, unpack(await records.read(n)), scan, res);
      report(`gc: rewriting packs: ${n + 1}/${rewrite.length}, ${bytes(res.bytesCopied)} of live data copied`);
    }
  } finally {
    await out.w?.close().catch(() => undefined);
    await records.close();
  }
}

/** Bytes a live record takes while gathered: digest (32), location length (1), location (up to 41). */
const PACKED = 74;

/**
 * The live chunk records of the packs `ids`, in one pass over the chunk entries, spilled to
 * disk in one bucket per pack (bucket n: ids[n]) of PACKED bytes each. At tens of millions
 * of chunks neither the records nor a pass per few packs can be afforded: records as
 * objects took ~280 bytes apiece, and gathering a million at a time (bounded memory) made
 * one more pass over every chunk entry per million, which grew faster than the index.
 */
async function liveRecords(repo: Repository, ids: string[]): Promise<Spill> {
  const bucketOf = new Map(ids.map((id, n) => [id, n]));
  const spill = await Spill.create('genvault-gc-repack', ids.length, PACKED);
  try {
    const rec = Buffer.alloc(PACKED);
    for await (const part of slices(repo.db, pass(K_CHUNK))) {
      keepHeapSmall();
      for (const [k, v] of part) {
        if (!isLocation(v)) continue;
        const b = bucketOf.get(v.toString('hex', 0, 16));
        if (b === undefined) continue;
        k.copy(rec, 0, 1, 33);
        rec[32] = v.length;
        rec.set(v, 33);
        spill.append(b, rec);
      }
      if (spill.pendingBytes >= 16 << 20) await spill.drain();
    }
    await spill.finish();
    return spill;
  } catch (e) {
    await spill.close();
    throw e;
  }
}

/** One pack's gathered records as LiveRecords, in pack order (held only while that pack is rewritten). */
function unpack(slab: Buffer): LiveRecord[] {
  const out: LiveRecord[] = [];
  for (let at = 0; at < slab.length; at += PACKED) {
    const loc = Buffer.from(slab.subarray(at + 33, at + 33 + slab[at + 32]!));
    out.push({ d: Buffer.from(slab.subarray(at, at + 32)), loc, offset: locationOffset(loc), length: RECORD_HEADER_SIZE + loc.readUInt32LE(24) });
  }
  return out.sort((a, b) => a.offset - b.offset);
}

/** Give a pack up: listed in gc's registration first (if we die after deleting its 'p' entry, cleanupDeadWriters removes the file). */
async function deletePack(repo: Repository, writer: WriterRegistration, id: string, res: GcResult): Promise<void> {
  const size = await packFileSize(repo, id);
  await writer.addPack(id);
  await repo.db.del(packKey(id), SYNC);
  await testPause('pack-unlink');
  await repo.store.delete(packObject(id));
  res.packsDeleted++;
  res.bytesFreed += size ?? 0;
}

/**
 * Copy one pack's live records (chunks as the index locates them, metadata records as
 * the scan found them) into gc's current output pack, sync, move the chunk entries, and
 * delete the old pack. A problem leaves the old pack alone (reported) and the output as it was.
 */
async function rewritePack(repo: Repository, writer: WriterRegistration, out: { w: PackWriter | null }, id: string, recs: LiveRecord[], scan: MetaScan | null, res: GcResult): Promise<void> {
  const db = repo.db;
  const oldSize = await packFileSize(repo, id);
  if (oldSize === null) {
    res.warnings.push(`pack ${id} is missing (run 'genvault verify'); left alone`);
    return;
  }
  if (!out.w || out.w.sealed || out.w.size >= repo.config.packTargetSize) {
    if (out.w) await out.w.close();
    out.w = await PackWriter.create(repo.store, { toc: repo.config.version >= TOC_FROM_VERSION, keys: repo.keys, register: (id) => writer.addPack(id) }).catch((e) => {
      throw describeFsError(e, `creating a pack file in ${repo.dir}`);
    });
    res.packsWritten++;
    res.bytesFreed -= PACK_HEADER_SIZE;
  }
  const w: PackWriter = out.w;
  const startSize = w.size;
  const moves: Array<{ key: Buffer; old: Buffer; neu: Buffer }> = [];
  let problem = await copyRecords(repo, id, recs, w, moves);
  if (!problem && scan?.live.length) {
    // Metadata records are found by no index entry: nothing to move, only to keep.
    const metaBytes = await readLiveMeta(repo, id, scan);
    if (typeof metaBytes === 'string') problem = metaBytes;
    else await w.append(metaBytes);
  }
  if (problem) {
    if (repo.store.sealsOnSync) {
      // An object store's appender may have sent parts of the copy already and cannot go
      // back behind them (store/s3-appender.ts): the new object is given up whole. It held
      // only this copy: every earlier copy ended in a sync that sealed its object.
      await w.close();
      out.w = null;
      res.packsWritten--;
      res.bytesFreed += PACK_HEADER_SIZE;
    } else await w.rewind(startSize);
    res.warnings.push(`pack ${id}: ${problem}; pack left in place (run 'genvault verify')`);
    return;
  }
  const copied = w.size - startSize;
  await w.sync(); // appends the new pack's table of contents (format 5) first
  await testPause('repack-commit');
  // The moves are in pack order, their keys in random order: looked up in key order.
  const cur = await getManyInKeyOrder(db, moves.map((m) => m.key));
  // Listed first: once the batch below has deleted its 'p' entry, cleanupDeadWriters
  // removes the file if we die (listed with its 'p' entry, it is left as it is).
  await writer.addPack(id);
  // One batch commits the new pack's 'p' size (also when no entry moves: a pack of
  // metadata records only), moves the entries and gives the old pack up, so that no gc
  // killed in between leaves both committed: the next one would copy the old pack's
  // metadata records a second time.
  const batch: Op[] = [w.commitOp()];
  // Only entries still pointing at the old record move; one replaced meanwhile by a
  // backup's fresh copy points into that backup's pack and stays.
  moves.forEach((m, i) => {
    if (cur[i] && Buffer.from(cur[i]!).equals(m.old)) batch.push({ type: 'put', key: m.key, value: m.neu });
  });
  batch.push({ type: 'del', key: packKey(id) });
  await db.batch(batch, SYNC);
  await testPause('pack-unlink');
  await repo.store.delete(packObject(id));
  res.packsRepacked++;
  res.bytesCopied += copied;
  res.bytesFreed += oldSize - (w.size - startSize);
  res.metadataKept += scan?.live.length ?? 0;
  res.metadataDropped += scan?.dropped ?? 0;
}

/**
 * Append the live records of one pack to `w`, as they are (header and payload), after
 * checking each record header against its index entry. Returns a problem, or null.
 */
async function copyRecords(repo: Repository, id: string, recs: LiveRecord[], w: PackWriter, moves: Array<{ key: Buffer; old: Buffer; neu: Buffer }>): Promise<string | null> {
  let i = 0;
  while (i < recs.length) {
    // A window of records close to each other, read at once.
    let j = i + 1;
    const start = recs[i]!.offset;
    let end = start + recs[i]!.length;
    while (j < recs.length) {
      const r = recs[j]!;
      // The members of a group record share its offset: the record is copied once.
      if (r.offset === recs[j - 1]!.offset) {
        j++;
        continue;
      }
      if (r.offset < end || r.offset - end > MAX_GAP || r.offset + r.length - start > WINDOW) break;
      end = r.offset + r.length;
      j++;
    }
    const buf = Buffer.alloc(end - start);
    const got = await readRecordSpan(repo.store, id, start, buf.length, buf);
    const parts: Buffer[] = [];
    let pos = 0;
    const pending: Array<{ r: LiveRecord; at: number }> = [];
    for (let k = i; k < j; k++) {
      const r = recs[k]!;
      const at = r.offset - start;
      if (at + r.length > got) return `the record of chunk ${r.d.toString('hex')} at offset ${r.offset} is cut off`;
      // gc names no particular problem: any one makes the record damaged.
      if ('problem' in checkRecord(buf.subarray(at, at + r.length), { ...decodeLocation(r.loc), digest: r.d })) {
        return `the record of chunk ${r.d.toString('hex')} at offset ${r.offset} is damaged`;
      }
      if (k > i && r.offset === recs[k - 1]!.offset) {
        pending.push({ r, at: pending[pending.length - 1]!.at }); // another member of the group just copied
        continue;
      }
      parts.push(buf.subarray(at, at + r.length));
      pending.push({ r, at: pos });
      pos += r.length;
    }
    const base = await w.append(parts.length === 1 ? parts[0]! : Buffer.concat(parts));
    for (const { r, at } of pending) {
      const l = decodeLocation(r.loc);
      moves.push({ key: chunkKey(r.d), old: r.loc, neu: encodeLocation({ ...l, packId: w.packId, offset: base + at }) });
    }
    i = j;
  }
  return null;
}

/** What gc would do, changing nothing (no lock, no registration, no cleanup of dead writers). */
async function dryRun(repo: Repository, threshold: number, report: (line: string) => void, young: Set<string>): Promise<GcResult> {
  const started = Date.now();
  const res = emptyResult(true);
  const m = await mark(repo, report, 'marking');
  res.generations = m.generations;
  res.referencedChunks = m.chunks.size;
  res.referencedLeaves = m.leaves.size;
  report('gc: counting unreferenced chunks and pack space');
  const plan = await planPacks(repo, null, threshold, young, m.chunks);
  res.chunksRemoved = plan.deadChunks;
  res.chunkBytesRemoved = plan.deadBytes;
  for await (const k of repo.db.keys(prefixRange(K_LEAF))) if (!m.leaves.has(bin(k.subarray(1)))) res.leavesRemoved++;
  // Format 4: leaves the generations reference are the ones a real run keeps under 'l'.
  const meta = repo.config.version >= 4 ? await readLiveness(repo, m.leaves) : null;
  let copied = 0;
  for (const id of [...plan.remove, ...plan.rewrite]) {
    const size = await packFileSize(repo, id);
    const t = await triage(repo, plan, id, threshold, meta);
    if (t.action === 'damaged') res.warnings.push(`pack ${id}: ${t.problem}; it would be left in place (run 'genvault verify')`);
    if (t.action !== 'delete' && t.action !== 'rewrite') continue;
    res.metadataDropped += t.scan?.dropped ?? 0;
    if (t.action === 'delete') {
      res.packsDeleted++;
      res.bytesFreed += size ?? 0;
      continue;
    }
    if (size === null) continue; // a real run reports it
    const l = (plan.live.get(id) ?? 0) + (t.scan?.liveBytes ?? 0);
    res.packsRepacked++;
    res.metadataKept += t.scan?.live.length ?? 0;
    copied += l;
    res.bytesFreed += size - l;
  }
  res.bytesCopied = copied;
  if (copied) {
    res.packsWritten = Math.ceil(copied / repo.config.packTargetSize);
    res.bytesFreed -= res.packsWritten * PACK_HEADER_SIZE;
  }
  let leftovers = false;
  for await (const _ of repo.db.keys({ ...prefixRange(K_CONDEMNED), limit: 1 })) leftovers = true;
  if (leftovers) res.warnings.push('an interrupted gc left condemned-chunk keys; the next gc resolves them first');
  res.durationMs = Date.now() - started;
  return res;
}

/**
 * What writers killed mid-upload left of an object store: unfinished multipart uploads in
 * the bucket, and spool files in the cache's tmp/ (left by earlier builds, which spooled
 * appended bytes there). gc holds the store's exclusive lock
 * (store-locks.ts): no command runs on the repository anywhere, so none of them is in use.
 */
async function objectStoreLeftovers(repo: Repository, res: GcResult): Promise<void> {
  const store = repo.store as typeof repo.store & { abortStaleUploads?: (olderThanMs: number) => Promise<number> };
  if (!store.abortStaleUploads) return;
  res.uploadsAborted = await store.abortStaleUploads(0);
  const tmp = path.join(repo.dir, 'tmp');
  for (const f of await fs.readdir(tmp).catch(() => [] as string[])) {
    if (!/^s3-spool-[0-9a-f]{16}$/.test(f)) continue;
    await fs.rm(path.join(tmp, f), { force: true });
    res.spoolsRemoved++;
  }
}

/**
 * An object store's packs younger than the grace period, by the store's clock (its listing's
 * last-write times against the present it gives gc's own lock); a pack whose time the store
 * does not give counts as young. Local repositories have none: their writers are processes
 * of this host, whose liveness gc knows.
 */
async function youngPacks(repo: Repository, graceMs: number): Promise<Set<string>> {
  const young = new Set<string>();
  if (repo.store.spec.kind === 'local' || graceMs <= 0) return young;
  const now = await repo.storeTime();
  for (const p of await listPacks(repo.store)) if (p.modified === undefined || now - p.modified < graceMs) young.add(p.packId);
  return young;
}

/**
 * `genvault upgrade`: a repository of format 1-4 becomes format 5. From 4 only the version
 * changes (writers of format 5 add tables of contents to their packs, FORMAT.md "Version
 * 5"). From 1-3 (FORMAT.md, "Version 4"):
 * the metadata that so far lived only in the index is written into packs, so that the
 * index can be rebuilt from them (`genvault repair`).
 *
 * 1. plan: under the retention lock (no protect, forget or prune meanwhile), with no other
 *    writer running, as a registered writer of our own;
 * 2. write a leaf record for every `l` leaf, a map and a record for every generation (a
 *    generation hidden while pinned gets a `forgotten` change instead), sync, and commit
 *    the packs' `p` entries;
 * 3. config.json says version 5 (atomically), and from then on every writer adds records;
 * 4. catch up: writers that opened the repository before step 3 still write as version 3.
 *    Wait until none runs, then write what steps 2 missed (leaves and generations they
 *    committed). Writers check too: a backup reads config.json once registered (a writer
 *    registered before step 3 is waited for here) and again before its commit, and writes
 *    the records of its whole generation if the version has become 4 (an upgrade killed
 *    between steps 3 and 4); protect, unprotect, forget and prune read it under the
 *    retention lock, held here throughout.
 *
 * Killed before step 3, the repository is still a working version-3 one (packs of step 2
 * are committed or cleaned up as any writer's) and upgrade starts again; killed after, it
 * is version 4 and `upgrade` only does step 4.
 */
import { GenvaultError } from '../util/errors.js';
import { K_GEN, K_LEAF, packKey, packSizeOf, prefixEnd } from '../format/keys.js';
import { PLAIN_FORMAT_VERSION as FORMAT_VERSION } from '../format/config.js';
import { REC_CHANGE, REC_GENERATION, REC_GENMAP, REC_LEAF } from '../format/meta.js';
import { parseGenerationRecord, type Generation } from '../format/generation.js';
import { getOrNull } from '../index/db.js';
import { ImageLock, RETENTION_LOCK, gcRunning, liveWriters } from '../repository/locks.js';
import { MetaPack, withMetaPack } from '../repository/meta-pack.js';
import { CONFIG_FILE, Repository } from '../repository/repository.js';
import { repoModes } from '../repository/perms.js';
import { listPacks, scanStoredPack } from '../store/pack-reader.js';

export interface UpgradeResult {
  from: number;
  to: number;
  /** Records written: leaves, and generations (map and record, or a forgotten change). */
  leaves: number;
  generations: number;
  /** Writers that were still writing as version 3 when the config changed, waited for. */
  waitedFor: number;
}

export interface UpgradeOptions {
  /** One line per step, for a terminal. */
  progress?: (line: string) => void;
  /** How often to look whether older writers have finished (ms). */
  pollMs?: number;
}

/** What the records written so far cover (hex digests of leaves, generation ids). */
interface Written {
  leaves: Set<string>;
  generations: Set<string>;
}

export async function upgrade(repo: Repository, opts: UpgradeOptions = {}): Promise<UpgradeResult> {
  repo.requireWritable('upgrade');
  const from = repo.config.version;
  const res: UpgradeResult = { from, to: Math.max(from, FORMAT_VERSION), leaves: 0, generations: 0, waitedFor: 0 };
  const lock = await ImageLock.acquire(repo.dir, RETENTION_LOCK, true);
  try {
    // Run again on a version-4 repository, upgrade writes what the packs lack: the packs
    // say what they hold (a run killed between steps 3 and 4 is finished this way).
    const written: Written = from >= 4 ? await metaInPacks(repo) : { leaves: new Set(), generations: new Set() };
    await withMetaPack(repo, 'upgrade', async (mp) => {
      if (from < 4) {
        await refuseOtherWriters(repo, mp);
        opts.progress?.(`writing the metadata of ${repo.dir} into packs`);
        await writePass(repo, mp, written, res);
        await writeConfig(repo);
        opts.progress?.(`format version ${from} -> ${FORMAT_VERSION}`);
      } else if (from < FORMAT_VERSION) {
        // 4 -> 5: only writers change (they add tables of contents to new packs); packs
        // without one are read whole, so nothing is written for the old ones.
        await writeConfig(repo);
        opts.progress?.(`format version ${from} -> ${FORMAT_VERSION}`);
      }
      res.waitedFor = await waitForOlderWriters(repo, mp, opts);
      await writePass(repo, mp, written, res);
    });
  } finally {
    await lock.release().catch(() => undefined);
  }
  return res;
}

async function refuseOtherWriters(repo: Repository, mp: MetaPack): Promise<void> {
  if (await gcRunning(repo.dir)) throw new GenvaultError('a gc is running: upgrade when it has finished', 'LOCKED');
  const others = await liveWriters(repo.dir, mp.registrationId);
  if (others.length) {
    const what = others.map((w) => `${w.what} (pid ${w.owner.pid})`).join(', ');
    throw new GenvaultError(`upgrade needs the repository without running writers; running: ${what}`, 'LOCKED');
  }
}

/**
 * Records for every leaf and generation the index holds that `written` does not cover yet,
 * then sync and commit the packs' `p` entries.
 */
async function writePass(repo: Repository, mp: MetaPack, written: Written, res: UpgradeResult): Promise<void> {
  for await (const [k, v] of repo.db.iterator({ gte: Buffer.of(K_LEAF), lt: prefixEnd(Buffer.of(K_LEAF)) })) {
    const hex = k.toString('hex', 1);
    if (written.leaves.has(hex)) continue;
    await mp.add({ type: REC_LEAF, leaf: v });
    written.leaves.add(hex);
    res.leaves++;
  }
  for (const g of await generationRecords(repo)) {
    if (written.generations.has(g.id)) continue;
    await addGeneration(repo, mp, g);
    written.generations.add(g.id);
    res.generations++;
  }
  const ops = await mp.seal();
  if (ops.length) await repo.db.batch(ops, { sync: true } as object);
}

/** Every generation record, also those hidden while pinned (they become forgotten changes). */
async function generationRecords(repo: Repository): Promise<Array<Generation & { json: Buffer }>> {
  const out: Array<Generation & { json: Buffer }> = [];
  for await (const [k, v] of repo.db.iterator({ gte: Buffer.of(K_GEN), lt: prefixEnd(Buffer.of(K_GEN)) })) {
    let g: Generation;
    try {
      g = parseGenerationRecord(k, v);
    } catch (e) {
      // Damaged: nothing trustworthy to write. verify reports it; repair cannot bring it back.
      process.stderr.write(`genvault: warning: upgrade: a generation record is damaged (${(e as Error).message}); it is not written into packs\n`);
      continue;
    }
    out.push({ ...g, json: Buffer.from(v) });
  }
  return out;
}

async function addGeneration(repo: Repository, mp: MetaPack, g: Generation & { json: Buffer }): Promise<void> {
  const { json, ...gen } = g;
  if (gen.removed) {
    const change = { id: gen.id, name: gen.name, created: gen.created, rev: (gen.rev ?? 0) + 1, at: new Date().toISOString(), forgotten: true as const };
    await mp.add({ type: REC_CHANGE, change });
    return;
  }
  const top = await getOrNull(repo.db, Repository.mapKey(gen.id));
  if (!top) {
    process.stderr.write(`genvault: warning: upgrade: ${gen.name}@${gen.id} has no map in the index; its record alone is written\n`);
  } else {
    await mp.add({ type: REC_GENMAP, id: gen.id, top });
  }
  // The record as the index holds it (tags and protection included): a rebuild takes it
  // as it is unless a change with a higher rev follows.
  await mp.add({ type: REC_GENERATION, generation: gen, json });
}

/** The leaves and generations (records, or forgotten changes) the packs hold records of. */
async function metaInPacks(repo: Repository): Promise<Written> {
  const w: Written = { leaves: new Set(), generations: new Set() };
  for (const p of await listPacks(repo.store)) {
    // Only what is committed: a dead writer's tail past its `p` size is trimmed later.
    const committed = await getOrNull(repo.db, packKey(p.packId));
    if (!committed) continue;
    const size = Math.min(p.size, packSizeOf(committed));
    const it = scanStoredPack(repo.store, p, size, { keys: repo.keys });
    for (let r = await it.next(); !r.done; r = await it.next()) {
      if (r.value.kind !== 'meta') continue;
      const rec = r.value.record;
      if (rec.type === REC_LEAF) w.leaves.add(r.value.plainDigest.toString('hex'));
      else if (rec.type === REC_GENERATION) w.generations.add(rec.generation.id);
      else if (rec.type === REC_CHANGE && rec.change.forgotten) w.generations.add(rec.change.id);
    }
  }
  return w;
}

async function writeConfig(repo: Repository): Promise<void> {
  const next = { ...repo.config, version: FORMAT_VERSION };
  await repo.store.put(CONFIG_FILE, JSON.stringify(next, null, 2) + '\n', { mode: repoModes(next).file });
}

/** Wait until no other writer runs (each may have opened the repository as version 3). */
async function waitForOlderWriters(repo: Repository, mp: MetaPack, opts: UpgradeOptions): Promise<number> {
  const seen = new Set<string>();
  for (;;) {
    const others = await liveWriters(repo.dir, mp.registrationId);
    if (!others.length) return seen.size;
    for (const w of others) {
      if (!seen.has(w.id)) opts.progress?.(`waiting for ${w.what} (pid ${w.owner.pid}) to finish`);
      seen.add(w.id);
    }
    await new Promise((r) => setTimeout(r, opts.pollMs ?? 500));
  }
}

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
 *
 * An encrypted repository of format 6 becomes format 7 (FORMAT.md "Version 7: sealed
 * index"): nothing is written into packs (their records are sealed already); with no
 * other writer running, every `g` and `j` entry of the index is rewritten under its keyed
 * name with its value sealed (one batch), then config.json says 7; then, once writers
 * that opened the repository as version 6 are gone, entries they wrote the old way are
 * converted too. Entries already converted are recognised (they open), so a run killed
 * at any point is finished by running upgrade again.
 */
import { GenvaultError } from '../util/errors.js';
import { K_GEN, K_JOB_RUN, K_LEAF, packKey, packSizeOf, prefixEnd } from '../format/keys.js';
import { INDEX_SEALED_VERSION, PLAIN_FORMAT_VERSION as FORMAT_VERSION } from '../format/config.js';
import { PLAIN_GENERATIONS, nameTag, openIndexValue, sealIndexValue, sealedGenerations, type IndexKeys } from '../format/index-seal.js';
import { REC_CHANGE, REC_GENERATION, REC_GENMAP, REC_LEAF } from '../format/meta.js';
import { type Generation } from '../format/generation.js';
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
  /** Format 6 -> 7: generation records rewritten in the index under keyed names, sealed. */
  sealed?: number;
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
  if (repo.config.encryption) return sealIndex(repo, opts);
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
  const gi = repo.genIndex;
  for await (const [k, v] of repo.db.iterator({ gte: Buffer.of(K_GEN), lt: prefixEnd(Buffer.of(K_GEN)) })) {
    let g: Generation;
    try {
      g = gi.parse(k, v);
    } catch (e) {
      // Damaged: nothing trustworthy to write. verify reports it; repair cannot bring it back.
      process.stderr.write(`genvault: warning: upgrade: a generation record is damaged (${(e as Error).message}); it is not written into packs\n`);
      continue;
    }
    out.push({ ...g, json: Buffer.from(gi.json(k, v)) });
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

async function writeConfig(repo: Repository, version = FORMAT_VERSION): Promise<void> {
  const next = { ...repo.config, version };
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

/** An encrypted repository: format 6 -> 7 (the index sealed); on 7, converts what writers of 6 left. */
async function sealIndex(repo: Repository, opts: UpgradeOptions): Promise<UpgradeResult> {
  const from = repo.config.version;
  const res: UpgradeResult = { from, to: INDEX_SEALED_VERSION, leaves: 0, generations: 0, waitedFor: 0, sealed: 0 };
  const ik = repo.unlocked?.index;
  if (!ik) throw new GenvaultError(`${repo.dir}: upgrading an encrypted repository needs its key`, 'NO_KEY');
  const lock = await ImageLock.acquire(repo.dir, RETENTION_LOCK, true);
  try {
    await withMetaPack(repo, 'upgrade', async (mp) => {
      if (from < INDEX_SEALED_VERSION) {
        await refuseOtherWriters(repo, mp);
        opts.progress?.(`sealing the index of ${repo.dir}`);
        res.sealed! += await convertIndex(repo, ik);
        await writeConfig(repo, INDEX_SEALED_VERSION);
        opts.progress?.(`format version ${from} -> ${INDEX_SEALED_VERSION}`);
      }
      res.waitedFor = await waitForOlderWriters(repo, mp, opts);
      res.sealed! += await convertIndex(repo, ik);
    });
  } finally {
    await lock.release().catch(() => undefined);
  }
  return res;
}

/**
 * Rewrite every plain `g` and `j` entry as format 7 has it, in one batch; entries that
 * already open as format 7 ones are left. A plain entry that does not parse is damage:
 * named on stderr and left (verify reports it). Returns the generation records converted.
 */
async function convertIndex(repo: Repository, ik: IndexKeys): Promise<number> {
  const sealed = sealedGenerations(ik);
  const ops: Array<{ type: 'put'; key: Buffer; value: Buffer } | { type: 'del'; key: Buffer }> = [];
  let generations = 0;
  for await (const [k, v] of repo.db.iterator({ gte: Buffer.of(K_GEN), lt: prefixEnd(Buffer.of(K_GEN)) })) {
    if (opensSealed(() => sealed.json(k, v))) continue;
    let g: Generation;
    try {
      g = PLAIN_GENERATIONS.parse(k, v);
    } catch (e) {
      process.stderr.write(`genvault: warning: upgrade: a generation record is damaged (${(e as Error).message}); it is left as it is\n`);
      continue;
    }
    ops.push({ type: 'put', key: sealed.key(g), value: sealed.value(g, v) }, { type: 'del', key: k });
    generations++;
  }
  for await (const [k, v] of repo.db.iterator({ gte: Buffer.of(K_JOB_RUN), lt: prefixEnd(Buffer.of(K_JOB_RUN)) })) {
    if (opensSealed(() => openIndexValue(ik, k, v))) continue;
    const sep = k.length - 9;
    let job: string | null = null;
    try {
      job = sep > 1 && k[sep] === 0 ? (JSON.parse(v.toString('utf8')) as { job?: unknown }).job as string : null;
    } catch {
      job = null;
    }
    if (typeof job !== 'string' || k.toString('utf8', 1, sep) !== job) {
      process.stderr.write(`genvault: warning: upgrade: a job run record is damaged; it is dropped\n`);
      ops.push({ type: 'del', key: k });
      continue;
    }
    const nk = Buffer.concat([Buffer.of(K_JOB_RUN), nameTag(ik, K_JOB_RUN, job), k.subarray(sep + 1)]);
    ops.push({ type: 'put', key: nk, value: sealIndexValue(ik, nk, v) }, { type: 'del', key: k });
  }
  if (ops.length) await repo.db.batch(ops, { sync: true } as object);
  return generations;
}

function opensSealed(open: () => Buffer | null): boolean {
  try {
    return open() !== null;
  } catch {
    return false;
  }
}

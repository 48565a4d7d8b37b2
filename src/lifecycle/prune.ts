/**
 * Removing generations and guarding them: protect/unprotect, forget (one generation),
 * prune (a retention policy over images).
 *
 * Removing a generation deletes its `g` record and `m` map in one batch; its map
 * leaves, chunks and pack space stay until `gc` reclaims what nothing references.
 * Guards: a protected generation is never removed; one younger than the minimum age
 * (config `guards.minAge`, default 1 day) only by forget with `forceYoung`.
 *
 * protect, unprotect, forget and prune take one lock between them, so a generation
 * protected while a prune is deciding is not removed by that prune.
 *
 * Format 4: each generation they change gets a change record (its new `rev`, and its
 * tags and protection, or `forgotten`) in a pack of their own, synced and committed in the
 * same batch as the index change (FORMAT.md, "Version 4"), so a rebuilt index neither
 * loses a protection nor brings a forgotten generation back.
 */
import { pinnedGenerations } from '../repository/locks.js';
import { testPause, testTrace } from '../util/testhooks.js';
import { GenvaultError, REPAIR_HINT } from '../util/errors.js';
import { roughAge } from '../util/duration.js';
import { configMinAge } from '../format/config.js';
import { getOrNull } from '../index/db.js';
import { Generation } from '../format/generation.js';
import { ImageLock, RETENTION_LOCK } from '../repository/locks.js';
import { Repository } from '../repository/repository.js';
import { MetaPack, withMetaPack } from '../repository/meta-pack.js';
import { REC_CHANGE, type GenerationChange } from '../format/meta.js';
import { RetentionDecision, RetentionRules, applyRetention, checkRules } from './retention.js';

/**
 * The lock is an image lock under a name no image can have (image names cannot start
 * with '.'): locks/image-.retention.lock, cleared like any lock of a dead process.
 */
async function withRetentionLock<T>(repo: Repository, fn: () => Promise<T>): Promise<T> {
  repo.requireWritable('changing generations');
  const lock = await ImageLock.acquire(repo.dir, RETENTION_LOCK, true);
  try {
    return await fn();
  } finally {
    await lock.release().catch(() => undefined);
  }
}

/** The stored record of a generation, read again under the lock (null if it is gone). */
async function reread(repo: Repository, g: Generation): Promise<Generation | null> {
  const k = repo.generationKey(g);
  const v = await getOrNull(repo.db, k);
  if (!v) return null;
  try {
    return repo.genIndex.parse(k, v);
  } catch (e) {
    throw new GenvaultError(`index damaged: the generation record of ${label(g)} is corrupt (${(e as Error).message}); run 'genvault verify' (${REPAIR_HINT})`, 'DAMAGED');
  }
}

const label = (g: Pick<Generation, 'name' | 'id'>) => `${g.name}@${g.id}`;

type Op = { type: 'put'; key: Buffer; value: Buffer } | { type: 'del'; key: Buffer };

/** A generation's change record: its `rev`-th change, with its whole mutable state or `forgotten`. */
function changeOf(g: Generation, rev: number, state: Pick<GenerationChange, 'tags' | 'protected' | 'forgotten'>): GenerationChange {
  return { id: g.id, name: g.name, created: g.created, rev, at: new Date().toISOString(), ...state };
}

/**
 * Write an index change to generations, under the retention lock. `build(meta)` gives the
 * batch and, when `meta` (format 4: config.json read again, an upgrade may have finished
 * while we waited for the lock), the change records that go into a pack first; its `p`
 * entry is committed in the same batch. `beforeBatch` runs when the records are durable
 * and the batch is next.
 */
async function writeChanges(
  repo: Repository,
  what: string,
  build: (meta: boolean) => { changes: GenerationChange[]; ops: Op[] },
  beforeBatch?: () => Promise<void>,
): Promise<void> {
  const meta = await MetaPack.wantedNow(repo);
  const { changes, ops } = build(meta);
  const commit = async (packOps: Op[]) => {
    await beforeBatch?.();
    await repo.db.batch([...packOps, ...ops], { sync: true } as object);
  };
  if (!meta || !changes.length) return commit([]);
  await withMetaPack(repo, what, async (mp) => {
    for (const change of changes) await mp.add({ type: REC_CHANGE, change });
    await commit(await mp.seal());
  });
}

/** Set or clear the protected flag. Returns the updated record and whether it changed. */
export async function setProtected(repo: Repository, spec: string, on: boolean): Promise<{ gen: Generation; changed: boolean }> {
  return withRetentionLock(repo, async () => {
    const found = await repo.resolve(spec);
    const cur = await reread(repo, found);
    if (!cur) throw new GenvaultError(`${label(found)} was removed meanwhile`, 'NOT_FOUND');
    if (Boolean(cur.protected) === on) return { gen: cur, changed: false };
    const next: Generation = { ...cur };
    if (on) next.protected = true;
    else delete next.protected;
    await writeChanges(repo, on ? 'protect' : 'unprotect', (meta) => {
      // The record carries the rev of its latest change (format 4 only: version 3 is as it was).
      if (meta) next.rev = (cur.rev ?? 0) + 1;
      return {
        changes: meta ? [changeOf(next, next.rev!, { tags: next.tags, protected: on })] : [],
        ops: [{ type: 'put', key: repo.generationKey(next), value: repo.genIndex.value(next) }],
      };
    });
    return { gen: next, changed: true };
  });
}

/**
 * Set a generation's tags and protection to `state` (sync carries them from its source):
 * one change record with the next `rev` (format 4), and the record rewritten under the
 * same key, under the retention lock. False when they are already so, or it is gone.
 */
export async function setGenerationState(repo: Repository, g: Generation, state: { tags: string[]; protected: boolean }): Promise<boolean> {
  return withRetentionLock(repo, async () => {
    const cur = await reread(repo, g);
    if (!cur || cur.removed) return false;
    const sameTags = cur.tags.length === state.tags.length && cur.tags.every((t, i) => t === state.tags[i]);
    if (sameTags && Boolean(cur.protected) === state.protected) return false;
    const next: Generation = { ...cur, tags: [...state.tags] };
    if (state.protected) next.protected = true;
    else delete next.protected;
    await writeChanges(repo, 'sync', (meta) => {
      if (meta) next.rev = (cur.rev ?? 0) + 1;
      return {
        changes: meta ? [changeOf(next, next.rev!, { tags: next.tags, protected: state.protected })] : [],
        ops: [{ type: 'put', key: repo.generationKey(next), value: repo.genIndex.value(next) }],
      };
    });
    return true;
  });
}

export interface ForgetOptions {
  /** Remove it even if it is younger than the minimum age. */
  forceYoung?: boolean;
  now?: number;
}

/** Remove one generation (its `g` record and `m` map, in one batch). */
export async function forgetGeneration(repo: Repository, spec: string, opts: ForgetOptions = {}): Promise<Generation> {
  return withRetentionLock(repo, async () => {
    const found = await repo.resolve(spec);
    const g = await reread(repo, found);
    if (!g) throw new GenvaultError(`${label(found)} was removed meanwhile`, 'NOT_FOUND');
    if (g.protected) {
      throw new GenvaultError(`${label(g)} is protected; run 'genvault unprotect ${label(g)}' first`, 'PROTECTED');
    }
    const minAge = configMinAge(repo.config);
    const age = (opts.now ?? Date.now()) - Date.parse(g.created);
    if (age < minAge.ms && !opts.forceYoung) {
      throw new GenvaultError(
        `${label(g)} is ${roughAge(age)} old, younger than the minimum age ${minAge.text}; use --force-young to forget it anyway`,
        'TOO_YOUNG',
      );
    }
    await removeGenerations(repo, [g], 'forget');
    return g;
  });
}

async function removeGenerations(repo: Repository, gens: Generation[], what: string, beforeBatch?: () => Promise<void>): Promise<void> {
  if (!gens.length) return;
  // A generation open in a mount (pinned) is only hidden: its data stays until the file
  // is closed, and a later gc drops the record and reclaims the space. Its change says
  // forgotten all the same: a rebuilt index does not bring it back.
  const pinned = await pinnedGenerations(repo.dir);
  await writeChanges(
    repo,
    what,
    (meta) => ({
      changes: meta ? gens.map((g) => changeOf(g, (g.rev ?? 0) + 1, { forgotten: true })) : [],
      ops: gens.flatMap((g): Op[] =>
        pinned.has(g.id)
          ? [{ type: 'put', key: repo.generationKey(g), value: repo.genIndex.value(hidden(g, meta)) }]
          : [
              { type: 'del', key: repo.generationKey(g) },
              { type: 'del', key: Repository.mapKey(g.id) },
            ],
      ),
    }),
    beforeBatch,
  );
}

/** The record of a pinned generation that was removed (format 4: with the rev of its forgotten change). */
function hidden(g: Generation, meta: boolean): Generation {
  return meta ? { ...g, removed: true, rev: (g.rev ?? 0) + 1 } : { ...g, removed: true };
}

export interface PruneOptions {
  /** Images to prune (default: all). */
  names?: string[];
  rules: RetentionRules;
  /** Minimum age in ms (default: the repository's guards.minAge). */
  minAgeMs?: number;
  dryRun?: boolean;
  allowEmpty?: boolean;
  now?: number;
}

export interface PruneResult {
  dryRun: boolean;
  minAgeMs: number;
  decisions: RetentionDecision<Generation>[];
  removed: Generation[];
  kept: Generation[];
}

/**
 * Test hooks (src/util/testhooks.ts), for the crash loop; a dry run has none.
 * GENVAULT_PRUNE_TRACE=1 prints the phases on stderr: 'locked' (the retention lock is
 * held), 'decided' (the generations are read and the policy applied), 'batch' (the one
 * batch that removes them is about to be written; only when there is something to
 * remove) and 'removed' (it is written; the lock is still held). GENVAULT_PRUNE_PAUSE_FILE
 * makes prune wait while that file exists at the point named by GENVAULT_PRUNE_PAUSE_AT:
 * 'locked', 'decided' or 'batch' (the default: just before the batch).
 */
async function hook(phase: string, dryRun: boolean | undefined): Promise<void> {
  if (dryRun) return;
  testTrace('prune', phase);
  if (phase !== 'removed') await testPause('prune', phase, 'batch');
}

/** Apply a retention policy to images; with dryRun only decide. */
export async function prune(repo: Repository, opts: PruneOptions): Promise<PruneResult> {
  checkRules(opts.rules);
  const minAgeMs = opts.minAgeMs ?? configMinAge(repo.config).ms;
  const run = async (): Promise<PruneResult> => {
    await hook('locked', opts.dryRun);
    let gens: Generation[];
    if (opts.names?.length) {
      gens = [];
      for (const name of [...new Set(opts.names)]) {
        const list = await repo.generations(name);
        if (!list.length) throw new GenvaultError(`no image named ${name} in ${repo.dir}`, 'NOT_FOUND');
        gens.push(...list);
      }
    } else {
      gens = await repo.generations();
    }
    const decisions = applyRetention(gens, opts.rules, {
      now: opts.now ?? Date.now(),
      minAgeMs,
      allowEmpty: opts.allowEmpty,
    });
    const removed = decisions.filter((d) => !d.keep).map((d) => d.gen);
    const kept = decisions.filter((d) => d.keep).map((d) => d.gen);
    await hook('decided', opts.dryRun);
    if (!opts.dryRun && removed.length) {
      await removeGenerations(repo, removed, 'prune', () => hook('batch', false));
      await hook('removed', false);
    }
    return { dryRun: opts.dryRun === true, minAgeMs, decisions, removed, kept };
  };
  // A dry run changes nothing and needs no lock.
  return opts.dryRun ? run() : withRetentionLock(repo, run);
}

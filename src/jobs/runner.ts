/**
 * Running a job: take the image's backup lock, connect (ssh:// sources), run the
 * pre-hooks in order, read the source into a new generation, run every post-hook, apply
 * the retention, and record the run in the repository's history. A sync job does the
 * same with `genvault sync` to its destination in place of the read (under a lock of its
 * own name; the destination's retention is the sync's).
 *
 * Rules an admin relies on:
 * - a failing pre-hook skips the read (no half-frozen or missing snapshot is backed up);
 * - post-hooks always run, whatever happened before (they thaw and remove snapshots);
 *   if the SSH connection dropped, they run over a new one;
 * - the image lock is taken before any hook, so two runs of one job never interleave
 *   their hooks: the second is skipped and says why;
 * - a run started because the job was due checks again under the lock, and the run is
 *   recorded before the lock is released: a job found due by cron and by the daemon at
 *   once runs once for that scheduled time, whichever order their steps interleave in.
 */
import { backup } from '../backup/backup.js';
import { ImageLock, ImageLockedError } from '../repository/locks.js';
import { prune } from '../lifecycle/prune.js';
import { GenvaultError } from '../util/errors.js';
import type { Repository } from '../repository/repository.js';
import { openLocalSource } from '../source/local.js';
import { isNbdUri } from '../nbd/client.js';
import { NbdSource } from '../nbd/source.js';
import { RbdSource } from '../source/rbd.js';
import { isRbdSpec, parseRbdSpec } from '../source/rbd-cli.js';
import { isSshSpec, parseSshSpec, type SshConnection } from '../source/ssh.js';
import { openSshConnection } from '../source/ssh-command.js';
import { startRemoteSource } from '../source/ssh-agent.js';
import { isChunkedSource } from '../backup/chunked-source.js';
import type { Source } from '../backup/source.js';
import { bytes, duration } from '../util/format.js';
import type { JobConfig } from './config.js';
import { HookRecord, RunRecord, recentRuns, recordRun } from './history.js';
import { runHook } from './hooks.js';
import { notifyRun } from './notify.js';
import { sync } from '../sync/sync.js';
import { LocalSource } from '../sync/local-source.js';
import { LocalDestination } from '../sync/local-destination.js';
import type { SyncDestination } from '../sync/endpoint.js';
import { isRemoteRepo } from '../remote/client.js';
import { RemoteDestination } from '../remote/sync-client.js';
import { readSecretFile } from '../repository/keys.js';
import { objectStoreDirOr } from '../repository/location.js';

export interface RunJobOptions {
  /** Who runs it, recorded with the run: "run" or "daemon". */
  by: string;
  /**
   * Run only if the job is (still) due, judged under the image lock: the caller's own check
   * may predate a run by another process that has finished since.
   */
  ifDue?: boolean;
  onProgress?: (done: number, total: number | null) => void;
}

/** notifyProblems: a line per notification that could not be sent (notify.ts). */
export type JobOutcome = { skipped: false; record: RunRecord; notifyProblems?: string[] } | { skipped: true; job: string; reason: string };

/** A connection the source may "close" without closing it: the post-hooks still need it. */
function borrowed(conn: SshConnection): SshConnection {
  return Object.create(conn, { close: { value: () => undefined } }) as SshConnection;
}

async function openSource(job: JobConfig, repo: Repository, conn: SshConnection | null): Promise<Source> {
  if (isNbdUri(job.source)) return NbdSource.open(repo, job.source, { name: job.image, bitmap: job.bitmap });
  if (isRbdSpec(job.source)) return RbdSource.open(repo, parseRbdSpec(job.source), { name: job.image, cluster: job.ceph ?? {} });
  if (!conn) return openLocalSource(job.source);
  // The remote agent hashes without the repository's key (FORMAT.md, version 6): an encrypted repository reads with cat.
  if (repo.keys && job.ssh.mode === 'agent') throw new GenvaultError('ssh mode agent: the remote agent cannot hash chunks for an encrypted repository; use plain or auto', 'USAGE');
  return startRemoteSource(borrowed(conn), repo.config.chunking, { mode: repo.keys ? 'plain' : job.ssh.mode });
}

type Stage = NonNullable<RunRecord['stage']>;

/** One run's state, shared by its steps. */
interface Run {
  repo: Repository;
  job: JobConfig;
  opts: RunJobOptions;
  lock: ImageLock;
  rec: RunRecord;
  hooks: HookRecord[];
  env: Record<string, string>;
  spec: ReturnType<typeof parseSshSpec> | null;
  conn: SshConnection | null;
  /** Marks the run failed at `stage`; the first failure is the one recorded. */
  fail: (stage: Stage, message: string) => void;
  connect: () => Promise<SshConnection>;
}

/**
 * Takes the image lock and, with `ifDue`, checks under it that the job is still due.
 * Returns the held lock, or the skipped outcome (the lock then released).
 */
async function lockForRun(repo: Repository, job: JobConfig, opts: RunJobOptions): Promise<ImageLock | JobOutcome> {
  let lock: ImageLock;
  try {
    lock = await ImageLock.acquire(repo.dir, job.image, false, repo.imageLockName(job.image));
  } catch (e) {
    // Not the backup command's advice (`run` has no --wait): the next scheduled run will come.
    if (e instanceof ImageLockedError) return { skipped: true, job: job.name, reason: `another backup of image ${e.image} is running (pid ${e.holderPid})` };
    throw e;
  }
  if (opts.ifDue) {
    let last: number | null;
    try {
      last = await lastStarted(repo, job.name);
    } catch (e) {
      await lock.release().catch(() => undefined);
      throw e;
    }
    const now = Date.now();
    if (!isDue(job, last, now)) {
      await lock.release().catch(() => undefined);
      const prev = job.schedule?.prev(now);
      const reason =
        last !== null && prev ? `already run since its scheduled time ${prev.toISOString()} (started ${new Date(last).toISOString()})` : 'not due';
      return { skipped: true, job: job.name, reason };
    }
  }
  return lock;
}

/** The run's record (status ok until a step fails), its parsed ssh:// source, and the hooks' environment. */
function startRun(repo: Repository, job: JobConfig, opts: RunJobOptions, lock: ImageLock): Run {
  const started = Date.now();
  const hooks: HookRecord[] = [];
  const rec: RunRecord = { job: job.name, image: job.image, started, finished: started, status: 'ok', hooks, by: opts.by };
  const fail = (stage: Stage, message: string) => {
    if (rec.status === 'ok') {
      rec.status = 'failed';
      rec.stage = stage;
      rec.error = message;
    }
  };
  const spec = isSshSpec(job.source) ? parseSshSpec(job.source) : null;
  const env: Record<string, string> = {
    GENVAULT_JOB: job.name,
    GENVAULT_IMAGE: job.image,
    GENVAULT_SOURCE: job.source,
    GENVAULT_SOURCE_PATH: spec ? spec.path : job.source,
    GENVAULT_REPOSITORY: repo.dir,
  };
  const connect = () =>
    openSshConnection(job.source, {
      identity: job.ssh.identity,
      knownHosts: job.ssh.knownHosts,
      acceptNewHostKey: job.ssh.acceptNewHostKey,
      config: job.ssh.config,
      command: job.ssh.command,
    });
  return { repo, job, opts, lock, rec, hooks, env, spec, conn: null, fail, connect };
}

/** Runs the pre-hooks in order, stopping at the first that fails. */
async function runPreHooks(run: Run): Promise<void> {
  for (const h of run.job.hooks.pre) {
    const r = await runHook(h, 'pre', { ...run.env, GENVAULT_PHASE: 'pre' }, run.conn);
    run.hooks.push(r);
    if (!r.ok) {
      run.fail('pre-hook', `${r.error}; source not read`);
      break;
    }
  }
}

/** A sync job's copy to its destination (genvault sync); true if it succeeded. */
async function syncToDestination(run: Run): Promise<boolean> {
  const spec = run.job.sync!;
  try {
    // The destination's key: sync.key-file, else this process's (--key-file, the job file's key-file).
    const secret = spec.keyFile ? await readSecretFile(spec.keyFile, 'key-file') : undefined;
    const { ssh } = run.job;
    const dst: SyncDestination = isRemoteRepo(spec.to)
      ? await RemoteDestination.open(spec.to, { identity: ssh.identity, knownHosts: ssh.knownHosts, acceptNewHostKey: ssh.acceptNewHostKey, config: ssh.config, command: ssh.command })
      : await LocalDestination.open(await objectStoreDirOr(spec.to), { secret });
    try {
      const r = await sync(LocalSource.of(run.repo), dst, { names: spec.images, rules: spec.rules, minAgeMs: spec.minAgeMs, onProgress: run.opts.onProgress });
      run.rec.sync = { to: spec.to, copied: r.copied.length, skipped: r.skipped, updated: r.updated, chunks: r.chunks, chunkBytes: r.chunkBytes, storedAdded: r.storedAdded, pruned: r.pruned.length };
      run.env.GENVAULT_SYNC_COPIED = String(r.copied.length);
      return true;
    } finally {
      await dst.close().catch(() => undefined);
    }
  } catch (e) {
    run.fail('sync', `sync to ${spec.to}: ${(e as Error).message}`);
    return false;
  }
}

/** Reads the source into a new generation (a sync job: copies to its destination); true if that succeeded. */
async function readSource(run: Run): Promise<boolean> {
  if (run.job.sync) return syncToDestination(run);
  const { repo, job, opts, lock, rec } = run;
  let source: Source | null = null;
  try {
    source = await openSource(job, repo, run.conn);
    const gen = await backup(repo, source, { name: job.image, tags: job.tags, lock, onProgress: opts.onProgress });
    rec.generation = { id: gen.id, size: gen.size, bytesRead: gen.stats.bytesRead, newBytes: gen.stats.newBytes, newStored: gen.stats.newStored };
    if (source && isChunkedSource(source)) run.env.GENVAULT_WIRE_BYTES = String(source.transferred.wire);
    return true;
  } catch (e) {
    run.fail('backup', (e as Error).message);
    return false;
  } finally {
    await source?.close().catch(() => undefined);
  }
}

/** Connects (ssh:// sources), runs the pre-hooks, and reads the source if they all passed; true if the read succeeded. */
async function connectAndRead(run: Run): Promise<boolean> {
  let readOk = false;
  try {
    if (run.spec) run.conn = await run.connect();
    await runPreHooks(run);
    if (run.rec.status === 'ok') readOk = await readSource(run);
  } catch (e) {
    run.fail('connect', (e as Error).message);
  }
  return readOk;
}

/** Post-hooks: always, each one, in order; a source hook whose connection is gone gets a new one. */
async function runPostHooks(run: Run, readOk: boolean): Promise<void> {
  const { spec, rec } = run;
  const postEnv = { ...run.env, GENVAULT_PHASE: 'post', GENVAULT_RESULT: readOk ? 'ok' : 'failed', GENVAULT_GENERATION: rec.generation?.id ?? '' };
  for (const h of run.job.hooks.post) {
    if (h.on === 'source' && spec && (!run.conn || run.conn.lost)) {
      run.conn?.close();
      run.conn = null;
      try {
        run.conn = await run.connect();
      } catch (e) {
        const r: HookRecord = { phase: 'post', run: h.run, on: 'source', ok: false, code: null, durationMs: 0, output: '', error: `post-hook "${h.run}" on ${spec.host} not run: ${(e as Error).message}` };
        run.hooks.push(r);
        run.fail('post-hook', r.error!);
        continue;
      }
    }
    const r = await runHook(h, 'post', postEnv, run.conn);
    run.hooks.push(r);
    if (!r.ok) run.fail('post-hook', r.error!);
  }
}

/** Applies the job's retention to its image, after a successful read only. */
async function applyRetention(run: Run, readOk: boolean): Promise<void> {
  const { repo, job } = run;
  if (!readOk || !job.retention) return;
  try {
    const res = await prune(repo, { names: [job.image], rules: job.retention, minAgeMs: job.minAgeMs });
    run.rec.pruned = res.removed.map((g) => g.id);
  } catch (e) {
    run.fail('retention', `retention: ${(e as Error).message}`);
  }
}

export async function runJob(repo: Repository, job: JobConfig, opts: RunJobOptions): Promise<JobOutcome> {
  const locked = await lockForRun(repo, job, opts);
  if (!(locked instanceof ImageLock)) return locked;
  const run = startRun(repo, job, opts, locked);
  try {
    const readOk = await connectAndRead(run);
    await runPostHooks(run, readOk);
    await applyRetention(run, readOk);
    // Recorded while the lock is held: whoever takes it next sees this run.
    run.rec.finished = Date.now();
    await recordRun(repo, run.rec);
  } finally {
    run.conn?.close();
    await run.lock.release().catch(() => undefined);
  }
  // After the lock: a slow mail server must not hold up the next run of this image.
  const notifyProblems = await notifyRun(job, run.rec, repo.dir);
  return { skipped: false, record: run.rec, notifyProblems };
}

/** The one log line a run leaves (stdout of `run` and the daemon). */
export function describeRun(o: JobOutcome): string {
  if (o.skipped) return `${o.job}: skipped: ${o.reason}`;
  const r = o.record;
  const took = duration(r.finished - r.started);
  const y = r.sync;
  if (y && r.status === 'ok') {
    const pruned = y.pruned ? `, pruned ${y.pruned} there` : '';
    return `${r.job}: ok: synced ${y.copied} generation(s) to ${y.to} (${y.skipped} already there), ${y.chunks} chunks (${bytes(y.chunkBytes)}) sent, ${bytes(y.storedAdded)} stored${pruned}, ${took}`;
  }
  const g = r.generation;
  const gen = g ? `generation ${g.id.slice(0, 8)}, ${bytes(g.bytesRead)} read, ${bytes(g.newBytes)} new (${bytes(g.newStored)} stored)` : '';
  const pruned = r.pruned?.length ? `, pruned ${r.pruned.length}` : '';
  if (r.status === 'ok') return `${r.job}: ok: ${gen}${pruned}, ${took}`;
  return `${r.job}: FAILED (${r.stage}): ${r.error}${g ? ` [${gen}]` : ''}`;
}

/** When the job last started, from its history (null: never). */
export async function lastStarted(repo: Repository, job: string): Promise<number | null> {
  return (await recentRuns(repo, job, 1))[0]?.started ?? null;
}

/**
 * Whether a job is due at `now`: it has a schedule, and no run started at or after the
 * latest scheduled time. A job that never ran is due at once (as anacron would).
 */
export function isDue(job: JobConfig, lastStart: number | null, now: number): boolean {
  if (!job.schedule) return false;
  const prev = job.schedule.prev(now);
  if (lastStart === null) return true;
  return prev !== null && lastStart < +prev;
}

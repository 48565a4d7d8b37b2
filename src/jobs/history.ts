/**
 * Job run history, kept in the repository's index so that `status` sees every run from
 * any host and process (cron, systemd timer, daemon, by hand):
 *   'j' job 0x00 started(u64 BE ms) -> run record (JSON)
 * or, format 7 (FORMAT.md "Version 7: sealed index"):
 *   'j' name tag(16) started(u64 BE ms) -> run record (JSON), sealed
 * The newest KEEP_RUNS records per job are kept.
 */
import { GenvaultError } from '../util/errors.js';
import { K_JOB_RUN, key, prefixEnd } from '../format/keys.js';
import { INDEX_SEAL_BROKEN, indexSealed, nameTag, openIndexValue, sealIndexValue } from '../format/index-seal.js';
import type { Repository } from '../repository/repository.js';

export { K_JOB_RUN };
const KEEP_RUNS = 200;

export type RunStatus = 'ok' | 'failed';

export interface HookRecord {
  phase: 'pre' | 'post';
  run: string;
  on: 'source' | 'local';
  ok: boolean;
  code: number | null;
  durationMs: number;
  /** Last lines of the hook's output (stdout and stderr). */
  output: string;
  error?: string;
}

export interface RunRecord {
  job: string;
  image: string;
  started: number;
  finished: number;
  status: RunStatus;
  /** One line: why the run failed. */
  error?: string;
  /** What failed: a pre-hook, the backup, a post-hook, the retention. */
  stage?: 'connect' | 'pre-hook' | 'backup' | 'sync' | 'post-hook' | 'retention';
  generation?: { id: string; size: number; bytesRead: number; newBytes: number; newStored: number };
  /** A sync job's copy: where to, generations copied and already there, what it sent and stored, what the destination's rules pruned. */
  sync?: { to: string; copied: number; skipped: number; updated: number; chunks: number; chunkBytes: number; storedAdded: number; pruned: number };
  pruned?: string[];
  hooks: HookRecord[];
  /** Who ran it: "run", "daemon". */
  by: string;
}

/**
 * How one repository keys and stores its job runs: plain (formats 1-6), or (format 7) a
 * name tag in place of the job's name and the record sealed, bound to its key.
 */
interface RunIndex {
  prefix(job: string): Buffer;
  encode(k: Buffer, r: RunRecord): Buffer;
  /** The record under k; throws an Error saying what is wrong. */
  decode(k: Buffer, v: Buffer): RunRecord;
}

function runIndex(repo: Repository): RunIndex {
  const decodeJson = (b: Buffer) => {
    const r = JSON.parse(b.toString('utf8')) as RunRecord;
    if (typeof r !== 'object' || r === null || typeof r.job !== 'string' || !Number.isFinite(r.started)) throw new Error('not a run record');
    return r;
  };
  if (!indexSealed(repo.config)) {
    return { prefix: (job) => key(K_JOB_RUN, job, Buffer.of(0)), encode: (_k, r) => Buffer.from(JSON.stringify(r)), decode: (_k, v) => decodeJson(v) };
  }
  const ik = repo.unlocked?.index;
  if (!ik) throw new GenvaultError(`${repo.dir}: job history is sealed in this repository: it needs its key`, 'NO_KEY');
  return {
    prefix: (job) => Buffer.concat([Buffer.of(K_JOB_RUN), nameTag(ik, K_JOB_RUN, job)]),
    encode: (k, r) => sealIndexValue(ik, k, Buffer.from(JSON.stringify(r))),
    decode(k, v) {
      const plain = openIndexValue(ik, k, v);
      if (!plain) throw new Error(INDEX_SEAL_BROKEN);
      return decodeJson(plain);
    },
  };
}

function runKey(ri: RunIndex, job: string, started: number): Buffer {
  const t = Buffer.alloc(8);
  t.writeBigUInt64BE(BigInt(started));
  return Buffer.concat([ri.prefix(job), t]);
}

export async function recordRun(repo: Repository, r: RunRecord): Promise<void> {
  const ri = runIndex(repo);
  const k = runKey(ri, r.job, r.started);
  await repo.db.put(k, ri.encode(k, r), { sync: true } as object);
  const p = ri.prefix(r.job);
  const old: Buffer[] = [];
  let n = 0;
  for await (const k of repo.db.keys({ gte: p, lt: prefixEnd(p), reverse: true })) {
    if (++n > KEEP_RUNS) old.push(k);
  }
  if (old.length) await repo.db.batch(old.map((k) => ({ type: 'del' as const, key: k })));
}

/**
 * The newest `limit` runs of a job, newest first. A record that cannot be read (damaged,
 * or a sealed one moved under another key) is left out and named once on stderr.
 */
export async function recentRuns(repo: Repository, job: string, limit = 20): Promise<RunRecord[]> {
  const ri = runIndex(repo);
  const p = ri.prefix(job);
  const out: RunRecord[] = [];
  for await (const [k, v] of repo.db.iterator({ gte: p, lt: prefixEnd(p), reverse: true, limit })) {
    try {
      out.push(ri.decode(k, v));
    } catch (e) {
      process.stderr.write(`genvault: warning: index damaged: a run record of job ${job} is corrupt (${(e as Error).message}); it is left out\n`);
    }
  }
  return out;
}

/** A run record as JSON output shows it: times as ISO strings (as every command's JSON), and the duration. */
export function runRecordJson(r: RunRecord): Omit<RunRecord, 'started' | 'finished'> & { started: string; finished: string; durationMs: number } {
  return { ...r, started: new Date(r.started).toISOString(), finished: new Date(r.finished).toISOString(), durationMs: r.finished - r.started };
}

/**
 * Job run history, kept in the repository's index so that `status` sees every run from
 * any host and process (cron, systemd timer, daemon, by hand):
 *   'j' job 0x00 started(u64 BE ms) -> run record (JSON)
 * The newest KEEP_RUNS records per job are kept.
 */
import { Db } from '../index/db.js';
import { key, prefixEnd } from '../format/keys.js';

export const K_JOB_RUN = 0x6a; // 'j'
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

function prefix(job: string): Buffer {
  return key(K_JOB_RUN, job, Buffer.of(0));
}

function runKey(job: string, started: number): Buffer {
  const t = Buffer.alloc(8);
  t.writeBigUInt64BE(BigInt(started));
  return Buffer.concat([prefix(job), t]);
}

export async function recordRun(db: Db, r: RunRecord): Promise<void> {
  await db.put(runKey(r.job, r.started), Buffer.from(JSON.stringify(r)), { sync: true } as object);
  const p = prefix(r.job);
  const old: Buffer[] = [];
  let n = 0;
  for await (const k of db.keys({ gte: p, lt: prefixEnd(p), reverse: true })) {
    if (++n > KEEP_RUNS) old.push(k);
  }
  if (old.length) await db.batch(old.map((k) => ({ type: 'del' as const, key: k })));
}

/** The newest `limit` runs of a job, newest first. */
export async function recentRuns(db: Db, job: string, limit = 20): Promise<RunRecord[]> {
  const p = prefix(job);
  const out: RunRecord[] = [];
  for await (const v of db.values({ gte: p, lt: prefixEnd(p), reverse: true, limit })) out.push(JSON.parse(v.toString()) as RunRecord);
  return out;
}

/** A run record as JSON output shows it: times as ISO strings (as every command's JSON), and the duration. */
export function runRecordJson(r: RunRecord): Omit<RunRecord, 'started' | 'finished'> & { started: string; finished: string; durationMs: number } {
  return { ...r, started: new Date(r.started).toISOString(), finished: new Date(r.finished).toISOString(), durationMs: r.finished - r.started };
}

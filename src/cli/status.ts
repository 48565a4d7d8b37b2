import fs from 'node:fs/promises';
import { Command, Option } from 'commander';
import { DEFAULT_JOBS_FILE, JobsFile, loadJobsFile } from '../jobs/config.js';
import { recentRuns } from '../jobs/history.js';
import { ImageSummary, JobHealth, STATE_EXIT, State, judgeJob, perfData, summarizeImage, worst } from '../jobs/status.js';
import { Repository } from '../repository/repository.js';
import { secretWithoutPrompt } from '../repository/keys.js';
import { NAMES_NEED_KEY, indexSealed } from '../format/index-seal.js';
import { K_GEN, prefixEnd } from '../format/keys.js';
import { decodeTop } from '../format/chunkmap.js';
import { getOrNull } from '../index/db.js';
import { roughAge } from '../util/duration.js';
import { bytes, table } from '../util/format.js';
import { UsageError } from '../util/errors.js';
import { errorLine, failUsage, jobsRepoPath, localRepoDir, openRepository, printJson, repoDirOf, wantsJson } from './common.js';
import { isoTimeArg } from './options.js';

interface StatusFlags {
  config?: string;
  /** Milliseconds since the epoch. */
  now?: number;
}

interface JobRow extends JobHealth {
  job: string;
  image: string;
  schedule: string | null;
  lastRun: string | null;
  lastSuccess: string | null;
  lastError: string | null;
  nextRun: string | null;
  generations: number;
  storedBytes: number;
}

const iso = (ms: number | undefined | null) => (ms ? new Date(ms).toISOString() : null);
const short = (s: string | null) => (s ? s.replace('T', ' ').replace(/\.\d+Z$/, '') : '-');

/** Status must always answer with a state: errors are CRIT on one line, exit 2. */
function crit(message: string, json: boolean): never {
  if (json) printJson({ state: 'CRIT', exit: 2, error: message, jobs: [], images: [] });
  else process.stdout.write(`CRIT: ${message}\n`);
  process.exit(2);
}

export function register(program: Command): void {
  program
    .command('status')
    .description('health of every job and image, for people and monitoring: exit 0 OK, 1 WARN, 2 CRIT, 3 UNKNOWN')
    .option('-c, --config <file>', `job file (default ${DEFAULT_JOBS_FILE}; without one, only images are shown)`)
    .addOption(new Option('--now <time>', 'judge as if it were this ISO time (to check a schedule ahead)').argParser(isoTimeArg))
    .option('--json', 'print JSON')
    .addHelpText(
      'after',
      '\nOK: the last run succeeded and no scheduled run was missed. WARN: one scheduled run was\n' +
        'missed, or the job never ran. CRIT: two or more were missed, the last run failed, or the\n' +
        'repository or job file cannot be read. A scheduled time counts as missed once its grace\n' +
        'period (job file `grace`, default 1h) has passed without a successful run.\n' +
        'UNKNOWN (exit 3): status itself could not run (a usage error, an internal error, a signal).\n' +
        'The first line of output is the summary (as monitoring plugins expect), with performance\n' +
        'data after its "|": per job JOB_age (seconds since the last success), JOB_missed\n' +
        '(warn 1, crit 2), JOB_generations, JOB_stored (bytes); per image without a job the last two.\n\n' +
        'Example (Nagios/Icinga):  command_line  /usr/local/bin/genvault status --config /etc/genvault/jobs.yaml',
    )
    .action(async (o: StatusFlags, cmd: Command) => {
      const json = wantsJson(cmd);
      const now = o.now ?? Date.now();
      const { file, dir } = await readJobFile(o, cmd, json);
      let repo: Repository;
      try {
        // The job history and generation records are all status reads: no key needed, but
        // a sealed index (format 7) shows names only with it: used when given in a file.
        const withKey = indexSealed(await Repository.readConfig(dir)) && secretWithoutPrompt();
        repo = await openRepository(dir, { withoutKey: !withKey });
      } catch (e) {
        crit(errorLine(e), json);
      }
      const sealed = !repo.genIndex.readable;
      const { jobs, images } = sealed ? await sealedRows(repo, file, json) : await collectRows(repo, file, now, json);
      await repo.close().catch(() => undefined);
      const state = printReport(json, now, file, jobs, images, sealed ? `${NAMES_NEED_KEY} (give --key-file FILE or GENVAULT_PASSWORD_FILE); images are shown by tag` : null);
      process.exit(STATE_EXIT[state]);
    });
}

/** The job file (null without one) and the repository it names (or --repo). */
async function readJobFile(o: StatusFlags, cmd: Command, json: boolean): Promise<{ file: JobsFile | null; dir: string }> {
  let file: JobsFile | null = null;
  let dir: string;
  try {
    const cfgPath = o.config ?? DEFAULT_JOBS_FILE;
    // Only a file that is not there means "no job file". One we may not reach (a directory
    // the monitoring user cannot enter) or a dangling link is one that cannot be read: CRIT.
    const exists = await fs.lstat(cfgPath).then(
      () => true,
      (e: NodeJS.ErrnoException) => e.code !== 'ENOENT' && e.code !== 'ENOTDIR',
    );
    if (o.config !== undefined || exists) file = await loadJobsFile(cfgPath);
    dir = file ? await repoDirOf(jobsRepoPath(cmd, file.repository, file.keyFile), cmd) : await localRepoDir(cmd);
  } catch (e) {
    if (e instanceof UsageError) failUsage(e.message);
    crit(errorLine(e), json);
  }
  return { file, dir };
}

/** A row per job, judged against its runs, and a summary per image no job backs up. */
async function collectRows(repo: Repository, file: JobsFile | null, now: number, json: boolean): Promise<{ jobs: JobRow[]; images: ImageSummary[] }> {
  const jobs: JobRow[] = [];
  const images: ImageSummary[] = [];
  try {
    const gens = await repo.generations();
    const byImage = new Map<string, typeof gens>();
    for (const g of gens) byImage.set(g.name, [...(byImage.get(g.name) ?? []), g]);
    for (const job of file?.jobs ?? []) {
      const runs = await recentRuns(repo, job.name, 200);
      const health = judgeJob(job, runs, now);
      const img = summarizeImage(job.image, byImage.get(job.image) ?? []);
      jobs.push({
        job: job.name,
        image: job.image,
        schedule: job.schedule?.expression ?? null,
        ...health,
        lastRun: iso(runs[0]?.started),
        lastSuccess: iso(runs.find((r) => r.status === 'ok')?.started),
        lastError: runs[0]?.status === 'failed' ? (runs[0].error ?? null) : null,
        nextRun: job.schedule ? job.schedule.next(now).toISOString() : null,
        generations: img.generations,
        storedBytes: img.storedBytes,
      });
    }
    const jobImages = new Set((file?.jobs ?? []).map((j) => j.image));
    for (const [name, list] of byImage) if (!jobImages.has(name)) images.push(summarizeImage(name, list));
  } catch (e) {
    await repo.close().catch(() => undefined);
    crit(errorLine(e), json);
  }
  return { jobs, images };
}

/**
 * Without the key of a sealed index (format 7): per image (known by its tag) the count of
 * generations, the newest one's time and size (from its map); jobs cannot be judged.
 */
async function sealedRows(repo: Repository, file: JobsFile | null, json: boolean): Promise<{ jobs: JobRow[]; images: ImageSummary[] }> {
  const gi = repo.genIndex;
  const byImage = new Map<string, { generations: number; newest: number; id: string }>();
  try {
    for await (const k of repo.db.keys({ gte: Buffer.of(K_GEN), lt: prefixEnd(Buffer.of(K_GEN)) })) {
      const { name, id } = gi.describe(k);
      const created = gi.createdOf(k);
      if (created === null || !Number.isFinite(new Date(created).getTime())) continue;
      const cur = byImage.get(name) ?? { generations: 0, newest: -1, id };
      cur.generations++;
      if (created > cur.newest) Object.assign(cur, { newest: created, id });
      byImage.set(name, cur);
    }
  } catch (e) {
    await repo.close().catch(() => undefined);
    crit(errorLine(e), json);
  }
  const images: ImageSummary[] = [];
  for (const [name, i] of [...byImage].sort((x, y) => (x[0] < y[0] ? -1 : x[0] > y[0] ? 1 : 0))) {
    const top = await getOrNull(repo.db, Repository.mapKey(i.id)).catch(() => null);
    let size = 0;
    try {
      size = top ? decodeTop(top).reduce((a, r) => a + r.bytes, 0) : 0;
    } catch {
      size = 0; // a damaged map: verify names it
    }
    images.push({ name, generations: i.generations, storedBytes: 0, size, newest: new Date(i.newest).toISOString() });
  }
  const jobs: JobRow[] = (file?.jobs ?? []).map((job) => ({
    job: job.name,
    image: job.image,
    schedule: job.schedule?.expression ?? null,
    state: 'WARN',
    missed: 0,
    reason: 'its run history is sealed: status needs the key',
    lastRun: null,
    lastSuccess: null,
    lastError: null,
    nextRun: null,
    generations: 0,
    storedBytes: 0,
  }));
  return { jobs, images };
}

/** Print the summary line and the report (tables, or JSON); returns the overall state. */
function printReport(json: boolean, now: number, file: JobsFile | null, jobs: JobRow[], images: ImageSummary[], note: string | null = null): State {
  const state: State = worst(jobs.map((j) => j.state));
  const bad = jobs.filter((j) => j.state !== 'OK');
  // A '|' in an error would start the performance data early.
  const summary = bad.length
    ? `${state}: ${bad.map((j) => `${j.job} ${j.reason.replace(/\|/g, '/')}`).join('; ')}`
    : `OK: ${jobs.length} job${jobs.length === 1 ? '' : 's'} ok, ${images.length + jobs.length} image${images.length + jobs.length === 1 ? '' : 's'}`;
  if (json) {
    printJson({ state, exit: STATE_EXIT[state], summary, now: new Date(now).toISOString(), jobs, images, ...(note ? { note } : {}) });
  } else {
    // Without the key (note) what images stored is unknown: their generations only.
    const perf = note ? perfData([], [], now, images) : perfData(jobs, images, now);
    let out = `${summary}${perf ? ` | ${perf}` : ''}\n`;
    if (jobs.length) {
      const rows = [['JOB', 'STATE', 'SCHEDULE', 'LAST SUCCESS (UTC)', 'AGE', 'MISSED', 'GENS', 'STORED', 'LAST ERROR']];
      for (const j of jobs) {
        rows.push([
          j.job,
          j.state,
          j.schedule ?? '-',
          short(j.lastSuccess),
          j.lastSuccess ? roughAge(now - Date.parse(j.lastSuccess)) : '-',
          String(j.missed),
          String(j.generations),
          bytes(j.storedBytes),
          j.lastError ?? '-',
        ]);
      }
      out += '\n' + table(rows, [5, 6, 7]) + '\n';
    }
    if (images.length) {
      const rows = [['IMAGE (no job)', 'GENS', note ? 'SIZE (NEWEST)' : 'STORED', 'NEWEST (UTC)', 'AGE']];
      for (const i of images) rows.push([i.name, String(i.generations), bytes(note ? i.size : i.storedBytes), short(i.newest), i.newest ? roughAge(now - Date.parse(i.newest)) : '-']);
      out += '\n' + table(rows, [1, 2]) + '\n';
    }
    if (note) out += `\n(${note})\n`;
    if (!file) out += `\n(no job file at ${DEFAULT_JOBS_FILE}: give --config FILE to judge jobs against their schedules)\n`;
    process.stdout.write(out);
  }
  return state;
}

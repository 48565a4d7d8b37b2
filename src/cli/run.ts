import { Command } from 'commander';
import { DEFAULT_JOBS_FILE, ConfigError, JobConfig, JobsFile, checkJobFiles, formatProblem, loadJobsFile, selectJobs } from '../jobs/config.js';
import { JobOutcome, describeRun, isDue, lastStarted, runJob } from '../jobs/runner.js';
import { runRecordJson } from '../jobs/history.js';
import type { Repository } from '../repository/repository.js';
import { isSshSpec, warnIfNoNativeCrypto } from '../source/ssh.js';
import { UsageError } from '../util/errors.js';
import { Progress } from '../util/progress.js';
import path from 'node:path';
import { updateMetrics } from '../jobs/metrics.js';
import { logLine, setLogFormat } from '../util/log.js';
import { action, jobsRepoPath, logFormatOption, metricsFileOption, openRepository, printJson, repoDirOf, wantsJson } from './common.js';

interface RunFlags {
  config: string;
  all?: boolean;
  now?: boolean;
  check?: boolean;
  verbose?: boolean;
  logFormat: string;
  metricsFile?: string;
}

export function register(program: Command): void {
  program
    .command('run')
    .description('run the backup jobs that are due (for cron and systemd timers): hooks, backup, retention')
    .argument('[jobs...]', 'only these jobs (default: every job in the file)')
    .option('-c, --config <file>', 'job file', DEFAULT_JOBS_FILE)
    .option('--all', 'run every job now, due or not')
    .option('--now', 'run the named jobs now, due or not')
    .option('--check', 'only check the job file and list every problem in it')
    .option('-v, --verbose', 'also say which jobs are not due, and when they are next')
    .option('--json', 'print the run records as JSON')
    .addOption(logFormatOption())
    .addOption(metricsFileOption())
    .addHelpText(
      'after',
      '\nA job is due when a scheduled time has passed since it last started; a job that never ran\n' +
        'is due at once. Jobs run one after another. Each prints one line; failures go to stderr\n' +
        'and make the exit status 1. A job whose image is being backed up by another process is\n' +
        'skipped (not counted as a failure). Every run is recorded for `genvault status`.\n\n' +
        'Each run: pre-hooks in order (a failing one skips the read), the backup, every post-hook\n' +
        '(always, even after a failure), then the retention. Hooks get GENVAULT_JOB, GENVAULT_IMAGE,\n' +
        'GENVAULT_SOURCE, GENVAULT_SOURCE_PATH, GENVAULT_PHASE and, after the read, GENVAULT_RESULT\n' +
        '(ok|failed) and GENVAULT_GENERATION.\n\n' +
        'notify: in the job file reports failed runs (or every run) to a command, by e-mail or to a\n' +
        'webhook; a notification that cannot be sent is an err line, the exit status stays the run\'s.\n\n' +
        'Examples:\n' +
        '  */10 * * * *  root  genvault run          # /etc/cron.d/genvault\n' +
        '  genvault run --check --config ./jobs.yaml\n' +
        '  genvault run vm1 --now\n' +
        '  genvault run --log-format journal --metrics-file /var/lib/prometheus/node-exporter/genvault.prom',
    )
    .action(
      action(async (names: string[], o: RunFlags, cmd: Command) => {
        setLogFormat(o.logFormat);
        if (o.all && names.length) throw new UsageError('--all runs every job; name jobs or give --all, not both');
        if (o.now && !names.length) throw new UsageError('--now needs job names (or use --all)');
        if (o.check) {
          try {
            const f = await loadJobsFile(o.config);
            const unsafe = await checkJobFiles(f);
            if (unsafe.length) {
              for (const l of unsafe) process.stderr.write(`${o.config}: ${l}\n`);
              process.exit(1);
            }
            process.stdout.write(`${o.config}: ok, ${f.jobs.length} job${f.jobs.length === 1 ? '' : 's'}: ${f.jobs.map((j) => j.name).join(', ')}\n`);
          } catch (e) {
            if (!(e instanceof ConfigError)) throw e;
            for (const p of e.problems) process.stderr.write(`${formatProblem(e.file, p)}\n`);
            process.exit(1);
          }
          return;
        }
        const file = await loadJobsFile(o.config);
        const jobs = selectJobs(file, names);
        const repo = await openRepository(await repoDirOf(jobsRepoPath(cmd, file.repository, file.keyFile), cmd), { write: true });
        let outcomes: JobOutcome[];
        try {
          outcomes = await runSelected(repo, file, jobs, o, wantsJson(cmd));
        } finally {
          await repo.close().catch(() => undefined);
        }
        if (wantsJson(cmd)) printJson(outcomes.map((x) => (x.skipped ? { job: x.job, skipped: x.reason } : runRecordJson(x.record))));
        if (outcomes.some((x) => !x.skipped && x.record.status === 'failed')) process.exitCode = 1;
      }),
    );
}

/** Run the jobs that are due (all of them with --all/--now), one line each; metrics after each and at the end. */
async function runSelected(repo: Repository, file: JobsFile, jobs: JobConfig[], o: RunFlags, json: boolean): Promise<JobOutcome[]> {
  const outcomes: JobOutcome[] = [];
  const metricsFile = o.metricsFile && path.resolve(o.metricsFile);
  const writeMetrics = async () => {
    const m = await updateMetrics(repo, file, metricsFile);
    if (m) logLine('err', m, 'err');
  };
  let warned = false;
  for (const job of jobs) {
    const now = Date.now();
    if (!o.all && !o.now) {
      const last = await lastStarted(repo, job.name);
      if (!isDue(job, last, now)) {
        if (o.verbose) {
          const next = job.schedule ? `next at ${job.schedule.next(now).toISOString()}` : 'no schedule (run it with --now)';
          logLine('info', `${job.name}: not due, ${next}`);
        }
        continue;
      }
    }
    if (!warned && isSshSpec(job.source) && !job.ssh.command) {
      warnIfNoNativeCrypto();
      warned = true;
    }
    const progress = new Progress(`${job.name}`);
    let outcome: JobOutcome;
    try {
      outcome = await runJob(repo, job, { by: 'run', ifDue: !o.all && !o.now, onProgress: (d, t) => progress.update(d, t) });
    } finally {
      progress.done();
    }
    outcomes.push(outcome);
    if (!json) {
      const failed = !outcome.skipped && outcome.record.status === 'failed';
      logLine(failed ? 'err' : outcome.skipped ? 'notice' : 'info', describeRun(outcome), failed ? 'err' : 'out');
    }
    if (!outcome.skipped) for (const p of outcome.notifyProblems ?? []) logLine('err', p, 'err');
    await writeMetrics();
  }
  // Nothing ran: the file still says when genvault last looked, and shows every job.
  if (!outcomes.length) await writeMetrics();
  return outcomes;
}

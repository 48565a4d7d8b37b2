/**
 * The built-in scheduler (`genvault daemon`, for a systemd service): sleeps until the next
 * scheduled time of any job, then runs every due job one after another, exactly as
 * `genvault run` would. Due-ness comes from the run history in the repository, so the
 * daemon, cron and hand-made runs never run a job twice for one scheduled time.
 *
 * Stopping: a stop request while idle ends the loop at once; while a job runs, the loop
 * ends after it (its post-hooks must run: they thaw file systems and remove snapshots).
 * Reload re-reads the job file; a file with errors is reported and the old one kept.
 */
import type { Repository } from '../repository/repository.js';
import { objectStoreDirOr } from '../repository/location.js';
import { openCurrent } from '../lifecycle/open-current.js';
import { JobsFile, loadJobsFile } from './config.js';
import { JobOutcome, describeRun, isDue, lastStarted, runJob } from './runner.js';
import { updateMetrics } from './metrics.js';
import type { LogLevel } from '../util/log.js';

export interface DaemonOptions {
  configFile: string;
  /** The repository directory for a loaded job file. */
  repoFor: (f: JobsFile) => string;
  /** A log line at a syslog level (failures at err, so `journalctl -p err` finds them). */
  log: (line: string, level?: LogLevel) => void;
  /** Prometheus textfile written after every job (metrics.ts). */
  metricsFile?: string;
  /** Longest sleep between checks (ms); also bounds how late a clock jump is noticed. */
  maxSleepMs?: number;
}

export class Daemon {
  private file: JobsFile | null = null;
  private stopping = false;
  private wake: (() => void) | null = null;
  running: string | null = null;

  constructor(private opts: DaemonOptions) {}

  async load(): Promise<void> {
    this.file = await loadJobsFile(this.opts.configFile);
  }

  /** Re-read the job file; keep the old jobs if the new file is invalid. */
  async reload(): Promise<void> {
    try {
      await this.load();
      this.opts.log(`reloaded ${this.opts.configFile}: ${this.file!.jobs.length} jobs`);
    } catch (e) {
      this.opts.log(`reload failed, keeping the previous jobs: ${(e as Error).message}`, 'err');
    }
    this.wake?.();
  }

  stop(): void {
    this.stopping = true;
    this.wake?.();
  }

  /** The job file in force. */
  get jobs(): JobsFile | null {
    return this.file;
  }

  get isStopping(): boolean {
    return this.stopping;
  }

  private async sleep(ms: number): Promise<void> {
    if (this.stopping) return;
    await new Promise<void>((resolve) => {
      const t = setTimeout(done, Math.max(0, ms));
      function done() {
        clearTimeout(t);
        resolve();
      }
      this.wake = done;
    });
    this.wake = null;
  }

  /** Run every due job once. */
  async tick(): Promise<void> {
    const file = this.file!;
    let repo: Repository | null = null;
    try {
      repo = await openCurrent(await objectStoreDirOr(this.opts.repoFor(file)), { write: true });
      for (const job of file.jobs) {
        if (this.stopping) break;
        if (!isDue(job, await lastStarted(repo, job.name), Date.now())) continue;
        this.running = job.name;
        try {
          this.logOutcome(await runJob(repo, job, { by: 'daemon', ifDue: true }));
        } catch (e) {
          this.opts.log(`${job.name}: FAILED: ${(e as Error).message}`, 'err');
        } finally {
          this.running = null;
        }
        const m = await updateMetrics(repo, file, this.opts.metricsFile);
        if (m) this.opts.log(m, 'err');
      }
    } catch (e) {
      this.opts.log(`cannot run jobs: ${(e as Error).message}`, 'err');
    } finally {
      await repo?.close().catch(() => undefined);
    }
  }

  private logOutcome(o: JobOutcome): void {
    const failed = !o.skipped && o.record.status === 'failed';
    this.opts.log(describeRun(o), failed ? 'err' : o.skipped ? 'notice' : 'info');
    if (!o.skipped) for (const p of o.notifyProblems ?? []) this.opts.log(p, 'err');
  }

  /** The metrics file as of now (at start, so it exists before the first job runs). */
  private async writeMetrics(): Promise<void> {
    if (!this.opts.metricsFile) return;
    let repo: Repository | null = null;
    try {
      repo = await openCurrent(await objectStoreDirOr(this.opts.repoFor(this.file!)));
      const m = await updateMetrics(repo, this.file!, this.opts.metricsFile);
      if (m) this.opts.log(m, 'err');
    } catch (e) {
      this.opts.log(`cannot write metrics: ${(e as Error).message}`, 'err');
    } finally {
      await repo?.close().catch(() => undefined);
    }
  }

  async loop(): Promise<void> {
    if (!this.file) await this.load();
    this.opts.log(`started: ${this.file!.jobs.length} jobs from ${this.opts.configFile}`);
    await this.writeMetrics();
    const maxSleep = this.opts.maxSleepMs ?? 60_000;
    while (!this.stopping) {
      await this.tick();
      if (this.stopping) break;
      const now = Date.now();
      let next = now + maxSleep;
      for (const j of this.file!.jobs) if (j.schedule) next = Math.min(next, +j.schedule.next(now));
      await this.sleep(next - Date.now() + 5);
    }
    this.opts.log('stopped');
  }
}

/**
 * Prometheus metrics for node_exporter's textfile collector (`--metrics-file` of `run` and
 * `daemon`): per job its last run, last success, duration and bytes, and the repository's
 * size, from the run history, so every write describes every job whoever ran it. The
 * file is replaced atomically (a temporary file in the same directory, renamed), as the
 * collector may read it at any moment.
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import type { Repository } from '../repository/repository.js';
import type { JobsFile } from './config.js';
import { recentRuns } from './history.js';

const esc = (v: string) => v.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\n');

class Metrics {
  private families = new Map<string, { help: string; lines: string[] }>();

  add(name: string, help: string, labels: Record<string, string>, value: number): void {
    let f = this.families.get(name);
    if (!f) this.families.set(name, (f = { help, lines: [] }));
    const l = Object.entries(labels)
      .map(([k, v]) => `${k}="${esc(v)}"`)
      .join(',');
    f.lines.push(`${name}${l ? `{${l}}` : ''} ${value}`);
  }

  text(): string {
    let out = '';
    for (const [name, f] of this.families) out += `# HELP ${name} ${f.help}\n# TYPE ${name} gauge\n${f.lines.join('\n')}\n`;
    return out;
  }
}

/** The metrics text for a job file's jobs and their repository. */
export async function metricsText(repo: Repository, file: JobsFile): Promise<string> {
  const m = new Metrics();
  for (const job of file.jobs) {
    const runs = await recentRuns(repo, job.name, 200);
    const labels = { job: job.name, image: job.image };
    const last = runs[0];
    const ok = runs.find((r) => r.status === 'ok');
    if (last) {
      m.add('genvault_job_last_run_timestamp_seconds', 'Start of the last run (Unix time).', labels, last.started / 1000);
      m.add('genvault_job_last_run_success', '1 if the last run succeeded, 0 if it failed.', labels, last.status === 'ok' ? 1 : 0);
      m.add('genvault_job_last_run_duration_seconds', 'How long the last run took, hooks included.', labels, (last.finished - last.started) / 1000);
    }
    if (ok) {
      const g = ok.generation;
      m.add('genvault_job_last_success_timestamp_seconds', 'Start of the last successful run (Unix time).', labels, ok.started / 1000);
      m.add('genvault_job_last_success_duration_seconds', 'How long the last successful run took.', labels, (ok.finished - ok.started) / 1000);
      m.add('genvault_job_last_success_bytes_read', 'Bytes of the source read by the last successful run.', labels, g?.bytesRead ?? 0);
      m.add('genvault_job_last_success_bytes_new', 'Bytes the last successful run found new (not yet in the repository).', labels, g?.newBytes ?? 0);
      m.add('genvault_job_last_success_bytes_stored', 'Bytes the last successful run added to the repository (compressed; a sync job: to its destination).', labels, g?.newStored ?? ok.sync?.storedAdded ?? 0);
    }
    m.add('genvault_job_failed_runs', 'Failed runs among the last 200 recorded.', labels, runs.filter((r) => r.status === 'failed').length);
  }
  let packBytes = 0;
  let packs = 0;
  for await (const o of repo.store.list('packs')) {
    packBytes += o.size;
    packs++;
  }
  const gens = await repo.generations();
  const repoLabel = { repository: repo.dir };
  m.add('genvault_repository_size_bytes', 'Bytes of the pack files.', repoLabel, packBytes);
  m.add('genvault_repository_packs', 'Number of pack files.', repoLabel, packs);
  m.add('genvault_repository_generations', 'Number of generations.', repoLabel, gens.length);
  m.add('genvault_repository_images', 'Number of images.', repoLabel, new Set(gens.map((g) => g.name)).size);
  m.add('genvault_metrics_timestamp_seconds', 'When this file was written (Unix time).', {}, Date.now() / 1000);
  return m.text();
}

/** Write the metrics file atomically, readable by the collector (0644). */
export async function writeMetricsFile(file: string, text: string): Promise<void> {
  const tmp = path.join(path.dirname(file), `.${path.basename(file)}.${process.pid}.tmp`);
  try {
    // A new file (O_EXCL): never written through a planted symlink.
    await fs.rm(tmp, { force: true });
    const fh = await fs.open(tmp, 'wx', 0o644);
    try {
      await fh.writeFile(text);
      // Readable by the collector, whatever umask the repository's commands run under (perms.ts).
      await fh.chmod(0o644);
    } finally {
      await fh.close();
    }
    await fs.rename(tmp, file);
  } catch (e) {
    await fs.rm(tmp, { force: true }).catch(() => undefined);
    throw e;
  }
}

/** Write the metrics file if one is wanted; returns a line for the log if that failed. */
export async function updateMetrics(repo: Repository, file: JobsFile, metricsFile: string | undefined): Promise<string | null> {
  if (!metricsFile) return null;
  try {
    await writeMetricsFile(metricsFile, await metricsText(repo, file));
    return null;
  } catch (e) {
    return `cannot write metrics file ${metricsFile}: ${(e as Error).message}`;
  }
}

/**
 * Health for monitoring: each job's last success against its schedule, and each image's
 * generations. States and exit codes follow the monitoring-plugin convention:
 *   OK (0)   the last run succeeded and no scheduled run was missed;
 *   WARN (1) one scheduled run was missed, or the job never ran;
 *   CRIT (2) two or more were missed, or the last run failed.
 * A scheduled time counts as missed once its grace period (default 1h, `grace` in the
 * job file) has passed without a successful run starting at or after it.
 */
import type { Generation } from '../format/generation.js';
import type { JobConfig } from './config.js';
import type { RunRecord } from './history.js';

export type State = 'OK' | 'WARN' | 'CRIT';
export const STATE_EXIT: Record<State, number> = { OK: 0, WARN: 1, CRIT: 2 };

export interface JobHealth {
  state: State;
  /** Scheduled times missed since the last success (capped at 100). */
  missed: number;
  reason: string;
}

/** Judge a job from its runs (newest first) at `now`. Pure. */
export function judgeJob(job: JobConfig, runs: RunRecord[], now: number): JobHealth {
  const last = runs[0];
  const success = runs.find((r) => r.status === 'ok');
  let missed = 0;
  if (job.schedule) {
    // Times from the last successful start (or, never having succeeded, the first run) to now - grace.
    const from = success ? success.started - 1 : runs.length ? runs.at(-1)!.started - 1 : null;
    if (from !== null) missed = job.schedule.between(from, now - job.graceMs, 100).length;
  }
  if (last && last.status === 'failed') {
    return { state: 'CRIT', missed, reason: `last run failed: ${last.error ?? 'unknown error'}` };
  }
  if (!last) {
    return job.schedule ? { state: 'WARN', missed, reason: 'never run' } : { state: 'OK', missed, reason: 'no schedule; never run' };
  }
  if (missed >= 2) return { state: 'CRIT', missed, reason: `${missed >= 100 ? '100 or more' : missed} scheduled runs missed` };
  if (missed === 1) return { state: 'WARN', missed, reason: '1 scheduled run missed' };
  return { state: 'OK', missed, reason: 'ok' };
}

export function worst(states: State[]): State {
  return states.includes('CRIT') ? 'CRIT' : states.includes('WARN') ? 'WARN' : 'OK';
}

export interface ImageSummary {
  name: string;
  generations: number;
  /** Bytes the image's generations added to the repository (compressed, at backup time). */
  storedBytes: number;
  /** Bytes of the newest generation's image. */
  size: number;
  newest: string | null;
}

export function summarizeImage(name: string, gens: Generation[]): ImageSummary {
  const newest = gens.at(-1) ?? null;
  return {
    name,
    generations: gens.length,
    storedBytes: gens.reduce((a, g) => a + (g.stats?.newStored ?? 0), 0),
    size: newest?.size ?? 0,
    newest: newest ? newest.created : null,
  };
}

/** One performance-data item, as monitoring plugins print them: 'label'=value[unit];warn;crit;min;max. */
function perfItem(label: string, value: number, unit = '', warn = '', crit = '', min = ''): string {
  const l = /^[A-Za-z0-9_.-]+$/.test(label) ? label : `'${label.replace(/'/g, "''")}'`;
  return `${l}=${value}${unit};${warn};${crit};${min}`.replace(/;+$/, '');
}

/**
 * Performance data for the summary line (after its `|`): per job the age of the last
 * success in seconds (absent if it never succeeded), the missed runs with their WARN/CRIT
 * thresholds, and the bytes the image stores; per image without a job, its stored bytes.
 */
export function perfData(
  jobs: Array<{ job: string; missed: number; lastSuccess: string | null; storedBytes: number; generations: number }>,
  images: ImageSummary[],
  now: number,
  /** Images whose generations alone are known (a sealed index without its key). */
  countsOnly: ImageSummary[] = [],
): string {
  const out: string[] = [];
  for (const i of countsOnly) out.push(perfItem(`${i.name}_generations`, i.generations, '', '', '', '0'));
  for (const j of jobs) {
    if (j.lastSuccess) out.push(perfItem(`${j.job}_age`, Math.max(0, Math.round((now - Date.parse(j.lastSuccess)) / 1000)), 's', '', '', '0'));
    out.push(perfItem(`${j.job}_missed`, j.missed, '', '1', '2', '0'));
    out.push(perfItem(`${j.job}_generations`, j.generations, '', '', '', '0'));
    out.push(perfItem(`${j.job}_stored`, j.storedBytes, 'B', '', '', '0'));
  }
  for (const i of images) out.push(perfItem(`${i.name}_generations`, i.generations, '', '', '', '0'), perfItem(`${i.name}_stored`, i.storedBytes, 'B', '', '', '0'));
  return out.join(' ');
}

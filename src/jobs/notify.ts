/**
 * Notifications of a job's run (`notify:` in the job file): a command (the run as JSON
 * on its stdin, the figures in GENVAULT_* variables), an e-mail through sendmail, an HTTP
 * POST of the JSON to a webhook. On failed runs only, or with `on: always` on every run.
 * A notification that fails is returned as a line for the log; it never changes the
 * run's own result.
 */
import { spawn } from 'node:child_process';
import os from 'node:os';
import { bytes, duration } from '../util/format.js';
import type { JobConfig, NotifySpec } from './config.js';
import { type RunRecord, runRecordJson } from './history.js';

/** What every notification carries: the run record with ISO times, and where it ran. */
export function notificationPayload(rec: RunRecord, repository: string): Record<string, unknown> {
  return { event: rec.status === 'ok' ? 'success' : 'failure', host: os.hostname(), repository, ...runRecordJson(rec) };
}

/** Run argv with `input` on stdin, killed after timeoutMs; resolves to null or what went wrong. */
function runWithInput(argv: string[], input: string, env: Record<string, string>, timeoutMs: number): Promise<string | null> {
  return new Promise((resolve) => {
    let output = '';
    const child = spawn(argv[0]!, argv.slice(1), { env: { ...process.env, ...env }, stdio: ['pipe', 'pipe', 'pipe'], detached: true });
    const keep = (d: Buffer) => (output = (output + d.toString()).slice(-2000));
    child.stdout.on('data', keep);
    child.stderr.on('data', keep);
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      try {
        process.kill(-child.pid!, 'SIGKILL');
      } catch {
        /* gone */
      }
    }, timeoutMs);
    child.on('error', (e) => {
      clearTimeout(timer);
      resolve(`could not run: ${e.message}`);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      const last = output.trim().split('\n').at(-1)?.trim();
      if (timedOut) resolve(`timed out after ${Math.round(timeoutMs / 1000)} s`);
      else if (code !== 0) resolve(`${signal ? `killed by ${signal}` : `exited with status ${code}`}${last ? `: ${last}` : ''}`);
      else resolve(null);
    });
    child.stdin.on('error', () => undefined);
    child.stdin.end(input);
  });
}

/** The figures of a run as environment variables for a notify command. */
function notifyEnv(rec: RunRecord, repository: string): Record<string, string> {
  const g = rec.generation;
  return {
    GENVAULT_JOB: rec.job,
    GENVAULT_IMAGE: rec.image,
    GENVAULT_REPOSITORY: repository,
    GENVAULT_STATUS: rec.status,
    GENVAULT_STAGE: rec.stage ?? '',
    GENVAULT_ERROR: rec.error ?? '',
    GENVAULT_STARTED: new Date(rec.started).toISOString(),
    GENVAULT_DURATION_MS: String(rec.finished - rec.started),
    GENVAULT_GENERATION: g?.id ?? '',
    GENVAULT_BYTES_READ: String(g?.bytesRead ?? 0),
    GENVAULT_BYTES_NEW: String(g?.newBytes ?? 0),
    GENVAULT_BYTES_STORED: String(g?.newStored ?? 0),
  };
}

/** What one notification says, in each form: JSON, environment, e-mail. */
export interface Notice {
  payload: Record<string, unknown>;
  env: Record<string, string>;
  subject: string;
  /** The e-mail's text before the JSON. */
  lines: string[];
}

/** A plain-text e-mail (headers and body) for sendmail -t. */
export function mailMessage(to: string[], notice: Notice): string {
  // Header values come from the job file and the run: no line breaks may reach them.
  const header = (v: string) => v.replace(/[\r\n]+/g, ' ');
  const body = [...notice.lines, '', JSON.stringify(notice.payload, null, 2)];
  return [`To: ${header(to.join(', '))}`, `Subject: ${header(notice.subject)}`, 'Content-Type: text/plain; charset=utf-8', 'MIME-Version: 1.0', '', ...body, ''].join('\n');
}

/** A run's notice: the record, its figures, one subject line. */
function runNotice(rec: RunRecord, repository: string): Notice {
  const ok = rec.status === 'ok';
  const g = rec.generation;
  return {
    payload: notificationPayload(rec, repository),
    env: notifyEnv(rec, repository),
    subject: `genvault: job ${rec.job} ${ok ? 'succeeded' : `FAILED (${rec.stage})`} on ${os.hostname()}`,
    lines: [
      `Job:        ${rec.job} (image ${rec.image})`,
      `Result:     ${ok ? 'ok' : `failed at ${rec.stage}`}`,
      ...(rec.error ? [`Error:      ${rec.error}`] : []),
      `Started:    ${new Date(rec.started).toISOString()}, took ${duration(rec.finished - rec.started)}`,
      ...(g ? [`Generation: ${g.id}: ${bytes(g.bytesRead)} read, ${bytes(g.newBytes)} new, ${bytes(g.newStored)} stored`] : []),
    ],
  };
}

async function postWebhook(url: string, payload: Record<string, unknown>, timeoutMs: number): Promise<string | null> {
  try {
    const res = await fetch(url, {
      method: 'POST',
      headers: { 'content-type': 'application/json', 'user-agent': 'genvault' },
      body: JSON.stringify(payload),
      signal: AbortSignal.timeout(timeoutMs),
    });
    await res.arrayBuffer().catch(() => undefined);
    return res.ok ? null : `HTTP ${res.status} ${res.statusText}`;
  } catch (e) {
    const err = e as Error & { cause?: Error };
    return err.name === 'TimeoutError' ? `timed out after ${Math.round(timeoutMs / 1000)} s` : (err.cause?.message ?? err.message);
  }
}

/** Send a notice every way `n` names; returns a line per way that failed, each starting with `label`. */
export async function sendNotice(n: NotifySpec, notice: Notice, label: string): Promise<string[]> {
  const json = JSON.stringify(notice.payload);
  const problems: string[] = [];
  const note = (what: string) => (why: string | null) => void (why && problems.push(`${label}: notification ${what} failed: ${why}`));
  const sends: Array<Promise<void>> = [];
  if (n.command) sends.push(runWithInput(['/bin/sh', '-c', n.command], json, notice.env, n.timeoutMs).then(note(`command "${n.command}"`)));
  if (n.email?.length) sends.push(runWithInput([n.sendmail, '-t', '-oi'], mailMessage(n.email, notice), {}, n.timeoutMs).then(note(`e-mail to ${n.email.join(', ')} (${n.sendmail})`)));
  // Only the origin in messages: a webhook's path often holds its secret token.
  if (n.webhook) sends.push(postWebhook(n.webhook, notice.payload, n.timeoutMs).then(note(`webhook ${new URL(n.webhook).origin}`)));
  await Promise.all(sends);
  return problems;
}

/** Send a run's notifications as the job asks; returns a line per notification that failed. */
export async function notifyRun(job: JobConfig, rec: RunRecord, repository: string): Promise<string[]> {
  const n = job.notify;
  if (!n || (n.on === 'failure' && rec.status === 'ok')) return [];
  return sendNotice(n, runNotice(rec, repository), job.name);
}

/** A notice that a systemd unit failed (`genvault notify --unit`, run by the units' OnFailure=). */
export function unitNotice(unit: string, message: string, journal: string[]): Notice {
  const host = os.hostname();
  return {
    payload: { event: 'failure', host, unit, status: 'failed', error: message, time: new Date().toISOString(), journal },
    env: { GENVAULT_UNIT: unit, GENVAULT_STATUS: 'failed', GENVAULT_ERROR: message },
    subject: `genvault: ${unit} FAILED on ${host}`,
    lines: [`Unit:   ${unit}`, `Error:  ${message}`, '', 'Last journal lines:', ...journal.map((l) => `  ${l}`)],
  };
}

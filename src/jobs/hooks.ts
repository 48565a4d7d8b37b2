/**
 * Hooks: shell commands run before and after a job reads its source, here (`sh -c`) or on
 * the source's host over the job's own SSH connection. Each gets the job's context in
 * GENVAULT_* environment variables, runs with a timeout (then it is killed), and its
 * output is kept (the tail) for the run record and error messages.
 */
import { spawn } from 'node:child_process';
import { startUmask } from '../repository/perms.js';
import { octalMode } from '../util/format.js';
import { exitText } from '../util/proc.js';
import type { SshConnection } from '../source/ssh.js';
import { shq } from '../source/ssh.js';
import type { HookSpec } from './config.js';
import type { HookRecord } from './history.js';

const OUTPUT_TAIL = 4096;

function tail(s: string): string {
  return s.length > OUTPUT_TAIL ? s.slice(-OUTPUT_TAIL) : s;
}

/** The last non-empty line of a hook's output, for one-line error messages. */
export function lastLine(s: string): string {
  return s.trim().split('\n').filter(Boolean).at(-1)?.trim() ?? '';
}

function describeExit(code: number | null, signal: string | null, timedOut: boolean, timeoutMs: number): string {
  if (timedOut) return `timed out after ${Math.round(timeoutMs / 1000)} s and was killed`;
  return exitText(code, signal);
}

async function runLocal(hook: HookSpec, env: Record<string, string>): Promise<{ code: number | null; signal: string | null; output: string; timedOut: boolean; spawnError?: string }> {
  return new Promise((resolve) => {
    let output = '';
    let timedOut = false;
    // A process group of its own, so a timeout kills the whole pipeline the hook started.
    // Under the umask genvault started with, not the repository's (perms.ts).
    const script = `umask ${octalMode(startUmask())}; ${hook.run}`;
    const child = spawn('/bin/sh', ['-c', script], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
    const onData = (d: Buffer) => (output = tail(output + d.toString()));
    child.stdout.on('data', onData);
    child.stderr.on('data', onData);
    const timer = setTimeout(() => {
      timedOut = true;
      try {
        process.kill(-child.pid!, 'SIGKILL');
      } catch {
        /* already gone */
      }
    }, hook.timeoutMs);
    child.on('error', (e) => {
      clearTimeout(timer);
      resolve({ code: null, signal: null, output, timedOut, spawnError: e.message });
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, output, timedOut });
    });
  });
}

async function runRemote(
  hook: HookSpec,
  env: Record<string, string>,
  conn: SshConnection,
): Promise<{ code: number | null; signal: string | null; output: string; timedOut: boolean; spawnError?: string }> {
  const exports = Object.entries(env)
    .map(([k, v]) => `${k}=${shq(v)}`)
    .join(' ');
  let ch;
  try {
    ch = await conn.exec(`env ${exports} /bin/sh -c ${shq(hook.run)}`);
  } catch (e) {
    return { code: null, signal: null, output: '', timedOut: false, spawnError: (e as Error).message };
  }
  return new Promise((resolve) => {
    let output = '';
    let timedOut = false;
    let code: number | null = null;
    let signal: string | null = null;
    const onData = (d: Buffer) => (output = tail(output + d.toString()));
    ch.on('data', onData);
    ch.stderr.on('data', onData);
    ch.on('exit', (c: number | null, sig?: string) => {
      code = c;
      signal = sig ?? null;
    });
    const timer = setTimeout(() => {
      timedOut = true;
      try {
        ch.signal('KILL');
      } catch {
        /* not supported by the server */
      }
      ch.close();
    }, hook.timeoutMs);
    const lost = () => {
      clearTimeout(timer);
      resolve({ code: null, signal: null, output, timedOut, spawnError: conn.lost?.message ?? 'connection lost' });
    };
    conn.onLost(lost);
    ch.on('close', () => {
      clearTimeout(timer);
      if (conn.lost && code === null && !timedOut) return lost();
      resolve({ code, signal, output, timedOut });
    });
    ch.end();
  });
}

/**
 * Run one hook; never throws. `conn` is the job's SSH connection for hooks that run on
 * the source host (null for local sources, where such hooks run here).
 */
export async function runHook(
  hook: HookSpec,
  phase: 'pre' | 'post',
  env: Record<string, string>,
  conn: SshConnection | null,
): Promise<HookRecord> {
  const t0 = Date.now();
  const remote = hook.on === 'source' && conn !== null;
  const r = remote ? await runRemote(hook, env, conn) : await runLocal(hook, env);
  const ok = !r.spawnError && !r.timedOut && r.code === 0;
  const where = remote ? ` on ${conn.spec.host}` : '';
  let error: string | undefined;
  if (!ok) {
    const why = r.spawnError ? `could not run: ${r.spawnError}` : describeExit(r.code, r.signal, r.timedOut, hook.timeoutMs);
    const out = lastLine(r.output);
    error = `${phase}-hook "${hook.run}"${where} ${why}${out ? `: ${out}` : ''}`;
  }
  return { phase, run: hook.run, on: remote ? 'source' : 'local', ok, code: r.code, durationMs: Date.now() - t0, output: r.output, ...(error ? { error } : {}) };
}

/** What every command shares: finding the repository, JSON output, error exit. */
import { Option, type Command } from 'commander';
import { GenvaultError, REPAIR_HINT, UsageError, describeFsError, errnoOf, innermostMessage } from '../util/errors.js';
import type { Repository } from '../repository/repository.js';
import { useKeyFile } from '../repository/keys.js';
import { logFormat } from '../util/log.js';

export interface GlobalOpts {
  repo?: string;
  json?: boolean;
  s3Endpoint?: string;
  s3Region?: string;
  cacheDir?: string;
}

export function repoPath(cmd: Command): string {
  const o = cmd.optsWithGlobals() as GlobalOpts;
  const dir = o.repo ?? process.env.GENVAULT_REPO;
  if (!dir) throw new UsageError('no repository given: use -r/--repo DIR or set GENVAULT_REPO');
  return dir;
}

/** "key list" for the list subcommand of key: the words after `genvault`. */
function commandPath(cmd: Command): string {
  const words: string[] = [];
  for (let c: Command | null = cmd; c?.parent; c = c.parent) words.unshift(c.name());
  return words.join(' ');
}

/**
 * The repository of a command that works on a local one only: an ssh:// repository is
 * refused in one line that says what does work over SSH.
 */
export function localRepoPath(cmd: Command): string {
  const p = repoPath(cmd);
  if (p.startsWith('ssh://')) {
    throw new UsageError(
      `${commandPath(cmd)} needs a local repository; over ssh:// list, info, backup, restore, cat, mount, verify, forget, protect and sync work, the rest is for the server's admin`,
    );
  }
  return p;
}

/**
 * The directory a command opens: the repository's, or an s3:// repository's local cache
 * directory (made, with its store.json, when missing; repository/location.ts).
 */
export async function localRepoDir(cmd: Command): Promise<string> {
  return repoDirOf(localRepoPath(cmd), cmd);
}

/** The directory of a repository named on the command line (sync's SRC and DST too). */
export async function repoDirOf(p: string, cmd: Command): Promise<string> {
  const o = cmd.optsWithGlobals() as GlobalOpts;
  const { objectStoreDirOr } = await import('../repository/location.js');
  return objectStoreDirOr(p, { endpoint: o.s3Endpoint, region: o.s3Region, cacheDir: o.cacheDir });
}

type OpenOptions = Parameters<typeof Repository.open>[1];

/** Repository.open, an object store's index cache rebuilt first when missing or behind (lifecycle/open-current.ts). */
export async function openRepository(dir: string, opts: OpenOptions = {}): Promise<Repository> {
  const { openCurrent } = await import('../lifecycle/open-current.js');
  return openCurrent(dir, opts);
}

export function wantsJson(cmd: Command): boolean {
  return (cmd.optsWithGlobals() as GlobalOpts).json === true;
}

/** Open the repository for a command; `write` for commands that change it (see Repository.open). */
export async function withRepo<T>(cmd: Command, fn: (repo: Repository) => Promise<T>, opts: OpenOptions = {}): Promise<T> {
  // Imported here: every command loads this module, and repository.ts brings LevelDB and
  // the worker pool with it, which repair loads only once it has started deriving the key
  // (lifecycle/repair.ts).
  const repo = await openRepository(await localRepoDir(cmd), opts);
  try {
    return await fn(repo);
  } finally {
    await repo.close().catch(() => undefined);
  }
}

/** withRepo for commands that change the repository (its directories are tightened first). */
export function withWritableRepo<T>(cmd: Command, fn: (repo: Repository) => Promise<T>): Promise<T> {
  return withRepo(cmd, fn, { write: true });
}

export function printJson(v: unknown): void {
  process.stdout.write(JSON.stringify(v, null, 2) + '\n');
}

/**
 * Exit codes: 0 ok, 1 error, 2 usage. `status` follows the monitoring-plugin convention
 * instead (0 OK, 1 WARN, 2 CRIT, 3 UNKNOWN): its errors that are not a judgement of the
 * repository, usage errors included, are UNKNOWN (exit 3, with an UNKNOWN line on stdout).
 */
let monitoring = false;

export function useMonitoringExitCodes(): void {
  monitoring = true;
}

/** Exit codes this process may end with (main.ts maps any other to an error). */
export function allowedExitCodes(): number[] {
  return monitoring ? [0, 1, 2, 3] : [0, 1, 2];
}

/** The exit code for an error (1) or a usage error (2); UNKNOWN (3) for both under `status`. */
export function errorExitCode(usage = false): number {
  return monitoring ? 3 : usage ? 2 : 1;
}

/** The one line (without "genvault: ") that says what went wrong, for any thrown value. */
export function errorLine(err: unknown): string {
  if (err instanceof GenvaultError) return err.message;
  // LevelDB's own words name the file ("IO error: REPO/index/LOCK: Read-only file system").
  if (String((err as { code?: unknown })?.code).startsWith('LEVEL_')) {
    const m = innermostMessage(err);
    return `index database: ${m}${/corrupt/i.test(m) ? `; ${REPAIR_HINT}` : ''}`;
  }
  // An errno error that no layer described: name the file if node did.
  const path = (err as NodeJS.ErrnoException)?.path;
  if (errnoOf(err)) return path ? describeFsError(err, path).message : innermostMessage(err);
  return `internal error: ${err instanceof Error ? err.message : String(err)}`;
}

function writeErrorLine(line: string, exitCode: number): void {
  if (monitoring && exitCode === 3) process.stdout.write(`UNKNOWN: ${line}\n`);
  else process.stderr.write(`${logFormat() === 'journal' ? '<3>' : ''}genvault: ${line}\n`);
}

/** Print one clear line and exit; stack traces only with GENVAULT_DEBUG=1. */
export function fail(err: unknown): never {
  // verify's "could not run" is its own exit 2 (GenvaultError.exitCode); any other code is 1.
  const own = err instanceof GenvaultError ? err.exitCode : 1;
  const exitCode = monitoring ? 3 : own === 2 ? 2 : 1;
  writeErrorLine(errorLine(err), exitCode);
  if (process.env.GENVAULT_DEBUG) process.stderr.write(`${(err as Error)?.stack ?? String(err)}\n`);
  process.exit(exitCode);
}

/** A usage error detected outside commander: one line, exit 2 (3 under `status`). */
export function failUsage(line: string): never {
  const exitCode = errorExitCode(true);
  writeErrorLine(line, exitCode);
  process.exit(exitCode);
}

/**
 * Signals. SIGINT, SIGTERM and SIGHUP end a command with one line and exit 1 (not 130,
 * 143 or 129), saying what the interruption left behind when the command said so with
 * onInterrupt(). mount and daemon handle signals themselves and do not install these.
 */
let interruptLine: ((sig: NodeJS.Signals) => string | null) | null = null;
let holding = 0;
let heldSignal: NodeJS.Signals | null = null;

/**
 * The line printed if a signal ends the command now (null: the generic one). `line` runs
 * synchronously just before the exit: it may also undo what must not stay (a partial file).
 */
export function onInterrupt(line: ((sig: NodeJS.Signals) => string | null) | null): void {
  interruptLine = line;
}

function interrupted(sig: NodeJS.Signals): void {
  if (holding) {
    heldSignal ??= sig;
    return;
  }
  const line = interruptLine?.(sig) ?? `interrupted by ${sig}`;
  writeErrorLine(line, errorExitCode());
  process.exit(errorExitCode());
}

export function exitOnSignals(): void {
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.on(sig, () => interrupted(sig));
}

/**
 * Run fn with signals held: one that arrives meanwhile ends the command only once fn has
 * settled (a commit is then either done or not started, never unknown).
 */
export async function holdingSignals<T>(fn: () => Promise<T>): Promise<T> {
  holding++;
  try {
    return await fn();
  } finally {
    holding--;
    if (!holding && heldSignal) interrupted(heldSignal);
  }
}

/** Wrap an action so that any error ends in fail(). */
export function action<A extends unknown[]>(fn: (...args: A) => Promise<void>): (...args: A) => Promise<void> {
  return async (...args: A) => {
    try {
      await fn(...args);
    } catch (e) {
      fail(e);
    }
  };
}

export function collect(v: string, prev: string[] = []): string[] {
  return [...prev, v];
}

/**
 * The repository for job commands: -r/--repo, else the job file's `repository:`, else
 * GENVAULT_REPO.
 */
export function jobsRepoPath(cmd: Command, fromFile: string | null, keyFile: string | null = null): string {
  const o = cmd.optsWithGlobals() as GlobalOpts & { keyFile?: string };
  // The job file's key-file, unless --key-file names another (an encrypted repository's key).
  if (keyFile && o.keyFile === undefined) useKeyFile(keyFile);
  const dir = o.repo ?? fromFile ?? process.env.GENVAULT_REPO;
  if (!dir) throw new UsageError('no repository given: set "repository:" in the job file, use -r/--repo DIR, or set GENVAULT_REPO');
  if (dir.startsWith('ssh://')) throw new UsageError('jobs run against a local repository; to copy to one on another host, use a sync: job with to: ssh://...');
  return dir;
}

/** The --log-format option of `run` and `daemon` (validated by commander's choices). */
export function logFormatOption(): Option {
  return new Option('--log-format <format>', 'auto (journal when writing to the systemd journal), text, or journal (sd-daemon <N> priority prefixes: failures at err)')
    .choices(['auto', 'text', 'journal'])
    .default('auto');
}

/** The --metrics-file option of `run` and `daemon`. */
export function metricsFileOption(): Option {
  return new Option('--metrics-file <file>', 'after each job, write Prometheus metrics of every job and the repository to FILE (atomically; for node_exporter\'s textfile collector)');
}

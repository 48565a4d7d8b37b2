/** What every command shares: finding the repository, JSON output, error exit. */
import type { Command } from 'commander';
import { GenvaultError, UsageError } from '../util/errors.js';
import { Repository } from '../repo/repository.js';

export interface GlobalOpts {
  repo?: string;
  json?: boolean;
}

export function repoPath(cmd: Command): string {
  const o = cmd.optsWithGlobals() as GlobalOpts;
  const dir = o.repo ?? process.env.GENVAULT_REPO;
  if (!dir) throw new UsageError('no repository given: use -r/--repo DIR or set GENVAULT_REPO');
  return dir;
}

export function wantsJson(cmd: Command): boolean {
  return (cmd.optsWithGlobals() as GlobalOpts).json === true;
}

/** Open the repository for a command; `write` for commands that change it (see Repository.open). */
export async function withRepo<T>(cmd: Command, fn: (repo: Repository) => Promise<T>, opts: { write?: boolean } = {}): Promise<T> {
  const repo = await Repository.open(repoPath(cmd), opts);
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

/** Print one clear line and exit; stack traces only with GENVAULT_DEBUG=1. */
export function fail(err: unknown): never {
  if (err instanceof GenvaultError) {
    process.stderr.write(`genvault: ${err.message}\n`);
    if (process.env.GENVAULT_DEBUG) process.stderr.write(`${err.stack}\n`);
    process.exit(err.exitCode);
  }
  const e = err as Error;
  process.stderr.write(`genvault: internal error: ${e?.message ?? String(err)}\n`);
  if (process.env.GENVAULT_DEBUG) process.stderr.write(`${e?.stack}\n`);
  process.exit(1);
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
export function jobsRepoPath(cmd: Command, fromFile: string | null): string {
  const o = cmd.optsWithGlobals() as GlobalOpts;
  const dir = o.repo ?? fromFile ?? process.env.GENVAULT_REPO;
  if (!dir) throw new UsageError('no repository given: set "repository:" in the job file, use -r/--repo DIR, or set GENVAULT_REPO');
  return dir;
}

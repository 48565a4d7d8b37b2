/**
 * Errors a user can act on. The CLI prints `genvault: <message>` and exits with
 * `exitCode`, never a stack trace. Anything that is not a GenvaultError is a bug and
 * is printed with its stack under GENVAULT_DEBUG=1 only.
 */
export class GenvaultError extends Error {
  constructor(
    message: string,
    readonly code: string,
    readonly exitCode = 1,
  ) {
    super(message);
    this.name = 'GenvaultError';
  }
}

/** What every report of a damaged or missing index ends with. */
export const REPAIR_HINT = "'genvault repair' rebuilds the index from the packs";

export class UsageError extends GenvaultError {
  constructor(message: string) {
    super(message, 'USAGE', 2);
  }
}

/** A chunk whose bytes do not match its digest or whose record is unreadable. */
export class DamageError extends GenvaultError {
  constructor(
    message: string,
    readonly digest: string,
    readonly ranges: Array<{ offset: number; length: number }> = [],
  ) {
    super(message, 'DAMAGED', 1);
  }
}

/**
 * The error that made this process's index unusable: rave-level reports a leader it cannot
 * open or replace (read-only or full file system) as an 'error' event, after which every
 * request fails with a bare "Database is not open". Kept so that such a failure can name
 * its real cause (see causes()).
 */
let indexFailure: Error | null = null;
/** Set by the command line: its one error line reports an index failure, so db.ts need not log one. */
let indexFailureReported = false;

/** Record the error that killed the index; true if the caller's error line will report it. */
export function noteIndexFailure(err: Error): boolean {
  indexFailure ??= err;
  return indexFailureReported;
}

/** The error that made this process's index unusable, if one did. */
export function noteOfIndexFailure(): Error | null {
  return indexFailure;
}

export function reportIndexFailureInErrorLine(): void {
  indexFailureReported = true;
}

/**
 * An error and the errors it wraps, outermost first. LevelDB errors arrive as
 * "Could not get value" or "Database is not open" with the real one (an IO error naming
 * errno text) in `cause`; once the index failed (noteIndexFailure),
 * its bare errors bring in that failure.
 */
export function causes(err: unknown): unknown[] {
  const out: unknown[] = [];
  const seen = new Set<unknown>();
  let e: unknown = err;
  while (e != null && !seen.has(e) && out.length < 16) {
    seen.add(e);
    out.push(e);
    const next = (e as { cause?: unknown }).cause;
    // Once the index failed, LevelDB's bare errors ("Database is not open", "Aborted on
    // iterator close()") are its consequences.
    if (next == null && String((e as { code?: unknown }).code).startsWith('LEVEL_') && indexFailure && !seen.has(indexFailure)) e = indexFailure;
    else e = next;
  }
  return out;
}

const ERRNO_TEXT: Array<[RegExp, string]> = [
  [/no space left on device/i, 'ENOSPC'],
  [/disk quota exceeded/i, 'EDQUOT'],
  [/read-only file system/i, 'EROFS'],
  [/permission denied/i, 'EACCES'],
  [/input\/output error/i, 'EIO'],
];

/** The errno code behind an error: its own, a wrapped one's, or one named in a LevelDB error's text. */
export function errnoOf(err: unknown): string | undefined {
  const chain = causes(err);
  for (const e of chain) {
    const code = (e as { code?: unknown })?.code;
    if (typeof code === 'string' && /^E[A-Z0-9]+$/.test(code)) return code;
  }
  for (const e of chain) {
    const m = (e as Error)?.message;
    if (typeof m !== 'string' || !String((e as { code?: unknown }).code).startsWith('LEVEL_')) continue;
    for (const [re, code] of ERRNO_TEXT) if (re.test(m)) return code;
  }
  return undefined;
}

/** The file system is full (or the quota used up), anywhere in the error's cause chain. */
export function isNoSpace(err: unknown): boolean {
  const code = errnoOf(err);
  return code === 'ENOSPC' || code === 'EDQUOT';
}

/** The most specific message in a cause chain (LevelDB's wrappers say nothing). */
export function innermostMessage(err: unknown): string {
  const chain = causes(err);
  for (let i = chain.length - 1; i >= 0; i--) {
    const m = (chain[i] as Error)?.message;
    if (typeof m === 'string' && m) return m;
  }
  return String(err);
}

/**
 * Turn low-level errno errors into one clear line about `what`. An error that already is
 * one (a GenvaultError, which may carry an errno code) passes through unchanged: the inner
 * layer named the file more precisely than the caller can. LevelDB errors are described
 * by their cause.
 */
export function describeFsError(err: unknown, what: string): GenvaultError {
  if (err instanceof GenvaultError) return err;
  const e = err as NodeJS.ErrnoException;
  const code = errnoOf(err);
  switch (code) {
    case 'ENOENT':
      return new GenvaultError(`${what}: no such file or directory`, 'ENOENT');
    case 'EACCES':
    case 'EPERM':
      return new GenvaultError(`${what}: permission denied`, code);
    case 'ENOSPC':
      return new GenvaultError(`${what}: no space left on device`, 'ENOSPC');
    case 'EDQUOT':
      return new GenvaultError(`${what}: disk quota exceeded`, 'ENOSPC');
    case 'EISDIR':
      return new GenvaultError(`${what}: is a directory`, 'EISDIR');
    case 'EIO':
      return new GenvaultError(`${what}: input/output error`, 'EIO');
    case 'EROFS':
      return new GenvaultError(`${what}: read-only file system`, 'EROFS');
    default:
      return new GenvaultError(`${what}: ${err == null ? String(err) : innermostMessage(err)}`, code ?? e?.code ?? 'ERROR');
  }
}

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
 * Turn low-level errno errors into one clear line about `what`. An error that already is
 * one (a GenvaultError, which may carry an errno code) passes through unchanged: the inner
 * layer named the file more precisely than the caller can.
 */
export function describeFsError(err: unknown, what: string): GenvaultError {
  if (err instanceof GenvaultError) return err;
  const e = err as NodeJS.ErrnoException;
  switch (e?.code) {
    case 'ENOENT':
      return new GenvaultError(`${what}: no such file or directory`, 'ENOENT');
    case 'EACCES':
    case 'EPERM':
      return new GenvaultError(`${what}: permission denied`, e.code);
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
      return new GenvaultError(`${what}: ${e?.message ?? String(err)}`, e?.code ?? 'ERROR');
  }
}

/**
 * lseek(SEEK_DATA/SEEK_HOLE) through the small addon in src/native (Node has no binding).
 * Optional: without the addon, or on a file system that refuses these seeks, callers
 * read holes like data, which is correct, only slower.
 */
import { createRequire } from 'node:module';

export interface HoleSeeker {
  /** Next offset >= off where data starts, or -1 when only holes follow. */
  seekData(fd: number, off: number): number;
  /** Next offset >= off where a hole starts (the file end counts as one). */
  seekHole(fd: number, off: number): number;
}

let seeker: HoleSeeker | null | undefined;

export function holeSeeker(): HoleSeeker | null {
  if (seeker === undefined) {
    try {
      seeker = createRequire(import.meta.url)('genvault-holes') as HoleSeeker;
    } catch {
      seeker = null;
    }
  }
  return seeker;
}

/**
 * How many bytes past the start of `view` its memory is aligned to `alignment` (for
 * O_DIRECT reads); null without the addon (or an old build of it): read buffered then.
 */
export function alignSkipper(): ((view: Uint8Array, alignment: number) => number) | null {
  const addon = holeSeeker() as (HoleSeeker & { alignSkip?: (view: Uint8Array, alignment: number) => number }) | null;
  return addon?.alignSkip ? addon.alignSkip.bind(addon) : null;
}

/**
 * Option values parsed by commander itself (Option.argParser): a bad value is refused
 * before the command's action runs, in commander's one line, which names the option and
 * the value and then says what a good one looks like:
 *
 *   genvault: option '--max-size <size>' argument 'lots' is invalid. Expected a size
 *   such as 4096, 512M, 10G or 1.5T (see: genvault backup --help)
 *
 * Exit 2 (3 under `status`), as every usage error (main.ts). The grammars are the ones
 * job files and config.json use (util/duration.ts, util/format.ts); a job file reports
 * its own errors at FILE:LINE (jobs/config.ts).
 */
import { InvalidArgumentError, Option } from 'commander';
import { GROUP_NAME_RE } from '../format/config.js';
import { tryParseDuration } from '../util/duration.js';
import { tryParseSize } from '../util/format.js';

/** Bytes: 4096, 512M, 10G, 1.5T, 256MiB. */
export function sizeArg(v: string): number {
  const n = tryParseSize(v);
  if (n === null) throw new InvalidArgumentError('Expected a size such as 4096, 512M, 10G or 1.5T (binary units K, M, G, T).');
  return n;
}

/** Bytes per second, written as a size: 20M, 512K. */
export function rateArg(v: string): number {
  const n = tryParseSize(v);
  if (n === null) throw new InvalidArgumentError('Expected bytes per second such as 512K or 20M (0: no limit).');
  return n;
}

/** Milliseconds: 0, 90s, 90m, 36h, 7d, 2w, 1d12h. */
export function durationArg(v: string): number {
  const ms = tryParseDuration(v);
  if (ms === null) throw new InvalidArgumentError('Expected a duration such as 0, 90m, 36h, 7d, 2w or 1d12h.');
  return ms;
}

/** A whole number >= 0 (at most 9 digits). */
export function countArg(v: string): number {
  if (!/^\d{1,9}$/.test(v)) throw new InvalidArgumentError('Expected a whole number >= 0, such as 7.');
  return Number(v);
}

/**
 * A percentage, "5" or "5%": above 0 and at most 100, or with `zero` from 0 to 100.
 */
export function percentArg(zero = false): (v: string) => number {
  return (v) => {
    const n = /^\d+(\.\d+)?%?$/.test(v) ? Number(v.replace(/%$/, '')) : NaN;
    if (!((zero ? n >= 0 : n > 0) && n <= 100)) {
      throw new InvalidArgumentError(zero ? 'Expected a percentage from 0 to 100, such as 50.' : 'Expected a percentage above 0 and at most 100, such as 5 or 0.5.');
    }
    return n;
  };
}

/** Milliseconds since the epoch of an ISO date or time. */
export function isoTimeArg(v: string): number {
  const ms = Date.parse(v);
  if (Number.isNaN(ms)) throw new InvalidArgumentError('Expected an ISO date or time such as 2026-05-01 or 2026-05-01T06:00:00Z.');
  return ms;
}

/** A group name or number, for the repository's files. */
export function groupArg(v: string): string {
  if (!GROUP_NAME_RE.test(v)) throw new InvalidArgumentError('Expected a group name (a letter or _, then letters, digits, _ . -; at most 32) or a group number.');
  return v;
}

/**
 * A size option, with a default or without (the caller then picks one, e.g. by what it
 * opens): commander does not parse a default, so the default is given parsed, and shown
 * in --help as written.
 */
export function sizeOption(flags: string, description: string, byDefault?: string): Option {
  const o = new Option(flags, description).argParser(sizeArg);
  return byDefault === undefined ? o : o.default(sizeArg(byDefault), byDefault);
}

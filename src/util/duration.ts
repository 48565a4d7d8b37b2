/**
 * Durations as people write them on a command line or in config.json:
 * "0", "90s", "90m", "36h", "7d", "2w", and sums of those ("1d12h").
 *
 * Hand-written: one strict grammar for the command line (cli/options.ts), job files and
 * config.json's guards.minAge, and formatDuration writes it back exactly (prune --json's
 * minAge). The npm parsers read other grammars: ms takes a bare "7" as 7 milliseconds and
 * refuses "1d12h"; parse-duration reads words and fractions ("1.5h", "90 minutes") that a
 * job file refuses, so the two would disagree about the same value.
 */
import { UsageError } from './errors.js';

const UNITS: Record<string, number> = {
  s: 1000,
  m: 60_000,
  h: 3_600_000,
  d: 86_400_000,
  w: 7 * 86_400_000,
};

/** Milliseconds, or null if `text` is not a duration. */
export function tryParseDuration(text: string): number | null {
  const s = text.trim();
  if (/^0+$/.test(s)) return 0;
  if (!/^(\d+[smhdw])+$/.test(s)) return null;
  let ms = 0;
  for (const m of s.matchAll(/(\d+)([smhdw])/g)) ms += Number(m[1]) * UNITS[m[2]!]!;
  return Number.isSafeInteger(ms) ? ms : null;
}

/** Milliseconds; a usage error (exit 2) naming `what` if `text` is not a duration. */
export function parseDuration(text: string, what = 'duration'): number {
  const ms = tryParseDuration(text);
  if (ms === null) {
    throw new UsageError(`${what}: ${JSON.stringify(text)} is not a duration (use e.g. 0, 90m, 36h, 7d, 2w, 1d12h)`);
  }
  return ms;
}

/** Shortest exact spelling: 86400000 -> "1d", 129600000 -> "1d12h", 0 -> "0". */
export function formatDuration(ms: number): string {
  if (ms <= 0) return '0';
  let rest = Math.round(ms / 1000) * 1000;
  let out = '';
  for (const u of ['d', 'h', 'm', 's'] as const) {
    const n = Math.floor(rest / UNITS[u]!);
    if (n) out += `${n}${u}`;
    rest -= n * UNITS[u]!;
  }
  return out || '0';
}

/** Rough age for messages: "3h", "2d", "45m". */
export function roughAge(ms: number): string {
  const a = Math.max(0, ms);
  if (a < 60_000) return `${Math.round(a / 1000)}s`;
  if (a < 3_600_000) return `${Math.round(a / 60_000)}m`;
  if (a < 2 * 86_400_000) return `${Math.round(a / 3_600_000)}h`;
  return `${Math.round(a / 86_400_000)}d`;
}

/**
 * Human-readable figures, and sizes as people write them.
 *
 * Hand-written, after weighing the npm packages for each (native-notes/performance.md,
 * "CLI libraries", has the start-up figures):
 * - bytes(): pretty-bytes prints the same binary units but drops trailing zeros ("1.5 MiB",
 *   "4 MiB"), so figures in a column jitter in width; this keeps three digits ("1.50 MiB",
 *   "4.00 MiB") in eight lines, and the tests and users' eyes know its output.
 * - duration(): pretty-ms writes "1m 30s"; the compact "1m30s" here is the form
 *   durations are written in everywhere else in genvault.
 * - table(): widths are counted in UTF-16 units, which is exact for what its callers put in
 *   every column but the last: image and job names (ASCII by checkImageName and the job
 *   file's rules), ids, UTC times, counts and bytes(). Text that may be anything (tags,
 *   reasons, errors) goes in the last column, which is never padded. string-width would
 *   count wide characters right, but loading it costs more than `genvault list` spends on
 *   everything else it prints, every run; cli-table3 draws boxes and loads an older
 *   string-width. A padded column that may hold other text needs a width function first.
 */

/** Bytes from a size as written: 4096, 512M, 10G, 1.5T, 256MiB (binary units, K to T); null if it is not one. */
export function tryParseSize(s: string): number | null {
  const m = /^(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?$/i.exec(s.trim());
  if (!m) return null;
  const mul = { '': 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3, T: 1024 ** 4 }[m[2]!.toUpperCase() as '' | 'K' | 'M' | 'G' | 'T'];
  const n = Math.round(Number(m[1]) * mul);
  return Number.isSafeInteger(n) ? n : null;
}

/** A file mode's permission bits as `ls`-style octal with four digits: 0640, 2750. */
export function octalMode(mode: number): string {
  return (mode & 0o7777).toString(8).padStart(4, '0');
}

export function bytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let i = 0;
  let v = n;
  while (Math.abs(v) >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${v} B` : `${v.toFixed(v >= 100 ? 0 : v >= 10 ? 1 : 2)} ${units[i]}`;
}

export function duration(ms: number): string {
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(s < 10 ? 2 : 1)}s`;
  const m = Math.floor(s / 60);
  const r = Math.round(s - m * 60);
  if (m < 60) return `${m}m${String(r).padStart(2, '0')}s`;
  return `${Math.floor(m / 60)}h${String(m % 60).padStart(2, '0')}m`;
}

export function rate(bytesN: number, ms: number): string {
  return ms > 0 ? `${bytes((bytesN * 1000) / ms)}/s` : '-';
}

/** Left-aligned text table. */
export function table(rows: string[][], rightAlign: number[] = []): string {
  if (!rows.length) return '';
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => (r[c] ?? '').length)));
  return rows
    .map((r) =>
      r
        .map((cell, c) => (rightAlign.includes(c) ? cell.padStart(widths[c]!) : cell.padEnd(widths[c]!)))
        .join('  ')
        .trimEnd(),
    )
    .join('\n');
}

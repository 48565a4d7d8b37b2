/**
 * Log lines of `run` and `daemon`, in one of two formats:
 *
 *   text     as before: the daemon stamps each line with the UTC time; `run` prints bare
 *            lines, failures on stderr.
 *   journal  each line starts with an sd-daemon priority prefix (sd-daemon(3): "<3>" err,
 *            "<4>" warning, "<5>" notice, "<6>" info) and carries no time stamp: journald
 *            adds its own, and `journalctl -p err` then finds the failures.
 *
 * `auto` (the default) picks journal when stdout or stderr is connected to the journal:
 * systemd sets JOURNAL_STREAM to that stream's "device:inode" (systemd.exec(5)).
 */
import fs from 'node:fs';

export type LogFormat = 'text' | 'journal';
export type LogLevel = 'err' | 'warning' | 'notice' | 'info';

const PRIORITY: Record<LogLevel, number> = { err: 3, warning: 4, notice: 5, info: 6 };

let format: LogFormat = 'text';
let stamped = false;

/** Whether fd is the stream JOURNAL_STREAM names. */
function isJournal(fd: number): boolean {
  const want = process.env.JOURNAL_STREAM;
  if (!want) return false;
  try {
    const st = fs.fstatSync(fd);
    return `${st.dev}:${st.ino}` === want;
  } catch {
    return false;
  }
}

/** Choose the format (`auto`, `text` or `journal`); `stamp`: text lines start with the time (the daemon). */
export function setLogFormat(f: string, stamp = false): void {
  if (f !== 'auto' && f !== 'text' && f !== 'journal') throw new Error(`unknown log format ${f}`);
  format = f === 'auto' ? (isJournal(1) || isJournal(2) ? 'journal' : 'text') : f;
  stamped = stamp;
}

export function logFormat(): LogFormat {
  return format;
}

/** A line as the current format writes it (without the newline). */
export function formatLogLine(level: LogLevel, line: string): string {
  if (format === 'journal') return line.split('\n').map((l) => `<${PRIORITY[level]}>${l}`).join('\n');
  return stamped ? `${new Date().toISOString().replace(/\.\d+Z$/, 'Z')} ${line}` : line;
}

/** Write one log line to stdout, or stderr (`run` writes its failures there). */
export function logLine(level: LogLevel, line: string, stream: 'out' | 'err' = 'out'): void {
  (stream === 'err' ? process.stderr : process.stdout).write(`${formatLogLine(level, line)}\n`);
}

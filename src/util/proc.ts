/** Process liveness for lock files: a pid plus its start time, so a reused pid is not mistaken for the owner. */
import fs from 'node:fs/promises';
import os from 'node:os';

export interface Owner {
  pid: number;
  /** Field 22 of /proc/PID/stat (clock ticks since boot); '' where /proc is missing. */
  start: string;
  host: string;
}

export async function processStart(pid: number): Promise<string | null> {
  try {
    const stat = await fs.readFile(`/proc/${pid}/stat`, 'utf8');
    // comm (field 2) may contain spaces and parentheses: split after the last ')'.
    const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return rest[19] ?? '';
  } catch {
    return null;
  }
}

export async function currentOwner(): Promise<Owner> {
  return { pid: process.pid, start: (await processStart(process.pid)) ?? '', host: os.hostname() };
}

/** True unless we can tell the owner is gone (same host, and pid dead or reused). */
export async function ownerAlive(o: Owner): Promise<boolean> {
  if (o.host !== os.hostname()) return true;
  const start = await processStart(o.pid);
  if (start === null) return false;
  return o.start === '' || start === o.start;
}

let command = '';

/** What this process runs, for locks other hosts see ("genvault backup"): set once by the CLI. */
export function setCommandName(name: string): void {
  command = name;
}

export function commandName(): string {
  return command || 'genvault';
}

/**
 * How a child process or remote command ended, for error lines: "exited with status 2",
 * "killed by SIGTERM", or, when neither came (an SSH channel closed with no exit-status or
 * exit-signal), "ended without an exit status". Signal names come with and without "SIG"
 * (Node and ssh2 add it, the SSH wire format does not).
 */
export function exitText(code: number | null, signal?: string | null): string {
  if (code !== null) return `exited with status ${code}`;
  // Over SSH the name comes from the server: only a plain signal name goes into the line.
  if (signal && /^(SIG)?[A-Z0-9+-]{1,16}$/.test(signal)) return `killed by ${signal.startsWith('SIG') ? signal : `SIG${signal}`}`;
  if (signal) return 'killed by a signal';
  return 'ended without an exit status';
}

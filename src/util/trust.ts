/**
 * Files genvault reads for its own use and acts on as root (the job file, whose hooks it
 * runs; SSH identities; known_hosts) must be under the control of root or the user running
 * genvault only, as cron and sudo require of theirs: owned by root or us, not writable by
 * group or others (private keys: no group/other access at all, as OpenSSH), and, for the
 * job file, in a directory that is neither. Otherwise one line: `FILE: why: refusing`.
 */
import { constants as C, Stats } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { GenvaultError } from './errors.js';
import { octalMode } from './format.js';

export interface TrustRules {
  /** A private key: no group/other bits at all (0600 or stricter). */
  secret?: boolean;
  /** Also check the directory holding the file (and, for a symlink, its target's). */
  dir?: boolean;
}

const mode = (st: Stats): string => octalMode(st.mode);

/** Why a file or directory with these stats is not trusted, or null. */
export function untrusted(st: Stats, secret = false): string | null {
  const me = process.geteuid?.() ?? 0;
  if (st.uid !== 0 && st.uid !== me) return `owned by uid ${st.uid} (not root${me === 0 ? '' : ` or uid ${me}`})`;
  if (st.mode & 0o002) return `writable by others (mode ${mode(st)})`;
  if (st.mode & 0o020) return `writable by group (mode ${mode(st)})`;
  if (secret && st.mode & 0o077) return `readable by ${st.mode & 0o007 ? 'others' : 'group'} (mode ${mode(st)}; a private key must be 0600)`;
  return null;
}

function refuse(file: string, why: string): GenvaultError {
  return new GenvaultError(`${file}: ${why}: refusing`, 'INSECURE');
}

async function checkDirs(file: string): Promise<void> {
  const dirs = new Set([path.dirname(path.resolve(file))]);
  const real = await fs.realpath(file).catch(() => null);
  if (real) dirs.add(path.dirname(real));
  for (const d of dirs) {
    const st = await fs.stat(d);
    const why = untrusted(st);
    if (why) throw refuse(d, `directory holding ${path.basename(file)} is ${why}`);
  }
}

/**
 * Read a file only if it is trusted (checked on the opened file, so it cannot be swapped
 * between the check and the read). Open errors (ENOENT, EACCES...) are thrown as they are.
 */
export async function readTrustedFile(file: string, rules: TrustRules = {}): Promise<Buffer> {
  const fh = await fs.open(file, C.O_RDONLY);
  try {
    const st = await fh.stat();
    const why = untrusted(st, rules.secret);
    if (why) throw refuse(file, why);
    if (rules.dir) await checkDirs(file);
    return await fh.readFile();
  } finally {
    await fh.close();
  }
}

/** The same checks without reading (for `run --check`); a missing file passes. */
export async function checkTrustedFile(file: string, rules: TrustRules = {}): Promise<void> {
  const st = await fs.stat(file).catch((e: NodeJS.ErrnoException) => {
    if (e.code === 'ENOENT') return null;
    throw e;
  });
  if (!st) return;
  const why = untrusted(st, rules.secret);
  if (why) throw refuse(file, why);
  if (rules.dir) await checkDirs(file);
}

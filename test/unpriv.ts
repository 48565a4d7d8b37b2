/**
 * An unprivileged local user for tests that play a hostile or careless local user against
 * root's genvault (symlink plants, other users' job files, loose permissions). Created
 * once per machine with useradd (no home, no login shell) and left in place: removing a
 * user while another test file may run as it would be a race, and the account is inert.
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import { Run, Scratch, sh } from './helpers.js';

export const UNPRIV_USER = 'genvault-test';

export interface Unpriv {
  name: string;
  uid: number;
  gid: number;
  /** Run a command as the user (runuser, no login shell needed). */
  run(cmd: string, args: string[], opts?: { input?: string; env?: NodeJS.ProcessEnv }): Promise<Run>;
}

/** The unprivileged test user, created if missing. */
export async function unprivUser(): Promise<Unpriv> {
  let id = await sh('id', ['-u', UNPRIV_USER]);
  if (id.code !== 0) {
    const add = await sh('useradd', ['--system', '--no-create-home', '--shell', '/usr/sbin/nologin', UNPRIV_USER]);
    // A concurrent creator may have won the race; only a user that still does not exist fails.
    id = await sh('id', ['-u', UNPRIV_USER]);
    if (id.code !== 0) throw new Error(`useradd ${UNPRIV_USER} failed: ${add.stderr.trim()}`);
  }
  const uid = Number(id.stdout.trim());
  const gid = Number((await sh('id', ['-g', UNPRIV_USER])).stdout.trim());
  return {
    name: UNPRIV_USER,
    uid,
    gid,
    run: (cmd, args, opts = {}) => sh('runuser', ['-u', UNPRIV_USER, '--', cmd, ...args], opts),
  };
}

/**
 * A directory inside the scratch area that every user can write to, sticky like /tmp
 * (mode 1777), with the path to it made traversable: what a shared temporary directory
 * looks like to a local attacker.
 */
export async function sharedStickyDir(s: Scratch, name = 'shared-tmp'): Promise<string> {
  await fs.chmod(s.dir, 0o755);
  const dir = path.join(s.dir, name);
  await fs.mkdir(dir, { recursive: true });
  await fs.chmod(dir, 0o1777);
  return dir;
}

/**
 * Permissions of the repository's files. A repository holds every byte of every disk
 * backed up into it, and its index names source paths and images, so nobody but its
 * owner (root, in practice) gets in: directories 0700, files 0600. With a group in
 * config.json (`genvault init --group GROUP`), that group may read: directories 2750
 * (setgid, so what is created in them gets the group), files 0640.
 *
 * New files get their mode from the process umask, set whenever a repository is opened:
 * LevelDB, its unix socket and pack directories are created by code that takes no mode.
 * A command that writes also tightens the directories of an existing repository (the
 * repository, index/, packs/ and its subdirectories, locks/, tmp/): that is what keeps
 * others out; files are not walked.
 *
 * This works on the local directory with node:fs, under the storage seam (store/store.ts):
 * modes and ownership are a property of the local store, and this is maintenance of that
 * directory, not access to the objects in it.
 */
import { execFile } from 'node:child_process';
import { constants as fsConstants } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';
import { GenvaultError } from '../util/errors.js';
import { octalMode } from '../util/format.js';
import { GROUP_NAME_RE, type RepoConfig } from '../format/config.js';

export const PRIVATE_DIR_MODE = 0o700;
export const PRIVATE_FILE_MODE = 0o600;
export const GROUP_DIR_MODE = 0o2750;
export const GROUP_FILE_MODE = 0o640;

export interface RepoModes {
  dir: number;
  file: number;
  umask: number;
  group: string | null;
}

export function repoModes(config: Pick<RepoConfig, 'group'>): RepoModes {
  return config.group
    ? { dir: GROUP_DIR_MODE, file: GROUP_FILE_MODE, umask: 0o027, group: config.group }
    : { dir: PRIVATE_DIR_MODE, file: PRIVATE_FILE_MODE, umask: 0o077, group: null };
}

let originalUmask: number | null = null;

/**
 * Set the process umask for this repository. Process-wide: genvault opens one repository
 * per process. Worker threads cannot set it (and need not: they create no files).
 */
export function applyUmask(config: Pick<RepoConfig, 'group'>): void {
  const mask = repoModes(config).umask;
  try {
    const before = process.umask(mask);
    originalUmask ??= before;
  } catch {
    /* in a worker thread */
  }
}

/** The umask the process started with: what job hooks run under. */
export function startUmask(): number {
  if (originalUmask !== null) return originalUmask;
  const m = process.umask(0o022);
  process.umask(m);
  return m;
}

/** The gid of a group name (or numeric gid): /etc/group, then NSS (getent). */
export async function resolveGroup(name: string): Promise<number> {
  if (!GROUP_NAME_RE.test(name)) throw new GenvaultError(`invalid group name ${JSON.stringify(name)}`, 'USAGE', 2);
  if (/^\d+$/.test(name)) return Number(name);
  const fromLine = (text: string): number | null => {
    for (const line of text.split('\n')) {
      const f = line.split(':');
      if (f[0] === name && f.length >= 3 && /^\d+$/.test(f[2]!)) return Number(f[2]);
    }
    return null;
  };
  const local = await fs.readFile('/etc/group', 'utf8').then(fromLine, () => null);
  if (local !== null) return local;
  const viaNss = await promisify(execFile)('getent', ['group', name]).then((r) => fromLine(r.stdout), () => null);
  if (viaNss !== null) return viaNss;
  throw new GenvaultError(`no group named ${name} on this machine`, 'USAGE', 2);
}

/**
 * chmod (and chgrp; with `uid`, chown) a directory without following a symlink; false
 * when it is not one.
 */
export async function setDirMode(dir: string, mode: number, gid: number | null, uid = -1): Promise<boolean> {
  let fh: fs.FileHandle;
  try {
    fh = await fs.open(dir, fsConstants.O_RDONLY | fsConstants.O_DIRECTORY | fsConstants.O_NOFOLLOW);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENOTDIR' || code === 'ELOOP') return false;
    throw e;
  }
  try {
    if (gid !== null || uid !== -1) await fh.chown(uid, gid ?? -1);
    await fh.chmod(mode);
  } finally {
    await fh.close();
  }
  return true;
}

/** Top-level directories of a repository, repository first. */
const TOP_DIRS = ['.', 'index', 'packs', 'locks', 'tmp', 'keys'];

/**
 * Bring the directories of a repository (and config.json) to its modes, and its group
 * when it has one. Cheap: a few dozen chmods, no walk of the packs. A failure (a file
 * system without chmod, a user who is not the owner) is reported and the command goes on.
 */
export async function tightenRepo(
  dir: string,
  config: Pick<RepoConfig, 'group'>,
  /** configFile null: none yet (init tightens before it writes config.json). */
  opts: { strict?: boolean; configFile?: string | null } = {},
): Promise<void> {
  const strict = opts.strict === true;
  const modes = repoModes(config);
  try {
    let gid: number | null = null;
    if (modes.group) {
      gid = await resolveGroup(modes.group).catch((e) => {
        if (strict) throw e;
        process.stderr.write(`genvault: warning: ${dir}: group ${modes.group} of config.json is not known here; group ownership left as it is\n`);
        return null;
      });
    }
    for (const d of TOP_DIRS) await setDirMode(path.join(dir, d), modes.dir, gid);
    for (const d of await fs.readdir(path.join(dir, 'packs')).catch(() => [])) {
      if (/^[0-9a-f]{2}$/.test(d)) await setDirMode(path.join(dir, 'packs', d), modes.dir, gid);
    }
    if (opts.configFile === null) return;
    // An object store's cache directory: config.json is in the bucket (location.ts).
    if (opts.configFile === undefined && (await fs.stat(path.join(dir, 'store.json')).catch(() => null))) return;
    const cfg = await fs.open(opts.configFile ?? path.join(dir, 'config.json'), fsConstants.O_RDONLY | fsConstants.O_NOFOLLOW);
    try {
      if (gid !== null) await cfg.chown(-1, gid);
      await cfg.chmod(modes.file);
    } finally {
      await cfg.close();
    }
  } catch (e) {
    if (strict) throw e;
    process.stderr.write(`genvault: warning: ${dir}: could not tighten permissions: ${(e as Error).message}\n`);
  }
}

/**
 * Loose modes of the directories that keep others out (the repository, index/, packs/):
 * readable or writable by others, or by the group without a group in config.json (with
 * one: writable by it). One line each, for verify.
 */
export async function looseModes(dir: string, config: Pick<RepoConfig, 'group'>): Promise<string[]> {
  const out: string[] = [];
  for (const d of ['.', 'index', 'packs']) {
    const p = path.join(dir, d);
    let st;
    try {
      st = await fs.lstat(p);
    } catch {
      continue;
    }
    const mode = st.mode & 0o7777;
    const who: string[] = [];
    if (mode & 0o006) who.push('others');
    if (config.group ? mode & 0o020 : mode & 0o060) who.push(config.group ? `group ${config.group} (writable)` : 'its group (no group in config.json)');
    if (!who.length) continue;
    const name = d === '.' ? 'repository directory' : `${d}/`;
    out.push(
      `loose permissions: ${name} ${p} is mode ${octalMode(mode)}, open to ${who.join(' and ')}; ` +
        `the next backup or gc tightens it (or: chmod ${config.group ? '2750' : '700'})`,
    );
  }
  return out;
}

/**
 * Run state (the mount server's pid files and default log) lives in a private directory,
 * never under a predictable name in a shared temporary directory, where another local
 * user could plant a symlink and have root overwrite or create a file of their choosing.
 *
 *   GENVAULT_RUN_DIR (tests), else /run/genvault as root, else $XDG_RUNTIME_DIR/genvault,
 *   else ${XDG_STATE_HOME:-~/.local/state}/genvault/run.
 *
 * The directory is created 0700 and must be a real directory (not a symlink) owned by us
 * and not writable by group or others; otherwise we refuse with one line. Files in it are
 * opened with O_NOFOLLOW (and O_EXCL where they are created), so even a planted name fails.
 */
import { constants as C } from 'node:fs';
import fs from 'node:fs/promises';
import type { FileHandle } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { GenvaultError } from './errors.js';
import { octalMode } from './format.js';

export function runDirPath(): string {
  if (process.env.GENVAULT_RUN_DIR) return path.resolve(process.env.GENVAULT_RUN_DIR);
  if (process.geteuid?.() === 0) return '/run/genvault';
  const xdg = process.env.XDG_RUNTIME_DIR;
  if (xdg && path.isAbsolute(xdg)) return path.join(xdg, 'genvault');
  const state = process.env.XDG_STATE_HOME && path.isAbsolute(process.env.XDG_STATE_HOME) ? process.env.XDG_STATE_HOME : path.join(os.homedir(), '.local', 'state');
  return path.join(state, 'genvault', 'run');
}

/** The private run directory, created 0700 if missing and checked; throws one line if unsafe. */
export async function ensureRunDir(): Promise<string> {
  const dir = runDirPath();
  await fs.mkdir(path.dirname(dir), { recursive: true, mode: 0o700 }).catch(() => undefined);
  await fs.mkdir(dir, { mode: 0o700 }).catch((e: NodeJS.ErrnoException) => {
    if (e.code !== 'EEXIST') throw new GenvaultError(`cannot create run directory ${dir}: ${e.message}`, 'RUNDIR');
  });
  const st = await fs.lstat(dir);
  const uid = process.geteuid?.() ?? 0;
  let why: string | null = null;
  if (st.isSymbolicLink()) why = 'is a symlink';
  else if (!st.isDirectory()) why = 'is not a directory';
  else if (st.uid !== uid) why = `is owned by uid ${st.uid}, not ${uid}`;
  else if (st.mode & 0o022) why = `is writable by ${st.mode & 0o002 ? 'others' : 'group'} (mode ${octalMode(st.mode)})`;
  if (why) throw new GenvaultError(`run directory ${dir} ${why}: refusing`, 'RUNDIR');
  return dir;
}

/** Write `text` to dir/name atomically: a new temporary file (O_EXCL|O_NOFOLLOW, 0600) renamed over it. */
export async function writeRunFile(dir: string, name: string, text: string): Promise<string> {
  const file = path.join(dir, name);
  const tmp = path.join(dir, `.${name}.${process.pid}.tmp`);
  await fs.rm(tmp, { force: true });
  const fh = await fs.open(tmp, C.O_WRONLY | C.O_CREAT | C.O_EXCL | C.O_NOFOLLOW, 0o600);
  try {
    await fh.writeFile(text);
  } finally {
    await fh.close();
  }
  await fs.rename(tmp, file);
  return file;
}

/** Contents of dir/name, or null if it is missing (a symlink is not followed: ELOOP is an error). */
export async function readRunFile(dir: string, name: string): Promise<string | null> {
  let fh: FileHandle;
  try {
    fh = await fs.open(path.join(dir, name), C.O_RDONLY | C.O_NOFOLLOW);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw e;
  }
  try {
    return await fh.readFile('utf8');
  } finally {
    await fh.close();
  }
}

/** Open a log file for appending without following a symlink at its name; created 0600. */
export async function openLogFile(file: string): Promise<FileHandle> {
  try {
    return await fs.open(file, C.O_WRONLY | C.O_APPEND | C.O_CREAT | C.O_NOFOLLOW, 0o600);
  } catch (e) {
    // A symlink gives ELOOP, or EACCES with O_CREAT on some kernels.
    const link = (await fs.lstat(file).catch(() => null))?.isSymbolicLink();
    const why = link ? 'is a symlink (not followed)' : (e as Error).message;
    throw new GenvaultError(`cannot open log file ${file}: ${why}`, 'LOG');
  }
}

/**
 * Lock files under locks/ (plain files, so they work across processes without the DB):
 *
 * - writer-<id>.json: one per running backup (or gc), listing the pack files it created.
 *   A writer that died leaves its file behind; the next writer removes what it left:
 *   packs never committed are deleted, committed ones truncated to their committed size.
 * - image-<name>.lock: held by the one backup of that image that may run at a time.
 * - gc.json: held by the one gc that may run at a time (GcLock; backups check gcRunning()).
 *
 * Nothing read from these files is trusted: a file that does not parse, or whose owner or
 * pack ids are not well-formed, is reported (one line on stderr, naming the file, once per
 * process) and never acted on. Liveness is decided only from a well-formed owner (pid,
 * process start time, host); a malformed lock counts as stale.
 */
import fs from 'node:fs/promises';
import { constants as fsConstants } from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { GenvaultError } from '../util/errors.js';
import { bytes } from '../util/format.js';
import { Owner, currentOwner, ownerAlive } from '../util/proc.js';
import { getOrNull, type Db } from '../index/db.js';
import { packKey, packSizeOf } from '../format/keys.js';
import { isPackId, packObject } from '../format/pack.js';
import type { Store } from '../store/store.js';
import { IMAGE_NAME_RE } from '../format/config.js';

/** The lock name prune/forget/protect hold (no image name starts with '.'). */
export const RETENTION_LOCK = '.retention';

const reported = new Set<string>();

/** One line on stderr about a file under locks/, once per process and message. */
export function reportLockFile(file: string, problem: string): void {
  const line = `genvault: warning: ${file}: ${problem}`;
  if (reported.has(line)) return;
  reported.add(line);
  process.stderr.write(`${line}\n`);
}

/** Largest lock or registration file read (a gc's registration lists its packs: ~35 bytes each). */
const MAX_LOCK_FILE = 4 << 20;

type ReadLock = { text: string } | { gone: true } | { bad: string };

/**
 * Read a small regular file under locks/ without following a symlink or blocking on a
 * FIFO. `gone` when it does not exist; `bad` when it is not a regular file or too large.
 * Other errors (EACCES, EIO) are thrown.
 */
async function readLockFile(file: string): Promise<ReadLock> {
  let fh: fs.FileHandle;
  try {
    fh = await fs.open(file, fsConstants.O_RDONLY | fsConstants.O_NOFOLLOW | fsConstants.O_NONBLOCK);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') return { gone: true };
    if (code === 'ELOOP') return { bad: 'is a symbolic link' };
    throw e;
  }
  try {
    const st = await fh.stat();
    if (!st.isFile()) return { bad: 'is not a regular file' };
    if (st.size > MAX_LOCK_FILE) return { bad: `is too large (${st.size} bytes)` };
    return { text: await fh.readFile('utf8') };
  } finally {
    await fh.close();
  }
}

/** A well-formed owner (pid, process start time, host), or why not. */
export function parseOwner(v: unknown): Owner | string {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) return 'not a JSON object';
  const o = v as Record<string, unknown>;
  if (!Number.isSafeInteger(o.pid) || (o.pid as number) <= 0) return '"pid" missing or not a positive integer';
  if (typeof o.start !== 'string' || !/^\d{0,20}$/.test(o.start)) return '"start" missing or not a process start time';
  if (typeof o.host !== 'string' || !o.host || o.host.length > 255 || /[\0/]/.test(o.host)) return '"host" missing or malformed';
  return { pid: o.pid as number, start: o.start, host: o.host };
}

function parseJson(text: string): unknown {
  try {
    return JSON.parse(text) as unknown;
  } catch {
    return undefined;
  }
}

/** Read an owner file (image lock, pin, gc.json): the owner, gone, or why it is malformed. */
async function readOwnerFile(file: string): Promise<{ owner: Owner } | { gone: true } | { bad: string }> {
  const r = await readLockFile(file);
  if (!('text' in r)) return r;
  const v = parseJson(r.text);
  if (v === undefined) return { bad: r.text.trim() ? 'not valid JSON' : 'empty' };
  const o = parseOwner(v);
  return typeof o === 'string' ? { bad: o } : { owner: o };
}

export interface WriterRecord {
  id: string;
  owner: Owner;
  started: string;
  what: string;
  packs: string[];
}

async function writeAtomic(file: string, data: string): Promise<void> {
  const tmp = `${file}.tmp-${process.pid}`;
  await fs.writeFile(tmp, data, { mode: 0o600 });
  await fs.rename(tmp, file);
}

export class WriterRegistration {
  private constructor(
    readonly file: string,
    readonly record: WriterRecord,
  ) {}

  static async register(repoDir: string, what: string): Promise<WriterRegistration> {
    const id = randomBytes(8).toString('hex');
    const record: WriterRecord = { id, owner: await currentOwner(), started: new Date().toISOString(), what, packs: [] };
    const file = path.join(repoDir, 'locks', `writer-${id}.json`);
    await writeAtomic(file, JSON.stringify(record));
    return new WriterRegistration(file, record);
  }

  /** Record a pack before the first byte is written to it, so a crash cannot orphan it unseen. */
  async addPack(packId: string): Promise<void> {
    this.record.packs.push(packId);
    await writeAtomic(this.file, JSON.stringify(this.record));
  }

  async release(): Promise<void> {
    await fs.rm(this.file, { force: true });
  }
}

/** Check a parsed registration of locks/writer-<fileId>.json; the record or why it is invalid. */
export function parseWriterRecord(v: unknown, fileId: string): WriterRecord | string {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) return 'not a JSON object';
  const r = v as Record<string, unknown>;
  if (r.id !== fileId) return `"id" ${JSON.stringify(r.id)} does not match the file name`;
  const owner = parseOwner(r.owner);
  if (typeof owner === 'string') return `owner: ${owner}`;
  if (typeof r.started !== 'string' || typeof r.what !== 'string') return '"started" or "what" missing';
  if (!Array.isArray(r.packs)) return '"packs" is not a list';
  for (const p of r.packs as unknown[]) {
    if (!isPackId(p)) return `"packs" holds ${JSON.stringify(p)?.slice(0, 80)}, not a pack id (32 lowercase hex digits)`;
  }
  return { id: fileId, owner, started: r.started, what: r.what, packs: [...(r.packs as string[])] };
}

/**
 * Writer registrations in locks/. One that does not parse or holds anything malformed
 * (an owner, a pack id that could name a file outside packs/) is reported and left out:
 * no writer ever writes one (registrations are replaced atomically), so it is not a
 * writer's, and acting on it could delete or truncate files it names.
 */
export async function listWriters(repoDir: string): Promise<WriterRecord[]> {
  const dir = path.join(repoDir, 'locks');
  const out: WriterRecord[] = [];
  for (const f of await fs.readdir(dir)) {
    const m = /^writer-([0-9a-f]{16})\.json$/.exec(f);
    if (!m) {
      if (/^writer-.*\.json$/.test(f)) reportLockFile(path.join(dir, f), 'not a writer registration name (writer-<16 hex digits>.json); ignored');
      continue;
    }
    const file = path.join(dir, f);
    const r = await readLockFile(file);
    if ('gone' in r) continue; // removed right now
    if ('bad' in r) {
      reportLockFile(file, `invalid writer registration (${r.bad}); ignored`);
      continue;
    }
    const v = parseJson(r.text);
    const rec = v === undefined ? (r.text.trim() ? 'not valid JSON' : 'empty') : parseWriterRecord(v, m[1]!);
    if (typeof rec === 'string') {
      reportLockFile(file, `invalid writer registration (${rec}); ignored`);
      continue;
    }
    out.push(rec);
  }
  return out;
}

/** Writers (backups, gc) running now, other than `exceptId`; leftovers of dead ones do not count. */
export async function liveWriters(repoDir: string, exceptId: string | null = null): Promise<WriterRecord[]> {
  const out = [];
  for (const w of await listWriters(repoDir)) {
    if (w.id === exceptId) continue;
    if (await ownerAlive(w.owner)) out.push(w);
  }
  return out;
}

/** What trimPacks did: packs removed and truncated, and the bytes that freed. */
export interface Trimmed {
  removed: number;
  truncated: number;
  bytes: number;
}

/** Bring the packs of a writer back to what the index committed. */
export async function trimPacks(store: Store, db: Db, packs: string[]): Promise<Trimmed> {
  const done: Trimmed = { removed: 0, truncated: 0, bytes: 0 };
  for (const packId of packs) {
    if (!isPackId(packId)) continue; // listWriters never gives one; never a path elsewhere
    const rec = await getOrNull(db, packKey(packId));
    const name = packObject(packId);
    const st = await store.stat(name);
    if (!st) continue;
    if (!rec) {
      await store.delete(name);
      done.removed++;
      done.bytes += st.size;
    } else {
      const size = packSizeOf(rec);
      if (st.size > size) {
        await store.truncate(name, size);
        done.truncated++;
        done.bytes += st.size - size;
      }
    }
  }
  return done;
}

/** Clean up after writers whose process is gone. Returns how many were cleaned. */
export async function cleanupDeadWriters(repoDir: string, db: Db, store: Store): Promise<number> {
  let n = 0;
  for (const w of await listWriters(repoDir)) {
    if (await ownerAlive(w.owner)) continue;
    const t = await trimPacks(store, db, w.packs);
    if (t.removed || t.truncated) {
      const did = [t.removed && `${t.removed} uncommitted pack(s) removed`, t.truncated && `${t.truncated} pack(s) cut to their committed size`];
      process.stderr.write(
        `genvault: cleaned up after ${w.what} (pid ${w.owner.pid}, started ${w.started}), which did not finish: ` +
          `${did.filter(Boolean).join(', ')} (${bytes(t.bytes)})\n`,
      );
    }
    await fs.rm(path.join(repoDir, 'locks', `writer-${w.id}.json`), { force: true });
    n++;
  }
  // Image locks of dead backups (acquire() would also clear them, but only for that image).
  const locks = path.join(repoDir, 'locks');
  for (const f of await fs.readdir(locks)) {
    const m = /^image-(.*)\.lock$/.exec(f);
    if (!m) continue;
    const file = path.join(locks, f);
    if (!isLockName(m[1]!)) {
      reportLockFile(file, 'not an image lock name; ignored');
      continue;
    }
    const r = await readOwnerFile(file);
    if ('gone' in r) continue;
    if ('bad' in r) reportLockFile(file, `malformed image lock (${r.bad}): treated as stale and removed`);
    else if (await ownerAlive(r.owner)) continue;
    await fs.rm(file, { force: true });
  }
  // Temporary files of atomic writes by dead processes.
  for (const f of await fs.readdir(path.join(repoDir, 'locks'))) {
    const m = /\.tmp-(\d+)$/.exec(f);
    if (m && !(await ownerAlive({ pid: Number(m[1]), start: '', host: (await currentOwner()).host }))) {
      await fs.rm(path.join(repoDir, 'locks', f), { force: true });
    }
  }
  return n;
}

/**
 * Pins: a process reading a generation (a file open in the mount) holds
 * locks/pin-ID-PID.json. forget/prune then only hide the generation (`removed: true`), and
 * gc keeps its data until no live pin is left, so an open file keeps reading correct bytes.
 */
export class Pin {
  private constructor(readonly file: string) {}

  static async take(repoDir: string, genId: string): Promise<Pin> {
    const file = path.join(repoDir, 'locks', `pin-${genId}-${process.pid}.json`);
    await writeAtomic(file, JSON.stringify(await currentOwner()));
    return new Pin(file);
  }

  async release(): Promise<void> {
    await fs.rm(this.file, { force: true });
  }
}

/** Ids of generations pinned by live processes. */
export async function pinnedGenerations(repoDir: string): Promise<Set<string>> {
  const out = new Set<string>();
  const dir = path.join(repoDir, 'locks');
  for (const f of await fs.readdir(dir)) {
    const m = /^pin-([0-9a-f]{16})-\d+\.json$/.exec(f);
    if (!m) continue;
    const file = path.join(dir, f);
    const r = await readOwnerFile(file);
    if ('gone' in r) continue;
    // Pins are replaced atomically (never seen half-written): a malformed one is no reader's.
    if ('bad' in r) reportLockFile(file, `malformed pin (${r.bad}): treated as stale and removed`);
    else if (await ownerAlive(r.owner)) {
      out.add(m[1]!);
      continue;
    }
    await fs.rm(file, { force: true });
  }
  return out;
}

/** The file a running gc holds (locks/gc.json, an Owner); see gcRunning(). */
export function gcLockPath(repoDir: string): string {
  return path.join(repoDir, 'locks', 'gc.json');
}

/**
 * Is a gc running? Backups that start while one runs must not reuse chunks it condemned
 * (index entries under 'x'), and skip the parent-position shortcut that bypasses the index.
 */
export async function gcRunning(repoDir: string): Promise<boolean> {
  const file = gcLockPath(repoDir);
  let r;
  try {
    r = await readOwnerFile(file);
  } catch {
    return true; // unreadable: assume it runs
  }
  if ('gone' in r) return false;
  if ('bad' in r) {
    // gc.json is made complete before it appears (link(2)): a malformed one is no gc's.
    reportLockFile(file, `malformed gc lock (${r.bad}): treated as stale, no gc is running`);
    return false;
  }
  return ownerAlive(r.owner);
}

/** Names image-NAME.lock may carry: an image name, or the retention lock. */
function isLockName(name: string): boolean {
  return name === RETENTION_LOCK || (IMAGE_NAME_RE.test(name) && name !== 'latest');
}

/** Another live process holds an image's backup lock. */
export class ImageLockedError extends GenvaultError {
  constructor(
    readonly image: string,
    readonly holderPid: number,
  ) {
    super(`another backup of image ${image} is running (pid ${holderPid}); use --wait to queue behind it`, 'LOCKED');
  }
}

export class ImageLock {
  private constructor(readonly file: string) {}

  /**
   * Take the per-image backup lock; with `wait`, poll until the holder finishes. The lock
   * is linked into place from a complete temporary file, so it is never seen half-written
   * and a malformed one is stale. `fileName`: what names the lock file instead of the
   * image's name (a sealed index's tag, Repository.imageLockName).
   */
  static async acquire(repoDir: string, name: string, wait: boolean, fileName = name): Promise<ImageLock> {
    if (!isLockName(name) || !isLockName(fileName)) throw new GenvaultError(`invalid image name ${JSON.stringify(name)}`, 'USAGE', 2);
    const file = path.join(repoDir, 'locks', `image-${fileName}.lock`);
    const me = await currentOwner();
    // Unique per call (a process may take several locks at once); cleanupDeadWriters
    // removes it by the pid at its end if we die.
    const tmp = `${file}.${randomBytes(4).toString('hex')}.tmp-${process.pid}`;
    await fs.writeFile(tmp, JSON.stringify(me), { mode: 0o600 });
    try {
      for (;;) {
        try {
          await fs.link(tmp, file);
          return new ImageLock(file);
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
        }
        const r = await readOwnerFile(file);
        if ('gone' in r) continue;
        if ('bad' in r || !(await ownerAlive(r.owner))) {
          if ('bad' in r) reportLockFile(file, `malformed image lock (${r.bad}): treated as stale and removed`);
          await fs.rm(file, { force: true });
          continue;
        }
        if (!wait) throw new ImageLockedError(name, r.owner.pid);
        await new Promise((res) => setTimeout(res, 500));
      }
    } finally {
      await fs.rm(tmp, { force: true });
    }
  }

  async release(): Promise<void> {
    await fs.rm(this.file, { force: true });
  }
}

/**
 * The gc lock, locks/gc.json (an Owner). Created with link(2) from a complete temporary
 * file, so a reader (gcRunning) never sees it half-written. A lock whose owner is dead is
 * moved aside before it is removed, and given back if what was moved turns out to be a
 * live gc's (two gcs replacing the same stale lock at once).
 */
export class GcLock {
  private constructor(
    readonly file: string,
    private owner: Owner,
  ) {}

  static async acquire(repoDir: string): Promise<GcLock> {
    const file = gcLockPath(repoDir);
    const me = await currentOwner();
    const tmp = `${file}.tmp-${process.pid}`;
    await fs.writeFile(tmp, JSON.stringify(me), { mode: 0o600 });
    const busy = (o: Owner) =>
      new GenvaultError(
        `another gc is running (pid ${o.pid}${o.host !== me.host ? ` on ${o.host}` : ''}); wait for it to finish`,
        'LOCKED',
      );
    try {
      for (let attempt = 0; attempt < 10; attempt++) {
        try {
          await fs.link(tmp, file);
          return new GcLock(file, me);
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
        }
        // Liveness only from a well-formed owner. gc.json is complete before it appears,
        // so a malformed one (junk, `{"pid":1}`, empty) is no gc's: stale.
        const holder = await readOwnerFile(file);
        if ('gone' in holder) continue;
        if ('owner' in holder && (await ownerAlive(holder.owner))) throw busy(holder.owner);
        const aside = `${file}.stale-${process.pid}`;
        try {
          await fs.rename(file, aside);
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code === 'ENOENT') continue;
          throw e;
        }
        const moved = await readOwnerFile(aside);
        if ('owner' in moved && (await ownerAlive(moved.owner))) {
          // Another gc took the lock between our check and the rename: give it back.
          await fs.link(aside, file).catch(() => undefined);
          await fs.rm(aside, { force: true });
          throw busy(moved.owner);
        }
        if ('bad' in moved) {
          // Kept for a look, under a name nothing reads; not removed (it may be a directory).
          const kept = `${file}.malformed-${Date.now()}`;
          await fs.rename(aside, kept);
          reportLockFile(file, `malformed gc lock (${moved.bad}): treated as stale, moved aside to ${path.basename(kept)}`);
          continue;
        }
        await fs.rm(aside, { force: true });
      }
      throw new GenvaultError('could not take the gc lock (locks/gc.json keeps changing)', 'LOCKED');
    } finally {
      await fs.rm(tmp, { force: true });
    }
  }

  /** Remove the lock if it is still ours. */
  async release(): Promise<void> {
    const r = await readOwnerFile(this.file).catch(() => null);
    if (!r || !('owner' in r)) return;
    const o = r.owner;
    if (o.pid !== this.owner.pid || o.start !== this.owner.start || o.host !== this.owner.host) return;
    await fs.rm(this.file, { force: true });
  }
}

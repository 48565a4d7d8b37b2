/**
 * Lock files under locks/ (plain files, so they work across processes without the DB):
 *
 * - writer-<id>.json: one per running backup (or gc), listing the pack files it created.
 *   A writer that died leaves its file behind; the next writer removes what it left:
 *   packs never committed are deleted, committed ones truncated to their committed size.
 * - image-<name>.lock: held by the one backup of that image that may run at a time.
 * - gc.json: held by the one gc that may run at a time (GcLock; backups check gcRunning()).
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { GenvaultError } from '../util/errors.js';
import { Owner, currentOwner, ownerAlive } from '../util/proc.js';
import { packKey, getOrNull, type Db } from './db.js';
import { packPath } from './pack.js';

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

export async function listWriters(repoDir: string): Promise<WriterRecord[]> {
  const dir = path.join(repoDir, 'locks');
  const out: WriterRecord[] = [];
  for (const f of await fs.readdir(dir)) {
    if (!/^writer-[0-9a-f]+\.json$/.test(f)) continue;
    try {
      out.push(JSON.parse(await fs.readFile(path.join(dir, f), 'utf8')) as WriterRecord);
    } catch {
      /* being written or removed right now */
    }
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

/** Bring the packs of a writer back to what the index committed. */
export async function trimPacks(repoDir: string, db: Db, packs: string[]): Promise<void> {
  for (const packId of packs) {
    const rec = await getOrNull(db, packKey(packId));
    const file = packPath(repoDir, packId);
    if (!rec) {
      await fs.rm(file, { force: true });
    } else {
      const { size } = JSON.parse(rec.toString('utf8')) as { size: number };
      try {
        const st = await fs.stat(file);
        if (st.size > size) await fs.truncate(file, size);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
      }
    }
  }
}

/** Clean up after writers whose process is gone. Returns how many were cleaned. */
export async function cleanupDeadWriters(repoDir: string, db: Db): Promise<number> {
  let n = 0;
  for (const w of await listWriters(repoDir)) {
    if (await ownerAlive(w.owner)) continue;
    await trimPacks(repoDir, db, w.packs);
    await fs.rm(path.join(repoDir, 'locks', `writer-${w.id}.json`), { force: true });
    n++;
  }
  // Image locks of dead backups (acquire() would also clear them, but only for that image).
  for (const f of await fs.readdir(path.join(repoDir, 'locks'))) {
    if (!/^image-.*\.lock$/.test(f)) continue;
    try {
      const o = JSON.parse(await fs.readFile(path.join(repoDir, 'locks', f), 'utf8')) as Owner;
      if (!(await ownerAlive(o))) await fs.rm(path.join(repoDir, 'locks', f), { force: true });
    } catch {
      /* unreadable: being written, or gone */
    }
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
    const m = /^pin-([0-9a-f]+)-\d+\.json$/.exec(f);
    if (!m) continue;
    try {
      const o = JSON.parse(await fs.readFile(path.join(dir, f), 'utf8')) as Owner;
      if (await ownerAlive(o)) out.add(m[1]!);
      else await fs.rm(path.join(dir, f), { force: true });
    } catch {
      out.add(m[1]!); // being written: count it
    }
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
  try {
    const o = JSON.parse(await fs.readFile(gcLockPath(repoDir), 'utf8')) as Owner;
    return await ownerAlive(o);
  } catch (e) {
    return (e as NodeJS.ErrnoException).code !== 'ENOENT'; // unreadable: assume it runs
  }
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

  /** Take the per-image backup lock; with `wait`, poll until the holder finishes. */
  static async acquire(repoDir: string, name: string, wait: boolean): Promise<ImageLock> {
    const file = path.join(repoDir, 'locks', `image-${name}.lock`);
    const me = await currentOwner();
    for (;;) {
      try {
        await fs.writeFile(file, JSON.stringify(me), { flag: 'wx', mode: 0o600 });
        return new ImageLock(file);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
      }
      let holder: Owner | null = null;
      try {
        holder = JSON.parse(await fs.readFile(file, 'utf8')) as Owner;
      } catch {
        holder = null; // half-written by a writer that died between create and write
      }
      if (!holder || !(await ownerAlive(holder))) {
        await fs.rm(file, { force: true });
        continue;
      }
      if (!wait) throw new ImageLockedError(name, holder.pid);
      await new Promise((r) => setTimeout(r, 500));
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
    const readOwner = async (f: string): Promise<Owner | null> => {
      try {
        return JSON.parse(await fs.readFile(f, 'utf8')) as Owner;
      } catch {
        return null;
      }
    };
    try {
      for (let attempt = 0; attempt < 10; attempt++) {
        try {
          await fs.link(tmp, file);
          return new GcLock(file, me);
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
        }
        const holder = await readOwner(file);
        if (holder && (await ownerAlive(holder))) throw busy(holder);
        const aside = `${file}.stale-${process.pid}`;
        try {
          await fs.rename(file, aside);
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code === 'ENOENT') continue;
          throw e;
        }
        const moved = await readOwner(aside);
        if (moved && (await ownerAlive(moved))) {
          // Another gc took the lock between our check and the rename: give it back.
          await fs.link(aside, file).catch(() => undefined);
          await fs.rm(aside, { force: true });
          throw busy(moved);
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
    try {
      const o = JSON.parse(await fs.readFile(this.file, 'utf8')) as Owner;
      if (o.pid !== this.owner.pid || o.start !== this.owner.start || o.host !== this.owner.host) return;
    } catch {
      return;
    }
    await fs.rm(this.file, { force: true });
  }
}

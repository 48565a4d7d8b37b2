/**
 * Locks between hosts that share an object-store repository, kept as objects in the
 * store itself (`locks/<id>.json`), as restic does: the local lock files of locks.ts rely
 * on one machine (O_EXCL, link, process liveness) and each host has its own cache
 * directory, so they cannot see each other there.
 *
 * Every command on an object-store repository holds a shared lock while it runs; gc holds
 * an exclusive one. A holder rewrites its lock every REFRESH_MS; a lock not rewritten for
 * STALE_MS is stale and ignored (and removed by the next exclusive taker), as is one of a
 * dead process on this host. Taking a lock: put ours, then list every lock; a conflicting
 * fresh one makes us delete ours and fail (both sides of a race may back off; neither
 * proceeds on a conflict).
 *
 * Ages are the storage's: the listing gives each lock object's last write by the storage's
 * clock (ObjectInfo.modified: S3's LastModified), and ours, just written, is its "now". So
 * the hosts' clocks do not enter (native-notes/ceph.md, "Clocks"). A storage that keeps no
 * such time falls back to this host's clock against the time written in the lock.
 *
 * Lock objects are hostile like any object: one that does not parse or holds anything
 * malformed is reported and counts as held until it is STALE_MS old (by the same ages).
 */
import { randomBytes } from 'node:crypto';
import { GenvaultError } from '../util/errors.js';
import { currentOwner, ownerAlive, type Owner } from '../util/proc.js';
import type { Store } from '../store/store.js';
import { reportLockFile } from './locks.js';

export const LOCKS_PREFIX = 'locks';
/** Rewritten this often while held. */
export const REFRESH_MS = 5 * 60_000;
/** Not rewritten for this long: stale. */
export const STALE_MS = 30 * 60_000;

const LOCK_NAME_RE = /^[0-9a-f]{16}\.json$/;
const MAX_LOCK_BYTES = 64 << 10;

export interface StoreLockRecord {
  id: string;
  exclusive: boolean;
  owner: Owner;
  /** What holds it, for messages: "backup vm1", "gc". */
  what: string;
  /** Milliseconds since the epoch, this host's clock, when last written. */
  time: number;
}

export interface StoreLockOptions {
  exclusive: boolean;
  what: string;
  /** Clock and intervals, for tests. */
  now?: () => number;
  refreshMs?: number;
  staleMs?: number;
}

function parseLock(text: string, id: string): StoreLockRecord | string {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    return 'not valid JSON';
  }
  const r = v as Partial<StoreLockRecord> | null;
  if (!r || typeof r !== 'object' || r.id !== id) return 'its id is not its name';
  if (typeof r.exclusive !== 'boolean' || typeof r.what !== 'string' || r.what.length > 200) return 'malformed';
  if (typeof r.time !== 'number' || !Number.isFinite(r.time)) return 'malformed time';
  const o = r.owner as Partial<Owner> | undefined;
  if (!o || !Number.isInteger(o.pid) || typeof o.start !== 'string' || !/^\d*$/.test(o.start) || typeof o.host !== 'string' || o.host.length > 255) return 'malformed owner';
  return { id, exclusive: r.exclusive, what: r.what, time: r.time, owner: { pid: o.pid!, start: o.start, host: o.host } };
}

/** First sight of a lock, per process: its age where the storage keeps no times. */
const firstSeen = new Map<string, number>();

type ListedLock = { name: string; lock: StoreLockRecord | string; modified?: number };

export class StoreLock {
  private timer: NodeJS.Timeout | null = null;
  private released = false;
  /** This host's monotonic clock (ms) when the lock was last written successfully. */
  private writtenAt = performance.now();

  private constructor(
    private readonly store: Store,
    readonly record: StoreLockRecord,
    private readonly now: () => number,
  ) {}

  get name(): string {
    return `${LOCKS_PREFIX}/${this.record.id}.json`;
  }

  /** Take a lock, or fail with one line naming the holder that conflicts. */
  static async acquire(store: Store, opts: StoreLockOptions): Promise<StoreLock> {
    const now = opts.now ?? Date.now;
    const staleMs = opts.staleMs ?? STALE_MS;
    const id = randomBytes(8).toString('hex');
    const lock = new StoreLock(store, { id, exclusive: opts.exclusive, owner: await currentOwner(), what: opts.what, time: now() }, now);
    await lock.write();
    try {
      const conflict = await lock.conflicting(staleMs);
      if (conflict) throw conflict;
    } catch (e) {
      await store.delete(lock.name).catch(() => undefined);
      throw e;
    }
    lock.timer = setInterval(() => void lock.refresh(), opts.refreshMs ?? REFRESH_MS);
    lock.timer.unref();
    lock.staleMs = staleMs;
    return lock;
  }

  private staleMs = STALE_MS;
  /** For tests: this host's monotonic clock. */
  monotonic: () => number = () => performance.now();

  /**
   * Fail unless the lock was written recently enough that no other host can have taken it
   * for stale: a writer calls this before it makes a generation durable. A process paused
   * (or cut off from the store) past that may find packs it deduplicated against removed
   * by a gc that ran meanwhile; its generation must not be committed then.
   */
  assertHeld(what: string): void {
    const since = this.monotonic() - this.writtenAt;
    // A refresh interval's margin: the commit itself takes time too.
    if (since > this.staleMs - REFRESH_MS) {
      throw new GenvaultError(
        `${what}: the lock ${this.store.describe(this.name)} was last refreshed ${Math.round(since / 1000)} s ago, long enough for other hosts to take it for stale (a gc may have run meanwhile); nothing was committed: run it again`,
        'LOCK_LOST',
      );
    }
  }

  private async write(): Promise<void> {
    this.record.time = this.now();
    const at = this.monotonic();
    await this.store.put(this.name, JSON.stringify(this.record) + '\n');
    this.writtenAt = at;
  }

  private async refresh(): Promise<void> {
    if (this.released) return;
    await this.write().catch((e: Error) => {
      process.stderr.write(`genvault: warning: cannot refresh the lock ${this.store.describe(this.name)}: ${e.message}\n`);
    });
  }

  /** The first fresh lock that conflicts with ours, as an error; stale ones an exclusive taker removes. */
  private async conflicting(staleMs: number): Promise<GenvaultError | null> {
    const locks = await readLocks(this.store);
    const ours = locks.find((l) => l.name === this.name);
    for (const other of locks) {
      if (other === ours) continue;
      const age = this.ageOf(other, ours);
      if (typeof other.lock === 'string') {
        reportLockFile(this.store.describe(other.name), `${other.lock}; counted as held until it is ${Math.round(staleMs / 60_000)} minutes old`);
        if (age <= staleMs && this.record.exclusive) return inUse(this.store, other.name, 'an unreadable lock', age);
        continue;
      }
      const l = other.lock;
      if (age > staleMs || !(await ownerAlive(l.owner))) {
        if (this.record.exclusive) await this.store.delete(other.name).catch(() => undefined);
        continue;
      }
      if (this.record.exclusive || l.exclusive) return inUse(this.store, other.name, `${l.what} (pid ${l.owner.pid} on ${l.owner.host})`, age);
    }
    return null;
  }

  /** How long ago a lock was last written: by the storage's clock where it keeps one (see the top). */
  private ageOf(other: ListedLock, ours: ListedLock | undefined): number {
    if (other.modified !== undefined && ours?.modified !== undefined) return ours.modified - other.modified;
    if (typeof other.lock !== 'string') return this.now() - other.lock.time;
    const seen = firstSeen.get(other.name) ?? this.now();
    firstSeen.set(other.name, seen);
    return this.now() - seen;
  }

  /** The store's present: this lock rewritten now, as the listing then dates it (undefined: the store keeps no times). */
  async storageNow(): Promise<number | undefined> {
    await this.write();
    return (await readLocks(this.store)).find((l) => l.name === this.name)?.modified;
  }

  async release(): Promise<void> {
    if (this.released) return;
    this.released = true;
    if (this.timer) clearInterval(this.timer);
    await this.store.delete(this.name);
  }
}

function inUse(store: Store, name: string, holder: string, ageMs: number | null): GenvaultError {
  const age = ageMs === null ? '' : `, refreshed ${Math.max(0, Math.round(ageMs / 1000))} s ago`;
  return new GenvaultError(
    `repository in use: ${holder} holds ${store.describe(name)}${age}; try again when it is done (a lock not refreshed for ${STALE_MS / 60_000} minutes is ignored)`,
    'LOCKED',
  );
}

/** Every lock object: parsed, or why it is not a lock (names that are not ours are skipped). */
export async function readLocks(store: Store): Promise<ListedLock[]> {
  const out: ListedLock[] = [];
  for await (const o of store.list(LOCKS_PREFIX)) {
    const base = o.name.slice(LOCKS_PREFIX.length + 1);
    if (!LOCK_NAME_RE.test(base)) continue;
    if (o.size > MAX_LOCK_BYTES) {
      out.push({ name: o.name, lock: 'too large', modified: o.modified });
      continue;
    }
    const text = await store.get(o.name).then(
      (b) => b.toString('utf8'),
      (e: NodeJS.ErrnoException) => (e.code === 'ENOENT' ? null : Promise.reject(e)),
    );
    if (text === null) continue; // released meanwhile
    out.push({ name: o.name, lock: parseLock(text, base.slice(0, 16)), modified: o.modified });
  }
  return out;
}

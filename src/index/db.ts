/**
 * The repository's LevelDB (index/ under the repository): chunk index and all metadata.
 *
 * LevelDB allows one process per database. rave-level makes the first process that
 * opens it the leader (it holds the LevelDB lock and serves the others over the unix
 * socket index/rave-level.sock); later processes become followers, and one of them takes
 * over when the leader exits or dies. Only index and metadata cross the socket: chunk
 * payloads are read and written by each process directly in pack files.
 *
 * Key layout: ../format/keys.ts.
 */
import { constants as fsConstants, rmSync } from 'node:fs';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { ClassicLevel } from 'classic-level';
import type { RaveLevel } from 'rave-level';
import { K_DAMAGED, damagedKey } from '../format/keys.js';
import { describeFsError, errnoOf, innermostMessage, noteIndexFailure } from '../util/errors.js';

export type Db = RaveLevel<Buffer, Buffer>;

/*
 * Every LevelDB write in a genvault process is synced (fdatasync of the LevelDB log),
 * whatever options it came with. The reason is rave-level: a follower's write reaches the
 * leader through many-level, whose protocol does not carry write options, so the leader
 * would write a follower's `{sync: true}` batch without syncing. With a mount up (its
 * index holder leads) that is every backup and gc: a generation reported as committed
 * could vanish in a power loss, and worse, gc deletes old packs right after the batch
 * that moves their chunks, so losing that batch would leave the index pointing into
 * deleted packs. Our writes are few (per pack, per generation, per gc step), so syncing
 * all of them costs nothing measurable. Patched on the prototype because rave-level
 * creates the leader's ClassicLevel itself. Chained batches (`db.batch()`) are not
 * patched: their one user, repair's model (pack-model.ts), writes a private database and
 * passes `sync` itself.
 */
{
  type Method = (this: unknown, ...args: unknown[]) => unknown;
  const proto = ClassicLevel.prototype as unknown as Record<string, Method>;
  const optionsAt: Record<string, number> = { _put: 2, _del: 1, _batch: 1 };
  for (const [name, at] of Object.entries(optionsAt)) {
    const original = proto[name]!;
    if ((original as { genvaultSynced?: boolean }).genvaultSynced) continue;
    const synced: Method = function (this: unknown, ...args: unknown[]) {
      args[at] = { ...(args[at] as object), sync: true };
      return original.apply(this, args);
    };
    (synced as { genvaultSynced?: boolean }).genvaultSynced = true;
    proto[name] = synced;
  }
}

/*
 * LevelDB does not verify its checksums on reads (classic-level exposes neither
 * `paranoid_checks` nor `verify_checksums`), and when it recovers a log whose records fail
 * their checksum it drops them and carries on, saying so only in its own LOG file: a
 * generation committed just before a crash could vanish without a word. The process that
 * opens the database (whichever leads it) therefore reads LOG right after opening, before
 * it answers any request, and keeps what LevelDB reported in DAMAGE_FILE beside it, which
 * every command then reports (Repository.open) and gc refuses to run past (it would delete
 * what the lost records referenced). Readers never trust a record on LevelDB's word alone:
 * map leaves are checked against their digests, maps and generation records against each
 * other (chunkmap.ts, generation.ts).
 */
export const DAMAGE_FILE = 'genvault-damage.log';

/** What LevelDB's LOG says it dropped or found corrupt while opening (empty when nothing). */
async function recoveryDamage(dir: string): Promise<string[]> {
  const log = await fs.readFile(path.join(dir, 'LOG'), 'utf8').catch(() => '');
  return log.split('\n').filter((l) => /\(ignoring error\)|Corruption|dropping \d+ bytes/.test(l));
}

{
  type Open = (this: { location: string }, options: unknown, callback: (err?: Error | null) => void) => void;
  const proto = ClassicLevel.prototype as unknown as { _open: Open & { genvaultChecked?: boolean } };
  const original = proto._open;
  if (!original.genvaultChecked) {
    const checked: Open & { genvaultChecked?: boolean } = function (options, callback) {
      if (openFilesLimit !== null) options = { ...(options as object), maxOpenFiles: openFilesLimit };
      original.call(this, options, (err) => {
        if (err) return callback(err);
        void recoveryDamage(this.location)
          .then(async (lines) => {
            if (!lines.length) return;
            const text = `${new Date().toISOString()} LevelDB reported damage while opening the index:\n${lines.map((l) => `  ${l}\n`).join('')}`;
            await fs.appendFile(path.join(this.location, DAMAGE_FILE), text, { mode: 0o600 });
          })
          .catch(() => undefined)
          .then(() => callback());
      });
    };
    checked.genvaultChecked = true;
    proto._open = checked;
  }
}

/** maxOpenFiles for indexes this process leads from now on (null: LevelDB's default, 1000). */
let openFilesLimit: number | null = null;

/**
 * A process that reads a whole large index once (repair comparing it with the packs)
 * bounds how many of its table files LevelDB keeps open, and so memory-mapped: every table
 * touched stays mapped, and counts in the process's RSS, until it leaves the table cache.
 * Applies only where this process leads (opens LevelDB itself); rave-level passes no other
 * options through.
 */
export function limitIndexOpenFiles(n: number): void {
  openFilesLimit = n;
}

/** The damage LevelDB reported when the index was opened, from DAMAGE_FILE; null when none was. */
export async function indexDamage(dir: string): Promise<string | null> {
  try {
    return await fs.readFile(path.join(dir, DAMAGE_FILE), 'utf8');
  } catch {
    return null;
  }
}

/** A problem with the index itself (missing, unreadable): commands refuse with this one line. */
export class IndexError extends Error {}

/**
 * Open the index. `create` only for `init`: anywhere else a missing index is an error, never
 * an empty one made in its place (which would list no generations and verify clean).
 * An index on read-only media (or one this user may read but not write) is copied to a
 * private temporary directory and opened there: LevelDB needs to write its lock file and
 * log even to read, and the copy is removed on close.
 */
export async function openDb(dir: string, opts: { create?: boolean } = {}): Promise<Db> {
  if (!opts.create) {
    try {
      await fs.access(path.join(dir, 'CURRENT'));
    } catch (e) {
      const gone = await fs.access(dir).then(() => false, () => true);
      const what = gone ? 'the index directory is missing' : 'the index is missing its CURRENT file';
      throw new IndexError(`${what} (${(e as NodeJS.ErrnoException).code ?? 'unreadable'}); refusing to start an empty index in its place`);
    }
  }
  let at = dir;
  let copy: string | null = null;
  if (!opts.create && !(await writable(dir))) {
    copy = await privateCopy(dir);
    at = copy;
  }
  // Imported here, not above: rave-level and its streams are a visible part of a cold
  // start (performance.md, "Rebuilding the index"), which commands that open no shared
  // index (repair building its own) need not pay.
  const { RaveLevel } = await import('rave-level');
  const db = new RaveLevel<Buffer, Buffer>(at, { keyEncoding: 'buffer', valueEncoding: 'buffer' });
  // rave-level reports a leader it cannot open or replace (a damaged index, a read-only or
  // full file system) as an 'error' event; without a listener that would crash the process
  // with a stack trace. Requests already made would then wait forever (a command whose
  // event loop runs dry that way exits 13): after the open, closing aborts them, so they
  // fail like any error, and the failure is noted for the line that reports them
  // (errors.ts, causes()). During the open, the failure is the open's own error.
  let opened = false;
  let failed: (err: Error) => void = () => undefined;
  const failure = new Promise<never>((_, reject) => (failed = reject));
  failure.catch(() => undefined);
  db.on('error', (err: Error) => {
    if (!opened) return failed(err);
    if (!noteIndexFailure(err)) process.stderr.write(`genvault: index database: ${innermostMessage(err)}\n`);
    void db.close().catch(() => undefined);
  });
  try {
    await db.open();
    // A first request goes through the leader, which answers only once LevelDB has opened
    // (and DAMAGE_FILE has been written if it found damage): after it, the open is settled.
    // A leader that cannot open LevelDB only emits 'error' and leaves requests pending.
    await Promise.race([getOrNull(db, Buffer.of(0)), failure]);
    opened = true;
  } catch (e) {
    await db.close().catch(() => undefined);
    if (copy) await fs.rm(copy, { recursive: true, force: true });
    // The file system refusing (full, read-only, permissions) is not damage to the index.
    const errno = errnoOf(e);
    if (errno && ['ENOSPC', 'EDQUOT', 'EROFS', 'EACCES', 'EPERM', 'EIO'].includes(errno)) throw describeFsError(e, dir);
    throw new IndexError(`cannot open the index: ${innermostMessage(e)}`);
  }
  if (copy) {
    const dropCopy = () => fs.rm(copy!, { recursive: true, force: true });
    db.once('closed', () => void dropCopy());
    process.once('exit', () => rmSync(copy!, { recursive: true, force: true }));
    (db as Db & { readOnlyCopy?: string }).readOnlyCopy = copy;
  }
  return db;
}

async function writable(dir: string): Promise<boolean> {
  try {
    await fs.access(dir, fsConstants.W_OK);
    return true;
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'EROFS' || code === 'EACCES' || code === 'EPERM') return false;
    throw e;
  }
}

/** Copy LevelDB's own files (not its lock, info logs or rave-level's socket) to a new 0700 directory. */
async function privateCopy(dir: string): Promise<string> {
  const copy = await fs.mkdtemp(path.join(os.tmpdir(), 'genvault-index-'));
  for (const name of await fs.readdir(dir)) {
    if (!/^(CURRENT|MANIFEST-\d+|\d+\.(ldb|log|sst)|genvault-damage\.log)$/.test(name)) continue;
    await fs.copyFile(path.join(dir, name), path.join(copy, name));
  }
  return copy;
}

/**
 * A new LevelDB for one process only (repair and verify build the model of the packs in
 * one), without rave-level's socket. LevelDB memory-maps up to 1000 table files, and a
 * pass over millions of keys touches all of them: those pages count in the process's RSS.
 * A small table cache of small tables bounds what is mapped.
 */
export async function openPrivateDb(dir: string): Promise<Db> {
  const db = new ClassicLevel<Buffer, Buffer>(dir, { keyEncoding: 'buffer', valueEncoding: 'buffer', maxOpenFiles: OPEN_FILES_FOR_PASSES, maxFileSize: PASS_TABLE_BYTES });
  await db.open({ createIfMissing: true, errorIfExists: true });
  return db as unknown as Db;
}

/**
 * LevelDB keeps 10 of max_open_files for itself; the rest is its table cache. It raises
 * anything under 74 to 74, so the cache holds 64 tables at least: tables of 512 KiB
 * instead of LevelDB's 2 MiB keep what a pass leaves mapped to a quarter. A rebuilt
 * index keeps them until LevelDB compacts them into tables of the usual size.
 */
export const OPEN_FILES_FOR_PASSES = 40;
const PASS_TABLE_BYTES = 512 << 10;

/** The private copy an index on read-only media was opened from (null: opened in place). */
export function readOnlyCopy(db: Db): string | null {
  return (db as Db & { readOnlyCopy?: string }).readOnlyCopy ?? null;
}

/** Remember that a chunk is damaged, so the next backup holding its bytes heals it. Best effort. */
export async function markDamaged(db: Db, digest: Uint8Array, by: string): Promise<void> {
  try {
    await db.put(damagedKey(digest), Buffer.from(JSON.stringify({ found: new Date().toISOString(), by })));
  } catch {
    /* reporting the damage matters more than remembering it */
  }
}

/** All chunks currently marked damaged (binary digest strings). Normally none. */
export async function damagedSet(db: Db): Promise<Set<string>> {
  const out = new Set<string>();
  const start = Buffer.of(K_DAMAGED);
  for await (const k of db.keys({ gte: start, lt: Buffer.of(K_DAMAGED + 1) })) out.add(k.subarray(1).toString('binary'));
  return out;
}

/**
 * The entries of a range, up to `size` at a time. A pass over every chunk entry with
 * `for await` takes one promise turn per entry, a large share of gc's time at tens of
 * millions of entries (native-notes/performance.md); one turn per slice is not.
 */
export async function* slices(db: Db, range: object, size = 1024): AsyncGenerator<Array<[Buffer, Buffer]>> {
  // classic-level ends a slice at 16 KiB of keys and values unless told otherwise (~220
  // chunk entries): room for `size` entries of up to 128 bytes (chunk entries take 74),
  // unless the range asks for more.
  const it = db.iterator({ highWaterMarkBytes: size * 128, ...range } as object);
  try {
    for (;;) {
      const part = await it.nextv(size);
      if (!part.length) return;
      yield part;
    }
  } finally {
    await it.close();
  }
}

/**
 * getMany with the keys looked up in key order, the values given back in the order of
 * `keys`. LevelDB finds each key level by level in its table files; in key order the next
 * key is mostly in a table just read, while in random order nearly every lookup opens
 * tables anew once the index has far more tables than its cache holds (gc and verify keep
 * OPEN_FILES_FOR_PASSES; native-notes/performance.md has what it costs).
 */
export async function getManyInKeyOrder(db: Db, keys: Buffer[]): Promise<Array<Buffer | undefined>> {
  const order = keys.map((_, i) => i).sort((a, b) => Buffer.compare(keys[a]!, keys[b]!));
  const got = await db.getMany(order.map((i) => keys[i]!));
  const out = new Array<Buffer | undefined>(keys.length);
  order.forEach((i, j) => (out[i] = got[j] ?? undefined));
  return out;
}

/** Convert abstract-level's "not found" to null across versions. */
export async function getOrNull(db: Db, k: Buffer): Promise<Buffer | null> {
  try {
    const v = await db.get(k);
    return v === undefined ? null : v;
  } catch (e) {
    if ((e as { code?: string }).code === 'LEVEL_NOT_FOUND') return null;
    throw e;
  }
}

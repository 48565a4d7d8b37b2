/**
 * `genvault repair` once its key is known (repair.ts): the model of the packs built in a
 * new LevelDB beside the index, reported, and with `--write` swapped in.
 */
import fs from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { GenvaultError } from '../util/errors.js';
import { commandName, currentOwner, ownerAlive, processStart, type Owner } from '../util/proc.js';
import { K_LEAF, prefixEnd } from '../format/keys.js';
import { IndexError, OPEN_FILES_FOR_PASSES, limitIndexOpenFiles, openDb, openPrivateDb, type Db } from '../index/db.js';
import { gcRunning, liveWriters, parseOwner } from '../repository/locks.js';
import { applyUmask, tightenRepo } from '../repository/perms.js';
import type { RepoConfig } from '../format/config.js';
import type { RepoKeys } from '../format/crypto.js';
import { PLAIN_GENERATIONS, type GenerationIndex } from '../format/index-seal.js';
import { storeOf } from '../repository/location.js';
import { StoreLock } from '../repository/store-locks.js';
import { PackModel, type DamagedRecord, type IncompleteGeneration } from './pack-model.js';
import { diffAgrees, diffIndex, type IndexDiff } from './index-diff.js';
import { pathExists } from '../util/paths.js';

export interface RepairOptions {
  /** Swap the rebuilt index in (default: report only). */
  write?: boolean;
  /** Read every record header, also in packs that have tables of contents. */
  readAll?: boolean;
  /** Bytes of packs read so far, of the total (a terminal's progress bar). */
  progress?: (done: number, total: number) => void;
}

export interface RepairReport {
  write: boolean;
  packs: number;
  /** Of them, read from their tables of contents (format 5) instead of header by header. */
  packsViaToc: number;
  bytes: number;
  /** Distinct chunks found (copies counted once), and every chunk record or group member read. */
  chunks: number;
  chunkRecords: number;
  leaves: number;
  generationsFound: number;
  generationsRestored: number;
  tornTails: Array<{ pack: string; bytes: number; problem: string }>;
  damagedRecords: DamagedRecord[];
  /** Generations that cannot be restored whole, and what they lack. */
  incomplete: IncompleteGeneration[];
  /** The index in place: missing, unreadable (why), or readable and compared. */
  index: { state: 'missing' } | { state: 'unreadable'; problem: string } | { state: 'readable'; agrees: boolean; diff: IndexDiff };
  /** With write: where the old index was moved (null when there was none). */
  oldIndex: string | null;
  durationMs: number;
}

const OWNER_FILE = 'genvault-repair.json';
const BUILD_PREFIX = 'index.repair-';

/** repair() after the config is checked and the key (null: not encrypted) opened. */
export async function rebuild(abs: string, config: RepoConfig, keys: RepoKeys | null, opts: RepairOptions, started: number, genIndex: GenerationIndex = PLAIN_GENERATIONS): Promise<RepairReport> {
  applyUmask(config);
  const indexDir = path.join(abs, 'index');
  if (opts.write) {
    // A repository restored from a copy of its packs and config.json alone lacks these.
    for (const d of ['locks', 'tmp']) await fs.mkdir(path.join(abs, d), { recursive: true });
    await refuseSharing(abs, indexDir);
  }
  await removeStaleBuilds(abs);
  // The build directory holds the new index (index/) and the copies of every chunk
  // (copies/, removed whole before the swap).
  const build = await newBuildDir(abs);
  let db: Db | null = null;
  let copies: Db | null = null;
  try {
    db = await openPrivateDb(path.join(build, 'index'));
    copies = await openPrivateDb(path.join(build, 'copies'));
    const model = await scanPacks(abs, db, copies, { progress: opts.progress, readAll: opts.readAll === true, keys, genIndex });
    const report = await describe(model, indexDir, opts.write === true);
    await copies.close();
    copies = null;
    await db.close();
    db = null;
    if (opts.write) {
      await fs.rm(path.join(build, 'copies'), { recursive: true, force: true });
      await refuseSharing(abs, indexDir); // nobody may have started meanwhile
      report.oldIndex = await swapIn(abs, indexDir, path.join(build, 'index'));
      await tightenRepo(abs, config).catch(() => undefined);
    }
    report.durationMs = Date.now() - started;
    return report;
  } finally {
    await copies?.close().catch(() => undefined);
    await db?.close().catch(() => undefined);
    await fs.rm(build, { recursive: true, force: true }).catch(() => undefined);
  }
}

/** The report: what the scan found, and the index in place compared with it. */
async function describe(model: PackModel, indexDir: string, write: boolean): Promise<RepairReport> {
  const db = model.db;
  const restored = await model.finish();
  const incomplete = [...model.unrestorable(), ...(await model.incomplete(restored))];
  let leaves = 0;
  for await (const _ of db.keys({ gte: Buffer.of(K_LEAF), lt: prefixEnd(Buffer.of(K_LEAF)) })) leaves++;
  return {
    write,
    packs: model.counts.packs,
    packsViaToc: model.counts.viaToc,
    bytes: model.counts.bytes,
    chunks: model.counts.chunks,
    chunkRecords: model.counts.chunkRecords,
    leaves,
    generationsFound: model.counts.generationsFound,
    generationsRestored: restored.length,
    tornTails: model.packs.filter((p) => p.tail).map((p) => ({ pack: p.pack, bytes: p.tail, problem: p.tailProblem ?? '' })),
    damagedRecords: model.damaged,
    incomplete,
    index: await compareWithIndex(indexDir, model),
    oldIndex: null,
    durationMs: 0,
  };
}

async function compareWithIndex(indexDir: string, model: PackModel): Promise<RepairReport['index']> {
  if (!(await pathExists(indexDir))) return { state: 'missing' };
  limitIndexOpenFiles(OPEN_FILES_FOR_PASSES); // one pass over all of it (db.ts)
  try {
    await (await openDb(indexDir)).close();
  } catch (e) {
    return { state: 'unreadable', problem: e instanceof IndexError ? e.message : (e as Error).message };
  }
  try {
    const diff = await diffIndex(() => openDb(indexDir), model);
    return { state: 'readable', agrees: diffAgrees(diff), diff };
  } catch (e) {
    return { state: 'unreadable', problem: (e as Error).message };
  }
}

/**
 * `--write` needs the repository to itself: no writer registered (a backup's commits would
 * be lost with the old index), no gc, and no process holding the index (it would go on
 * using the old one). One line naming who is in the way.
 */
async function refuseSharing(abs: string, indexDir: string): Promise<void> {
  const writers = await liveWriters(abs);
  if (writers.length) {
    const what = writers.map((w) => `${w.what} (pid ${w.owner.pid})`).join(', ');
    throw new GenvaultError(`repair --write needs the repository to itself; running: ${what}`, 'LOCKED');
  }
  if (await gcRunning(abs)) throw new GenvaultError('repair --write needs the repository to itself; a gc is running', 'LOCKED');
  const holder = await indexHolder(indexDir);
  if (holder) throw new GenvaultError(`repair --write needs the repository to itself; the index is open in ${holder}`, 'LOCKED');
}

/** Who holds the index open: a rave-level leader answering on its socket, or LevelDB's LOCK held (null: nobody). */
async function indexHolder(indexDir: string): Promise<string | null> {
  const sock = path.join(indexDir, 'rave-level.sock');
  if (await pathExists(sock)) {
    const answers = await new Promise<boolean>((resolve) => {
      const c = net.connect(sock);
      const done = (v: boolean) => {
        c.destroy();
        resolve(v);
      };
      c.once('connect', () => done(true));
      c.once('error', () => done(false));
      c.setTimeout(2000, () => done(false));
    });
    if (answers) return 'another process (its socket index/rave-level.sock answers)';
  }
  const st = await fs.stat(path.join(indexDir, 'LOCK')).catch(() => null);
  if (!st) return null;
  // LevelDB holds LOCK with fcntl(2); /proc/locks lists the holder by inode.
  const locks = await fs.readFile('/proc/locks', 'utf8').catch(() => '');
  for (const line of locks.split('\n')) {
    const f = line.trim().split(/\s+/);
    const dev = f.find((x) => /^[0-9a-f]+:[0-9a-f]+:\d+$/.test(x));
    if (dev && Number(dev.split(':')[2]) === st.ino) return `process ${f[4]} (it holds index/LOCK)`;
  }
  return null;
}

/**
 * Remove build directories of repairs that died. A build directory is named after its
 * process (`index.repair-PID-RANDOM`) and holds the owner (pid and start time) soon after
 * it is made: without the owner file, the pid alone decides.
 */
async function removeStaleBuilds(abs: string): Promise<void> {
  for (const name of await fs.readdir(abs)) {
    const m = new RegExp(`^${BUILD_PREFIX.replace('.', '\\.')}(\\d+)-[0-9a-f]+$`).exec(name);
    if (!m) continue;
    const dir = path.join(abs, name);
    const owner = await readOwner(path.join(dir, OWNER_FILE));
    if (owner ? await ownerAlive(owner) : (await processStart(Number(m[1]))) !== null) continue;
    await fs.rm(dir, { recursive: true, force: true });
  }
}

async function readOwner(file: string): Promise<Owner | null> {
  try {
    const o = parseOwner(JSON.parse(await fs.readFile(file, 'utf8')));
    return typeof o === 'string' ? null : o;
  } catch {
    return null;
  }
}

async function newBuildDir(abs: string): Promise<string> {
  const dir = path.join(abs, `${BUILD_PREFIX}${process.pid}-${randomBytes(6).toString('hex')}`);
  await fs.mkdir(dir);
  await fs.writeFile(path.join(dir, OWNER_FILE), JSON.stringify(await currentOwner()));
  return dir;
}

/**
 * Make the complete new index the index: the old index (if any) is renamed aside
 * first, then the build takes its name. Both renames are atomic; between them there is no
 * index, and a repair run then builds it again.
 */
async function swapIn(abs: string, indexDir: string, built: string): Promise<string | null> {
  await syncDir(built);
  let old: string | null = null;
  if (await pathExists(indexDir)) {
    const stamp = new Date().toISOString().replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z');
    old = path.join(abs, `index.broken-${stamp}`);
    for (let n = 1; await pathExists(old); n++) old = path.join(abs, `index.broken-${stamp}-${n}`);
    await fs.rename(indexDir, old);
  }
  await fs.rename(built, indexDir);
  await syncDir(abs);
  return old;
}

async function syncDir(dir: string): Promise<void> {
  const fh = await fs.open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}


/**
 * The model of the packs. An object store's are read under a shared lock in the store
 * (store-locks.ts), so that no gc elsewhere removes packs while they are read.
 */
async function scanPacks(abs: string, db: Db, copies: Db, opts: Parameters<typeof PackModel.build>[3]): Promise<PackModel> {
  const store = await storeOf(abs);
  try {
    if (store.spec.kind === 'local') return await PackModel.build(store, db, copies, opts);
    const lock = await StoreLock.acquire(store, { exclusive: false, what: commandName() });
    try {
      return await PackModel.build(store, db, copies, opts);
    } finally {
      await lock.release().catch(() => undefined);
    }
  } finally {
    await store.close();
  }
}

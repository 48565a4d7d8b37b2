/**
 * A repository: a directory holding config.json, index/ (LevelDB), packs/ and locks/.
 * Opening it checks the config and opens the index; everything else is on demand.
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import { GenvaultError, REPAIR_HINT, UsageError, describeFsError } from '../util/errors.js';
import { Lru } from '../util/lru.js';
import { INDEX_SEALED_VERSION, RepoConfig, defaultConfig } from '../format/config.js';
import { MASTER_KEY_BYTES, keyCheck, type RepoKeys } from '../format/crypto.js';
import { randomBytes } from 'node:crypto';
import { addSlot, unlock, type Secret, type Unlocked } from './keys.js';
import { DAMAGE_FILE, Db, IndexError, getOrNull, indexDamage, openDb, readOnlyCopy } from '../index/db.js';
import { K_GEN, K_GENMAP, chunkKey, key, leafKey, prefixEnd } from '../format/keys.js';
import { ChunkMap, Leaf, LeafDamage, checkedLeaf, checkedTop } from '../format/chunkmap.js';
import { Generation, parseTarget, resolveRevision } from '../format/generation.js';
import { NAMES_NEED_KEY, generationIndex, nameTag, type GenerationIndex, type IndexKeys } from '../format/index-seal.js';
import { ChunkLocation, decodeLocation } from '../format/pack.js';
import { WorkerPool } from '../work/pool.js';
import { LocalStore } from '../store/local.js';
import { STORE_FILE, describeLocation, readStoreFile, storeOf } from './location.js';
import { StoreLock } from './store-locks.js';
import { commandName } from '../util/proc.js';
import { cacheBehind, cacheState } from './cache.js';
import type { Store } from '../store/store.js';
import { applyUmask, repoModes, resolveGroup, setDirMode, tightenRepo } from './perms.js';
import { CONFIG_FILE, readConfig, readConfigFrom } from './config-file.js';
import { pathExists } from '../util/paths.js';

export { CONFIG_FILE };

export class Repository {
  private poolInstance: WorkerPool | null = null;
  private leafCache = new Lru<string, Promise<Leaf>>(4096);

  private constructor(
    readonly dir: string,
    readonly config: RepoConfig,
    readonly db: Db,
    /** Where config.json and the packs are (everything but index/ and locks/). */
    readonly store: Store,
    /** An encrypted repository's opened key (formats 6 and 7), or null. */
    readonly unlocked: Unlocked | null = null,
  ) {
    this.gi = generationIndex(config, unlocked?.index ?? null);
  }

  private gi: GenerationIndex;
  /** An object-store repository's lock in its store (store-locks.ts), held while open. */
  private storeLock: StoreLock | null = null;

  /** How this repository's generation records are keyed and stored (format 7: name tags, sealed values). */
  get genIndex(): GenerationIndex {
    return this.gi;
  }

  /**
   * Read a sealed index (format 7) opened without the key with these index keys: those of
   * a repository with the same id and key check (sync's destination, checked by the
   * caller), so that a sync source needs no key of its own.
   */
  adoptIndexKeys(keys: IndexKeys): void {
    if (!this.gi.readable) this.gi = generationIndex(this.config, keys);
  }

  /** A sealed index opened without the key: open the key now (this process's secret) to read it. */
  async unlockIndex(): Promise<void> {
    if (this.gi.readable) return;
    this.adoptIndexKeys((await unlock(this.dir, this.config)).index);
  }

  /** The derived keys records are sealed and chunks identified with, or null (unencrypted). */
  get keys(): RepoKeys | null {
    return this.unlocked?.keys ?? null;
  }

  /**
   * Make a repository; with `encrypt`, an encrypted one (format 7) whose master key is
   * wrapped in a first key slot under that secret. `master`: that master key instead of a
   * new one (`init --like` an encrypted repository: overrides then carry its id too).
   */
  static async init(dir: string, overrides: Partial<RepoConfig> = {}, encrypt: Secret | null = null, master: Buffer | null = null): Promise<RepoConfig> {
    const abs = path.resolve(dir);
    // An object store's cache directory holds its store.json (location.ts) and nothing else yet.
    const objectStore = (await readStoreFile(abs)) !== null;
    if (objectStore) await refuseExistingObject(abs);
    await refuseExisting(abs, objectStore);
    const config = { ...defaultConfig(), ...overrides };
    if (config.group === undefined) delete config.group;
    if (master && !encrypt) throw new Error('a master key needs a secret for its slot');
    master = encrypt ? (master ?? randomBytes(MASTER_KEY_BYTES)) : null;
    if (master) {
      config.version = INDEX_SEALED_VERSION;
      config.encryption = { cipher: 'aes-256-gcm', identity: 'hmac-sha256', keyCheck: keyCheck(master) };
    }
    const modes = repoModes(config);
    const gid = config.group ? await resolveGroup(config.group) : null;
    let store: Store | null = null;
    try {
      // The umask makes what LevelDB and later writers create 0600/0700 (0640/2750 with a group).
      applyUmask(config);
      await fs.mkdir(abs, { recursive: true, mode: 0o700 });
      // An existing (empty) directory keeps no mode of its own, nor another user's ownership.
      await setDirMode(abs, modes.dir, gid, process.getuid?.() === 0 ? 0 : -1);
      store = objectStore ? await storeOf(abs) : await LocalStore.init(abs, modes.dir);
      // locks/, tmp/ and index/ are local (beside the packs, or in the cache directory).
      for (const d of ['locks', 'tmp']) await fs.mkdir(path.join(abs, d), { mode: modes.dir & 0o777 });
      const db = await openDb(path.join(abs, 'index'), { create: true });
      await db.close();
      await tightenRepo(abs, config, { strict: true, configFile: null });
      if (master) await addSlot(abs, config, master, encrypt!);
      // config.json last and atomically: a directory without it is not a repository. It
      // takes the group of the repository directory (set-group-ID, tightened above).
      await store.put(CONFIG_FILE, JSON.stringify(config, null, 2) + '\n', { exclusive: true, mode: modes.file });
    } catch (e) {
      throw e instanceof GenvaultError ? e : describeFsError(e, abs);
    } finally {
      await store?.close();
    }
    return config;
  }

  static async readConfig(dir: string): Promise<RepoConfig> {
    return readConfig(dir);
  }

  /**
   * Open a repository. Sets the process umask for its files (perms.ts: whoever opens the
   * index may create LevelDB files and its socket). With `write` (backup, gc, prune,
   * forget, protect, jobs), its directories are also brought to the repository's modes.
   * `secret`: what opens an encrypted repository's key, instead of this process's.
   *
   * An object-store repository (location.ts) is locked in its store for as long as it is
   * open (shared; `exclusive` for gc), and its index cache must be current: missing or
   * behind the bucket (cache.ts), open fails with code 'CACHE_BEHIND' and the caller
   * rebuilds it (repair) and opens again. `limitRate`: bytes per second to and from it.
   */
  static async open(dir: string, opts: { write?: boolean; withoutKey?: boolean; secret?: Secret; exclusive?: boolean; limitRate?: number } = {}): Promise<Repository> {
    const abs = path.resolve(dir);
    // limitRate: an object store's transfers, both ways (--limit-rate).
    const store = await storeOf(abs, { limitRate: opts.limitRate });
    let lock: StoreLock | null = null;
    try {
      const config = await readConfigFrom(store, abs);
      lock = store.spec.kind === 'local' ? null : await lockStore(store, opts.exclusive === true);
      const repo = await Repository.openIndex(abs, config, store, opts);
      repo.storeLock = lock;
      return repo;
    } catch (e) {
      await lock?.release().catch(() => undefined);
      await store.close();
      throw e;
    }
  }

  private static async openIndex(abs: string, config: RepoConfig, store: Store, opts: { write?: boolean; withoutKey?: boolean; secret?: Secret }): Promise<Repository> {
    // The key first: a wrong one ends the command before anything is written. `withoutKey`:
    // a reader of the index alone (status: job history, generation records), which the
    // key does not protect (FORMAT.md, "What stays plaintext"); it gets no worker pool.
    const unlocked = config.encryption && !opts.withoutKey ? await unlock(abs, config, opts.secret) : null;
    const indexDir = path.join(abs, 'index');
    applyUmask(config);
    let db: Db;
    try {
      if (store.spec.kind !== 'local' && !(await pathExists(indexDir))) throw cacheError(abs, 'missing');
      db = await openDb(indexDir);
    } catch (e) {
      if (e instanceof GenvaultError) throw e;
      if (e instanceof IndexError) {
        const hint = config.version >= 4 ? REPAIR_HINT : `'genvault repair' cannot rebuild a format ${config.version} index: put back a copy of index/`;
        throw new GenvaultError(`${abs}: index damaged: ${e.message}; ${hint}`, 'INDEX');
      }
      throw describeFsError(e, indexDir);
    }
    if (store.spec.kind !== 'local') {
      const state = await cacheState(abs, store, db).catch(async (e) => {
        await db.close();
        throw e;
      });
      if (cacheBehind(state)) {
        await db.close();
        throw cacheError(abs, `behind the bucket (${state.gone.length} packs gone, ${state.unknown.length} new)`);
      }
    }
    const repo = new Repository(abs, config, db, store, unlocked);
    repo.readOnly = readOnlyCopy(db) !== null;
    if (opts.write && !repo.readOnly) await tightenRepo(abs, config);
    repo.indexDamage = await indexDamage(readOnlyCopy(db) ?? indexDir);
    if (repo.indexDamage) {
      process.stderr.write(
        `genvault: warning: index damaged: LevelDB dropped or found corrupt records when it last recovered the index ` +
          `(${path.join(indexDir, DAMAGE_FILE)}): generations or chunks may be missing from it; run 'genvault verify' (${REPAIR_HINT})\n`,
      );
    }
    return repo;
  }

  /** Opened from a private copy of an index on read-only media: nothing can be written. */
  readOnly = false;

  /** Commands that write call this first: on read-only media they refuse in one line. */
  requireWritable(what: string): void {
    if (this.readOnly) throw new GenvaultError(`${this.dir}: the repository is on read-only media (or not writable by this user): ${what} needs to write to it`, 'EROFS');
  }

  /** What LevelDB reported dropping or finding corrupt when it recovered the index (DAMAGE_FILE), or null. */
  indexDamage: string | null = null;

  get pool(): WorkerPool {
    // Without its key an encrypted repository's records can only fail their checks.
    if (this.config.encryption && !this.unlocked) throw new GenvaultError(`${this.dir}: encrypted, and opened without its key`, 'NO_KEY');
    if (!this.poolInstance) this.poolInstance = new WorkerPool(this.workerCount, this.workerNice, this.workerDepth, this.store.spec, this.keys, this.store.spec.kind === 'local' ? null : this.store);
    return this.poolInstance;
  }

  /**
   * Worker threads for this process (set before first use of pool); undefined: the pool's
   * default, which has spare threads for reads of cold packs. A backup's workers only
   * compute (its reads run on libuv's threads), so it asks for one per core: on 2 cores
   * that used less CPU and ~30 MB less memory than 4 workers.
   */
  workerCount: number | undefined = undefined;

  /** Niceness of this process's workers relative to it (set before first use of pool). */
  workerNice = 5;

  /** Tasks each worker is handed at once (see WorkerPool; set before first use of pool). */
  workerDepth = 2;

  /** An object store: fail unless this process's lock in it is still good (StoreLock.assertHeld). */
  assertStoreLock(what: string): void {
    this.storeLock?.assertHeld(what);
  }

  /** The present by the store's clock (an object store's lock, rewritten now), else this host's. */
  async storeTime(): Promise<number> {
    return (await this.storeLock?.storageNow()) ?? Date.now();
  }

  async close(): Promise<void> {
    await this.poolInstance?.close();
    this.poolInstance = null;
    await this.store.close();
    await this.db.close();
    await this.storeLock?.release();
    this.storeLock = null;
  }

  /**
   * Generations (of one image, or all), oldest first within each image. Generations
   * removed while pinned by a reader are left out unless `includeRemoved` (gc needs them).
   */
  async generations(name?: string, includeRemoved = false): Promise<Generation[]> {
    const gi = this.genIndex;
    if (!gi.readable) throw new GenvaultError(`${this.dir}: ${NAMES_NEED_KEY}`, 'NO_KEY');
    const prefix = gi.prefix(name);
    const out: Generation[] = [];
    for await (const [k, v] of this.db.iterator({ gte: prefix, lt: prefixEnd(prefix) })) {
      let g: Generation;
      try {
        g = gi.parse(k, v);
      } catch (e) {
        this.reportDamagedRecord(k, (e as Error).message);
        continue;
      }
      if (!g.removed || includeRemoved) out.push(g);
    }
    // Sealed keys order images by their tags: put them in name order, as plain keys do.
    if (gi.sealed) out.sort((a, b) => (a.name === b.name ? Date.parse(a.created) - Date.parse(b.created) : a.name < b.name ? -1 : 1));
    return out;
  }

  private reported = new Set<string>();

  /** Generation records found corrupt by this process so far (left out of listings). */
  get damagedRecords(): number {
    return this.reported.size;
  }

  /**
   * A generation record that fails its checks is left out of every listing and named once
   * per process on stderr: the rest of the repository stays usable, and the damage is not
   * silent. `verify` reports it in full.
   */
  private reportDamagedRecord(k: Buffer, problem: string): void {
    const hexKey = k.toString('hex');
    if (this.reported.has(hexKey)) return;
    this.reported.add(hexKey);
    const { name, id } = this.genIndex.describe(k);
    process.stderr.write(`genvault: warning: index damaged: the generation record of ${name}@${id} is corrupt (${problem}); it is left out (run 'genvault verify'; ${REPAIR_HINT})\n`);
  }

  /**
   * Ids of generation maps that have no generation record. A backup commits both in one
   * batch and forget/prune delete both in one batch, so a map alone means the index lost
   * its record: gc must not take the map's chunks for garbage, and verify reports it.
   */
  async lostGenerationMaps(): Promise<string[]> {
    const recordIds = async () => {
      const ids = new Set<string>();
      for await (const k of this.db.keys({ gte: Buffer.of(K_GEN), lt: Buffer.of(K_GEN + 1) })) ids.add(k.subarray(k.length - 8).toString('hex'));
      return ids;
    };
    const before = await recordIds();
    const lost: string[] = [];
    for await (const k of this.db.keys({ gte: Buffer.of(K_GENMAP), lt: Buffer.of(K_GENMAP + 1) })) {
      const id = k.subarray(1).toString('hex');
      if (!before.has(id)) lost.push(id);
    }
    if (!lost.length) return lost;
    const after = await recordIds(); // a backup may have committed between the two scans
    return lost.filter((id) => !after.has(id));
  }

  async images(): Promise<string[]> {
    const names = new Set<string>();
    for (const g of await this.generations()) names.add(g.name);
    return [...names].sort();
  }

  async resolve(spec: string): Promise<Generation> {
    const { name, rev } = parseTarget(spec);
    const gens = await this.generations(name);
    if (!gens.length) throw new GenvaultError(`no image named ${name} in ${this.dir}`, 'NOT_FOUND');
    return resolveRevision(gens, name, rev);
  }

  /**
   * What names an image's backup lock file (locks/image-NAME.lock): its name, or in a
   * sealed index (format 7) 't' and its name tag in hex, so that no file names it.
   */
  imageLockName(name: string): string {
    const ik = this.unlocked?.index;
    return this.gi.sealed && ik ? `t${nameTag(ik, K_GEN, name).toString('hex')}` : name;
  }

  /** The index key of a generation's record (this repository's format: see genIndex). */
  generationKey(g: Pick<Generation, 'name' | 'created' | 'id'>): Buffer {
    return this.genIndex.key(g);
  }

  static mapKey(id: string): Buffer {
    return key(K_GENMAP, Buffer.from(id, 'hex'));
  }

  /** A map leaf, checked against its digest and decoded (cached; damage is not cached). */
  async loadLeaf(digest: Buffer): Promise<Leaf> {
    const k = digest.toString('hex');
    let p = this.leafCache.get(k);
    if (!p) {
      p = (async () => {
        const v = await getOrNull(this.db, leafKey(digest));
        if (!v) throw new LeafDamage(digest, 'is missing');
        try {
          return checkedLeaf(v, digest);
        } catch (e) {
          throw new LeafDamage(digest, (e as Error).message.replace(/^map leaf /, ''));
        }
      })();
      p.catch(() => this.leafCache.set(k, undefined as never));
      this.leafCache.set(k, p);
    }
    return p;
  }

  /** A generation's map, checked against its record (see checkedTop); its leaves are checked as they load. */
  async chunkMap(g: Generation): Promise<ChunkMap> {
    const label = `${g.name}@${g.id}`;
    const v = await getOrNull(this.db, Repository.mapKey(g.id));
    if (!v) throw new GenvaultError(`index damaged: the map of ${label} is missing (run 'genvault verify'; ${REPAIR_HINT})`, 'DAMAGED');
    let refs;
    try {
      refs = checkedTop(v, g);
    } catch (e) {
      throw new GenvaultError(`index damaged: ${label}: ${(e as Error).message} (run 'genvault verify'; ${REPAIR_HINT})`, 'DAMAGED');
    }
    return new ChunkMap(refs, (d) => this.loadLeaf(d), label);
  }

  async location(digest: Uint8Array): Promise<ChunkLocation | null> {
    const v = await getOrNull(this.db, chunkKey(digest));
    return v ? decodeLocation(v) : null;
  }
}

/** init's refusal of a directory that is a repository or holds anything (a cache directory: but its store.json). */
async function refuseExisting(abs: string, objectStore: boolean): Promise<void> {
  let entries: string[];
  try {
    entries = await fs.readdir(abs);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw describeFsError(e, abs);
  }
  if (entries.includes(CONFIG_FILE)) throw new GenvaultError(`${abs}: a repository already exists here`, 'EXISTS');
  const others = entries.filter((f) => !(objectStore && f === STORE_FILE));
  if (objectStore && others.length) throw new GenvaultError(`${abs}: the cache directory of ${await describeLocation(abs)} is not empty (a repository was there: remove the directory, or open the repository instead of init)`, 'EXISTS');
  if (others.length) throw new GenvaultError(`${abs}: directory is not empty`, 'EXISTS');
}

/** init's refusal of a bucket prefix that holds a repository already (made, for a bucket that is missing). */
async function refuseExistingObject(abs: string): Promise<void> {
  const store = (await storeOf(abs)) as Store & { ensureBucket?: () => Promise<void> };
  try {
    await store.ensureBucket?.();
    if ((await store.stat(CONFIG_FILE)) !== null) throw new GenvaultError(`${await describeLocation(abs)}: a repository already exists there`, 'EXISTS');
  } catch (e) {
    throw e instanceof GenvaultError ? e : describeFsError(e, await describeLocation(abs));
  } finally {
    await store.close();
  }
}

/** The lock every command holds in an object store while it runs (store-locks.ts). */
function lockStore(store: Store, exclusive: boolean): Promise<StoreLock> {
  return StoreLock.acquire(store, { exclusive, what: commandName() });
}

/** An object store's index cache that must be rebuilt from the bucket before use (cache.ts). */
function cacheError(abs: string, state: string): GenvaultError {
  return new GenvaultError(`${abs}: the index cache is ${state}; 'genvault repair --write' rebuilds it from the bucket`, 'CACHE_BEHIND');
}

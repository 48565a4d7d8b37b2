/**
 * A local repository as the destination of a sync, written the way a backup writes
 * (FORMAT.md, "Commit protocol"): registered as a writer before anything is looked up;
 * records appended to packs of its own (listed in the registration before their first
 * byte); a flush syncs the pack, then commits its `c` entries, the leaves (`l`) and the
 * pack's `p` size in one batch; a generation's map and record go into a pack of their own,
 * synced, and one batch with that pack's size, `m` and `g` makes the generation visible.
 * Killed anywhere, nothing half-visible remains: the next writer (or gc) trims what was
 * not committed, and a rerun finds what was.
 *
 * Chunks a running gc condemned, or marked damaged, count as lacking (a fresh copy is
 * stored, and the damage mark goes with the generation's commit), as in a backup.
 */
import { GenvaultError, describeFsError } from '../util/errors.js';
import { damagedSet, getOrNull } from '../index/db.js';
import { chunkKey, condemnedKey, damagedKey, leafKey } from '../format/keys.js';
import { COMP_GROUP, RECORD_HEADER_SIZE, encodeLocation, type ChunkLocation } from '../format/pack.js';
import { REC_GENERATION, REC_GENMAP, REC_LEAF, encodeMetaRecord } from '../format/meta.js';
import { TOC_FROM_VERSION } from '../format/toc.js';
import type { Generation } from '../format/generation.js';
import { PackWriter } from '../store/pack-writer.js';
import { ImageLock, WriterRegistration, cleanupDeadWriters, gcRunning, trimPacks } from '../repository/locks.js';
import { Repository } from '../repository/repository.js';
import { openCurrent } from '../lifecycle/open-current.js';
import type { Secret } from '../repository/keys.js';
import { prune, setGenerationState } from '../lifecycle/prune.js';
import type { RetentionRules } from '../lifecycle/retention.js';
import { testPause, testTrace } from '../util/testhooks.js';
import type { RecordMember, SyncDestination } from './endpoint.js';

/** Commit chunk entries once this many are pending (bounds memory, as a backup's flushes). */
const FLUSH_ENTRIES = 65536;

type PutOp = { type: 'put'; key: Buffer; value: Buffer };

export class LocalDestination implements SyncDestination {
  private writer: WriterRegistration | null = null;
  private pack: PackWriter | null = null;
  private readonly packs: PackWriter[] = [];
  private imageLock: ImageLock | null = null;
  /** Chunks appended since the last flush: digest (binary string) -> location. */
  private uncommitted = new Map<string, ChunkLocation>();
  /** Leaves appended since the last flush: digest (binary string) -> bytes. */
  private pendingLeaves = new Map<string, Buffer>();
  private underGc = false;
  private damaged = new Set<string>();
  /** Damaged chunks stored again: their marks are deleted with the next generation's commit. */
  private healed: string[] = [];
  private flushes = 0;
  private appended = 0;

  private constructor(
    private readonly repo: Repository,
    private readonly opts: { wait?: boolean; flushEntries?: number },
    /** Opened here (closed by close()), or the caller's (a serve session's, left open). */
    private readonly owned = true,
  ) {}

  /** A repository the caller has open (a serve session's, src/remote); close() leaves it open. */
  static of(repo: Repository, opts: { wait?: boolean; flushEntries?: number } = {}): LocalDestination {
    return new LocalDestination(repo, opts, false);
  }

  /** `secret`: what opens an encrypted destination's key (default: this process's, keys.ts). */
  static async open(dir: string, opts: { wait?: boolean; flushEntries?: number; secret?: Secret; dryRun?: boolean; limitRate?: number } = {}): Promise<LocalDestination> {
    const repo = await openCurrent(dir, { write: !opts.dryRun, secret: opts.secret, limitRate: opts.limitRate });
    return new LocalDestination(repo, opts);
  }

  get description(): string {
    return this.repo.dir;
  }

  get config() {
    return this.repo.config;
  }

  get keys() {
    return this.repo.keys;
  }

  get indexKeys() {
    return this.repo.unlocked?.index ?? null;
  }

  get storedBytes(): number {
    return this.appended;
  }

  async generations(names?: string[]): Promise<Generation[]> {
    if (!names?.length) return this.repo.generations();
    const out: Generation[] = [];
    for (const n of [...new Set(names)]) out.push(...(await this.repo.generations(n)));
    return out;
  }

  async begin(): Promise<void> {
    const { repo } = this;
    repo.requireWritable('sync');
    await cleanupDeadWriters(repo.dir, repo.db, repo.store);
    this.writer = await WriterRegistration.register(repo.dir, 'sync');
    // Registered first, then checked: a gc that starts after this check waits for us.
    this.underGc = await gcRunning(repo.dir);
    this.damaged = await damagedSet(repo.db);
  }

  async lockImage(name: string): Promise<void> {
    await this.unlockImage();
    this.imageLock = await ImageLock.acquire(this.repo.dir, name, this.opts.wait === true, this.repo.imageLockName(name));
  }

  async unlockImage(): Promise<void> {
    const l = this.imageLock;
    this.imageLock = null;
    await l?.release().catch(() => undefined);
  }

  async lackingChunks(digests: Buffer[]): Promise<boolean[]> {
    const db = this.repo.db;
    // gc's 'x' marks before the entries (as a backup's lacking(), backup/run.ts).
    const condemned = this.underGc ? await db.getMany(digests.map((d) => condemnedKey(d))) : [];
    const found = await db.getMany(digests.map((d) => chunkKey(d)));
    return digests.map((d, k) => {
      const ds = d.toString('binary');
      if (this.uncommitted.has(ds)) return false;
      return found[k] === undefined || found[k] === null || !!condemned[k] || (this.damaged.size > 0 && this.damaged.has(ds));
    });
  }

  async lackingLeaves(digests: Buffer[]): Promise<boolean[]> {
    const found = await this.repo.db.getMany(digests.map((d) => leafKey(d)));
    return digests.map((d, k) => !this.pendingLeaves.has(d.toString('binary')) && (found[k] === undefined || found[k] === null));
  }

  private async openPack(): Promise<PackWriter> {
    const { repo } = this;
    const p = await PackWriter.create(repo.store, { toc: repo.config.version >= TOC_FROM_VERSION, keys: repo.keys, register: (id) => this.writer!.addPack(id) }).catch((e) => {
      throw describeFsError(e, `creating a pack file in ${repo.dir}`);
    });
    this.packs.push(p);
    this.appended += p.size;
    return p;
  }

  private async append(records: Buffer): Promise<{ pack: PackWriter; at: number }> {
    if (this.pack && (this.pack.sealed || this.pack.size > this.repo.config.packTargetSize)) {
      await this.flush();
      await this.pack.close();
      this.pack = null;
    }
    this.pack ??= await this.openPack();
    const p = this.pack;
    const at = await p.append(records).catch((e) => {
      throw describeFsError(e, `writing ${this.repo.store.describe(p.name)}`);
    });
    this.appended += records.length;
    return { pack: p, at };
  }

  async putRecord(record: Buffer, members: RecordMember[]): Promise<void> {
    const compression = record[5]!;
    const storedLength = record.length - RECORD_HEADER_SIZE;
    const groupRaw = record.readUInt32LE(8);
    const { pack, at } = await this.append(record);
    for (const m of members) {
      const loc: ChunkLocation = { packId: pack.packId, offset: at, storedLength, rawLength: m.rawLength, compression };
      if (compression === COMP_GROUP) {
        loc.inner = m.inner ?? 0;
        loc.groupRaw = groupRaw;
      }
      const ds = m.digest.toString('binary');
      this.uncommitted.set(ds, loc);
      if (this.damaged.has(ds)) this.healed.push(ds);
    }
    if (this.uncommitted.size >= (this.opts.flushEntries ?? FLUSH_ENTRIES)) await this.flush();
  }

  async putLeaves(leaves: Array<{ digest: Buffer; bytes: Buffer }>): Promise<void> {
    const fresh = leaves.filter((l) => !this.pendingLeaves.has(l.digest.toString('binary')));
    if (!fresh.length) return;
    await this.append(Buffer.concat(fresh.map((l) => encodeMetaRecord({ type: REC_LEAF, leaf: l.bytes }, this.repo.keys))));
    for (const l of fresh) this.pendingLeaves.set(l.digest.toString('binary'), l.bytes);
  }

  async flush(): Promise<void> {
    const ops: PutOp[] = [];
    if (this.pack) {
      const before = this.pack.size;
      await this.pack.sync();
      this.appended += this.pack.size - before; // its table of contents
      ops.push(this.pack.commitOp());
    }
    for (const [d, loc] of this.uncommitted) ops.push({ type: 'put', key: chunkKey(Buffer.from(d, 'binary')), value: encodeLocation(loc) });
    for (const [d, bytes] of this.pendingLeaves) ops.push({ type: 'put', key: leafKey(Buffer.from(d, 'binary')), value: bytes });
    if (ops.length) await this.repo.db.batch(ops, { sync: true } as object);
    this.uncommitted = new Map();
    this.pendingLeaves = new Map();
    testTrace('sync', `flushed-${++this.flushes}`);
    await testPause('sync', `flushed-${this.flushes}`, 'before-commit');
  }

  async commitGeneration(gen: Generation, top: Buffer): Promise<boolean> {
    await this.flush();
    const { repo } = this;
    const gkey = repo.generationKey(gen);
    if (await getOrNull(repo.db, gkey)) return false;
    repo.assertStoreLock(`sync of ${gen.name}`); // an object store: before the record reaches it
    // The map and record in a pack of their own (FORMAT.md, "Version 5"), synced before the
    // batch. The data pack stays open for the next generation's records (flushed: committed).
    const p = await this.openPack();
    const json = Buffer.from(JSON.stringify(gen));
    const recs = Buffer.concat([
      encodeMetaRecord({ type: REC_GENMAP, id: gen.id, top }, repo.keys),
      encodeMetaRecord({ type: REC_GENERATION, generation: gen, json }, repo.keys),
    ]);
    await p.append(recs).catch((e) => {
      throw describeFsError(e, `writing ${repo.store.describe(p.name)}`);
    });
    const before = p.size;
    await p.sync();
    this.appended += recs.length + p.size - before;
    await p.close();
    testTrace('sync', 'commit');
    await testPause('sync', 'before-commit', 'before-commit');
    await repo.db.batch(
      [
        ...this.healed.map((d) => ({ type: 'del' as const, key: damagedKey(Buffer.from(d, 'binary')) })),
        p.commitOp(),
        { type: 'put', key: Repository.mapKey(gen.id), value: top },
        { type: 'put', key: gkey, value: repo.genIndex.value(gen, json) },
      ],
      { sync: true } as object,
    );
    for (const d of this.healed) this.damaged.delete(d);
    this.healed = [];
    return true;
  }

  async updateState(gen: Generation, state: { tags: string[]; protected: boolean }): Promise<boolean> {
    return setGenerationState(this.repo, gen, state);
  }

  async prune(names: string[], rules: RetentionRules, opts: { minAgeMs?: number; dryRun?: boolean }): Promise<Generation[]> {
    if (!names.length) return [];
    const res = await prune(this.repo, { names, rules, minAgeMs: opts.minAgeMs, dryRun: opts.dryRun });
    return res.removed;
  }

  private async closePacks(): Promise<void> {
    this.pack = null;
    for (const p of this.packs) await p.close().catch(() => undefined);
  }

  async end(): Promise<void> {
    if (this.uncommitted.size || this.pendingLeaves.size) throw new GenvaultError('sync: records left uncommitted', 'INTERNAL');
    await this.closePacks();
    await this.unlockImage();
    await this.writer?.release();
    this.writer = null;
  }

  async abort(): Promise<void> {
    await this.closePacks();
    await this.unlockImage();
    const w = this.writer;
    this.writer = null;
    if (!w) return;
    const trimmed = await trimPacks(this.repo.store, this.repo.db, w.record.packs).then(() => true, () => false);
    if (trimmed) await w.release().catch(() => undefined);
  }

  async close(): Promise<void> {
    if (this.owned) await this.repo.close();
  }
}

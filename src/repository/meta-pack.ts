/**
 * A pack of metadata records (format 4, ../format/meta.ts) written for one index batch:
 * protect, unprotect, forget, prune and upgrade put their records here, and the batch that
 * changes the index carries the pack's `p` size, so the records are durable before the
 * change is visible (the commit protocol of backups, FORMAT.md).
 *
 * The pack is registered as the writer's before its first byte (a crash leaves it to
 * cleanupDeadWriters: deleted when uncommitted). Opened only when a record is added, so a
 * command that ends up changing nothing writes no pack.
 */
import { TOC_FROM_VERSION } from '../format/toc.js';
import { encodeMetaRecord, type WrittenMetaRecord } from '../format/meta.js';
import { PackWriter } from '../store/pack-writer.js';
import { Repository } from './repository.js';
import { WriterRegistration, trimPacks } from './locks.js';

export type PutOp = { type: 'put'; key: Buffer; value: Buffer };

/** Rough bytes per pack before another is started (metadata packs are small; upgrade's are not). */
const META_PACK_BYTES = 64 << 20;

export class MetaPack {
  private writer: PackWriter | null = null;
  /** Packs already sealed by roll-over, whose `p` entries go into the next batch. */
  private sealed: PutOp[] = [];

  constructor(
    private repo: Repository,
    private reg: WriterRegistration,
  ) {}

  /** The writer registration's id (to tell our own from other writers). */
  get registrationId(): string {
    return this.reg.record.id;
  }

  /** Whether the repository keeps metadata in its packs (format 4 and later). */
  static wanted(repo: Repository): boolean {
    return repo.config.version >= 4;
  }

  /**
   * wanted(), with config.json read again when the repository was opened as format 3 or
   * older: `genvault upgrade` may have changed the version since. Ask once registered as a
   * writer (upgrade waits for writers that registered before it changed the version) or
   * under the retention lock (upgrade holds it throughout): then nothing written after the
   * upgrade lacks its records.
   */
  static async wantedNow(repo: Repository): Promise<boolean> {
    return MetaPack.wanted(repo) || (await Repository.readConfig(repo.dir)).version >= 4;
  }

  async add(rec: WrittenMetaRecord): Promise<void> {
    if (this.writer && this.writer.size >= META_PACK_BYTES) this.sealed.push(await this.sealWriter());
    if (!this.writer) {
      const w = await PackWriter.create(this.repo.store, { toc: this.repo.config.version >= TOC_FROM_VERSION, keys: this.repo.keys, register: (id) => this.reg.addPack(id) });
      this.writer = w;
    }
    await this.writer.append(encodeMetaRecord(rec, this.repo.keys));
  }

  /**
   * Sync what was added and return the `p` puts to commit in the same batch as the index
   * change (none when nothing was added). The pack is closed; add() starts a new one.
   */
  async seal(): Promise<PutOp[]> {
    const ops = this.sealed;
    this.sealed = [];
    if (this.writer) ops.push(await this.sealWriter());
    return ops;
  }

  private async sealWriter(): Promise<PutOp> {
    const w = this.writer!;
    this.writer = null;
    await w.sync();
    await w.close();
    return w.commitOp();
  }

  /** Give up (an error before the batch): the uncommitted pack is left to cleanupDeadWriters. */
  async abandon(): Promise<void> {
    const w = this.writer;
    this.writer = null;
    await w?.close().catch(() => undefined);
  }
}

/**
 * Run `fn` as a registered writer with a MetaPack. On success the registration is
 * released (everything fn added was committed by fn's batch); on failure the packs it
 * wrote are removed again (they have no `p` entry), or, if that fails too, left
 * registered for the next writer's cleanupDeadWriters.
 */
export async function withMetaPack<T>(repo: Repository, what: string, fn: (mp: MetaPack) => Promise<T>): Promise<T> {
  const reg = await WriterRegistration.register(repo.dir, what);
  const mp = new MetaPack(repo, reg);
  try {
    const r = await fn(mp);
    await reg.release();
    return r;
  } catch (e) {
    await mp.abandon();
    const trimmed = await trimPacks(repo.store, repo.db, reg.record.packs).then(
      () => true,
      () => false,
    );
    if (trimmed) await reg.release().catch(() => undefined);
    throw e;
  }
}

/**
 * Writing a pack: the pack header, then records appended as backup (or gc) hands them
 * over, onto an Appender of the repository's store. The format itself is in
 * ../format/pack.ts; how the bytes reach the storage (O_DIRECT staging for a local
 * directory) is the store's business (local.ts).
 *
 * From format 5 every sync is preceded by a table of contents of the records appended
 * since the last one (../format/toc.ts), so that the committed pack always ends in one.
 */
import { PACK_HEADER_SIZE, PACK_MAGIC, newPackId, packObject } from '../format/pack.js';
import { encodeTocRecord, tocEntriesOf } from '../format/toc.js';
import type { RepoKeys } from '../format/crypto.js';
import { packKey, packSizeValue } from '../format/keys.js';
import type { Appender, Store } from './store.js';

/**
 * Appends records to one pack. Not durable until sync(); callers commit index entries
 * pointing into the pack only after sync() has returned.
 */
export class PackWriter {
  /** Entries of the records appended since the last TOC (null: this pack gets none). */
  private toc: Array<{ offset: number; bytes: Buffer }> | null;
  /** Offset of the last TOC record (0: none yet), and where it ends. */
  private lastToc = 0;
  private lastTocEnd = 0;
  /** Synced on a store that seals objects on sync: nothing more can be appended. */
  private isSealed = false;

  private constructor(
    readonly packId: string,
    readonly out: Appender,
    toc: boolean,
    private readonly keys: RepoKeys | null = null,
    private readonly sealsOnSync = false,
  ) {
    this.toc = toc ? [] : null;
  }

  /**
   * A new pack; `toc`: append tables of contents (repositories of format 5 and later);
   * `keys`: an encrypted repository's, which authenticate its TOCs (format 6).
   */
  /**
   * `register` names the new pack id in the writer's registration before the file exists:
   * registered after, a kill in between left a file no registration names, which no
   * cleanup of dead writers removes (and whose header may be cut off).
   */
  static async create(store: Store, opts: { toc: boolean; keys?: RepoKeys | null; register: (packId: string) => Promise<void> }): Promise<PackWriter> {
    const packId = newPackId();
    await opts.register(packId);
    const out = await store.create(packObject(packId));
    const header = Buffer.alloc(PACK_HEADER_SIZE);
    PACK_MAGIC.copy(header, 0);
    header.write(packId, 8, 16, 'hex');
    const w = new PackWriter(packId, out, opts.toc, opts.keys ?? null, store.sealsOnSync);
    await w.out.append(header);
    return w;
  }

  /** The pack's object name in the store. */
  get name(): string {
    return this.out.name;
  }

  get size(): number {
    return this.out.size;
  }

  /**
   * Written out whole by its last sync (a store with sealsOnSync): the writer's user closes
   * it and starts a new pack for what follows; its `p` size was committed after that sync.
   */
  get sealed(): boolean {
    return this.isSealed;
  }

  /** The index entry that commits the pack up to what was appended (call after sync()). */
  commitOp(): { type: 'put'; key: Buffer; value: Buffer } {
    return { type: 'put', key: packKey(this.packId), value: packSizeValue(this.size) };
  }

  /** Append whole pre-encoded records (headers included); returns the offset they start at. */
  async append(records: Buffer): Promise<number> {
    const at = this.out.size;
    if (this.toc) for (const e of tocEntriesOf(records, at)) this.toc.push(e);
    await this.out.append(records);
    return at;
  }

  /** Make everything appended durable, after a TOC of what is new since the last one. */
  async sync(): Promise<void> {
    if (this.isSealed) return;
    if (this.toc?.length) {
      const at = this.out.size;
      await this.out.append(encodeTocRecord(this.lastToc, this.toc.map((e) => e.bytes), this.keys));
      this.lastToc = at;
      this.lastTocEnd = this.out.size;
      this.toc = [];
    }
    await this.out.sync();
    this.isSealed = this.sealsOnSync;
  }

  /**
   * Drop everything appended after `size` (gc gives up on a pack it was copying; never
   * past a sync). A rewind behind the last TOC would leave its chain pointing at nothing:
   * the pack then gets no more TOCs, and readers read it whole.
   */
  async rewind(size: number): Promise<void> {
    if (this.toc) {
      if (size < this.lastTocEnd) this.toc = null;
      else this.toc = this.toc.filter((e) => e.offset < size);
    }
    await this.out.truncate(size);
  }

  /** Close; what is pending is written first (not synced: sync() before committing). */
  async close(): Promise<void> {
    await this.out.close();
  }
}

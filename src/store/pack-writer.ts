/**
 * Writing a pack: the pack header, then records appended as backup (or gc) hands them
 * over, onto an Appender of the repository's store. The format itself is in
 * ../format/pack.ts; how the bytes reach the storage (O_DIRECT staging for a local
 * directory) is the store's business (local.ts).
 */
import { PACK_HEADER_SIZE, PACK_MAGIC, newPackId, packObject } from '../format/pack.js';
import { packKey, packSizeValue } from '../format/keys.js';
import type { Appender, Store } from './store.js';

/**
 * Appends records to one pack. Not durable until sync(); callers commit index entries
 * pointing into the pack only after sync() has returned.
 */
export class PackWriter {
  private constructor(
    readonly packId: string,
    readonly out: Appender,
  ) {}

  static async create(store: Store): Promise<PackWriter> {
    const packId = newPackId();
    const out = await store.create(packObject(packId));
    const header = Buffer.alloc(PACK_HEADER_SIZE);
    PACK_MAGIC.copy(header, 0);
    header.write(packId, 8, 16, 'hex');
    const w = new PackWriter(packId, out);
    await w.append(header);
    return w;
  }

  /** The pack's object name in the store. */
  get name(): string {
    return this.out.name;
  }

  get size(): number {
    return this.out.size;
  }

  /** The index entry that commits the pack up to what was appended (call after sync()). */
  commitOp(): { type: 'put'; key: Buffer; value: Buffer } {
    return { type: 'put', key: packKey(this.packId), value: packSizeValue(this.size) };
  }

  /** Append pre-encoded records (headers included); returns the offset they start at. */
  async append(records: Buffer): Promise<number> {
    const at = this.out.size;
    await this.out.append(records);
    return at;
  }

  async sync(): Promise<void> {
    await this.out.sync();
  }

  /** Drop everything appended after `size` (gc gives up on a pack it was copying). */
  async rewind(size: number): Promise<void> {
    await this.out.truncate(size);
  }

  /** Close; what is pending is written first (not synced: sync() before committing). */
  async close(): Promise<void> {
    await this.out.close();
  }
}

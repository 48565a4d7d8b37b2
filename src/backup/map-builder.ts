/**
 * The new generation's chunk map as the run goes: every chunk, in image order, into map
 * leaves; finished leaves wait in `pending` until the next flush commits them (packs.ts),
 * and their refs make the top of the map (commit.ts).
 */
import { LeafBuilder, type LeafRef } from '../format/chunkmap.js';
import type { RepoConfig } from '../format/config.js';
import { leafKey } from '../format/keys.js';

export type LeafEntry = { key: Buffer; value: Buffer };

export class MapBuilder {
  /** The finished leaves, in order: the top of the map. */
  readonly refs: LeafRef[] = [];
  private readonly leaves: LeafBuilder;
  private pending: LeafEntry[] = [];

  constructor(cfg: RepoConfig) {
    this.leaves = new LeafBuilder(cfg.leaf.minChunks, cfg.leaf.maxChunks);
  }

  /**
   * A segment's chunks: `table` as the worker returned it (start, length, zero per chunk),
   * each chunk's digest (null for a zero chunk) and BLAKE3 (when known: all chunks, or
   * those `hasFast` marks).
   */
  addSegment(table: Int32Array, entryDigest: Array<Buffer | null>, fast: Uint8Array | null | undefined, hasFast?: Uint8Array): void {
    const n = table.length / 3;
    for (let i = 0; i < n; i++) {
      const length = table[i * 3 + 1]!;
      const f = fast && entryDigest[i] && (!hasFast || hasFast[i]) ? Buffer.from(fast.buffer, fast.byteOffset + i * 32, 32) : null;
      const done = this.leaves.add({ length, zero: entryDigest[i] === null, digest: entryDigest[i] ?? null, fast: f });
      if (done) {
        this.refs.push(done.ref);
        this.pending.push({ key: leafKey(done.ref.digest), value: done.encoded });
      }
    }
  }

  /** The last leaf, after the last segment. */
  finish(): void {
    const last = this.leaves.finish();
    if (last) {
      this.refs.push(last.ref);
      this.pending.push({ key: leafKey(last.ref.digest), value: last.encoded });
    }
  }

  /** The leaves finished since the last call, for the index batch being written now. */
  takePending(): LeafEntry[] {
    const leaves = this.pending;
    this.pending = [];
    return leaves;
  }
}

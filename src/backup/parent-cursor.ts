/**
 * The parent generation's chunk map walked in offset order: positional dedup (dedup.ts,
 * and the reader of a chunked source) and the parent windows the workers' BLAKE3 change
 * detector compares against (reader.ts). Each user has its own cursor: cursors only move
 * forward.
 */
import type { ChunkMap, Leaf } from '../format/chunkmap.js';
import type { ParentWindow } from '../work/protocol.js';

/** Walks the parent generation's chunks in offset order, for positional dedup. */
export class ParentCursor {
  private li = 0;
  private ci = 0;
  private leaf: Leaf | null = null;
  private base = 0;
  constructor(private map: ChunkMap | null) {}

  /** The leaf the cursor is in (loaded on first use), or null past the parent's end. */
  private async currentLeaf(m: ChunkMap): Promise<Leaf | null> {
    if (!this.leaf) {
      if (this.li >= m.refs.length) return null;
      this.leaf = await m.leaf(this.li);
      this.base = m.leafStarts[this.li]!;
      this.ci = 0;
    }
    return this.leaf;
  }

  private nextLeaf(): void {
    this.leaf = null;
    this.li++;
  }

  /** True when the parent has a chunk at exactly `offset` with this length and digest. */
  async has(offset: number, length: number, digest: Uint8Array): Promise<boolean> {
    const m = this.map;
    if (!m || offset >= m.size) return false;
    for (;;) {
      const l = await this.currentLeaf(m);
      if (!l) return false;
      while (this.ci < l.lengths.length && this.base + l.starts[this.ci]! + l.lengths[this.ci]! <= offset) this.ci++;
      if (this.ci < l.lengths.length) break;
      this.nextLeaf();
    }
    const l = this.leaf!;
    if (this.base + l.starts[this.ci]! !== offset || l.lengths[this.ci] !== length || l.zero[this.ci]) return false;
    const d = l.digests;
    const at = this.ci * 32;
    for (let i = 0; i < 32; i++) if (d[at + i] !== digest[i]) return false;
    return true;
  }

  /**
   * The parent's chunks that lie wholly inside [start, end) and carry a BLAKE3 digest,
   * for the worker's change detector (offsets relative to start). Windows must be asked
   * for in increasing, non-overlapping order; a chunk crossing `end` can match nothing in
   * this window or the next, and is passed over.
   */
  async window(start: number, end: number): Promise<ParentWindow | undefined> {
    const m = this.map;
    if (!m) return undefined;
    const starts: number[] = [];
    const lengths: number[] = [];
    const picks: Array<[Leaf, number]> = [];
    scan: for (;;) {
      const l = await this.currentLeaf(m);
      if (!l) break;
      for (; this.ci < l.lengths.length; this.ci++) {
        const off = this.base + l.starts[this.ci]!;
        if (off >= end) break scan;
        if (off >= start && off + l.lengths[this.ci]! <= end && l.hasFast[this.ci]) {
          starts.push(off - start);
          lengths.push(l.lengths[this.ci]!);
          picks.push([l, this.ci]);
        }
      }
      this.nextLeaf();
    }
    if (!picks.length) return undefined;
    const fast = new Uint8Array(picks.length * 32);
    const sha = new Uint8Array(picks.length * 32);
    picks.forEach(([l, ci], k) => {
      fast.set(l.fast.subarray(ci * 32, ci * 32 + 32), k * 32);
      sha.set(l.digests.subarray(ci * 32, ci * 32 + 32), k * 32);
    });
    return { starts: Int32Array.from(starts), lengths: Int32Array.from(lengths), fast, sha };
  }
}

/**
 * Dedup: which of a segment's chunks are new. Asked in order: the previous generation of
 * the image at the same offset (a next-day backup resolves nearly every chunk there
 * without touching the index), the chunks this run already wrote, then the index, once
 * per segment. A chunk condemned by a running gc or marked damaged counts as absent:
 * storing a fresh copy (which replaces its index entry) is what keeps this generation
 * whole, and heals the others.
 */
import { ParentCursor } from './parent-cursor.js';
import type { ChunkResult, Segment } from './reader.js';
import type { BackupRun } from './run.js';

/** A segment's chunks after dedup. */
export interface Lookup {
  /** Per chunk: its digest (a view into the worker's digests), null for a zero chunk. */
  entryDigest: Array<Buffer | null>;
  /** The chunks to store, as indexes into the segment's chunk table. */
  newIdx: number[];
}

export class Dedup {
  /** The parent, at the main loop's position. */
  private readonly parent: ParentCursor;

  constructor(
    private readonly run: BackupRun,
    /** Whether this run already wrote (or is writing) the chunk with this digest. */
    private readonly ours: (ds: string) => boolean,
    /** Digests a chunked source was asked for, whose segment the main loop has not reached. */
    private readonly requested: Set<string>,
  ) {
    this.parent = new ParentCursor(run.parentMap);
  }

  /** The new chunks of the segment at `segOffset`, whose chunking `chunks` is. */
  async lookup(seg: Segment, chunks: ChunkResult, segOffset: number): Promise<Lookup> {
    const n = chunks.table.length / 3;
    const entryDigest: Array<Buffer | null> = new Array(n);
    const newIdx: number[] = [];
    if (seg.sent) {
      this.requestedChunks(chunks, seg.sent, entryDigest, newIdx);
      return { entryDigest, newIdx };
    }
    const unknown = await this.notInParent(chunks, segOffset, entryDigest);
    // Ask the index about the rest in one round trip.
    if (unknown.length) await this.notInIndex(unknown, entryDigest, newIdx);
    return { entryDigest, newIdx };
  }

  /** Chunked source: the reader already decided; the requested chunks are the new ones. */
  private requestedChunks(chunks: ChunkResult, sent: Uint8Array, entryDigest: Array<Buffer | null>, newIdx: number[]): void {
    const { table, digests } = chunks;
    const { stats, damaged, healed } = this.run;
    const n = table.length / 3;
    for (let i = 0; i < n; i++) {
      stats.chunks++;
      if (table[i * 3 + 2]) {
        stats.zeroBytes += table[i * 3 + 1]!;
        entryDigest[i] = null;
        continue;
      }
      const d = Buffer.from(digests.buffer, digests.byteOffset + i * 32, 32);
      entryDigest[i] = d;
      if (!sent[i]) continue;
      const ds = d.toString('binary');
      this.requested.delete(ds);
      if (this.run.isDamaged(ds)) {
        damaged.delete(ds);
        healed.push(ds);
      }
      newIdx.push(i);
    }
  }

  /**
   * Local sources: fills in every chunk's digest and returns the data chunks that are
   * neither this run's nor at the same offset in the parent (the ones to ask the index about).
   */
  private async notInParent(chunks: ChunkResult, segOffset: number, entryDigest: Array<Buffer | null>): Promise<number[]> {
    const { table, digests } = chunks;
    const { stats } = this.run;
    const n = table.length / 3;
    const unknown: number[] = [];
    for (let i = 0; i < n; i++) {
      const start = table[i * 3]!;
      const length = table[i * 3 + 1]!;
      stats.chunks++;
      if (table[i * 3 + 2]) {
        stats.zeroBytes += length;
        entryDigest[i] = null;
        continue;
      }
      const d = Buffer.from(digests.buffer, digests.byteOffset + i * 32, 32);
      entryDigest[i] = d;
      const ds = d.toString('binary');
      if (this.ours(ds)) continue;
      if (!this.run.isDamaged(ds) && (await this.parent.has(segOffset + start, length, d))) continue;
      unknown.push(i);
    }
    return unknown;
  }

  /** Of the `unknown` chunks, the ones the index lacks go to newIdx, each digest once. */
  private async notInIndex(unknown: number[], entryDigest: Array<Buffer | null>, newIdx: number[]): Promise<void> {
    const { damaged, healed } = this.run;
    const missing = await this.run.lacking(unknown.map((i) => entryDigest[i]!));
    const seen = new Set<string>();
    unknown.forEach((i, k) => {
      if (!missing[k]) return;
      const ds = entryDigest[i]!.toString('binary');
      if (this.run.isDamaged(ds)) {
        damaged.delete(ds); // one fresh copy is enough
        healed.push(ds);
      }
      if (seen.has(ds) || this.ours(ds)) return;
      seen.add(ds);
      newIdx.push(i);
    });
  }
}

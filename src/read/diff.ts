/**
 * Which byte ranges differ between two generations, from their chunk maps alone (no
 * payload is read). Two stretches are the same when both are zero, or when both are the
 * same chunk (same offset, length and digest); a map leaf shared at the same offset is
 * skipped whole without loading it. Chunks cut at different boundaries are reported as
 * changed: without reading them their bytes cannot be compared, and content-defined
 * chunking realigns within a chunk or two of a change.
 */
import { ChunkMap, Leaf } from '../format/chunkmap.js';
import type { Generation } from '../format/generation.js';
import type { Repository } from '../repository/repository.js';

export interface ByteRange {
  offset: number;
  length: number;
}

export interface GenerationDiff {
  /** Bytes compared: the larger of the two sizes (a size change counts as changed bytes). */
  size: number;
  changedBytes: number;
  ranges: ByteRange[];
  /** Map leaves both generations share at the same offset, skipped unread. */
  sharedLeaves: number;
}

/** A position in a map, chunk by chunk, loading a leaf only when its chunks are needed. */
class Cursor {
  li = 0;
  ci = 0;
  leaf: Leaf | null = null;

  constructor(readonly map: ChunkMap) {}

  get done(): boolean {
    return this.li >= this.map.refs.length;
  }

  get atLeafStart(): boolean {
    return this.ci === 0;
  }

  get leafStart(): number {
    return this.map.leafStarts[this.li]!;
  }

  skipLeaf(): void {
    this.li++;
    this.ci = 0;
    this.leaf = null;
  }

  async chunk(): Promise<{ start: number; end: number; zero: boolean; digest: Buffer }> {
    this.leaf ??= await this.map.leaf(this.li);
    const start = this.leafStart + this.leaf.starts[this.ci]!;
    const i = this.ci;
    return { start, end: start + this.leaf.lengths[i]!, zero: this.leaf.zero[i] === 1, digest: this.leaf.digests.subarray(i * 32, i * 32 + 32) };
  }

  next(): void {
    if (++this.ci >= this.leaf!.lengths.length) this.skipLeaf();
  }
}

export async function diffGenerations(repo: Repository, a: Generation, b: Generation): Promise<GenerationDiff> {
  const ca = new Cursor(await repo.chunkMap(a));
  const cb = new Cursor(await repo.chunkMap(b));
  const ranges: ByteRange[] = [];
  const add = (start: number, end: number) => {
    if (end <= start) return;
    const last = ranges.at(-1);
    if (last && last.offset + last.length === start) last.length += end - start;
    else ranges.push({ offset: start, length: end - start });
  };
  let sharedLeaves = 0;
  while (!ca.done && !cb.done) {
    if (ca.atLeafStart && cb.atLeafStart && ca.leafStart === cb.leafStart && ca.map.refs[ca.li]!.digest.equals(cb.map.refs[cb.li]!.digest)) {
      ca.skipLeaf();
      cb.skipLeaf();
      sharedLeaves++;
      continue;
    }
    const x = await ca.chunk();
    const y = await cb.chunk();
    const start = Math.max(x.start, y.start);
    const end = Math.min(x.end, y.end);
    const same = (x.zero && y.zero) || (x.start === y.start && x.end === y.end && x.digest.equals(y.digest));
    if (!same) add(start, end);
    if (x.end === end) ca.next();
    if (y.end === end) cb.next();
  }
  add(Math.min(a.size, b.size), Math.max(a.size, b.size));
  return { size: Math.max(a.size, b.size), changedBytes: ranges.reduce((s, r) => s + r.length, 0), ranges, sharedLeaves };
}

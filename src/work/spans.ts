/**
 * Pack bytes handed to a worker with its request, for stores whose reads are not local
 * system calls (an object store: store.ts, openSyncReader is null). The main thread reads
 * the spans the request's records lie in (aligned blocks by ranged GETs, cached: SpanFetcher)
 * before the request goes to a worker, and the worker reads from them as it would from the pack (SpanReader);
 * the checks, decoding and hashing there are the same. A span the store could not read
 * carries the error instead, and the records in it come back damaged with that reason,
 * as a pack the local store cannot read does.
 */
import type { Store, SyncReader } from '../store/store.js';
import { RECORD_HEADER_SIZE } from '../format/pack.js';

export interface PackSpan {
  file: string;
  start: number;
  /** The bytes from `start` (shorter at the end of the object); absent with `error`. */
  data?: Uint8Array;
  error?: string;
}

/** Records closer than this are read in one span (as loadRun reads neighbours). */
const SPAN_GAP = 64 << 10;
const SPAN_MAX = 8 << 20;
/** Packs are fetched in aligned blocks of this size, each once while it is cached. */
const BLOCK = 4 << 20;
/** Blocks kept: requests of a sequential read share blocks (a group record read for two batches, a record across a block edge). */
const CACHE_BYTES = 64 << 20;

/**
 * Pack bytes for worker requests, fetched from the store in aligned blocks and kept in a
 * small LRU: neighbouring requests (read-ahead batches, a chunk the mount asks for while its
 * batch is on the way) ask for the same records, and each block goes over the network once.
 * A block being fetched is shared by every request that needs it.
 */
export class SpanFetcher {
  private blocks = new Map<string, Promise<Uint8Array>>();
  private cached = 0;

  constructor(private readonly store: Store) {}

  /** The spans holding every record of `items` (pack object name, offset, stored length). */
  async fetch(items: Array<{ file: string; offset: number; storedLength: number }>): Promise<PackSpan[]> {
    return Promise.all(spansOf(items).map((w) => this.span(w.file, w.start, w.end)));
  }

  private async span(file: string, start: number, end: number): Promise<PackSpan> {
    try {
      const first = Math.floor(start / BLOCK);
      const last = Math.floor((end - 1) / BLOCK);
      const parts = await Promise.all(Array.from({ length: last - first + 1 }, (_, i) => this.block(file, first + i)));
      // Its own ArrayBuffer, to be transferred (the blocks stay cached here).
      const data = new Uint8Array(end - start);
      let got = 0;
      for (let i = 0; i < parts.length; i++) {
        const from = i === 0 ? start - first * BLOCK : 0;
        const piece = parts[i]!.subarray(from, Math.min(parts[i]!.length, from + (end - start - got)));
        data.set(piece, got);
        got += piece.length;
        if (parts[i]!.length < BLOCK) break; // the end of the object
      }
      return { file, start, data: data.subarray(0, got) };
    } catch (e) {
      return { file, start, error: (e as Error).message };
    }
  }

  private block(file: string, n: number): Promise<Uint8Array> {
    const key = `${file}\0${n}`;
    const hit = this.blocks.get(key);
    if (hit) {
      this.blocks.delete(key); // most recent last
      this.blocks.set(key, hit);
      return hit;
    }
    const buf = new Uint8Array(BLOCK);
    const p = this.store.read(file, buf, 0, BLOCK, n * BLOCK).then((got) => buf.subarray(0, got));
    this.blocks.set(key, p);
    this.cached += BLOCK;
    p.catch(() => {
      if (this.blocks.get(key) === p) {
        this.blocks.delete(key);
        this.cached -= BLOCK;
      }
    });
    while (this.cached > CACHE_BYTES) {
      const oldest = this.blocks.keys().next().value as string;
      this.blocks.delete(oldest);
      this.cached -= BLOCK;
    }
    return p;
  }
}

/** Records' byte ranges merged per pack: neighbours within SPAN_GAP, at most SPAN_MAX a span. */
function spansOf(items: Array<{ file: string; offset: number; storedLength: number }>): Array<{ file: string; start: number; end: number }> {
  const byFile = new Map<string, Array<[number, number]>>();
  for (const it of items) {
    const l = byFile.get(it.file) ?? [];
    l.push([it.offset, it.offset + RECORD_HEADER_SIZE + it.storedLength]);
    byFile.set(it.file, l);
  }
  const wanted: Array<{ file: string; start: number; end: number }> = [];
  for (const [file, ranges] of byFile) {
    ranges.sort((a, b) => a[0] - b[0]);
    let cur: { file: string; start: number; end: number } | null = null;
    for (const [s, e] of ranges) {
      if (cur && s <= cur.end + SPAN_GAP && Math.max(e, cur.end) - cur.start <= SPAN_MAX) cur.end = Math.max(cur.end, e);
      else wanted.push((cur = { file, start: s, end: e }));
    }
  }
  return wanted;
}

/** The buffers to transfer with a request carrying these spans (not copied between threads). */
export function spanTransfer(spans: PackSpan[]): ArrayBuffer[] {
  const seen = new Set<ArrayBuffer>();
  for (const s of spans) if (s.data && s.data.buffer instanceof ArrayBuffer) seen.add(s.data.buffer);
  return [...seen];
}

/** A worker's reader over the spans its request carries (SyncReader, as the store's would be). */
export class SpanReader implements SyncReader {
  constructor(private readonly spans: PackSpan[]) {}

  private find(name: string, position: number): PackSpan | null {
    for (const s of this.spans) if (s.file === name && position >= s.start && position < s.start + (s.data?.length ?? 1)) return s;
    return null;
  }

  read(name: string, buf: Uint8Array, bufOffset: number, length: number, position: number): number {
    const s = this.find(name, position);
    if (!s) throw new Error(`${name}: bytes at ${position} were not read for this request`);
    if (s.error !== undefined) throw new Error(s.error);
    const from = position - s.start;
    const n = Math.min(length, s.data!.length - from);
    buf.set(s.data!.subarray(from, from + n), bufOffset);
    return n;
  }

  readDirect(name: string, start: number, end: number): { span: Buffer; got: number } | null {
    const s = this.find(name, start);
    if (!s?.data) return null;
    const from = start - s.start;
    const got = Math.min(end - start, s.data.length - from);
    return { span: Buffer.from(s.data.buffer, s.data.byteOffset + from, got), got };
  }

  close(): void {}
}

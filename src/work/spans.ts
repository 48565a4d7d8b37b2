/**
 * Pack bytes handed to a worker with its request, for stores whose reads are not local
 * system calls (an object store: store.ts, openSyncReader is null). The main thread reads
 * the spans the request's records lie in (ranged GETs, several at once) before the request
 * goes to a worker, and the worker reads from them as it would from the pack (SpanReader);
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
/** Ranged reads in flight at once for one request. */
const PARALLEL = 8;

/** The spans holding every record of `items` (pack object name, offset, stored length), read from `store`. */
export async function fetchSpans(store: Store, items: Array<{ file: string; offset: number; storedLength: number }>): Promise<PackSpan[]> {
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
  const out: PackSpan[] = new Array(wanted.length);
  let next = 0;
  const worker = async () => {
    while (next < wanted.length) {
      const i = next++;
      const w = wanted[i]!;
      // Its own ArrayBuffer, to be transferred (Buffer's shared pool cannot be).
      const buf = new Uint8Array(w.end - w.start);
      out[i] = await store.read(w.file, buf, 0, buf.length, w.start).then(
        (got) => ({ file: w.file, start: w.start, data: buf.subarray(0, got) }),
        (e: Error) => ({ file: w.file, start: w.start, error: e.message }),
      );
    }
  };
  await Promise.all(Array.from({ length: Math.min(PARALLEL, wanted.length) }, worker));
  return out;
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

/**
 * Change detection for remote backups: a writer gets the parent generation's chunks (the
 * latest generation of the image it backs up, in its own namespace) segment by segment,
 * with each chunk's BLAKE3 and identity, as a local backup's workers get them
 * (ParentWindow, src/backup/parent-cursor.ts). Its workers then hash each chunk with
 * BLAKE3 and take the parent's identity where offset, length and BLAKE3 match, so that a
 * next-day backup computes the slower keyed identity only for what changed; the server
 * then resolves those chunks against the same parent without an index lookup.
 *
 * CALL {op: 'parent-windows', name, from, count} answers the windows of segments
 * [from, from + count) of NAME's latest generation: {windows: [w | null, ...]} with each
 * w = {starts, lengths, fast, sha} (base64 of little-endian int32 arrays and of 32-byte
 * digests), or {windows: null} when there is no parent with BLAKE3 digests. Segments are
 * asked for in increasing order (the server walks the map once).
 *
 * What it reveals: hashes of the client's own namespace's latest backup of that image,
 * which the client read to make it. A lying server can only make the backup wrong, which
 * a server can always do.
 */
import type { ChunkingParams } from '../format/config.js';
import type { Generation } from '../format/generation.js';
import type { ChunkMap } from '../format/chunkmap.js';
import { ParentCursor } from '../backup/parent-cursor.js';
import type { ParentWindow } from '../work/protocol.js';
import { ProtocolError } from './frames.js';

/** Segments a client asks for at once (about 140 chunks and 10 KiB of JSON each). */
export const WINDOW_BATCH = 16;

export interface EncodedWindow {
  starts: string;
  lengths: string;
  fast: string;
  sha: string;
}

const b64 = (a: Uint8Array | Int32Array) => Buffer.from(a.buffer, a.byteOffset, a.byteLength).toString('base64');

export function encodeWindow(w: ParentWindow): EncodedWindow {
  return { starts: b64(w.starts), lengths: b64(w.lengths), fast: b64(w.fast), sha: b64(w.sha) };
}

function int32s(s: unknown): Int32Array {
  if (typeof s !== 'string') throw new ProtocolError('parent-windows: malformed window');
  const b = Buffer.from(s, 'base64');
  if (b.length % 4) throw new ProtocolError('parent-windows: malformed window');
  const out = new Int32Array(b.length / 4);
  for (let i = 0; i < out.length; i++) out[i] = b.readInt32LE(i * 4);
  return out;
}

/** A window from the server, checked: consistent lengths, chunks inside the segment, in order. */
export function decodeWindow(v: unknown, chunking: ChunkingParams): ParentWindow | undefined {
  if (v === null) return undefined;
  if (typeof v !== 'object' || v === undefined) throw new ProtocolError('parent-windows: malformed window');
  const o = v as Record<string, unknown>;
  const starts = int32s(o.starts);
  const lengths = int32s(o.lengths);
  const fast = typeof o.fast === 'string' ? Buffer.from(o.fast, 'base64') : null;
  const sha = typeof o.sha === 'string' ? Buffer.from(o.sha, 'base64') : null;
  const n = starts.length;
  if (!fast || !sha || lengths.length !== n || fast.length !== n * 32 || sha.length !== n * 32) throw new ProtocolError('parent-windows: malformed window');
  let end = 0;
  for (let i = 0; i < n; i++) {
    if (starts[i]! < end || lengths[i]! < 1 || lengths[i]! > chunking.max || starts[i]! + lengths[i]! > chunking.segment) throw new ProtocolError('parent-windows: malformed window');
    end = starts[i]! + lengths[i]!;
  }
  return { starts, lengths, fast: new Uint8Array(fast), sha: new Uint8Array(sha) };
}

/** The server's side: one cursor over the parent of the image last asked about. */
export class ParentWindows {
  private cur: { name: string; next: number; cursor: ParentCursor } | null = null;
  /** Calls run one after the other, in the order they came (a client asks one batch ahead). */
  private chain: Promise<unknown> = Promise.resolve();

  constructor(
    private readonly segment: number,
    /** The image's latest generation and its map, when it keeps BLAKE3 digests (format 2 and later). */
    private readonly parentOf: (name: string) => Promise<{ gen: Generation; map: ChunkMap } | null>,
  ) {}

  windows(name: string, from: number, count: number): Promise<{ windows: Array<EncodedWindow | null> | null }> {
    if (count > WINDOW_BATCH * 4) throw new ProtocolError(`parent-windows: ${count} segments at once`);
    const p = this.chain.then(() => this.walk(name, from, count));
    this.chain = p.catch(() => undefined);
    return p;
  }

  /** The cursor only moves forward: a call for earlier segments, or another image, starts a new one. */
  private async walk(name: string, from: number, count: number): Promise<{ windows: Array<EncodedWindow | null> | null }> {
    if (!this.cur || this.cur.name !== name || from < this.cur.next) {
      const p = await this.parentOf(name);
      if (!p) return { windows: null };
      this.cur = { name, next: 0, cursor: new ParentCursor(p.map) };
    }
    const out: Array<EncodedWindow | null> = [];
    for (let k = from; k < from + count; k++) {
      const w = await this.cur.cursor.window(k * this.segment, (k + 1) * this.segment);
      out.push(w ? encodeWindow(w) : null);
    }
    this.cur.next = from + count;
    return { windows: out };
  }
}

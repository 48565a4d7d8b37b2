/**
 * The client side of a remote backup: the source is read and chunked here with the
 * repository's chunking (and, encrypted, its chunker seed and identity key), each segment
 * described to the server, and only the chunks it asks for sent. Up to WINDOW segments
 * are described ahead of the answers, so the round trip of each is hidden behind reading
 * the next. Memory: WINDOW + 1 segment buffers.
 */
import { chunkSegment, UNSEEDED } from '../format/chunker.js';
import type { Generation } from '../format/generation.js';
import type { Source } from '../backup/source.js';
import { GenvaultError } from '../util/errors.js';
import { zstd } from '../work/zstd.js';
import { CODING_RAW, CODING_ZSTD, T, WINDOW, WIRE_ZSTD_LEVEL, encodeSegment, json, type Described } from './protocol.js';
import type { RemoteRepository } from './client.js';

export interface RemoteBackupOptions {
  name: string;
  tags?: string[];
  wait?: boolean;
  onProgress?: (done: number, total: number | null) => void;
  /** zstd on the wire (default on): about a third of the bytes for typical disk images. */
  wireCompression?: boolean;
}

export interface RemoteBackupResult {
  generation: Generation;
  /** Chunk bytes sent, and all bytes sent over the connection. */
  sentChunkBytes: number;
  sentBytes: number;
}

interface Pending {
  seq: number;
  buf: Buffer;
  chunks: Array<Described & { start: number }>;
  need: Promise<import('./frames.js').Frame>;
}

async function fill(source: Source, buf: Buffer): Promise<number> {
  let got = 0;
  while (got < buf.length) {
    const n = await source.read(got ? buf.subarray(got) : buf, buf.length - got);
    if (n === 0) break;
    got += n;
  }
  return got;
}

let cctx: InstanceType<typeof zstd.CCtx> | null = null;

/** A CHUNKS payload: the chunks zstd-compressed when that is smaller, else as they are. */
function encodeChunks(parts: Buffer[], compress: boolean): Buffer {
  const raw = Buffer.concat(parts);
  if (compress && raw.length >= 4096) {
    cctx ??= new zstd.CCtx();
    const out = Buffer.allocUnsafe(1 + zstd.compressBound(raw.length));
    const n = cctx.compress(out.subarray(1), raw, WIRE_ZSTD_LEVEL);
    if (n < raw.length) {
      out[0] = CODING_ZSTD;
      return out.subarray(0, 1 + n);
    }
  }
  const out = Buffer.allocUnsafe(1 + raw.length);
  out[0] = CODING_RAW;
  raw.copy(out, 1);
  return out;
}

export async function backupToRemote(remote: RemoteRepository, source: Source, opts: RemoteBackupOptions): Promise<RemoteBackupResult> {
  const w = remote.welcome;
  const chunking = w.chunking;
  const seed = w.identity?.seed ?? UNSEEDED;
  const identify = remote.identify();
  const sentBefore = remote.traffic.sent;
  const call = await remote.startCall('backup', { name: opts.name, size: source.size, source: source.description, tags: opts.tags ?? [], wait: opts.wait === true });
  let sentChunkBytes = 0;
  let bytes = 0;
  let seq = 0;
  let ended = false;
  const free: Buffer[] = [];
  let sending: Promise<void> = Promise.resolve();
  const pending: Pending[] = [];
  // The server may refuse the backup at any moment (its answer then comes early).
  let early: Error | null = null;
  call.result.then(() => (early ??= new GenvaultError(`${remote.dir}: the server ended the backup early`, 'PROTOCOL')), (e: Error) => (early ??= e));

  const describe = async (): Promise<boolean> => {
    const buf = free.pop() ?? Buffer.allocUnsafe(chunking.segment);
    const len = await fill(source, buf);
    if (len === 0) {
      free.push(buf);
      return false;
    }
    const spans = chunkSegment(buf, len, chunking, seed);
    const chunks = spans.map((s) => ({ start: s.start, length: s.length, zero: s.zero, digest: s.zero ? null : identify(buf.subarray(s.start, s.start + s.length)) }));
    const need = remote.need(seq);
    need.catch(() => undefined);
    await remote.sendFrame(T.SEGMENT, seq, encodeSegment(chunks));
    pending.push({ seq, buf, chunks, need });
    seq++;
    bytes += len;
    opts.onProgress?.(bytes, source.size);
    return len === buf.length;
  };

  try {
    for (;;) {
      while (!ended && pending.length < WINDOW) {
        if (early) throw early;
        if (!(await describe())) ended = true;
      }
      const p = pending.shift();
      if (!p) break;
      const need = (await Promise.race([p.need, call.result.then(() => { throw early; })])).payload;
      if (need.length !== p.chunks.length) throw new GenvaultError(`${remote.dir}: malformed answer to segment ${p.seq}`, 'PROTOCOL');
      const parts: Buffer[] = [];
      p.chunks.forEach((c, i) => {
        if (!need[i]) return;
        if (c.zero || need[i] !== 1) throw new GenvaultError(`${remote.dir}: malformed answer to segment ${p.seq}`, 'PROTOCOL');
        parts.push(p.buf.subarray(c.start, c.start + c.length));
      });
      const data = encodeChunks(parts, opts.wireCompression !== false);
      sentChunkBytes += data.length - 1;
      // One CHUNKS frame on its way while the next segments are read and chunked: waiting
      // for each to drain before that work left the connection idle half the time.
      await sending;
      sending = remote.sendFrame(T.CHUNKS, p.seq, data);
      sending.catch(() => undefined);
      free.push(p.buf);
    }
    await sending;
    if (source.size !== null && bytes !== source.size) throw new GenvaultError(`source ended after ${bytes} of ${source.size} bytes`, 'SHORT_READ');
    await remote.sendFrame(T.END, call.id, json({ bytes }));
    const res = await call.result;
    return { generation: res.generation as Generation, sentChunkBytes, sentBytes: remote.traffic.sent - sentBefore };
  } catch (e) {
    // The server's own reason, when it gave one, is the better line (it may be a moment behind).
    await Promise.race([call.result.catch(() => undefined), new Promise((r) => setTimeout(r, 200))]);
    const why = early as Error | null;
    throw why && !(why instanceof GenvaultError && why.message.endsWith('ended the backup early')) ? why : e;
  }
}

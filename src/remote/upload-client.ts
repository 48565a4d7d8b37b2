/**
 * The client side of a remote backup: the source is read here and chunked on worker
 * threads with the repository's chunking (and, encrypted, its chunker seed and identity
 * key), each segment described to the server, and only the chunks it asks for sent.
 * Where the server offers it, those chunks go as pack records compressed as the
 * repository compresses (CHUNKS coding 2): the server checks and seals them and does not
 * compress again, so the work of a backup is split between the two hosts instead of done
 * twice (native-notes/remote.md, "Records from the client").
 *
 * Three chains run beside each other, each in segment order: reading (this loop), SEGMENT
 * frames (once a segment is chunked), and CHUNKS frames (once its NEED came and its
 * records are built). Up to WINDOW segments are described ahead of the answers, so the
 * round trip of each is hidden. Memory: WINDOW + 2 segment buffers.
 */
import type { ChunkingParams } from '../format/config.js';
import type { Generation } from '../format/generation.js';
import type { Source } from '../backup/source.js';
import { BufferPool, recordsRoom } from '../backup/buffer-pool.js';
import { chunksRead, zeroChunks } from '../backup/reader.js';
import { GenvaultError } from '../util/errors.js';
import { WorkerPool } from '../work/pool.js';
import type { ChunkTable, ParentWindow } from '../work/protocol.js';
import { WINDOW_BATCH, decodeWindow } from './parent-windows.js';
import { zstd } from '../work/zstd.js';
import { CODING_RAW, CODING_RECORDS, CODING_ZSTD, T, WINDOW, WIRE_ZSTD_LEVEL, encodeSegment, json, type Described } from './protocol.js';
import type { RemoteRepository } from './client.js';
import type { Frame } from './frames.js';

export interface RemoteBackupOptions {
  name: string;
  tags?: string[];
  wait?: boolean;
  onProgress?: (done: number, total: number | null) => void;
  /** Compressed chunks on the wire (default on): about a third of the bytes for typical disk images. */
  wireCompression?: boolean;
}

export interface RemoteBackupResult {
  generation: Generation;
  /** Chunk bytes sent, and all bytes sent over the connection. */
  sentChunkBytes: number;
  sentBytes: number;
  /** Bytes whose identity was taken from the parent after a BLAKE3 match (parent-windows.ts). */
  unchangedBytes: number;
}

type Chunks = Array<Described & { start: number }>;
/** A segment's chunk table as a worker (or a hole) gives it. */
type SegmentChunks = Pick<ChunkTable, 'table' | 'digests'> & { unchanged?: number };

/** A CHUNKS payload: `head`, then `body` (records in `out`, a pooled buffer) when there is one. */
interface Payload {
  head: Buffer;
  body: Buffer | null;
  out: SharedArrayBuffer | null;
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

/**
 * CHUNKS for a server that takes no records: the chunks zstd-compressed (fastest level)
 * when that is smaller, else as they are.
 */
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

/** A worker's chunk table as the segment's description. */
function described(t: SegmentChunks): Chunks {
  const n = t.table.length / 3;
  const chunks: Chunks = new Array(n);
  for (let i = 0; i < n; i++) {
    const zero = t.table[i * 3 + 2] === 1;
    chunks[i] = { start: t.table[i * 3]!, length: t.table[i * 3 + 1]!, zero, digest: zero ? null : Buffer.from(t.digests.buffer, t.digests.byteOffset + i * 32, 32) };
  }
  return chunks;
}

/** The indexes of the chunks a NEED frame asks for, checked against the segment. */
function asked(need: Buffer, chunks: Chunks, what: string): number[] {
  if (need.length !== chunks.length) throw new GenvaultError(`${what}: malformed answer`, 'PROTOCOL');
  const out: number[] = [];
  chunks.forEach((c, i) => {
    if (!need[i]) return;
    if (c.zero || need[i] !== 1) throw new GenvaultError(`${what}: malformed answer`, 'PROTOCOL');
    out.push(i);
  });
  return out;
}

export async function backupToRemote(remote: RemoteRepository, source: Source, opts: RemoteBackupOptions): Promise<RemoteBackupResult> {
  const up = new Upload(remote, source, opts);
  try {
    return await up.run();
  } finally {
    await up.close();
  }
}

/** One remote backup: the three chains of the header comment, and their first failure. */
class Upload {
  private readonly chunking: ChunkingParams;
  private readonly compress: boolean;
  private readonly records: { level: number; group: number } | null;
  private readonly pool: WorkerPool;
  private readonly bufs: BufferPool;
  /**
   * Records: reused buffers (fresh pages are expensive here), fewer than segments: a
   * segment takes one only once its NEED came.
   */
  private readonly outs: BufferPool;
  private sentChunkBytes = 0;
  private unchangedBytes = 0;
  private bytes = 0;
  /** The first failure of any chain, or the server's answer when it ends the backup early. */
  private failure: Error | null = null;
  private onFailure: (e: Error) => void = () => undefined;
  private readonly failed = new Promise<never>((_, reject) => (this.onFailure = reject));
  /** The chains' last links: SEGMENT frames, CHUNKS frames, output buffers taken. */
  private segments: Promise<unknown> = Promise.resolve();
  private chunksSent: Promise<unknown> = Promise.resolve();
  private outTaken: Promise<unknown> = Promise.resolve();

  constructor(
    private readonly remote: RemoteRepository,
    private readonly source: Source,
    private readonly opts: RemoteBackupOptions,
  ) {
    this.chunking = remote.welcome.chunking;
    this.compress = opts.wireCompression !== false;
    this.records = this.compress ? remote.welcome.records : null;
    this.pool = new WorkerPool(undefined, 5, 1, undefined, remote.writerKeys());
    this.bufs = new BufferPool(WINDOW + 2, this.chunking.segment);
    this.outs = new BufferPool(this.records ? 3 : 0, recordsRoom(this.chunking));
    this.failed.catch(() => undefined);
  }

  private fail(e: Error): void {
    this.failure ??= e;
    this.onFailure(this.failure);
  }

  /** Parent windows by batch (parent-windows.ts); null: no change detection. */
  private windows: Map<number, Promise<Array<ParentWindow | undefined> | null>> | null = null;

  /**
   * The parent's window of segment `seq`, fetched WINDOW_BATCH segments at a time and one
   * batch ahead. Any failure (an older server, a parent pruned meanwhile) turns change
   * detection off: every chunk is then identified by its bytes, as without it.
   */
  private async parentWindow(seq: number): Promise<ParentWindow | undefined> {
    if (!this.windows) return undefined;
    const batch = Math.floor(seq / WINDOW_BATCH);
    for (const b of [batch, batch + 1]) {
      if (this.windows.has(b)) continue;
      const p = this.remote
        .call<{ windows: unknown[] | null }>('parent-windows', { name: this.opts.name, from: b * WINDOW_BATCH, count: WINDOW_BATCH })
        .then((r) => r.windows?.map((w) => decodeWindow(w, this.chunking)) ?? null);
      this.windows.set(b, p.catch(() => null));
    }
    this.windows.delete(batch - 1);
    const ws = await this.windows.get(batch)!;
    if (!ws) {
      this.windows = null;
      return undefined;
    }
    return ws[seq % WINDOW_BATCH];
  }

  async run(): Promise<RemoteBackupResult> {
    const { remote, source, opts } = this;
    if (remote.canDetectChanges && remote.welcome.format >= 2) this.windows = new Map();
    const sentBefore = remote.traffic.sent;
    const call = await remote.startCall('backup', { name: opts.name, size: source.size, source: source.description, tags: opts.tags ?? [], wait: opts.wait === true });
    call.result.then(() => this.fail(new GenvaultError(`${remote.dir}: the server ended the backup early`, 'PROTOCOL')), (e: Error) => this.fail(e));
    try {
      for (let seq = 0; await this.next(seq); seq++);
      await Promise.race([Promise.all([this.segments, this.chunksSent]), this.failed]);
      if (source.size !== null && this.bytes !== source.size) throw new GenvaultError(`source ended after ${this.bytes} of ${source.size} bytes`, 'SHORT_READ');
      await remote.sendFrame(T.END, call.id, json({ bytes: this.bytes }));
      const res = await call.result;
      return { generation: res.generation as Generation, sentChunkBytes: this.sentChunkBytes, sentBytes: remote.traffic.sent - sentBefore, unchangedBytes: this.unchangedBytes };
    } catch (e) {
      // The server's own reason, when it gave one, is the better line (it may be a moment behind).
      await Promise.race([call.result.catch(() => undefined), new Promise((r) => setTimeout(r, 200))]);
      const why = this.failure as Error | null;
      throw why && !(why instanceof GenvaultError && why.message.endsWith('ended the backup early')) ? why : e;
    }
  }

  /** Segment `seq` read and its links added to the chains; false once the source ended. */
  private async next(seq: number): Promise<boolean> {
    const { remote, records, outs } = this;
    const buf = await Promise.race([this.bufs.acquire(), this.failed]);
    const { len, table } = await this.readSegment(buf, this.bytes, await this.parentWindow(seq));
    if (len === 0) {
      this.bufs.release(buf);
      return false;
    }
    this.bytes += len;
    this.opts.onProgress?.(this.bytes, this.source.size);
    const need = remote.need(seq);
    const chunks = table.then((t) => {
      this.unchangedBytes += t.unchanged ?? 0;
      return described(t);
    });
    this.segments = Promise.all([chunks, this.segments]).then(([c]) => remote.sendFrame(T.SEGMENT, seq, encodeSegment(c)));
    // Output buffers are taken in segment order (sends are in that order: a later segment
    // holding one while an earlier waits for it would never end).
    const outP = records ? this.outTaken.then(() => outs.acquire()) : null;
    if (outP) this.outTaken = outP;
    const payload = Promise.all([chunks, Promise.race([need, this.failed]), this.segments]).then(([c, n]) => this.payloadOf(buf, c, n, seq, outP));
    this.chunksSent = Promise.all([payload, this.chunksSent]).then(([p]) => this.send(seq, p));
    // The buffer is free once nothing reads it any more, however the chains ended.
    void Promise.allSettled([payload, this.chunksSent]).then(() => this.bufs.release(buf));
    this.segments.catch((e: Error) => this.fail(e));
    this.chunksSent.catch((e: Error) => this.fail(e));
    return len === buf.byteLength;
  }

  /**
   * The segment at `at`, chunked on a worker: a file or block device is read by that
   * worker itself (holes not at all), a stream here first.
   */
  private async readSegment(buf: SharedArrayBuffer, at: number, parent: ParentWindow | undefined): Promise<{ len: number; table: Promise<SegmentChunks> }> {
    const { source, chunking, pool } = this;
    const fast = parent !== undefined;
    if (source.directRead && source.size !== null) {
      const len = Math.min(chunking.segment, source.size - at);
      if (len <= 0) return { len: 0, table: Promise.resolve(zeroChunks(0, chunking)) };
      const read = await source.directRead(at, len);
      if (read.length < len) throw new GenvaultError(`source ended after ${at + read.length} of ${source.size} bytes`, 'SHORT_READ');
      if (read.extents?.length === 0) return { len, table: Promise.resolve(zeroChunks(len, chunking)) };
      const r = pool.run({ op: 'chunk', seg: buf, len, params: chunking, fast, parent, read: { fd: read.fd, position: at, extents: read.extents } });
      return { len, table: r.then((a) => chunksRead(a, source, read)) };
    }
    const len = await fill(source, Buffer.from(buf));
    return { len, table: pool.run({ op: 'chunk', seg: buf, len, params: chunking, fast, parent }).then((a) => chunksRead(a, source, undefined)) };
  }

  /**
   * CHUNKS of one segment: its asked-for chunks as records, built by a worker into one of
   * `outs` (given back once the connection took them), or as bytes.
   */
  private async payloadOf(buf: SharedArrayBuffer, chunks: Chunks, need: Frame, seq: number, outP: Promise<SharedArrayBuffer> | null): Promise<Payload> {
    const { records } = this;
    const idx = asked(need.payload, chunks, `${this.remote.dir}: segment ${seq}`);
    if (!records || !outP) return { head: encodeChunks(idx.map((i) => Buffer.from(buf, chunks[i]!.start, chunks[i]!.length)), this.compress), body: null, out: null };
    const spans = new Int32Array(idx.length * 2);
    const digests = new Uint8Array(idx.length * 32);
    idx.forEach((i, k) => {
      spans[k * 2] = chunks[i]!.start;
      spans[k * 2 + 1] = chunks[i]!.length;
      digests.set(chunks[i]!.digest!, k * 32);
    });
    const out = await outP;
    try {
      const res = await this.pool.run({ op: 'compress', seg: buf, spans, digests, level: records.level, group: records.group, seal: false, out });
      return { head: Buffer.of(CODING_RECORDS), body: Buffer.from(res.out.buffer, res.out.byteOffset, res.out.byteLength), out };
    } catch (e) {
      this.outs.release(out);
      throw e;
    }
  }

  private async send(seq: number, p: Payload): Promise<void> {
    try {
      this.sentChunkBytes += p.head.length - 1 + (p.body?.length ?? 0);
      if (p.body) await this.remote.sendBorrowed(T.CHUNKS, seq, p.head, p.body);
      else await this.remote.sendFrame(T.CHUNKS, seq, p.head);
    } finally {
      if (p.out) this.outs.release(p.out);
    }
  }

  async close(): Promise<void> {
    await this.pool.close();
  }
}

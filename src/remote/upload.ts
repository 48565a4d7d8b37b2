/**
 * The server side of a remote backup: the client's segments as a ChunkedSource for the
 * backup pipeline (src/backup/backup.ts), which runs here, in the server, exactly as for
 * a local source. The client chunks and identifies; the pipeline says which chunks the
 * repository lacks; only those bytes cross, and each is checked against its identity here
 * before the pipeline sees it.
 *
 * Namespaces: the pipeline's answer covers the whole repository. A namespaced client must
 * not learn whether another namespace holds a chunk (probing by identity), so it is also
 * asked for every chunk its own namespace does not hold (`known`): those bytes are checked
 * and then dropped, the repository's copy is used. Such a client pays the transfer, never
 * the storage.
 */
import { chunkIdentity, type RepoKeys } from '../format/crypto.js';
import type { ChunkingParams } from '../format/config.js';
import type { ChunkedSegment, ChunkedSource, NeedFn, OfferedChunk, RemoteChunk } from '../backup/chunked-source.js';
import { GenvaultError } from '../util/errors.js';
import { ProtocolError, type Frame } from './frames.js';
import { zstd } from '../work/zstd.js';
import { CODING_RAW, CODING_ZSTD, T, decodeSegment, type Described } from './protocol.js';

let dctx: InstanceType<typeof zstd.DCtx> | null = null;

/**
 * A CHUNKS payload's bytes: exactly `expected` of them (what NEED asked for). A zstd frame
 * is decoded into a buffer of that size and must fill it exactly: a bomb cannot grow past it.
 */
function decodeChunks(p: Buffer, expected: number): Buffer {
  if (p.length < 1) throw new ProtocolError('backup: empty CHUNKS');
  if (p[0] === CODING_RAW) return p.subarray(1);
  if (p[0] !== CODING_ZSTD) throw new ProtocolError(`backup: CHUNKS coding ${p[0]}`);
  const out = Buffer.allocUnsafe(expected + 1);
  dctx ??= new zstd.DCtx();
  let n: number;
  try {
    n = dctx.decompress(out, p.subarray(1));
  } catch (e) {
    throw new ProtocolError(`backup: CHUNKS do not decode: ${(e as Error).message}`);
  }
  if (n !== expected) throw new ProtocolError(`backup: CHUNKS decode to ${n} bytes, ${expected} asked for`);
  return out.subarray(0, n);
}

/**
 * What the session hands over: the next SEGMENT frame of this backup (null once END came),
 * or the next CHUNKS frame. The two are queued apart: a client describes segments ahead of
 * the chunks it sends.
 */
export type NextFrame = (type: typeof T.SEGMENT | typeof T.CHUNKS) => Promise<Frame | null>;

export class UploadSource implements ChunkedSource {
  private offset = 0;
  private seq = 0;
  private ended = false;
  readonly transferred = { raw: 0, wire: 0 };

  constructor(
    readonly description: string,
    readonly size: number | null,
    readonly chunking: ChunkingParams,
    private readonly keys: RepoKeys | null,
    private readonly next: NextFrame,
    private readonly sendNeed: (seq: number, flags: Buffer) => Promise<void>,
    /** Chunks the client's namespace holds (null: no namespace, the pipeline's answer is enough). */
    private readonly known: ((digest: Buffer) => boolean) | null,
    private readonly remember: (digest: Buffer) => void,
  ) {}

  private async frame(type: typeof T.SEGMENT | typeof T.CHUNKS): Promise<Frame | null> {
    const f = await this.next(type);
    if (f === null) return null;
    if (f.id !== this.seq) {
      throw new ProtocolError(`backup: expected ${type === T.SEGMENT ? 'SEGMENT' : 'CHUNKS'} ${this.seq}, got ${f.id}`);
    }
    return f;
  }

  async readSegment(need: NeedFn): Promise<ChunkedSegment | null> {
    if (this.ended) return null;
    const f = await this.frame(T.SEGMENT);
    if (!f) {
      this.ended = true;
      return null;
    }
    const desc = decodeSegment(f.payload, this.chunking);
    const offered: OfferedChunk[] = [];
    const dataIdx: number[] = [];
    let at = 0;
    desc.forEach((c, i) => {
      if (!c.zero) {
        dataIdx.push(i);
        offered.push({ start: at, length: c.length, digest: c.digest! });
      }
      at += c.length;
    });
    if (this.size !== null && this.offset + at > this.size) throw new ProtocolError(`backup: more than the announced ${this.size} bytes`);
    const wanted = dataIdx.length ? await need(this.offset, offered) : [];
    const flags = Buffer.alloc(desc.length);
    // Within one segment a repeated chunk is sent once (the first time it is asked for).
    const asked = new Set<string>();
    dataIdx.forEach((i, k) => {
      const d = desc[i]!.digest!;
      const s = d.toString('binary');
      if ((wanted[k] || (this.known !== null && !this.known(d))) && !asked.has(s)) {
        flags[i] = 1;
        asked.add(s);
      }
    });
    await this.sendNeed(this.seq, flags);
    const data = await this.receive(desc, flags);
    const chunks: RemoteChunk[] = [];
    let start = 0;
    const byDigest = new Map<string, Buffer>();
    desc.forEach((c, i) => {
      if (data[i]) byDigest.set(c.digest!.toString('binary'), data[i]!);
    });
    let k = 0;
    desc.forEach((c) => {
      let bytes: Buffer | null = null;
      if (!c.zero) {
        // The pipeline gets bytes only for what it asked for (a namespace's proof is dropped).
        if (wanted[k]) bytes = byDigest.get(c.digest!.toString('binary')) ?? null;
        if (wanted[k] && !bytes) throw new ProtocolError('backup: the client did not send a chunk the repository needs');
        k++;
      }
      chunks.push({ start, length: c.length, zero: c.zero, digest: c.digest, data: bytes });
      start += c.length;
    });
    const seg: ChunkedSegment = { offset: this.offset, length: start, chunks };
    this.offset += start;
    this.seq++;
    return seg;
  }

  /** The CHUNKS frame answering NEED: each flagged chunk's bytes, checked against its identity. */
  private async receive(desc: Described[], flags: Buffer): Promise<Array<Buffer | null>> {
    const f = await this.frame(T.CHUNKS);
    if (!f) throw new ProtocolError('backup: the source ended while chunks were asked for');
    let expected = 0;
    for (let i = 0; i < desc.length; i++) if (flags[i]) expected += desc[i]!.length;
    const payload = decodeChunks(f.payload, expected);
    const out: Array<Buffer | null> = new Array(desc.length).fill(null);
    let at = 0;
    for (let i = 0; i < desc.length; i++) {
      if (!flags[i]) continue;
      const c = desc[i]!;
      if (at + c.length > payload.length) throw new ProtocolError('backup: CHUNKS shorter than asked');
      const bytes = payload.subarray(at, at + c.length);
      at += c.length;
      if (!chunkIdentity(this.keys, bytes).equals(c.digest!)) {
        throw new GenvaultError(`backup: a chunk the client sent (offset ${this.offset}) does not match its identity`, 'PROTOCOL');
      }
      this.remember(c.digest!);
      out[i] = bytes;
    }
    if (at !== payload.length) throw new ProtocolError('backup: CHUNKS longer than asked');
    this.transferred.wire += f.payload.length;
    this.transferred.raw += payload.length;
    return out;
  }

  /** Plain-Source view: not used by the pipeline for a ChunkedSource. */
  async read(): Promise<number> {
    throw new GenvaultError('a remote upload is read by segments only', 'INTERNAL');
  }

  async close(): Promise<void> {
    this.ended = true;
  }
}

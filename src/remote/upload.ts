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
import { offeredChunks, type ChunkedSegment, type ChunkedSource, type NeedFn, type RemoteChunk } from '../backup/chunked-source.js';
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

/** Segments answered (NEED sent) ahead of the one the pipeline takes: the client streams without a pause per segment. */
const AHEAD = 3;

/** A segment described by the client and answered: its chunks, what the pipeline wants, what was asked for. */
interface Answered {
  seq: number;
  desc: Described[];
  /** Per data chunk, in order: the pipeline wants its bytes. */
  wanted: boolean[];
  /** Per chunk: its bytes were asked for. */
  flags: Buffer;
}

export class UploadSource implements ChunkedSource {
  private offset = 0;
  /** Offset of the next segment to be answered (ahead of `offset`). */
  private answeredTo = 0;
  private seq = 0;
  private nextSeq = 0;
  private ended = false;
  private answered: Answered[] = [];
  /** Chunks asked for in this session, not yet received: asked once, checked when they come. */
  private asked = new Set<string>();
  readonly transferred = { raw: 0, wire: 0 };

  constructor(
    readonly description: string,
    readonly size: number | null,
    readonly chunking: ChunkingParams,
    private readonly keys: RepoKeys | null,
    private readonly next: NextFrame,
    /** Whether a SEGMENT frame is queued now (answering ahead never waits for the client). */
    private readonly segmentQueued: () => boolean,
    private readonly sendNeed: (seq: number, flags: Buffer) => Promise<void>,
    /** Chunks the client's namespace holds (null: no namespace, the pipeline's answer is enough). */
    private readonly known: ((digest: Buffer) => boolean) | null,
    private readonly remember: (digest: Buffer) => void,
  ) {}

  private async frame(type: typeof T.SEGMENT | typeof T.CHUNKS, seq: number): Promise<Frame | null> {
    const f = await this.next(type);
    if (f === null) return null;
    if (f.id !== seq) throw new ProtocolError(`backup: expected ${type === T.SEGMENT ? 'SEGMENT' : 'CHUNKS'} ${seq}, got ${f.id}`);
    return f;
  }

  /**
   * The next described segment answered: the pipeline's need() for it (in image order,
   * one at a time, possibly before the bytes of earlier segments arrived: its answers
   * depend only on the index, the parent and what it asked for before) and NEED sent.
   * False at the end of the source.
   */
  private async answerNext(need: NeedFn): Promise<boolean> {
    if (this.ended) return false;
    const seq = this.nextSeq;
    const f = await this.frame(T.SEGMENT, seq);
    if (!f) {
      this.ended = true;
      return false;
    }
    const desc = decodeSegment(f.payload, this.chunking);
    const { offered, dataIdx, length: at } = offeredChunks(desc);
    if (this.size !== null && this.answeredTo + at > this.size) throw new ProtocolError(`backup: more than the announced ${this.size} bytes`);
    const wanted = dataIdx.length ? await need(this.answeredTo, offered) : [];
    const flags = Buffer.alloc(desc.length);
    const here = new Set<string>();
    dataIdx.forEach((i, k) => {
      const d = desc[i]!.digest!;
      const s = d.toString('binary');
      if (here.has(s)) return;
      // What the pipeline wants is always asked for; a namespaced client also proves, once
      // per session, each chunk its namespace lacks.
      const proof = this.known !== null && !this.known(d) && !this.asked.has(s);
      if (wanted[k] || proof) {
        flags[i] = 1;
        here.add(s);
        this.asked.add(s);
      }
    });
    await this.sendNeed(seq, flags);
    this.answered.push({ seq, desc, wanted, flags });
    this.answeredTo += at;
    this.nextSeq++;
    return true;
  }

  async readSegment(need: NeedFn): Promise<ChunkedSegment | null> {
    if (!this.answered.length && !(await this.answerNext(need))) return null;
    while (this.answered.length < AHEAD && !this.ended && this.segmentQueued()) await this.answerNext(need);
    const cur = this.answered.shift()!;
    const { desc, wanted } = cur;
    const data = await this.receive(cur);
    const chunks: RemoteChunk[] = [];
    let start = 0;
    const byDigest = new Map<string, Buffer>();
    desc.forEach((c, i) => {
      if (data[i]) byDigest.set(c.digest!.toString('binary'), data[i]!);
    });
    let k = 0;
    for (const c of desc) {
      let bytes: Buffer | null = null;
      if (!c.zero) {
        // The pipeline gets bytes only for what it asked for (a namespace's proof is dropped).
        if (wanted[k]) {
          bytes = byDigest.get(c.digest!.toString('binary')) ?? null;
          if (!bytes) throw new ProtocolError('backup: the client did not send a chunk the repository needs');
        }
        k++;
      }
      chunks.push({ start, length: c.length, zero: c.zero, digest: c.digest, data: bytes });
      start += c.length;
    }
    const seg: ChunkedSegment = { offset: this.offset, length: start, chunks };
    this.offset += start;
    this.seq++;
    return seg;
  }

  /** The CHUNKS frame answering NEED: each flagged chunk's bytes, checked against its identity. */
  private async receive(a: Answered): Promise<Array<Buffer | null>> {
    const { desc, flags } = a;
    const f = await this.frame(T.CHUNKS, a.seq);
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
      this.asked.delete(c.digest!.toString('binary'));
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

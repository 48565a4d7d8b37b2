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
import { SEAL_OVERHEAD, chunkIdentity, type RepoKeys } from '../format/crypto.js';
import type { ChunkingParams } from '../format/config.js';
import { offeredChunks, type AdoptedRecords, type ChunkedSegment, type ChunkedSource, type NeedFn, type RemoteChunk } from '../backup/chunked-source.js';
import { GenvaultError } from '../util/errors.js';
import { ProtocolError, type Frame } from './frames.js';
import { zstd } from '../work/zstd.js';
import { CODING_RAW, CODING_RECORDS, CODING_ZSTD, T, decodeSegment, type Described } from './protocol.js';
import { GROUP_MEMBER_SIZE, RECORD_HEADER_SIZE } from '../format/pack.js';
import type { AdoptAnswer, AdoptRequest } from '../work/protocol.js';

let dctx: InstanceType<typeof zstd.DCtx> | null = null;

/** Runs the `adopt` op on the repository's workers (they hold the sealing key). */
export type AdoptFn = (req: AdoptRequest) => Promise<AdoptAnswer>;

/**
 * Shared buffers for records on their way through a worker, reused: a backup moves a
 * segment's worth at a time, and fresh pages are expensive here (native-notes/
 * performance.md, worker threads, "Chunk tables"). At most a few are in use at once (the
 * pipeline's depth), and a few are kept.
 */
const slabs: SharedArrayBuffer[] = [];
/** Slabs handed out and not given back (a CHUNKS frame assembled in one is used in place). */
const lent = new WeakSet<SharedArrayBuffer>();
function takeSlab(size: number): SharedArrayBuffer {
  const i = slabs.findIndex((b) => b.byteLength >= size);
  const b = i >= 0 ? slabs.splice(i, 1)[0]! : new SharedArrayBuffer(Math.max(size, 9 << 20));
  lent.add(b);
  return b;
}
function giveSlab(b: SharedArrayBuffer): void {
  lent.delete(b);
  if (slabs.length < 8) slabs.push(b);
}

/**
 * Where the server's FrameReader assembles a large CHUNKS frame: a slab, so that records
 * go to a worker without another copy (a frame of another coding leaves it to the GC).
 */
export function chunksFrameBuffer(type: number, length: number): Buffer | null {
  return type === T.CHUNKS && length > 1 << 20 ? Buffer.from(takeSlab(length)) : null;
}

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
 * The BLAKE3 of the chunks asked for (`fast`, in `asked` order) as the segment's: each
 * chunk that has the digest of one of them.
 */
function segmentFasts(desc: Described[], asked: number[], fast: Uint8Array): { fast: Uint8Array; hasFast: Uint8Array } {
  const byDigest = new Map<string, number>();
  asked.forEach((i, j) => byDigest.set(desc[i]!.digest!.toString('binary'), j));
  const out = new Uint8Array(desc.length * 32);
  const has = new Uint8Array(desc.length);
  desc.forEach((c, i) => {
    const j = c.zero ? undefined : byDigest.get(c.digest!.toString('binary'));
    if (j === undefined) return;
    out.set(fast.subarray(j * 32, j * 32 + 32), i * 32);
    has[i] = 1;
  });
  return { fast: out, hasFast: has };
}

/**
 * What the session hands over: the next SEGMENT frame of this backup (null once END came),
 * or the next CHUNKS frame. The two are queued apart: a client describes segments ahead of
 * the chunks it sends.
 */
export type NextFrame = (type: typeof T.SEGMENT | typeof T.CHUNKS) => Promise<Frame | null>;

/** Segments answered (NEED sent) ahead of the one the pipeline takes: the client streams without a pause per segment. */
const AHEAD = 8;

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
    /** Records offered in WELCOME: the repository's group size, and the worker op that checks and seals them. */
    private readonly records: { group: number; fast: boolean; adopt: AdoptFn } | null = null,
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
    const { data, records } = await this.receive(cur);
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
        if (wanted[k] && !records) {
          bytes = byDigest.get(c.digest!.toString('binary')) ?? null;
          if (!bytes) throw new ProtocolError('backup: the client did not send a chunk the repository needs');
        }
        k++;
      }
      chunks.push({ start, length: c.length, zero: c.zero, digest: c.digest, data: bytes, inRecords: !c.zero && !!records && wanted[k - 1] });
      start += c.length;
    }
    const seg: ChunkedSegment = { offset: this.offset, length: start, chunks, records };
    this.offset += start;
    this.seq++;
    return seg;
  }

  /**
   * The CHUNKS frame answering NEED: each flagged chunk's bytes, checked against its
   * identity, or (coding 2) the records that hold them, checked and sealed on a worker.
   */
  private async receive(a: Answered): Promise<{ data: Array<Buffer | null>; records?: Promise<AdoptedRecords> }> {
    const f = await this.frame(T.CHUNKS, a.seq);
    if (!f) throw new ProtocolError('backup: the source ended while chunks were asked for');
    if (f.payload[0] === CODING_RECORDS) return { data: [], records: this.adopted(a, f.payload) };
    return { data: this.checked(a, f) };
  }

  /** Raw or zstd CHUNKS: the flagged chunks' bytes, each checked against its identity here. */
  private checked(a: Answered, f: Frame): Array<Buffer | null> {
    const { desc, flags } = a;
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

  /**
   * CHUNKS as records (coding 2): handed to a worker that decodes every record, checks
   * each chunk's identity against the chunk asked for at its place, and seals the records
   * of the chunks the repository stores (op-adopt.ts). The records may hold no more than
   * the chunks' bytes plus their headers and group tables: the client cannot make the
   * server buffer more.
   */
  private adopted(a: Answered, payload: Buffer): Promise<AdoptedRecords> {
    if (!this.records) throw new ProtocolError('backup: records were sent, but not offered');
    const { adopt, group, fast } = this.records;
    const { desc, flags, wanted } = a;
    const asked: number[] = [];
    const wantedHere = new Set<string>();
    let k = 0;
    desc.forEach((c, i) => {
      if (c.zero) return;
      if (flags[i]) asked.push(i);
      if (wanted[k++]) wantedHere.add(c.digest!.toString('binary'));
    });
    const n = asked.length;
    const digests = new Uint8Array(n * 32);
    const lengths = new Int32Array(n);
    const keep = new Uint8Array(n);
    let raw = 0;
    asked.forEach((i, j) => {
      const c = desc[i]!;
      digests.set(c.digest!, j * 32);
      lengths[j] = c.length;
      // A chunk the repository stores may be wanted at a later place than where it was asked for.
      keep[j] = wantedHere.has(c.digest!.toString('binary')) ? 1 : 0;
      raw += c.length;
    });
    const len = payload.length - 1;
    if (len > raw + n * (RECORD_HEADER_SIZE + 4 + GROUP_MEMBER_SIZE)) throw new ProtocolError('backup: records larger than the chunks they hold');
    // The frame's own slab when it was assembled in one, else a copy in one.
    const inPlace = payload.buffer instanceof SharedArrayBuffer && lent.has(payload.buffer);
    const recs = inPlace ? (payload.buffer as SharedArrayBuffer) : takeSlab(len);
    const at = inPlace ? payload.byteOffset + 1 : 0;
    if (!inPlace) Buffer.from(recs).set(payload.subarray(1));
    const out = takeSlab(len + n * SEAL_OVERHEAD);
    this.transferred.wire += payload.length;
    this.transferred.raw += raw;
    return adopt({ op: 'adopt', recs, at, len, digests, lengths, keep, group, fast, out }).then(
      (res) => {
        giveSlab(recs);
        const fasts = res.fast ? segmentFasts(desc, asked, res.fast) : null;
        const names: string[] = [];
        const rawLengths: number[] = [];
        asked.forEach((i, j) => {
          const d = desc[i]!.digest!;
          this.remember(d);
          this.asked.delete(d.toString('binary'));
          if (!keep[j]) return;
          names.push(d.toString('binary'));
          rawLengths.push(lengths[j]!);
        });
        return { out: res.out, table: res.table, fast: fasts?.fast ?? null, hasFast: fasts?.hasFast ?? null, names, rawLengths, release: () => giveSlab(out) };
      },
      (e: Error & { code?: string }) => {
        giveSlab(recs);
        giveSlab(out);
        throw e.code === 'PROTOCOL' ? new GenvaultError(`backup: ${e.message}`, 'PROTOCOL') : e;
      },
    );
  }

  /** Plain-Source view: not used by the pipeline for a ChunkedSource. */
  async read(): Promise<number> {
    throw new GenvaultError('a remote upload is read by segments only', 'INTERNAL');
  }

  async close(): Promise<void> {
    this.ended = true;
  }
}

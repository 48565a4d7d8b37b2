/**
 * Sources that chunk at the far end (the SSH agent, src/source/ssh-agent.ts): they
 * deliver each segment as a list of chunks with digests, and bytes only for the chunks
 * the repository lacks. A ChunkedSource is also a plain Source (read() asks for every
 * data chunk and reassembles the bytes), so consumers that know nothing of it still work.
 */
import type { ChunkingParams } from '../format/config.js';
import type { Source } from './source.js';
import type { CompressAnswer } from '../work/protocol.js';

/** A data chunk offered by the far end, before its bytes are asked for. */
export interface OfferedChunk {
  /** Offset inside the segment. */
  start: number;
  length: number;
  /** SHA-256 of the chunk's bytes, computed remotely. */
  digest: Buffer;
}

/** One chunk of a delivered segment. */
export interface RemoteChunk {
  /** Offset inside the segment. */
  start: number;
  length: number;
  zero: boolean;
  /** SHA-256 (computed remotely; checked locally for chunks that were sent); null for zero chunks. */
  digest: Buffer | null;
  /** The chunk's bytes when they were asked for, else null (always null for zero chunks). */
  data: Buffer | null;
  /**
   * BLAKE3 of the chunk's bytes, for the map (format 2), when the source knows it. Used
   * only when every data chunk of the segment has one.
   */
  fast?: Buffer | null;
  /** Its bytes came compressed, in the segment's `records` (data stays null). */
  inRecords?: boolean;
}

/**
 * New chunks that came as pack records (a remote writer's, src/remote/upload.ts), checked
 * and sealed: ready for a pack as they are, no compression needed.
 */
export interface AdoptedRecords extends CompressAnswer {
  /** BLAKE3 per chunk of the segment (32 bytes each), valid where hasFast is 1: those whose bytes came. */
  fast: Uint8Array | null;
  hasFast: Uint8Array | null;
  /** Per table row: the chunk's digest (binary string) and raw length. */
  names: string[];
  rawLengths: number[];
  /** Gives the buffer under `out` back, once the records are written. */
  release(): void;
}

export interface ChunkedSegment {
  /** Offset of the segment in the image. */
  offset: number;
  length: number;
  chunks: RemoteChunk[];
  /** The records of the chunks marked `inRecords` (one table row per digest). */
  records?: Promise<AdoptedRecords>;
}

/**
 * Decides which data chunks of a segment to fetch: gets the segment's offset in the
 * image and its data chunks in order (a digest may repeat), answers one boolean per
 * chunk (true = send its bytes). Called once per segment, in image order, never
 * concurrently.
 */
export type NeedFn = (segmentOffset: number, chunks: OfferedChunk[]) => Promise<boolean[]>;

export interface ChunkedSource extends Source {
  /** Chunking the far end uses; must equal the repository's (chunk boundaries decide dedup). */
  readonly chunking: ChunkingParams;
  /** The next segment (segments are `chunking.segment` bytes, the last may be shorter); null at the end. */
  readSegment(need: NeedFn): Promise<ChunkedSegment | null>;
  /** Chunk bytes received so far: raw (after inflating) and on the wire. */
  readonly transferred: { raw: number; wire: number };
}

/**
 * A described segment's data chunks as a NeedFn is offered them: their offsets inside the
 * segment, and which entry of `chunks` each one is. `length` is the segment's.
 */
export function offeredChunks(chunks: Array<{ length: number; zero: boolean; digest: Buffer | null }>): { offered: OfferedChunk[]; dataIdx: number[]; length: number } {
  const offered: OfferedChunk[] = [];
  const dataIdx: number[] = [];
  let at = 0;
  chunks.forEach((c, i) => {
    if (!c.zero) {
      dataIdx.push(i);
      offered.push({ start: at, length: c.length, digest: c.digest! });
    }
    at += c.length;
  });
  return { offered, dataIdx, length: at };
}

export function isChunkedSource(s: Source): s is ChunkedSource {
  return typeof (s as Partial<ChunkedSource>).readSegment === 'function';
}

/** Whether a source's chunking produces the same boundaries as the repository's. */
export function sameChunking(a: ChunkingParams, b: ChunkingParams): boolean {
  return a.block === b.block && a.min === b.min && a.max === b.max && a.maskBits === b.maskBits && a.segment === b.segment;
}

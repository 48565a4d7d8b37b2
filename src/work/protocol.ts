/**
 * The protocol between the pool (main thread, src/work/pool.ts) and its worker threads
 * (src/work/worker.ts): for each operation, what a request carries and what its answer is.
 *
 * - One message per request, one message per answer. The pool posts `{ id, req }`; the
 *   worker answers `{ id, result }` with the answer of `req.op` (see `Protocol`), or
 *   `{ id, error: { message, code } }` when the handler threw. The pool turns the latter
 *   into a rejected Error carrying `code`.
 * - Requests may name SharedArrayBuffers (segments, output buffers, slabs) that both sides
 *   use in place; buffers sent in a request's transfer list change hands.
 * - Answers carry their typed arrays by transfer (the worker lists their ArrayBuffers), so
 *   no chunk data is copied between threads. An answer's buffers are the caller's.
 *
 * `pool.run(req)` is typed by `req.op`: it resolves to `AnswerOf<typeof req.op>`. Each
 * worker handler is checked against the same map (src/work/worker.ts).
 */
import type { PackSpan } from './spans.js';
import type { ChunkingParams } from '../format/config.js';

/**
 * The parent generation's chunks inside a segment that carry a BLAKE3 digest: start
 * (relative to the segment), length, BLAKE3 and SHA-256 of each, in offset order.
 */
export interface ParentWindow {
  starts: Int32Array;
  lengths: Int32Array;
  fast: Uint8Array;
  sha: Uint8Array;
}

/**
 * Read the segment from the source's descriptor first (a DirectRead of it): only the data
 * extents are read, the rest is zeroed.
 */
export interface SegmentRead {
  fd: number;
  /** Image offset of the segment. */
  position: number;
  extents: Array<[number, number]> | null;
}

/** What a chunk op that read its segment returns instead of chunks when the read failed. */
export type SegmentReadFailure = { readError: { code?: string; message: string; offset: number } } | { short: number };

export interface LoadItem {
  /** The pack's object name in the pool's store (format/pack.ts packObject). */
  file: string;
  offset: number;
  storedLength: number;
  rawLength: number;
  compression: number;
  /** Group members: where the chunk starts in the group's decoded bytes, and their total. */
  inner?: number;
  groupRaw?: number;
  digest: Uint8Array;
  /**
   * The chunk's BLAKE3 from the generation's map, when it has one: reads check that
   * instead of the SHA-256 (cheaper: native-notes/performance.md, worker threads,
   * "BLAKE3 first"). The record header must still name `digest`.
   */
  fast?: Uint8Array | null;
  /** Check the SHA-256 as well as the BLAKE3 (verify --full). */
  alsoSha?: boolean;
}

/** A chunk to decode and write at `at` in the file descriptor (zero: write zeros, or skip if `hole`). */
export interface RestoreItem extends LoadItem {
  at: number;
  zero: boolean;
}

/**
 * One chunk loaded: its bytes (`data`, from `load`), or its place in the batch's bytes
 * (`offset`, `length`, from `loadMany`), or why it could not be had (`damaged`).
 */
export type LoadResult = { data?: Uint8Array; damaged?: string; offset?: number; length?: number };

export interface ChunkRequest {
  op: 'chunk';
  seg: SharedArrayBuffer;
  len: number;
  params: ChunkingParams;
  fast?: boolean;
  parent?: ParentWindow;
  read?: SegmentRead;
}

/** A segment's chunks: per chunk [start, length, zero] in `table`, 32 bytes each in the digests. */
export interface ChunkTable {
  table: Int32Array;
  digests: Uint8Array;
  /** BLAKE3 per chunk, when the request asked for `fast`. */
  fast: Uint8Array | null;
  /** Bytes whose SHA-256 was taken from the parent after a BLAKE3 match. */
  unchanged: number;
}

export type ChunkAnswer = ChunkTable | SegmentReadFailure;

export interface CompressRequest {
  op: 'compress';
  seg: SharedArrayBuffer;
  /** [start, length] per new chunk, in the segment. */
  spans: Int32Array;
  digests: Uint8Array;
  level: number;
  group?: number;
  /** Where to write the records, when big enough (else the answer brings its own buffer). */
  out?: SharedArrayBuffer;
  /**
   * false: records left unsealed whatever keys the pool has (a remote writer's client has
   * no sealing key: the server seals, op-adopt.ts).
   */
  seal?: boolean;
}

export interface CompressAnswer {
  /** The records, one after the other (a view of `out` when the request's was used). */
  out: Uint8Array;
  /** Per chunk: record offset in out, stored length, compression, offset in the group, group raw length. */
  table: Int32Array;
}

/** Records a remote writer built (unsealed compress output), to check and seal: op-adopt.ts. */
export interface AdoptRequest {
  op: 'adopt';
  /** The records: `len` bytes from `at`. */
  recs: SharedArrayBuffer;
  at: number;
  len: number;
  /** The chunks asked for, in order: identity (32 bytes each) and length. */
  digests: Uint8Array;
  lengths: Int32Array;
  /** Per chunk asked for: 1 to store it, 0 to check and drop it (a namespace's proof). */
  keep: Uint8Array;
  /** The repository's largest group (0: it makes none). */
  group: number;
  /** Also each chunk's BLAKE3 (the map keeps them from format 2 on: change detection). */
  fast: boolean;
  /** Room for the records, sealed: at least len + one seal's overhead per chunk. */
  out: SharedArrayBuffer;
}

/** As CompressAnswer, with a table row per kept chunk, in order; BLAKE3 per chunk asked for when asked. */
export interface AdoptAnswer extends CompressAnswer {
  fast: Uint8Array | null;
}

/** `spans`: the pack bytes, read by the main thread, for a store without synchronous reads (spans.ts). */
export type LoadRequest = { op: 'load'; direct?: boolean; spans?: PackSpan[] } & LoadItem;

export type LoadAnswer = LoadResult;

export interface LoadManyRequest {
  op: 'loadMany';
  items: LoadItem[];
  /** A shared slab to decode into, from `intoAt` on (used when the batch fits). */
  into?: SharedArrayBuffer;
  intoAt?: number;
  direct?: boolean;
  spans?: PackSpan[];
}

export interface LoadManyAnswer {
  /** All the chunks' bytes; absent when they were decoded into the request's `into`. */
  all?: Uint8Array;
  /** Per item: `offset` and `length` in the bytes, or `damaged`. */
  results: LoadResult[];
}

export interface RestoreManyRequest {
  op: 'restoreMany';
  fd: number;
  items: RestoreItem[];
  direct?: boolean;
  spans?: PackSpan[];
}

export interface RestoreManyAnswer {
  /** Indexes of the items that could not be restored. */
  damaged: number[];
}

/** Every operation: its request and its answer. */
export interface Protocol {
  chunk: { req: ChunkRequest; answer: ChunkAnswer };
  compress: { req: CompressRequest; answer: CompressAnswer };
  adopt: { req: AdoptRequest; answer: AdoptAnswer };
  load: { req: LoadRequest; answer: LoadAnswer };
  loadMany: { req: LoadManyRequest; answer: LoadManyAnswer };
  restoreMany: { req: RestoreManyRequest; answer: RestoreManyAnswer };
}

export type Op = keyof Protocol;
/** The request of `K` (written so that `pool.run` infers `K` from the literal `op`). */
export type RequestOf<K extends Op> = { op: K } & Protocol[K]['req'];
export type AnswerOf<K extends Op> = Protocol[K]['answer'];
export type WorkerRequest = Protocol[Op]['req'];
export type WorkerAnswer = Protocol[Op]['answer'];

/** How a request that threw in the worker comes back. */
export interface WorkerError {
  message: string;
  code?: string;
}

/** What the pool posts, and what the worker posts back. */
export interface RequestMessage {
  id: number;
  req: WorkerRequest;
}
export type AnswerMessage = { id: number; result: WorkerAnswer; error?: undefined } | { id: number; result?: undefined; error: WorkerError };

/** What a worker handler returns: the answer and the buffers to transfer with it. */
export interface Reply<A> {
  result: A;
  transfer: ArrayBuffer[];
}

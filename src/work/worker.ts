/**
 * Worker thread for the CPU-heavy work: chunking + SHA-256 of source segments,
 * zstd compression of new chunks, and reading + decompressing + verifying chunks for
 * restore and the FUSE mount. Running these here keeps the main event loop (which
 * serves FUSE requests and LevelDB) free, and uses both cores.
 * Sync fs calls are fine here: this thread never serves the mount.
 *
 * This file is the thread's entry (the pool starts it): it lowers the thread's priority,
 * and hands each request to its op's handler (one file per op: op-*.ts). The requests and
 * answers are in protocol.ts.
 */
import './priority.js'; // first: the thread runs below the main thread from the start
import { parentPort } from 'node:worker_threads';
import type { AnswerOf, Op, Reply, RequestMessage, RequestOf, WorkerAnswer, WorkerRequest } from './protocol.js';
import { handleChunk } from './op-chunk.js';
import { handleCompress } from './op-compress.js';
import { handleAdopt } from './op-adopt.js';
import { handleLoad, handleLoadMany, withSpans } from './op-load.js';
import { handleRestoreMany } from './op-restore.js';
import type { PackSpan } from './spans.js';

/** Each op's handler, checked against its request and answer in protocol.ts. */
const handlers: { [K in Op]: (req: RequestOf<K>) => Reply<AnswerOf<K>> } = {
  chunk: handleChunk,
  compress: handleCompress,
  adopt: handleAdopt,
  load: handleLoad,
  loadMany: handleLoadMany,
  restoreMany: handleRestoreMany,
};

function handle(req: WorkerRequest): Reply<WorkerAnswer> {
  // The map pairs each op with its handler; TypeScript cannot follow that pairing through
  // `req.op`, hence the one widening here.
  const handler = handlers[req.op] as (req: WorkerRequest) => Reply<WorkerAnswer>;
  return withSpans((req as { spans?: PackSpan[] }).spans, () => handler(req));
}

parentPort!.on('message', (msg: RequestMessage) => {
  try {
    const { result, transfer } = handle(msg.req);
    parentPort!.postMessage({ id: msg.id, result }, transfer);
  } catch (e) {
    const err = e as NodeJS.ErrnoException;
    parentPort!.postMessage({ id: msg.id, error: { message: err.message, code: err.code } });
  }
});

/** The `restoreMany` op: chunks decoded and written into the target here, writers taking turns. */
import { workerData } from 'node:worker_threads';
import fs from 'node:fs';
import type { Reply, RestoreManyAnswer, RestoreManyRequest } from './protocol.js';
import { loadRun } from './op-load.js';
import { ZEROS } from './zeros.js';

/** Reused decode buffer for restores (grows to the largest batch). */
let scratch = new Uint8Array(4 << 20);

/**
 * Restore writes into one file take turns on a lock word shared by the pool's workers.
 * The kernel serialises them anyway (the inode lock), but its waiters spin while the
 * holder copies into fresh pages; here they sleep, and their core decodes for the others.
 * Cold restores got faster and took less CPU (native-notes/performance.md, worker
 * threads, "Write lock").
 */
const writeLock = (workerData as { writeLock?: SharedArrayBuffer } | null)?.writeLock;
const lockWord = writeLock ? new Int32Array(writeLock) : null;

function writeAll(fd: number, data: Uint8Array, length: number, at: number): void {
  if (lockWord) {
    while (Atomics.compareExchange(lockWord, 0, 0, 1) !== 0) Atomics.wait(lockWord, 0, 1);
  }
  try {
    writeAllUnlocked(fd, data, length, at);
  } finally {
    if (lockWord) {
      Atomics.store(lockWord, 0, 0);
      Atomics.notify(lockWord, 0, 1);
    }
  }
}

function writeAllUnlocked(fd: number, data: Uint8Array, length: number, at: number): void {
  let done = 0;
  while (done < length) {
    const src = data === ZEROS ? ZEROS.subarray(0, Math.min(ZEROS.length, length - done)) : data.subarray(done, length);
    done += fs.writeSync(fd, src, 0, src.length, at + done);
  }
}

export function handleRestoreMany(req: RestoreManyRequest): Reply<RestoreManyAnswer> {
  // Decode and write here: no chunk data crosses threads, the main thread only plans.
  // The fd belongs to the process, so the main thread's descriptor works here.
  const damaged: number[] = [];
  const data = req.items.filter((it) => !it.zero);
  const need = data.reduce((a, it) => a + it.rawLength, 0);
  if (scratch.length < need) scratch = new Uint8Array(need);
  const offs: number[] = [];
  let total = 0;
  for (const it of data) {
    offs.push(total);
    total += it.rawLength;
  }
  const loaded = loadRun(data, (i) => scratch.subarray(offs[i]!, offs[i]! + data[i]!.rawLength), req.direct);
  // Chunks that follow each other in the image lie next to each other in scratch too:
  // write each such run with one pwrite (fewer core-seconds for a restore:
  // native-notes/performance.md, worker threads, "One pwrite per run").
  let runFrom = -1; // scratch offset of the pending run
  let runAt = 0;
  let runLen = 0;
  const flush = () => {
    if (runLen > 0) writeAll(req.fd, scratch.subarray(runFrom, runFrom + runLen), runLen, runAt);
    runLen = 0;
  };
  let k = 0;
  req.items.forEach((it, i) => {
    if (it.zero) {
      flush();
      writeAll(req.fd, ZEROS, it.rawLength, it.at);
      return;
    }
    const r = loaded[k]!;
    const from = offs[k++]!;
    if (r.damaged) {
      flush();
      damaged.push(i);
      return;
    }
    if (runLen > 0 && runAt + runLen === it.at && runFrom + runLen === from) runLen += it.rawLength;
    else {
      flush();
      runFrom = from;
      runAt = it.at;
      runLen = it.rawLength;
    }
  });
  flush();
  return { result: { damaged }, transfer: [] };
}

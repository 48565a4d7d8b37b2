/** A small pool of worker threads (one per core) running src/work/worker.ts. */
import { Worker } from 'node:worker_threads';
import os from 'node:os';
import type { Store, StoreSpec } from '../store/store.js';
import { SpanFetcher, spanTransfer } from './spans.js';
import type { IdentityKeys, RepoKeys } from '../format/crypto.js';
import type { AnswerMessage, AnswerOf, LoadItem, Op, RequestOf, WorkerRequest } from './protocol.js';

interface Task {
  req: WorkerRequest;
  transfer: ArrayBuffer[];
  resolve: (v: any) => void;
  reject: (e: Error) => void;
}

/** Cores the pools size themselves by (more than 8 threads buy nothing for this work). */
export function workerCores(): number {
  return Math.min(os.availableParallelism(), 8);
}

/** Ops that read packs: their requests carry spans for a store without synchronous reads. */
const READS_PACKS = new Set<string>(['load', 'loadMany', 'restoreMany']);

export class WorkerPool {
  private workers: Worker[] = [];
  /** Tasks each worker holds (running, or waiting in its message queue). */
  private load = new Map<Worker, number>();
  private queue: Task[] = [];
  private pending = new Map<number, Task>();
  private taskOf = new Map<number, Worker>();
  private nextId = 1;
  private closed = false;
  private readonly spans: SpanFetcher | null;

  // One more thread than cores: reads of cold pack data block a worker in the kernel,
  // and the spare thread keeps the cores busy meanwhile. Two spares were worse on 2 cores,
  // for restores (writers spin on the target's inode lock) and for a cold dd through the
  // mount; one spare was at least as good as none. Measurements: native-notes/performance.md,
  // worker threads, "Pool size".
  /**
   * @param nice how much below the calling thread the workers run (Linux). A mount passes
   *   more than a backup, so that on a busy machine backups keep most of the CPU.
   * @param depth tasks handed to a worker at once. With 2, a worker that finishes a task
   *   starts its next one at once instead of waiting for this thread to hear of it and
   *   send another (this thread may be busy planning or collecting garbage): cold
   *   restores ran faster with 2 than with 1 (native-notes/performance.md, worker
   *   threads, "Pool depth"). Backups showed no difference. A mount keeps 1, so that a
   *   read the kernel waits for never queues inside a busy worker behind read-ahead.
   * @param store the store whose packs the load and restore ops read (their items name
   *   packs by object name in it); a pool without one only chunks and compresses.
   * @param spanStore that store, when its reads are not local system calls (an object
   *   store): load and restore requests then carry the spans of their records, read here
   *   first (spans.ts).
   * @param keys an encrypted repository's derived keys (format 6): the workers seal, open
   *   and hash with them. They reach the threads only through workerData. A remote
   *   writer's client passes only the identity key and chunker seed it was given.
   */
  constructor(
    size?: number,
    nice = 5,
    private depth = 1,
    store?: StoreSpec,
    keys: RepoKeys | IdentityKeys | null = null,
    spanStore: Store | null = null,
  ) {
    this.spans = spanStore ? new SpanFetcher(spanStore) : null;
    size = Number(process.env.GENVAULT_WORKERS) || size || workerCores() + 1;
    // One lock word shared by the workers: restore writes to one file take turns on it.
    const writeLock = new SharedArrayBuffer(4);
    for (let i = 0; i < size; i++) {
      const w = new Worker(new URL('./worker.js', import.meta.url), { workerData: { nice, writeLock, store, keys } });
      w.unref();
      w.on('message', (msg: AnswerMessage) => {
        const t = this.pending.get(msg.id);
        this.pending.delete(msg.id);
        this.taskOf.delete(msg.id);
        this.load.set(w, this.load.get(w)! - 1);
        if (t) {
          if (msg.error) t.reject(Object.assign(new Error(msg.error.message), { code: msg.error.code }));
          else t.resolve(msg.result);
        }
        this.dispatch();
      });
      w.on('error', (err) => {
        for (const [id, tw] of this.taskOf) if (tw === w) this.pending.get(id)?.reject(err);
      });
      this.workers.push(w);
      this.load.set(w, 0);
    }
  }

  get size(): number {
    return this.workers.length;
  }

  /** Run one request on a worker; the answer is typed by the request's op (protocol.ts). */
  run<K extends Op>(req: RequestOf<K>, transfer: ArrayBuffer[] = []): Promise<AnswerOf<K>> {
    if (this.closed) return Promise.reject(new Error('worker pool closed'));
    if (this.spans && READS_PACKS.has(req.op) && !(req as { spans?: unknown }).spans) return this.runWithSpans(req, transfer);
    return new Promise<AnswerOf<K>>((resolve, reject) => {
      this.queue.push({ req, transfer, resolve, reject });
      this.dispatch();
    });
  }

  private async runWithSpans<K extends Op>(req: RequestOf<K>, transfer: ArrayBuffer[]): Promise<AnswerOf<K>> {
    const r = req as unknown as { op: string; items?: LoadItem[] } & LoadItem;
    const spans = await this.spans!.fetch(r.items ?? [r]);
    return this.run({ ...req, spans } as RequestOf<K>, [...transfer, ...spanTransfer(spans)]);
  }

  private dispatch(): void {
    while (this.queue.length) {
      let w: Worker | null = null;
      for (const c of this.workers) if (this.load.get(c)! < this.depth && (!w || this.load.get(c)! < this.load.get(w)!)) w = c;
      if (!w) return;
      const t = this.queue.shift()!;
      const id = this.nextId++;
      this.pending.set(id, t);
      this.taskOf.set(id, w);
      this.load.set(w, this.load.get(w)! + 1);
      w.postMessage({ id, req: t.req }, t.transfer);
    }
  }

  async close(): Promise<void> {
    this.closed = true;
    await Promise.all(this.workers.map((w) => w.terminate()));
  }
}

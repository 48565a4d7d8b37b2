/**
 * Lowers the priority of the worker thread that imports it (the worker entry imports it
 * first, so that it runs before anything else of the worker).
 */
import { workerData } from 'node:worker_threads';
import fs from 'node:fs';
import os from 'node:os';

// Run below the main thread: in a mount the main thread answers FUSE requests one at a
// time, and its latency, not the workers' throughput, bounds `dd` through the mount.
// Linux applies setpriority() to a single thread when given its thread id.
try {
  const tid = Number(fs.readlinkSync('/proc/thread-self').split('/').pop());
  const nice = Number((workerData as { nice?: number } | null)?.nice ?? 5);
  if (tid > 0 && nice > 0) os.setPriority(tid, Math.min(19, os.getPriority(tid) + nice));
} catch {
  /* not Linux, or not permitted: run at normal priority */
}

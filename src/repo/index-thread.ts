/**
 * A thread that holds the repository index open, so that in a long-lived, busy process
 * (the mount server) the LevelDB leader answers other processes from an event loop of its
 * own. rave-level makes the first opener the leader, and the leader serves every other
 * process's index requests over its unix socket; if that were the mount's main thread, a
 * backup's lookups would queue behind FUSE reads and run at half speed while `dd` reads
 * the mount. Started before the process opens the repository itself (which then becomes a
 * follower of this thread, or of whichever process leads already; this thread takes over
 * leadership when that process goes away, as any rave-level follower does).
 */
import path from 'node:path';
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads';
import { openDb } from './db.js';

export interface IndexThread {
  stop(): Promise<void>;
}

export async function startIndexThread(repoDir: string): Promise<IndexThread> {
  const w = new Worker(new URL(import.meta.url), { workerData: { dir: path.join(repoDir, 'index') } });
  await new Promise<void>((resolve, reject) => {
    w.once('message', () => resolve());
    w.once('error', reject);
    w.once('exit', (code) => reject(new Error(`index thread exited (${code})`)));
  });
  w.unref();
  return {
    async stop() {
      w.postMessage('close');
      await new Promise<void>((resolve) => {
        const t = setTimeout(() => void w.terminate().then(() => resolve()), 5000);
        w.once('exit', () => {
          clearTimeout(t);
          resolve();
        });
      });
    },
  };
}

if (!isMainThread && (workerData as { dir?: string } | null)?.dir && parentPort) {
  const port = parentPort;
  const db = await openDb((workerData as { dir: string }).dir);
  port.postMessage('ready');
  port.on('message', (m) => {
    if (m === 'close') void db.close().finally(() => process.exit(0));
  });
}

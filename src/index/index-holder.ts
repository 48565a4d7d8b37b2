/**
 * A small process that holds the repository index open for a mount, so that the LevelDB
 * leader is neither the mount's FUSE thread nor inside the mount's process at all.
 *
 * rave-level makes the first process that opens the index the leader, and the leader
 * does every other process's LevelDB work (over its unix socket). If that were the mount
 * server, a backup's index lookups would wait behind FUSE reads, and, once the mount drops
 * to the lowest CPU priority while backups run (src/util/sched.ts), behind the priority
 * too. Measured, backups beside a `dd` through the mount ran clearly faster with the
 * leader in a process of its own (native-notes/performance.md, "Figures behind code
 * comments").
 *
 * The holder runs in its own session (its own autogroup, normal priority), and exits when
 * the mount closes the IPC channel or dies (the channel closes with it). If the holder
 * dies, rave-level's failover makes another process leader, as for any leader.
 */
import { spawn } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { openDb } from './db.js';

export interface IndexHolder {
  readonly pid: number;
  stop(): Promise<void>;
}

const SELF = fileURLToPath(import.meta.url);

/** Start the holder and wait until it has the index open (as leader, or as a follower waiting to lead). */
export async function startIndexHolder(repoDir: string): Promise<IndexHolder> {
  const child = spawn(process.execPath, [SELF, path.join(repoDir, 'index')], {
    detached: true,
    stdio: ['ignore', 'ignore', 'inherit', 'ipc'],
    env: { ...process.env, GENVAULT_INDEX_HOLDER: '1' },
  });
  await new Promise<void>((resolve, reject) => {
    child.once('message', () => resolve());
    child.once('error', reject);
    child.once('exit', (code) => reject(new Error(`index holder exited (${code ?? 'signal'}) before opening the index`)));
  });
  child.unref();
  child.channel?.unref();
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  return {
    pid: child.pid!,
    async stop() {
      if (child.connected) child.disconnect();
      const t = setTimeout(() => child.kill('SIGKILL'), 5000);
      await exited;
      clearTimeout(t);
    },
  };
}

// The holder process itself.
if (process.env.GENVAULT_INDEX_HOLDER === '1' && process.argv[1] === SELF && process.send) {
  const db = await openDb(process.argv[2]!);
  let closing = false;
  const close = () => {
    if (closing) return;
    closing = true;
    void db.close().finally(() => process.exit(0));
  };
  process.on('disconnect', close);
  process.on('SIGTERM', close);
  process.on('SIGINT', close);
  process.send('ready');
}

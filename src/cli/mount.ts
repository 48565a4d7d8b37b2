import { Command } from 'commander';
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { GenvaultError, UsageError } from '../util/errors.js';
import { Repository } from '../repository/repository.js';
import { unlock, useSecret, type Secret } from '../repository/keys.js';
import { startIndexHolder } from '../index/index-holder.js';
import { fusermountUnmount, isMounted, isStaleMount, mountBackend, mountRepository, mountpointProblem, type MountHandle } from '../fuse/mount.js';
import { RemoteRepository, type RemoteOptions } from '../remote/client.js';
import { remoteMountBackend } from '../remote/mount-backend.js';
import { ensureRunDir, openLogFile, readRunFile, writeRunFile } from '../util/rundir.js';
import { action, localRepoDir, openRepository } from './common.js';
import { remoteOptions, remoteRepo } from './remote.js';
import { sizeArg, sizeOption } from './options.js';
import { workerCores } from '../work/pool.js';

/** Name of the mount server's pid file in the run directory (src/util/rundir.ts). */
function pidFileName(mnt: string): string {
  const b64 = Buffer.from(mnt).toString('base64url');
  // A file name holds 255 bytes: a very long mount point goes by its hash.
  return `mount-${b64.length <= 200 ? b64 : createHash('sha256').update(mnt).digest('hex')}.pid`;
}

interface MountCliOpts {
  foreground?: boolean;
  allowOther?: boolean;
  /** Bytes; absent: DEFAULT_CACHE for the repository's kind. */
  cacheSize?: number;
  log?: string;
}

/** Mount an ssh:// repository: one connection for the life of the mount (src/remote/mount-backend.ts). */
async function mountRemote(url: string, ssh: RemoteOptions, mnt: string, opts: MountCliOpts): Promise<MountHandle> {
  const remote = await RemoteRepository.open(url, ssh);
  const bytes = cacheBytes(opts, true);
  try {
    return await mountBackend(remoteMountBackend(remote, { cacheBytes: bytes }), mnt, { allowOther: opts.allowOther, cacheBytes: bytes });
  } catch (e) {
    remote.close();
    throw e;
  }
}

async function serveRemote(url: string, ssh: RemoteOptions, mnt: string, opts: MountCliOpts, notify: (msg: object) => void): Promise<void> {
  const runDir = await ensureRunDir();
  const handle = await mountRemote(url, ssh, mnt, opts);
  const pidFile = await writeRunFile(runDir, pidFileName(mnt), `${process.pid}\n`);
  notify({ ready: true, pid: process.pid });
  await untilUnmounted(handle);
  await fs.rm(pidFile, { force: true });
  process.exit(0);
}

/** Serve until unmounted from outside or signalled (then unmount). */
async function untilUnmounted(handle: MountHandle): Promise<void> {
  let stopping = false;
  const stop = async () => {
    if (stopping) return;
    stopping = true;
    await handle.unmount().catch(() => undefined);
  };
  process.on('SIGINT', () => void stop());
  process.on('SIGTERM', () => void stop());
  process.on('SIGHUP', () => void stop());
  await handle.closed;
}

async function serve(repoDir: string, mnt: string, opts: MountCliOpts, notify: (msg: object) => void): Promise<void> {
  const runDir = await ensureRunDir(); // before mounting: a refused run directory leaves nothing behind
  // The index leader (if none leads yet) is a small process of its own, not this one:
  // backups keep their speed while the mount is read (src/index/index-holder.ts).
  const indexHolder = await startIndexHolder(repoDir).catch((e: Error) => {
    process.stderr.write(`genvault mount: index holder not started (${e.message}); this process may lead the index\n`);
    return null;
  });
  const repo = await openRepository(repoDir);
  // Reading a mount must not starve backups of the same repository: its decode workers
  // run at a lower priority than a backup's (the FUSE thread itself stays at normal).
  repo.workerNice = 10;
  // A read the kernel waits for must not queue inside a worker behind read-ahead.
  repo.workerDepth = 1;
  // One decode worker per core, not one more as for backups: the kernel's copies into FUSE
  // and this thread need the cores too, and each worker holds its own buffers and heap
  // (native-notes/performance.md, "Figures behind code comments").
  repo.workerCount = workerCores();
  const handle = await mountRepository(repo, mnt, {
    allowOther: opts.allowOther,
    cacheBytes: cacheBytes(opts, false),
  });
  const pidFile = await writeRunFile(runDir, pidFileName(mnt), `${process.pid}\n`);
  notify({ ready: true, pid: process.pid });
  await untilUnmounted(handle);
  await fs.rm(pidFile, { force: true });
  await repo.close().catch(() => undefined);
  await indexHolder?.stop().catch(() => undefined);
  process.exit(0);
}

/** The global ssh options again, for the background server (files made absolute). */
function sshArgs(o: RemoteOptions): string[] {
  const args: string[] = [];
  if (o.identity) args.push('--repo-identity', path.resolve(o.identity));
  if (o.knownHosts) args.push('--repo-known-hosts', path.resolve(o.knownHosts));
  if (o.command) args.push('--repo-ssh-command', o.command);
  if (o.remoteCommand) args.push('--remote-command', o.remoteCommand);
  return args;
}

/** The secret the foreground process sent (null: none needed). */
function secretFromParent(): Promise<Secret | null> {
  return new Promise((resolve) => {
    process.send!({ needSecret: true });
    process.once('message', (m: { secret?: { bytes: string; kind: Secret['kind']; from: string } | null }) => {
      const s = m.secret;
      resolve(s ? { bytes: Buffer.from(s.bytes, 'base64'), kind: s.kind, from: s.from } : null);
    });
  });
}

export function register(program: Command): void {
  registerMount(program);
  registerUmount(program);
}

/**
 * The cache when --cache-size is not given. Local: the server's peak memory follows the
 * cache, and 24M read as fast as 32M (native-notes/fuse.md, "Memory of the mount server").
 * ssh://: half the cache is the read-ahead window over the connection, so it keeps 32M.
 */
const DEFAULT_CACHE = { local: '24M', remote: '32M' } as const;

function cacheBytes(opts: MountCliOpts, remote: boolean): number {
  return opts.cacheSize ?? sizeArg(remote ? DEFAULT_CACHE.remote : DEFAULT_CACHE.local);
}

function registerMount(program: Command): void {
  program
    .command('mount')
    .description('mount every generation as a read-only file: MOUNTPOINT/NAME/<time>-<id>.img, and NAME/latest')
    .argument('<mountpoint>', 'empty directory to mount on')
    .option('--foreground', 'stay attached and serve until unmounted or signalled (for systemd)')
    .option('--allow-other', 'let users other than the one mounting read the files (needs user_allow_other in /etc/fuse.conf for non-root)')
    .addOption(
      sizeOption(
        '--cache-size <size>',
        `memory for decoded chunks shared by all open files (default ${DEFAULT_CACHE.local}; the server needs ~170 MiB more, see native-notes/fuse.md); of an ssh:// repository, for the blocks received (default ${DEFAULT_CACHE.remote})`,
      ),
    )
    .option('--log <file>', 'where the background server logs read errors (default: mount.log in /run/genvault, or the user\'s run directory)')
    .addHelpText(
      'after',
      '\nRestore recipes:\n' +
        '  full disk:   dd if=MNT/vm1/latest of=/dev/vg0/vm1 bs=4M\n' +
        '  a file:      losetup -r -P -f --show MNT/vm1/latest   # -> /dev/loopN\n' +
        '               mount -o ro /dev/loopNp1 /mnt/restore; cp /mnt/restore/etc/fstab /tmp/\n' +
        '               umount /mnt/restore; losetup -d /dev/loopN\n' +
        'An ssh:// repository (-r ssh://user@host/path) is read over one connection kept open while\n' +
        'mounted (see native-notes/remote.md); a lost connection makes reads fail with EIO.\n' +
        'Unmount with: genvault umount MNT',
    )
    .action(
      action(async (mountpoint: string, opts: MountCliOpts, cmd: Command) => {
        const url = remoteRepo(cmd);
        const repoDir = url ?? path.resolve(await localRepoDir(cmd));
        const mnt = path.resolve(mountpoint);
        if (await isStaleMount(mnt)) {
          process.stderr.write(`genvault: ${mnt} is a stale mount left by a dead process; clearing it\n`);
          await fusermountUnmount(mnt, true).catch(() => undefined);
        } else if (await isMounted(mnt)) {
          throw new GenvaultError(`${mnt} is already a mount point`, 'BUSY');
        }
        const problem = await mountpointProblem(mnt);
        if (problem) throw new GenvaultError(`cannot mount: ${problem}`, 'MOUNT');
        // An ssh:// repository is checked by its server, which holds its key too.
        const config = url ? null : await Repository.readConfig(repoDir); // fail here, in the foreground, on a bad repository
        // An encrypted repository's key is asked for (or read) here, in the foreground, and
        // handed to the background server over its IPC channel, never in a file or argv.
        const unlocked = config?.encryption && !process.env.GENVAULT_MOUNT_CHILD ? await unlock(repoDir, config) : null;
        if (!url && process.env.GENVAULT_MOUNT_CHILD && process.send) useSecret(await secretFromParent());

        if (opts.foreground || process.env.GENVAULT_MOUNT_CHILD) {
          const notify = (m: object) => process.send?.(m);
          try {
            if (url) await serveRemote(url, remoteOptions(cmd), mnt, opts, notify);
            else await serve(repoDir, mnt, opts, notify);
          } catch (e) {
            if (process.send) {
              notify({ error: (e as Error).message });
              process.exit(1);
            }
            throw e;
          }
          return;
        }
        // Background: re-run ourselves detached, wait for "ready" over IPC, then return.
        // Not in a shared temporary directory: see src/util/rundir.ts. Even a log file the
        // admin names is not followed through a symlink.
        const runDir = await ensureRunDir();
        const logFile = opts.log ? path.resolve(opts.log) : path.join(runDir, 'mount.log');
        const log = await openLogFile(logFile);
        const args = [...process.execArgv, process.argv[1]!, '-r', repoDir, ...(url ? sshArgs(remoteOptions(cmd)) : []), 'mount', mnt, '--cache-size', String(cacheBytes(opts, !!url))];
        if (opts.allowOther) args.push('--allow-other');
        const child = spawn(process.execPath, args, {
          detached: true,
          stdio: ['ignore', log.fd, log.fd, 'ipc'],
          // Chunk buffers are allocated by worker threads and freed by the main thread; with
          // glibc's per-thread arenas that fragments and the server's RSS keeps growing.
          env: { MALLOC_ARENA_MAX: '2', ...process.env, GENVAULT_MOUNT_CHILD: '1' },
        });
        const secret = unlocked?.secret;
        const msg = await new Promise<{ ready?: boolean; error?: string; pid?: number }>((resolve) => {
          const onMessage = (m: { ready?: boolean; error?: string; needSecret?: boolean }) => {
            if (!m.needSecret) return resolve(m);
            child.send({ secret: secret ? { bytes: secret.bytes.toString('base64'), kind: secret.kind, from: secret.from } : null });
            child.once('message', onMessage);
          };
          child.once('message', onMessage);
          child.once('exit', (code) => resolve({ error: `mount process exited with code ${code} (see ${logFile})` }));
        });
        await log.close();
        if (msg.error) throw new GenvaultError(msg.error.startsWith('cannot mount') ? msg.error : `cannot mount ${mnt}: ${msg.error}`, 'MOUNT');
        child.disconnect();
        child.unref();
        process.stdout.write(`mounted ${repoDir} on ${mnt} (pid ${msg.pid}); unmount with: genvault umount ${mnt}\n`);
      }),
    );
}

function registerUmount(program: Command): void {
  program
    .command('umount')
    .alias('unmount')
    .description('unmount a genvault mount and stop its server process')
    .argument('<mountpoint>')
    .option('--lazy', 'detach now even if files are open (fusermount -uz)')
    .action(
      action(async (mountpoint: string, opts: { lazy?: boolean }) => {
        const mnt = path.resolve(mountpoint);
        if (!(await isMounted(mnt))) {
          if (await isStaleMount(mnt)) {
            await fusermountUnmount(mnt, true);
            process.stdout.write(`cleared stale mount ${mnt}\n`);
            return;
          }
          throw new GenvaultError(`${mnt} is not mounted`, 'NOT_MOUNTED');
        }
        try {
          await fusermountUnmount(mnt, opts.lazy === true);
        } catch (e) {
          const err = (e as { stderr?: string }).stderr ?? (e as Error).message;
          if (/busy/i.test(err)) throw new GenvaultError(`${mnt} is busy (files or loop devices still open); close them or use --lazy`, 'BUSY');
          throw new GenvaultError(`cannot unmount ${mnt}: ${err.trim()}`, 'UMOUNT');
        }
        // The server notices within a second and exits; wait so scripts can rely on it.
        const pidText = await ensureRunDir()
          .then((dir) => readRunFile(dir, pidFileName(mnt)))
          .catch(() => null);
        const pid = pidText ? Number(pidText) : 0;
        for (let i = 0; pid && i < 100; i++) {
          try {
            process.kill(pid, 0);
          } catch {
            break;
          }
          await new Promise((r) => setTimeout(r, 100));
        }
        process.stdout.write(`unmounted ${mnt}\n`);
      }),
    );
}

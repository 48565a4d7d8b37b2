/**
 * Serve a repository as a read-only FUSE filesystem (fuse-native, libfuse 2).
 *
 * Every handler runs on the event loop and uses only async work: LevelDB through
 * rave-level, chunk loading in worker threads. A sync call here would deadlock as soon
 * as it touched the mount. fuse-native's per-operation timeout is disabled so a slow
 * read (cold disk, busy machine) is never turned into EIO mid-`dd`.
 */
import Fuse from 'fuse-native';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import fs from 'node:fs/promises';
import { watch as fsWatch, type FSWatcher } from 'node:fs';
import path from 'node:path';
import v8 from 'node:v8';
import { runInNewContext } from 'node:vm';
import { Generation } from '../repo/generation.js';
import { ChunkLoader, ImageReader } from '../repo/reader.js';
import { liveWriters, Pin } from '../repo/locks.js';
import { Repository } from '../repo/repository.js';
import { Tree } from './tree.js';
import { setProcessNice } from '../util/sched.js';

const run = promisify(execFile);

export interface MountOptions {
  allowOther?: boolean;
  /** Bytes of decoded chunks kept in memory across all open files. */
  cacheBytes?: number;
  /** How far ahead sequential readers are prefetched. */
  readahead?: number;
  /** How often the generation list is re-read from the index (ms). */
  refreshMs?: number;
  log?: (line: string) => void;
  /** Drop to the lowest CPU priority while backups or gc run (default true). */
  yieldToWriters?: boolean;
}

/** Nice value of the mount server while writers run (autogroup weight 15 against 1024). */
const YIELD_NICE = 19;

export interface MountHandle {
  readonly mountpoint: string;
  unmount(): Promise<void>;
  /** Resolves when the mount went away (unmounted by us or by fusermount). */
  readonly closed: Promise<void>;
}

/** Is the path a FUSE mount left behind by a dead process (ENOTCONN)? */
export async function isStaleMount(mnt: string): Promise<boolean> {
  try {
    await fs.stat(mnt);
    return false;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'ENOTCONN';
  }
}

export async function isMounted(mnt: string): Promise<boolean> {
  const info = await fs.readFile('/proc/self/mountinfo', 'utf8');
  return info.split('\n').some((l) => l.split(' ')[4] === mnt);
}

export async function fusermountUnmount(mnt: string, lazy: boolean): Promise<void> {
  await run('fusermount', [lazy ? '-uz' : '-u', mnt]);
}

/** The V8 garbage collector as a function, without --expose-gc on the command line. */
function exposeGc(): (() => void) | null {
  try {
    v8.setFlagsFromString('--expose-gc');
    return runInNewContext('gc') as () => void;
  } catch {
    return null;
  }
}

const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFLNK = 0o120000;

// max-lines waiver: to be split into named steps (the house issue); the FUSE operations, pins, priority and memory handling are closures over one mount's state
export async function mountRepository(repo: Repository, mountpoint: string, opts: MountOptions = {}): Promise<MountHandle> {
  const log = opts.log ?? ((l: string) => process.stderr.write(l + '\n'));
  const loader = new ChunkLoader(repo, opts.cacheBytes ?? 256 << 20, true);
  loader.damageBy = 'mount';
  let tree = new Tree(await repo.generations());
  const readers = new Map<string, Promise<ImageReader>>();
  const handles = new Map<number, { gen: Generation; reader: Promise<ImageReader>; ready?: ImageReader }>();
  // One pin per generation with open files: forget/prune/gc keep its data until closed.
  const pins = new Map<string, { count: number; pin: Promise<Pin | null> }>();
  const pinOpen = (id: string) => {
    const p = pins.get(id);
    if (p) p.count++;
    else pins.set(id, { count: 1, pin: Pin.take(repo.dir, id).catch(() => null) });
  };
  const pinClose = (id: string) => {
    const p = pins.get(id);
    if (!p || --p.count > 0) return;
    pins.delete(id);
    void p.pin.then((x) => x?.release());
  };
  let nextFd = 10;

  // While backups or gc run, serve reads at the lowest CPU priority: they keep working,
  // but a backup keeps most of its speed (issue: mounted repositories must not slow them).
  let yielding = false;
  const refresh = async () => {
    try {
      tree = new Tree(await repo.generations());
    } catch (e) {
      log(`genvault mount: refreshing the generation list failed: ${(e as Error).message}`);
    }
    await checkWriters();
  };
  const checkWriters = async () => {
    if (opts.yieldToWriters === false) return;
    const busy = (await liveWriters(repo.dir).catch(() => [])).length > 0;
    if (busy !== yielding && (await setProcessNice(busy ? YIELD_NICE : 0))) yielding = busy;
  };
  const timer = setInterval(() => void refresh(), opts.refreshMs ?? 1000);
  timer.unref();
  // A backup registers in locks/: react at once rather than at the next refresh.
  let lockWatch: FSWatcher | null = null;
  try {
    lockWatch = fsWatch(path.join(repo.dir, 'locks'), { persistent: false }, (_ev, f) => {
      if (f && String(f).startsWith('writer-')) void checkWriters();
    });
    lockWatch.on('error', () => lockWatch?.close());
  } catch {
    /* no inotify: the refresh timer notices writers within a second */
  }

  // Decoded chunks arrive as buffers from the workers; V8 frees the dropped ones only when
  // it collects, and with a tiny JS heap it rarely does. Collect when buffer memory runs
  // past the cache budget: the heap is small, so a collection takes milliseconds.
  const collect = exposeGc();
  const budget = (opts.cacheBytes ?? 256 << 20) + (64 << 20);
  const gcTimer = setInterval(() => {
    if (collect && process.memoryUsage().arrayBuffers > budget) collect();
  }, 250);
  gcTimer.unref();

  const uid = process.getuid?.() ?? 0;
  const gid = process.getgid?.() ?? 0;
  const stat = (mode: number, size: number, mtime: Date, nlink = 1) => ({
    mtime, atime: mtime, ctime: mtime, size, mode, uid, gid, nlink, blocks: Math.ceil(size / 512), blksize: 4096,
  });

  const ops = {
    readdir(p: string, cb: (err: number, names?: string[]) => void) {
      const n = tree.lookup(p);
      if (!n) return cb(Fuse.ENOENT);
      if (n.kind === 'root') return cb(0, n.names);
      if (n.kind === 'image') return cb(0, n.files);
      return cb(Fuse.ENOTDIR);
    },
    getattr(p: string, cb: (err: number, st?: unknown) => void) {
      const n = tree.lookup(p);
      if (!n) return cb(Fuse.ENOENT);
      switch (n.kind) {
        case 'root':
          return cb(0, stat(S_IFDIR | 0o555, 4096, tree.created, 2 + n.names.length));
        case 'image':
          return cb(0, stat(S_IFDIR | 0o555, 4096, n.mtime, 2));
        case 'link':
          return cb(0, stat(S_IFLNK | 0o777, n.target.length, n.mtime));
        case 'file':
          return cb(0, stat(S_IFREG | 0o444, n.gen.size, new Date(n.gen.created)));
      }
    },
    readlink(p: string, cb: (err: number, target?: string) => void) {
      const n = tree.lookup(p);
      if (!n) return cb(Fuse.ENOENT);
      if (n.kind !== 'link') return cb(Fuse.EINVAL);
      return cb(0, n.target);
    },
    open(p: string, flags: number, cb: (err: number, fd?: number) => void) {
      const n = tree.lookup(p);
      if (!n) return cb(Fuse.ENOENT);
      if (n.kind !== 'file') return cb(Fuse.EISDIR);
      if ((flags & 3) !== 0) return cb(Fuse.EROFS);
      const gen = n.gen;
      let reader = readers.get(gen.id);
      if (!reader) {
        reader = ImageReader.open(repo, gen, loader, opts.readahead ?? 32 << 20);
        readers.set(gen.id, reader);
        reader.catch(() => readers.delete(gen.id));
      }
      const fd = nextFd++;
      const h: { gen: Generation; reader: Promise<ImageReader>; ready?: ImageReader } = { gen, reader };
      handles.set(fd, h);
      pinOpen(gen.id);
      reader.then((r) => (h.ready = r), () => undefined);
      // Each open gets its own reader state for read-ahead; the decoded-chunk cache is shared.
      reader.then(
        () => cb(0, fd),
        (e: Error) => {
          handles.delete(fd);
          pinClose(gen.id);
          log(`genvault mount: cannot open ${gen.name}@${gen.id}: ${e.message}`);
          cb(Fuse.EIO);
        },
      );
    },
    release(_p: string, fd: number, cb: (err: number) => void) {
      const h = handles.get(fd);
      handles.delete(fd);
      if (h) pinClose(h.gen.id);
      cb(0);
    },
    read(_p: string, fd: number, buf: Buffer, len: number, pos: number, cb: (n: number) => void) {
      const h = handles.get(fd);
      if (!h) return cb(Fuse.EBADF);
      if (h.ready) {
        const n = h.ready.tryRead(buf, pos, len);
        if (n !== null) return cb(n);
      }
      h.reader
        .then((r) => r.read(buf, pos, len))
        .then(
          (n) => cb(n),
          (e: Error) => {
            log(`genvault mount: EIO reading ${h.gen.name}@${h.gen.id} at offset ${pos}: ${e.message}`);
            cb(Fuse.EIO);
          },
        );
    },
    statfs(_p: string, cb: (err: number, st?: unknown) => void) {
      cb(0, { bsize: 4096, frsize: 4096, blocks: 0, bfree: 0, bavail: 0, files: 0, ffree: 0, favail: 0, fsid: 0, flag: 1, namemax: 255 });
    },
  };

  const fuse = new Fuse(mountpoint, ops, {
    force: true,
    mkdir: false,
    timeout: false,
    kernelCache: true, // generations are immutable: let the page cache keep what was read
    allowOther: opts.allowOther === true,
    defaultPermissions: true,
    fsname: `genvault:${repo.dir}`,
    subtype: 'genvault',
    attrTimeout: 1,
    entryTimeout: 1,
  });
  await new Promise<void>((resolve, reject) => fuse.mount((err: Error | null) => (err ? reject(err) : resolve())));

  let closedResolve!: () => void;
  const closed = new Promise<void>((r) => (closedResolve = r));
  let unmounting = false;
  // Notice an unmount done from outside (fusermount -u): the FUSE loop ends but Node would not.
  const watch = setInterval(() => {
    isMounted(mountpoint).then(
      (m) => {
        if (!m && !unmounting) {
          clearInterval(watch);
          clearInterval(timer);
          closedResolve();
        }
      },
      () => undefined,
    );
  }, 1000);
  watch.unref();

  return {
    mountpoint,
    closed,
    async unmount() {
      unmounting = true;
      lockWatch?.close();
      clearInterval(timer);
      clearInterval(gcTimer);
      clearInterval(watch);
      await new Promise<void>((resolve) => fuse.unmount(() => resolve()));
      for (const p of pins.values()) await p.pin.then((x) => x?.release());
      pins.clear();
      closedResolve();
    },
  };
}

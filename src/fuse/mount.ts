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
import { exposeGc } from '../util/heap.js';
import { Generation } from '../format/generation.js';
import { ChunkLoader, ImageReader } from '../read/reader.js';
import { liveWriters, Pin } from '../repository/locks.js';
import { Repository } from '../repository/repository.js';
import { Tree } from './tree.js';
import { testPause } from '../util/testhooks.js';
import { GenvaultError } from '../util/errors.js';
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

/**
 * A generation opened for reading through the mount: the local repository's ImageReader,
 * or a remote repository's reader (src/remote/mount-backend.ts).
 */
export interface MountImage {
  /**
   * The fast path: the byte count if the bytes are in memory right now (copied
   * synchronously), else null and the caller uses read().
   */
  tryRead(out: Buffer, offset: number, length: number): number | null;
  /** Up to `length` bytes at `offset` into `out`; short only at the end of the image. */
  read(out: Buffer, offset: number, length: number): Promise<number>;
}

/**
 * Where a mount's generations come from: the local repository (localBackend below) or a
 * repository served over SSH (src/remote/mount-backend.ts, a layer above).
 */
export interface MountBackend {
  /** What /proc/mounts shows as the source (`genvault:` + this). */
  readonly source: string;
  /** The generation list, re-read every refreshMs. */
  generations(): Promise<Generation[]>;
  /**
   * Open a generation for one more file handle: it stays readable (pinned) until
   * release() is called once for this open. A rejected open holds nothing.
   */
  open(gen: Generation): Promise<MountImage>;
  release(gen: Generation): void;
  /** Called after each refresh of the generation list (the local backend checks for writers). */
  refreshed?(): Promise<void>;
  /** Background work while mounted (started once the tree is read). */
  start?(): void;
  /** Unmounted: stop background work, release every pin. */
  stop(): Promise<void>;
  /** Whether the mount logs this failed read (false: the backend already said why). */
  logsReadError?(e: Error): boolean;
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

/** The fields of /proc/self/mountinfo's line for the mount at `mnt` (undefined: not mounted). */
async function mountInfo(mnt: string): Promise<string[] | undefined> {
  const info = await fs.readFile('/proc/self/mountinfo', 'utf8');
  return info.split('\n').map((l) => l.split(' ')).find((f) => f[4] === mnt);
}

export async function isMounted(mnt: string): Promise<boolean> {
  return (await mountInfo(mnt)) !== undefined;
}

/**
 * How far the kernel reads ahead in a mounted image file (its default for FUSE: 128 KiB).
 * No more than the kernel's FUSE queue takes at once: a window is sent as 128 KiB requests,
 * and once 9 are queued (FUSE's congestion threshold, 12 in flight at most) the kernel drops
 * the rest of an asynchronous window, whose page-cache pages it had already allocated. A
 * 4 MiB window so allocated and freed more pages than the image holds during a `dd`
 * (native-notes/fuse.md, "Kernel read-ahead").
 */
const KERNEL_READAHEAD_KB = 1024;

/**
 * Let the kernel read further ahead in the mount's files than its 128 KiB default (the
 * backing device of a FUSE mount is named by the mount's device number in /sys/class/bdi).
 * A loop-mounted file system hopping between nearby files then finds more of them in the
 * page cache; random reads are not read ahead either way (native-notes/fuse.md). Only
 * root may write there: for anyone else the default stays, which works, slower. (Also
 * scripts/fuse-ref's, so that its zero-cost file reads as the mount does.)
 */
export async function raiseKernelReadahead(mnt: string, kb = KERNEL_READAHEAD_KB): Promise<void> {
  // The kernel lowers the read-ahead to what the INIT reply allows (128 KiB) when that reply
  // arrives, and fuse-native calls back on INIT before libfuse has sent it: a write made
  // first was undone. A request to the mount waits for INIT, so one stat orders the two.
  // (Async: this process serves the stat.)
  await fs.stat(mnt).catch(() => undefined);
  const dev = (await mountInfo(mnt).catch(() => undefined))?.[2];
  if (!dev || !/^\d+:\d+$/.test(dev)) return;
  await fs.writeFile(`/sys/class/bdi/${dev}/read_ahead_kb`, `${kb}\n`).catch(() => undefined);
}

/**
 * Why FUSE would refuse to mount on `mnt`, in words, or null if it should work. libfuse
 * itself says only "fuse failed" (and prints its reason on stderr, which the background
 * server sends to its log), so the usual causes are checked first.
 */
export async function mountpointProblem(mnt: string, device = '/dev/fuse'): Promise<string | null> {
  const st = await fs.stat(mnt).catch((e: NodeJS.ErrnoException) => e);
  if (st instanceof Error) {
    if (st.code === 'ENOENT') return `${mnt} does not exist (create an empty directory: mkdir -p ${mnt})`;
    if (st.code === 'EACCES') return `${mnt}: permission denied`;
    return `${mnt}: ${st.message}`;
  }
  if (!st.isDirectory()) return `${mnt} is not a directory (FUSE mounts on an empty directory)`;
  const entries = await fs.readdir(mnt).catch(() => []);
  if (entries.length) {
    const shown = entries.slice(0, 3).join(', ');
    return `${mnt} is not empty (${entries.length} entr${entries.length === 1 ? 'y' : 'ies'}: ${shown}${entries.length > 3 ? ', ...' : ''}); mount on an empty directory`;
  }
  const dev = await fs.stat(device).catch((e: NodeJS.ErrnoException) => e);
  if (dev instanceof Error) {
    if (dev.code === 'ENOENT') return `${device} does not exist: FUSE is not available here (load the module: modprobe fuse; in a container, pass the device in)`;
    return `${device}: ${dev.message}`;
  }
  if (!dev.isCharacterDevice()) return `${device} is not a character device: FUSE is not available here`;
  const open = await fs.open(device, 'r+').catch((e: NodeJS.ErrnoException) => e);
  if (open instanceof Error) return `cannot open ${device}: ${open.code === 'EACCES' || open.code === 'EPERM' ? 'permission denied' : open.message}`;
  await open.close();
  return null;
}

export async function fusermountUnmount(mnt: string, lazy: boolean): Promise<void> {
  await run('fusermount', [lazy ? '-uz' : '-u', mnt]);
}

const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFLNK = 0o120000;

/** An open file: its generation, its image reader, and the reader once it has opened. */
interface OpenFile {
  gen: Generation;
  reader: Promise<MountImage>;
  ready?: MountImage;
}

/** One mount's state, shared by its FUSE operations and its background timers. */
interface MountState {
  readonly backend: MountBackend;
  readonly opts: MountOptions;
  readonly log: (line: string) => void;
  tree: Tree;
  readonly handles: Map<number, OpenFile>;
  nextFd: number;
}

/** The timers running while the mount is up. */
interface MountBackground {
  timer: NodeJS.Timeout;
  gcTimer: NodeJS.Timeout;
}

// -- the local repository ---------------------------------------------------------------

/** The local repository's state behind a mount. */
interface LocalState {
  readonly repo: Repository;
  readonly opts: MountOptions;
  readonly loader: ChunkLoader;
  readonly readers: Map<string, Promise<ImageReader>>;
  // One pin per generation with open files: forget/prune/gc keep its data until closed.
  readonly pins: Map<string, { count: number; pin: Promise<Pin | null> }>;
  yielding: boolean;
  lockWatch: FSWatcher | null;
}

function pinOpen(s: LocalState, id: string): void {
  const p = s.pins.get(id);
  if (p) p.count++;
  else s.pins.set(id, { count: 1, pin: Pin.take(s.repo.dir, id).catch(() => null) });
}

function pinClose(s: LocalState, id: string): void {
  const p = s.pins.get(id);
  if (!p || --p.count > 0) return;
  s.pins.delete(id);
  void p.pin.then((x) => x?.release());
}

// While backups or gc run, serve reads at the lowest CPU priority: they keep working,
// but a backup keeps most of its speed (issue: mounted repositories must not slow them).
async function checkWriters(s: LocalState): Promise<void> {
  if (s.opts.yieldToWriters === false) return;
  const busy = (await liveWriters(s.repo.dir).catch(() => [])).length > 0;
  if (busy !== s.yielding && (await setProcessNice(busy ? YIELD_NICE : 0))) s.yielding = busy;
}

/** A generation's file opened: a shared reader per generation, and a pin. */
function openLocal(s: LocalState, gen: Generation): Promise<ImageReader> {
  let reader = s.readers.get(gen.id);
  if (!reader) {
    reader = ImageReader.open(s.repo, gen, s.loader, s.opts.readahead ?? 32 << 20);
    s.readers.set(gen.id, reader);
    reader.catch(() => s.readers.delete(gen.id));
  }
  pinOpen(s, gen.id);
  // Each open gets its own reader state for read-ahead; the decoded-chunk cache is shared.
  return reader.catch((e: unknown) => {
    pinClose(s, gen.id);
    throw e;
  });
}

/** The mount's backend for a repository on this machine. */
export function localBackend(repo: Repository, opts: MountOptions = {}): MountBackend {
  const loader = new ChunkLoader(repo, opts.cacheBytes ?? 256 << 20, true);
  loader.damageBy = 'mount';
  const s: LocalState = { repo, opts, loader, readers: new Map(), pins: new Map(), yielding: false, lockWatch: null };
  return {
    source: repo.dir,
    generations: () => repo.generations(),
    open: (gen) => openLocal(s, gen),
    release: (gen) => pinClose(s, gen.id),
    refreshed: () => checkWriters(s),
    start() {
      // A backup registers in locks/: react at once rather than at the next refresh.
      try {
        const w = fsWatch(path.join(repo.dir, 'locks'), { persistent: false }, (_ev, f) => {
          if (f && String(f).startsWith('writer-')) void checkWriters(s);
        });
        w.on('error', () => w.close());
        s.lockWatch = w;
      } catch {
        /* no inotify: the refresh timer notices writers within a second */
      }
    },
    async stop() {
      s.lockWatch?.close();
      for (const p of s.pins.values()) await p.pin.then((x) => x?.release());
      s.pins.clear();
    },
  };
}

// -- the mount, over any backend --------------------------------------------------------

async function refresh(s: MountState): Promise<void> {
  try {
    s.tree = new Tree(await s.backend.generations());
  } catch (e) {
    s.log(`genvault mount: refreshing the generation list failed: ${(e as Error).message}`);
  }
  await s.backend.refreshed?.();
}

/** The JS heap a mount may use before it collects on its own account (see startBackground). */
const HEAP_SLACK = 24 << 20;

/** Start the generation refresh, the backend's own background work and the buffer memory collection. */
function startBackground(s: MountState): MountBackground {
  const { opts } = s;
  const timer = setInterval(() => void refresh(s), opts.refreshMs ?? 1000);
  timer.unref();
  s.backend.start?.();

  // Decoded chunks arrive as buffers from the workers; V8 frees the dropped ones only when
  // it collects, and with a tiny JS heap it rarely does. Collect when buffer memory runs
  // past the cache budget: the heap is small, so a collection takes milliseconds. Likewise
  // when the JS heap has grown by a fifth since the last collection (and past HEAP_SLACK):
  // V8 let a long read's garbage grow the heap to twice what was live (native-notes/
  // performance.md, "The mount server's memory bounded").
  const collect = exposeGc();
  const budget = (opts.cacheBytes ?? 256 << 20) + (64 << 20);
  let heapAfter = 0;
  const gcTimer = setInterval(() => {
    if (!collect) return;
    const m = process.memoryUsage();
    if (m.arrayBuffers <= budget && m.heapUsed <= Math.max(HEAP_SLACK, heapAfter * 1.2)) return;
    collect();
    heapAfter = process.memoryUsage().heapUsed;
  }, 250);
  gcTimer.unref();
  return { timer, gcTimer };
}

/** The FUSE `open` of a generation's image file: the backend opens (and pins) it, a new fd. */
function openFile(s: MountState, gen: Generation, cb: (err: number, fd?: number) => void): void {
  const { handles, log } = s;
  const reader = s.backend.open(gen);
  const fd = s.nextFd++;
  const h: OpenFile = { gen, reader };
  handles.set(fd, h);
  reader.then((r) => (h.ready = r), () => undefined);
  reader.then(
    () => cb(0, fd),
    (e: Error) => {
      handles.delete(fd);
      if (s.backend.logsReadError?.(e) !== false) log(`genvault mount: cannot open ${gen.name}@${gen.id}: ${e.message}`);
      cb(Fuse.EIO);
    },
  );
}

/** The FUSE operations of one mount, closures over its state. */
function buildOps(s: MountState) {
  const { handles, log } = s;
  const uid = process.getuid?.() ?? 0;
  const gid = process.getgid?.() ?? 0;
  const stat = (mode: number, size: number, mtime: Date, nlink = 1) => ({
    mtime, atime: mtime, ctime: mtime, size, mode, uid, gid, nlink, blocks: Math.ceil(size / 512), blksize: 4096,
  });

  return {
    // Only a test hook: hold libfuse's INIT reply (test/mount.test.ts, kernel read-ahead).
    init(cb: (err: number) => void) {
      testPause('mount', 'init', 'init').then(() => cb(0), () => cb(0));
    },
    readdir(p: string, cb: (err: number, names?: string[]) => void) {
      const n = s.tree.lookup(p);
      if (!n) return cb(Fuse.ENOENT);
      if (n.kind === 'root') return cb(0, n.names);
      if (n.kind === 'image') return cb(0, n.files);
      return cb(Fuse.ENOTDIR);
    },
    getattr(p: string, cb: (err: number, st?: unknown) => void) {
      const tree = s.tree;
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
      const n = s.tree.lookup(p);
      if (!n) return cb(Fuse.ENOENT);
      if (n.kind !== 'link') return cb(Fuse.EINVAL);
      return cb(0, n.target);
    },
    open(p: string, flags: number, cb: (err: number, fd?: number) => void) {
      const n = s.tree.lookup(p);
      if (!n) return cb(Fuse.ENOENT);
      if (n.kind !== 'file') return cb(Fuse.EISDIR);
      if ((flags & 3) !== 0) return cb(Fuse.EROFS);
      openFile(s, n.gen, cb);
    },
    release(_p: string, fd: number, cb: (err: number) => void) {
      const h = handles.get(fd);
      handles.delete(fd);
      if (h) s.backend.release(h.gen);
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
            if (s.backend.logsReadError?.(e) !== false) log(`genvault mount: EIO reading ${h.gen.name}@${h.gen.id} at offset ${pos}: ${e.message}`);
            cb(Fuse.EIO);
          },
        );
    },
    statfs(_p: string, cb: (err: number, st?: unknown) => void) {
      cb(0, { bsize: 4096, frsize: 4096, blocks: 0, bfree: 0, bavail: 0, files: 0, ffree: 0, favail: 0, fsid: 0, flag: 1, namemax: 255 });
    },
  };
}

/** The handle of a mounted filesystem: unmount, and notice an unmount done from outside. */
function mountHandle(s: MountState, fuse: Fuse, mountpoint: string, bg: MountBackground): MountHandle {
  const { timer, gcTimer } = bg;
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
          clearInterval(gcTimer);
          void s.backend.stop().catch(() => undefined).then(closedResolve);
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
      clearInterval(timer);
      clearInterval(gcTimer);
      clearInterval(watch);
      await new Promise<void>((resolve) => fuse.unmount(() => resolve()));
      await s.backend.stop();
      closedResolve();
    },
  };
}

/** Mount a repository on this machine (see mountBackend). */
export function mountRepository(repo: Repository, mountpoint: string, opts: MountOptions = {}): Promise<MountHandle> {
  return mountBackend(localBackend(repo, opts), mountpoint, opts);
}

/** Serve a backend's generations on `mountpoint`, until unmounted (by us or from outside). */
export async function mountBackend(backend: MountBackend, mountpoint: string, opts: MountOptions = {}): Promise<MountHandle> {
  const log = opts.log ?? ((l: string) => process.stderr.write(l + '\n'));
  const s: MountState = {
    backend,
    opts,
    log,
    tree: new Tree(await backend.generations()),
    handles: new Map(),
    nextFd: 10,
  };
  const bg = startBackground(s);

  const fuse = new Fuse(mountpoint, buildOps(s), {
    force: true,
    mkdir: false,
    timeout: false,
    kernelCache: true, // generations are immutable: let the page cache keep what was read
    allowOther: opts.allowOther === true,
    defaultPermissions: true,
    fsname: `genvault:${backend.source}`,
    subtype: 'genvault',
    attrTimeout: 1,
    entryTimeout: 1,
  });
  try {
    await new Promise<void>((resolve, reject) => fuse.mount((err: Error | null) => (err ? reject(err) : resolve())));
  } catch (e) {
    clearInterval(bg.timer);
    clearInterval(bg.gcTimer);
    await backend.stop();
    // libfuse's own reason went to stderr; name what we can check, else say where to look.
    const why = (await mountpointProblem(mountpoint)) ?? `FUSE refused (${(e as Error).message}; libfuse's reason is on stderr or in the mount log)`;
    throw new GenvaultError(`cannot mount ${mountpoint}: ${why}`, 'MOUNT');
  }
  await raiseKernelReadahead(mountpoint);
  return mountHandle(s, fuse, mountpoint, bg);
}

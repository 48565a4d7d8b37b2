/**
 * The local store: objects are files under a directory, named by their object names
 * (contract in store.ts). Directories are created 0750 and packs 0640, less what the
 * umask the repository set takes away (0700/0600, or 2750/0640 with a group: perms.ts).
 */
import fs from 'node:fs/promises';
import fsSync, { constants as fsConstants } from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { alignSkipper } from '../util/holes.js';
import { Appender, ObjectInfo, PutOptions, Store, StoreSpec, SyncReader, checkName } from './store.js';

const DIR_MODE = 0o750;
const FILE_MODE = 0o640;
/**
 * Read descriptors kept open; the oldest are closed past this. A file another process
 * deletes keeps its blocks until its descriptor here is closed: bounded, and dropped on
 * close(); this process's own deletes drop theirs at once.
 */
const FD_CACHE = 64;

interface CachedFd {
  fh: Promise<fs.FileHandle>;
  users: number;
  dropped: boolean;
}

function closeWhenIdle(e: CachedFd): void {
  if (e.users === 0) e.fh.then((fh) => fh.close()).catch(() => undefined);
}

export class LocalStore implements Store {
  readonly spec: StoreSpec;
  readonly sealsOnSync: boolean = false;
  private fds = new Map<string, CachedFd>();

  constructor(readonly dir: string) {
    this.dir = path.resolve(dir);
    this.spec = { kind: 'local', dir: this.dir };
  }

  /** Create the store's own directories in an existing repository directory. */
  static async init(dir: string, dirMode: number): Promise<LocalStore> {
    const store = new LocalStore(dir);
    await fs.mkdir(path.join(store.dir, 'packs'), { mode: dirMode & 0o777 });
    return store;
  }

  /** The file of an object (the name checked). */
  path(name: string): string {
    return path.join(this.dir, checkName(name));
  }

  describe(name: string): string {
    return this.path(name);
  }

  async get(name: string): Promise<Buffer> {
    return fs.readFile(this.path(name));
  }

  /** tmp file, fsync, rename (link when exclusive), fsync of the directory. */
  async put(name: string, data: Buffer | string, opts: PutOptions = {}): Promise<void> {
    const file = this.path(name);
    const dir = path.dirname(file);
    await fs.mkdir(dir, { recursive: true, mode: DIR_MODE });
    // Unique: concurrent puts of one name must not share a temporary.
    const tmp = `${file}.${randomBytes(6).toString('hex')}.tmp`;
    try {
      const fh = await fs.open(tmp, 'wx', opts.mode ?? FILE_MODE);
      try {
        if (opts.mode !== undefined) await fh.chmod(opts.mode); // the mode asked for, whatever the umask
        await fh.writeFile(data);
        await fh.sync();
      } finally {
        await fh.close();
      }
      if (opts.exclusive) await fs.link(tmp, file);
      else await fs.rename(tmp, file);
    } finally {
      await fs.rm(tmp, { force: true });
    }
    this.drop(name);
    await syncDir(dir);
  }

  async create(name: string): Promise<Appender> {
    return LocalAppender.open(name, this.path(name));
  }

  async read(name: string, buf: Uint8Array, bufOffset: number, length: number, position: number): Promise<number> {
    const e = this.fdFor(name);
    e.users++;
    try {
      const fh = await e.fh;
      let got = 0;
      while (got < length) {
        const { bytesRead } = await fh.read(buf, bufOffset + got, length - got, position + got);
        if (bytesRead === 0) break;
        got += bytesRead;
      }
      return got;
    } finally {
      e.users--;
      if (e.dropped) closeWhenIdle(e);
    }
  }

  /** A cached read descriptor; a failed open is not cached. */
  private fdFor(name: string): CachedFd {
    let e = this.fds.get(name);
    if (e) {
      this.fds.delete(name); // most recently used last
      this.fds.set(name, e);
      return e;
    }
    const fresh: CachedFd = { fh: fs.open(this.path(name), 'r'), users: 0, dropped: false };
    fresh.fh.catch(() => {
      fresh.dropped = true;
      if (this.fds.get(name) === fresh) this.fds.delete(name);
    });
    this.fds.set(name, fresh);
    for (const [k, old] of this.fds) {
      if (this.fds.size <= FD_CACHE) break;
      this.fds.delete(k);
      old.dropped = true;
      closeWhenIdle(old);
    }
    return fresh;
  }

  /** Forget a cached descriptor (the object is deleted or replaced): its space is freed now. */
  private drop(name: string): void {
    const e = this.fds.get(name);
    if (!e) return;
    this.fds.delete(name);
    e.dropped = true;
    closeWhenIdle(e);
  }

  async stat(name: string): Promise<{ size: number } | null> {
    try {
      return { size: (await fs.stat(this.path(name))).size };
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'ENOENT' || code === 'ENOTDIR') return null;
      throw e;
    }
  }

  async *list(prefix: string): AsyncIterable<ObjectInfo> {
    yield* this.walk(checkName(prefix));
  }

  /** Plain files below a folder; temporaries of put() and names that fail checkName are left out. */
  private async *walk(folder: string): AsyncIterable<ObjectInfo> {
    let entries: fsSync.Dirent[];
    try {
      entries = await fs.readdir(path.join(this.dir, folder), { withFileTypes: true });
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'ENOENT' || code === 'ENOTDIR') return;
      throw e;
    }
    for (const d of entries) {
      const name = `${folder}/${d.name}`;
      try {
        checkName(name);
      } catch {
        continue;
      }
      if (d.isDirectory()) yield* this.walk(name);
      else if (d.isFile() && !d.name.endsWith('.tmp')) {
        const st = await fs.stat(this.path(name)).catch((e: NodeJS.ErrnoException) => (e.code === 'ENOENT' ? null : Promise.reject(e)));
        if (st?.isFile()) yield { name, size: st.size, modified: st.mtimeMs };
      }
    }
  }

  async delete(name: string): Promise<void> {
    const file = this.path(name);
    this.drop(name);
    await fs.rm(file, { force: true });
  }

  async truncate(name: string, size: number): Promise<void> {
    await fs.truncate(this.path(name), size);
  }

  async close(): Promise<void> {
    for (const name of [...this.fds.keys()]) this.drop(name);
  }
}

/** fsync a directory so a rename in it is durable; file systems that cannot say so (EINVAL) are let be. */
async function syncDir(dir: string): Promise<void> {
  const fh = await fs.open(dir, fsConstants.O_RDONLY | fsConstants.O_DIRECTORY);
  try {
    await fh.sync().catch((e: NodeJS.ErrnoException) => {
      if (e.code !== 'EINVAL') throw e;
    });
  } finally {
    await fh.close();
  }
}

/**
 * An object being appended to (a pack being written).
 *
 * Written with O_DIRECT where the file system takes it: packs are read back only by
 * restores and the mount, so caching them while writing only cost fresh page-cache pages
 * and a copy, and evicted the host's cache (figures in native-notes/performance.md).
 * Appends are staged in an aligned buffer; full 4 KiB blocks go out as the buffer fills;
 * sync() writes the partial last block padded with zeros, cuts the file back to its size,
 * and fdatasyncs. Without the addon that aligns buffers, or where O_DIRECT is refused,
 * writes go through the page cache.
 */
const ALIGN = 4096;
const STAGE_BYTES = 4 << 20;

export class LocalAppender implements Appender {
  /** Bytes [stageStart, stageStart + staged) of the file, not yet written (O_DIRECT only). */
  private stage: Buffer | null = null;
  private stageStart = 0;
  private staged = 0;
  /** Appended since the stage was last written out. */
  private dirty = false;
  size = 0;

  private constructor(
    readonly name: string,
    readonly file: string,
    private fh: fs.FileHandle,
  ) {}

  /** Whether appends go through the O_DIRECT stage. */
  get direct(): boolean {
    return this.stage !== null;
  }

  static async open(name: string, file: string): Promise<LocalAppender> {
    await fs.mkdir(path.dirname(file), { recursive: true, mode: DIR_MODE });
    const skip = alignSkipper();
    let fh: fs.FileHandle | null = null;
    if (skip) {
      const { O_RDWR, O_CREAT, O_EXCL, O_DIRECT } = fsConstants;
      fh = await fs.open(file, O_RDWR | O_CREAT | O_EXCL | O_DIRECT, FILE_MODE).catch((e) => {
        if ((e as NodeJS.ErrnoException).code !== 'EINVAL') throw e;
        return null; // no O_DIRECT on this file system
      });
    }
    // The file may exist from the refused O_DIRECT open, which was exclusive: 'w' is safe.
    const direct = fh !== null;
    fh ??= await fs.open(file, skip ? 'w' : 'wx', FILE_MODE);
    const a = new LocalAppender(name, file, fh);
    if (direct) {
      const raw = Buffer.allocUnsafeSlow(STAGE_BYTES + ALIGN);
      const at = skip!(raw, ALIGN);
      a.stage = raw.subarray(at, at + STAGE_BYTES);
    }
    return a;
  }

  async append(data: Buffer): Promise<void> {
    if (this.stage) {
      this.dirty = true;
      for (let off = 0; off < data.length; ) {
        const n = Math.min(data.length - off, this.stage.length - this.staged);
        data.copy(this.stage, this.staged, off, off + n);
        this.staged += n;
        off += n;
        if (this.staged === this.stage.length) await this.writeBlocks();
      }
    } else {
      await this.writeAt(data, data.length, this.size);
    }
    this.size += data.length;
  }

  /** Write the staged whole blocks; the partial last block moves to the stage's front. */
  private async writeBlocks(): Promise<void> {
    const stage = this.stage!;
    const full = this.staged - (this.staged % ALIGN);
    if (full === 0) return;
    await this.writeAt(stage, full, this.stageStart);
    stage.copy(stage, 0, full, this.staged);
    this.stageStart += full;
    this.staged -= full;
  }

  private async writeAt(buf: Buffer, length: number, position: number): Promise<void> {
    let done = 0;
    while (done < length) {
      const { bytesWritten } = await this.fh.write(buf, done, length - done, position + done);
      done += bytesWritten;
    }
  }

  /** Write out everything staged (the last block padded, then the file cut to size). */
  private async writeStaged(): Promise<void> {
    if (!this.stage || !this.dirty) return;
    await this.writeBlocks();
    if (this.staged > 0) {
      this.stage.fill(0, this.staged, ALIGN);
      await this.writeAt(this.stage, ALIGN, this.stageStart);
      await this.fh.truncate(this.size);
    }
    this.dirty = false;
  }

  async sync(): Promise<void> {
    await this.writeStaged();
    await this.fh.datasync();
  }

  /** Drop everything appended after `size`; the staged tail is re-read from the file when the cut falls before it. */
  async truncate(size: number): Promise<void> {
    if (this.stage && size < this.stageStart) {
      await this.fh.truncate(size);
      this.stageStart = size - (size % ALIGN);
      this.staged = size - this.stageStart;
      if (this.staged > 0) {
        const { bytesRead } = await this.fh.read(this.stage, 0, ALIGN, this.stageStart);
        if (bytesRead < this.staged) throw new Error(`${this.file}: short read truncating to ${size}`);
      }
    } else if (this.stage) {
      this.staged = size - this.stageStart;
      // The file may hold the padded block of an earlier sync past `size`.
      await this.fh.truncate(Math.min(size, this.stageStart));
    } else {
      await this.fh.truncate(size);
    }
    this.size = size;
    this.dirty = true;
  }

  /** Close; what is staged is written first (not synced: sync() before committing). */
  async close(): Promise<void> {
    try {
      await this.writeStaged();
    } finally {
      this.stage = null;
      await this.fh.close();
    }
  }
}

/**
 * Synchronous range reads of a local store, for worker threads (sync calls are fine
 * there: a worker never serves the mount). Open descriptors are kept, buffered and
 * O_DIRECT ones apart; all of a kind are dropped past 64.
 *
 * readDirect: O_DIRECT reads for readers that pass over data once (restore, cat, verify):
 * the bytes go straight into this reader's buffer, with no page-cache pages to allocate
 * and fill and nothing of the machine's cache evicted by a large restore. Offsets, lengths
 * and memory must be aligned; without the addon that finds a buffer's address, or on a
 * file system that refuses O_DIRECT, it returns null and the caller reads buffered.
 */
export class LocalSyncReader implements SyncReader {
  private readonly dir: string;
  private fds = { buffered: new Map<string, number>(), direct: new Map<string, number>() };
  private alignSkip = alignSkipper();
  private directOk = this.alignSkip !== null;
  private directBuf = Buffer.alloc(0);
  private directSkip = 0;

  constructor(spec: StoreSpec & { kind: 'local' }) {
    this.dir = path.resolve(spec.dir);
  }

  private fdFor(name: string, direct: boolean): number {
    const open = direct ? this.fds.direct : this.fds.buffered;
    let fd = open.get(name);
    if (fd === undefined) {
      if (open.size > FD_CACHE) {
        for (const v of open.values()) fsSync.closeSync(v);
        open.clear();
      }
      const file = path.join(this.dir, checkName(name));
      fd = fsSync.openSync(file, direct ? fsConstants.O_RDONLY | fsConstants.O_DIRECT : 'r');
      open.set(name, fd);
    }
    return fd;
  }

  read(name: string, buf: Uint8Array, bufOffset: number, length: number, position: number): number {
    return preadFull(this.fdFor(name, false), buf, bufOffset, length, position);
  }

  readDirect(name: string, start: number, end: number): { span: Buffer; got: number } | null {
    if (!this.directOk) return null;
    const a0 = start - (start % ALIGN);
    const need = Math.ceil(end / ALIGN) * ALIGN - a0;
    if (this.directBuf.length - this.directSkip < need) {
      this.directBuf = Buffer.allocUnsafeSlow(need + ALIGN);
      this.directSkip = this.alignSkip!(this.directBuf, ALIGN);
    }
    let got: number;
    try {
      // At the end of the object the last read may stop anywhere.
      got = preadFull(this.fdFor(name, true), this.directBuf, this.directSkip, need, a0);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'EINVAL') this.directOk = false; // no O_DIRECT here
      return null; // the buffered read reports any real error
    }
    const lead = start - a0;
    const at = this.directSkip + lead;
    return { span: this.directBuf.subarray(at, at + (end - start)), got: Math.max(0, got - lead) };
  }

  close(): void {
    for (const open of [this.fds.buffered, this.fds.direct]) {
      for (const fd of open.values()) fsSync.closeSync(fd);
      open.clear();
    }
  }
}

/** pread until `length` bytes are in or the file ends; returns how many were read. */
function preadFull(fd: number, buf: Uint8Array, offset: number, length: number, position: number): number {
  let got = 0;
  while (got < length) {
    const n = fsSync.readSync(fd, buf, offset + got, length - got, position + got);
    if (n === 0) break;
    got += n;
  }
  return got;
}

/**
 * The mount of an ssh:// repository (`genvault -r ssh://... mount MNT`): the FUSE tree of
 * src/fuse/mount.ts over a RemoteRepository. The server decodes and checks the chunks; this
 * side keeps what arrived in a cache of BLOCK-aligned blocks (bounded by --cache-size,
 * least recently used first out, a block of zeros kept as a marker of no size) and reads
 * ahead of a sequential reader with several READs outstanding on the one connection, so
 * `dd` streams at the connection's speed instead of paying a round trip per kernel
 * request. Generations are opened (pinned) on the server while files of them are open.
 *
 * A lost connection is not re-established: the mount logs it once, the tree stays as it
 * was, reads of blocks in the cache still succeed and every other read (and open) fails
 * with EIO until the mount is unmounted and mounted again. See native-notes/remote.md.
 */
import type { Generation } from '../format/generation.js';
import type { MountBackend, MountImage } from '../fuse/mount.js';
import { isZero } from '../format/chunker.js';
import { Lru } from '../util/lru.js';
import { ReadStreak } from '../read/streak.js';
import type { RemoteRepository } from './client.js';
import { MAX_READ } from './protocol.js';

/**
 * Bytes per cached block, and per READ of a reader that jumps around: a random 4 KiB read
 * costs one block's transfer.
 */
export const BLOCK = 1 << 20;

/**
 * Blocks per READ of the read-ahead (4 MiB, MAX_READ): a `dd` through the mount ran at
 * 90-125 MB/s with one READ per 1 MiB block and at 180-240 MB/s with 4 MiB READs
 * (192 MiB image, localhost sshd, a busy 2-core machine).
 */
const RUN = MAX_READ / BLOCK;

/** A block of zeros in the cache: nothing stored, the reader fills. */
const ZERO: Buffer = Buffer.alloc(0);

/** Bytes a zero marker is charged in the cache (its key and entry). */
const MARKER_BYTES = 64;

export interface RemoteMountOptions {
  /** Bytes of blocks kept in memory across all open files. */
  cacheBytes?: number;
  /** How far ahead of a sequential reader blocks are requested (bytes); at most half the cache. */
  readahead?: number;
  log?: (line: string) => void;
}

/**
 * What one READ brought: its blocks (ZERO for a block of zeros), cached as one entry, so
 * that the memory the cache counts is the memory it holds (blocks cut from one answer
 * share its buffer, and a block kept alone would hold its neighbours' bytes too).
 */
interface Run {
  readonly image: RemoteImage;
  readonly key: string;
  readonly first: number;
  readonly blocks: Buffer[];
  readonly bytes: number;
}

/** A generation's reads: its blocks in the shared cache, and read-ahead for a sequential reader. */
class RemoteImage implements MountImage {
  /** The cached run holding each block. */
  private runs = new Map<number, Run>();
  private inflight = new Map<number, Promise<Buffer>>();
  /** Blocks whose READ failed while connected: read request by request (readExactly). */
  private bad = new Set<number>();
  /** Where the reader goes on, for read-ahead (see noteRead). */
  private streak = new ReadStreak();
  /** Blocks below this were requested by read-ahead already (while the reader moves on). */
  private aheadTo = 0;
  private readonly blocks: number;

  constructor(
    private readonly be: RemoteBackend,
    readonly gen: Generation,
  ) {
    this.blocks = Math.ceil(gen.size / BLOCK);
  }

  /** Block i if it is cached (it becomes the most recently used). */
  private cached(i: number): Buffer | undefined {
    const run = this.runs.get(i);
    if (!run) return undefined;
    this.be.cache.get(run.key);
    return run.blocks[i - run.first];
  }

  /** The cache let a run go: its blocks are no longer here. */
  evicted(run: Run): void {
    for (let k = 0; k < run.blocks.length; k++) if (this.runs.get(run.first + k) === run) this.runs.delete(run.first + k);
  }

  tryRead(out: Buffer, offset: number, length: number): number | null {
    const size = this.gen.size;
    if (offset >= size || length <= 0) return 0;
    const end = Math.min(size, offset + length);
    const first = Math.floor(offset / BLOCK);
    const last = Math.floor((end - 1) / BLOCK);
    if (first === last) {
      const b = this.cached(first);
      if (!b) return null;
      copyOut(b, out, 0, offset - first * BLOCK, end - offset);
    } else {
      const parts: Buffer[] = [];
      for (let i = first; i <= last; i++) {
        const b = this.cached(i);
        if (!b) return null;
        parts.push(b);
      }
      this.copyParts(parts, first, out, offset, end);
    }
    this.noteRead(offset, end);
    return end - offset;
  }

  async read(out: Buffer, offset: number, length: number): Promise<number> {
    const size = this.gen.size;
    if (offset >= size || length <= 0) return 0;
    const end = Math.min(size, offset + length);
    const first = Math.floor(offset / BLOCK);
    const last = Math.floor((end - 1) / BLOCK);
    const waits: Array<Buffer | Promise<Buffer>> = [];
    let bad = false;
    for (let i = first; i <= last; i++) {
      if (this.bad.has(i)) bad = true;
      else waits.push(this.cached(i) ?? this.fetch(i));
    }
    // Read-ahead starts before this read waits: the blocks after it are on their way too.
    this.noteRead(offset, end);
    if (!bad) {
      try {
        this.copyParts(await Promise.all(waits), first, out, offset, end);
        return end - offset;
      } catch (e) {
        if (this.be.remote.lost || end - offset > MAX_READ) throw e;
      }
    }
    return this.readExactly(out, offset, end);
  }

  /**
   * A block the server could not read (a damaged chunk there, most likely) is read no more
   * as a whole: each request in it asks for just its own bytes, uncached, so only the
   * requests that touch the damage fail (as on a local mount).
   */
  private async readExactly(out: Buffer, offset: number, end: number): Promise<number> {
    const b = await this.be.remote.read(this.gen.id, offset, end - offset);
    if (b) b.copy(out, 0);
    else out.fill(0, 0, end - offset);
    return end - offset;
  }

  private copyParts(parts: Buffer[], first: number, out: Buffer, offset: number, end: number): void {
    let pos = offset;
    for (let k = 0; k < parts.length; k++) {
      const bStart = (first + k) * BLOCK;
      const n = Math.min(bStart + BLOCK, end) - pos;
      copyOut(parts[k]!, out, pos - offset, pos - bStart, n);
      pos += n;
    }
  }

  /** Block i, from the server (one READ however many readers want it). */
  private fetch(i: number): Promise<Buffer> {
    const pending = this.inflight.get(i);
    if (pending) return pending;
    this.fetchRun(i, 1);
    return this.inflight.get(i)!;
  }

  /**
   * Blocks i to i + n - 1 in one READ, each on its way (inflight) until the run lands in
   * the cache. A block of zeros in a READ that also holds data is a marker too.
   */
  private fetchRun(i: number, n: number): void {
    const start = i * BLOCK;
    const length = Math.min(n * BLOCK, this.gen.size - start);
    const whole = this.be.remote.read(this.gen.id, start, length).then(
      (b) => {
        const blocks: Buffer[] = [];
        for (let k = 0; k < n; k++) {
          this.inflight.delete(i + k);
          const from = k * BLOCK;
          const to = Math.min(from + BLOCK, length);
          blocks.push(!b || (n > 1 && isZero(b, from, to - from)) ? ZERO : n === 1 ? b : b.subarray(from, to));
        }
        const run: Run = { image: this, key: `${this.gen.id}/${i}`, first: i, blocks, bytes: b ? b.length : MARKER_BYTES };
        for (let k = 0; k < n; k++) this.runs.set(i + k, run);
        this.be.cache.set(run.key, run);
        return blocks;
      },
      (e: unknown) => {
        for (let k = 0; k < n; k++) this.inflight.delete(i + k);
        if (n === 1 && !this.be.remote.lost) this.bad.add(i);
        throw this.be.failed(e);
      },
    );
    for (let k = 0; k < n; k++) {
      // A failed READ of several blocks (damage in one of them): each is asked for alone.
      const p = whole.then(
        (blocks) => blocks[k]!,
        (e: unknown) => {
          if (n === 1 || this.be.remote.lost) throw e;
          return this.fetch(i + k);
        },
      );
      p.catch(() => undefined); // read-ahead: a read that waits for it sees the failure
      this.inflight.set(i + k, p);
    }
  }

  private noteRead(offset: number, end: number): void {
    // Read ahead only as far as the reader has shown it reads on (src/read/streak.ts): a
    // file system hopping between nearby small files must not pull whole windows over the
    // link for each hop, and random reads get none.
    const window = this.streak.note(offset, end, 2 * BLOCK, this.be.window);
    if (window) this.ahead(end, window);
  }

  /** Neither cached nor on its way (nor known to fail as a whole). */
  private missing(i: number): boolean {
    return !this.inflight.has(i) && !this.runs.has(i) && !this.bad.has(i);
  }

  /**
   * Requests the blocks from the one holding `end` to `end + window` that are missing,
   * consecutive ones RUN to a READ.
   */
  private ahead(end: number, window: number): void {
    if (this.be.remote.lost) return;
    const from = Math.floor(end / BLOCK);
    const until = Math.min(this.blocks, Math.ceil((end + window) / BLOCK));
    // Blocks requested by the previous call need no second look (unless the reader jumped).
    let i = this.aheadTo >= from && this.aheadTo <= until ? this.aheadTo : from;
    while (i < until) {
      if (!this.missing(i)) {
        i++;
        continue;
      }
      let n = 1;
      while (n < RUN && i + n < until && this.missing(i + n)) n++;
      this.fetchRun(i, n);
      i += n;
    }
    this.aheadTo = until;
  }
}

function copyOut(b: Buffer, out: Buffer, dst: number, from: number, n: number): void {
  if (b === ZERO) out.fill(0, dst, dst + n);
  else b.copy(out, dst, from, from + n);
}

class RemoteBackend implements MountBackend {
  readonly cache: Lru<string, Run>;
  /** Read-ahead in bytes. */
  readonly window: number;
  readonly source: string;
  /** Generations opened on the server, with the number of open files of each. */
  private opens = new Map<string, { count: number; image: Promise<RemoteImage> }>();
  /** Each generation's reader, kept after its files close: its blocks stay in the cache. */
  private images = new Map<string, RemoteImage>();
  private last: Generation[] = [];
  private listing: Promise<Generation[]> | null = null;
  private lostLogged = false;
  private readonly log: (line: string) => void;

  constructor(
    readonly remote: RemoteRepository,
    opts: RemoteMountOptions,
  ) {
    const cacheBytes = Math.max(opts.cacheBytes ?? 128 << 20, 4 * BLOCK);
    this.cache = new Lru<string, Run>(cacheBytes, (r) => r.bytes);
    this.cache.onEvict = (r) => r.image.evicted(r);
    // 32 MiB: 8 READs of 4 MiB outstanding, the server decoding them at once.
    this.window = Math.max(2 * BLOCK, Math.min(opts.readahead ?? 32 << 20, Math.floor(cacheBytes / 2)));
    this.source = remote.dir;
    this.log = opts.log ?? ((l: string) => process.stderr.write(l + '\n'));
  }

  /** The error of a failed request; the first sign of a lost connection is logged, once. */
  failed(e: unknown): Error {
    const lost = this.remote.lost;
    if (lost && !this.lostLogged) {
      this.lostLogged = true;
      this.log(
        `genvault mount: lost the connection to ${this.remote.dir} (${lost.message}); reads of anything not in the mount's cache now fail with EIO: unmount (genvault umount) and mount again`,
      );
    }
    return e instanceof Error ? e : new Error(String(e));
  }

  logsReadError(): boolean {
    return !this.remote.lost;
  }

  async generations(): Promise<Generation[]> {
    if (this.remote.lost) {
      this.failed(this.remote.lost);
      return this.last;
    }
    // One list request at a time, however slow the server is to answer.
    this.listing ??= this.remote.generations().finally(() => (this.listing = null));
    try {
      this.last = await this.listing;
    } catch (e) {
      if (!this.remote.lost) throw e;
      this.failed(e);
    }
    return this.last;
  }

  private imageOf(gen: Generation): RemoteImage {
    let img = this.images.get(gen.id);
    if (!img) {
      img = new RemoteImage(this, gen);
      this.images.set(gen.id, img);
    }
    return img;
  }

  open(gen: Generation): Promise<MountImage> {
    let e = this.opens.get(gen.id);
    if (!e) {
      const entry = { count: 0, image: this.remote.openGeneration(gen.id).then(() => this.imageOf(gen)) };
      this.opens.set(gen.id, entry);
      entry.image.catch(() => {
        if (this.opens.get(gen.id) === entry) this.opens.delete(gen.id);
      });
      e = entry;
    }
    e.count++;
    const held = e;
    return held.image.catch((err: unknown) => {
      held.count--;
      throw this.failed(err);
    });
  }

  release(gen: Generation): void {
    const e = this.opens.get(gen.id);
    if (!e || --e.count > 0) return;
    this.opens.delete(gen.id);
    // Its blocks stay in the cache: a generation's bytes never change.
    if (!this.remote.lost) this.remote.closeGeneration(gen.id).catch((err: unknown) => void this.failed(err));
  }

  /** The connection closes; the server releases whatever it still pins for it. */
  async stop(): Promise<void> {
    this.opens.clear();
    this.remote.close();
  }
}

/** The mount's backend for an ssh:// repository; it owns the connection from here on (stop() closes it). */
export function remoteMountBackend(remote: RemoteRepository, opts: RemoteMountOptions = {}): MountBackend {
  return new RemoteBackend(remote, opts);
}

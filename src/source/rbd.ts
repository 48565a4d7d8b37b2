/**
 * RBD images as backup sources, read through `rbd export-diff ... -` (src/source/rbd-cli.ts
 * runs it, rbd-diff.ts parses what it writes). A first backup reads the snapshot's
 * allocated extents (export-diff from nothing): every other byte is a zero. A next
 * backup of the same image reads only what changed since the snapshot the latest
 * generation was read from (export-diff --from-snap S1), and every other byte from that
 * generation, which the generation's own source description vouches for: it names the
 * image's id and the snapshot's id, and both must still be there (ids are never reused, so
 * a deleted and re-made snapshot of the same name does not pass, while a renamed one
 * does). When the base cannot be used the whole snapshot is read, with one line saying why.
 *
 * Unlike thin_delta or a dirty bitmap, the changed extents come from Ceph itself, from the
 * two snapshots' objects: no hint kept by someone else. There is no --verify-hints: the
 * rbd command cannot read a byte range of a snapshot, so sampling the unchanged blocks
 * would mean reading the whole snapshot (--full does that, and stores the result).
 */
import type { RepoKeys } from '../format/crypto.js';
import { GenvaultError, UsageError } from '../util/errors.js';
import type { Generation } from '../format/generation.js';
import type { Source } from '../backup/source.js';
import type { ChunkedSegment, ChunkedSource, NeedFn } from '../backup/chunked-source.js';
import { ChunkReuse, type Run } from '../backup/reuse.js';
import type { ChunkingParams } from '../format/config.js';
import { ChunkLoader, ImageReader } from '../read/reader.js';
import type { Repository } from '../repository/repository.js';
import { ByteReader, DiffReader, DiffStreamError } from './rbd-diff.js';
import { imagePath, rbdInfo, rbdSnapshots, snapPath, spawnRbd, type CephCluster, type RbdImageInfo, type RbdProcess, type RbdSnapshot, type RbdSpec } from './rbd-cli.js';

export interface RbdReadStats {
  /** 'export-diff': only what changed since `fromSnap`; 'full': every allocated extent of the snapshot. */
  mode: 'export-diff' | 'full';
  /** Why a full read, when a changed-extents read was possible in principle. */
  fullReason: string | null;
  /** The generation the unchanged bytes came from, and the snapshot it was read from. */
  parent: string | null;
  fromSnap: string | null;
  /** Bytes of data that came from rbd ('w' extents): what the source was read for. */
  readBytes: number;
  /** Bytes of changed extents ('w' and 'z'). */
  changedBytes: number;
  /** Bytes of 'z' extents (zeroed since the base, or never written), not sent by rbd. */
  zeroedBytes: number;
  /** Bytes taken from the parent generation (unread chunks and the bytes around changes). */
  parentBytes: number;
  verifiedBytes: number;
}

export interface RbdOpenOptions {
  name: string;
  cluster: CephCluster;
  /** Read the image's head, no snapshot (--rbd-live): not consistent while it is written. */
  live?: boolean;
  /** Read the whole snapshot even when the base would do (--full). */
  full?: boolean;
}

/** The snapshot a generation was read from, as its source description says: `rbd:PATH@SNAP (image ID, snap N)...`. */
export function parseRbdDescription(source: string): { path: string; snap: string; imageId: string; snapId: number } | null {
  const m = /^rbd:([^@\s]+)@(\S+) \(image ([0-9A-Za-z._-]+), snap (\d+)\)/.exec(source);
  return m ? { path: m[1]!, snap: m[2]!, imageId: m[3]!, snapId: Number(m[4]) } : null;
}

/** The base a changed-extents read may start from, or why there is none. */
async function chooseBase(
  repo: Repository, spec: RbdSpec, info: RbdImageInfo, snaps: Map<string, RbdSnapshot>, opts: RbdOpenOptions,
): Promise<{ prev: Generation; fromSnap: string } | { why: string }> {
  const prev: Generation | null = (await repo.generations(opts.name)).at(-1) ?? null;
  if (!prev) return { why: `${opts.name} has no generation yet` };
  const g = `${opts.name}@${prev.id}`;
  if (opts.full) return { why: '--full' };
  const d = parseRbdDescription(prev.source);
  if (!d || d.path !== imagePath(spec)) return { why: `${g} was not read from a snapshot of rbd:${imagePath(spec)}` };
  if (d.imageId !== info.id) return { why: `${g} was read from another image of that name (id ${d.imageId}, now ${info.id})` };
  // By id: a snapshot keeps it when renamed (the job recipe renames its snapshots), and a
  // new snapshot under the old name gets another one.
  const from = [...snaps].find(([, x]) => x.id === d.snapId)?.[0];
  if (from === undefined) return { why: `the snapshot ${d.snap} (snap id ${d.snapId}) ${g} was read from no longer exists` };
  if (prev.size !== info.size) return { why: `the image is ${info.size} bytes, ${g} was ${prev.size}` };
  return { prev, fromSnap: from };
}

/** An extent of the window the source is at: data from rbd, or zeros ('z'). */
interface Piece {
  from: number;
  to: number;
  data: Buffer | null;
}

/** The snapshot read as a stream: changed extents from rbd, the rest from the parent generation (or zeros). */
export class RbdSource implements Source {
  protected pos = 0;
  /** The current extent when it reaches past the window asked for (it continues in the next). */
  private cur: { tag: 'w' | 'z'; at: number; end: number } | null = null;
  private ended = false;
  /** The changed extents of the window last asked for (window()). */
  protected pieces: Piece[] = [];

  protected constructor(
    readonly description: string,
    readonly size: number,
    private proc: RbdProcess,
    private diff: DiffReader,
    protected parent: ImageReader | null,
    readonly stats: RbdReadStats,
  ) {}

  static async open(repo: Repository, spec: RbdSpec, opts: RbdOpenOptions): Promise<RbdSource> {
    if (spec.snap === null && !opts.live) {
      throw new UsageError(`rbd:${imagePath(spec)} names no snapshot, and a running image cannot be read consistently: make one with \`rbd snap create ${imagePath(spec)}@NAME\` and back up rbd:${imagePath(spec)}@NAME (or pass --rbd-live)`);
    }
    if (spec.snap !== null && opts.live) throw new UsageError('--rbd-live reads the image itself: name no @SNAP with it');
    // Snapshots first: their listing fails with rbd's own line for a missing pool or image.
    const snaps = await rbdSnapshots(opts.cluster, spec);
    const snap = spec.snap !== null ? snaps.get(spec.snap) : undefined;
    if (spec.snap !== null && snap === undefined) throw new GenvaultError(`rbd:${snapPath(spec)}: no such snapshot (rbd snap ls ${imagePath(spec)} lists the image's)`, 'NOT_FOUND');
    const info = await rbdInfo(opts.cluster, spec);
    if (info.stripeCount > 1) throw new GenvaultError(`rbd:${snapPath(spec)} uses fancy striping (stripe count ${info.stripeCount}), whose extents rbd export-diff does not give in image order: not supported`, 'USAGE', 2);
    if (snap && snap.size !== info.size) throw new GenvaultError(`rbd:${snapPath(spec)}: rbd snap ls says ${snap.size} bytes, rbd info ${info.size}`, 'RBD');
    const base = opts.live ? { why: '--rbd-live' } : await chooseBase(repo, spec, info, snaps, opts);
    const fromSnap = 'fromSnap' in base ? base.fromSnap : null;
    const proc = spawnRbd(opts.cluster, ['export-diff', '--no-progress', ...(fromSnap ? ['--from-snap', fromSnap] : []), snapPath(spec), '-']);
    try {
      const diff = await DiffReader.open(new ByteReader(proc.child.stdout!)).catch(async (e) => {
        throw (await RbdSource.failure(proc, e));
      });
      const h = diff.header;
      if (h.size !== info.size || h.to !== spec.snap || h.from !== fromSnap) {
        throw new DiffStreamError(`rbd export-diff of ${snapPath(spec)} announced ${h.from ?? 'nothing'}..${h.to ?? 'head'} of ${h.size} bytes, not ${fromSnap ?? 'nothing'}..${spec.snap ?? 'head'} of ${info.size}`);
      }
      const parent = 'prev' in base ? await ImageReader.open(repo, base.prev, new ChunkLoader(repo, 64 << 20), 32 << 20) : null;
      const stats: RbdReadStats = {
        mode: parent ? 'export-diff' : 'full', fullReason: 'why' in base ? base.why : null, parent: 'prev' in base ? base.prev.id : null, fromSnap,
        readBytes: 0, changedBytes: 0, zeroedBytes: 0, parentBytes: 0, verifiedBytes: 0,
      };
      const desc = spec.snap !== null ? `rbd:${snapPath(spec)} (image ${info.id}, snap ${snap!.id})${fromSnap ? ` changes since @${fromSnap}` : ''}` : `rbd:${imagePath(spec)} (image ${info.id}, live)`;
      if (parent) return new RbdDiffSource(desc, info.size, proc, diff, parent, stats, repo.config.chunking, repo.config.version, repo.keys);
      return new RbdSource(desc, info.size, proc, diff, null, stats);
    } catch (e) {
      await proc.kill();
      throw e;
    }
  }

  /** What to report when reading the stream failed: rbd's own line if it failed (it ends the stream early), else the stream's fault. */
  private static async failure(proc: RbdProcess, e: unknown): Promise<unknown> {
    if (!(e instanceof DiffStreamError)) return e;
    let timer: NodeJS.Timeout | undefined;
    const exitedFirst = await Promise.race([proc.exited, new Promise<'running'>((r) => (timer = setTimeout(() => r('running'), 2000)))]);
    clearTimeout(timer);
    if (typeof exitedFirst === 'string' && exitedFirst !== 'running') return new GenvaultError(exitedFirst, 'RBD');
    return new GenvaultError(`${e.message}; nothing was committed`, e.code);
  }

  /**
   * The changed extents of [at, end), with their data: read from the stream, which moves
   * forward only (each window starts where the one before ended). At the image's end the
   * stream must be over and rbd must have exited 0.
   */
  protected async window(at: number, end: number): Promise<Piece[]> {
    const out: Piece[] = [];
    try {
      while (!this.ended) {
        if (!this.cur) {
          const x = await this.diff.next();
          if (!x) {
            this.ended = true;
            break;
          }
          this.cur = { tag: x.tag, at: x.offset, end: x.offset + x.length };
          this.stats.changedBytes += x.length;
          if (x.tag === 'z') this.stats.zeroedBytes += x.length;
        }
        const c = this.cur;
        if (c.at >= end) break;
        const to = Math.min(c.end, end);
        const data = c.tag === 'w' ? Buffer.alloc(to - c.at) : null;
        if (data) {
          await this.diff.data(data);
          this.stats.readBytes += data.length;
        }
        out.push({ from: c.at, to, data });
        c.at = to;
        if (c.at < c.end) break;
        this.cur = null;
      }
      if (end >= this.size) await this.finish();
    } catch (e) {
      const err = await RbdSource.failure(this.proc, e);
      await this.proc.kill();
      throw err;
    }
    this.pieces = out;
    return out;
  }

  /** At the image's end (an empty image has no window to end in): the stream's end is checked all the same. */
  protected async atImageEnd(): Promise<void> {
    if (!this.ended) await this.window(this.size, this.size);
  }

  /** The whole image was read: the stream must have ended, and rbd exited 0. */
  private async finish(): Promise<void> {
    if (!this.ended && (await this.diff.next()) !== null) throw new DiffStreamError('malformed rbd diff stream: data records after the image\'s end');
    this.ended = true;
    const why = await this.proc.exited;
    if (why !== null) throw new GenvaultError(why, 'RBD');
  }

  /** Fill dst (the image's bytes at `from`): changed pieces from the window, the rest from the parent, or zeros without one. */
  protected async fill(dst: Buffer, from: number): Promise<void> {
    const end = from + dst.length;
    const waits: Array<Promise<void>> = [];
    let pos = from;
    const gap = (a: number, b: number) => {
      if (b <= a) return;
      if (!this.parent) dst.fill(0, a - from, b - from);
      else waits.push(this.fromParent(dst.subarray(a - from, b - from), a));
    };
    for (const p of this.pieces) {
      if (p.to <= from || p.from >= end) continue;
      const a = Math.max(p.from, from);
      const b = Math.min(p.to, end);
      gap(pos, a);
      if (p.data) p.data.copy(dst, a - from, a - p.from, b - p.from);
      else dst.fill(0, a - from, b - from);
      pos = b;
    }
    gap(pos, end);
    await Promise.all(waits);
  }

  protected async fromParent(dst: Buffer, offset: number): Promise<void> {
    const got = await this.parent!.read(dst, offset, dst.length);
    if (got !== dst.length) throw new GenvaultError(`previous generation ended at ${offset + got}`, 'SHORT_READ');
    this.stats.parentBytes += dst.length;
  }

  async read(buf: Buffer, length: number): Promise<number> {
    const n = Math.max(0, Math.min(length, this.size - this.pos));
    if (n === 0) {
      await this.atImageEnd();
      return 0;
    }
    await this.window(this.pos, this.pos + n);
    await this.fill(buf.subarray(0, n), this.pos);
    this.pos += n;
    return n;
  }

  async close(): Promise<void> {
    await this.proc.kill();
  }
}

/**
 * The changed-extents read as the backup pipeline prefers it, a ChunkedSource: the parent
 * generation's chunks that no changed extent touches are reused by digest, unread; the
 * chunks around changes are rebuilt from the changed bytes and the parent's (src/backup/reuse.ts).
 */
export class RbdDiffSource extends RbdSource implements ChunkedSource {
  readonly transferred = { raw: 0, wire: 0 };
  private readonly reuse: ChunkReuse;

  constructor(
    description: string, size: number, proc: RbdProcess, diff: DiffReader, parent: ImageReader, stats: RbdReadStats,
    readonly chunking: ChunkingParams,
    version: number,
    keys: RepoKeys | null,
  ) {
    super(description, size, proc, diff, parent, stats);
    this.reuse = new ChunkReuse(parent.map, chunking, version, keys, {
      changed: async (at, len): Promise<Run[]> => (await this.window(at, at + len)).map((p) => ({ from: p.from, to: p.to })),
      readRegion: (dst, from) => this.fill(dst, from),
      // rbd cannot read an unchanged range of the snapshot: the parent's bytes stand in,
      // and ChunkReuse checks they still hash as the chunk did.
      readUnchanged: async (dst, offset) => {
        const got = await parent.read(dst, offset, dst.length).catch(() => -1);
        if (got !== dst.length) throw this.unreadable(offset);
      },
      stale: (where, how) => new GenvaultError(`${description}: ${where} from @${stats.parent} (${how}); nothing was committed: back up with --full`, 'STALE_BASE'),
      readParent: (dst, offset) => parent.read(dst, offset, dst.length),
    }, stats);
  }

  private unreadable(offset: number): GenvaultError {
    return new GenvaultError(
      `the unchanged chunk at ${offset} of @${this.stats.parent} cannot be read (damaged, or being collected), and rbd export-diff does not send unchanged bytes: back up with --full`,
      'DAMAGE',
    );
  }

  async readSegment(need: NeedFn): Promise<ChunkedSegment | null> {
    const seg = await this.reuse.segmentAt(this.pos, this.size, need, this.transferred);
    if (seg) this.pos += seg.length;
    else await this.atImageEnd();
    return seg;
  }
}

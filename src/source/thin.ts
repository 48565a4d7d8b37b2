/**
 * LVM thin hints: `thin_delta` (thin-provisioning-tools) compares two thin devices of a
 * pool in its metadata and names the data blocks that differ. A backup of the newer
 * snapshot then reads only those ranges from it, and every other byte from the image's
 * latest generation, which must be the backup of the older snapshot (the user's side of
 * the bargain, as with dirty bitmaps: native-notes/nbd.md). `--verify-hints PERCENT`
 * re-reads a sample of the "unchanged" blocks from the snapshot and fails if one differs
 * from the generation (hints are trusted only as far as they are checked).
 */
import type { RepoKeys } from '../format/crypto.js';
import { execFile } from 'node:child_process';
import fs from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';
import { GenvaultError, UsageError, describeFsError } from '../util/errors.js';
import { blockDeviceSize } from '../util/blockdev.js';
import type { Generation } from '../format/generation.js';
import type { Source } from '../backup/source.js';
import type { ChunkedSegment, ChunkedSource, NeedFn } from '../backup/chunked-source.js';
import { ChunkReuse, sampleDiffers } from '../backup/reuse.js';
import type { ChunkingParams } from '../format/config.js';
import { ChunkLoader, ImageReader } from '../read/reader.js';
import type { Repository } from '../repository/repository.js';

const run = promisify(execFile);

export interface ThinDeltaSpec {
  /** The pool's metadata device (or a copy of it in a file). */
  metadata: string;
  /** Thin device ids: the snapshot the latest generation was read from, and the one read now. */
  from: number;
  to: number;
  /** Read the pool's metadata snapshot (thin_delta -m): for a live pool, after `dmsetup message POOL 0 reserve_metadata_snap`. */
  metadataSnap: boolean;
}

/** `METADATA:FROM:TO`, e.g. /dev/mapper/vg0-pool_tmeta:3:4. */
export function parseThinDelta(spec: string, metadataSnap = false): ThinDeltaSpec {
  const m = /^(.+):(\d+):(\d+)$/.exec(spec);
  if (!m) throw new UsageError(`--thin-delta ${JSON.stringify(spec)}: expected METADATA:FROM_ID:TO_ID`);
  return { metadata: path.resolve(m[1]!), from: Number(m[2]), to: Number(m[3]), metadataSnap };
}

/** Changed byte ranges [from, to), sorted, from thin_delta's XML output. */
export function parseThinDeltaXml(xml: string): Array<[number, number]> {
  const sb = /<superblock\b[^>]*\bdata_block_size="(\d+)"/.exec(xml);
  if (!sb || !/<diff\b/.test(xml)) throw new GenvaultError('thin_delta: unexpected output (no superblock or diff)', 'THIN');
  const block = Number(sb[1]) * 512;
  const out: Array<[number, number]> = [];
  for (const m of xml.matchAll(/<(same|different|left_only|right_only)\s+begin="(\d+)"\s+length="(\d+)"\s*\/>/g)) {
    // left_only: mapped before, unmapped now (reads as zeros): changed as much as different.
    if (m[1] === 'same') continue;
    const from = Number(m[2]) * block;
    const to = from + Number(m[3]) * block;
    const last = out[out.length - 1];
    if (last && last[1] === from) last[1] = to;
    else out.push([from, to]);
  }
  return out.sort((a, b) => a[0] - b[0]);
}

export interface ThinReadStats {
  mode: 'thin-delta' | 'full';
  fullReason: string | null;
  parent: string | null;
  /** Bytes read from the snapshot (changed ranges, or all of it). */
  readBytes: number;
  changedBytes: number;
  parentBytes: number;
  verifiedBytes: number;
}

/** A thin snapshot read as a stream: the whole device (first backup), or hinted ranges and the previous generation. */
export class ThinHintedSource implements Source {
  protected pos = 0;
  protected constructor(
    readonly description: string,
    readonly size: number,
    private fh: fs.FileHandle,
    protected ranges: Array<[number, number]> | null,
    protected parent: ImageReader | null,
    readonly stats: ThinReadStats,
    protected verify: number,
  ) {}

  static async open(repo: Repository, file: string, spec: ThinDeltaSpec, opts: { name: string; verifyPercent?: number }): Promise<ThinHintedSource> {
    const abs = path.resolve(file);
    const fh = await fs.open(abs, 'r').catch((e) => {
      throw describeFsError(e, `cannot read source ${abs}`);
    });
    try {
      const st = await fh.stat();
      const size = st.isBlockDevice() ? await blockDeviceSize(st.rdev) : st.isFile() ? st.size : null;
      if (size === null) throw new GenvaultError(`${abs}: --thin-delta needs a block device or an image file`, 'USAGE', 2);
      const prev: Generation | null = (await repo.generations(opts.name)).at(-1) ?? null;
      let why: string | null = null;
      if (!prev) why = `${opts.name} has no generation yet`;
      else if (prev.size !== size) why = `${abs} is ${size} bytes, ${opts.name}@${prev.id} was ${prev.size}`;
      const ranges = why ? null : await thinDelta(spec);
      const parent = why ? null : await ImageReader.open(repo, prev!, new ChunkLoader(repo, 64 << 20), 32 << 20);
      const stats: ThinReadStats = {
        mode: why ? 'full' : 'thin-delta', fullReason: why, parent: why ? null : prev!.id, readBytes: 0, changedBytes: 0, parentBytes: 0, verifiedBytes: 0,
      };
      const desc = `${st.isBlockDevice() ? 'device' : 'file'}:${abs} thin-delta ${spec.from}..${spec.to}`;
      const verify = (opts.verifyPercent ?? 0) / 100;
      if (ranges && parent) return new ThinDeltaSource(desc, size, fh, ranges, parent, stats, verify, repo.config.chunking, repo.config.version, repo.keys);
      return new ThinHintedSource(desc, size, fh, null, null, stats, verify);
    } catch (e) {
      await fh.close();
      throw e;
    }
  }

  protected async pread(dst: Buffer, offset: number): Promise<void> {
    let got = 0;
    while (got < dst.length) {
      const { bytesRead } = await this.fh.read(dst, got, dst.length - got, offset + got);
      if (bytesRead === 0) throw new GenvaultError(`source ended at ${offset + got} of ${this.size} bytes`, 'SHORT_READ');
      got += bytesRead;
    }
    this.stats.readBytes += dst.length;
  }

  async read(buf: Buffer, length: number): Promise<number> {
    const n = Math.max(0, Math.min(length, this.size - this.pos));
    if (n === 0) return 0;
    const at = this.pos;
    const end = at + n;
    const waits: Array<Promise<void>> = [];
    if (!this.ranges) waits.push(this.pread(buf.subarray(0, n), at));
    else {
      let pos = at;
      for (const [from, to] of this.ranges) {
        if (to <= pos) continue;
        if (from >= end) break;
        if (from > pos) waits.push(this.fromParent(buf.subarray(pos - at, from - at), pos));
        const e = Math.min(to, end);
        waits.push(this.pread(buf.subarray(Math.max(from, pos) - at, e - at), Math.max(from, pos)));
        this.stats.changedBytes += e - Math.max(from, pos);
        pos = e;
      }
      if (pos < end) waits.push(this.fromParent(buf.subarray(pos - at, n), pos));
    }
    await Promise.all(waits);
    this.pos = end;
    return n;
  }

  private async fromParent(dst: Buffer, offset: number): Promise<void> {
    const got = await this.parent!.read(dst, offset, dst.length);
    if (got !== dst.length) throw new GenvaultError(`previous generation ended at ${offset + got}`, 'SHORT_READ');
    this.stats.parentBytes += dst.length;
    if (this.verify <= 0) return;
    const theirs = async (b: number, n: number) => {
      const t = Buffer.alloc(n);
      await this.pread(t, b);
      return t;
    };
    const at = await sampleDiffers(dst, offset, this.verify, theirs, (n) => (this.stats.verifiedBytes += n));
    if (at === null) return;
    throw new GenvaultError(
      `thin_delta hints missed a change: byte ${at} differs from ${this.stats.parent} (--verify-hints); nothing was committed: back up without --thin-delta`,
      'STALE_HINTS',
    );
  }

  async close(): Promise<void> {
    await this.fh.close();
  }
}

/**
 * The hinted snapshot as the backup pipeline prefers it, a ChunkedSource: the previous
 * generation's chunks that no changed range touches are reused by digest, unread; the
 * rest is read from the snapshot (changed ranges) and the previous generation (src/backup/reuse.ts).
 */
export class ThinDeltaSource extends ThinHintedSource implements ChunkedSource {
  readonly transferred = { raw: 0, wire: 0 };
  private readonly reuse: ChunkReuse;

  constructor(
    description: string, size: number, fh: fs.FileHandle, ranges: Array<[number, number]>, parent: ImageReader, stats: ThinReadStats, verify: number,
    readonly chunking: ChunkingParams,
    version: number,
    keys: RepoKeys | null,
  ) {
    super(description, size, fh, ranges, parent, stats, verify);
    this.reuse = new ChunkReuse(parent.map, chunking, version, keys, {
      changed: async (at, len) => ranges.filter(([a, b]) => a < at + len && b > at).map(([a, b]) => ({ from: Math.max(a, at), to: Math.min(b, at + len) })),
      readRegion: async (dst, from, changed) => {
        const waits: Array<Promise<unknown>> = [];
        let pos = from;
        const fromParent = (a: number, b: number) => {
          stats.parentBytes += b - a;
          waits.push(parent.read(dst.subarray(a - from, b - from), a, b - a));
        };
        for (const d of changed) {
          if (d.from > pos) fromParent(pos, d.from);
          stats.changedBytes += d.to - d.from;
          waits.push(this.pread(dst.subarray(d.from - from, d.to - from), d.from));
          pos = d.to;
        }
        if (pos < from + dst.length) fromParent(pos, from + dst.length);
        await Promise.all(waits);
      },
      readUnchanged: (dst, offset) => this.pread(dst, offset),
      stale: (where, how) =>
        new GenvaultError(`thin_delta hints missed a change: ${where} from ${stats.parent} (${how}); nothing was committed: back up without --thin-delta`, 'STALE_HINTS'),
      readParent: (dst, offset) => parent.read(dst, offset, dst.length),
    }, stats, verify);
  }

  async readSegment(need: NeedFn): Promise<ChunkedSegment | null> {
    const seg = await this.reuse.segmentAt(this.pos, this.size, need, this.transferred);
    if (seg) this.pos += seg.length;
    return seg;
  }
}

/** Run thin_delta and parse what it says. */
async function thinDelta(spec: ThinDeltaSpec): Promise<Array<[number, number]>> {
  const args = ['--snap1', String(spec.from), '--snap2', String(spec.to), ...(spec.metadataSnap ? ['-m'] : []), spec.metadata];
  let out: string;
  try {
    out = (await run('thin_delta', args, { maxBuffer: 256 << 20 })).stdout;
  } catch (e) {
    const err = e as NodeJS.ErrnoException & { stderr?: string };
    if (err.code === 'ENOENT') throw new GenvaultError('thin_delta not found: install thin-provisioning-tools', 'THIN');
    throw new GenvaultError(`thin_delta ${args.join(' ')} failed: ${(err.stderr || err.message).trim().split('\n')[0]}`, 'THIN');
  }
  return parseThinDeltaXml(out);
}

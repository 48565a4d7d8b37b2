/**
 * `genvault diff --files`: the files of ext2/3/4 file systems that the changed byte ranges
 * of a disk belong to. Both generations are served by a FUSE mount of this process on a
 * private directory (the run directory, src/util/rundir.ts); the partition table is read
 * with sfdisk, and e2fsprogs' debugfs, reading each file system through the mount at its
 * offset (no loop device, no kernel mount), maps the changed blocks to inodes (icheck)
 * and the inodes to paths (ncheck): in A for what was there, in B for what is there now.
 * The maps know chunks (16 KiB - 512 KiB), not blocks: the changed ranges are first read
 * from both generations and narrowed to the 512-byte sectors that differ, so a file beside
 * a change in the same chunk is not named.
 *
 * debugfs reads the file system as written: a journal not yet replayed (an image taken
 * from a running system) is not applied, and blocks that belong to no file (inode tables,
 * bitmaps, the journal) are counted as metadata. A removed or renamed file leaves its data
 * blocks as they were: it shows as its directory changing.
 */
import { execFile, spawn } from 'node:child_process';
import fs from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';
import { generationFileName, type Generation } from '../format/generation.js';
import type { ByteRange } from '../read/diff.js';
import type { Repository } from '../repository/repository.js';
import { GenvaultError } from '../util/errors.js';
import { ensureRunDir } from '../util/rundir.js';
import { mountRepository } from './mount.js';

/** More changed blocks than this in one file system: refused (debugfs takes them on one line). */
const MAX_BLOCKS = 4_000_000;
const EXT_MAGIC = 0xef53;

export interface ChangedFile {
  path: string;
  /** Where its changed blocks are: in A (old data, removed files), in B (new data, new files). */
  in: Array<'a' | 'b'>;
}

export interface FileSystemChanges {
  /** Partition number (1-based), or null for a file system on the whole disk. */
  partition: number | null;
  offset: number;
  size: number;
  /** What is there: 'ext2/3/4', or null (another file system or none: not looked into). */
  fs: string | null;
  changedBytes: number;
  files: ChangedFile[];
  /** Changed blocks no file or directory owns (inode tables, bitmaps, journal). */
  metadataBlocks: number;
}

/** The tool's path: cron's PATH (/usr/bin:/bin) lacks the sbin directories e2fsprogs and util-linux install into. */
async function tool(name: string): Promise<string> {
  for (const dir of (process.env.PATH ?? '').split(':').concat(['/usr/sbin', '/sbin'])) {
    const p = path.join(dir || '.', name);
    if (await fs.access(p, fs.constants.X_OK).then(() => true, () => false)) return p;
  }
  throw new GenvaultError(`${name} not found: --files needs ${name === 'debugfs' ? 'e2fsprogs' : 'util-linux'} (apt-get install ${name === 'debugfs' ? 'e2fsprogs' : 'fdisk'})`, 'ENOENT');
}

/** Run a command with `input` on stdin; its stdout. */
function run(cmd: string, args: string[], input: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    let err = '';
    child.stdout.on('data', (d: Buffer) => out.push(d));
    child.stderr.on('data', (d: Buffer) => (err = (err + d.toString()).slice(-2000)));
    child.on('error', reject);
    child.on('close', (code) => {
      if (code === 0) resolve(Buffer.concat(out).toString());
      else reject(new GenvaultError(`${path.basename(cmd)} failed (exit ${code}): ${err.trim().split('\n').at(-1) ?? ''}`, 'TOOL'));
    });
    child.stdin.on('error', () => undefined);
    child.stdin.end(input);
  });
}

/** The partitions of a disk image ([] without a partition table). */
async function partitions(img: string): Promise<Array<{ index: number; offset: number; size: number }>> {
  let json: string;
  try {
    json = (await promisify(execFile)(await tool('sfdisk'), ['--json', img], { maxBuffer: 1 << 24 })).stdout;
  } catch {
    return []; // no partition table sfdisk knows
  }
  const t = (JSON.parse(json) as { partitiontable: { sectorsize?: number; partitions?: Array<{ start: number; size: number }> } }).partitiontable;
  const sector = t.sectorsize ?? 512;
  return (t.partitions ?? []).map((p, i) => ({ index: i + 1, offset: p.start * sector, size: p.size * sector }));
}

/** The block size of an ext2/3/4 file system at `offset`, or null if there is none. */
async function extBlockSize(img: string, offset: number): Promise<number | null> {
  const fh = await fs.open(img, 'r');
  try {
    const sb = Buffer.alloc(1024);
    const { bytesRead } = await fh.read(sb, 0, 1024, offset + 1024);
    if (bytesRead < 1024 || sb.readUInt16LE(56) !== EXT_MAGIC) return null;
    const log = sb.readUInt32LE(24);
    return log <= 6 ? 1024 << log : null;
  } finally {
    await fh.close();
  }
}

/** The file system blocks the changed ranges touch inside [offset, offset + size). */
function changedBlocks(ranges: ByteRange[], offset: number, size: number, bs: number): number[] {
  const blocks: number[] = [];
  for (const r of ranges) {
    const s = Math.max(r.offset, offset);
    const e = Math.min(r.offset + r.length, offset + size);
    if (e <= s) continue;
    for (let b = Math.floor((s - offset) / bs); b < Math.ceil((e - offset) / bs); b++) blocks.push(b);
    if (blocks.length > MAX_BLOCKS) throw new GenvaultError(`--files: more than ${MAX_BLOCKS} changed blocks in one file system; diff the byte ranges instead`, 'USAGE');
  }
  return blocks;
}

/** debugfs: the paths of the files owning these blocks, and how many blocks no file owns. */
async function filesOfBlocks(img: string, offset: number, blocks: number[]): Promise<{ paths: string[]; metadata: number }> {
  if (!blocks.length) return { paths: [], metadata: 0 };
  const debugfs = await tool('debugfs');
  // -c: read-only, without the bitmaps; the image is given with its offset (e2fsprogs' unix io option).
  const target = `${img}?offset=${offset}`;
  const icheck = await run(debugfs, ['-c', '-f', '-', target], `icheck ${blocks.join(' ')}\n`);
  const inodes = new Set<number>();
  let metadata = 0;
  for (const line of icheck.split('\n')) {
    const m = /^\d+\t(\d+)$/.exec(line);
    // Inodes 1-10 other than the root directory are reserved (8 is the journal).
    if (m && (Number(m[1]) === 2 || Number(m[1]) > 10)) inodes.add(Number(m[1]));
    else if (m || /^\d+\t<block not found>$/.test(line)) metadata++;
  }
  if (!inodes.size) return { paths: [], metadata };
  const ncheck = await run(debugfs, ['-c', '-f', '-', target], `ncheck ${[...inodes].join(' ')}\n`);
  // ncheck names no path for the root directory itself.
  const paths = new Set<string>(inodes.has(2) ? ['/'] : []);
  for (const line of ncheck.split('\n')) {
    const m = /^\d+\t(\/.*)$/.exec(line);
    if (m) paths.add(m[1]!.replace(/^\/\//, '/'));
  }
  return { paths: [...paths], metadata };
}

const SECTOR = 512;
const READ_STEP = 4 << 20;

/** The parts of `ranges` where a's and b's bytes differ, sector by sector (beyond an image's end counts as differing). */
async function differingSectors(imgA: string, imgB: string, ranges: ByteRange[]): Promise<ByteRange[]> {
  const [fa, fb] = [await fs.open(imgA, 'r'), await fs.open(imgB, 'r')];
  const out: ByteRange[] = [];
  const add = (start: number, end: number) => {
    const last = out.at(-1);
    if (last && last.offset + last.length === start) last.length += end - start;
    else out.push({ offset: start, length: end - start });
  };
  try {
    for (const r of ranges) {
      for (let pos = r.offset; pos < r.offset + r.length; pos += READ_STEP) {
        const n = Math.min(READ_STEP, r.offset + r.length - pos);
        const [ba, bb] = [Buffer.alloc(n), Buffer.alloc(n)];
        const got = [(await fa.read(ba, 0, n, pos)).bytesRead, (await fb.read(bb, 0, n, pos)).bytesRead];
        for (let o = 0; o < n; o += SECTOR) {
          const e = Math.min(o + SECTOR, n);
          const inBoth = e <= got[0]! && e <= got[1]!;
          if (!inBoth || !ba.subarray(o, e).equals(bb.subarray(o, e))) add(pos + o, pos + e);
        }
      }
    }
  } finally {
    await fa.close();
    await fb.close();
  }
  return out;
}

/** The changes of one generation's image: per file system (ext2/3/4 looked into), the owning paths. */
async function sideChanges(img: string, ranges: ByteRange[], size: number): Promise<Array<Omit<FileSystemChanges, 'files'> & { paths: string[] }>> {
  const parts = await partitions(img);
  const areas = parts.length ? parts : [{ index: null as number | null, offset: 0, size }];
  const out = [];
  for (const p of areas) {
    const changedBytes = ranges.reduce((n, r) => n + Math.max(0, Math.min(r.offset + r.length, p.offset + p.size) - Math.max(r.offset, p.offset)), 0);
    const bs = changedBytes ? await extBlockSize(img, p.offset) : null;
    const found = bs ? await filesOfBlocks(img, p.offset, changedBlocks(ranges, p.offset, p.size, bs)) : { paths: [], metadata: 0 };
    out.push({ partition: p.index, offset: p.offset, size: p.size, fs: bs ? 'ext2/3/4' : null, changedBytes, metadataBlocks: found.metadata, paths: found.paths });
  }
  return out;
}

/** Merge A's and B's findings per file system (by offset). */
function merge(a: Awaited<ReturnType<typeof sideChanges>>, b: Awaited<ReturnType<typeof sideChanges>>): FileSystemChanges[] {
  const byOffset = new Map<number, FileSystemChanges & { seen: Map<string, Set<'a' | 'b'>> }>();
  for (const [side, list] of [['a', a], ['b', b]] as const) {
    for (const p of list) {
      let e = byOffset.get(p.offset);
      if (!e) byOffset.set(p.offset, (e = { partition: p.partition, offset: p.offset, size: p.size, fs: p.fs, changedBytes: p.changedBytes, files: [], metadataBlocks: 0, seen: new Map() }));
      e.fs ??= p.fs;
      e.metadataBlocks = Math.max(e.metadataBlocks, p.metadataBlocks);
      for (const f of p.paths) e.seen.set(f, (e.seen.get(f) ?? new Set()).add(side));
    }
  }
  return [...byOffset.values()]
    .sort((x, y) => x.offset - y.offset)
    .map(({ seen, ...fsc }) => ({ ...fsc, files: [...seen].sort(([x], [y]) => (x < y ? -1 : 1)).map(([p, sides]) => ({ path: p, in: [...sides].sort() })) }));
}

/**
 * The changed files between generations a and b, given their changed byte ranges
 * (read/diff.ts). `onMounted` gets the private mount point (to unmount it lazily if the
 * process is interrupted).
 */
export async function changedFiles(repo: Repository, a: Generation, b: Generation, ranges: ByteRange[], onMounted?: (dir: string | null) => void): Promise<FileSystemChanges[]> {
  const dir = await fs.mkdtemp(path.join(await ensureRunDir(), 'diff-'));
  try {
    const handle = await mountRepository(repo, dir, { yieldToWriters: false, log: (l) => process.stderr.write(`${l}\n`) });
    onMounted?.(dir);
    try {
      const img = (g: Generation) => path.join(dir, g.name, generationFileName(g));
      const exact = await differingSectors(img(a), img(b), ranges);
      return merge(await sideChanges(img(a), exact, a.size), await sideChanges(img(b), exact, b.size));
    } finally {
      await handle.unmount();
      onMounted?.(null);
    }
  } finally {
    await fs.rmdir(dir).catch(() => undefined);
  }
}

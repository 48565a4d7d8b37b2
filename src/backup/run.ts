/**
 * One backup run's shared state, held in one place: what is backed up and how (the
 * plan), the counters that become the generation's stats, the damaged chunks it heals,
 * the first failure of any pipeline stage, and what must be cleaned up (the writer
 * registration and the packs it opened). The stages (reader.ts, dedup.ts, packs.ts,
 * map-builder.ts, commit.ts) each keep their own state and share this.
 */
import { GenvaultError } from '../util/errors.js';
import { damagedSet } from '../index/db.js';
import { chunkKey, condemnedKey } from '../format/keys.js';
import type { ChunkMap } from '../format/chunkmap.js';
import { groupSize, type RepoConfig } from '../format/config.js';
import type { Generation, GenerationStats } from '../format/generation.js';
import { workerCores, type WorkerPool } from '../work/pool.js';
import { WriterRegistration, cleanupDeadWriters, gcRunning, type ImageLock } from '../repository/locks.js';
import type { PackWriter } from '../store/pack-writer.js';
import { MetaPack } from '../repository/meta-pack.js';
import { testPause } from '../util/testhooks.js';
import type { Repository } from '../repository/repository.js';
import type { Source } from './source.js';
import { isChunkedSource, sameChunking, type ChunkedSource } from './chunked-source.js';

export interface BackupOptions {
  name: string;
  tags?: string[];
  /** Wait for another backup of the same image instead of failing. */
  wait?: boolean;
  /** The image lock, already taken by the caller (a job holds it across its hooks); left held. */
  lock?: ImageLock;
  onProgress?: (bytesRead: number, total: number | null) => void;
  /** Commit chunk index entries once this many are pending (tests use small values). */
  flushEntries?: number;
  /**
   * Fail (committing nothing) if the source is or yields more than this many bytes: the
   * bound of a source without a size (--max-size). A cut-off image would be a wrong backup.
   */
  maxSize?: number;
  /** Runs the one batch that makes the generation visible (the CLI holds signals across it). */
  commit?: (run: () => Promise<void>) => Promise<void>;
}

/** A test hook point of the backup (the points are listed in backup.ts). */
export const hook = (point: string) => testPause('backup', point, 'before-commit');

export class BackupRun {
  /** Taken before the image lock is waited for: the generation's duration counts the wait. */
  readonly started = Date.now();
  readonly cfg: RepoConfig;
  readonly stats: GenerationStats = {
    bytesRead: 0, zeroBytes: 0, chunks: 0, newChunks: 0, newBytes: 0, newStored: 0, durationMs: 0,
  };
  /** The first failure of a pipeline stage that runs beside the main loop; the main loop throws it. */
  failure: unknown = null;
  /** This run's registration as a writer, from plan() until it is released. */
  writer: WriterRegistration | null = null;
  /** Every pack this run opened; all are closed when the run ends, however it ends. */
  readonly packs: PackWriter[] = [];
  /**
   * Format 4: this run writes metadata records (a leaf record for each new leaf, the map and
   * the record at the end). Decided once registered as a writer, from config.json as it is
   * then (an upgrade may have run since the repository was opened).
   */
  meta = false;
  /** A gc was running when the run started: its condemned chunks count as absent. */
  underGc = false;
  /**
   * Chunks found damaged (by verify, restore or the mount): never reuse them; storing the
   * bytes we read now replaces their index entry and heals every generation using them.
   */
  damaged = new Set<string>();
  /** Damaged chunks this run stored again: their damage marks go with the commit. */
  readonly healed: string[] = [];
  /** The image's latest generation, and its map when positional dedup may use it. */
  prev: Generation | null = null;
  parentMap: ChunkMap | null = null;
  /** A source that chunks at the far end (SSH agent): only chunks the repository lacks are sent. */
  readonly chunked: ChunkedSource | null;
  /**
   * Format 2 keeps each chunk's BLAKE3 in the map, and a local source lets the workers
   * see the bytes: then unchanged chunks are recognised by BLAKE3 against the parent.
   */
  readonly fastDetect: boolean;
  /** Group records (format 3): new chunks compressed together, up to this many raw bytes. */
  readonly group: number;
  pool!: WorkerPool;

  constructor(
    readonly repo: Repository,
    readonly source: Source,
    readonly opts: BackupOptions,
    readonly name: string,
  ) {
    this.cfg = repo.config;
    this.chunked = isChunkedSource(source) ? source : null;
    this.fastDetect = this.cfg.version >= 2 && !this.chunked;
    this.group = groupSize(this.cfg);
  }

  /** The checks, the writer registration and the parent: everything before the first read. */
  async plan(): Promise<void> {
    const { repo, source, name } = this;
    const { maxSize } = this.opts;
    if (maxSize !== undefined && source.size !== null && source.size > maxSize) {
      throw new GenvaultError(`${source.description} is ${source.size} bytes, more than --max-size ${maxSize}`, 'TOO_BIG');
    }
    await cleanupDeadWriters(repo.dir, repo.db, repo.store);
    this.writer = await WriterRegistration.register(repo.dir, `backup ${name}`);
    this.meta = await MetaPack.wantedNow(repo);
    // Registered first, then checked: a gc that starts after this check waits for us.
    this.underGc = await gcRunning(repo.dir);
    this.damaged = await damagedSet(repo.db);
    this.prev = (await repo.generations(name)).at(-1) ?? null;
    this.parentMap = this.prev && !this.underGc ? await repo.chunkMap(this.prev) : null;
    if (this.chunked && !sameChunking(this.chunked.chunking, this.cfg.chunking)) {
      throw new GenvaultError('the source chunks differently from the repository', 'CHUNKING');
    }
    repo.workerCount ??= Math.max(2, workerCores()); // no effect once the pool exists
    this.pool = repo.pool;
  }

  isDamaged(ds: string): boolean {
    return this.damaged.size > 0 && this.damaged.has(ds);
  }

  /**
   * For each digest, whether the repository lacks a copy this generation may use: no
   * index entry, condemned by a running gc, or marked damaged. gc's 'x' marks are read
   * before the entries: gc removes an entry only after marking it, so a chunk read as
   * present here cannot vanish before this generation commits.
   */
  async lacking(digests: Buffer[]): Promise<boolean[]> {
    const db = this.repo.db;
    const condemned = this.underGc ? await db.getMany(digests.map((d) => condemnedKey(d))) : [];
    const found = await db.getMany(digests.map((d) => chunkKey(d)));
    return digests.map((d, k) => found[k] === undefined || found[k] === null || !!condemned[k] || this.isDamaged(d.toString('binary')));
  }

  /** `len` more bytes read: counted, bounded (checkBound) and reported. */
  read(len: number): void {
    this.stats.bytesRead += len;
    this.checkBound();
    this.opts.onProgress?.(this.stats.bytesRead, this.source.size);
  }

  /** A source never yields more than its size, nor more than --max-size. */
  private checkBound(): void {
    const { maxSize } = this.opts;
    const { source, stats } = this;
    if (maxSize !== undefined && stats.bytesRead > maxSize) {
      throw new GenvaultError(`${source.description} yields more than --max-size ${maxSize} bytes`, 'TOO_BIG');
    }
    if (source.size !== null && stats.bytesRead > source.size) {
      throw new GenvaultError(`${source.description} yields more than its size of ${source.size} bytes`, 'LONG_READ');
    }
  }
}

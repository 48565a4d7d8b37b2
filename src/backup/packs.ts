/**
 * Where new chunks go: compressed on a worker into pack records (several segments at
 * once), appended to this run's packs one segment after the other, and made durable in
 * batches: a flush fsyncs the pack, then commits the chunks' index entries and the map
 * leaves finished so far in one index batch (at most FLUSH_ENTRIES entries, when a pack is
 * full, and once at the end). Until its entry is committed, a chunk this run wrote is
 * known here only (ours()): in flight, uncommitted or committing.
 */
import { TOC_FROM_VERSION } from '../format/toc.js';
import { describeFsError } from '../util/errors.js';
import { chunkKey } from '../format/keys.js';
import { COMP_GROUP, ChunkLocation, RECORD_HEADER_SIZE, encodeLocation } from '../format/pack.js';
import { REC_LEAF, encodeMetaRecord } from '../format/meta.js';
import { PackWriter } from '../store/pack-writer.js';
import type { CompressAnswer } from '../work/protocol.js';
import type { AdoptedRecords } from './chunked-source.js';
import { GenvaultError } from '../util/errors.js';
import { BufferPool, DEPTH, recordsRoom } from './buffer-pool.js';
import type { LeafEntry, MapBuilder } from './map-builder.js';
import type { Segment } from './reader.js';
import { hook, type BackupRun } from './run.js';

/** Flush chunk index entries once this many are pending (bounds memory on huge first backups). */
const FLUSH_ENTRIES = 65536;

export type PutOp = { type: 'put'; key: Buffer; value: Buffer };

export class PackSink {
  /** digest (binary string) -> location, for chunks written by this run and not yet in the index */
  private uncommitted = new Map<string, ChunkLocation>();
  /** digests being compressed right now: a repeat of one is not new */
  private readonly inflight = new Set<string>();
  /** digest -> location of chunks whose index batch is being written right now */
  private committing = new Map<string, ChunkLocation>();
  /**
   * Output buffers for compressed records, reused like the segments: a worker writes a
   * segment's records into one, the pack append reads from it, then it is free again.
   * Fixed memory and no garbage, whatever the image size.
   */
  private readonly outBufs: BufferPool;
  private readonly compressTasks: Promise<void>[] = [];
  /** Appends, one after the other, in the order the compressions finish. */
  private appendChain: Promise<void> = Promise.resolve();
  private pack: PackWriter | null = null;
  private flushes = 0;

  constructor(
    private readonly run: BackupRun,
    private readonly map: MapBuilder,
    /** The reader's segment buffers: a segment's is freed here, once its new chunks are compressed. */
    private readonly segBufs: BufferPool,
  ) {
    this.outBufs = new BufferPool(DEPTH, recordsRoom(run.cfg.chunking));
  }

  /** Written by this run: appended, being compressed, or being committed right now. */
  ours(ds: string): boolean {
    return this.uncommitted.has(ds) || this.inflight.has(ds) || this.committing.has(ds);
  }

  /**
   * A segment's new chunks (`newIdx`, indexes into its chunk table) handed to a worker to
   * compress, then to the pack; the segment's buffer is freed once they are compressed (at
   * once if there are none). Waits for an output buffer, and for older compressions when
   * too many are pending.
   */
  async store(seg: Segment, table: Int32Array, entryDigest: Array<Buffer | null>, newIdx: number[]): Promise<void> {
    const { run } = this;
    const { cfg, pool, group } = run;
    if (newIdx.length) {
      const spans = new Int32Array(newIdx.length * 2);
      const ds = new Uint8Array(newIdx.length * 32);
      const names: string[] = [];
      newIdx.forEach((i, k) => {
        spans[k * 2] = table[i * 3]!;
        spans[k * 2 + 1] = table[i * 3 + 1]!;
        ds.set(entryDigest[i]!, k * 32);
        const s = entryDigest[i]!.toString('binary');
        names.push(s);
        this.taking(s, table[i * 3 + 1]!);
      });
      const buf = seg.buf;
      const rawLengths = newIdx.map((i) => table[i * 3 + 1]!);
      const out = await this.outBufs.acquire();
      this.compressTasks.push(
        pool
          .run({ op: 'compress', seg: buf, spans, digests: ds, level: cfg.compression.level, group, out })
          .then((res) => {
            this.segBufs.release(buf);
            this.append(res, names, rawLengths, () => this.outBufs.release(out));
          })
          .catch((e) => {
            this.segBufs.release(buf);
            this.outBufs.release(out);
            run.failure ??= e;
          }),
      );
    } else {
      this.segBufs.release(seg.buf);
    }
    if (this.compressTasks.length > 256) await Promise.all(this.compressTasks.splice(0, 128));
  }

  /**
   * A segment whose new chunks came as records, checked and sealed (a remote writer's):
   * they go to the pack as they are. The records hold exactly the digests of `newIdx`.
   */
  storeRecords(seg: Segment, entryDigest: Array<Buffer | null>, newIdx: number[], records: AdoptedRecords): void {
    this.segBufs.release(seg.buf);
    const want = new Set(newIdx.map((i) => entryDigest[i]!.toString('binary')));
    if (want.size !== records.names.length || !records.names.every((d) => want.has(d))) {
      records.release();
      throw new GenvaultError(`a segment's records hold ${records.names.length} chunks, not the ${want.size} it stores`, 'INTERNAL');
    }
    records.names.forEach((d, i) => this.taking(d, records.rawLengths[i]!));
    this.append(records, records.names, records.rawLengths, () => records.release());
  }

  /** A new chunk on its way to a pack: counted, and known as this run's until its entry is committed. */
  private taking(digest: string, rawLength: number): void {
    this.inflight.add(digest);
    this.run.stats.newChunks++;
    this.run.stats.newBytes += rawLength;
  }

  /** Waits for every compression and append (their failure is in run.failure). */
  async drain(): Promise<void> {
    await Promise.all(this.compressTasks);
    await this.appendChain;
  }

  /** Queues a segment's compressed records for the pack; `release` once they are written. */
  private append(res: CompressAnswer, digests: string[], rawLengths: number[], release: () => void): void {
    this.appendChain = this.appendChain.then(async () => {
      if (this.run.failure) return;
      await this.writablePack();
      const p = this.pack!;
      const base = await p.append(Buffer.from(res.out.buffer, res.out.byteOffset, res.out.byteLength)).catch((e) => {
        throw describeFsError(e, `writing ${this.run.repo.store.describe(p.name)}`);
      });
      this.locate(p, base, res.table, digests, rawLengths);
      if (this.uncommitted.size >= (this.run.opts.flushEntries ?? FLUSH_ENTRIES)) await this.flush();
    }).catch((e) => {
      this.run.failure ??= e;
    }).finally(release);
  }

  /**
   * A pack to append to: the first, the next once the current one is full (flushed and
   * closed), or a new one after a sync sealed the current one (its store writes objects
   * whole: everything in it is committed already).
   */
  private async writablePack(): Promise<void> {
    if (this.pack?.sealed) {
      await this.pack.close();
      await this.openPack();
    } else if (!this.pack || this.pack.size > this.run.cfg.packTargetSize) await this.nextPack();
  }

  /** The first pack, or the next once the current one is full (which is flushed and closed). */
  private async nextPack(): Promise<void> {
    if (this.pack) {
      await this.flush();
      await this.pack.close();
    }
    await this.openPack();
  }

  private async openPack(): Promise<void> {
    const { run } = this;
    this.pack = await PackWriter.create(run.repo.store, { toc: run.cfg.version >= TOC_FROM_VERSION, keys: run.repo.keys, register: (id) => run.writer!.addPack(id) }).catch((e) => { throw describeFsError(e, `creating a pack file in ${run.repo.dir}`); });
    run.packs.push(this.pack);
  }

  /**
   * Where the records just appended at `base` of pack `p` are. Per chunk, the worker's
   * table has: record offset, stored length, compression, offset in the group, group raw
   * length.
   */
  private locate(p: PackWriter, base: number, t: Int32Array, digests: string[], rawLengths: number[]): void {
    const { stats } = this.run;
    for (let i = 0; i < digests.length; i++) {
      const stored = t[i * 5 + 1]!;
      const compression = t[i * 5 + 2]!;
      const loc: ChunkLocation = { packId: p.packId, offset: base + t[i * 5]!, storedLength: stored, rawLength: rawLengths[i]!, compression };
      if (compression === COMP_GROUP) {
        loc.inner = t[i * 5 + 3]!;
        loc.groupRaw = t[i * 5 + 4]!;
      }
      this.uncommitted.set(digests[i]!, loc);
      this.inflight.delete(digests[i]!);
      // A group record counts once, with the first of its members here (its rows are adjacent).
      if (compression !== COMP_GROUP || i === 0 || t[(i - 1) * 5] !== t[i * 5]) stats.newStored += stored + RECORD_HEADER_SIZE;
    }
  }

  /** Make everything appended so far durable and commit its index entries. */
  async flush(): Promise<void> {
    // Take what is pending before the first await: the main loop keeps adding leaves
    // (and lookups must keep seeing chunks in flight) while this batch is written.
    const entries = this.uncommitted;
    const leavesNow = this.map.takePending();
    this.uncommitted = new Map();
    this.committing = entries;
    await this.leafRecords(leavesNow);
    const ops: PutOp[] = [];
    const pack = this.pack;
    if (pack) {
      await pack.sync();
      ops.push(pack.commitOp());
    }
    for (const [d, loc] of entries) ops.push({ type: 'put', key: chunkKey(Buffer.from(d, 'binary')), value: encodeLocation(loc) });
    for (const l of leavesNow) ops.push({ type: 'put', ...l });
    if (ops.length) await this.run.repo.db.batch(ops, { sync: true } as object);
    this.committing = new Map();
    await hook(`flushed-${++this.flushes}`);
  }

  /**
   * Format 4: a leaf record for each of these leaves the index does not hold yet, appended
   * before the flush's sync, so that it is durable before the batch that puts the leaf.
   * One lookup for the whole batch (a leaf covers hundreds of chunks). A leaf another
   * writer is putting at the same time may get a record from each: harmless.
   */
  private async leafRecords(leaves: LeafEntry[]): Promise<void> {
    if (!this.run.meta || !leaves.length) return;
    const found = await this.run.repo.db.getMany(leaves.map((l) => l.key));
    const seen = new Set<string>();
    const recs: Buffer[] = [];
    leaves.forEach((l, i) => {
      const k = l.key.toString('binary');
      if ((found[i] !== undefined && found[i] !== null) || seen.has(k)) return;
      seen.add(k);
      recs.push(encodeMetaRecord({ type: REC_LEAF, leaf: l.value }, this.run.repo.keys));
    });
    if (recs.length) await this.appendRecords(Buffer.concat(recs));
  }

  /**
   * Format 4, at the end of the run (after the last flush): a pack of the generation's own
   * for its records (map, record, and leaf records when the run catches up after an
   * upgrade), so that losing a data pack never loses the generation unnamed: a rebuild
   * still finds it and names the chunks it lacks.
   */
  async generationPack(): Promise<void> {
    await this.pack?.close();
    await this.openPack();
  }

  /** The records appended, synced; returns the `p` entry for the commit batch. */
  async finalRecords(records: Buffer): Promise<PutOp> {
    await this.appendRecords(records);
    await this.pack!.sync();
    return this.pack!.commitOp();
  }

  /** Metadata records appended to the run's pack (a new one if it has none); not synced. */
  async appendRecords(records: Buffer): Promise<void> {
    // Not rolled over when full: this runs inside flush(), before its sync.
    if (!this.pack) await this.nextPack();
    else if (this.pack.sealed) await this.writablePack();
    const p = this.pack!;
    await p.append(records).catch((e) => {
      throw describeFsError(e, `writing ${this.run.repo.store.describe(p.name)}`);
    });
  }
}

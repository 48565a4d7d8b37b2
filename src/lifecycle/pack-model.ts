/**
 * What the index should hold, according to the packs alone (format 4, FORMAT.md "Version
 * 4"): every pack of the store read from start to end (format/scan.ts), its records turned
 * into index entries in a LevelDB of their own. `genvault repair` swaps that database in
 * as the new index; `verify` and repair's dry run compare it with the index in place.
 *
 * Memory stays bounded by the number of generations and packs, not of chunks or leaves:
 * chunk locations, leaves and maps go straight into the model's database in batches, and
 * only generation records and changes (a few hundred bytes each) are held. Every copy of
 * a chunk is kept while scanning, in a second database of its own (`C` digest pack offset
 * inner), so that the first copy (lowest pack id, then offset: the scan's order) can be
 * chosen afterwards without looking anything up per chunk, and so that verify can accept
 * an index entry pointing at any whole copy. That database is removed whole afterwards:
 * deleting its keys from the index instead left the new index three times its size until
 * LevelDB compacted the tombstones away.
 */
import { decodeLeaf, decodeTop } from '../format/chunkmap.js';
import { K_GENMAP, chunkKey, key, leafKey, packKey, packSizeValue, prefixEnd } from '../format/keys.js';
import { REC_CHANGE, REC_GENERATION, REC_GENMAP, REC_LEAF, type GenerationChange } from '../format/meta.js';
import { COMP_GROUP, encodeLocation } from '../format/pack.js';
import { generationKey, type Generation } from '../format/generation.js';
import type { ScanEnd, ScanItem } from '../format/scan.js';
import { getOrNull, type Db } from '../index/db.js';
import { listPacks, scanStoredPack, type StoredPack } from '../store/pack-reader.js';
import type { Store } from '../store/store.js';

/** In the copies database: every whole copy of a chunk, `C` digest(32) pack(16) offset u64 BE inner u32 BE -> location. */
export const K_COPY = 0x43; // 'C'
const BATCH = 8192;

export interface ScannedPack {
  pack: string;
  /** The pack's size when it was read. */
  size: number;
  /** End of its last whole record: the `p` size the model gives it. */
  end: number;
  tail: number;
  tailProblem?: string;
}

export interface DamagedRecord {
  pack: string;
  offset: number;
  length: number;
  problem: string;
}

/** A generation as the packs describe it. */
interface GenState {
  id: string;
  record?: Generation;
  /** The record's JSON as its backup committed it (written back unchanged when no change applies). */
  json?: Buffer;
  hasMap: boolean;
  /** The change with the highest rev (forgotten ones aside). */
  change?: GenerationChange;
  forgotten: boolean;
  /** Name and created from any record or change, for reports. */
  name: string;
  created: string;
}

/** A generation that cannot be restored whole: what it lacks. */
export interface IncompleteGeneration {
  name: string;
  id: string;
  created: string;
  problem: string;
  missingLeaves: number;
  missingChunks: number;
  missingBytes: number;
}

export interface ModelCounts {
  packs: number;
  bytes: number;
  /** Chunk records and group members read (copies included). */
  chunkRecords: number;
  /** Distinct chunks (after finish). */
  chunks: number;
  leafRecords: number;
  generationsFound: number;
}

type Op = { type: 'put' | 'del'; key: Buffer; value?: Buffer };

/** Batched writes to the model's database. */
class Batcher {
  private ops: Op[] = [];
  constructor(private db: Db) {}
  async put(k: Buffer, v: Buffer): Promise<void> {
    this.ops.push({ type: 'put', key: k, value: v });
    if (this.ops.length >= BATCH) await this.flush();
  }
  async del(k: Buffer): Promise<void> {
    this.ops.push({ type: 'del', key: k });
    if (this.ops.length >= BATCH) await this.flush();
  }
  async flush(): Promise<void> {
    if (!this.ops.length) return;
    const ops = this.ops;
    this.ops = [];
    await this.db.batch(ops as never);
  }
}

export interface ModelOptions {
  /** Bytes of packs read so far, of the total. */
  progress?: (done: number, total: number) => void;
  /**
   * How much of a pack to read: its committed size, or null to leave it out (a pack no
   * index entry commits). verify passes the index's `p` sizes, so that what a running or
   * killed writer appended past them (a generation record it never committed among it)
   * is not taken for a generation the index lost; repair, which has no index to trust,
   * reads every pack to its end.
   */
  committed?: (packId: string) => Promise<number | null>;
}

export class PackModel {
  readonly packs: ScannedPack[] = [];
  readonly damaged: DamagedRecord[] = [];
  readonly counts: ModelCounts = { packs: 0, bytes: 0, chunkRecords: 0, chunks: 0, leafRecords: 0, generationsFound: 0 };
  private gens = new Map<string, GenState>();
  private out: Batcher;
  private cp: Batcher;

  constructor(
    /** The index being built. */
    readonly db: Db,
    /** Every copy of every chunk (K_COPY keys). */
    readonly copies: Db,
  ) {
    this.out = new Batcher(db);
    this.cp = new Batcher(copies);
  }

  /** Read every pack of the store into the model (both databases empty). */
  static async build(store: Store, db: Db, copies: Db, opts: ModelOptions = {}): Promise<PackModel> {
    const m = new PackModel(db, copies);
    const packs = await listPacks(store);
    const total = packs.reduce((a, p) => a + p.size, 0);
    let done = 0;
    for (const p of packs) {
      const limit = opts.committed ? await opts.committed(p.packId) : p.size;
      if (limit !== null) await m.scanOne(store, p, Math.min(limit, p.size));
      done += p.size;
      opts.progress?.(done, total);
    }
    await m.out.flush();
    await m.cp.flush();
    m.counts.generationsFound = m.gens.size;
    return m;
  }

  private async scanOne(store: Store, p: StoredPack, size: number): Promise<void> {
    const it = scanStoredPack(store, p, size);
    let r: IteratorResult<ScanItem, ScanEnd>;
    try {
      r = await it.next(); // opens the pack
    } catch (e) {
      // Removed since the listing (gc running beside verify): nothing of it to take.
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return;
      throw e;
    }
    for (; !r.done; r = await it.next()) await this.take(p.packId, r.value);
    const end: ScanEnd = r.value;
    this.packs.push({ pack: p.packId, size: p.size, end: end.end, tail: end.tail, ...(end.tailProblem ? { tailProblem: end.tailProblem } : {}) });
    this.counts.packs++;
    this.counts.bytes += p.size;
    await this.out.put(packKey(p.packId), packSizeValue(end.end));
  }

  private async take(pack: string, item: ScanItem): Promise<void> {
    switch (item.kind) {
      case 'damaged':
        this.damaged.push({ pack, offset: item.offset, length: item.length, problem: item.problem });
        return;
      case 'chunk': {
        const h = item.header;
        const loc = { packId: pack, offset: item.offset, storedLength: h.storedLength, rawLength: h.rawLength, compression: h.compression };
        await this.cp.put(copyKey(h.digest, pack, item.offset, 0), encodeLocation(loc));
        this.counts.chunkRecords++;
        return;
      }
      case 'group': {
        const h = item.header;
        for (const mem of item.members) {
          const loc = { packId: pack, offset: item.offset, storedLength: h.storedLength, rawLength: mem.rawLength, compression: COMP_GROUP, inner: mem.inner, groupRaw: h.rawLength };
          await this.cp.put(copyKey(mem.digest, pack, item.offset, mem.inner), encodeLocation(loc));
          this.counts.chunkRecords++;
        }
        return;
      }
      case 'meta':
        return this.takeMeta(item);
    }
  }

  private async takeMeta(item: Extract<ScanItem, { kind: 'meta' }>): Promise<void> {
    const rec = item.record;
    if (rec.type === REC_LEAF) {
      // Same digest, same bytes: a second copy overwrites the first with itself.
      await this.out.put(leafKey(item.header.digest), rec.leaf);
      this.counts.leafRecords++;
    } else if (rec.type === REC_GENMAP) {
      this.gen(rec.id).hasMap = true;
      await this.out.put(key(K_GENMAP, Buffer.from(rec.id, 'hex')), rec.top);
    } else if (rec.type === REC_GENERATION) {
      const g = this.gen(rec.generation.id, rec.generation);
      if (!g.record || (rec.generation.rev ?? 0) > (g.record.rev ?? 0)) {
        g.record = rec.generation;
        g.json = Buffer.from(rec.json);
      }
    } else if (rec.type === REC_CHANGE) {
      const c = rec.change;
      const g = this.gen(c.id, c);
      if (c.forgotten) g.forgotten = true;
      else if (!g.change || c.rev > g.change.rev) g.change = c;
    }
  }

  private gen(id: string, named?: { name: string; created: string }): GenState {
    let g = this.gens.get(id);
    if (!g) {
      g = { id, hasMap: false, forgotten: false, name: named?.name ?? '?', created: named?.created ?? '' };
      this.gens.set(id, g);
    } else if (named && g.name === '?') {
      g.name = named.name;
      g.created = named.created;
    }
    return g;
  }

  /**
   * Turn the scan into index entries: `c` from each chunk's first copy, `g` for every
   * generation with a record and a map that was not forgotten (changes applied), and no
   * map without such a record.
   */
  async finish(): Promise<Generation[]> {
    await this.chooseCopies();
    const restored: Generation[] = [];
    for (const g of this.gens.values()) {
      const rec = restorable(g);
      if (rec) {
        const same = rec === g.record && g.json;
        await this.out.put(generationKey(rec), same ? g.json! : Buffer.from(JSON.stringify(rec)));
        restored.push(rec);
      } else if (g.hasMap) {
        await this.out.del(key(K_GENMAP, Buffer.from(g.id, 'hex')));
      }
    }
    await this.out.flush();
    return restored.sort((a, b) => (a.name === b.name ? Date.parse(a.created) - Date.parse(b.created) : a.name < b.name ? -1 : 1));
  }

  private async chooseCopies(): Promise<void> {
    let last: Buffer | null = null;
    const gte = Buffer.of(K_COPY);
    for await (const [k, v] of this.copies.iterator({ gte, lt: prefixEnd(gte) })) {
      const digest = k.subarray(1, 33);
      if (!last || !last.equals(digest)) {
        await this.out.put(chunkKey(digest), v);
        last = Buffer.from(digest);
        this.counts.chunks++;
      }
    }
    await this.out.flush();
  }

  /** Generations the packs hold that are not restored, and why (forgotten ones aside). */
  unrestorable(): IncompleteGeneration[] {
    const out: IncompleteGeneration[] = [];
    for (const g of this.gens.values()) {
      if (g.forgotten || restorable(g)) continue;
      const problem = g.record ? 'its map is in no pack' : 'its generation record is in no pack';
      out.push({ name: g.name, id: g.id, created: g.created, problem, missingLeaves: 0, missingChunks: 0, missingBytes: 0 });
    }
    return out;
  }

  /** Restored generations that lack a leaf or a chunk (after finish). */
  async incomplete(restored: Generation[]): Promise<IncompleteGeneration[]> {
    const leaves = new Map<string, { leaves: number; chunks: number; bytes: number }>();
    const out: IncompleteGeneration[] = [];
    for (const g of restored) {
      const top = await getOrNull(this.db, key(K_GENMAP, Buffer.from(g.id, 'hex')));
      const miss = { leaves: 0, chunks: 0, bytes: 0 };
      for (const ref of top ? decodeTop(top) : []) {
        const hex = ref.digest.toString('hex');
        let m = leaves.get(hex);
        if (!m) {
          m = await this.leafMissing(ref);
          leaves.set(hex, m);
        }
        miss.leaves += m.leaves;
        miss.chunks += m.chunks;
        miss.bytes += m.bytes;
      }
      if (miss.chunks || miss.leaves) {
        const problem = miss.leaves ? `${miss.leaves} map leaves and ${miss.chunks} chunks are in no pack` : `${miss.chunks} chunks are in no pack`;
        out.push({ name: g.name, id: g.id, created: g.created, problem, missingLeaves: miss.leaves, missingChunks: miss.chunks, missingBytes: miss.bytes });
      }
    }
    return out;
  }

  /** What of one leaf is in no pack: the whole leaf, or some of its chunks. */
  private async leafMissing(ref: { digest: Buffer; bytes: number; chunks: number }): Promise<{ leaves: number; chunks: number; bytes: number }> {
    const raw = await getOrNull(this.db, leafKey(ref.digest));
    if (!raw) return { leaves: 1, chunks: ref.chunks, bytes: ref.bytes };
    const leaf = decodeLeaf(raw);
    const keys: Buffer[] = [];
    const lengths: number[] = [];
    for (let i = 0; i < leaf.lengths.length; i++) {
      if (leaf.zero[i]) continue;
      keys.push(chunkKey(leaf.digests.subarray(i * 32, i * 32 + 32)));
      lengths.push(leaf.lengths[i]!);
    }
    const found = await this.db.getMany(keys);
    let chunks = 0;
    let bytes = 0;
    found.forEach((v, i) => {
      if (v === undefined || v === null) {
        chunks++;
        bytes += lengths[i]!;
      }
    });
    return { leaves: 0, chunks, bytes };
  }

  /** How far each pack was read whole: pack id -> end of its last whole record. */
  scannedEnds(): Map<string, number> {
    return new Map(this.packs.map((p) => [p.pack, p.end]));
  }
}

/** The generation record to restore: record and map present, not forgotten, the newest change applied. */
function restorable(g: GenState): Generation | null {
  if (g.forgotten || !g.record || !g.hasMap) return null;
  const c = g.change;
  if (!g.record.removed && !(c && c.rev > (g.record.rev ?? 0))) return g.record;
  const rec: Generation = { ...g.record };
  delete rec.removed;
  if (c && c.rev > (rec.rev ?? 0)) {
    if (c.tags) rec.tags = c.tags;
    if (c.protected) rec.protected = true;
    else if (c.protected === false) delete rec.protected;
    rec.rev = c.rev;
  }
  return rec;
}

export function copyKey(digest: Uint8Array, pack: string, offset: number, inner: number): Buffer {
  const k = Buffer.alloc(1 + 32 + 16 + 8 + 4);
  k[0] = K_COPY;
  Buffer.from(digest).copy(k, 1);
  k.write(pack, 33, 16, 'hex');
  k.writeBigUInt64BE(BigInt(offset), 49);
  k.writeUInt32BE(inner, 57);
  return k;
}

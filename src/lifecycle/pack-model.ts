/**
 * What the index should hold, according to the packs alone (format 4, FORMAT.md "Version
 * 4"): every pack of the store read (format/scan.ts: from its tables of contents where it
 * has them, else from start to end), its records turned into index entries in a LevelDB
 * of their own. `genvault repair` swaps that database in as the new index; `verify` and
 * repair's dry run compare it with the index in place.
 *
 * Memory stays bounded by the number of generations and packs, not of chunks or leaves:
 * chunk locations, leaves and maps go straight into the model's database in batches, and
 * only generation records and changes (a few hundred bytes each) are held, besides an
 * exact set of the chunks seen (up to EXACT_CHUNKS), then a fixed-size filter of them. A
 * chunk's first copy (lowest pack id, then offset: the scan's order) becomes its `c` entry
 * as it is met; past the exact set, the filter says whether the chunk may have been met
 * before, and only then is the model looked up. Further
 * copies (gc and heals leave some; normally none) go to a second database (`C` digest
 * pack offset inner), so that verify can accept an index entry pointing at any whole
 * copy; it is removed whole afterwards.
 */
import { decodeTop, walkLeaf } from '../format/chunkmap.js';
import { K_GENMAP, chunkKey, key, leafKey, packKey, packSizeValue, prefixEnd } from '../format/keys.js';
import { REC_CHANGE, REC_GENERATION, REC_GENMAP, REC_LEAF, type GenerationChange } from '../format/meta.js';
import { COMP_GROUP, encodeLocation, type ChunkLocation } from '../format/pack.js';
import { type Generation } from '../format/generation.js';
import { PLAIN_GENERATIONS, type GenerationIndex } from '../format/index-seal.js';
import type { ScanEnd, ScanItem } from '../format/scan.js';
import type { RepoKeys } from '../format/crypto.js';
import { getOrNull, type Db } from '../index/db.js';
import { DigestFilter } from '../util/digest-filter.js';
import { DigestSet } from '../util/digest-set.js';
import { listPacks, scanStoredPack, type StoredPack } from '../store/pack-reader.js';
import type { Store } from '../store/store.js';

/** In the copies database: every whole copy of a chunk but its first, `C` digest(32) pack(16) offset u64 BE inner u32 BE -> location. */
export const K_COPY = 0x43; // 'C'
const BATCH = 8192;
/** Up to this many chunks (about 40 MB) the model knows which it has met without LevelDB. */
const EXACT_CHUNKS = 1 << 20;
/** Leaves looked up at once when finding what generations lack. */
const LEAF_LOOKUPS = 32;

/**
 * The chunk filter's size (log2 of its bits): 16 bits per KiB of packs, as if chunks
 * were stored in 1 KiB on average (most are tens of KiB), between 128 KiB and 16 MiB.
 * Too small a filter only costs lookups, never a wrong answer; a large one costs page
 * faults to fill.
 */
function filterBits(packBytes: number): number {
  const want = Math.max(1, (packBytes / 1024) * 16);
  return Math.min(27, Math.max(20, Math.ceil(Math.log2(want))));
}

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
  /** Distinct chunks. */
  chunks: number;
  /** Packs read from their tables of contents (the others were read header by header). */
  viaToc: number;
  leafRecords: number;
  generationsFound: number;
}

type Batch = ReturnType<Db['batch']>;
/** A promise when the caller must wait for it before the next item; undefined when done. */
type Wait = Promise<unknown> | undefined;

/**
 * Batched writes to the model's database. A full batch is written while the scan goes on
 * (the next one waits for it), so that LevelDB's work overlaps the reading. Chained
 * batches: an array batch costs classic-level five property lookups per operation on the
 * main thread, the largest single item of a rebuild's profile (performance.md, "Rebuilding
 * the index"). db.ts syncs array batches whatever their options; a chained batch is not
 * patched there, so `sync` is given here: a rebuilt index is swapped in only once every
 * batch is on disk.
 */
class Batcher {
  private batch: Batch;
  private count = 0;
  /** Keys put into `batch`, and into the batch being written: what `pending` answers from. */
  private keys: Buffer[] = [];
  private writingKeys: Buffer[] = [];
  /** A set of `keys` (their first `knownCount`) and `writingKeys`, made when first asked. */
  private known = new Set<string>();
  private knownKeys: Buffer[] | null = null;
  private knownCount = 0;
  private writing: Promise<void> = Promise.resolve();
  private failed: unknown = null;
  constructor(private db: Db) {
    this.batch = db.batch();
  }
  /** Add a put; true when the batch is full and `spill` is due. */
  put(k: Buffer, v: Buffer): boolean {
    this.batch.put(k, v);
    this.keys.push(k);
    return ++this.count >= BATCH;
  }
  del(k: Buffer): boolean {
    this.batch.del(k);
    return ++this.count >= BATCH;
  }
  /**
   * Whether `k` was put here and may not be in the database yet (a key already written
   * may also answer yes). Rarely asked (a chunk the filter may have seen): the keys are
   * gathered into a set only when asked.
   */
  pending(k: Buffer): boolean {
    if (this.knownKeys !== this.keys) {
      this.known = new Set(this.writingKeys.map((key) => key.toString('latin1')));
      this.knownKeys = this.keys;
      this.knownCount = 0;
    }
    for (; this.knownCount < this.keys.length; this.knownCount++) this.known.add(this.keys[this.knownCount]!.toString('latin1'));
    return this.known.has(k.toString('latin1'));
  }

  /** Everything put so far written. */
  async flush(): Promise<void> {
    await this.spill();
    await this.writing;
    this.throwFailure();
  }
  /** Start writing the batch (after the previous one is written). */
  async spill(): Promise<void> {
    await this.writing;
    this.throwFailure();
    if (!this.count) return;
    const batch = this.batch;
    this.writingKeys = this.keys;
    this.batch = this.db.batch();
    this.keys = [];
    this.count = 0;
    this.writing = batch.write({ sync: true } as object).then(
      () => void (this.writingKeys = []),
      (e: unknown) => void (this.failed = e),
    );
  }
  private throwFailure(): void {
    if (this.failed) throw this.failed;
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
  /** Read every record header, also of packs that have tables of contents (verify). */
  readAll?: boolean;
  /** An encrypted repository's keys (its metadata records are sealed). */
  keys?: RepoKeys | null;
  /** How the index keys and stores generation records (format 7: sealed); default the plain layout. */
  genIndex?: GenerationIndex;
}

export class PackModel {
  readonly packs: ScannedPack[] = [];
  readonly damaged: DamagedRecord[] = [];
  readonly counts: ModelCounts = { packs: 0, bytes: 0, chunkRecords: 0, chunks: 0, viaToc: 0, leafRecords: 0, generationsFound: 0 };
  private gens = new Map<string, GenState>();
  /** Every chunk met, once the exact set is left behind (null until then). */
  private seen: DigestFilter | null = null;
  /** Every chunk met, exactly, while there are at most EXACT_CHUNKS (then null): no lookups at all. */
  private exact: DigestSet | null = new DigestSet(EXACT_CHUNKS);
  private out: Batcher;
  private cp: Batcher;

  constructor(
    /** The index being built. */
    readonly db: Db,
    /** Every copy of a chunk but the first (K_COPY keys). */
    readonly copies: Db,
    /** The packs' bytes, which bound how many chunks they can hold. */
    private packBytes: number,
    /** How generation records are keyed and stored in the index being built. */
    readonly genIndex: GenerationIndex = PLAIN_GENERATIONS,
  ) {
    this.out = new Batcher(db);
    this.cp = new Batcher(copies);
  }

  /** Read every pack of the store into the model (both databases empty). */
  static async build(store: Store, db: Db, copies: Db, opts: ModelOptions = {}): Promise<PackModel> {
    const packs = await listPacks(store);
    const total = packs.reduce((a, p) => a + p.size, 0);
    const m = new PackModel(db, copies, total, opts.genIndex ?? PLAIN_GENERATIONS);
    let done = 0;
    for (const p of packs) {
      const limit = opts.committed ? await opts.committed(p.packId) : p.size;
      if (limit !== null) await m.scanOne(store, p, Math.min(limit, p.size), opts.readAll === true, opts.keys ?? null);
      done += p.size;
      opts.progress?.(done, total);
    }
    await m.out.flush();
    await m.cp.flush();
    m.counts.generationsFound = m.gens.size;
    return m;
  }

  private async scanOne(store: Store, p: StoredPack, size: number, readAll: boolean, keys: RepoKeys | null): Promise<void> {
    const it = scanStoredPack(store, p, size, { readAll, keys });
    let r: IteratorResult<ScanItem, ScanEnd>;
    try {
      r = await it.next(); // opens the pack
    } catch (e) {
      // Removed since the listing (gc running beside verify): nothing of it to take.
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return;
      throw e;
    }
    for (; !r.done; r = await it.next()) {
      const wait = this.take(p.packId, r.value);
      if (wait) await wait;
    }
    const end: ScanEnd = r.value;
    this.packs.push({ pack: p.packId, size: p.size, end: end.end, tail: end.tail, ...(end.tailProblem ? { tailProblem: end.tailProblem } : {}) });
    this.counts.packs++;
    if (end.viaToc) this.counts.viaToc++;
    this.counts.bytes += p.size;
    if (this.out.put(packKey(p.packId), packSizeValue(end.end))) await this.out.spill();
  }

  /*
   * From here to takeMeta, the work for one item of the scan (tens of thousands per pack)
   * is synchronous and returns a promise only when something must be waited for (a full
   * batch, a lookup past the exact set): an await per call and item was a visible share
   * of a rebuild's time (performance.md).
   */

  private take(pack: string, item: ScanItem): Wait {
    switch (item.kind) {
      case 'damaged':
        this.damaged.push({ pack, offset: item.offset, length: item.length, problem: item.problem });
        return;
      case 'chunk': {
        const h = item.header;
        return this.takeCopy(h.digest, { packId: pack, offset: item.offset, storedLength: h.storedLength, rawLength: h.rawLength, compression: h.compression });
      }
      case 'group':
        return this.takeMembers(pack, item, 0);
      case 'meta':
        return this.takeMeta(item);
    }
  }

  /** A group's members from the `from`th on, one after the other. */
  private takeMembers(pack: string, item: Extract<ScanItem, { kind: 'group' }>, from: number): Wait {
    const h = item.header;
    for (let i = from; i < item.members.length; i++) {
      const mem = item.members[i]!;
      const wait = this.takeCopy(mem.digest, { packId: pack, offset: item.offset, storedLength: h.storedLength, rawLength: mem.rawLength, compression: COMP_GROUP, inner: mem.inner, groupRaw: h.rawLength });
      if (wait) return wait.then(() => this.takeMembers(pack, item, i + 1));
    }
    return undefined;
  }

  /** A copy of a chunk: its `c` entry if it is the first met, else one for the copies database. */
  private takeCopy(digest: Buffer, loc: ChunkLocation): Wait {
    this.counts.chunkRecords++;
    const k = chunkKey(digest);
    const met = this.metExactly(digest);
    if (met === null) return this.metLookedUp(digest, k).then((m) => this.place(m, digest, k, loc));
    return this.place(met, digest, k, loc);
  }

  private place(metBefore: boolean, digest: Buffer, k: Buffer, loc: ChunkLocation): Wait {
    const v = encodeLocation(loc);
    if (metBefore) return this.cp.put(copyKey(digest, loc.packId, loc.offset, loc.inner ?? 0), v) ? this.cp.spill() : undefined;
    this.counts.chunks++;
    return this.out.put(k, v) ? this.out.spill() : undefined;
  }

  /**
   * Whether a copy of this chunk was met before (and remember it as met), when the exact
   * set or the filter can say so without LevelDB; null when only a lookup can.
   */
  private metExactly(digest: Buffer): boolean | null {
    if (this.exact) {
      const fresh = this.exact.add(digest);
      if (this.exact.whole) return !fresh;
      this.seen = this.filterOf(this.exact);
      this.exact = null; // too many to hold: the filter and lookups from here on
    }
    if (this.seen!.maybeHas(digest)) return null;
    this.seen!.add(digest);
    return false;
  }

  /**
   * The filter, made only when the exact set overflows, from the digests it holds: a
   * repository of fewer chunks never pays for filling it (or for its memory).
   */
  private filterOf(exact: DigestSet): DigestFilter {
    const f = new DigestFilter(filterBits(this.packBytes));
    exact.forEach((d) => f.add(d));
    return f;
  }

  /** metExactly's null answered: the filter says "maybe", the batch or the model says for sure. */
  private async metLookedUp(digest: Buffer, k: Buffer): Promise<boolean> {
    if (this.out.pending(k) || (await getOrNull(this.db, k))) return true;
    this.seen!.add(digest);
    return false;
  }

  private takeMeta(item: Extract<ScanItem, { kind: 'meta' }>): Wait {
    const rec = item.record;
    let full = false;
    if (rec.type === REC_LEAF) {
      // Same digest, same bytes: a second copy overwrites the first with itself.
      full = this.out.put(leafKey(item.plainDigest), rec.leaf);
      this.counts.leafRecords++;
    } else if (rec.type === REC_GENMAP) {
      this.gen(rec.id).hasMap = true;
      full = this.out.put(key(K_GENMAP, Buffer.from(rec.id, 'hex')), rec.top);
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
    return full ? this.out.spill() : undefined;
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
   * Finish the index entries: `g` for every generation with a record and a map that was
   * not forgotten (changes applied), and no map without such a record.
   */
  async finish(): Promise<Generation[]> {
    const restored: Generation[] = [];
    for (const g of this.gens.values()) {
      const rec = restorable(g);
      if (rec) {
        const same = rec === g.record && g.json;
        if (this.out.put(this.genIndex.key(rec), this.genIndex.value(rec, same ? g.json! : undefined))) await this.out.spill();
        restored.push(rec);
      } else if (g.hasMap) {
        if (this.out.del(key(K_GENMAP, Buffer.from(g.id, 'hex')))) await this.out.spill();
      }
    }
    await this.out.flush();
    return restored.sort((a, b) => (a.name === b.name ? Date.parse(a.created) - Date.parse(b.created) : a.name < b.name ? -1 : 1));
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
      const refs = top ? decodeTop(top) : [];
      // Leaves not looked at yet, several at a time: one lookup waits for the last.
      const fresh = [...new Map(refs.map((r) => [r.digest.toString('hex'), r])).entries()].filter(([hex]) => !leaves.has(hex));
      for (let i = 0; i < fresh.length; i += LEAF_LOOKUPS) {
        const part = fresh.slice(i, i + LEAF_LOOKUPS);
        const raws = await this.db.getMany(part.map(([, r]) => leafKey(r.digest)));
        const found = await Promise.all(part.map(([, r], k) => this.leafMissing(r, raws[k] ?? null)));
        part.forEach(([hex], k) => leaves.set(hex, found[k]!));
      }
      const miss = { leaves: 0, chunks: 0, bytes: 0 };
      for (const ref of refs) {
        const m = leaves.get(ref.digest.toString('hex'))!;
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

  /** What of one leaf (`raw`, null: not in the model) is in no pack: the whole leaf, or some of its chunks. */
  private async leafMissing(ref: { digest: Buffer; bytes: number; chunks: number }, raw: Buffer | null): Promise<{ leaves: number; chunks: number; bytes: number }> {
    if (!raw) return { leaves: 1, chunks: ref.chunks, bytes: ref.bytes };
    const keys: Buffer[] = [];
    const lengths: number[] = [];
    let chunks = 0;
    let bytes = 0;
    const exact = this.exact;
    walkLeaf(raw, (_i, length, kind, at) => {
      if (kind === 0) return;
      if (!exact) {
        keys.push(chunkKey(raw.subarray(at, at + 32)));
        lengths.push(length);
      } else if (!exact.has(raw, at)) {
        chunks++;
        bytes += length;
      }
    });
    if (!keys.length) return { leaves: 0, chunks, bytes };
    const found = await this.db.getMany(keys);
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

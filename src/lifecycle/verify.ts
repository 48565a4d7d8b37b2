/**
 * Verify a repository, and name the generations and image byte ranges any damage affects.
 *
 * Always (the index check):
 * - every generation record decodes and sits under its own key; its map exists, decodes
 *   and covers the image size;
 * - every map leaf exists, hashes to its digest, decodes and agrees with the map;
 * - every data chunk referenced is in the chunk index; its pack file exists, has its
 *   committed-size record, and is long enough; the 52-byte record header at the chunk's
 *   offset has a good CRC and matches the index entry (lengths, compression, digest).
 * With `full` (or `samplePercent`, for a random share of the chunks per run): the chunk's
 *   record is read, decompressed and re-hashed in the worker pool (batches of ~1 MiB),
 *   exactly as restore and the mount read it. A chunk checked that way needs no separate
 *   header read: the worker checks the header too. Chunks whose map entries carry a
 *   BLAKE3 (format 2) are checked against it as well as against their SHA-256, and every
 *   map entry naming a chunk must give the same BLAKE3: restore and the mount rely on it.
 *
 * Memory stays bounded however many chunks there are: references and chunks go through
 * spill files in buckets (util/spill.ts), and one bucket is checked at a time; what is
 * held whole is per generation, leaf, pack or damaged chunk, not per chunk.
 *
 * Only when damage is found is every map walked a second time, to turn damaged chunks and
 * leaves into (generation, image byte range) pairs.
 *
 * verify takes no lock and runs alongside backups, forget/prune and gc: a chunk that gc
 * moved meanwhile is checked again where the index now says it is, and damage that no
 * generation uses any more (its generation was removed meanwhile) is not reported.
 */
import { GenvaultError } from '../util/errors.js';
import { checkedLeaf, checkedTop, decodeTop, Leaf, LeafRef } from '../format/chunkmap.js';
import { getOrNull, markDamaged } from '../index/db.js';
import { K_GEN, chunkKey, leafKey, packKey, packSizeOf, prefixEnd } from '../format/keys.js';
import { Generation } from '../format/generation.js';
import { NAMES_NEED_KEY } from '../format/index-seal.js';
import {
  COMP_GROUP,
  GROUP_TABLE_MAX,
  PACK_HEADER_SIZE,
  RECORD_HEADER_BAD,
  RECORD_HEADER_SIZE,
  checkRecord,
  isLocation,
  locationOffset,
  packObject,
} from '../format/pack.js';
import { looseModes } from '../repository/perms.js';
import { packsAgree } from './index-diff.js';
import { Repository } from '../repository/repository.js';
import { PackReader, readPackHeader } from '../store/pack-reader.js';
import { Spill } from '../util/spill.js';
import type { LoadItem } from '../work/protocol.js';

export interface VerifyOptions {
  /** Read, decompress and re-hash every referenced chunk. */
  full?: boolean;
  /** Read, decompress and re-hash this percentage (0 < p <= 100) of the chunks, chosen at random. */
  samplePercent?: number;
  /**
   * Progress: packs compared with the index (bytes), map leaves read, then chunks checked
   * (stored bytes of the record headers checked plus raw bytes of the records re-hashed).
   */
  onProgress?: (phase: 'packs' | 'maps' | 'chunks', done: number, total: number) => void;
  /** Random source for sampling (tests). */
  random?: () => number;
  /** Chunks a spill bucket aims at (tests: small buckets cross bucket edges). */
  bucketChunks?: number;
}

export interface Range {
  offset: number;
  length: number;
}

export interface DamagedChunk {
  digest: string;
  problem: string;
  pack: string | null;
  /** Offset of the record in the pack. */
  packOffset: number | null;
  /** Where the chunk is used: per generation, the image byte ranges. */
  affects: Array<{ name: string; id: string; ranges: Range[]; moreRanges?: number }>;
}

export interface DamagedLeaf {
  digest: string;
  problem: string;
}

export interface DamagedPack {
  pack: string;
  problem: string;
}

export interface AffectedGeneration {
  name: string;
  id: string;
  created: string | null;
  problems: string[];
  /** Damaged image byte ranges, merged and sorted; empty when the whole map is unusable. */
  ranges: Range[];
  /** The whole generation is unusable (its record or map is damaged). */
  whole: boolean;
}

export interface VerifyReport {
  ok: boolean;
  mode: 'index' | 'full' | 'sample';
  samplePercent: number | null;
  images: number;
  generations: number;
  leaves: number;
  chunks: number;
  packs: number;
  headersChecked: number;
  chunksRead: number;
  bytesRead: number;
  durationMs: number;
  damagedChunks: DamagedChunk[];
  damagedLeaves: DamagedLeaf[];
  damagedPacks: DamagedPack[];
  damagedGenerations: AffectedGeneration[];
  /**
   * Damage to the index as a whole: what LevelDB reported dropping when it recovered its log
   * (db.ts, DAMAGE_FILE), generation maps left without their record (a lost record), and
   * (format 4) where index and packs disagree: chunk entries pointing where no pack holds
   * the chunk, generations the packs hold that the index lacks.
   */
  indexProblems: string[];
  /** Problems that are not damage and do not make `ok` false: loose permissions (perms.ts). */
  warnings: string[];
}

/** Per (damaged chunk, generation): ranges listed before the rest are only counted. */
/** Per (damaged chunk, generation): ranges listed before the rest are only counted. */
const MAX_RANGES_PER_CHUNK = 64;
const LEAF_BATCH = 256;
const INDEX_BATCH = 4096;
const HEADER_READS = 16;
/** Chunks a bucket aims at: one bucket's table is what verify holds per chunk at once (~30 MB). */
const BUCKET_CHUNKS = 1 << 18;
/** At most 2^13 buckets (chosen by the first 13 bits of a digest); past ~2 billion references buckets grow. */
const MAX_BUCKET_BITS = 13;
/** A reference: digest, whether a BLAKE3 follows, the BLAKE3 (when reads check it; else the digest alone). */
const REF_FAST = 65;
/** A located chunk: digest, location length, location (up to 41), whether a BLAKE3 follows, the BLAKE3. */
const PLACED = 107;
/** Packs go to the buckets in regions of this many bytes (placeBucket). */
const REGION = 4 << 20;

const hex = (bin: string) => Buffer.from(bin, 'binary').toString('hex');

/** The packs chunks lie in, numbered as found. Memory per pack, not per chunk. */
interface Packs {
  ids: string[];
  idx: Map<string, number>;
  /** File size (-1: missing or unreadable) and committed size (-1: unknown), from checkPacks. */
  size: number[];
  committed: number[];
  /** Referenced chunks whose index entry points into the pack. */
  refs: number[];
}

/** Chunks of one bucket (or the ones gc moved), column by column. */
interface ChunkTable {
  digests: string[]; // binary strings
  packOf: Int32Array;
  offsets: Float64Array;
  storedLen: Uint32Array;
  rawLen: Uint32Array;
  comps: Uint8Array;
  /** Group members (format 3): offset in the group's decoded bytes and the group's length; -1 otherwise. */
  inners: Int32Array;
  groupRaws: Uint32Array;
  /** The BLAKE3 the map entries give (binary), when reads check it. */
  fasts: Array<string | null>;
  /** Chunk number -> problem, while the table is worked on. */
  damaged: Map<number, string>;
}

/** A damaged chunk: its problem and where its index entry pointed (pack -1: nowhere). */
interface Damage {
  problem: string;
  pack: number;
  offset: number;
  fast: string | null;
}

/** Selection sampling (Knuth's algorithm S): exactly `want` of the next `left` chunks, each equally likely. */
interface Selection {
  want: number;
  left: number;
  random: () => number;
}

/** What the steps of one verify run share. */
interface VerifyRun {
  repo: Repository;
  opts: VerifyOptions;
  /** Full or sampled reads: map entries' BLAKE3s are collected for them. */
  readsData: boolean;
  bucketChunks: number;
  genProblems: Map<string, AffectedGeneration>; // key: hex of the g key
  gens: Generation[];
  genKeyHex: Map<string, string>; // generation id -> hex of its g key
  leafInfo: Map<string, { bytes: number; chunks: number }>; // leaf digest (binary) -> what maps say
  damagedLeaves: Map<string, string>; // leaf digest (binary) -> problem
  packs: Packs;
  /** Distinct data chunks referenced, and those of them with a chunk index entry. */
  nChunks: number;
  nLocated: number;
  /** Of the located chunks: record headers and payloads (stored), and raw bytes. */
  storedTotal: number;
  rawTotal: number;
  damaged: Map<string, Damage>; // chunk digest (binary) -> damage
  /** Chunks whose map entries give different BLAKE3s, and where they lie once looked up. */
  conflicts: Map<string, { pack: number; offset: number } | null>;
  damagedPacks: DamagedPack[];
  selection: Selection;
  progress: { done: number; total: number };
  headersChecked: number;
  chunksRead: number;
  dataDone: number;
}

type GenBase = Omit<AffectedGeneration, 'problems' | 'ranges' | 'whole'>;

export async function verify(repo: Repository, opts: VerifyOptions = {}): Promise<VerifyReport> {
  const started = Date.now();
  const sample = opts.full ? 100 : opts.samplePercent ?? 0;
  if (!(sample >= 0 && sample <= 100)) throw new GenvaultError(`sample percentage must be between 0 and 100, not ${sample}`, 'USAGE', 2);
  const mode: VerifyReport['mode'] = opts.full ? 'full' : sample > 0 ? 'sample' : 'index';
  const warnings = await looseModes(repo.dir, repo.config);
  const run = newRun(repo, opts);

  // Plan: generation records and maps, index-wide damage.
  await readGenerations(run);
  const indexProblems = await readIndexProblems(repo);
  // Without the key (`verify --without-key`) an encrypted repository's sealed metadata
  // records cannot be read: the structure is checked, the packs are not compared.
  const sealedShut = repo.config.encryption !== undefined && !repo.keys;
  if (sealedShut) warnings.push('verified without the key: record headers, maps and the index only; the packs\' sealed records were not opened or compared with the index');
  if (!repo.genIndex.readable) warnings.push(`${NAMES_NEED_KEY}: generations are shown by id, time and size`);
  if (repo.config.version >= 4 && !sealedShut) {
    const agree = await packsAgree(repo.store, repo.db, (d, t) => opts.onProgress?.('packs', d, t), repo.keys, repo.genIndex);
    indexProblems.push(...agree.problems);
  }

  // Execute: the chunks the leaves name, one bucket at a time (pack by pack within each),
  // then chunks gc moved meanwhile.
  const placed = await indexChunks(run);
  try {
    await checkPacks(run);
    startChecks(run, sample);
    for (let b = 0; b < placed.buckets; b++) await checkBucket(run, await placed.read(b));
  } finally {
    await placed.close();
  }
  if (run.damaged.size) await recheckMoved(run);
  markFastConflicts(run);

  const damagedChunks = await nameAffected(run);
  return buildReport(run, { started, mode, sample, damagedChunks, indexProblems, warnings });
}

function newRun(repo: Repository, opts: VerifyOptions): VerifyRun {
  return {
    repo,
    opts,
    readsData: !!opts.full || !!opts.samplePercent,
    bucketChunks: opts.bucketChunks ?? BUCKET_CHUNKS,
    genProblems: new Map(),
    gens: [],
    genKeyHex: new Map(),
    leafInfo: new Map(),
    damagedLeaves: new Map(),
    packs: { ids: [], idx: new Map(), size: [], committed: [], refs: [] },
    nChunks: 0,
    nLocated: 0,
    storedTotal: 0,
    rawTotal: 0,
    damaged: new Map(),
    conflicts: new Map(),
    damagedPacks: [],
    selection: { want: 0, left: 0, random: opts.random ?? Math.random },
    progress: { done: 0, total: 0 },
    headersChecked: 0,
    chunksRead: 0,
    dataDone: 0,
  };
}

/** Note a problem of a generation (keyed by the hex of its g key); returns its entry. */
function noteGen(run: VerifyRun, key: string, base: GenBase, problem: string, whole: boolean): AffectedGeneration {
  let a = run.genProblems.get(key);
  if (!a) {
    a = { ...base, problems: [], ranges: [], whole: false };
    run.genProblems.set(key, a);
  }
  if (problem && !a.problems.includes(problem)) a.problems.push(problem);
  if (whole) a.whole = true;
  return a;
}

/** Step 1: generation records and their top-level maps; collects the leaves the maps name. */
async function readGenerations(run: VerifyRun): Promise<void> {
  const { repo, leafInfo } = run;
  const gi = repo.genIndex;
  const genPrefix = Buffer.of(K_GEN);
  for await (const [k, v] of repo.db.iterator({ gte: genPrefix, lt: prefixEnd(genPrefix) })) {
    const keyHex = k.toString('hex');
    const fromKey = { ...gi.describe(k), created: null };
    let g: Generation;
    try {
      g = gi.readable ? gi.parse(k, v) : await lockedGeneration(run, k);
    } catch (e) {
      noteGen(run, keyHex, fromKey, `generation record is corrupt (${(e as Error).message})`, true);
      continue;
    }
    run.gens.push(g);
    run.genKeyHex.set(g.id, keyHex);
    const base = { name: g.name, id: g.id, created: g.created };
    const top = await getOrNull(repo.db, Repository.mapKey(g.id));
    if (!top) {
      noteGen(run, keyHex, base, 'generation map is missing', true);
      continue;
    }
    let refs: LeafRef[];
    try {
      refs = checkedTop(top, g);
    } catch (e) {
      noteGen(run, keyHex, base, (e as Error).message, true);
      continue;
    }
    for (const r of refs) {
      const d = r.digest.toString('binary');
      if (!leafInfo.has(d)) leafInfo.set(d, { bytes: r.bytes, chunks: r.chunks });
    }
  }
}

/**
 * What the key of a sealed generation record (format 7, opened without the key) and its
 * map say: id, time, size and leaves; its name is the key's tag (names need the key).
 */
async function lockedGeneration(run: VerifyRun, k: Buffer): Promise<Generation> {
  const gi = run.repo.genIndex;
  const { name, id } = gi.describe(k);
  const created = gi.createdOf(k);
  if (created === null || !Number.isFinite(new Date(created).getTime())) throw new Error('not a generation key of this format');
  const top = await getOrNull(run.repo.db, Repository.mapKey(id));
  const refs = top ? decodeTop(top) : [];
  const size = refs.reduce((a, r) => a + r.bytes, 0);
  const g: Generation = {
    id,
    name,
    created: new Date(created).toISOString(),
    size,
    chunking: { ...run.repo.config.chunking },
    leaves: refs.length,
    tags: [],
    source: '',
    parent: null,
    stats: { bytesRead: 0, zeroBytes: 0, chunks: 0, newChunks: 0, newBytes: 0, newStored: 0, durationMs: 0 },
  };
  return g;
}

/** Damage to the index as a whole: what LevelDB dropped on recovery, maps without a record. */
async function readIndexProblems(repo: Repository): Promise<string[]> {
  const indexProblems = (await repo.lostGenerationMaps()).map((id) => `generation map ${id} has no generation record: the index lost that generation's record`);
  if (repo.indexDamage) {
    indexProblems.unshift(`LevelDB dropped or found corrupt records when it last recovered the index: ${repo.indexDamage.trim().split('\n').slice(1).map((l) => l.trim()).join(' | ')}`);
  }
  return indexProblems;
}
/**
 * Steps 2 and 3: the data chunks every leaf names, looked up in the chunk index. At tens
 * of millions of chunks neither the references nor the chunks fit in memory as objects
 * (~300 bytes each), so both go through spill files: references into buckets by their
 * digest's first bits (all references to a chunk meet in one bucket, where they are
 * deduplicated and looked up in digest order), located chunks into buckets by pack.
 * Returns the latter, for the checks.
 */
async function indexChunks(run: VerifyRun): Promise<Spill> {
  let upper = 0; // references, at most: zero chunks are counted too
  for (const l of run.leafInfo.values()) upper += l.chunks;
  const bits = Math.min(MAX_BUCKET_BITS, Math.max(0, Math.ceil(Math.log2(upper / run.bucketChunks))));
  const refs = await Spill.create('genvault-verify-refs', 1 << bits, run.readsData ? REF_FAST : 32);
  let placed: Spill | null = null;
  try {
    await readLeaves(run, refs, bits);
    await refs.finish();
    placed = await Spill.create('genvault-verify-chunks', 1 << bits, PLACED);
    for (let b = 0; b < refs.buckets; b++) await resolveBucket(run, await refs.read(b), refs.recordSize, placed);
    await placed.finish();
    return placed;
  } catch (e) {
    await placed?.close();
    throw e;
  } finally {
    await refs.close();
  }
}

/** Step 2: the leaves, checked; their data chunk references (and BLAKE3s) into `refs`. */
async function readLeaves(run: VerifyRun, refs: Spill, bits: number): Promise<void> {
  const { repo, leafInfo, damagedLeaves } = run;
  const leafList = [...leafInfo.keys()];
  const rec = Buffer.alloc(refs.recordSize);
  for (let at = 0; at < leafList.length; at += LEAF_BATCH) {
    const batch = leafList.slice(at, at + LEAF_BATCH);
    const vals = await repo.db.getMany(batch.map((d) => leafKey(Buffer.from(d, 'binary'))));
    for (let j = 0; j < batch.length; j++) {
      const d = batch[j]!;
      const raw = vals[j];
      if (!raw) {
        damagedLeaves.set(d, 'map leaf is missing');
        continue;
      }
      let leaf: Leaf;
      try {
        leaf = checkedLeaf(raw, Buffer.from(d, 'binary'), leafInfo.get(d)!);
      } catch (e) {
        damagedLeaves.set(d, (e as Error).message);
        continue;
      }
      for (let ci = 0; ci < leaf.lengths.length; ci++) {
        if (leaf.zero[ci]) continue;
        leaf.digests.copy(rec, 0, ci * 32, ci * 32 + 32);
        if (refs.recordSize === REF_FAST) {
          rec[32] = leaf.hasFast[ci] ? 1 : 0;
          if (leaf.hasFast[ci]) leaf.fast.copy(rec, 33, ci * 32, ci * 32 + 32);
        }
        refs.append(bits ? ((rec[0]! << 8) | rec[1]!) >>> (16 - bits) : 0, rec);
      }
    }
    await refs.drain();
    run.opts.onProgress?.('maps', Math.min(at + LEAF_BATCH, leafList.length), leafList.length);
  }
}

/**
 * Step 3, one bucket of references: the distinct chunks, each looked up in the chunk index
 * (a missing or corrupt entry is damage), the located ones into `placed` by pack. Every
 * map entry naming a chunk must give the same BLAKE3 (restore and the mount rely on it):
 * full reads check the data against it.
 */
async function resolveBucket(run: VerifyRun, refs: Buffer, size: number, placed: Spill): Promise<void> {
  const fastOf = new Map<string, string>(); // chunk -> BLAKE3 ('' while no entry gave one)
  for (let at = 0; at < refs.length; at += size) {
    const d = refs.toString('binary', at, at + 32);
    const f = size === REF_FAST && refs[at + 32] ? refs.toString('binary', at + 33, at + 65) : '';
    const seen = fastOf.get(d);
    if (seen === undefined || (seen === '' && f)) fastOf.set(d, f);
    else if (f && seen !== f) run.conflicts.set(d, null);
  }
  const list = [...fastOf.keys()].sort(); // key order: the lookups walk the index forwards
  const rec = Buffer.alloc(PLACED);
  for (let at = 0; at < list.length; at += INDEX_BATCH) {
    const part = list.slice(at, at + INDEX_BATCH);
    const vals = await run.repo.db.getMany(part.map((d) => chunkKey(Buffer.from(d, 'binary'))));
    part.forEach((d, j) => {
      run.nChunks++;
      const fast = fastOf.get(d) || null;
      const v = vals[j];
      if (!isLocation(v)) {
        run.damaged.set(d, { problem: v ? 'its chunk index entry is corrupt' : 'missing from the chunk index', pack: -1, offset: 0, fast });
        return;
      }
      const loc = Buffer.from(v.buffer, v.byteOffset, v.byteLength);
      const p = packNumber(run.packs, loc);
      run.packs.refs[p]!++;
      run.nLocated++;
      run.storedTotal += RECORD_HEADER_SIZE + loc.readUInt32LE(24);
      run.rawTotal += loc.readUInt32LE(28);
      if (run.conflicts.has(d)) run.conflicts.set(d, { pack: p, offset: locationOffset(loc) });
      rec.write(d, 0, 32, 'binary');
      rec[32] = loc.length;
      loc.copy(rec, 33);
      rec[74] = fast === null ? 0 : 1;
      if (fast !== null) rec.write(fast, 75, 32, 'binary');
      placed.append(placeBucket(p, locationOffset(loc), placed.buckets), rec);
    });
    await placed.drain();
  }
}

/**
 * The spill bucket of a chunk at `offset` in pack number p: each 4 MiB region of a pack goes
 * to a bucket of its own (the next region to the next bucket), so that a bucket holds no
 * more of a pack than a region's chunks, however many a pack holds. A group record's
 * members share their offset: they meet in one bucket, and are read as one.
 */
function placeBucket(p: number, offset: number, buckets: number): number {
  return ((Math.imul(p, 0x9e3779b1) >>> 0) + Math.floor(offset / REGION)) % buckets;
}

/** The number of the pack a location names, numbering it if new. */
function packNumber(packs: Packs, loc: Buffer): number {
  const id = loc.toString('hex', 0, 16);
  let p = packs.idx.get(id);
  if (p === undefined) {
    p = packs.ids.length;
    packs.ids.push(id);
    packs.idx.set(id, p);
    packs.size.push(-1);
    packs.committed.push(-1);
    packs.refs.push(0);
  }
  return p;
}

/** A table of n chunks. */
function newTable(n: number): ChunkTable {
  return {
    digests: new Array<string>(n),
    packOf: new Int32Array(n),
    offsets: new Float64Array(n),
    storedLen: new Uint32Array(n),
    rawLen: new Uint32Array(n),
    comps: new Uint8Array(n),
    inners: new Int32Array(n),
    groupRaws: new Uint32Array(n),
    fasts: new Array<string | null>(n).fill(null),
    damaged: new Map(),
  };
}

/** Chunk i of t: digest d, index entry `loc`. */
function setChunk(run: VerifyRun, t: ChunkTable, i: number, d: string, loc: Buffer, fast: string | null): void {
  const group = loc.length >= 41;
  t.digests[i] = d;
  t.packOf[i] = packNumber(run.packs, loc);
  t.offsets[i] = locationOffset(loc);
  t.storedLen[i] = loc.readUInt32LE(24);
  t.rawLen[i] = loc.readUInt32LE(28);
  t.comps[i] = loc[32]!;
  t.inners[i] = group ? loc.readUInt32LE(33) : -1;
  t.groupRaws[i] = group ? loc.readUInt32LE(37) : 0;
  t.fasts[i] = fast;
}

/** A bucket of located chunks (PLACED records) as a table. */
function tableOf(run: VerifyRun, slab: Buffer): ChunkTable {
  const n = slab.length / PLACED;
  const t = newTable(n);
  for (let i = 0, at = 0; i < n; i++, at += PLACED) {
    const loc = slab.subarray(at + 33, at + 33 + slab[at + 32]!);
    const fast = slab[at + 74] ? slab.toString('binary', at + 75, at + 107) : null;
    setChunk(run, t, i, slab.toString('binary', at, at + 32), loc, fast);
  }
  return t;
}

/** Step 4: every pack a chunk lies in: present, committed size recorded, header sound. */
async function checkPacks(run: VerifyRun): Promise<void> {
  const { packs } = run;
  for (let p = 0; p < packs.ids.length; p++) {
    const id = packs.ids[p]!;
    packs.size[p] = await checkPackFile(run, id);
    packs.committed[p] = await readCommitted(run, id);
    if (packs.size[p]! >= 0 && packs.committed[p]! > packs.size[p]!) {
      run.damagedPacks.push({ pack: id, problem: `pack file has ${packs.size[p]} bytes, less than its committed size ${packs.committed[p]}` });
    }
  }
}

/** A pack file's size (-1: unreadable), noting a missing, unreadable or damaged header. */
async function checkPackFile(run: VerifyRun, id: string): Promise<number> {
  let h: Awaited<ReturnType<typeof readPackHeader>>;
  try {
    h = await readPackHeader(run.repo.store, id);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code !== 'ENOENT') {
      run.damagedPacks.push({ pack: id, problem: `pack file unreadable (${code ?? (e as Error).message})` });
      return -1;
    }
    h = null; // deleted between the stat and the read
  }
  if (!h) {
    run.damagedPacks.push({ pack: id, problem: 'pack file is missing' });
    return -1;
  }
  if (!h.headerOk) run.damagedPacks.push({ pack: id, problem: 'pack header is damaged' });
  return h.size;
}

/** A pack's committed size from its index record (-1: unknown), noting a missing or corrupt one. */
async function readCommitted(run: VerifyRun, id: string): Promise<number> {
  const rec = await getOrNull(run.repo.db, packKey(id));
  let committed = -1;
  if (!rec) run.damagedPacks.push({ pack: id, problem: 'no committed-size record in the index' });
  else {
    try {
      committed = packSizeOf(rec);
    } catch {
      run.damagedPacks.push({ pack: id, problem: 'committed-size record is corrupt' });
    }
  }
  return committed;
}

/** Sampling and progress, once the chunks are counted: full reads of all, none, or a share. */
function startChecks(run: VerifyRun, sample: number): void {
  const s = run.selection;
  s.left = run.nLocated;
  s.want = sample >= 100 ? run.nLocated : Math.min(run.nLocated, Math.ceil((run.nChunks * sample) / 100));
  // Progress counts stored bytes for a header check and raw bytes for a full read.
  const share = run.nLocated ? s.want / run.nLocated : 0;
  run.progress.total = Math.round(run.rawTotal * share + run.storedTotal * (1 - share));
}

/** Whether the next chunk gets the full read (algorithm S: exactly `want` of `left`, at random). */
function chooseFull(s: Selection): boolean {
  const pick = s.want > 0 && (s.want >= s.left || s.random() * s.left < s.want);
  s.left--;
  if (pick) s.want--;
  return pick;
}

const byPackOffset = (t: ChunkTable) => (a: number, b: number) =>
  t.packOf[a]! - t.packOf[b]! || t.offsets[a]! - t.offsets[b]! || t.inners[a]! - t.inners[b]!;

/**
 * Step 5, one bucket: in pack and offset order, each chunk's place is checked against its
 * pack, then its record header is read, or its whole record is read, decompressed and
 * re-hashed in the worker pool. Damage found is kept by digest.
 */
async function checkBucket(run: VerifyRun, slab: Buffer): Promise<void> {
  const t = tableOf(run, slab);
  const order = Array.from({ length: t.digests.length }, (_, i) => i).sort(byPackOffset(t));
  const headerList: number[] = [];
  const fullList: number[] = [];
  for (const i of order) {
    const full = chooseFull(run.selection);
    const problem = placeProblem(run.packs, t, i);
    if (problem) t.damaged.set(i, problem);
    else (full ? fullList : headerList).push(i);
  }
  for (let s = 0; s < headerList.length; ) {
    const p = t.packOf[headerList[s]!]!;
    let e = s;
    while (e < headerList.length && t.packOf[headerList[e]!] === p) e++;
    await checkPackHeaders(run, t, p, headerList.slice(s, e));
    s = e;
  }
  await readChunks(run, t, fullList, true);
  for (const [i, problem] of t.damaged) run.damaged.set(t.digests[i]!, { problem, pack: t.packOf[i]!, offset: t.offsets[i]!, fast: t.fasts[i]! });
}

/** What is wrong with where chunk i's index entry points (pack present, long enough, committed), or null. */
function placeProblem(packs: Packs, t: ChunkTable, i: number): string | null {
  const p = t.packOf[i]!;
  const end = t.offsets[i]! + RECORD_HEADER_SIZE + t.storedLen[i]!;
  if (packs.size[p] === -1) return `pack ${packs.ids[p]} is missing or unreadable`;
  if (t.offsets[i]! < PACK_HEADER_SIZE) return `chunk index entry points into the pack header`;
  if (end > packs.size[p]!) return `pack file too short (record ends at ${end}, the file has ${packs.size[p]} bytes)`;
  if (packs.committed[p]! >= 0 && end > packs.committed[p]!) return `record lies past the pack's committed size ${packs.committed[p]}`;
  return null;
}

/** Check the record headers of these chunks of pack p, HEADER_READS reads at a time. */
async function checkPackHeaders(run: VerifyRun, t: ChunkTable, p: number, group: number[]): Promise<void> {
  const id = run.packs.ids[p]!;
  let pack: PackReader;
  try {
    pack = await PackReader.open(run.repo.store, id);
  } catch (err) {
    for (const i of group) t.damaged.set(i, `cannot open pack ${id}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
    return;
  }
  let next = 0;
  const workerFn = async () => {
    const buf = Buffer.alloc(RECORD_HEADER_SIZE + GROUP_TABLE_MAX);
    while (next < group.length) {
      const i = group[next++]!;
      const problem = await headerProblem(t, i, pack, buf);
      if (problem !== null) t.damaged.set(i, problem);
      run.headersChecked++;
      run.progress.done += RECORD_HEADER_SIZE + t.storedLen[i]!;
      run.opts.onProgress?.('chunks', run.progress.done, run.progress.total);
    }
  };
  await Promise.all(Array.from({ length: HEADER_READS }, workerFn));
}

/** Read and check chunk i's record header (and a group record's member table); null when good. */
async function headerProblem(t: ChunkTable, i: number, pack: PackReader, buf: Buffer): Promise<string | null> {
  const group = t.comps[i] === COMP_GROUP;
  // A group member's record: the header and its member table.
  const want = group ? RECORD_HEADER_SIZE + Math.min(t.storedLen[i]!, GROUP_TABLE_MAX) : RECORD_HEADER_SIZE;
  if ((await pack.read(t.offsets[i]!, want, buf)) !== want) return RECORD_HEADER_BAD;
  const entry = {
    storedLength: t.storedLen[i]!,
    rawLength: t.rawLen[i]!,
    compression: t.comps[i]!,
    inner: group ? t.inners[i]! : undefined,
    groupRaw: group ? t.groupRaws[i]! : undefined,
    digest: Buffer.from(t.digests[i]!, 'binary'),
  };
  const c = checkRecord(buf.subarray(0, want), entry, { tableDigest: true });
  return 'problem' in c ? c.problem : null;
}

/** Pool messages under way, and the first that failed. */
interface InFlight {
  running: Set<Promise<void>>;
  failure: unknown;
}

/** Read, decompress and re-hash these chunks of t, ~1 MiB per message; sets or clears their entry in t.damaged. */
async function readChunks(run: VerifyRun, t: ChunkTable, list: number[], progress: boolean): Promise<void> {
  // Without the key nothing can be opened: chunks keep what their headers said.
  if (!list.length || (run.repo.config.encryption && !run.repo.keys)) return;
  list.sort(byPackOffset(t));
  const pool = run.repo.pool;
  const flight: InFlight = { running: new Set(), failure: null };
  let batch: number[] = [];
  let bytes = 0;
  for (const i of list) {
    // A full batch goes out before the next chunk, unless that is another member of the
    // same group record (a group split between two workers is decoded by both).
    const last = batch[batch.length - 1];
    const sameGroup = last !== undefined && t.comps[i] === COMP_GROUP && t.comps[last] === COMP_GROUP && t.packOf[i] === t.packOf[last] && t.offsets[i] === t.offsets[last];
    if (bytes >= 1 << 20 && !sameGroup) {
      sendBatch(run, t, batch, progress, flight);
      batch = [];
      bytes = 0;
      while (flight.running.size >= pool.size * 2) await Promise.race(flight.running);
      if (flight.failure) break;
    }
    batch.push(i);
    bytes += t.rawLen[i]!;
  }
  if (batch.length && !flight.failure) sendBatch(run, t, batch, progress, flight);
  await Promise.all(flight.running);
  if (flight.failure) throw new GenvaultError(`verify could not read chunks: ${(flight.failure as Error).message}`, 'VERIFY', 2);
}

/** Send one batch to the worker pool (one pass: O_DIRECT) and record its results. */
function sendBatch(run: VerifyRun, t: ChunkTable, batch: number[], progress: boolean, flight: InFlight): void {
  const items: LoadItem[] = batch.map((i) => {
    const fast = t.fasts[i];
    return {
      file: packObject(run.packs.ids[t.packOf[i]!]!),
      offset: t.offsets[i]!,
      storedLength: t.storedLen[i]!,
      rawLength: t.rawLen[i]!,
      compression: t.comps[i]!,
      ...(t.comps[i] === COMP_GROUP ? { inner: t.inners[i]!, groupRaw: t.groupRaws[i]! } : {}),
      digest: Uint8Array.from(Buffer.from(t.digests[i]!, 'binary')),
      fast: fast == null ? null : Uint8Array.from(Buffer.from(fast, 'binary')),
      alsoSha: true,
    };
  });
  const task = run.repo.pool
    .run({ op: 'loadMany', items, direct: true }) // one pass: O_DIRECT
    .then(
      ({ results }) => {
        results.forEach((r, k) => {
          if (r.damaged) t.damaged.set(batch[k]!, r.damaged);
          else t.damaged.delete(batch[k]!);
        });
        if (!progress) return;
        const raw = batch.reduce((a, i) => a + t.rawLen[i]!, 0);
        run.chunksRead += batch.length;
        run.dataDone += raw;
        run.progress.done += raw;
        run.opts.onProgress?.('chunks', run.progress.done, run.progress.total);
      },
      (e) => {
        flight.failure ??= e;
      },
    )
    .finally(() => flight.running.delete(task));
  flight.running.add(task);
}

/**
 * Step 5b: a running gc may have moved chunks (repacked them) after we read their index
 * entries, and deleted the old pack: as the readers do, look a damaged chunk up again and,
 * if the index now names another place, check it there. Only a chunk whose current index
 * entry points at bad data is damage.
 */
async function recheckMoved(run: VerifyRun): Promise<void> {
  const { packs } = run;
  const suspects = [...run.damaged].filter(([, x]) => x.pack >= 0);
  const moved: Array<{ d: string; loc: Buffer; was: Damage }> = [];
  for (let at = 0; at < suspects.length; at += INDEX_BATCH) {
    const part = suspects.slice(at, at + INDEX_BATCH);
    const vals = await run.repo.db.getMany(part.map(([d]) => chunkKey(Buffer.from(d, 'binary'))));
    part.forEach(([d, was], k) => {
      const v = vals[k];
      if (!isLocation(v)) return;
      const loc = Buffer.from(v.buffer, v.byteOffset, v.byteLength);
      if (loc.toString('hex', 0, 16) === packs.ids[was.pack] && locationOffset(loc) === was.offset) return;
      moved.push({ d, loc, was });
    });
  }
  const t = newTable(moved.length);
  moved.forEach((m, i) => {
    setChunk(run, t, i, m.d, m.loc, m.was.fast);
    packs.refs[m.was.pack]!--;
    packs.refs[t.packOf[i]!]!++;
  });
  await readChunks(run, t, moved.map((_, i) => i), false);
  moved.forEach((m, i) => {
    const problem = t.damaged.get(i);
    if (problem === undefined) run.damaged.delete(m.d);
    else run.damaged.set(m.d, { problem, pack: t.packOf[i]!, offset: t.offsets[i]!, fast: m.was.fast });
  });
  // Pack problems of packs nothing points into any more (gc emptied and removed them).
  run.damagedPacks = run.damagedPacks.filter((dp) => packs.refs[packs.idx.get(dp.pack)!]! > 0);
}

/**
 * Chunks whose map entries name two different BLAKE3s: restore and the mount would fail
 * on one of them whatever the data holds.
 */
function markFastConflicts(run: VerifyRun): void {
  for (const [d, place] of run.conflicts) {
    if (place && !run.damaged.has(d)) run.damaged.set(d, { problem: 'its map entries disagree on its BLAKE3', ...place, fast: null });
  }
}


/**
 * Step 6: name the generations and image ranges the damage affects (a second walk of every
 * map, only when there is damage); drop damage no generation uses, and remember the rest.
 */
async function nameAffected(run: VerifyRun): Promise<Map<string, DamagedChunk>> {
  const damagedChunks = new Map<string, DamagedChunk>();
  for (const [d, x] of run.damaged) {
    damagedChunks.set(d, {
      digest: hex(d),
      problem: x.problem,
      pack: x.pack >= 0 ? run.packs.ids[x.pack]! : null,
      packOffset: x.pack >= 0 ? x.offset : null,
      affects: [],
    });
  }
  const referencedLeaves = new Set<string>();
  if (damagedChunks.size || run.damagedLeaves.size) {
    for (const g of run.gens) await nameInGeneration(run, g, damagedChunks, referencedLeaves);
  }
  // Damage that no current generation uses belonged to a generation removed meanwhile
  // (forget/prune running alongside); gc will remove it, it is not worth an alarm.
  for (const [d, c] of damagedChunks) if (!c.affects.length) damagedChunks.delete(d);
  // Remember the damage: the next backup whose source still holds these bytes heals them.
  for (const c of damagedChunks.values()) await markDamaged(run.repo.db, Buffer.from(c.digest, 'hex'), 'verify');
  for (const d of run.damagedLeaves.keys()) if (!referencedLeaves.has(d)) run.damagedLeaves.delete(d);
  return damagedChunks;
}

/** One generation's use of damaged chunks and leaves: per chunk, the image ranges. */
interface GenScan {
  keyHex: string;
  base: GenBase;
  perChunk: Map<string, { ranges: Range[]; more: number }>;
  chunkProblems: Map<string, number>; // problem -> distinct damaged chunks
}

/** Walk generation g's map, naming the image ranges its damaged leaves and chunks cover. */
async function nameInGeneration(run: VerifyRun, g: Generation, damagedChunks: Map<string, DamagedChunk>, referencedLeaves: Set<string>): Promise<void> {
  const keyHex = run.genKeyHex.get(g.id) ?? run.repo.generationKey(g).toString('hex');
  if (run.genProblems.get(keyHex)?.whole) return;
  const top = await getOrNull(run.repo.db, Repository.mapKey(g.id));
  if (!top) return;
  const refs = checkedTop(top, g);
  const scan: GenScan = { keyHex, base: { name: g.name, id: g.id, created: g.created }, perChunk: new Map(), chunkProblems: new Map() };
  let leafStart = 0;
  for (const r of refs) {
    const start = leafStart;
    leafStart += r.bytes;
    const ld = r.digest.toString('binary');
    const leafProblem = run.damagedLeaves.get(ld);
    if (leafProblem) referencedLeaves.add(ld);
    if (leafProblem) {
      noteGen(run, keyHex, scan.base, `${leafProblem} (leaf ${r.digest.toString('hex')})`, false).ranges.push({ offset: start, length: r.bytes });
    } else if (damagedChunks.size) {
      // (cached: leaves are shared between generations)
      const leaf = await run.repo.loadLeaf(r.digest).catch(() => null);
      if (!leaf) continue; // removed since the first pass (gc): nothing to name here
      nameInLeaf(run, scan, leaf, start, damagedChunks);
    }
  }
  const a = run.genProblems.get(keyHex);
  if (a) {
    for (const [problem, n] of scan.chunkProblems) a.problems.push(`${n} damaged chunk(s): ${problem}`);
  }
  for (const [cd, pc] of scan.perChunk) {
    const entry: DamagedChunk['affects'][number] = { name: g.name, id: g.id, ranges: pc.ranges };
    if (pc.more) entry.moreRanges = pc.more;
    damagedChunks.get(cd)!.affects.push(entry);
  }
}

/** The damaged chunks of one leaf (at image offset start) in the generation being scanned. */
function nameInLeaf(run: VerifyRun, scan: GenScan, leaf: Leaf, start: number, damagedChunks: Map<string, DamagedChunk>): void {
  for (let ci = 0; ci < leaf.lengths.length; ci++) {
    if (leaf.zero[ci]) continue;
    const cd = leaf.digests.toString('binary', ci * 32, ci * 32 + 32);
    const dc = damagedChunks.get(cd);
    if (!dc) continue;
    const range = { offset: start + leaf.starts[ci]!, length: leaf.lengths[ci]! };
    noteGen(run, scan.keyHex, scan.base, '', false).ranges.push(range);
    if (!scan.perChunk.has(cd)) scan.chunkProblems.set(dc.problem, (scan.chunkProblems.get(dc.problem) ?? 0) + 1);
    let pc = scan.perChunk.get(cd);
    if (!pc) scan.perChunk.set(cd, (pc = { ranges: [], more: 0 }));
    if (pc.ranges.length < MAX_RANGES_PER_CHUNK) pc.ranges.push(range);
    else pc.more++;
  }
}

/** The report, from the run and what verify() kept of its steps. */
function buildReport(
  run: VerifyRun,
  r: {
    started: number;
    mode: VerifyReport['mode'];
    sample: number;
    damagedChunks: Map<string, DamagedChunk>;
    indexProblems: string[];
    warnings: string[];
  },
): VerifyReport {
  const { genProblems, damagedLeaves, damagedPacks } = run;
  const damagedGenerations = [...genProblems.values()]
    .map((a) => ({ ...a, ranges: mergeRanges(a.ranges) }))
    .sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : (a.created ?? '').localeCompare(b.created ?? '')));
  return {
    ok: !r.damagedChunks.size && !damagedLeaves.size && !damagedPacks.length && !damagedGenerations.length && !r.indexProblems.length,
    mode: r.mode,
    samplePercent: r.mode === 'sample' ? r.sample : null,
    images: new Set(run.gens.map((g) => g.name)).size,
    generations: run.gens.length + [...genProblems.values()].filter((a) => a.created === null).length,
    leaves: run.leafInfo.size,
    chunks: run.nChunks,
    packs: run.packs.ids.length,
    headersChecked: run.headersChecked,
    chunksRead: run.chunksRead,
    bytesRead: run.dataDone,
    durationMs: Date.now() - r.started,
    damagedChunks: [...r.damagedChunks.values()].sort((a, b) => a.digest.localeCompare(b.digest)),
    damagedLeaves: [...damagedLeaves].map(([d, problem]) => ({ digest: hex(d), problem })),
    damagedPacks,
    damagedGenerations,
    indexProblems: r.indexProblems,
    warnings: r.warnings,
  };
}

/** Sort and merge overlapping or touching ranges. */
export function mergeRanges(ranges: Range[]): Range[] {
  const sorted = [...ranges].sort((a, b) => a.offset - b.offset);
  const out: Range[] = [];
  for (const r of sorted) {
    const last = out.at(-1);
    if (last && r.offset <= last.offset + last.length) {
      last.length = Math.max(last.length, r.offset + r.length - last.offset);
    } else out.push({ ...r });
  }
  return out;
}

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
  ChunkLocation,
  checkRecord,
  decodeLocation,
  isLocation,
  packObject,
} from '../format/pack.js';
import { looseModes } from '../repository/perms.js';
import { packsAgree } from './index-diff.js';
import { Repository } from '../repository/repository.js';
import { PackReader, readPackHeader } from '../store/pack-reader.js';
import type { LoadItem } from '../work/protocol.js';

export interface VerifyOptions {
  /** Read, decompress and re-hash every referenced chunk. */
  full?: boolean;
  /** Read, decompress and re-hash this percentage (0 < p <= 100) of the chunks, chosen at random. */
  samplePercent?: number;
  /** Progress in bytes: stored bytes whose headers were checked, then raw bytes re-hashed. */
  onProgress?: (phase: 'packs' | 'headers' | 'data', done: number, total: number) => void;
  /** Random source for sampling (tests). */
  random?: () => number;
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
const MAX_RANGES_PER_CHUNK = 64;
const LEAF_BATCH = 256;
const INDEX_BATCH = 4096;
const HEADER_READS = 16;

const hex = (bin: string) => Buffer.from(bin, 'binary').toString('hex');

/** The distinct data chunks the maps reference, column by column, and the packs they lie in. */
interface ChunkTable {
  chunkIdx: Map<string, number>; // chunk digest (binary) -> index into the arrays below
  digests: string[];
  packOf: number[]; // index into packIds, -1 when not in the index
  offsets: number[];
  storedLen: number[];
  rawLen: number[];
  comps: number[];
  /** Group members (format 3): offset in the group's decoded bytes and the group's length; -1 otherwise. */
  inners: number[];
  groupRaws: number[];
  packIds: string[];
  packIdx: Map<string, number>;
}

/** What the steps of one verify run share. */
interface VerifyRun {
  repo: Repository;
  opts: VerifyOptions;
  /** Full or sampled reads: map entries' BLAKE3s are collected for them. */
  readsData: boolean;
  genProblems: Map<string, AffectedGeneration>; // key: hex of the g key
  gens: Generation[];
  genKeyHex: Map<string, string>; // generation id -> hex of its g key
  leafInfo: Map<string, { bytes: number; chunks: number }>; // leaf digest (binary) -> what maps say
  fastOf: Map<string, string>; // chunk digest -> BLAKE3 from the map entries (binary strings)
  fastConflicts: Set<string>; // chunks whose map entries give different BLAKE3s
  damagedLeaves: Map<string, string>; // leaf digest (binary) -> problem
  chunks: ChunkTable;
  damaged: Map<number, string>; // chunk index -> problem
  damagedPacks: DamagedPack[];
  headersChecked: number;
  chunksRead: number;
  dataDone: number;
  dataTotal: number;
}

type GenBase = Omit<AffectedGeneration, 'problems' | 'ranges' | 'whole'>;

export async function verify(repo: Repository, opts: VerifyOptions = {}): Promise<VerifyReport> {
  const started = Date.now();
  const sample = opts.full ? 100 : opts.samplePercent ?? 0;
  if (!(sample >= 0 && sample <= 100)) throw new GenvaultError(`sample percentage must be between 0 and 100, not ${sample}`, 'USAGE', 2);
  const mode: VerifyReport['mode'] = opts.full ? 'full' : sample > 0 ? 'sample' : 'index';
  const warnings = await looseModes(repo.dir, repo.config);
  const run = newRun(repo, opts);

  // Plan: generation records and maps, index-wide damage, leaves and the chunks they name.
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
  await readLeaves(run);
  const nChunks = run.chunks.digests.length;
  const nPacks = run.chunks.packIds.length;

  // Execute: packs, record headers, full reads, chunks gc moved meanwhile.
  await checkPacks(run);
  const fullSet = chooseFullSet(nChunks, sample, opts.random);
  await checkHeaders(run, fullSet);
  await readData(run, fullSet);
  if (run.damaged.size) await recheckMoved(run);
  markFastConflicts(run);

  const damagedChunks = await nameAffected(run);
  return buildReport(run, { started, mode, sample, nChunks, nPacks, damagedChunks, indexProblems, warnings });
}

function newRun(repo: Repository, opts: VerifyOptions): VerifyRun {
  return {
    repo,
    opts,
    readsData: !!opts.full || !!opts.samplePercent,
    genProblems: new Map(),
    gens: [],
    genKeyHex: new Map(),
    leafInfo: new Map(),
    fastOf: new Map(),
    fastConflicts: new Set(),
    damagedLeaves: new Map(),
    chunks: {
      chunkIdx: new Map(),
      digests: [],
      packOf: [],
      offsets: [],
      storedLen: [],
      rawLen: [],
      comps: [],
      inners: [],
      groupRaws: [],
      packIds: [],
      packIdx: new Map(),
    },
    damaged: new Map(),
    damagedPacks: [],
    headersChecked: 0,
    chunksRead: 0,
    dataDone: 0,
    dataTotal: 0,
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

/** Step 2: the leaves, and the data chunks they reference with their index entries. */
async function readLeaves(run: VerifyRun): Promise<void> {
  const { repo, leafInfo, damagedLeaves } = run;
  let pending: string[] = [];
  const queued = new Set<string>();
  const leafList = [...leafInfo.keys()];
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
      let leaf;
      try {
        leaf = checkedLeaf(raw, Buffer.from(d, 'binary'), leafInfo.get(d)!);
      } catch (e) {
        damagedLeaves.set(d, (e as Error).message);
        continue;
      }
      queueLeafChunks(run, leaf, queued, pending);
    }
    if (pending.length >= INDEX_BATCH) {
      await resolveChunks(run, pending);
      pending = [];
      queued.clear();
    }
  }
  await resolveChunks(run, pending);
  queued.clear();
}

/** Queue a leaf's data chunks not seen yet, and collect the BLAKE3s its entries give. */
function queueLeafChunks(run: VerifyRun, leaf: Leaf, queued: Set<string>, pending: string[]): void {
  const { fastOf, fastConflicts } = run;
  for (let ci = 0; ci < leaf.lengths.length; ci++) {
    if (leaf.zero[ci]) continue;
    const cd = leaf.digests.toString('binary', ci * 32, ci * 32 + 32);
    if (run.readsData && leaf.hasFast[ci]) {
      // Reads check a chunk against the BLAKE3 in its map entry: every entry naming the
      // chunk must give the same one, and full reads check it against the data.
      const f = leaf.fast.toString('binary', ci * 32, ci * 32 + 32);
      const seen = fastOf.get(cd);
      if (seen === undefined) fastOf.set(cd, f);
      else if (seen !== f) fastConflicts.add(cd);
    }
    if (run.chunks.chunkIdx.has(cd) || queued.has(cd)) continue;
    queued.add(cd);
    pending.push(cd);
  }
}

/** Look up the index entries of these chunks (one getMany) and add them to the table. */
async function resolveChunks(run: VerifyRun, list: string[]): Promise<void> {
  if (!list.length) return;
  const t = run.chunks;
  const vals = await run.repo.db.getMany(list.map((d) => chunkKey(Buffer.from(d, 'binary'))));
  list.forEach((d, j) => {
    const i = t.digests.length;
    t.chunkIdx.set(d, i);
    t.digests.push(d);
    const v = vals[j];
    if (!isLocation(v)) {
      setLocation(t, i, null);
      run.damaged.set(i, v ? 'its chunk index entry is corrupt' : 'missing from the chunk index');
      return;
    }
    setLocation(t, i, decodeLocation(v));
  });
}

/** Set chunk i's place (null: not in the index), numbering its pack if new. */
function setLocation(t: ChunkTable, i: number, loc: ChunkLocation | null): void {
  let p = -1;
  if (loc) {
    const known = t.packIdx.get(loc.packId);
    if (known !== undefined) p = known;
    else {
      p = t.packIds.length;
      t.packIds.push(loc.packId);
      t.packIdx.set(loc.packId, p);
    }
  }
  t.packOf[i] = p;
  t.offsets[i] = loc ? loc.offset : 0;
  t.storedLen[i] = loc ? loc.storedLength : 0;
  t.rawLen[i] = loc ? loc.rawLength : 0;
  t.comps[i] = loc ? loc.compression : 0;
  t.inners[i] = loc?.inner ?? -1;
  t.groupRaws[i] = loc?.groupRaw ?? 0;
}

/** Step 3: packs present, committed size recorded, long enough for every record. */
async function checkPacks(run: VerifyRun): Promise<void> {
  const t = run.chunks;
  const packSize: number[] = new Array(t.packIds.length).fill(-1); // -1: unreadable
  const packCommitted: number[] = new Array(t.packIds.length).fill(-1); // -1: unknown
  for (let p = 0; p < t.packIds.length; p++) {
    const id = t.packIds[p]!;
    packSize[p] = await checkPackFile(run, id);
    const committed = await readCommitted(run, id);
    packCommitted[p] = committed;
    if (packSize[p]! >= 0 && committed > packSize[p]!) {
      run.damagedPacks.push({ pack: id, problem: `pack file has ${packSize[p]} bytes, less than its committed size ${committed}` });
    }
  }
  for (let i = 0; i < t.digests.length; i++) {
    if (run.damaged.has(i)) continue;
    const p = t.packOf[i]!;
    const end = t.offsets[i]! + RECORD_HEADER_SIZE + t.storedLen[i]!;
    if (packSize[p] === -1) run.damaged.set(i, `pack ${t.packIds[p]} is missing or unreadable`);
    else if (t.offsets[i]! < PACK_HEADER_SIZE) run.damaged.set(i, `chunk index entry points into the pack header`);
    else if (end > packSize[p]!) run.damaged.set(i, `pack file too short (record ends at ${end}, the file has ${packSize[p]} bytes)`);
    else if (packCommitted[p]! >= 0 && end > packCommitted[p]!) run.damaged.set(i, `record lies past the pack's committed size ${packCommitted[p]}`);
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

/** Which chunks get the full read: all, a random sample, or none. */
function chooseFullSet(nChunks: number, sample: number, random: (() => number) | undefined): Uint8Array {
  const fullSet = new Uint8Array(nChunks);
  if (sample >= 100) fullSet.fill(1);
  else if (sample > 0 && nChunks) {
    const want = Math.min(nChunks, Math.ceil((nChunks * sample) / 100));
    const order = Array.from({ length: nChunks }, (_, i) => i);
    const rnd = random ?? Math.random;
    for (let k = 0; k < want; k++) {
      const j = k + Math.floor(rnd() * (nChunks - k));
      [order[k], order[j]] = [order[j]!, order[k]!];
      fullSet[order[k]!] = 1;
    }
  }
  return fullSet;
}

const byPackOffset = (t: ChunkTable) => (a: number, b: number) =>
  t.packOf[a]! - t.packOf[b]! || t.offsets[a]! - t.offsets[b]! || t.inners[a]! - t.inners[b]!;

/** Step 4: record headers of the chunks that do not get the full read, pack by pack. */
async function checkHeaders(run: VerifyRun, fullSet: Uint8Array): Promise<void> {
  const t = run.chunks;
  const headerList: number[] = [];
  for (let i = 0; i < t.digests.length; i++) if (!fullSet[i] && !run.damaged.has(i)) headerList.push(i);
  headerList.sort(byPackOffset(t));
  const progress = { done: 0, total: headerList.reduce((a, i) => a + RECORD_HEADER_SIZE + t.storedLen[i]!, 0) };
  for (let s = 0; s < headerList.length; ) {
    const p = t.packOf[headerList[s]!]!;
    let e = s;
    while (e < headerList.length && t.packOf[headerList[e]!] === p) e++;
    const group = headerList.slice(s, e);
    s = e;
    await checkPackHeaders(run, p, group, progress);
  }
}

/** Check the record headers of these chunks of pack p, HEADER_READS reads at a time. */
async function checkPackHeaders(run: VerifyRun, p: number, group: number[], progress: { done: number; total: number }): Promise<void> {
  const t = run.chunks;
  let pack: PackReader;
  try {
    pack = await PackReader.open(run.repo.store, t.packIds[p]!);
  } catch (err) {
    for (const i of group) run.damaged.set(i, `cannot open pack ${t.packIds[p]}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
    return;
  }
  let next = 0;
  const workerFn = async () => {
    const buf = Buffer.alloc(RECORD_HEADER_SIZE + GROUP_TABLE_MAX);
    while (next < group.length) {
      const i = group[next++]!;
      const problem = await headerProblem(t, i, pack, buf);
      if (problem !== null) run.damaged.set(i, problem);
      run.headersChecked++;
      progress.done += RECORD_HEADER_SIZE + t.storedLen[i]!;
      run.opts.onProgress?.('headers', progress.done, progress.total);
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

/** Step 5: full reads of the chosen chunks, decompressed and re-hashed in the worker pool. */
async function readData(run: VerifyRun, fullSet: Uint8Array): Promise<void> {
  const t = run.chunks;
  const fullList: number[] = [];
  for (let i = 0; i < t.digests.length; i++) if (fullSet[i] && !run.damaged.has(i)) fullList.push(i);
  run.dataTotal = fullList.reduce((a, i) => a + t.rawLen[i]!, 0);
  await readChunks(run, fullList, true);
}

/** Pool messages under way, and the first that failed. */
interface InFlight {
  running: Set<Promise<void>>;
  failure: unknown;
}

/** Read, decompress and re-hash these chunks, ~1 MiB per message; sets or clears their entry in `damaged`. */
async function readChunks(run: VerifyRun, list: number[], progress: boolean): Promise<void> {
  // Without the key nothing can be opened: chunks keep what their headers said.
  if (!list.length || (run.repo.config.encryption && !run.repo.keys)) return;
  const t = run.chunks;
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
      sendBatch(run, batch, progress, flight);
      batch = [];
      bytes = 0;
      while (flight.running.size >= pool.size * 2) await Promise.race(flight.running);
      if (flight.failure) break;
    }
    batch.push(i);
    bytes += t.rawLen[i]!;
  }
  if (batch.length && !flight.failure) sendBatch(run, batch, progress, flight);
  await Promise.all(flight.running);
  if (flight.failure) throw new GenvaultError(`verify could not read chunks: ${(flight.failure as Error).message}`, 'VERIFY', 2);
}

/** Send one batch to the worker pool (one pass: O_DIRECT) and record its results. */
function sendBatch(run: VerifyRun, batch: number[], progress: boolean, flight: InFlight): void {
  const t = run.chunks;
  const items: LoadItem[] = batch.map((i) => {
    const fast = run.fastOf.get(t.digests[i]!);
    return {
      file: packObject(t.packIds[t.packOf[i]!]!),
      offset: t.offsets[i]!,
      storedLength: t.storedLen[i]!,
      rawLength: t.rawLen[i]!,
      compression: t.comps[i]!,
      ...(t.comps[i] === COMP_GROUP ? { inner: t.inners[i]!, groupRaw: t.groupRaws[i]! } : {}),
      digest: Uint8Array.from(Buffer.from(t.digests[i]!, 'binary')),
      fast: fast === undefined ? null : Uint8Array.from(Buffer.from(fast, 'binary')),
      alsoSha: true,
    };
  });
  const task = run.repo.pool
    .run({ op: 'loadMany', items, direct: true }) // one pass: O_DIRECT
    .then(
      ({ results }) => {
        results.forEach((r, k) => {
          if (r.damaged) run.damaged.set(batch[k]!, r.damaged);
          else run.damaged.delete(batch[k]!);
        });
        if (!progress) return;
        run.chunksRead += batch.length;
        run.dataDone += batch.reduce((a, i) => a + t.rawLen[i]!, 0);
        run.opts.onProgress?.('data', run.dataDone, run.dataTotal);
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
  const t = run.chunks;
  const suspects = [...run.damaged.keys()].filter((i) => t.packOf[i]! >= 0);
  const moved: number[] = [];
  for (let at = 0; at < suspects.length; at += INDEX_BATCH) {
    const part = suspects.slice(at, at + INDEX_BATCH);
    const vals = await run.repo.db.getMany(part.map((i) => chunkKey(Buffer.from(t.digests[i]!, 'binary'))));
    part.forEach((i, k) => {
      const v = vals[k];
      if (!isLocation(v)) return;
      const loc = decodeLocation(v);
      if (loc.packId === t.packIds[t.packOf[i]!] && loc.offset === t.offsets[i]) return;
      setLocation(t, i, loc);
      moved.push(i);
    });
  }
  await readChunks(run, moved, false);
  // Pack problems of packs nothing points into any more (gc emptied and removed them).
  const used = new Set(t.packOf);
  for (let k = run.damagedPacks.length - 1; k >= 0; k--) {
    if (!used.has(t.packIdx.get(run.damagedPacks[k]!.pack)!)) run.damagedPacks.splice(k, 1);
  }
}

/**
 * Chunks whose map entries name two different BLAKE3s: restore and the mount would fail
 * on one of them whatever the data holds.
 */
function markFastConflicts(run: VerifyRun): void {
  for (const cd of run.fastConflicts) {
    const i = run.chunks.chunkIdx.get(cd);
    if (i !== undefined && !run.damaged.has(i)) run.damaged.set(i, 'its map entries disagree on its BLAKE3');
  }
}

/**
 * Step 6: name the generations and image ranges the damage affects (a second walk of every
 * map, only when there is damage); drop damage no generation uses, and remember the rest.
 */
async function nameAffected(run: VerifyRun): Promise<Map<string, DamagedChunk>> {
  const t = run.chunks;
  const damagedChunks = new Map<string, DamagedChunk>();
  for (const [i, problem] of run.damaged) {
    const p = t.packOf[i]!;
    damagedChunks.set(t.digests[i]!, {
      digest: hex(t.digests[i]!),
      problem,
      pack: p >= 0 ? t.packIds[p]! : null,
      packOffset: p >= 0 ? t.offsets[i]! : null,
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
    nChunks: number;
    nPacks: number;
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
    chunks: r.nChunks,
    packs: r.nPacks,
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

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
import fs from 'node:fs/promises';
import { GenvaultError } from '../util/errors.js';
import { checkedLeaf, checkedTop, LeafRef } from './chunkmap.js';
import { K_GEN, chunkKey, getOrNull, leafKey, packKey, prefixEnd, markDamaged } from './db.js';
import { Generation, describeGenerationKey, parseGenerationRecord } from './generation.js';
import {
  COMP_GROUP,
  GROUP_TABLE_MAX,
  PACK_HEADER_SIZE,
  PACK_MAGIC,
  RECORD_HEADER_BAD,
  RECORD_HEADER_SIZE,
  checkRecord,
  decodeLocation,
  isLocation,
  packPath,
} from './pack.js';
import { looseModes } from './perms.js';
import { Repository } from './repository.js';
import type { LoadItem, LoadResult } from './worker.js';

export interface VerifyOptions {
  /** Read, decompress and re-hash every referenced chunk. */
  full?: boolean;
  /** Read, decompress and re-hash this percentage (0 < p <= 100) of the chunks, chosen at random. */
  samplePercent?: number;
  /** Progress in bytes: stored bytes whose headers were checked, then raw bytes re-hashed. */
  onProgress?: (phase: 'headers' | 'data', done: number, total: number) => void;
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
   * (db.ts, DAMAGE_FILE), and generation maps left without their record (a lost record).
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

// max-lines waiver: to be split into named steps (the house issue); its six numbered phases (records, leaves, packs, headers, full reads, affected ranges) run inline
export async function verify(repo: Repository, opts: VerifyOptions = {}): Promise<VerifyReport> {
  const started = Date.now();
  const sample = opts.full ? 100 : opts.samplePercent ?? 0;
  if (!(sample >= 0 && sample <= 100)) throw new GenvaultError(`sample percentage must be between 0 and 100, not ${sample}`, 'USAGE', 2);
  const mode: VerifyReport['mode'] = opts.full ? 'full' : sample > 0 ? 'sample' : 'index';
  const warnings = await looseModes(repo.dir, repo.config);

  const genProblems = new Map<string, AffectedGeneration>(); // key: hex of the g key
  const noteGen = (key: string, base: Omit<AffectedGeneration, 'problems' | 'ranges' | 'whole'>, problem: string, whole: boolean) => {
    let a = genProblems.get(key);
    if (!a) {
      a = { ...base, problems: [], ranges: [], whole: false };
      genProblems.set(key, a);
    }
    if (problem && !a.problems.includes(problem)) a.problems.push(problem);
    if (whole) a.whole = true;
  };

  // --- 1. Generation records and their top-level maps.
  const gens: Generation[] = [];
  const leafInfo = new Map<string, { bytes: number; chunks: number }>(); // leaf digest (binary) -> what maps say
  const readsData = !!opts.full || !!opts.samplePercent;
  const fastOf = new Map<string, string>(); // chunk digest -> BLAKE3 from the map entries (binary strings)
  const fastConflicts = new Set<string>(); // chunks whose map entries give different BLAKE3s
  const genPrefix = Buffer.of(K_GEN);
  for await (const [k, v] of repo.db.iterator({ gte: genPrefix, lt: prefixEnd(genPrefix) })) {
    const keyHex = k.toString('hex');
    const fromKey = { ...describeGenerationKey(k), created: null };
    let g: Generation;
    try {
      g = parseGenerationRecord(k, v);
    } catch (e) {
      noteGen(keyHex, fromKey, `generation record is corrupt (${(e as Error).message})`, true);
      continue;
    }
    gens.push(g);
    const base = { name: g.name, id: g.id, created: g.created };
    const top = await getOrNull(repo.db, Repository.mapKey(g.id));
    if (!top) {
      noteGen(keyHex, base, 'generation map is missing', true);
      continue;
    }
    let refs: LeafRef[];
    try {
      refs = checkedTop(top, g);
    } catch (e) {
      noteGen(keyHex, base, (e as Error).message, true);
      continue;
    }
    for (const r of refs) {
      const d = r.digest.toString('binary');
      if (!leafInfo.has(d)) leafInfo.set(d, { bytes: r.bytes, chunks: r.chunks });
    }
  }

  const indexProblems = (await repo.lostGenerationMaps()).map((id) => `generation map ${id} has no generation record: the index lost that generation's record`);
  if (repo.indexDamage) {
    indexProblems.unshift(`LevelDB dropped or found corrupt records when it last recovered the index: ${repo.indexDamage.trim().split('\n').slice(1).map((l) => l.trim()).join(' | ')}`);
  }

  // --- 2. Leaves, and the set of data chunks they reference with their index entries.
  const damagedLeaves = new Map<string, string>(); // leaf digest (binary) -> problem
  const chunkIdx = new Map<string, number>(); // chunk digest (binary) -> index into the arrays below
  const digests: string[] = [];
  const packOf: number[] = []; // index into packIds, -1 when not in the index
  const offsets: number[] = [];
  const storedLen: number[] = [];
  const rawLen: number[] = [];
  const comps: number[] = [];
  /** Group members (format 3): offset in the group's decoded bytes and the group's length; -1 otherwise. */
  const inners: number[] = [];
  const groupRaws: number[] = [];
  const damaged = new Map<number, string>(); // chunk index -> problem
  const packIds: string[] = [];
  const packIdx = new Map<string, number>();

  let pendingChunks: string[] = [];
  const resolveChunks = async () => {
    const list = pendingChunks;
    pendingChunks = [];
    if (!list.length) return;
    const vals = await repo.db.getMany(list.map((d) => chunkKey(Buffer.from(d, 'binary'))));
    list.forEach((d, j) => {
      const i = digests.length;
      chunkIdx.set(d, i);
      digests.push(d);
      const v = vals[j];
      if (!isLocation(v)) {
        packOf.push(-1);
        offsets.push(0);
        storedLen.push(0);
        rawLen.push(0);
        comps.push(0);
        inners.push(-1);
        groupRaws.push(0);
        damaged.set(i, v ? 'its chunk index entry is corrupt' : 'missing from the chunk index');
        return;
      }
      const loc = decodeLocation(v);
      let p = packIdx.get(loc.packId);
      if (p === undefined) {
        p = packIds.length;
        packIds.push(loc.packId);
        packIdx.set(loc.packId, p);
      }
      packOf.push(p);
      offsets.push(loc.offset);
      storedLen.push(loc.storedLength);
      rawLen.push(loc.rawLength);
      comps.push(loc.compression);
      inners.push(loc.inner ?? -1);
      groupRaws.push(loc.groupRaw ?? 0);
    });
  };
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
      for (let ci = 0; ci < leaf.lengths.length; ci++) {
        if (leaf.zero[ci]) continue;
        const cd = leaf.digests.toString('binary', ci * 32, ci * 32 + 32);
        if (readsData && leaf.hasFast[ci]) {
          // Reads check a chunk against the BLAKE3 in its map entry: every entry naming the
          // chunk must give the same one, and full reads check it against the data.
          const f = leaf.fast.toString('binary', ci * 32, ci * 32 + 32);
          const seen = fastOf.get(cd);
          if (seen === undefined) fastOf.set(cd, f);
          else if (seen !== f) fastConflicts.add(cd);
        }
        if (chunkIdx.has(cd) || queued.has(cd)) continue;
        queued.add(cd);
        pendingChunks.push(cd);
      }
    }
    if (pendingChunks.length >= INDEX_BATCH) {
      await resolveChunks();
      queued.clear();
    }
  }
  await resolveChunks();
  queued.clear();
  const nChunks = digests.length;
  const nPacks = packIds.length;

  // --- 3. Packs: present, committed size recorded, long enough for every record.
  const damagedPacks: DamagedPack[] = [];
  const packSize: number[] = new Array(packIds.length).fill(-1); // -1: unreadable
  const packCommitted: number[] = new Array(packIds.length).fill(-1); // -1: unknown
  for (let p = 0; p < packIds.length; p++) {
    const id = packIds[p]!;
    const file = packPath(repo.dir, id);
    let fh: fs.FileHandle | null = null;
    try {
      fh = await fs.open(file, 'r');
      packSize[p] = (await fh.stat()).size;
      const head = Buffer.alloc(PACK_HEADER_SIZE);
      const { bytesRead } = await fh.read(head, 0, PACK_HEADER_SIZE, 0);
      if (bytesRead < PACK_HEADER_SIZE || !head.subarray(0, 8).equals(PACK_MAGIC) || head.toString('hex', 8, 24) !== id) {
        damagedPacks.push({ pack: id, problem: 'pack header is damaged' });
      }
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      damagedPacks.push({ pack: id, problem: code === 'ENOENT' ? 'pack file is missing' : `pack file unreadable (${code ?? (e as Error).message})` });
    } finally {
      await fh?.close().catch(() => undefined);
    }
    const rec = await getOrNull(repo.db, packKey(id));
    let committed = -1;
    if (!rec) damagedPacks.push({ pack: id, problem: 'no committed-size record in the index' });
    else {
      try {
        committed = (JSON.parse(rec.toString('utf8')) as { size: number }).size;
      } catch {
        damagedPacks.push({ pack: id, problem: 'committed-size record is corrupt' });
      }
    }
    packCommitted[p] = committed;
    if (packSize[p]! >= 0 && committed > packSize[p]!) {
      damagedPacks.push({ pack: id, problem: `pack file has ${packSize[p]} bytes, less than its committed size ${committed}` });
    }
  }
  for (let i = 0; i < nChunks; i++) {
    if (damaged.has(i)) continue;
    const p = packOf[i]!;
    const end = offsets[i]! + RECORD_HEADER_SIZE + storedLen[i]!;
    if (packSize[p] === -1) damaged.set(i, `pack ${packIds[p]} is missing or unreadable`);
    else if (offsets[i]! < PACK_HEADER_SIZE) damaged.set(i, `chunk index entry points into the pack header`);
    else if (end > packSize[p]!) damaged.set(i, `pack file too short (record ends at ${end}, the file has ${packSize[p]} bytes)`);
    else if (packCommitted[p]! >= 0 && end > packCommitted[p]!) damaged.set(i, `record lies past the pack's committed size ${packCommitted[p]}`);
  }

  // Which chunks get the full read: all, a random sample, or none.
  const fullSet = new Uint8Array(nChunks);
  if (sample >= 100) fullSet.fill(1);
  else if (sample > 0 && nChunks) {
    const want = Math.min(nChunks, Math.ceil((nChunks * sample) / 100));
    const order = Array.from({ length: nChunks }, (_, i) => i);
    const rnd = opts.random ?? Math.random;
    for (let k = 0; k < want; k++) {
      const j = k + Math.floor(rnd() * (nChunks - k));
      [order[k], order[j]] = [order[j]!, order[k]!];
      fullSet[order[k]!] = 1;
    }
  }
  const byPackOffset = (a: number, b: number) => packOf[a]! - packOf[b]! || offsets[a]! - offsets[b]! || inners[a]! - inners[b]!;

  // --- 4. Record headers of chunks that do not get the full read.
  const headerList: number[] = [];
  for (let i = 0; i < nChunks; i++) if (!fullSet[i] && !damaged.has(i)) headerList.push(i);
  headerList.sort(byPackOffset);
  const headerTotal = headerList.reduce((a, i) => a + RECORD_HEADER_SIZE + storedLen[i]!, 0);
  let headerDone = 0;
  let headersChecked = 0;
  for (let s = 0; s < headerList.length; ) {
    const p = packOf[headerList[s]!]!;
    let e = s;
    while (e < headerList.length && packOf[headerList[e]!] === p) e++;
    const group = headerList.slice(s, e);
    s = e;
    let fh: fs.FileHandle;
    try {
      fh = await fs.open(packPath(repo.dir, packIds[p]!), 'r');
    } catch (err) {
      for (const i of group) damaged.set(i, `cannot open pack ${packIds[p]}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
      continue;
    }
    try {
      let next = 0;
      const workerFn = async () => {
        const buf = Buffer.alloc(RECORD_HEADER_SIZE + GROUP_TABLE_MAX);
        while (next < group.length) {
          const i = group[next++]!;
          // A group member's record: the header and its member table.
          const want = comps[i] === COMP_GROUP ? RECORD_HEADER_SIZE + Math.min(storedLen[i]!, GROUP_TABLE_MAX) : RECORD_HEADER_SIZE;
          const { bytesRead } = await fh.read(buf, 0, want, offsets[i]!);
          if (bytesRead !== want) damaged.set(i, RECORD_HEADER_BAD);
          else {
            const group = comps[i] === COMP_GROUP;
            const entry = {
              storedLength: storedLen[i]!,
              rawLength: rawLen[i]!,
              compression: comps[i]!,
              inner: group ? inners[i]! : undefined,
              groupRaw: group ? groupRaws[i]! : undefined,
              digest: Buffer.from(digests[i]!, 'binary'),
            };
            const c = checkRecord(buf.subarray(0, want), entry, { tableDigest: true });
            if ('problem' in c) damaged.set(i, c.problem);
          }
          headersChecked++;
          headerDone += RECORD_HEADER_SIZE + storedLen[i]!;
          opts.onProgress?.('headers', headerDone, headerTotal);
        }
      };
      await Promise.all(Array.from({ length: HEADER_READS }, workerFn));
    } finally {
      await fh.close().catch(() => undefined);
    }
  }

  // --- 5. Full reads: decompress and re-hash in the worker pool, ~1 MiB per message.
  const fullList: number[] = [];
  for (let i = 0; i < nChunks; i++) if (fullSet[i] && !damaged.has(i)) fullList.push(i);
  const dataTotal = fullList.reduce((a, i) => a + rawLen[i]!, 0);
  let dataDone = 0;
  let chunksRead = 0;
  /** Read, decompress and re-hash these chunks; sets or clears their entry in `damaged`. */
  const readChunks = async (list: number[], progress: boolean) => {
    if (!list.length) return;
    list.sort(byPackOffset);
    const pool = repo.pool;
    const running = new Set<Promise<void>>();
    let failure: unknown = null;
    const send = (batch: number[]) => {
      const items: LoadItem[] = batch.map((i) => {
        const fast = fastOf.get(digests[i]!);
        return {
          file: packPath(repo.dir, packIds[packOf[i]!]!),
          offset: offsets[i]!,
          storedLength: storedLen[i]!,
          rawLength: rawLen[i]!,
          compression: comps[i]!,
          ...(comps[i] === COMP_GROUP ? { inner: inners[i]!, groupRaw: groupRaws[i]! } : {}),
          digest: Uint8Array.from(Buffer.from(digests[i]!, 'binary')),
          fast: fast === undefined ? null : Uint8Array.from(Buffer.from(fast, 'binary')),
          alsoSha: true,
        };
      });
      const task = pool
        .run<{ all: Uint8Array; results: LoadResult[] }>({ op: 'loadMany', items, direct: true }) // one pass: O_DIRECT
        .then(
          ({ results }) => {
            results.forEach((r, k) => {
              if (r.damaged) damaged.set(batch[k]!, r.damaged);
              else damaged.delete(batch[k]!);
            });
            if (!progress) return;
            chunksRead += batch.length;
            dataDone += batch.reduce((a, i) => a + rawLen[i]!, 0);
            opts.onProgress?.('data', dataDone, dataTotal);
          },
          (e) => {
            failure ??= e;
          },
        )
        .finally(() => running.delete(task));
      running.add(task);
    };
    let batch: number[] = [];
    let bytes = 0;
    for (const i of list) {
      // A full batch goes out before the next chunk, unless that is another member of the
      // same group record (a group split between two workers is decoded by both).
      const last = batch[batch.length - 1];
      const sameGroup = last !== undefined && comps[i] === COMP_GROUP && comps[last] === COMP_GROUP && packOf[i] === packOf[last] && offsets[i] === offsets[last];
      if (bytes >= 1 << 20 && !sameGroup) {
        send(batch);
        batch = [];
        bytes = 0;
        while (running.size >= pool.size * 2) await Promise.race(running);
        if (failure) break;
      }
      batch.push(i);
      bytes += rawLen[i]!;
    }
    if (batch.length && !failure) send(batch);
    await Promise.all(running);
    if (failure) throw new GenvaultError(`verify could not read chunks: ${(failure as Error).message}`, 'VERIFY', 2);
  };
  await readChunks(fullList, true);

  // --- 5b. A running gc may have moved chunks (repacked them) after we read their index
  // entries, and deleted the old pack: as the readers do, look a damaged chunk up again and,
  // if the index now names another place, check it there. Only a chunk whose current index
  // entry points at bad data is damage.
  if (damaged.size) {
    const suspects = [...damaged.keys()].filter((i) => packOf[i]! >= 0);
    const moved: number[] = [];
    for (let at = 0; at < suspects.length; at += INDEX_BATCH) {
      const part = suspects.slice(at, at + INDEX_BATCH);
      const vals = await repo.db.getMany(part.map((i) => chunkKey(Buffer.from(digests[i]!, 'binary'))));
      part.forEach((i, k) => {
        const v = vals[k];
        if (!isLocation(v)) return;
        const loc = decodeLocation(v);
        if (loc.packId === packIds[packOf[i]!] && loc.offset === offsets[i]) return;
        let p = packIdx.get(loc.packId);
        if (p === undefined) {
          p = packIds.length;
          packIds.push(loc.packId);
          packIdx.set(loc.packId, p);
        }
        packOf[i] = p;
        offsets[i] = loc.offset;
        storedLen[i] = loc.storedLength;
        rawLen[i] = loc.rawLength;
        comps[i] = loc.compression;
        inners[i] = loc.inner ?? -1;
        groupRaws[i] = loc.groupRaw ?? 0;
        moved.push(i);
      });
    }
    await readChunks(moved, false);
    // Pack problems of packs nothing points into any more (gc emptied and removed them).
    const used = new Set(packOf);
    for (let k = damagedPacks.length - 1; k >= 0; k--) {
      if (!used.has(packIdx.get(damagedPacks[k]!.pack)!)) damagedPacks.splice(k, 1);
    }
  }

  // Chunks whose map entries name two different BLAKE3s: restore and the mount would fail
  // on one of them whatever the data holds.
  for (const cd of fastConflicts) {
    const i = chunkIdx.get(cd);
    if (i !== undefined && !damaged.has(i)) damaged.set(i, 'its map entries disagree on its BLAKE3');
  }

  // --- 6. Name the generations and image ranges the damage affects.
  const damagedChunks = new Map<string, DamagedChunk>();
  for (const [i, problem] of damaged) {
    const p = packOf[i]!;
    damagedChunks.set(digests[i]!, {
      digest: hex(digests[i]!),
      problem,
      pack: p >= 0 ? packIds[p]! : null,
      packOffset: p >= 0 ? offsets[i]! : null,
      affects: [],
    });
  }
  const referencedLeaves = new Set<string>();
  if (damagedChunks.size || damagedLeaves.size) {
    for (const g of gens) {
      const keyHex = Repository.generationKey(g).toString('hex');
      if (genProblems.get(keyHex)?.whole) continue;
      const top = await getOrNull(repo.db, Repository.mapKey(g.id));
      if (!top) continue;
      const refs = checkedTop(top, g);
      const base = { name: g.name, id: g.id, created: g.created };
      const perChunk = new Map<string, { ranges: Range[]; more: number }>();
      const chunkProblems = new Map<string, number>(); // problem -> distinct damaged chunks
      let leafStart = 0;
      for (const r of refs) {
        const start = leafStart;
        leafStart += r.bytes;
        const ld = r.digest.toString('binary');
        const leafProblem = damagedLeaves.get(ld);
        if (leafProblem) referencedLeaves.add(ld);
        if (leafProblem) {
          noteGen(keyHex, base, `${leafProblem} (leaf ${r.digest.toString('hex')})`, false);
          genProblems.get(keyHex)!.ranges.push({ offset: start, length: r.bytes });
        } else if (damagedChunks.size) {
          // (cached: leaves are shared between generations)
          const leaf = await repo.loadLeaf(r.digest).catch(() => null);
          if (!leaf) continue; // removed since the first pass (gc): nothing to name here
          for (let ci = 0; ci < leaf.lengths.length; ci++) {
            if (leaf.zero[ci]) continue;
            const cd = leaf.digests.toString('binary', ci * 32, ci * 32 + 32);
            const dc = damagedChunks.get(cd);
            if (!dc) continue;
            const range = { offset: start + leaf.starts[ci]!, length: leaf.lengths[ci]! };
            noteGen(keyHex, base, '', false);
            genProblems.get(keyHex)!.ranges.push(range);
            if (!perChunk.has(cd)) chunkProblems.set(dc.problem, (chunkProblems.get(dc.problem) ?? 0) + 1);
            let pc = perChunk.get(cd);
            if (!pc) perChunk.set(cd, (pc = { ranges: [], more: 0 }));
            if (pc.ranges.length < MAX_RANGES_PER_CHUNK) pc.ranges.push(range);
            else pc.more++;
          }
        }
      }
      const a = genProblems.get(keyHex);
      if (a) {
        for (const [problem, n] of chunkProblems) a.problems.push(`${n} damaged chunk(s): ${problem}`);
      }
      for (const [cd, pc] of perChunk) {
        const entry: DamagedChunk['affects'][number] = { name: g.name, id: g.id, ranges: pc.ranges };
        if (pc.more) entry.moreRanges = pc.more;
        damagedChunks.get(cd)!.affects.push(entry);
      }
    }
  }
  // Damage that no current generation uses belonged to a generation removed meanwhile
  // (forget/prune running alongside); gc will remove it, it is not worth an alarm.
  for (const [d, c] of damagedChunks) if (!c.affects.length) damagedChunks.delete(d);
  // Remember the damage: the next backup whose source still holds these bytes heals them.
  for (const c of damagedChunks.values()) await markDamaged(repo.db, Buffer.from(c.digest, 'hex'), 'verify');
  for (const d of damagedLeaves.keys()) if (!referencedLeaves.has(d)) damagedLeaves.delete(d);
  const damagedGenerations = [...genProblems.values()]
    .map((a) => ({ ...a, ranges: mergeRanges(a.ranges) }))
    .sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : (a.created ?? '').localeCompare(b.created ?? '')));

  return {
    ok: !damagedChunks.size && !damagedLeaves.size && !damagedPacks.length && !damagedGenerations.length && !indexProblems.length,
    mode,
    samplePercent: mode === 'sample' ? sample : null,
    images: new Set(gens.map((g) => g.name)).size,
    generations: gens.length + [...genProblems.values()].filter((a) => a.created === null).length,
    leaves: leafInfo.size,
    chunks: nChunks,
    packs: nPacks,
    headersChecked,
    chunksRead,
    bytesRead: dataDone,
    durationMs: Date.now() - started,
    damagedChunks: [...damagedChunks.values()].sort((a, b) => a.digest.localeCompare(b.digest)),
    damagedLeaves: [...damagedLeaves].map(([d, problem]) => ({ digest: hex(d), problem })),
    damagedPacks,
    damagedGenerations,
    indexProblems,
    warnings,
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

/**
 * The difference between an index and the model of the packs (pack-model.ts), key by key,
 * both read in key order side by side: memory does not grow with the repository.
 *
 * A chunk entry agrees when it points at any whole copy the scan found (gc and heals
 * leave copies; the model's `c` is only the first, the others are in its copies database). An entry that points into a pack the
 * scan did not read, or past the last whole record it read there, was written after it (a
 * backup or gc running beside verify; a writer's file may end in a zero-padded block while
 * it appends) and is not judged here: verify's own checks read that record.
 */
import type { RepoKeys } from '../format/crypto.js';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { K_CHUNK, K_GEN, K_GENMAP, K_LEAF, K_PACK, packKey, packSizeOf, prefixEnd } from '../format/keys.js';
import { decodeLocation, isLocation } from '../format/pack.js';
import { PLAIN_GENERATIONS, type GenerationIndex } from '../format/index-seal.js';
import { getOrNull, openPrivateDb, type Db } from '../index/db.js';
import type { Store } from '../store/store.js';
import { K_COPY, PackModel } from './pack-model.js';

export interface KeyDiff {
  /** In the packs, not in the index. */
  missing: number;
  /** In the index, not in the packs. */
  extra: number;
  /** In both, with other values. */
  different: number;
  /** A few of them, for the report. */
  examples: string[];
}

export interface IndexDiff {
  chunks: KeyDiff;
  leaves: KeyDiff;
  maps: KeyDiff;
  generations: KeyDiff;
  packs: KeyDiff;
}

const EXAMPLES = 5;

const emptyDiff = (): KeyDiff => ({ missing: 0, extra: 0, different: 0, examples: [] });

export function diffAgrees(d: IndexDiff): boolean {
  return Object.values(d).every((k: KeyDiff) => !k.missing && !k.extra && !k.different);
}

type Entry = [Buffer, Buffer];

/** An async iterator with one entry of look-ahead. */
class Cursor<T> {
  private cur: IteratorResult<T> | null = null;
  constructor(private it: AsyncIterator<T>) {}
  async peek(): Promise<T | undefined> {
    this.cur ??= await this.it.next();
    return this.cur.done ? undefined : this.cur.value;
  }
  take(): void {
    this.cur = null;
  }
}

/**
 * Entries under `prefix` of an index opened anew every REOPEN_EVERY entries. LevelDB keeps
 * the table files a pass has read memory-mapped, and counted in the process's RSS, until
 * it closes them; a pass over a large index would otherwise hold up to its table cache's
 * worth (native-notes/performance.md, "Rebuilding the index").
 */
async function* reopening(open: () => Promise<Db>, prefix: number): AsyncGenerator<Entry> {
  const lt = prefixEnd(Buffer.of(prefix));
  let after: Buffer | null = null;
  for (;;) {
    const db = await open();
    let n = 0;
    try {
      for await (const e of db.iterator(after ? { gt: after, lt } : { gte: Buffer.of(prefix), lt })) {
        yield e as Entry;
        after = e[0];
        if (++n >= REOPEN_EVERY) break;
      }
    } finally {
      await db.close();
    }
    if (n < REOPEN_EVERY) return;
  }
}
const REOPEN_EVERY = 200_000;

function range(db: Db, prefix: number): AsyncIterator<Entry> {
  const gte = Buffer.of(prefix);
  return db.iterator({ gte, lt: prefixEnd(gte) })[Symbol.asyncIterator]() as AsyncIterator<Entry>;
}

/**
 * Every copy the model found, grouped by chunk: ['c' + digest, [locations]], the first
 * copy (the model's `c` entry) first, then the further ones from the copies database.
 */
async function* copiesByChunk(model: PackModel): AsyncGenerator<[Buffer, Buffer[]]> {
  const extra = new Cursor(range(model.copies, K_COPY));
  const it = range(model.db, K_CHUNK);
  for (let r = await it.next(); !r.done; r = await it.next()) {
    const [k, v] = r.value;
    const locs = [v];
    for (let e = await extra.peek(); e && e[0].compare(k, 1, 33, 1, 33) <= 0; e = await extra.peek()) {
      extra.take();
      if (e[0].compare(k, 1, 33, 1, 33) === 0) locs.push(e[1]);
    }
    yield [k, locs];
  }
}

/** Merge two key-ordered streams, calling `pair` with whichever sides hold each key. */
async function merge<A, B>(a: Cursor<[Buffer, A]>, b: Cursor<[Buffer, B]>, pair: (k: Buffer, av?: A, bv?: B) => void): Promise<void> {
  for (;;) {
    const x = await a.peek();
    const y = await b.peek();
    if (!x && !y) return;
    const c = !x ? 1 : !y ? -1 : x[0].compare(y[0]);
    if (c === 0) {
      a.take();
      b.take();
      pair(x![0], x![1], y![1]);
    } else if (c < 0) {
      a.take();
      pair(x![0], x![1], undefined);
    } else {
      b.take();
      pair(y![0], undefined, y![1]);
    }
  }
}

function note(d: KeyDiff, what: 'missing' | 'extra' | 'different', text: string): void {
  d[what]++;
  if (d.examples.length < EXAMPLES) d.examples.push(text);
}

/** Chunk entries of the index against the copies the scan found. */
async function diffChunks(index: Db | (() => Promise<Db>), model: PackModel): Promise<KeyDiff> {
  const scanned = model.scannedEnds();
  const d = emptyDiff();
  const afterScan = (v: Buffer) => {
    if (!isLocation(v)) return false;
    const l = decodeLocation(v);
    const end = scanned.get(l.packId);
    return end === undefined || l.offset >= end;
  };
  await merge(new Cursor(side(index, K_CHUNK)), new Cursor(copiesByChunk(model)[Symbol.asyncIterator]()), (k, iv, copies) => {
    const digest = k.toString('hex', 1);
    if (iv && copies?.some((c) => c.equals(iv))) return;
    if (iv && afterScan(iv)) return;
    if (iv && copies) note(d, 'different', `chunk ${digest}: the index points at ${where(iv)}, the packs hold it at ${where(copies[0]!)}`);
    else if (iv) note(d, 'extra', `chunk ${digest}: the index points at ${where(iv)}, where no pack holds it`);
    else note(d, 'missing', `chunk ${digest}: in pack ${where(copies![0]!)}, not in the index`);
  });
  return d;
}

function where(v: Buffer): string {
  if (!isLocation(v)) return 'a malformed location';
  const l = decodeLocation(v);
  return `${l.packId} offset ${l.offset}${l.inner !== undefined ? ` (group member at ${l.inner})` : ''}`;
}

/** Entries under one prefix, compared by key and value. */
async function diffPlain(
  index: () => Promise<Db>,
  model: Db,
  prefix: number,
  name: (k: Buffer) => string,
  same: (k: Buffer, a: Buffer, b: Buffer) => boolean = (_k, a, b) => a.equals(b),
): Promise<KeyDiff> {
  const d = emptyDiff();
  await merge(new Cursor(side(index, prefix)), new Cursor(range(model, prefix)), (k, iv, mv) => {
    if (iv && mv) {
      if (!same(k, iv, mv)) note(d, 'different', `${name(k)}: the index and the packs differ`);
    } else if (iv) note(d, 'extra', `${name(k)}: in the index, in no pack`);
    else note(d, 'missing', `${name(k)}: in the packs, not in the index`);
  });
  return d;
}

/** Generation records, compared as JSON (sealed ones differ in their random nonces); one that does not open differs. */
function sameGeneration(gi: GenerationIndex): (k: Buffer, a: Buffer, b: Buffer) => boolean {
  return (k, a, b) => {
    try {
      return gi.json(k, a).equals(gi.json(k, b));
    } catch {
      return false;
    }
  };
}

/** An index's entries under a prefix: of an open index, or of one opened (and reopened) here. */
function side(index: Db | (() => Promise<Db>), prefix: number): AsyncIterator<Entry> {
  return typeof index === 'function' ? reopening(index, prefix) : range(index, prefix);
}

/** Everything the model holds against the index (the model finished), which `index` opens (each call a new handle). */
export async function diffIndex(index: () => Promise<Db>, model: PackModel): Promise<IndexDiff> {
  const db = model.db;
  return {
    chunks: await diffChunks(index, model),
    leaves: await diffPlain(index, db, K_LEAF, (k) => `map leaf ${k.toString('hex', 1)}`),
    maps: await diffPlain(index, db, K_GENMAP, (k) => `generation map ${k.toString('hex', 1)}`),
    generations: await diffPlain(index, db, K_GEN, (k) => {
      const { name, id } = model.genIndex.describe(k);
      return `generation ${name}@${id}`;
    }, sameGeneration(model.genIndex)),
    packs: await diffPlain(index, db, K_PACK, (k) => `pack ${k.toString('hex', 1)}`),
  };
}

/**
 * verify's check that index and packs agree (format 4): every chunk entry points at a
 * whole copy of its chunk, and every generation the packs hold (not forgotten) is in the
 * index. The model is built in a private temporary directory and removed afterwards.
 * Returns one problem per disagreement shown (a count line when there are more).
 */
export async function packsAgree(
  store: Store,
  index: Db,
  progress?: (done: number, total: number) => void,
  keys: RepoKeys | null = null,
  genIndex: GenerationIndex = PLAIN_GENERATIONS,
): Promise<{ packs: number; problems: string[] }> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'genvault-verify-packs-'));
  let db: Db | null = null;
  let copies: Db | null = null;
  try {
    db = await openPrivateDb(path.join(dir, 'index'));
    copies = await openPrivateDb(path.join(dir, 'copies'));
    const committed = async (packId: string) => {
      const v = await getOrNull(index, packKey(packId));
      return v ? packSizeOf(v) : null;
    };
    // verify reads every record header, also where tables of contents would do: checking is its purpose.
    const model = await PackModel.build(store, db, copies, { progress, committed, readAll: true, keys, genIndex });
    const restored = await model.finish();
    const chunks = await diffChunks(index, model);
    const problems: string[] = [];
    const bad = chunks.extra + chunks.different;
    if (bad) {
      problems.push(`index and packs disagree: ${bad} chunk entries point where no pack holds their chunk`);
      problems.push(...chunks.examples.filter((e) => !/not in the index$/.test(e)).map((e) => `index and packs disagree: ${e}`));
    }
    for (const g of restored) {
      // Looked up after the scan: a backup that committed meanwhile is found.
      if (!(await getOrNull(index, genIndex.key(g)))) problems.push(`index and packs disagree: generation ${g.name}@${g.id} (${g.created}) is in the packs but not in the index`);
    }
    return { packs: model.counts.packs, problems };
  } finally {
    await db?.close().catch(() => undefined);
    await copies?.close().catch(() => undefined);
    await fs.rm(dir, { recursive: true, force: true });
  }
}

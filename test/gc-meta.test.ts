/**
 * gc in a format 4 repository keeps the packs describing it: the live metadata records
 * (leaves under 'l', maps and records of generations under 'g', current changes, every
 * forgotten change) of a pack it deletes or rewrites end up in gc's new pack; those of
 * removed generations are dropped; a damaged record leaves its pack alone; a gc killed at
 * any moment loses no record of a remaining generation.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { RaveLevel } from 'rave-level';
import { afterAll, beforeAll, describe, expect, it, onTestFailed } from 'vitest';
import { LocalStore } from '../src/store/local.js';
import { listPacks, scanStoredPack } from '../src/store/pack-reader.js';
import { REC_CHANGE, REC_GENERATION, REC_GENMAP, REC_LEAF, encodeMetaRecord, type GenerationChange } from '../src/format/meta.js';
import type { Generation } from '../src/format/generation.js';
import { CLI, Scratch, flipByte, gv, gvOk, prng, seededRandom, sh, sha256File, writeImage } from './helpers.js';

let s: Scratch;

beforeAll(async () => {
  s = await Scratch.create('genvault-gc-meta-');
});

afterAll(async () => {
  await s?.cleanup();
});

interface PackMeta {
  packId: string;
  file: string;
  size: number;
  leaves: Set<string>; // hex digests
  maps: Set<string>; // generation ids
  records: Set<string>; // generation ids
  changes: string[]; // id:rev, or id:forgotten
  /** Offset of every metadata record. */
  offsets: number[];
  damaged: number;
}

/** Every pack of the repository, scanned from start to end (no index). */
async function scanAll(repo: string): Promise<PackMeta[]> {
  const store = new LocalStore(repo);
  const out: PackMeta[] = [];
  try {
    await scanInto(store, repo, out);
  } finally {
    await store.close();
  }
  return out;
}

async function scanInto(store: LocalStore, repo: string, out: PackMeta[]): Promise<void> {
  for (const p of await listPacks(store)) {
    const m: PackMeta = { packId: p.packId, file: path.join(repo, p.name), size: p.size, leaves: new Set(), maps: new Set(), records: new Set(), changes: [], offsets: [], damaged: 0 };
    for await (const item of scanStoredPack(store, p)) {
      if (item.kind === 'damaged') m.damaged++;
      if (item.kind !== 'meta') continue;
      m.offsets.push(item.offset);
      const r = item.record;
      if (r.type === REC_LEAF) m.leaves.add(item.header.digest.toString('hex'));
      else if (r.type === REC_GENMAP) m.maps.add(r.id);
      else if (r.type === REC_GENERATION) m.records.add(r.generation.id);
      else if (r.type === REC_CHANGE) m.changes.push(`${r.change.id}:${r.change.forgotten ? 'forgotten' : r.change.rev}`);
    }
    out.push(m);
  }
}

const union = (packs: PackMeta[], f: (p: PackMeta) => Set<string>) => new Set(packs.flatMap((p) => [...f(p)]));

/** Index keys by prefix (opened here while no genvault process runs). */
async function indexKeys(repo: string, prefix: string): Promise<Array<[Buffer, Buffer]>> {
  const db = new RaveLevel<Buffer, Buffer>(path.join(repo, 'index'), { keyEncoding: 'buffer', valueEncoding: 'buffer' });
  await db.open();
  const out: Array<[Buffer, Buffer]> = [];
  try {
    const p = prefix.charCodeAt(0);
    for await (const [k, v] of db.iterator({ gte: Buffer.of(p), lt: Buffer.of(p + 1) })) out.push([Buffer.from(k), Buffer.from(v)]);
  } finally {
    await db.close();
  }
  return out;
}

async function putIndex(repo: string, ops: Array<{ type: 'put'; key: Buffer; value: Buffer }>): Promise<void> {
  const db = new RaveLevel<Buffer, Buffer>(path.join(repo, 'index'), { keyEncoding: 'buffer', valueEncoding: 'buffer' });
  await db.open();
  try {
    await db.batch(ops, { sync: true } as object);
  } finally {
    await db.close();
  }
}

interface Gen {
  id: string;
  name: string;
}

async function list(repo: string): Promise<Gen[]> {
  return JSON.parse(await gvOk(repo, ['list', '--json'])) as Gen[];
}

/** Every generation listed has its map and record in some pack, and every 'l' leaf a leaf record. */
async function expectDescribed(repo: string, what: string): Promise<PackMeta[]> {
  const packs = await scanAll(repo);
  const maps = union(packs, (p) => p.maps);
  const records = union(packs, (p) => p.records);
  for (const g of await list(repo)) {
    expect(maps.has(g.id), `${what}: map of ${g.name}@${g.id}`).toBe(true);
    expect(records.has(g.id), `${what}: record of ${g.name}@${g.id}`).toBe(true);
  }
  const leaves = union(packs, (p) => p.leaves);
  for (const [k] of await indexKeys(repo, 'l')) expect(leaves.has(k.toString('hex', 1)), `${what}: leaf ${k.toString('hex', 1)}`).toBe(true);
  return packs;
}

/**
 * No metadata record is in the packs twice. Change records: forget and prune write one
 * `forgotten` change per generation they remove, and nothing else here writes changes.
 */
function expectNoDuplicates(packs: PackMeta[]): void {
  const total = packs.reduce((n, p) => n + p.offsets.length, 0);
  const changes = packs.flatMap((p) => p.changes);
  expect(new Set(changes).size, `changes ${changes.join(' ')}`).toBe(changes.length);
  expect(total).toBe(union(packs, (p) => p.leaves).size + union(packs, (p) => p.maps).size + union(packs, (p) => p.records).size + changes.length);
}

/** Make a repository that `init` made version 4 say `version` (3: its writers write no records). */
async function setVersion(repo: string, version: number): Promise<void> {
  const cfgFile = path.join(repo, 'config.json');
  await fs.writeFile(cfgFile, JSON.stringify({ ...JSON.parse(await fs.readFile(cfgFile, 'utf8')), version }));
}

/**
 * What gc did with the metadata records of the packs it deleted or rewrote (those in
 * `before` and not `after`): each record live now (leaf under 'l', generation listed,
 * forgotten change) is in the packs gc wrote (`after`, not `before`), the others are gone.
 * Returns the counts gc must report.
 */
async function metaMoved(repo: string, before: PackMeta[], after: PackMeta[]): Promise<{ kept: number; dropped: number }> {
  const l = new Set((await indexKeys(repo, 'l')).map(([k]) => k.toString('hex', 1)));
  const ids = new Set((await list(repo)).map((g) => g.id));
  const gone = before.filter((p) => !after.some((a) => a.packId === p.packId));
  const fresh = after.filter((p) => !before.some((b) => b.packId === p.packId));
  const keys = (p: PackMeta, live: boolean) => [
    ...[...p.leaves].filter((d) => l.has(d) === live).map((d) => `leaf:${d}`),
    ...[...p.maps].filter((id) => ids.has(id) === live).map((id) => `map:${id}`),
    ...[...p.records].filter((id) => ids.has(id) === live).map((id) => `record:${id}`),
    // Changes of current revs would need the 'g' records' revs: these packs hold none.
    ...p.changes.filter((c) => c.endsWith(':forgotten') === live).map((c) => `change:${c}`),
  ];
  const kept = gone.flatMap((p) => keys(p, true));
  const dropped = gone.flatMap((p) => keys(p, false));
  expect(fresh.flatMap((p) => keys(p, true)).sort()).toEqual([...kept].sort());
  expect(fresh.flatMap((p) => keys(p, false))).toEqual([]);
  return { kept: kept.length, dropped: dropped.length };
}

async function restoreSum(repo: string, spec: string): Promise<string> {
  const out = s.path(`restore-${randomBytes(4).toString('hex')}.img`);
  await gvOk(repo, ['restore', spec, out]);
  const sum = await sha256File(out);
  await fs.rm(out);
  return sum;
}

async function newRepo(name: string): Promise<string> {
  const repo = s.path(name);
  await gvOk(repo, ['init']);
  expect(JSON.parse(await fs.readFile(path.join(repo, 'config.json'), 'utf8')).version).toBeGreaterThanOrEqual(4);
  return repo;
}

describe('gc keeps the metadata records of a format 4 repository', () => {
  it('keeps the records of what remains, drops those of removed generations, and converges', async () => {
    // Made as version 3: the first two backups of each image write no records, upgrade
    // writes theirs into a pack of its own; the third ones (version 4) write their own.
    const repo = await newRepo('repo-meta');
    await setVersion(repo, 3);
    const sums = new Map<string, string>(); // id -> sha256 of the image it restores
    const base = { a: prng(1, 2 << 20), b: prng(2, 2 << 20) };
    for (let i = 0; i < 3; i++) {
      if (i === 2) {
        expect(await scanAll(repo).then((ps) => ps.every((p) => p.offsets.length === 0))).toBe(true);
        await gvOk(repo, ['upgrade']);
        await expectDescribed(repo, 'after upgrade');
      }
      for (const name of ['a', 'b'] as const) {
        const img = s.path(`${name}.img`);
        const sum = await writeImage(img, [base[name], prng(100 + i * 2 + (name === 'b' ? 1 : 0), 1 << 20)]);
        await gvOk(repo, ['backup', img, '--name', name]);
        sums.set((await list(repo)).filter((g) => g.name === name).at(-1)!.id, sum);
      }
    }
    await expectDescribed(repo, 'after the version 4 backups');

    const before = await list(repo);
    await gvOk(repo, ['forget', 'a@1', '--force-young']);
    await gvOk(repo, ['prune', 'b', '--keep-last', '1', '--min-age', '0']);
    const after = await list(repo);
    const removed = before.filter((g) => !after.some((x) => x.id === g.id)).map((g) => g.id);
    expect(removed).toHaveLength(3);
    // forget and prune wrote a forgotten change for each.
    const packsBefore = await scanAll(repo);
    expect(packsBefore.flatMap((p) => p.changes).sort()).toEqual(removed.map((id) => `${id}:forgotten`).sort());

    const r = JSON.parse(await gvOk(repo, ['gc', '--json', '--repack-threshold', '100']));
    expect(r.warnings).toEqual([]);
    expect(r.packsRepacked).toBeGreaterThanOrEqual(1);
    // The upgrade's pack held the maps and records of a@2 (kept) and of the three removed.
    expect(r.metadataKept).toBeGreaterThanOrEqual(2);
    // 3 maps and 3 records, and leaves nothing else uses.
    expect(r.metadataDropped).toBeGreaterThanOrEqual(6);
    expect(r.leavesRemoved).toBeGreaterThan(0);

    const packs = await expectDescribed(repo, 'after gc');
    expect(await metaMoved(repo, packsBefore, packs)).toEqual({ kept: r.metadataKept, dropped: r.metadataDropped });
    expectNoDuplicates(packs);
    for (const id of removed) {
      expect(union(packs, (p) => p.maps).has(id), `map of removed ${id}`).toBe(false);
      expect(union(packs, (p) => p.records).has(id), `record of removed ${id}`).toBe(false);
    }
    expect(packs.every((p) => p.damaged === 0)).toBe(true);
    // The forgotten changes stay (their packs are all live: not rewritten).
    expect(packs.flatMap((p) => p.changes).sort()).toEqual(removed.map((id) => `${id}:forgotten`).sort());
    // No leaf record without its 'l' leaf either: the dead ones went with their packs.
    const l = new Set((await indexKeys(repo, 'l')).map(([k]) => k.toString('hex', 1)));
    expect([...union(packs, (p) => p.leaves)].filter((d) => !l.has(d))).toEqual([]);

    for (const g of after) expect(await restoreSum(repo, `${g.name}@${g.id}`), `${g.name}@${g.id}`).toBe(sums.get(g.id));
    const v = await gv(repo, ['verify', '--full']);
    expect(v.code, v.stdout + v.stderr).toBe(0);

    // What gc wrote is all live: the next gc rewrites nothing, not even at 100%.
    const again = JSON.parse(await gvOk(repo, ['gc', '--json', '--repack-threshold', '100']));
    expect(again).toMatchObject({ packsDeleted: 0, packsRepacked: 0, metadataKept: 0, metadataDropped: 0 });
  });

  it('a pack of dead chunks and live metadata records is rewritten, its records kept', async () => {
    // Backed up as version 3 (no records), then version 4 with y's records in x's pack only.
    const repo = await newRepo('repo-meta-dead-chunks');
    await setVersion(repo, 3);
    await writeImage(s.path('x.img'), [prng(11, 3 << 20)]);
    await gvOk(repo, ['backup', s.path('x.img'), '--name', 'x']);
    const xPacks = (await scanAll(repo)).map((p) => p.packId);
    expect(xPacks).toHaveLength(1);
    const ySum = await writeImage(s.path('y.img'), [prng(12, 2 << 20)]);
    await gvOk(repo, ['backup', s.path('y.img'), '--name', 'y']);
    const y = (await list(repo)).find((g) => g.name === 'y')!;
    expect((await scanAll(repo)).every((p) => p.offsets.length === 0)).toBe(true);
    await setVersion(repo, 4);

    // x's pack gets y's map, record and leaves appended, as a backup writing its records
    // into a pack it shares with chunks does (the 'p' entry covers them).
    const [[gk, gv_]] = (await indexKeys(repo, 'g')).filter(([, v]) => JSON.parse(v.toString()).id === y.id);
    const top = (await indexKeys(repo, 'm')).find(([k]) => k.toString('hex', 1) === y.id)![1];
    const gen = JSON.parse(gv_.toString()) as Generation;
    const yLeaves = new Set<string>();
    for (let at = 0; at < top.length; at += 44) yLeaves.add(top.toString('hex', at, at + 32));
    const leafRecs = (await indexKeys(repo, 'l')).filter(([k]) => yLeaves.has(k.toString('hex', 1))).map(([, v]) => encodeMetaRecord({ type: REC_LEAF, leaf: v }));
    expect(leafRecs.length).toBe(yLeaves.size);
    const recs = [encodeMetaRecord({ type: REC_GENMAP, id: y.id, top }), encodeMetaRecord({ type: REC_GENERATION, generation: gen, json: gv_ }), ...leafRecs];
    const xFile = path.join(repo, 'packs', xPacks[0]!.slice(0, 2), `${xPacks[0]}.pack`);
    await fs.appendFile(xFile, Buffer.concat(recs));
    const size = (await fs.stat(xFile)).size;
    await putIndex(repo, [{ type: 'put', key: Buffer.concat([Buffer.from('p'), Buffer.from(xPacks[0]!, 'hex')]), value: Buffer.from(JSON.stringify({ size })) }]);
    expect(gk.length).toBeGreaterThan(17);

    await gvOk(repo, ['forget', 'x@latest', '--force-young']);
    const filesBefore = new Set((await scanAll(repo)).map((p) => p.packId));
    // y's pack, x's, and forget's with x's forgotten change.
    expect(filesBefore.size).toBe(3);
    const r = JSON.parse(await gvOk(repo, ['gc', '--json']));
    // Not deleted (its records live), rewritten at the default threshold.
    expect(r).toMatchObject({ packsDeleted: 0, packsRepacked: 1, packsWritten: 1, metadataKept: recs.length, metadataDropped: 0, warnings: [] });
    const packs = await scanAll(repo);
    expect(packs.some((p) => p.packId === xPacks[0])).toBe(false);
    const fresh = packs.filter((p) => !filesBefore.has(p.packId));
    expect(fresh).toHaveLength(1);
    expect([...fresh[0]!.maps]).toEqual([y.id]);
    expect([...fresh[0]!.records]).toEqual([y.id]);
    expect(fresh[0]!.leaves).toEqual(yLeaves);
    // Only the records moved: the new pack is their bytes and a header.
    expect(fresh[0]!.size).toBe(24 + recs.reduce((n, b) => n + b.length, 0));
    expect(await restoreSum(repo, 'y@latest')).toBe(ySum);
    const v = await gv(repo, ['verify', '--full']);
    expect(v.code, v.stdout + v.stderr).toBe(0);
  });

  it('keeps the current change of a generation and every forgotten one, drops superseded changes', async () => {
    const repo = await newRepo('repo-meta-changes');
    const made: Array<Set<string>> = []; // the packs each backup wrote (data, and its generation's own)
    for (let i = 0; i < 3; i++) {
      const pre = new Set((await scanAll(repo)).map((p) => p.packId));
      await writeImage(s.path('c.img'), [prng(40 + i, 1 << 20)]);
      await gvOk(repo, ['backup', s.path('c.img'), '--name', 'c']);
      made.push(new Set((await scanAll(repo)).map((p) => p.packId).filter((id) => !pre.has(id))));
    }
    const [a, b] = await list(repo);
    // b's changes, each in a pack of its own: protect (rev 1), unprotect (rev 2), forget (rev 3, forgotten).
    const packsOf = async () => new Set((await scanAll(repo)).map((p) => p.packId));
    const backupPacks = await packsOf();
    await gvOk(repo, ['protect', `c@${b!.id}`]);
    await gvOk(repo, ['unprotect', `c@${b!.id}`]);
    await gvOk(repo, ['forget', `c@${b!.id}`, '--force-young']);
    const bChanges = (await scanAll(repo)).filter((p) => !backupPacks.has(p.packId));
    expect(bChanges.every((p) => p.offsets.length === 1)).toBe(true);
    expect(bChanges.flatMap((p) => p.changes).sort()).toEqual([`${b!.id}:1`, `${b!.id}:2`, `${b!.id}:forgotten`].sort());
    const bPacks = (await scanAll(repo)).filter((p) => made[1]!.has(p.packId));
    expect(bPacks).toHaveLength(2);
    expect(bPacks.some((p) => p.records.has(b!.id))).toBe(true);
    // a's record has had two changes (rev 2), as protect and unprotect leave it.
    const [ak, av] = (await indexKeys(repo, 'g')).find(([, v]) => JSON.parse(v.toString()).id === a!.id)!;
    const aGen = JSON.parse(av.toString()) as Generation;
    await putIndex(repo, [{ type: 'put', key: ak, value: Buffer.from(JSON.stringify({ ...aGen, rev: 2 })) }]);
    const change = (g: { id: string }, rev: number, more: Partial<GenerationChange> = {}) =>
      encodeMetaRecord({ type: REC_CHANGE, change: { id: g.id, name: 'c', created: aGen.created, rev, at: new Date().toISOString(), ...more } });
    expect((await indexKeys(repo, 'g')).length).toBe(2); // b is gone from the index
    const gone = '8899aabbccddeeff'; // a generation forgotten long ago
    const recs = [
      change(a!, 1, { protected: true }), // superseded
      change(a!, 2, { protected: false }), // current
      change(a!, 3, { protected: true }), // never committed
      change({ id: '00112233aabbccdd' }, 1, { tags: ['x'] }), // a generation the index does not have
      change({ id: gone }, 1, { protected: true }), // of a generation forgotten since
      change({ id: gone }, 2, { forgotten: true }), // forgotten: always kept
    ];
    // A pack of its own, as protect, unprotect and forget write theirs.
    const id = randomBytes(16).toString('hex');
    const file = path.join(repo, 'packs', id.slice(0, 2), `${id}.pack`);
    await fs.mkdir(path.dirname(file), { recursive: true });
    await fs.writeFile(file, Buffer.concat([Buffer.from('GVPACK01'), Buffer.from(id, 'hex'), ...recs]));
    const size = (await fs.stat(file)).size;
    await putIndex(repo, [{ type: 'put', key: Buffer.concat([Buffer.from('p'), Buffer.from(id, 'hex')]), value: Buffer.from(JSON.stringify({ size })) }]);

    const dry = JSON.parse(await gvOk(repo, ['gc', '--json', '--dry-run', '--repack-threshold', '100']));
    const r = JSON.parse(await gvOk(repo, ['gc', '--json', '--repack-threshold', '100']));
    expect(r.warnings).toEqual([]);
    // The dry run said the same.
    for (const k of ['packsDeleted', 'packsRepacked', 'metadataKept', 'metadataDropped'] as const) expect(dry[k], k).toBe(r[k]);
    // Deleted: protect's and unprotect's packs (b's superseded changes) and b's backup packs
    // (its chunks and leaves; its map and record); rewritten: the pack above, a's current
    // change and the forgotten one kept. forget's pack is all live: left as it is.
    const bRecords = bPacks.reduce((n, p) => n + p.offsets.length, 0);
    expect(r).toMatchObject({ packsDeleted: 4, packsRepacked: 1, metadataKept: 2, metadataDropped: 4 + 2 + bRecords });
    const packs = await scanAll(repo);
    expect(packs.some((p) => p.packId === id)).toBe(false);
    for (const bp of bPacks) expect(packs.some((p) => p.packId === bp.packId)).toBe(false);
    expect(packs.flatMap((p) => p.changes).sort()).toEqual([`${a!.id}:2`, `${b!.id}:forgotten`, `${gone}:forgotten`].sort());
    await expectDescribed(repo, 'after gc');
    const human = await gvOk(repo, ['gc', '--repack-threshold', '100']);
    expect(human).not.toMatch(/metadata records/); // nothing left to move
  });

  it('a pack with a damaged metadata record is left alone and reported', async () => {
    // Backed up as version 3: upgrade writes both generations' records into one pack.
    const repo = await newRepo('repo-meta-damaged');
    await setVersion(repo, 3);
    const sums = new Map<string, string>();
    for (const name of ['d1', 'd2']) {
      sums.set(name, await writeImage(s.path(`${name}.img`), [prng(name.charCodeAt(1), 2 << 20)]));
      await gvOk(repo, ['backup', s.path(`${name}.img`), '--name', name]);
    }
    await gvOk(repo, ['upgrade']);
    const metaPack = (await scanAll(repo)).find((p) => p.records.size === 2)!;
    expect(metaPack.offsets.length).toBeGreaterThan(4);
    await gvOk(repo, ['forget', 'd1@latest', '--force-young']);
    // A byte inside the payload of the second record.
    await flipByte(metaPack.file, metaPack.offsets[1]! + 52 + 5);
    const r = JSON.parse(await gvOk(repo, ['gc', '--json', '--repack-threshold', '100']));
    expect(r.warnings.join('\n')).toMatch(new RegExp(`pack ${metaPack.packId}: damaged record at offset ${metaPack.offsets[1]}`));
    expect(r.metadataKept).toBe(0);
    expect((await fs.stat(metaPack.file)).size).toBe(metaPack.size);
    // The dry run says the same.
    const dry = JSON.parse(await gvOk(repo, ['gc', '--json', '--dry-run', '--repack-threshold', '100']));
    expect(dry.warnings.join('\n')).toMatch(new RegExp(`pack ${metaPack.packId}: damaged record`));
    expect(await restoreSum(repo, 'd2@latest')).toBe(sums.get('d2'));
  });

  it('a damaged record among dead chunks: format 4 leaves the pack, format 3 deletes it unread as before', async () => {
    for (const version of [3, 4]) {
      const repo = await newRepo(`repo-meta-v${version}`);
      const cfgFile = path.join(repo, 'config.json');
      await fs.writeFile(cfgFile, JSON.stringify({ ...JSON.parse(await fs.readFile(cfgFile, 'utf8')), version }));
      await writeImage(s.path('v.img'), [prng(31, 2 << 20)]);
      await gvOk(repo, ['backup', s.path('v.img'), '--name', 'v']);
      const vPacks = await scanAll(repo);
      const vPack = vPacks.find((p) => p.records.size === 0); // its data pack (format 4: map and record are in a pack of their own)
      const wSum = await writeImage(s.path('w.img'), [prng(32, 1 << 20)]);
      await gvOk(repo, ['backup', s.path('w.img'), '--name', 'w']);
      const vLoc = (await indexKeys(repo, 'c')).map(([, v]) => v).find((v) => v.toString('hex', 0, 16) === vPack!.packId)!;
      await gvOk(repo, ['forget', 'v@latest', '--force-young']);
      const file = path.join(repo, 'packs', vPack!.packId.slice(0, 2), `${vPack!.packId}.pack`);
      await flipByte(file, Number(vLoc.readBigUInt64LE(16)) + 9); // a length in a record header
      const r = JSON.parse(await gvOk(repo, ['gc', '--json']));
      // Format 4: only v's generation pack (map and record) is dropped; the data pack is left alone.
      expect([r.metadataKept, r.metadataDropped]).toEqual([0, version === 3 ? 0 : 2]);
      if (version === 3) {
        expect(r).toMatchObject({ packsDeleted: 1, warnings: [] });
        await expect(fs.stat(file)).rejects.toThrow();
      } else {
        expect(r.packsDeleted).toBe(1);
        expect(r.warnings.join('\n')).toMatch(new RegExp(`pack ${vPack!.packId}: damaged record at offset`));
        expect((await fs.stat(file)).size).toBe(vPack!.size);
      }
      expect(await restoreSum(repo, 'w@latest')).toBe(wSum);
    }
  });

  it('kill -9 at random moments: every remaining generation keeps its records in the packs', async () => {
    const seed = Number(process.env.GENVAULT_GC_KILL_SEED ?? randomBytes(4).readUInt32LE(0));
    if (!Number.isInteger(seed)) throw new Error(`GENVAULT_GC_KILL_SEED=${process.env.GENVAULT_GC_KILL_SEED}: not an integer`);
    const rand = seededRandom(seed);
    onTestFailed(() => console.log(`gc-meta kill test failed with seed ${seed} (replay: GENVAULT_GC_KILL_SEED=${seed})`));
    const repo = await newRepo('repo-meta-kill');
    const sums = new Map<string, string>();
    const shared = prng(50, 1 << 20);
    let seq = 0;
    const add = async () => {
      const name = `k${seq++}`;
      sums.set(name, await writeImage(s.path('k.img'), [prng(1000 + seq, 1 << 20), shared, prng(2000 + seq, (1 + (seq % 2)) << 20)]));
      await gvOk(repo, ['backup', s.path('k.img'), '--name', name]);
    };
    for (let i = 0; i < 3; i++) await add();
    const phases = ['locked', 'sweep', 'leaves', 'repack', 'repack', 'finish'];
    let killed = 0;
    const forgotten: string[] = []; // the change each forget wrote
    for (let round = 0; round < 8; round++) {
      const victim = [...sums.keys()][round % sums.size]!;
      forgotten.push(`${(await list(repo)).find((g) => g.name === victim)!.id}:forgotten`);
      await gvOk(repo, ['forget', `${victim}@latest`, '--force-young']);
      sums.delete(victim);
      // The backup also cleans up after the gc killed in the round before (its registration).
      await add();
      const child = (await import('node:child_process')).spawn(process.execPath, [CLI, '-r', repo, 'gc', '--repack-threshold', '100'], {
        env: { ...process.env, GENVAULT_NO_PROGRESS: '1', GENVAULT_GC_TRACE: '1' },
        stdio: ['ignore', 'ignore', 'pipe'],
      });
      const exited = new Promise<void>((r) => child.on('exit', () => r()));
      const phase = phases[Math.floor(rand() * phases.length)]!;
      await new Promise<void>((resolve) => {
        let err = '';
        child.stderr!.on('data', (d) => {
          err += d;
          if (err.includes(`gc-trace: ${phase}\n`)) resolve();
        });
        void exited.then(() => resolve());
      });
      await new Promise((r) => setTimeout(r, rand() * 30));
      if (child.exitCode === null) {
        child.kill('SIGKILL');
        killed++;
      }
      await exited;
      const packs = await expectDescribed(repo, `round ${round} (killed in ${phase})`);
      expect(packs.flatMap((p) => p.changes).sort(), `round ${round} (killed in ${phase}): forgotten changes`).toEqual([...forgotten].sort());
      expect((await list(repo)).map((g) => g.name).sort()).toEqual([...sums.keys()].sort());
    }
    expect(killed).toBeGreaterThan(2);
    const r = JSON.parse(await gvOk(repo, ['gc', '--json', '--repack-threshold', '100']));
    expect(r.warnings).toEqual([]);
    const last = await expectDescribed(repo, 'after the last gc');
    expectNoDuplicates(last);
    expect(last.flatMap((p) => p.changes).sort()).toEqual([...forgotten].sort());
    for (const [name, sum] of sums) expect(await restoreSum(repo, `${name}@latest`), name).toBe(sum);
    const v = await gv(repo, ['verify', '--full']);
    expect(v.code, v.stdout + v.stderr).toBe(0);
    expect((await sh('ls', [path.join(repo, 'locks')])).stdout.trim()).toBe('');
  });
});

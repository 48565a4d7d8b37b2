/**
 * Format 4 writers: after real CLI runs (backups, protect, unprotect, forget, prune), the
 * packs alone, read without the index, hold a record of everything the index holds: every
 * `l` leaf, every generation's map (the same bytes as under `m`) and record, the latest
 * change of each changed generation, and a `forgotten` change for each removed one.
 * Also: a backup killed before its commit, and a backup that opened the repository as
 * version 3 and commits after it became version 4.
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { K_GEN, K_GENMAP, K_LEAF, prefixEnd } from '../src/format/keys.js';
import { decodeTop } from '../src/format/chunkmap.js';
import { REC_CHANGE, REC_GENERATION, REC_GENMAP, REC_LEAF, type GenerationChange } from '../src/format/meta.js';
import type { Generation } from '../src/format/generation.js';
import { listPacks, scanStoredPack } from '../src/store/pack-reader.js';
import { LocalStore } from '../src/store/local.js';
import { Repository } from '../src/repository/repository.js';
import { Pin } from '../src/repository/locks.js';
import { CliProcess, Scratch, gv, gvOk, prng } from './helpers.js';

const MiB = 1 << 20;

/** What the packs say, read without the index. */
interface PackMeta {
  packs: Map<string, number>;
  leaves: Set<string>;
  /** Leaf records, repeats included. */
  leafRecords: number;
  maps: Map<string, Buffer[]>;
  records: Map<string, Buffer[]>;
  changes: Map<string, GenerationChange[]>;
  damaged: number;
}

async function packMeta(repo: string): Promise<PackMeta> {
  const store = new LocalStore(repo);
  const m: PackMeta = { packs: new Map(), leaves: new Set(), leafRecords: 0, maps: new Map(), records: new Map(), changes: new Map(), damaged: 0 };
  const push = <T>(map: Map<string, T[]>, k: string, v: T) => map.set(k, [...(map.get(k) ?? []), v]);
  try {
    for (const p of await listPacks(store)) {
      m.packs.set(p.packId, p.size);
      const it = scanStoredPack(store, p);
      let r = await it.next();
      for (; !r.done; r = await it.next()) {
        const item = r.value;
        if (item.kind === 'damaged') m.damaged++;
        if (item.kind !== 'meta') continue;
        const rec = item.record;
        if (rec.type === REC_LEAF) {
          m.leaves.add(item.header.digest.toString('hex'));
          m.leafRecords++;
        }
        else if (rec.type === REC_GENMAP) push(m.maps, rec.id, Buffer.from(rec.top));
        else if (rec.type === REC_GENERATION) push(m.records, rec.generation.id, Buffer.from(rec.json));
        else if (rec.type === REC_CHANGE) push(m.changes, rec.change.id, rec.change);
      }
      expect(r.value.tail, `torn tail in ${p.name}`).toBe(0);
    }
  } finally {
    await store.close();
  }
  return m;
}

/** What the index holds: generation records (raw), maps, leaves. */
interface IndexState {
  gens: Array<{ gen: Generation; json: Buffer }>;
  maps: Map<string, Buffer>;
  leaves: Set<string>;
}

async function indexState(repo: string): Promise<IndexState> {
  const r = await Repository.open(repo);
  const s: IndexState = { gens: [], maps: new Map(), leaves: new Set() };
  try {
    for await (const [k, v] of r.db.iterator({ gte: Buffer.of(K_GEN), lt: prefixEnd(Buffer.of(K_GEN)) })) {
      s.gens.push({ gen: JSON.parse(v.toString()) as Generation, json: Buffer.from(v) });
    }
    for await (const [k, v] of r.db.iterator({ gte: Buffer.of(K_GENMAP), lt: prefixEnd(Buffer.of(K_GENMAP)) })) {
      s.maps.set(k.toString('hex', 1), Buffer.from(v));
    }
    for await (const k of r.db.keys({ gte: Buffer.of(K_LEAF), lt: prefixEnd(Buffer.of(K_LEAF)) })) s.leaves.add(k.toString('hex', 1));
  } finally {
    await r.close();
  }
  return s;
}

const latest = (cs: GenerationChange[] | undefined) => (cs ?? []).reduce<GenerationChange | null>((a, c) => (!a || c.rev > a.rev ? c : a), null);

/** The packs describe the index: every check of FORMAT.md's "Version 4" a rebuild relies on. */
async function expectPacksDescribeIndex(repo: string): Promise<{ meta: PackMeta; index: IndexState }> {
  const meta = await packMeta(repo);
  const index = await indexState(repo);
  expect(meta.damaged).toBe(0);
  const listed = JSON.parse(await gvOk(repo, ['list', '--json'])) as Generation[];
  expect(listed.map((g) => g.id).sort()).toEqual(index.gens.filter((g) => !g.gen.removed).map((g) => g.gen.id).sort());
  for (const { gen, json } of index.gens) {
    const what = `${gen.name}@${gen.id}`;
    const change = latest(meta.changes.get(gen.id));
    if (gen.removed) {
      expect(change?.forgotten, what).toBe(true);
      continue;
    }
    expect(meta.maps.get(gen.id)?.map((b) => b.toString('hex')), what).toContain(index.maps.get(gen.id)!.toString('hex'));
    const recs = meta.records.get(gen.id) ?? [];
    expect(recs.length, what).toBeGreaterThan(0);
    if (!gen.rev) {
      expect(change, what).toBe(null);
      expect(recs.map((b) => b.toString()), what).toContain(json.toString());
    } else {
      // The backup's record, with the latest change applied, is the index's record.
      const base = JSON.parse(recs[0]!.toString()) as Generation;
      expect(change, what).toMatchObject({ rev: gen.rev, name: gen.name, created: gen.created, tags: gen.tags, protected: gen.protected === true });
      expect(change!.forgotten, what).toBeUndefined();
      const rebuilt: Generation = { ...base, tags: change!.tags!, rev: change!.rev };
      if (change!.protected) rebuilt.protected = true;
      else delete rebuilt.protected;
      expect(rebuilt, what).toEqual(gen);
    }
  }
  for (const l of index.leaves) expect(meta.leaves.has(l), `leaf ${l} has no record`).toBe(true);
  return { meta, index };
}

describe('format 4: every writer writes its metadata records', () => {
  let s: Scratch;
  beforeAll(async () => {
    s = await Scratch.create('genvault-metawriters-');
  });
  afterAll(async () => {
    await s?.cleanup();
  });

  /**
   * A repository of the current version (5) with small packs, segments and leaves, so that a few MiB make
   * several of each (and flushes in the middle of a backup, when a pack is full).
   */
  async function newRepo(name: string, version = 5): Promise<string> {
    const repo = s.path(name);
    await gvOk(repo, ['init']);
    const cfgFile = path.join(repo, 'config.json');
    const cfg = JSON.parse(await fs.readFile(cfgFile, 'utf8'));
    expect(cfg.version).toBe(5);
    Object.assign(cfg, { version, packTargetSize: MiB, leaf: { minChunks: 2, maxChunks: 4 } });
    cfg.chunking.segment = cfg.chunking.max;
    await fs.writeFile(cfgFile, JSON.stringify(cfg, null, 2) + '\n');
    return repo;
  }

  const backupJson = async (repo: string, img: string, name: string) => JSON.parse(await gvOk(repo, ['backup', img, '--name', name, '--json'])) as Generation;

  it('backups, protect, unprotect, forget and prune leave packs that describe the index', async () => {
    const repo = await newRepo('repo-v4');
    const a = s.path('a.img');
    const b = s.path('b.img');
    await fs.writeFile(a, Buffer.concat([prng(1, 3 * MiB), Buffer.alloc(MiB), prng(2, 2 * MiB)]));
    await fs.writeFile(b, prng(3, 4 * MiB));
    const a1 = await backupJson(repo, a, 'a');
    const b1 = await backupJson(repo, b, 'b');
    expect(a1.leaves).toBeGreaterThan(3);
    let st = await expectPacksDescribeIndex(repo);
    expect(st.meta.packs.size).toBeGreaterThan(4); // 1 MiB packs: several flushes per backup

    // The next day: a changed, b unchanged (nothing new: its records need a pack of their own).
    const fh = await fs.open(a, 'r+');
    await fh.write(prng(4, MiB), 0, MiB, 2 * MiB);
    await fh.close();
    const packsBefore = st.meta.packs;
    const a2 = await backupJson(repo, a, 'a');
    expect(a2.stats.newChunks).toBeGreaterThan(0);
    const b2 = await backupJson(repo, b, 'b');
    expect(b2.stats.newChunks).toBe(0);
    st = await expectPacksDescribeIndex(repo);
    const added = [...st.meta.packs.keys()].filter((p) => !packsBefore.has(p));
    expect(added.length).toBeGreaterThan(1);
    // a2 wrote records only for the leaves it put (none twice); b2's one pack holds only
    // its map and record.
    expect(st.meta.leafRecords).toBe(st.meta.leaves.size);
    expect(st.meta.records.get(b2.id)).toHaveLength(1);
    expect(st.meta.maps.get(b2.id)).toHaveLength(1);

    // protect, a no-op protect (writes nothing), unprotect: revs 1 and 2.
    const p = JSON.parse(await gvOk(repo, ['protect', `a@${a2.id}`, '--json']));
    expect(p).toMatchObject({ changed: true, protected: true, rev: 1 });
    const afterProtect = await packMeta(repo);
    expect(latest(afterProtect.changes.get(a2.id))).toMatchObject({ rev: 1, protected: true, tags: [] });
    const noop = JSON.parse(await gvOk(repo, ['protect', `a@${a2.id}`, '--json']));
    expect(noop.changed).toBe(false);
    expect((await packMeta(repo)).packs).toEqual(afterProtect.packs);
    await expectPacksDescribeIndex(repo);
    await gvOk(repo, ['protect', `b@${b1.id}`]);
    await gvOk(repo, ['unprotect', `a@${a2.id}`]);
    st = await expectPacksDescribeIndex(repo);
    expect(latest(st.meta.changes.get(a2.id))).toMatchObject({ rev: 2, protected: false });
    expect(st.index.gens.find((g) => g.gen.id === a2.id)!.gen.rev).toBe(2);

    // forget (b2 open in a mount: pinned, so only hidden), then prune: a forgotten change
    // for each generation removed.
    const pin = await Pin.take(repo, b2.id);
    try {
      await gvOk(repo, ['forget', `b@${b2.id}`, '--force-young']);
    } finally {
      await pin.release();
    }
    const pr = JSON.parse(await gvOk(repo, ['prune', '--keep-last', '1', '--min-age', '0', '--json']));
    const prunedIds = (pr.generations as Array<{ id: string; action: string }>).filter((g) => g.action === 'remove').map((g) => g.id);
    expect(prunedIds).toEqual([a1.id]); // b1 is protected and, after the forget, b's only one
    st = await expectPacksDescribeIndex(repo);
    expect(st.index.gens.some((g) => g.gen.id === a1.id)).toBe(false);
    expect(st.index.gens.find((g) => g.gen.id === b2.id)?.gen).toMatchObject({ removed: true, rev: 1 });
    for (const id of [b2.id, a1.id]) expect(latest(st.meta.changes.get(id))).toMatchObject({ rev: 1, forgotten: true });
    // A prune that removes nothing writes nothing.
    const before = st.meta.packs;
    await gvOk(repo, ['prune', '--keep-last', '1', '--min-age', '0']);
    expect((await packMeta(repo)).packs).toEqual(before);
    const v = await gv(repo, ['verify']);
    expect(v.code, v.stdout + v.stderr).toBe(0);
  });

  it('a backup killed before its commit leaves no generation; the next backup trims its records away', async () => {
    const repo = await newRepo('repo-killed');
    const c = s.path('c.img');
    await fs.writeFile(c, prng(10, 3 * MiB));
    const pause = s.path('pause-killed');
    await fs.writeFile(pause, '');
    const bk = new CliProcess(['-r', repo, 'backup', c, '--name', 'c', '--json'], { GENVAULT_BACKUP_PAUSE_FILE: pause });
    try {
      await bk.waitFor(/backup: paused at before-commit/, 60_000);
      // Its map and record are in its pack, synced, but the index does not show them.
      const held = await packMeta(repo);
      expect(held.records.size).toBe(1);
      bk.kill('SIGKILL');
      await bk.waitExit(30_000);
    } finally {
      await fs.rm(pause, { force: true });
    }
    expect(JSON.parse(await gvOk(repo, ['list', '--json']))).toEqual([]);
    // Before any writer trimmed them, the uncommitted records are not a generation the
    // index lost: verify reads packs only as far as the index commits them.
    expect((await packMeta(repo)).records.size).toBe(1);
    const v = await gv(repo, ['verify']);
    expect(v.code, v.stdout + v.stderr).toBe(0);
    await fs.writeFile(s.path('d.img'), prng(11, MiB));
    await backupJson(repo, s.path('d.img'), 'd');
    const st = await expectPacksDescribeIndex(repo);
    expect([...st.meta.records.values()].flat().map((j) => JSON.parse(j.toString()).name)).toEqual(['d']);
    // The killed run's leaves that were committed by its flushes still have their records.
    expect(st.meta.leaves.size).toBe(st.index.leaves.size);
  });

  it('version 3: no records and no extra packs; a backup that opened it as 3 catches up when it became 4', async () => {
    const repo = await newRepo('repo-v3', 3);
    const x = s.path('x.img');
    await fs.writeFile(x, prng(20, 3 * MiB));
    const x1 = await backupJson(repo, x, 'x');
    const packs1 = (await packMeta(repo)).packs;
    const x2 = await backupJson(repo, x, 'x'); // nothing new: no pack in version 3
    await backupJson(repo, x, 'x');
    const x4 = await backupJson(repo, x, 'x');
    await gvOk(repo, ['protect', `x@${x1.id}`]);
    await gvOk(repo, ['forget', `x@${x2.id}`, '--force-young']);
    await gvOk(repo, ['prune', '--keep-last', '1', '--min-age', '0']); // removes x3
    let meta = await packMeta(repo);
    expect(meta.packs).toEqual(packs1);
    expect((JSON.parse(await gvOk(repo, ['list', '--json'])) as Generation[]).map((g) => g.id)).toEqual([x1.id, x4.id]);
    expect([meta.leaves.size, meta.maps.size, meta.records.size, meta.changes.size]).toEqual([0, 0, 0, 0]);
    const v3packs = meta.packs.size;
    expect((await indexState(repo)).gens.find((g) => g.gen.id === x1.id)!.gen.rev).toBeUndefined();

    // A backup running as version 3 is held before its commit. `genvault upgrade` will not
    // start while it runs; an upgrade that started before it and was killed after changing
    // config.json (step 3, before it waited for writers) is what this backup meets.
    const y = s.path('y.img');
    await fs.writeFile(y, Buffer.concat([prng(20, MiB), prng(21, 2 * MiB)]));
    const pause = s.path('pause-v3');
    await fs.writeFile(pause, '');
    const bk = new CliProcess(['-r', repo, 'backup', y, '--name', 'y', '--json'], { GENVAULT_BACKUP_PAUSE_FILE: pause });
    try {
      await bk.waitFor(/backup: paused at before-commit/, 60_000);
      expect((await packMeta(repo)).records.size).toBe(0);
      const up = await gv(repo, ['upgrade']);
      expect(up.code).not.toBe(0);
      expect(up.stderr).toMatch(/without running writers; running: backup y/);
      const cfgFile = path.join(repo, 'config.json');
      const cfg = JSON.parse(await fs.readFile(cfgFile, 'utf8'));
      await fs.writeFile(cfgFile, JSON.stringify({ ...cfg, version: 4 }, null, 2) + '\n');
    } finally {
      await fs.rm(pause, { force: true });
    }
    expect((await bk.waitExit(60_000)).code, bk.out).toBe(0);
    const y1 = (JSON.parse(await gvOk(repo, ['list', '--json'])) as Generation[]).find((g) => g.name === 'y')!;
    meta = await packMeta(repo);
    const index = await indexState(repo);
    expect(meta.packs.size).toBeGreaterThan(v3packs);
    expect(meta.records.get(y1.id)?.map(String)).toEqual([index.gens.find((g) => g.gen.id === y1.id)!.json.toString()]);
    expect(meta.maps.get(y1.id)).toEqual([index.maps.get(y1.id)]);
    // All of its map's leaves, also those it found in the index (x's first MiB).
    const yLeaves = decodeTop(index.maps.get(y1.id)!).map((r) => r.digest.toString('hex'));
    for (const l of yLeaves) expect(meta.leaves.has(l), `leaf ${l}`).toBe(true);
    expect(meta.records.has(x1.id)).toBe(false);

    // upgrade, run again, writes what the packs lack (x's generations), not y's again.
    const res = JSON.parse(await gvOk(repo, ['upgrade', '--json']));
    expect(res).toMatchObject({ from: 4, to: 5, generations: 2 }); // x1 and x4
    await expectPacksDescribeIndex(repo);
    expect((await packMeta(repo)).records.get(y1.id)).toHaveLength(1);
  });
});

/**
 * verify, protect, forget and prune on real repositories through the CLI: a flipped byte
 * in a pack names exactly the generations that use the chunk, a deleted pack is found by
 * the plain index check, and the deletion guards (protected, minimum age, refuse to
 * empty) hold.
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { dataPackFiles, flipByte, gv, gvOk, oneLine, prng, sh, Scratch } from './helpers.js';
import { LeafBuilder, encodeTop } from '../src/format/chunkmap.js';
import { leafKey } from '../src/format/keys.js';
import { Repository } from '../src/repository/repository.js';
import { RECORD_HEADER_SIZE } from '../src/format/pack.js';
import { LocalStore } from '../src/store/local.js';
import { listPacks, scanStoredPack } from '../src/store/pack-reader.js';

let s: Scratch;




interface Gen {
  id: string;
  name: string;
  created: string;
  tags?: string[];
  protected?: boolean;
}

const label = (g: { name: string; id: string }) => `${g.name}@${g.id}`;

/** Where the last chunk or group record of a pack ends (metadata records may follow). */
async function endOfLastDataRecord(repo: string, packFile: string): Promise<number> {
  const store = new LocalStore(repo);
  try {
    const p = (await listPacks(store)).find((x) => x.packId === path.basename(packFile, '.pack'))!;
    let end = 0;
    for await (const item of scanStoredPack(store, p)) {
      if (item.kind === 'chunk' || item.kind === 'group') end = item.offset + RECORD_HEADER_SIZE + item.header.storedLength;
    }
    return end;
  } finally {
    await store.close();
  }
}

beforeAll(async () => {
  s = await Scratch.create('genvault-verify-');
});

afterAll(async () => {
  await s?.cleanup();
});

describe('verify', () => {
  let repo: string;
  let shared: Buffer;
  let packA: string;
  let packC: string;
  let gens: Gen[];

  beforeAll(async () => {
    repo = s.path('repo');
    shared = prng(11, 4 << 20);
    // a and b start with the same 4 MiB; c shares nothing with them
    await fs.writeFile(s.path('a.img'), Buffer.concat([shared, prng(12, 2 << 20)]));
    await fs.writeFile(s.path('b.img'), Buffer.concat([shared, prng(13, 2 << 20), Buffer.alloc(1 << 20)]));
    await fs.writeFile(s.path('c.img'), Buffer.concat([prng(14, 3 << 20), Buffer.alloc(1 << 20, 'some text ')]));
    await gvOk(repo, ['init']);
    await gvOk(repo, ['backup', s.path('a.img'), '--name', 'a']);
    packA = (await dataPackFiles(repo))[0]!;
    await gvOk(repo, ['backup', s.path('b.img'), '--name', 'b']);
    const before = await dataPackFiles(repo);
    await gvOk(repo, ['backup', s.path('c.img'), '--name', 'c']);
    packC = (await dataPackFiles(repo)).find((p) => !before.includes(p))!;
    await gvOk(repo, ['backup', s.path('a.img'), '--name', 'a']); // a second generation of a, nothing new
    gens = JSON.parse(await gvOk(repo, ['list', '--json']));
    expect(gens.map((g) => g.name)).toEqual(['a', 'a', 'b', 'c']);
    expect(packC).toBeTruthy();
  });

  it('a clean repository verifies with exit 0, in every mode', async () => {
    const r = await gv(repo, ['verify']);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/checked 4 generation\(s\) of 3 image\(s\)/);
    expect(r.stdout).toMatch(/no damage found/);
    const full = JSON.parse(await gvOk(repo, ['verify', '--full', '--json']));
    expect(full).toMatchObject({ ok: true, mode: 'full', generations: 4, images: 3, headersChecked: 0, damagedChunks: [], damagedGenerations: [] });
    expect(full.chunks).toBeGreaterThan(20);
    expect(full.chunksRead).toBe(full.chunks);
    // a's first 4 MiB is stored once for a and b: the referenced raw bytes are about 4+2+2+4 MiB
    expect(full.bytesRead).toBeGreaterThan(11 << 20);
    expect(full.bytesRead).toBeLessThan(13 << 20);
    const sample = JSON.parse(await gvOk(repo, ['verify', '--sample', '25', '--json']));
    expect(sample).toMatchObject({ ok: true, mode: 'sample', samplePercent: 25 });
    expect(sample.chunksRead).toBe(Math.ceil(sample.chunks * 0.25));
    expect(sample.headersChecked + sample.chunksRead).toBe(sample.chunks);
  });

  it('a flipped byte: the header check passes, --full exits 1 and names exactly the generations using the chunk', async () => {
    // The first record of a's pack is a's first chunk (image offset 0), in the 4 MiB a and b share.
    const at = 24 + 52 + 1000;
    await flipByte(packA, at);
    try {
      const quick = await gv(repo, ['verify']);
      expect(quick.code, quick.stdout).toBe(0); // headers are intact; only the payload changed

      const r = await gv(repo, ['verify', '--full', '--json']);
      expect(r.code).toBe(1);
      expect(oneLine(r.stderr)).toMatch(/damage found: 1 damaged chunk\(s\); 3 generation\(s\) affected/);
      const rep = JSON.parse(r.stdout);
      expect(rep.ok).toBe(false);
      expect(rep.damagedChunks).toHaveLength(1);
      const dc = rep.damagedChunks[0];
      expect(dc.problem).toMatch(/does not match its SHA-256 digest/);
      expect(dc.pack).toBe(path.basename(packA, '.pack'));
      expect(dc.packOffset).toBe(24);
      const affected = gens.filter((g) => g.name !== 'c').map(label).sort();
      expect(rep.damagedGenerations.map(label).sort()).toEqual(affected);
      expect(dc.affects.map(label).sort()).toEqual(affected);
      for (const g of rep.damagedGenerations) {
        expect(g.whole).toBe(false);
        expect(g.ranges).toHaveLength(1);
        expect(g.ranges[0].offset).toBe(0);
        expect(g.ranges[0].length).toBeGreaterThanOrEqual(16384);
        expect(g.problems).toEqual([expect.stringMatching(/^1 damaged chunk\(s\): content does not match/)]);
      }

      const human = await gv(repo, ['verify', '--sample', '100']);
      expect(human.code).toBe(1);
      expect(human.stdout).toMatch(/DAMAGED chunk [0-9a-f]{64}: content does not match/);
      for (const g of gens) {
        const line = human.stdout.split('\n').find((l) => l.startsWith(`DAMAGED generation ${label(g)}`));
        if (g.name === 'c') expect(line).toBeUndefined();
        else expect(line).toMatch(/image bytes 0-\d+/);
      }
    } finally {
      await flipByte(packA, at);
    }
    expect((await gv(repo, ['verify', '--full'])).code).toBe(0);
  });

  it('a deleted pack: plain verify exits 1 and names only the generation using it', async () => {
    const keep = s.path('packC.bak');
    await fs.copyFile(packC, keep);
    await fs.rm(packC);
    try {
      const r = await gv(repo, ['verify', '--json']);
      expect(r.code).toBe(1);
      const rep = JSON.parse(r.stdout);
      expect(rep.damagedPacks).toEqual([{ pack: path.basename(packC, '.pack'), problem: 'pack file is missing' }]);
      expect(rep.damagedChunks.length).toBeGreaterThan(5);
      expect(rep.damagedChunks.every((c: { problem: string }) => /missing or unreadable/.test(c.problem))).toBe(true);
      expect(rep.damagedGenerations.map(label)).toEqual([label(gens[3]!)]);
      // c's data: 3 MiB of random bytes, then 1 MiB of text: all of it damaged, as one range
      expect(rep.damagedGenerations[0].ranges).toEqual([{ offset: 0, length: 4 << 20 }]);
    } finally {
      await fs.copyFile(keep, packC);
    }
    expect((await gv(repo, ['verify'])).code).toBe(0);
  });

  it('a truncated pack and a missing map leaf are found by the index check', async () => {
    const st = await fs.stat(packC);
    const keep = s.path('packC.bak2');
    await fs.copyFile(packC, keep);
    // Into the last chunk or group record: in format 4 the generation's map and record follow it.
    const cut = (await endOfLastDataRecord(repo, packC)) - 1;
    await fs.truncate(packC, cut);
    try {
      const rep = JSON.parse((await gv(repo, ['verify', '--json'])).stdout);
      expect(rep.ok).toBe(false);
      // The last record: one chunk, or the members of one group record (c's compressible
      // tail is two chunks in one group), all in c's pack.
      expect(rep.damagedChunks.length).toBeGreaterThanOrEqual(1);
      expect(rep.damagedChunks.length).toBeLessThanOrEqual(2);
      for (const dc of rep.damagedChunks) {
        expect(dc.problem).toMatch(/pack file too short/);
        expect(dc.pack).toBe(path.basename(packC, '.pack'));
      }
      expect(rep.damagedPacks).toEqual([{ pack: path.basename(packC, '.pack'), problem: `pack file has ${cut} bytes, less than its committed size ${st.size}` }]);
      expect(rep.damagedGenerations.map(label)).toEqual([label(gens[3]!)]);
    } finally {
      await fs.copyFile(keep, packC);
    }
  });

  it('a map entry whose BLAKE3 does not fit the data: restore refuses, verify --full names it', async () => {
    // What a bug in the change detector would leave: a well-formed map (leaf under its own
    // digest, top level pointing at it) whose BLAKE3 for one chunk is wrong.
    const dir = s.path('bad-blake3');
    await gvOk(dir, ['init']);
    const img = s.path('bad-blake3.img');
    await fs.writeFile(img, prng(91, 6 << 20));
    await gvOk(dir, ['backup', img, '--name', 'x']);
    const r = await Repository.open(dir);
    let bad: string;
    try {
      const g = (await r.generations('x')).at(-1)!;
      const map = await r.chunkMap(g);
      const leaf = await map.leaf(0);
      const b = new LeafBuilder(1 << 30, 1 << 30); // one leaf, cut only by finish()
      for (let i = 0; i < leaf.lengths.length; i++) {
        const fast = leaf.hasFast[i] ? Buffer.from(leaf.fast.subarray(i * 32, i * 32 + 32)) : null;
        if (i === 1) fast![0]! ^= 1;
        b.add({ length: leaf.lengths[i]!, zero: !!leaf.zero[i], digest: Buffer.from(leaf.digests.subarray(i * 32, i * 32 + 32)), fast });
      }
      bad = leaf.digests.toString('hex', 32, 64);
      const done = b.finish()!;
      await r.db.put(leafKey(done.ref.digest), done.encoded);
      await r.db.put(Repository.mapKey(g.id), encodeTop([done.ref, ...map.refs.slice(1)]));
    } finally {
      await r.close();
    }
    expect((await gv(dir, ['verify'])).code).toBe(0); // the index check does not read data
    const v = await gv(dir, ['verify', '--full', '--json']);
    expect(v.code).toBe(1);
    const rep = JSON.parse(v.stdout);
    expect(rep.damagedChunks.map((c: { digest: string }) => c.digest)).toEqual([bad]);
    expect(rep.damagedChunks[0].problem).toMatch(/does not match its BLAKE3 digest/);
    const out = await gv(dir, ['restore', 'x@latest', s.path('bad-blake3.out')]);
    expect(out.code).toBe(1);
    expect(oneLine(out.stderr)).toMatch(/1 damaged chunk\(s\)/);
  });

  it('exit 2 when verify cannot run, and on bad options', async () => {
    let r = await gv(s.path('nowhere'), ['verify']);
    expect(r.code).toBe(2);
    expect(oneLine(r.stderr)).toMatch(/not a genvault repository/);
    r = await gv(repo, ['verify', '--sample', '0']);
    expect(r.code).toBe(2);
    expect(oneLine(r.stderr)).toMatch(/--sample/);
    r = await gv(repo, ['verify', '--sample', '5', '--full']);
    expect(r.code).toBe(2);
    expect(oneLine(r.stderr)).toMatch(/either --full or --sample/);
    // Scratch space it cannot use (its spill files and pack model go under $TMPDIR): one
    // line naming the place, which it does not create.
    const scratch = s.path('no-scratch');
    r = await gv(repo, ['verify', '--full'], { env: { ...process.env, TMPDIR: scratch } });
    expect(r.code).toBe(2);
    expect(oneLine(r.stderr)).toMatch(new RegExp(`^genvault: verify could not run: ${scratch}/genvault-verify-\\S+: no such file or directory$`));
    await expect(fs.stat(scratch)).rejects.toThrow(/ENOENT/);
    const help = await gv(repo, ['verify', '--help']);
    expect(help.code).toBe(0);
    expect(help.stdout).toMatch(/Exit codes: 0 no damage, 1 damage found, 2 verify could not run/);
  });
});

describe('protect, forget and prune', () => {
  // Every test starts from its own copy of one repository (no genvault process has it
  // open then): x has 4 generations, the second tagged release, and y has 2.
  let template: string;
  let repo: string;
  let copies = 0;

  const list = async (name?: string): Promise<Gen[]> => JSON.parse(await gvOk(repo, ['list', ...(name ? [name] : []), '--json']));

  beforeAll(async () => {
    template = s.path('repo-prune');
    await gvOk(template, ['init']);
    await fs.writeFile(s.path('x.img'), prng(21, 1 << 20));
    await fs.writeFile(s.path('y.img'), prng(22, 1 << 20));
    for (let i = 0; i < 4; i++) await gvOk(template, ['backup', s.path('x.img'), '--name', 'x', ...(i === 1 ? ['--tag', 'release'] : [])]);
    for (let i = 0; i < 2; i++) await gvOk(template, ['backup', s.path('y.img'), '--name', 'y']);
  });

  beforeEach(async () => {
    repo = s.path(`repo-prune-${++copies}`);
    const r = await sh('cp', ['-a', template, repo]);
    if (r.code) throw new Error(`cp -a: ${r.stderr}`);
  });

  it('protect and unprotect set the flag in the generation record', async () => {
    const [x0] = await list('x');
    expect((await gvOk(repo, ['protect', `x@${x0!.id}`])).trim()).toBe(`protected x@${x0!.id} (created ${x0!.created})`);
    expect(JSON.parse(await gvOk(repo, ['info', `x@${x0!.id}`, '--json'])).protected).toBe(true);
    expect(await gvOk(repo, ['protect', `x@${x0!.id}`])).toMatch(/was already protected/);
    await gvOk(repo, ['unprotect', `x@${x0!.id}`]);
    expect(JSON.parse(await gvOk(repo, ['info', `x@${x0!.id}`, '--json'])).protected).toBe(false);
    const r = await gv(repo, ['protect', 'x@ffffffff']);
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/unknown revision/);
  });

  it('forget refuses protected and young generations, and removes one otherwise', async () => {
    const before = await list('x');
    const oldest = before[0]!;
    await gvOk(repo, ['protect', `x@${oldest.id}`]);
    let r = await gv(repo, ['forget', `x@${oldest.id}`, '--force-young']);
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/is protected; run 'genvault unprotect x@[0-9a-f]{16}' first/);
    await gvOk(repo, ['unprotect', `x@${oldest.id}`]);
    r = await gv(repo, ['forget', `x@${oldest.id}`]);
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/younger than the minimum age 1d; use --force-young/);
    const out = await gvOk(repo, ['forget', `x@${oldest.id}`, '--force-young']);
    expect(out).toMatch(/forgot x@.*genvault gc/);
    expect((await list('x')).map((g) => g.id)).toEqual(before.slice(1).map((g) => g.id));
    // its data stays for gc: every remaining generation still verifies and restores
    expect((await gv(repo, ['verify', '--full'])).code).toBe(0);
    await gvOk(repo, ['restore', 'x@latest', s.path('x.out')]);
    expect((await fs.readFile(s.path('x.out'))).equals(await fs.readFile(s.path('x.img')))).toBe(true);
  });

  it('the minimum age comes from config.json (guards.minAge), default 1d for older repositories', async () => {
    const cfgFile = path.join(repo, 'config.json');
    const cfg = JSON.parse(await fs.readFile(cfgFile, 'utf8'));
    expect(cfg.guards).toEqual({ minAge: '1d' });
    const { guards: _g, ...old } = cfg;
    await fs.writeFile(cfgFile, JSON.stringify(old));
    const dry = JSON.parse(await gvOk(repo, ['prune', '--keep-last', '1', '--dry-run', '--json']));
    expect(dry.minAge).toBe('1d');
    expect(dry.removed).toBe(0);
    expect(dry.generations.every((g: { reasons: string[] }) => g.reasons.includes('younger than min-age'))).toBe(true);
    await fs.writeFile(cfgFile, JSON.stringify({ ...cfg, guards: { minAge: 'soon' } }));
    const bad = await gv(repo, ['list']);
    expect(bad.code).toBe(1);
    expect(oneLine(bad.stderr)).toMatch(/guards\.minAge/);
    await fs.writeFile(cfgFile, JSON.stringify({ ...cfg, guards: { minAge: '0' } }));
    const zero = JSON.parse(await gvOk(repo, ['prune', '--keep-last', '1', '--dry-run', '--json']));
    expect(zero.minAge).toBe('0');
    expect(zero.removed).toBe(4); // x: 4, keep 1; y: 2, keep 1
    await fs.writeFile(cfgFile, JSON.stringify(cfg, null, 2));
  });

  it('prune --dry-run shows decisions and reasons and changes nothing; prune removes', async () => {
    // Without x's oldest generation: the release-tagged one is the oldest now.
    await gvOk(repo, ['forget', `x@${(await list('x'))[0]!.id}`, '--force-young']);
    const x = await list('x');
    expect(x).toHaveLength(3);
    expect(x[0]!.tags).toEqual(['release']);
    const y = await list('y');
    await gvOk(repo, ['protect', `y@${y[0]!.id}`]);

    const usage = await gv(repo, ['prune', '--min-age', '0']);
    expect(usage.code).toBe(2);
    expect(oneLine(usage.stderr)).toMatch(/no keep rule given/);
    const badAge = await gv(repo, ['prune', '--keep-last', '1', '--min-age', 'soon']);
    expect(badAge.code).toBe(2);
    expect(oneLine(badAge.stderr)).toMatch(/option '--min-age <duration>' argument 'soon' is invalid\. Expected a duration such as 0, 90m/);

    const rules = ['--keep-last', '1', '--keep-tag', 'release', '--min-age', '0'];
    const dry = JSON.parse(await gvOk(repo, ['prune', ...rules, '--dry-run', '--json']));
    expect(dry.dryRun).toBe(true);
    const decide = Object.fromEntries(dry.generations.map((g: Gen & { action: string; reasons: string[] }) => [label(g), [g.action, g.reasons]]));
    expect(decide).toEqual({
      [label(x[0]!)]: ['keep', ['tag release']],
      [label(x[1]!)]: ['remove', []],
      [label(x[2]!)]: ['keep', ['last 1']],
      [label(y[0]!)]: ['keep', ['protected']],
      [label(y[1]!)]: ['keep', ['last 1']],
    });
    const human = await gvOk(repo, ['prune', ...rules, '--dry-run']);
    expect(human).toMatch(/IMAGE\s+ID\s+CREATED \(UTC\)\s+WOULD\s+REASONS/);
    expect(human).toMatch(new RegExp(`${x[1]!.id}\\s+\\S+ \\S+\\s+remove\\s+no keep rule matches`));
    expect(human).toMatch(/would remove 1 of 5 generation\(s\) of 2 image\(s\); nothing changed/);
    expect(await list()).toHaveLength(5);

    const real = await gvOk(repo, ['prune', ...rules]);
    expect(real).toMatch(/removed 1 of 5 generation\(s\) of 2 image\(s\); run 'genvault gc' to reclaim their space/);
    expect((await list()).map(label)).toEqual([x[0]!, x[2]!, y[0]!, y[1]!].map(label));

    // only the named image; the protected generation survives a rule that keeps nothing else of it
    const onlyY = JSON.parse(await gvOk(repo, ['prune', 'y', '--keep-last', '1', '--min-age', '0', '--json']));
    expect(onlyY.removed).toBe(0);
    expect(onlyY.generations.map((g: Gen) => g.name)).toEqual(['y', 'y']);
    const unknown = await gv(repo, ['prune', 'nope', '--keep-last', '1']);
    expect(unknown.code).toBe(1);
    expect(oneLine(unknown.stderr)).toMatch(/no image named nope/);
  });

  it('prune refuses to empty an image unless --allow-empty', async () => {
    const r = await gv(repo, ['prune', 'x', '--keep-tag', 'nothing-has-this', '--min-age', '0']);
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/refusing to remove all 4 generation\(s\) of image x.*--allow-empty/);
    expect(await list('x')).toHaveLength(4);
    const out = JSON.parse(await gvOk(repo, ['prune', 'x', '--keep-tag', 'nothing-has-this', '--min-age', '0', '--allow-empty', '--json']));
    expect(out.removed).toBe(4);
    expect((await gv(repo, ['list', 'x'])).code).toBe(1);
    expect((await list()).map((g) => g.name)).toEqual(['y', 'y']);
    expect((await gv(repo, ['verify'])).code).toBe(0);
  });
});

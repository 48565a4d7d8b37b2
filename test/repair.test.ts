/**
 * `genvault repair` rebuilds the index from the packs (format 4): after the index is lost,
 * damaged, or a repair is killed at random moments, the rebuilt index lists the same
 * generations (ids, times, sizes, tags, protection) and every generation restores
 * byte-identical; a lost pack is named with the generations it takes data from; a format 3
 * repository upgraded can be repaired; --write refuses to run beside a writer or a holder
 * of the index.
 */
import { ClassicLevel } from 'classic-level';
import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { encodeMetaRecord, REC_CHANGE, REC_GENERATION } from '../src/format/meta.js';
import { scanPack } from '../src/format/scan.js';
import { PACK_MAGIC, newPackId, packObject } from '../src/format/pack.js';
import { CliProcess, ROOT, Scratch, format3Images, gv, gvOk, must, packFiles, prng, seededRandom, sh, sha256File, text } from './helpers.js';

const MiB = 1 << 20;
let s: Scratch;
let repo: string;
let pristine: string;
/** `list --json` of the pristine repository. */
let listed: string;
/** generation id -> sha256 of its image */
const want = new Map<string, string>();
/** Image name -> its newest bytes. */
const latest = new Map<string, Buffer>();
/** The packs the first backup of `vm` wrote. */
let vmFirstPacks: string[] = [];
/** The packs the backup of `small` wrote. */
let smallPacks: string[] = [];

const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');

function image(seed: number, mib: number): Buffer {
  const parts: Buffer[] = [];
  for (let i = 0; i < mib; i++) {
    const kind = (seed + i) % 3;
    parts.push(kind === 0 ? Buffer.alloc(MiB) : kind === 1 ? text(seed * 100 + i, MiB) : prng(seed * 100 + i, MiB));
  }
  return Buffer.concat(parts);
}

async function backup(name: string, data: Buffer, tags: string[] = []): Promise<string> {
  const file = s.path(`${name}.img`);
  await fs.writeFile(file, data);
  const g = JSON.parse(await gvOk(repo, ['backup', file, '--name', name, '--json', ...tags.flatMap((t) => ['--tag', t])])) as { id: string };
  want.set(g.id, sha(data));
  latest.set(name, data);
  return g.id;
}

async function resetRepo(): Promise<void> {
  await fs.rm(repo, { recursive: true, force: true });
  await must('cp', ['-a', pristine, repo]);
}

async function restoresAll(dir: string, ids: Map<string, string> = want): Promise<void> {
  const list = JSON.parse(await gvOk(dir, ['list', '--json'])) as Array<{ name: string; id: string }>;
  for (const g of list) {
    const out = s.path('out.img');
    await fs.rm(out, { force: true });
    await gvOk(dir, ['restore', `${g.name}@${g.id}`, out]);
    expect(await sha256File(out), `${g.name}@${g.id}`).toBe(ids.get(g.id));
  }
}

function expectOneLineNamingRepair(r: { code: number; stderr: string }): void {
  expect(r.code).not.toBe(0);
  expect(r.stderr).not.toMatch(/\n\s+at /);
  const lines = r.stderr.trim().split('\n');
  expect(lines).toHaveLength(1);
  expect(lines[0]).toMatch(/^genvault: .*'genvault repair'/);
}

async function buildDirs(dir: string): Promise<string[]> {
  return (await fs.readdir(dir)).filter((n) => n.startsWith('index.repair-')).sort();
}

beforeAll(async () => {
  s = await Scratch.create('genvault-repair-');
  repo = s.path('repo');
  pristine = s.path('pristine');
  await gvOk(repo, ['init']);
  const before = new Set(await packFiles(repo));
  const vm = image(3, 6);
  await backup('vm', vm, ['daily']);
  vmFirstPacks = (await packFiles(repo)).filter((p) => !before.has(p));
  const vm2 = Buffer.from(vm);
  prng(60, 2 * MiB).copy(vm2, MiB);
  await backup('vm', vm2);
  const db = image(7, 4);
  const dbId = await backup('db', db, ['weekly', 'keep']);
  const db2 = Buffer.from(db);
  db2.fill(0, 0, MiB);
  await backup('db', db2);
  const beforeSmall = new Set(await packFiles(repo));
  await backup('small', text(9, 300_000));
  smallPacks = (await packFiles(repo)).filter((p) => !beforeSmall.has(p));
  await gvOk(repo, ['protect', `db@${dbId}`]);
  listed = await gvOk(repo, ['list', '--json']);
  expect(JSON.parse(listed)).toHaveLength(5);
  expect(listed).toContain('"protected": true');
  await must('cp', ['-a', repo, pristine]);
}, 120_000);

afterAll(async () => {
  await s?.cleanup();
});

describe('an index that is lost', () => {
  it('every command names repair; a dry run changes nothing; --write brings back the same generations', async () => {
    await resetRepo();
    expect((await gv(repo, ['repair'])).stdout).toMatch(/^index and packs agree$/m);
    await fs.rm(path.join(repo, 'index'), { recursive: true });
    for (const args of [['list'], ['info', 'vm@latest'], ['restore', 'vm@latest', s.path('x.img')], ['verify'], ['backup', s.path('vm.img'), '--name', 'vm'], ['gc'], ['protect', 'vm@latest']]) {
      expectOneLineNamingRepair(await gv(repo, args));
    }
    const entries = (await fs.readdir(repo)).sort();
    const dry = await gv(repo, ['repair', '--json']);
    expect(dry.code, dry.stderr).toBe(0);
    const report = JSON.parse(dry.stdout);
    expect(report).toMatchObject({ write: false, generationsFound: 5, generationsRestored: 5, incomplete: [], damagedRecords: [], tornTails: [], index: { state: 'missing' } });
    expect((await fs.readdir(repo)).sort()).toEqual(entries);
    const human = await gvOk(repo, ['repair']);
    expect(human).toMatch(/index: missing/);
    expect(human).toMatch(/dry run: nothing changed/);
    const w = await gv(repo, ['repair', '--write']);
    expect(w.code, w.stderr).toBe(0);
    expect(w.stdout).toMatch(/rebuilt the index from the packs/);
    expect(await gvOk(repo, ['list', '--json'])).toBe(listed);
    await restoresAll(repo);
    const v = JSON.parse(await gvOk(repo, ['verify', '--full', '--json']));
    expect(v).toMatchObject({ ok: true, indexProblems: [], damagedChunks: [] });
    expect(await gvOk(repo, ['repair'])).toMatch(/^index and packs agree$/m);
    expect(await buildDirs(repo)).toEqual([]);
  }, 120_000);
});

describe('an index that is damaged', () => {
  const cases: Array<[string, (idx: string) => Promise<void>]> = [
    [
      'a byte flipped in a LevelDB table or log file',
      async (idx) => {
        const files = (await fs.readdir(idx)).filter((n) => /^\d+\.(ldb|log)$/.test(n));
        let best = '';
        let size = 0;
        for (const f of files) {
          const st = await fs.stat(path.join(idx, f));
          if (st.size > size) [best, size] = [f, st.size];
        }
        const fh = await fs.open(path.join(idx, best), 'r+');
        const b = Buffer.alloc(1);
        await fh.read(b, 0, 1, Math.floor(size / 2));
        b[0]! ^= 0xff;
        await fh.write(b, 0, 1, Math.floor(size / 2));
        await fh.close();
      },
    ],
    ['a truncated MANIFEST', async (idx) => fs.truncate(path.join(idx, (await fs.readdir(idx)).find((n) => n.startsWith('MANIFEST-'))!), 10)],
    ['CURRENT naming a missing manifest', (idx) => fs.writeFile(path.join(idx, 'CURRENT'), 'MANIFEST-000999\n')],
  ];
  for (const [what, damage] of cases) {
    it(`${what}: said in one line naming repair, and repair restores service`, async () => {
      await resetRepo();
      await damage(path.join(repo, 'index'));
      const r = await gv(repo, ['list', '--json']);
      console.log(`${what}: list exit ${r.code}, ${r.stdout === listed ? 'same listing' : 'other listing'}; ${r.stderr.trim()}`);
      expect(r.stderr).not.toMatch(/\n\s+at /);
      if (r.code !== 0) expectOneLineNamingRepair(r);
      else if (r.stdout !== listed || r.stderr) {
        // LevelDB noticed and dropped records, or read around them: the warning names repair.
        expect(r.stderr.trim().split('\n').every((l) => /^genvault: warning: .*'genvault repair'/.test(l))).toBe(true);
      }
      // Whatever list did not notice, verify compares index and packs.
      const v = await gv(repo, ['verify']);
      console.log(`${what}: verify exit ${v.code}; ${v.stderr.trim()}`);
      if (v.code !== 0) expect(v.stderr.trim().split('\n').at(-1)).toMatch(/^genvault: .*'genvault repair'/);
      const w = await gv(repo, ['repair', '--write']);
      expect(w.code, w.stderr).toBe(0);
      expect(w.stdout).toMatch(/the old index is kept as .*index\.broken-/);
      expect(await gvOk(repo, ['list', '--json'])).toBe(listed);
      await restoresAll(repo);
      expect(JSON.parse(await gvOk(repo, ['verify', '--json'])).ok).toBe(true);
    }, 120_000);
  }
});

describe('repair --write killed at random moments', () => {
  it('SIGKILL 20 times, then run to the end: the same generations and restores as an uninterrupted repair', async () => {
    const seed = Number(process.env.GENVAULT_REPAIR_KILL_SEED ?? 20261206);
    const rand = seededRandom(seed);
    await resetRepo();
    await fs.rm(path.join(repo, 'index'), { recursive: true });
    const t0 = Date.now();
    await gvOk(repo, ['repair', '--write']);
    const whole = Date.now() - t0;
    const reference = await gvOk(repo, ['list', '--json']);
    expect(reference, `seed ${seed}`).toBe(listed);
    await fs.rm(path.join(repo, 'index'), { recursive: true });
    const kills: number[] = [];
    const states: string[] = [];
    for (let i = 0; i < 20; i++) {
      // Half the kills at any moment from the start (node starting included), half at a
      // moment after the build directory appeared (while the packs are read or written).
      const p = new CliProcess(['-r', repo, 'repair', '--write']);
      let at = Math.floor(rand() * whole * 1.1);
      if (i % 2) {
        const t = Date.now();
        while (p.running && !(await buildDirs(repo)).some((d) => d.startsWith(`index.repair-${p.pid}-`)) && Date.now() - t < 10_000) await new Promise((r) => setTimeout(r, 2));
        at = Math.floor(rand() * whole * 0.5);
      }
      kills.push(at);
      await new Promise((r) => setTimeout(r, at));
      p.kill('SIGKILL');
      await p.waitExit(30_000);
      const builds = (await buildDirs(repo)).filter((d) => d.startsWith(`index.repair-${p.pid}-`)).length;
      const hasIndex = await fs.access(path.join(repo, 'index')).then(() => true, () => false);
      states.push(builds ? 'B' : hasIndex ? 'I' : '-');
    }
    // B: killed while building (a build directory left), I: after the swap, -: before it began
    console.log(`repair kills (seed ${seed}, ${whole} ms uninterrupted): ${states.join('')}`);
    expect(states.filter((x) => x === 'B').length, `seed ${seed}`).toBeGreaterThan(3);
    const r = await gv(repo, ['repair', '--write']);
    expect(r.code, `seed ${seed} (replay with GENVAULT_REPAIR_KILL_SEED=${seed}), kills at ${kills.join(',')} ms of ${whole}: ${r.stderr}`).toBe(0);
    expect(await gvOk(repo, ['list', '--json']), `seed ${seed}`).toBe(reference);
    expect(await buildDirs(repo), `seed ${seed}`).toEqual([]);
    await restoresAll(repo);
  }, 300_000);
});

describe('removed generations', () => {
  it('stay gone after prune, forget and gc when the index is rebuilt; tags and protection survive', async () => {
    await resetRepo();
    const gens = JSON.parse(listed) as Array<{ name: string; id: string }>;
    const [vm0, vm1] = gens.filter((g) => g.name === 'vm');
    await gvOk(repo, ['forget', `vm@${vm0!.id}`, '--force-young']);
    const third = Buffer.from(latest.get('vm')!);
    prng(61, MiB).copy(third, 0);
    await backup('vm', third);
    await gvOk(repo, ['prune', 'vm', '--keep-last', '1', '--min-age', '0']);
    await gvOk(repo, ['gc']);
    const before = await gvOk(repo, ['list', '--json']);
    const ids = (JSON.parse(before) as Array<{ id: string }>).map((g) => g.id);
    expect(ids).not.toContain(vm0!.id);
    expect(ids).not.toContain(vm1!.id);
    expect(before).toContain('"protected": true');
    expect(before).toContain('"keep"');
    await fs.rm(path.join(repo, 'index'), { recursive: true });
    const r = await gv(repo, ['repair', '--write']);
    expect(r.code, r.stderr).toBe(0);
    expect(await gvOk(repo, ['list', '--json'])).toBe(before);
    await restoresAll(repo);
    const v = await gv(repo, ['verify', '--full']);
    expect(v.code, v.stdout + v.stderr).toBe(0);
  }, 120_000);
});

describe('a pack that is lost', () => {
  it('repair names the generations that lose data, the rest restore, a new backup heals what it can', async () => {
    await resetRepo();
    // A backup writes its generation's map and record into a pack of their own: losing its
    // data packs loses chunks, never the generation, which repair names.
    const genPacks: string[] = [];
    const dataPacks: string[] = [];
    for (const p of vmFirstPacks) {
      const buf = await fs.readFile(p);
      const it = scanPack(async (b, o, l, pos) => buf.copy(b, o, pos, Math.min(pos + l, buf.length)), buf.length, path.basename(p, '.pack'));
      let record = false;
      for (let x = await it.next(); !x.done; x = await it.next()) {
        if (x.value.kind === 'meta' && x.value.record.type === REC_GENERATION) record = true;
      }
      (record ? genPacks : dataPacks).push(p);
    }
    expect(genPacks).toHaveLength(1);
    expect(dataPacks.length).toBeGreaterThan(0);
    for (const p of dataPacks) await fs.rm(p);
    await fs.rm(path.join(repo, 'index'), { recursive: true });
    const r = await gv(repo, ['repair', '--write', '--json']);
    expect(r.code).toBe(1);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    const report = JSON.parse(r.stdout);
    const vmIds = (JSON.parse(listed) as Array<{ name: string; id: string }>).filter((g) => g.name === 'vm').map((g) => g.id);
    expect(report.incomplete.map((g: { id: string }) => g.id).sort()).toEqual([...vmIds].sort());
    expect(report.incomplete.length).toBeGreaterThan(0);
    for (const g of report.incomplete) {
      expect(g.missingChunks).toBeGreaterThan(0);
      expect(g.missingBytes).toBeGreaterThan(0);
      expect(r.stderr).toContain(g.id);
    }
    // The others restore; the generations that lost data refuse in one line.
    const list = JSON.parse(await gvOk(repo, ['list', '--json'])) as Array<{ name: string; id: string }>;
    expect(list).toHaveLength(5);
    for (const g of list) {
      const out = s.path('out.img');
      await fs.rm(out, { force: true });
      const res = await gv(repo, ['restore', `${g.name}@${g.id}`, out]);
      if (g.name === 'vm') {
        expect(res.code).not.toBe(0);
        expect(res.stderr).not.toMatch(/\n\s+at /);
      } else {
        expect(res.code, res.stderr).toBe(0);
        expect(await sha256File(out)).toBe(want.get(g.id));
      }
    }
    // A backup of the same image stores again what the lost pack held.
    const file = s.path('vm.img');
    await fs.writeFile(file, latest.get('vm')!);
    const g = JSON.parse(await gvOk(repo, ['backup', file, '--name', 'vm', '--json'])) as { id: string };
    const out = s.path('healed.img');
    await gvOk(repo, ['restore', `vm@${g.id}`, out]);
    expect(await sha256File(out)).toBe(sha(latest.get('vm')!));
  }, 120_000);
});

describe('generation changes', () => {
  it('the change with the highest rev is applied; a forgotten generation stays forgotten', async () => {
    await resetRepo();
    const gens = JSON.parse(listed) as Array<{ name: string; id: string; created: string; tags: string[] }>;
    const [a, b] = [gens.find((g) => g.name === 'small')!, gens.find((g) => g.name === 'vm')!];
    const change = (g: typeof a, rev: number, extra: object) =>
      encodeMetaRecord({ type: REC_CHANGE, change: { id: g.id, name: g.name, created: g.created, rev, at: new Date().toISOString(), ...extra } });
    // Written as the change writers will (a pack of their own); order in the pack does not matter.
    const id = newPackId();
    const file = path.join(repo, packObject(id));
    await fs.mkdir(path.dirname(file), { recursive: true });
    const head = Buffer.alloc(24);
    PACK_MAGIC.copy(head);
    head.write(id, 8, 16, 'hex');
    await fs.writeFile(file, Buffer.concat([head, change(a, 2, { tags: ['two'], protected: true }), change(a, 1, { tags: ['one'] }), change(b, 1, { forgotten: true }), change(b, 2, { tags: ['late'] })]));
    await fs.rm(path.join(repo, 'index'), { recursive: true });
    const r = await gv(repo, ['repair', '--write', '--json']);
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ generationsFound: 5, generationsRestored: 4 });
    const now = JSON.parse(await gvOk(repo, ['list', '--json'])) as Array<{ id: string; tags: string[]; protected?: boolean; rev?: number }>;
    expect(now.map((g) => g.id)).not.toContain(b.id);
    expect(now.find((g) => g.id === a.id)).toMatchObject({ tags: ['two'], protected: true, rev: 2 });
    expect(now).toHaveLength(4);
  }, 120_000);
});

describe('a copy of the packs and config.json alone', () => {
  it('repair --write rebuilds the rest', async () => {
    const bare = s.path('bare');
    await fs.rm(bare, { recursive: true, force: true });
    await fs.mkdir(bare);
    await must('cp', ['-a', path.join(pristine, 'packs'), path.join(pristine, 'config.json'), bare]);
    const r = await gv(bare, ['repair', '--write']);
    expect(r.code, r.stderr).toBe(0);
    expect(await gvOk(bare, ['list', '--json'])).toBe(listed);
    await restoresAll(bare);
  }, 120_000);
});

describe('torn tails and damaged records', () => {
  it('are reported with their pack and extent; the generation that needed the record is named', async () => {
    await resetRepo();
    const [torn] = smallPacks;
    await fs.appendFile(torn!, prng(77, 100));
    // The first record header of vm's first pack: its CRC fails, the scan goes on after it.
    const data = (await Promise.all(vmFirstPacks.map(async (p) => [p, (await fs.stat(p)).size] as const))).sort((a, b) => b[1] - a[1])[0]![0]; // its data pack
    const fh = await fs.open(data, 'r+');
    await fh.write(Buffer.of(0x5a), 0, 1, 24 + 10);
    await fh.close();
    const r = await gv(repo, ['repair', '--json', '--read-all-packs']);
    expect(r.code).toBe(1);
    const report = JSON.parse(r.stdout);
    const id = (p: string) => path.basename(p, '.pack');
    expect(report.tornTails).toEqual([{ pack: id(torn!), bytes: 100, problem: expect.any(String) }]);
    expect(report.damagedRecords).toEqual([{ pack: id(data), offset: 24, length: expect.any(Number), problem: 'record header damaged' }]);
    // The chunk of that record: in vm's first generation at least (the second rewrote part of the image).
    expect(report.incomplete.length).toBeGreaterThan(0);
    expect(report.incomplete.every((g: { name: string; missingChunks: number }) => g.name === 'vm' && g.missingChunks > 0)).toBe(true);
    expect(report.index.state).toBe('readable');
    // Without --read-all-packs a pack with tables of contents gives its chunk records from
    // them, headers unread: the damaged header goes unnoticed (verify and reads find it);
    // the torn pack has bytes after its last TOC, so it is read header by header.
    const quick = JSON.parse((await gv(repo, ['repair', '--json'])).stdout);
    expect(quick.damagedRecords).toEqual([]);
    expect(quick.tornTails).toEqual(report.tornTails);
    expect(quick.packsViaToc).toBe(quick.packs - 1);
    const human = await gv(repo, ['repair', '--read-all-packs']);
    expect(human.stdout).toMatch(new RegExp(`torn tail: pack ${id(torn!)}: 100 bytes`));
    expect(human.stdout).toMatch(new RegExp(`DAMAGED record: pack ${id(data)} offset 24`));
    expect(human.stdout).toMatch(/NOT WHOLE: vm@/);
    expect(human.stdout).toMatch(/index and packs differ:/);
    // verify notices the index points at a record no scan accepts.
    const v = await gv(repo, ['verify', '--json']);
    expect(v.code).toBe(1);
    expect(JSON.parse(v.stdout).indexProblems.join('\n')).toMatch(/index and packs disagree: \d+ chunk entries point where no pack holds their chunk/);
  }, 120_000);
});

describe('a format 3 repository', () => {
  it('upgraded, its index removed, repaired: every generation restores', async () => {
    const old = s.path('format3');
    await must('cp', ['-r', path.join(ROOT, 'test', 'fixtures', 'format3-repo'), old]);
    for (const d of ['locks', 'tmp']) await fs.mkdir(path.join(old, d), { recursive: true });
    await must('chmod', ['-R', 'go-rwx', old]);
    const before = JSON.parse(await gvOk(old, ['list', '--json'])) as Array<{ name: string; id: string }>;
    // Before the upgrade its packs cannot describe it: repair says so in one line.
    const r3 = await gv(old, ['repair']);
    expect(r3.code).toBe(1);
    expect(r3.stderr.trim()).toMatch(/^genvault: .*format version 3.*'genvault upgrade'/);
    await gvOk(old, ['upgrade']);
    const listedOld = await gvOk(old, ['list', '--json']);
    await fs.rm(path.join(old, 'index'), { recursive: true });
    await gvOk(old, ['repair', '--write']);
    expect(await gvOk(old, ['list', '--json'])).toBe(listedOld);
    const ids = new Map<string, string>();
    format3Images().forEach(([, data], i) => ids.set(before[i]!.id, sha(data)));
    await restoresAll(old, ids);
  }, 120_000);
});

describe('--write needs the repository to itself', () => {
  it('refuses while a backup runs, and while another process holds the index', async () => {
    await resetRepo();
    const pause = s.path('pause');
    await fs.writeFile(pause, '');
    const file = s.path('vm.img');
    await fs.writeFile(file, latest.get('vm')!);
    const b = new CliProcess(['-r', repo, 'backup', file, '--name', 'vm'], { GENVAULT_BACKUP_PAUSE_FILE: pause });
    try {
      await b.waitFor(/paused at/, 60_000);
      const r = await gv(repo, ['repair', '--write']);
      expect(r.code).toBe(1);
      expect(r.stderr.trim()).toMatch(/^genvault: repair --write needs the repository to itself; running: backup/);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
      // A dry run may look.
      expect((await gv(repo, ['repair'])).code).toBe(0);
    } finally {
      await fs.rm(pause, { force: true });
      await b.waitExit(60_000);
    }
    expect(b.exit?.code).toBe(0);
    // Another process holding LevelDB's lock (this test process).
    const db = new ClassicLevel(path.join(repo, 'index'));
    await db.open();
    try {
      const r = await gv(repo, ['repair', '--write']);
      expect(r.code).toBe(1);
      expect(r.stderr.trim()).toMatch(/^genvault: repair --write needs the repository to itself; the index is open in process \d+/);
    } finally {
      await db.close();
    }
    const ok = await gv(repo, ['repair', '--write']);
    expect(ok.code, ok.stderr).toBe(0);
  }, 120_000);
});

/**
 * Repositories written by earlier genvaults keep working: test/fixtures/format3-repo was
 * made by the code of commit d028da6 (format version 3, before the source tree was split
 * into layers), test/fixtures/format4-repo by commit 81143c6 (format version 4, packs
 * without tables of contents), test/fixtures/format6-repo by commit 2da2366 (format
 * version 6: encrypted, its index plaintext), all from the images below. This build must list them,
 * restore every generation byte-identical, pass `verify --full`, and take a new backup
 * into them that dedups against the old chunks; the format 4 one must also come back
 * whole from its packs alone (`repair --write` with index/ removed), and the format 6 one
 * upgrade to format 7 (its index sealed).
 *
 * To make a fixture again with another build (only when the format changes on purpose):
 *   GENVAULT_MAKE_FIXTURE=/path/to/that/dist/cli/main.js GENVAULT_FIXTURE=format4-repo \
 *     npx vitest run --config test/vitest.config.ts test/compat.test.ts
 * writes test/fixtures/format4-repo afresh (then record the commit in its README).
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ClassicLevel } from 'classic-level';
import { ROOT, Scratch, format3Images, gvOk, must, sh, sha256File, text } from './helpers.js';
import { Repository } from '../src/repository/repository.js';
import { recentRuns, recordRun } from '../src/jobs/history.js';

const FIXTURES = path.join(ROOT, 'test', 'fixtures');
const MiB = 1 << 20;

const maker = process.env.GENVAULT_MAKE_FIXTURE;

/** The passphrase of test/fixtures/format6-repo (a test fixture: not a secret). */
const FIXTURE_PASSPHRASE = 'format 6 fixture passphrase';

async function passphraseFile(s: Scratch): Promise<string> {
  const f = path.join(s.dir, 'fixture-passphrase');
  await fs.writeFile(f, `${FIXTURE_PASSPHRASE}\n`, { mode: 0o600 });
  return f;
}

if (maker) describe('making the fixture', () => {
  const FIXTURE = path.join(FIXTURES, process.env.GENVAULT_FIXTURE ?? 'format3-repo');
  it(`writes ${FIXTURE} with ${maker}`, async () => {
    const s = await Scratch.create();
    const encrypted = FIXTURE.endsWith('format6-repo');
    const prev = process.env.GENVAULT_PASSWORD_FILE;
    try {
      await fs.rm(FIXTURE, { recursive: true, force: true });
      if (encrypted) process.env.GENVAULT_PASSWORD_FILE = await passphraseFile(s);
      await must('node', [maker!, '-r', FIXTURE, 'init', ...(encrypted ? ['--encryption', 'aes-256-gcm'] : [])]);
      for (const [name, data] of format3Images()) {
        const file = path.join(s.dir, `${name}.img`);
        await fs.writeFile(file, data);
        await must('node', [maker!, '-r', FIXTURE, 'backup', file, '--name', name]);
      }
      // From format 4 on, changes to a generation are records in the packs too.
      if (!FIXTURE.endsWith('format3-repo')) await must('node', [maker!, '-r', FIXTURE, 'protect', 'odd@latest']);
    } finally {
      if (prev === undefined) delete process.env.GENVAULT_PASSWORD_FILE;
      else process.env.GENVAULT_PASSWORD_FILE = prev;
      await s.cleanup();
    }
  });
});

else for (const version of [3, 4, 6]) describe(`a format ${version} repository written by an earlier version`, () => {
  const FIXTURE = path.join(FIXTURES, `format${version}-repo`);
  let s: Scratch;
  let repo = '';

  beforeAll(async () => {
    s = await Scratch.create();
    repo = path.join(s.dir, 'repo');
    // A copy: opening a repository writes to its index.
    await must('cp', ['-r', FIXTURE, repo]);
    // git keeps no empty directories: those an earlier version made empty come back here.
    for (const d of ['locks', 'tmp']) await fs.mkdir(path.join(repo, d), { recursive: true });
    await must('chmod', ['-R', 'go-rwx', repo]);
    if (version === 6) process.env.GENVAULT_PASSWORD_FILE = await passphraseFile(s);
  });
  afterAll(async () => {
    delete process.env.GENVAULT_PASSWORD_FILE;
    await s?.cleanup();
  });

  it('lists its generations and restores each byte-identical', async () => {
    const want = format3Images();
    const list = JSON.parse(await gvOk(repo, ['list', '--json'])) as Array<{ name: string; id: string; size: number }>;
    expect(list.map((g) => [g.name, g.size])).toEqual(want.map(([n, d]) => [n, d.length]));
    for (let i = 0; i < want.length; i++) {
      const [name, data] = want[i]!;
      const out = path.join(s.dir, `restored-${i}.img`);
      await gvOk(repo, ['restore', `${name}@${list[i]!.id}`, out]);
      expect(await sha256File(out), `${name}@${list[i]!.id}`).toBe(await shaOf(data));
    }
  });

  it('passes verify --full', async () => {
    const r = await sh('node', [path.join(ROOT, 'dist', 'cli', 'main.js'), '-r', repo, 'verify', '--full', '--json']);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const report = JSON.parse(r.stdout) as Record<string, unknown>;
    // (The encrypted repository's keyed chunker cuts its chunks elsewhere.)
    if (version < 6) expect(report.chunksRead).toBe(71);
    expect(report).toMatchObject({ ok: true, mode: 'full', generations: 3, damagedChunks: [], damagedLeaves: [], damagedPacks: [], damagedGenerations: [], indexProblems: [], warnings: [] });
  });

  it('takes a new backup that dedups against the old chunks, and restores it', async () => {
    const [, last] = format3Images()[1]!;
    const next = Buffer.from(last);
    text(6, 32 << 10).copy(next, 5 * MiB);
    const file = path.join(s.dir, 'next.img');
    await fs.writeFile(file, next);
    const g = JSON.parse(await gvOk(repo, ['backup', file, '--name', 'disk', '--json'])) as { stats: { newBytes: number } };
    expect(g.stats.newBytes).toBeLessThan(MiB); // only what changed is new
    const out = path.join(s.dir, 'next-restored.img');
    await gvOk(repo, ['restore', 'disk@latest', out]);
    expect(await sha256File(out)).toBe(await shaOf(next));
  });

  it.runIf(version >= 4)('comes back whole from its packs alone', async () => {
    const before = await gvOk(repo, ['list', '--json']);
    const sums = new Map<string, string>();
    for (const g of JSON.parse(before) as Array<{ name: string; id: string }>) {
      const out = path.join(s.dir, `before-${g.id}.img`);
      await gvOk(repo, ['restore', `${g.name}@${g.id}`, out]);
      sums.set(g.id, await sha256File(out));
      await fs.rm(out);
    }
    await fs.rm(path.join(repo, 'index'), { recursive: true });
    await gvOk(repo, ['repair', '--write']);
    expect(await gvOk(repo, ['list', '--json'])).toBe(before);
    for (const g of JSON.parse(before) as Array<{ name: string; id: string }>) {
      const out = path.join(s.dir, `after-${g.id}.img`);
      await gvOk(repo, ['restore', `${g.name}@${g.id}`, out]);
      expect(await sha256File(out), `${g.name}@${g.id}`).toBe(sums.get(g.id));
    }
  });

  it.runIf(version === 6)('syncs into a format 7 repository made --like it (same key, index sealed)', async () => {
    const dst = path.join(s.dir, 'like7');
    await gvOk(dst, ['init', '--like', repo, '--encryption', 'aes-256-gcm']);
    expect(JSON.parse(await fs.readFile(path.join(dst, 'config.json'), 'utf8')).version).toBe(7);
    await gvOk(dst, ['sync', repo, dst]);
    const strip = (j: string) => (JSON.parse(j) as Array<Record<string, unknown>>).map((g) => [g.name, g.id, g.created, g.size, g.protected === true]);
    expect(strip(await gvOk(dst, ['list', '--json']))).toEqual(strip(await gvOk(repo, ['list', '--json'])));
    expect((await indexDump(dst)).includes('disk.img')).toBe(false);
    const out = path.join(s.dir, 'like7.img');
    await gvOk(dst, ['restore', 'disk@latest', out]);
    expect(await sha256File(out)).toBe(await sha256File(path.join(s.dir, 'next.img')));
  });

  it.runIf(version === 6)('upgrades to format 7: names and job runs leave the index, everything else stays', async () => {
    const JOB = `compat-secret-job-${process.pid}`;
    const r6 = await Repository.open(repo);
    try {
      expect(r6.genIndex.sealed).toBe(false);
      await recordRun(r6, { job: JOB, image: 'disk', started: 1_700_000_000_000, finished: 1_700_000_001_000, status: 'ok', hooks: [], by: 'run' });
    } finally {
      await r6.close();
    }
    const before = await gvOk(repo, ['list', '--json']);
    const plainDump = await indexDump(repo);
    expect(plainDump.includes(JOB)).toBe(true);
    expect(plainDump.includes('disk.img')).toBe(true);
    expect(await gvOk(repo, ['upgrade'])).toMatch(/format version 6 -> 7: sealed 4 generation records/);
    expect(JSON.parse(await fs.readFile(path.join(repo, 'config.json'), 'utf8')).version).toBe(7);
    expect(await gvOk(repo, ['upgrade'])).toMatch(/already at format version 7/);
    // Killed after the index batch, before config.json said 7: running it again finishes.
    const cfgFile = path.join(repo, 'config.json');
    const cfg7 = await fs.readFile(cfgFile, 'utf8');
    await fs.writeFile(cfgFile, cfg7.replace('"version": 7', '"version": 6'));
    expect(await gvOk(repo, ['upgrade'])).toMatch(/format version 6 -> 7: sealed 0 generation records/);
    expect(JSON.parse(await fs.readFile(cfgFile, 'utf8')).version).toBe(7);
    expect(await gvOk(repo, ['list', '--json'])).toBe(before);
    const dump = await indexDump(repo);
    for (const secret of [JOB, 'disk.img', 'odd.img', '"name"', '"source"']) expect(dump.includes(secret), secret).toBe(false);
    const r7 = await Repository.open(repo);
    try {
      expect(r7.genIndex.sealed).toBe(true);
      expect((await recentRuns(r7, JOB)).map((r) => r.started)).toEqual([1_700_000_000_000]);
    } finally {
      await r7.close();
    }
    for (const g of JSON.parse(before) as Array<{ name: string; id: string }>) {
      const out = path.join(s.dir, `upgraded-${g.id}.img`);
      await gvOk(repo, ['restore', `${g.name}@${g.id}`, out]);
      await fs.rm(out);
    }
    await fs.rm(path.join(repo, 'index'), { recursive: true });
    await gvOk(repo, ['repair', '--write']);
    expect(await gvOk(repo, ['list', '--json'])).toBe(before);
    expect(JSON.parse(await gvOk(repo, ['verify', '--full', '--json']))).toMatchObject({ ok: true, generations: 4 });
  });
});

/** Every key and value of a repository's index, concatenated (the repository closed). */
async function indexDump(repo: string): Promise<Buffer> {
  const db = new ClassicLevel<Buffer, Buffer>(path.join(repo, 'index'), { keyEncoding: 'buffer', valueEncoding: 'buffer' });
  const parts: Buffer[] = [];
  try {
    for await (const [k, v] of db.iterator()) parts.push(k, v);
  } finally {
    await db.close();
  }
  return Buffer.concat(parts);
}

async function shaOf(data: Buffer): Promise<string> {
  const { createHash } = await import('node:crypto');
  return createHash('sha256').update(data).digest('hex');
}

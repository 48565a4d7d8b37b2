/**
 * genvault sync between real local repositories (made here by the CLI): every generation
 * restores byte-identical from the destination and verifies clean; a second sync sends
 * only the new records; tags and protection carried and updated; a NAME filter; --keep-*
 * at the destination; encrypted repositories through `init --like` (and other keys
 * refused in one line); SIGKILL at pause points, then a rerun, verify, gc; a source with a
 * flipped byte refused without a generation at the destination; a gc at the destination
 * during a sync.
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CliProcess, Scratch, dataPackFiles, flipByte, gv, gvOk, oneLine, prng, sha256File, text, waitGone, writeImage } from './helpers.js';

const MiB = 1 << 20;
let s: Scratch;

beforeAll(async () => {
  s = await Scratch.create('genvault-sync-');
});

afterAll(async () => {
  await s?.cleanup();
});

/** An image of random, text and zero stretches, deterministic per seed. */
function image(seed: number, mib: number): Buffer {
  const b = Buffer.alloc(mib * MiB);
  for (let i = 0; i < mib; i++) {
    if (i % 4 === 0) prng(seed * 100 + i, MiB).copy(b, i * MiB);
    else if (i % 4 !== 3) text(seed * 100 + i, MiB).copy(b, i * MiB);
  }
  return b;
}

/** The image with `len` bytes of new random data at `at`. */
function changed(b: Buffer, seed: number, at: number, len: number): Buffer {
  const c = Buffer.from(b);
  prng(seed, len).copy(c, at);
  return c;
}

interface ListedGen {
  name: string;
  id: string;
  tags: string[];
  protected?: boolean;
  stats: { newStored: number };
}

async function listed(repo: string, env?: NodeJS.ProcessEnv): Promise<ListedGen[]> {
  const r = await gv(repo, ['list', '--json'], { env });
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout) as ListedGen[];
}

async function packBytes(repo: string): Promise<number> {
  let n = 0;
  const dir = path.join(repo, 'packs');
  for (const d of await fs.readdir(dir)) for (const f of await fs.readdir(path.join(dir, d))) n += (await fs.stat(path.join(dir, d, f))).size;
  return n;
}

/** Restore `spec` from `repo` and compare with the expected SHA-256. */
async function restoresAs(repo: string, spec: string, sha: string, env?: NodeJS.ProcessEnv): Promise<void> {
  const out = s.path(`restore-${Math.random().toString(36).slice(2)}`);
  const r = await gv(repo, ['restore', spec, out], { env });
  expect(r.code, r.stderr).toBe(0);
  expect(await sha256File(out)).toBe(sha);
  await fs.rm(out, { force: true });
}

async function verifiesClean(repo: string, env?: NodeJS.ProcessEnv): Promise<void> {
  const r = await gv(repo, ['verify', '--full'], { env });
  expect(r.code, r.stdout + r.stderr).toBe(0);
  expect(r.stdout).toMatch(/no damage found/);
}

async function syncJson(args: string[], env?: NodeJS.ProcessEnv): Promise<Record<string, unknown> & { copied: Array<{ id: string }>; skipped: number; updated: number; storedAdded: number; chunks: number; pruned: unknown[]; notKept: number }> {
  const r = await gv(null, ['sync', ...args, '--json'], { env });
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout);
}

describe('sync local to local', () => {
  const sums = new Map<string, string>();
  let A: string;
  let B: string;

  beforeAll(async () => {
    A = s.path('A');
    B = s.path('B');
    await gvOk(A, ['init']);
    const vm1 = image(1, 12);
    sums.set('vm1', await writeImage(s.path('vm1.img'), [vm1]));
    await gvOk(A, ['backup', s.path('vm1.img'), '--name', 'vm', '--tag', 'first']);
    sums.set('vm2', await writeImage(s.path('vm2.img'), [changed(vm1, 7, 3 * MiB, 2 * MiB)]));
    await gvOk(A, ['backup', s.path('vm2.img'), '--name', 'vm']);
    sums.set('db1', await writeImage(s.path('db1.img'), [image(2, 6)]));
    await gvOk(A, ['backup', s.path('db1.img'), '--name', 'db', '--tag', 'x', '--tag', 'y']);
    await gvOk(A, ['protect', 'vm@1']);
  });

  it('copies every generation: byte-identical restores, clean verify, tags and protection', async () => {
    await gvOk(B, ['init', '--like', A]);
    const cfgA = JSON.parse(await fs.readFile(path.join(A, 'config.json'), 'utf8'));
    const cfgB = JSON.parse(await fs.readFile(path.join(B, 'config.json'), 'utf8'));
    expect(cfgB.chunking).toEqual(cfgA.chunking);
    expect(cfgB.compression).toEqual(cfgA.compression);
    expect(cfgB.version).toBe(cfgA.version);

    const r = await syncJson([A, B]);
    expect(r.copied).toHaveLength(3);
    expect(r.skipped).toBe(0);
    const a = await listed(A);
    const b = await listed(B);
    expect(b.map((g) => [g.name, g.id, g.tags, g.protected === true])).toEqual(a.map((g) => [g.name, g.id, g.tags, g.protected === true]));
    await restoresAs(B, 'vm@1', sums.get('vm1')!);
    await restoresAs(B, 'vm@0', sums.get('vm2')!);
    await restoresAs(B, 'db@0', sums.get('db1')!);
    await verifiesClean(B);
    // Nothing to do the second time.
    const again = await syncJson([A, B]);
    expect(again.copied).toHaveLength(0);
    expect(again.skipped).toBe(3);
    expect(again.chunks).toBe(0);
  });

  it('a next-day backup: only its new records are sent; tags and protection updated', async () => {
    const before = await packBytes(A);
    const vm3 = changed(await fs.readFile(s.path('vm2.img')), 9, 7 * MiB, 2 * MiB);
    sums.set('vm3', await writeImage(s.path('vm3.img'), [vm3]));
    const gen = JSON.parse(await gvOk(A, ['backup', s.path('vm3.img'), '--name', 'vm', '--json'])) as ListedGen;
    const sourceGrowth = (await packBytes(A)) - before;
    await gvOk(A, ['unprotect', 'vm@2']);
    await gvOk(A, ['protect', 'db@0']);
    const bBefore = await packBytes(B);
    const r = await syncJson([A, B]);
    expect(r.copied.map((g) => g.id)).toEqual([gen.id]);
    expect(r.skipped).toBe(3);
    expect(r.updated).toBe(2);
    // What the destination stored for it: at most 110% of what the source stored for it.
    expect(r.storedAdded).toBeLessThanOrEqual(1.1 * gen.stats.newStored);
    expect(r.storedAdded).toBeLessThanOrEqual(1.1 * sourceGrowth);
    // The change records of the update go into a small pack of their own besides.
    expect((await packBytes(B)) - bBefore).toBeLessThan(r.storedAdded + 8192);
    const b = await listed(B);
    expect(b.find((g) => g.name === 'db')!.protected).toBe(true);
    expect(b.filter((g) => g.name === 'vm').map((g) => g.protected === true)).toEqual([false, false, false]);
    await restoresAs(B, 'vm@0', sums.get('vm3')!);
    await verifiesClean(B);
  });

  it('a NAME filter copies those images only; an unknown name is one line', async () => {
    const C = s.path('C');
    await gvOk(C, ['init', '--like', A]);
    const r = await syncJson([A, C, 'db']);
    expect(r.copied).toHaveLength(1);
    expect((await listed(C)).map((g) => g.name)).toEqual(['db']);
    await restoresAs(C, 'db@0', sums.get('db1')!);
    const bad = await gv(null, ['sync', A, C, 'nosuch']);
    expect(bad.code).toBe(1);
    expect(oneLine(bad.stderr)).toMatch(/no image named nosuch/);
  });

  it('--keep-last at the destination: what it would remove is not copied, the rest pruned there', async () => {
    const D = s.path('D');
    await gvOk(D, ['init', '--like', A]);
    const dry = await syncJson([A, D, 'vm', '--keep-last', '2', '--min-age', '0', '--dry-run']);
    expect(dry.copied).toHaveLength(2);
    expect(dry.notKept).toBe(1);
    expect(await listed(D)).toHaveLength(0);
    const r = await syncJson([A, D, 'vm', '--keep-last', '2', '--min-age', '0']);
    expect(r.copied).toHaveLength(2);
    expect(r.notKept).toBe(1);
    const a = (await listed(A)).filter((g) => g.name === 'vm');
    expect((await listed(D)).map((g) => g.id)).toEqual(a.slice(-2).map((g) => g.id));
    // A generation already there that the rules no longer keep is pruned at the destination.
    const r2 = await syncJson([A, D, 'vm', '--keep-last', '1', '--min-age', '0']);
    expect(r2.copied).toHaveLength(0);
    expect(r2.pruned).toHaveLength(1);
    expect((await listed(D)).map((g) => g.id)).toEqual([a.at(-1)!.id]);
    await restoresAs(D, 'vm@0', sums.get('vm3')!);
    await gvOk(D, ['gc']);
    await verifiesClean(D);
  });

  it('refuses a destination that chunks differently, in one line, writing nothing', async () => {
    const E = s.path('E');
    await gvOk(E, ['init']);
    const cfgFile = path.join(E, 'config.json');
    const cfg = JSON.parse(await fs.readFile(cfgFile, 'utf8'));
    cfg.chunking.min = 32768;
    await fs.writeFile(cfgFile, JSON.stringify(cfg));
    const r = await gv(null, ['sync', A, E]);
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/chunks differently.*init --like/);
    expect(await listed(E)).toHaveLength(0);
    expect(await fs.readdir(path.join(E, 'packs'))).toEqual([]);
  });
});

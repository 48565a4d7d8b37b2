/**
 * genvault sync between real local repositories (made here by the CLI): every generation
 * restores byte-identical from the destination and verifies clean; a second sync sends
 * only the new records; tags and protection carried and updated; a NAME filter; --keep-*
 * at the destination; encrypted repositories through `init --like` (and other keys
 * refused in one line); SIGKILL at pause points, then a rerun, verify, gc; a source with a
 * flipped byte refused without a generation at the destination; a gc at the destination
 * during a sync.
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CliProcess, ROOT, Scratch, dataPackFiles, flipByte, format3Images, gv, gvOk, oneLine, prng, sh, sha256File, text, waitGone, writeImage } from './helpers.js';

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
  stats: { newStored: number; newChunks: number };
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

async function syncJson(args: string[], env?: NodeJS.ProcessEnv): Promise<Record<string, unknown> & { copied: Array<{ id: string }>; skipped: number; updated: number; storedAdded: number; bytesSent: number; chunks: number; pruned: unknown[]; notKept: number }> {
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
    expect(again.bytesSent).toBe(0);
    expect(again.storedAdded).toBe(0);
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
    const same = await gv(null, ['sync', A, `${A}/`]);
    expect(same.code).toBe(2);
    expect(oneLine(same.stderr)).toMatch(/are the same repository/);
  });
});

describe('encrypted repositories', () => {
  it('init --like keeps id and master key; sync copies sealed records; the copy restores with its own key', async () => {
    const pw = s.path('pw');
    const key2 = s.path('key2');
    await fs.writeFile(pw, 'correct horse battery staple\n', { mode: 0o600 });
    await fs.writeFile(key2, prng(42, 64).toString('hex'), { mode: 0o600 });
    const E1 = s.path('E1');
    const E2 = s.path('E2');
    const withPw = { GENVAULT_PASSWORD_FILE: pw };
    expect((await gv(E1, ['init', '--encryption', 'aes-256-gcm'], { env: withPw })).code).toBe(0);
    const e1 = image(3, 8);
    const sum1 = await writeImage(s.path('e1.img'), [e1]);
    const sum2 = await writeImage(s.path('e2.img'), [changed(e1, 11, MiB, MiB)]);
    for (const f of ['e1.img', 'e2.img']) expect((await gv(E1, ['backup', s.path(f), '--name', 'sec', '--tag', 'enc'], { env: withPw })).code).toBe(0);
    const made = await gv(E2, ['init', '--like', E1, '--encryption', 'aes-256-gcm', '--new-key-file', key2], { env: withPw });
    expect(made.code, made.stderr).toBe(0);
    const c1 = JSON.parse(await fs.readFile(path.join(E1, 'config.json'), 'utf8'));
    const c2 = JSON.parse(await fs.readFile(path.join(E2, 'config.json'), 'utf8'));
    expect(c2.id).toBe(c1.id);
    expect(c2.encryption).toEqual(c1.encryption);
    expect(c2.version).toBe(7);
    // The passphrase of E1 does not open E2's slot (it has key2's): the sync needs only
    // the destination's key, and reads the source without one.
    const noPw = await gv(E2, ['list'], { env: withPw });
    expect(noPw.code).toBe(1);
    const r = await gv(null, ['--key-file', key2, 'sync', E1, E2, '--json'], { env: { GENVAULT_PASSWORD_FILE: '' } });
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout).copied).toHaveLength(2);
    const k2 = { GENVAULT_PASSWORD_FILE: key2 };
    await restoresAs(E2, 'sec@1', sum1, k2);
    await restoresAs(E2, 'sec@0', sum2, k2);
    await verifiesClean(E2, k2);
    expect((await listed(E2, k2)).map((g) => g.tags)).toEqual([['enc'], ['enc']]);
  });

  it('a flipped byte in a sealed source record: it does not authenticate, one line, no generation that needs it', async () => {
    const pw = s.path('pw');
    const E1 = s.path('E1');
    const E5 = s.path('E5');
    const withPw = { GENVAULT_PASSWORD_FILE: pw };
    expect((await gv(E5, ['init', '--like', E1, '--encryption', 'aes-256-gcm'], { env: withPw })).code).toBe(0);
    // A copy of E1 with one byte of its first chunk record's sealed payload flipped.
    const E6 = s.path('E6');
    await fs.cp(E1, E6, { recursive: true });
    const [pack] = await dataPackFiles(E6);
    const fh = await fs.open(pack!, 'r');
    const head = Buffer.alloc(52);
    await fh.read(head, 0, 52, 24);
    await fh.close();
    await flipByte(pack!, 24 + 52 + head.readUInt32LE(12) - 20);
    const r = await gv(null, ['sync', E6, E5], { env: withPw });
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/source damaged: .*does not authenticate/);
    // The generation that needs the record is not there; one copied before it (the older,
    // when the damage is in the newer one's pack) is whole.
    const got = await listed(E5, withPw);
    expect(got.length).toBeLessThan(2);
    await verifiesClean(E5, withPw);
    if (got.length) await restoresAs(E5, 'sec@0', await sha256File(s.path('e1.img')), withPw);
  });

  it('other keys, or encrypted against unencrypted, are refused in one line', async () => {
    const pw = s.path('pw');
    const E3 = s.path('E3');
    expect((await gv(E3, ['init', '--encryption', 'aes-256-gcm'], { env: { GENVAULT_PASSWORD_FILE: pw } })).code).toBe(0);
    const r = await gv(null, ['sync', s.path('E1'), E3], { env: { GENVAULT_PASSWORD_FILE: pw } });
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/other keys than .*init --like/);
    expect(await fs.readdir(path.join(E3, 'packs'))).toEqual([]);
    await gvOk(s.path('plain'), ['init']);
    const plain = await gv(null, ['sync', s.path('E1'), s.path('plain')], { env: { GENVAULT_PASSWORD_FILE: pw } });
    expect(plain.code).toBe(1);
    expect(oneLine(plain.stderr)).toMatch(/is encrypted and .* is not.*init --like/);
    const wrong = await gv(s.path('E4'), ['init', '--like', s.path('E1'), '--encryption', 'none'], { env: { GENVAULT_PASSWORD_FILE: pw } });
    expect(wrong.code).toBe(2);
    expect(oneLine(wrong.stderr)).toMatch(/is encrypted/);
  });
});

describe('killed and run again', () => {
  let R: string;
  const sums: string[] = [];

  beforeAll(async () => {
    R = s.path('R');
    await gvOk(R, ['init']);
    let img = image(5, 10);
    for (let i = 0; i < 3; i++) {
      if (i) img = changed(img, 50 + i, (2 + 3 * i) * MiB, 2 * MiB);
      sums.push(await writeImage(s.path(`r${i}.img`), [img]));
      await gvOk(R, ['backup', s.path(`r${i}.img`), '--name', 'r']);
    }
  });

  for (const [point, visible] of [['flushed-2', 0], ['before-commit', 0], ['committed-2', 2]] as const) {
    it(`SIGKILL at ${point}: nothing half-visible, a rerun completes, verify and gc clean`, async () => {
      const T = s.path(`T-${point}`);
      await gvOk(T, ['init', '--like', R]);
      const pause = s.path(`pause-${point}`);
      await fs.writeFile(pause, '');
      const p = new CliProcess(['sync', R, T], { GENVAULT_SYNC_PAUSE_FILE: pause, GENVAULT_SYNC_PAUSE_AT: point, GENVAULT_SYNC_FLUSH_ENTRIES: '8' });
      try {
        await p.waitFor(/sync: paused at/, 60_000);
        p.kill('SIGKILL');
        await p.exited;
        await waitGone([p.pid]);
      } finally {
        p.kill('SIGKILL');
        await fs.rm(pause, { force: true });
      }
      // Exactly the generations committed before the kill are there, each whole.
      const seen = await listed(T);
      expect(seen).toHaveLength(visible);
      await verifiesClean(T);
      const r = await gv(null, ['sync', R, T, '--json']);
      expect(r.code, r.stderr).toBe(0);
      // Killed before its commit, the generation's own pack (synced, never committed) is removed.
      if (point === 'before-commit') expect(r.stderr).toMatch(/cleaned up after sync .*1 uncommitted pack\(s\) removed/);
      expect((await fs.readdir(path.join(T, 'locks'))).filter((f) => f.startsWith('writer-'))).toEqual([]);
      expect(JSON.parse(r.stdout).copied).toHaveLength(3 - visible);
      expect((await listed(T)).map((g) => g.id)).toEqual((await listed(R)).map((g) => g.id));
      await verifiesClean(T);
      const gc = await gv(T, ['gc', '--json']);
      expect(gc.code, gc.stderr).toBe(0);
      await verifiesClean(T);
      for (let i = 0; i < 3; i++) await restoresAs(T, `r@${2 - i}`, sums[i]!);
    });
  }
});

describe('a damaged source', () => {
  it('a flipped byte in a chunk record: one line, exit 1, no generation at the destination', async () => {
    const H = s.path('H');
    const H2 = s.path('H2');
    await gvOk(H, ['init']);
    const base = image(8, 6);
    await writeImage(s.path('h0.img'), [base]);
    await gvOk(H, ['backup', s.path('h0.img'), '--name', 'ok']);
    await writeImage(s.path('h1.img'), [image(9, 6)]);
    const before = new Set(await dataPackFiles(H));
    await gvOk(H, ['backup', s.path('h1.img'), '--name', 'bad']);
    const [pack] = (await dataPackFiles(H)).filter((f) => !before.has(f));
    // A byte in the middle of the first chunk record's payload.
    const fh = await fs.open(pack!, 'r');
    const head = Buffer.alloc(52);
    await fh.read(head, 0, 52, 24);
    await fh.close();
    await flipByte(pack!, 24 + 52 + Math.floor(head.readUInt32LE(12) / 2));
    await gvOk(H2, ['init', '--like', H]);
    const r = await gv(null, ['sync', H, H2]);
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/source damaged: the record of chunk [0-9a-f]{64} in pack [0-9a-f]{32} at \d+: /);
    // The image before it in order ('bad' < 'ok') was not reached, the damaged one never committed.
    expect(await listed(H2)).toEqual([]);
    const ok = await syncJson([H, H2, 'ok']);
    expect(ok.copied).toHaveLength(1);
    expect((await listed(H2)).map((g) => g.name)).toEqual(['ok']);
    expect((await gv(H2, ['gc'])).code).toBe(0);
    await verifiesClean(H2);
  });
});

describe('a gc at the destination during a sync', () => {
  it('the gc waits for the sync, and both leave whole generations', async () => {
    const G = s.path('G');
    const G2 = s.path('G2');
    await gvOk(G, ['init']);
    const g0 = image(12, 8);
    const sum0 = await writeImage(s.path('g0.img'), [g0]);
    const sum1 = await writeImage(s.path('g1.img'), [changed(g0, 13, 2 * MiB, 3 * MiB)]);
    await gvOk(G, ['backup', s.path('g0.img'), '--name', 'g']);
    await gvOk(G, ['backup', s.path('g1.img'), '--name', 'g']);
    // The destination has garbage for the gc: a generation forgotten there.
    await gvOk(G2, ['init', '--like', G]);
    await writeImage(s.path('junk.img'), [image(14, 4)]);
    await gvOk(G2, ['backup', s.path('junk.img'), '--name', 'junk']);
    await gvOk(G2, ['forget', 'junk@0', '--force-young']);
    const pause = s.path('pause-gc');
    await fs.writeFile(pause, '');
    const p = new CliProcess(['sync', G, G2, '--json'], { GENVAULT_SYNC_PAUSE_FILE: pause, GENVAULT_SYNC_PAUSE_AT: 'before-commit' });
    let gc: CliProcess | null = null;
    try {
      await p.waitFor(/sync: paused at before-commit/, 60_000);
      // The gc condemns the garbage (and the sync's chunks, committed but not yet referenced), then waits for the sync.
      gc = new CliProcess(['-r', G2, 'gc', '--json'], { GENVAULT_GC_TRACE: '1' });
      await gc.waitFor(/gc-trace: wait/, 60_000);
      expect(gc.running).toBe(true);
      await fs.rm(pause);
      expect((await p.waitExit(120_000)).code).toBe(0);
      expect((await gc.waitExit(120_000)).code).toBe(0);
    } finally {
      p.kill('SIGKILL');
      gc?.kill('SIGKILL');
      await fs.rm(pause, { force: true });
    }
    // Its output mixes trace lines (stderr) with the JSON (stdout): the figures by name.
    const figure = (name: string) => Number(new RegExp(`"${name}": (\\d+)`).exec(gc!.out)?.[1]);
    expect(figure('chunksRemoved')).toBeGreaterThan(0);
    expect(figure('waitedFor')).toBeGreaterThanOrEqual(1);
    await verifiesClean(G2);
    await restoresAs(G2, 'g@1', sum0);
    await restoresAs(G2, 'g@0', sum1);
    // A second gc finds nothing of the sync's to remove.
    await gvOk(G2, ['gc']);
    await verifiesClean(G2);
    await restoresAs(G2, 'g@0', sum1);
  });
});

describe('a sync that starts while a gc runs at the destination', () => {
  it('does not reuse the chunks the gc condemned: it stores fresh copies, and the generation stays whole', async () => {
    const Q = s.path('Q');
    const Q2 = s.path('Q2');
    await gvOk(Q, ['init']);
    const sum = await writeImage(s.path('q.img'), [image(41, 6)]);
    await gvOk(Q, ['backup', s.path('q.img'), '--name', 'q']);
    // The destination holds the very same chunks, unreferenced: garbage the gc condemns.
    await gvOk(Q2, ['init', '--like', Q]);
    await gvOk(Q2, ['backup', s.path('q.img'), '--name', 'q']);
    await gvOk(Q2, ['forget', 'q@0', '--force-young']);
    const pause = s.path('pause-gc2');
    await fs.writeFile(pause, '');
    const gc = new CliProcess(['-r', Q2, 'gc'], { GENVAULT_GC_PAUSE_FILE: pause });
    try {
      await gc.waitFor(/gc: paused at before-sweep/, 60_000);
      const r = await syncJson([Q, Q2]);
      expect(r.copied).toHaveLength(1);
      // Every chunk sent again: none of the condemned copies was taken.
      expect(r.chunks).toBeGreaterThan(0);
      expect(r.chunks).toBe((await listed(Q))[0]!.stats.newChunks);
      await fs.rm(pause);
      expect((await gc.waitExit(120_000)).code, gc.out).toBe(0);
    } finally {
      gc.kill('SIGKILL');
      await fs.rm(pause, { force: true });
    }
    await verifiesClean(Q2);
    await restoresAs(Q2, 'q@0', sum);
  });
});

describe('a sync job in the job file', () => {
  it('runs as a job, is recorded, and status shows it; a bad sync: is one file:line line', async () => {
    const J = s.path('J');
    const J2 = s.path('J2');
    await gvOk(J, ['init']);
    const sum = await writeImage(s.path('j.img'), [image(21, 4)]);
    await gvOk(J, ['backup', s.path('j.img'), '--name', 'web']);
    await gvOk(J, ['backup', s.path('j.img'), '--name', 'web']);
    await gvOk(J2, ['init', '--like', J]);
    const file = s.path('jobs.yaml');
    await fs.writeFile(
      file,
      `repository: ${J}\ntimezone: UTC\njobs:\n  offsite:\n    sync: { to: ${J2}, images: [web], keep: { keep-last: 1, min-age: 0 } }\n    schedule: "0 4 * * *"\n`,
      { mode: 0o600 },
    );
    const r = await gv(null, ['run', '--config', file, '--now', 'offsite']);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^offsite: ok: synced 1 generation\(s\) to .*J2 \(0 already there\), \d+ chunks .* sent, .* stored, /m);
    expect((await listed(J2)).map((g) => g.id)).toEqual([(await listed(J)).at(-1)!.id]);
    await restoresAs(J2, 'web@0', sum);
    const st = await gv(null, ['status', '--config', file, '--json']);
    const row = (JSON.parse(st.stdout) as { jobs: Array<{ job: string; state: string; lastSuccess: string | null }> }).jobs.find((j) => j.job === 'offsite')!;
    expect(row.state).toBe('OK');
    expect(row.lastSuccess).not.toBeNull();
    // A failing sync (the destination gone) is a failed run, recorded and shown.
    await fs.rename(J2, s.path('J2-away'));
    const bad = await gv(null, ['run', '--config', file, '--now', 'offsite']);
    expect(bad.code).toBe(1);
    expect(bad.stderr).toMatch(/offsite: FAILED \(sync\): sync to .*J2: .*not a genvault repository/);
    const st2 = JSON.parse((await gv(null, ['status', '--config', file, '--json'])).stdout) as { jobs: Array<{ job: string; state: string }> };
    expect(st2.jobs.find((j) => j.job === 'offsite')!.state).toBe('CRIT');
    const wrong = s.path('wrong.yaml');
    await fs.writeFile(wrong, `repository: ${J}\njobs:\n  offsite:\n    source: /x\n    sync: { images: [web] }\n`, { mode: 0o600 });
    const c = await gv(null, ['run', '--check', '--config', wrong]);
    expect(c.code).toBe(1);
    expect(c.stderr + c.stdout).toMatch(/wrong\.yaml:4: jobs\.offsite\.source: not with sync/);
    expect(c.stderr + c.stdout).toMatch(/wrong\.yaml:5: jobs\.offsite\.sync\.to: missing/);
  });
});

describe('the source changes during a sync', () => {
  it('a generation being copied, forgotten and gc-ed at the source meanwhile, still copies whole (pinned)', async () => {
    const P = s.path('P');
    const P2 = s.path('P2');
    await gvOk(P, ['init']);
    const p0 = image(31, 8);
    const sum0 = await writeImage(s.path('p0.img'), [p0]);
    await writeImage(s.path('p1.img'), [changed(p0, 32, 0, 3 * MiB)]);
    await gvOk(P, ['backup', s.path('p0.img'), '--name', 'p']);
    await gvOk(P, ['backup', s.path('p1.img'), '--name', 'p']);
    await gvOk(P2, ['init', '--like', P]);
    const pause = s.path('pause-pin');
    await fs.writeFile(pause, '');
    const p = new CliProcess(['sync', P, P2, '--json'], { GENVAULT_SYNC_PAUSE_FILE: pause, GENVAULT_SYNC_PAUSE_AT: 'flushed-1', GENVAULT_SYNC_FLUSH_ENTRIES: '8' });
    try {
      await p.waitFor(/sync: paused at flushed-1/, 60_000);
      // Both generations forgotten and their space reclaimed at the source, while the first is being copied.
      await gvOk(P, ['forget', 'p@1', '--force-young']);
      await gvOk(P, ['forget', 'p@0', '--force-young']);
      const gc = JSON.parse(await gvOk(P, ['gc', '--json'])) as { chunksRemoved: number };
      await fs.rm(pause);
      const done = await p.waitExit(120_000);
      expect(done.code, p.out).toBe(0);
      // The pinned one kept its data; the other was gone when its turn came.
      expect(gc.chunksRemoved).toBeGreaterThan(0);
      const r = JSON.parse(p.out.slice(p.out.indexOf('{'))) as { copied: Array<{ id: string }>; vanished: number };
      expect(r.copied).toHaveLength(1);
      expect(r.vanished).toBe(1);
    } finally {
      p.kill('SIGKILL');
      await fs.rm(pause, { force: true });
    }
    await verifiesClean(P2);
    await restoresAs(P2, 'p@0', sum0);
    // Released: the next gc at the source reclaims the rest.
    await gvOk(P, ['gc']);
    expect(await listed(P)).toEqual([]);
  });
});

describe('an older source format', () => {
  it('a format 3 repository (group records, no metadata in its packs) syncs into a new one made like it', async () => {
    const F = s.path('F3');
    const F5 = s.path('F5');
    await fs.cp(path.join(ROOT, 'test', 'fixtures', 'format3-repo'), F, { recursive: true });
    for (const d of ['locks', 'tmp']) await fs.mkdir(path.join(F, d), { recursive: true });
    await sh('chmod', ['-R', 'go-rwx', F]);
    await gvOk(F5, ['init', '--like', F]);
    expect(JSON.parse(await fs.readFile(path.join(F5, 'config.json'), 'utf8')).version).toBe(5);
    const r = await syncJson([F, F5]);
    expect(r.copied).toHaveLength(3);
    const want = format3Images();
    const list = await listed(F5);
    for (let i = 0; i < want.length; i++) {
      const [name, data] = want[i]!;
      await restoresAs(F5, `${name}@${list[i]!.id}`, createHash('sha256').update(data).digest('hex'));
    }
    await verifiesClean(F5);
    // Into the format 3 repository: refused (it keeps no metadata in its packs).
    const back = await gv(null, ['sync', F5, F]);
    expect(back.code).toBe(1);
    expect(oneLine(back.stderr)).toMatch(/format 3, which keeps no metadata in its packs: run 'genvault upgrade'/);
  });
});

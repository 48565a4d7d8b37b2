/**
 * Bit rot: a flipped byte in a pack is found by verify --full (naming the generations it
 * affects), and the next backup of a source that still holds those bytes heals every
 * generation that shares the chunk.
 */
import fs from 'node:fs/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { dataPackFiles, flipByte, gv, gvOk, prng, sha256File, Scratch } from './helpers.js';

let s: Scratch;
let repo: string;

beforeAll(async () => {
  s = await Scratch.create();
  repo = s.path('repo');
  await gvOk(repo, ['init']);
});

afterAll(async () => {
  await s?.cleanup();
});


describe('damage and healing', () => {
  it('verify names the affected generations; a new backup heals all of them', async () => {
    const shared = prng(7, 6 << 20);
    const a = s.path('a.img');
    const b = s.path('b.img');
    await fs.writeFile(a, shared);
    await fs.writeFile(b, Buffer.concat([shared, prng(8, 2 << 20)]));
    await gvOk(repo, ['backup', a, '--name', 'a']);
    await flipByte((await dataPackFiles(repo))[0]!, 300_000, 0x01); // bit rot inside the data of `shared`
    await gvOk(repo, ['backup', b, '--name', 'b']); // dedups against the rotten chunk, unaware

    const v = await gv(repo, ['verify', '--full', '--json']);
    expect(v.code).toBe(1);
    const report = JSON.parse(v.stdout);
    const names = new Set(report.damagedChunks.flatMap((c: { affects: Array<{ name: string }> }) => c.affects.map((x) => x.name)));
    expect([...names].sort()).toEqual(['a', 'b']);
    const r = await gv(repo, ['restore', 'b@latest', s.path('b.out')]);
    expect(r.code).toBe(1);

    // The source still holds the good bytes: backing it up again stores a good copy.
    await gvOk(repo, ['backup', a, '--name', 'a']);
    const v2 = await gv(repo, ['verify', '--full']);
    expect(v2.code, v2.stdout + v2.stderr).toBe(0);
    const gens = JSON.parse(await gvOk(repo, ['list', '--json']));
    for (const g of gens) {
      const out = s.path(`${g.name}-${g.id}.out`);
      await gvOk(repo, ['restore', `${g.name}@${g.id}`, out]);
      expect(await sha256File(out)).toBe(await sha256File(g.name === 'a' ? a : b));
    }
  });
});

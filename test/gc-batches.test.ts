/**
 * gc over more chunks than one batch holds: the condemned set is read back from the index
 * in batches (no list of it in memory), so thousands of condemned chunks cross several
 * batch boundaries. A synthetic repository (scripts/gc-synth.mjs, as scripts/bench-gc-scale
 * uses at tens of millions of chunks) where which chunks are garbage is known exactly:
 * gc removes exactly those, deletes the pack that holds nothing live and rewrites the one
 * mostly dead, the dry run predicts it, verify finds every referenced chunk afterwards, and
 * a second gc has nothing left to do.
 */
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ROOT, Scratch, gv, gvOk, sh } from './helpers.js';

let s: Scratch;

beforeAll(async () => {
  s = await Scratch.create('genvault-gc-batches-');
});

afterAll(async () => {
  await s?.cleanup();
});

const N = 40_960;
const PER_PACK = 4096;

/** The rule gc-synth.mjs makes garbage by (see its header). */
function garbageCount(): number {
  let n = 0;
  for (let i = 0; i < N; i++) {
    const p = Math.floor(i / PER_PACK);
    if (p % 8 === 7 || (p % 8 === 6 ? i % 10 < 8 : i % 10 === 9)) n++;
  }
  return n;
}

describe('gc in batches', () => {
  it('removes exactly the unreferenced chunks of a repository with thousands of them', async () => {
    const repo = s.path('synth');
    await gvOk(repo, ['init', '--encryption', 'none']);
    const made = await sh('node', [path.join(ROOT, 'scripts', 'gc-synth.mjs'), repo, String(N)], { env: { ...process.env, GC_SYNTH_PER_PACK: String(PER_PACK) } });
    expect(made.code, made.stderr).toBe(0);
    const garbage = garbageCount();
    expect(garbage).toBeGreaterThan(3 * 2048); // several batches of condemned chunks

    const dry = JSON.parse(await gvOk(repo, ['gc', '--dry-run', '--json']));
    expect(dry.referencedChunks).toBe(N - garbage);
    expect(dry.chunksRemoved).toBe(garbage);

    const r = JSON.parse(await gvOk(repo, ['gc', '--json']));
    expect(r.referencedChunks).toBe(N - garbage);
    expect(r.chunksRemoved).toBe(garbage);
    expect(r.chunksDeferred).toBe(0);
    expect(r.packsDeleted).toBe(dry.packsDeleted);
    expect(r.packsRepacked).toBe(dry.packsRepacked);
    expect(r.packsDeleted).toBe(1); // pack 7: nothing live
    expect(r.packsRepacked).toBe(1); // pack 6: 20% live

    const v = await gv(repo, ['verify', '--full']);
    expect(v.code, v.stdout + v.stderr).toBe(0);
    expect(v.stdout).toMatch(new RegExp(`${N - garbage} chunks`));

    const again = JSON.parse(await gvOk(repo, ['gc', '--json']));
    expect(again.chunksRemoved).toBe(0);
    expect(again.packsDeleted + again.packsRepacked).toBe(0);
  });
});

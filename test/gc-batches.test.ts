/**
 * gc over more chunks than one batch holds: the condemned set is read back from the index
 * in batches (no list of it in memory), so thousands of condemned chunks cross several
 * batch boundaries. A synthetic repository (scripts/gc-synth.mjs, as scripts/bench-gc-scale
 * uses at tens of millions of chunks) where which chunks are garbage is known exactly:
 * gc removes exactly those, deletes the pack that holds nothing live and rewrites the one
 * mostly dead, the dry run predicts it, verify finds every referenced chunk afterwards, and
 * a second gc has nothing left to do. verify's spill buckets are crossed the same way:
 * with buckets of 512 chunks it finds what it finds with one bucket, damage included.
 */
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { PACK_HEADER_SIZE, RECORD_HEADER_SIZE } from '../src/format/pack.js';
import { ROOT, Scratch, flipByte, gv, gvOk, packFiles, sh } from './helpers.js';

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
const isGarbage = (p: number, i: number) => p % 8 === 7 || (p % 8 === 6 ? i % 10 < 8 : i % 10 === 9);

/** Unreferenced chunks among chunks [from, to). */
function garbageCount(from = 0, to = N): number {
  let n = 0;
  for (let i = from; i < to; i++) if (isGarbage(Math.floor(i / PER_PACK), i)) n++;
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

/** The synthetic pack holding chunk number `first` as its first record (gc-synth writes i into each payload). */
async function packStarting(repo: string, first: number): Promise<string> {
  for (const f of await packFiles(repo)) {
    const fh = await fs.open(f, 'r');
    const b = Buffer.alloc(4);
    await fh.read(b, 0, 4, PACK_HEADER_SIZE + RECORD_HEADER_SIZE);
    await fh.close();
    if (b.readUInt32LE(0) === first) return f;
  }
  throw new Error(`no pack starts with chunk ${first}`);
}

const RECORD = RECORD_HEADER_SIZE + 16; // gc-synth's records: 16-byte raw chunks

describe('verify in spill buckets', () => {
  it('finds the same chunks and the same damage with one bucket and with dozens', async () => {
    const repo = s.path('synth-verify');
    await gvOk(repo, ['init', '--encryption', 'none']);
    const n = 4 * PER_PACK;
    const made = await sh('node', [path.join(ROOT, 'scripts', 'gc-synth.mjs'), repo, String(n)], { env: { ...process.env, GC_SYNTH_PER_PACK: String(PER_PACK) } });
    expect(made.code, made.stderr).toBe(0);
    const referenced = n - garbageCount(0, n);
    const small = { ...process.env, GENVAULT_VERIFY_BUCKET_CHUNKS: '512' }; // 32 buckets
    const verifyJson = async (args: string[], env?: NodeJS.ProcessEnv) => {
      const r = await gv(repo, ['verify', ...args, '--json'], { env });
      return { code: r.code, report: JSON.parse(r.stdout) };
    };

    for (const env of [undefined, small]) {
      const { code, report } = await verifyJson(['--full'], env);
      expect(code).toBe(0);
      expect(report).toMatchObject({ ok: true, chunks: referenced, chunksRead: referenced, headersChecked: 0 });
    }
    const sample = (await verifyJson(['--sample', '10'], small)).report;
    expect(sample.chunksRead).toBe(Math.ceil(referenced * 0.1));
    expect(sample.headersChecked + sample.chunksRead).toBe(referenced);

    // Rot in the payloads of pack 1's first ten records (one of them, chunk 4099, is
    // garbage), and pack 3 gone.
    const pack1 = await packStarting(repo, PER_PACK);
    for (let j = 0; j < 10; j++) await flipByte(pack1, PACK_HEADER_SIZE + j * RECORD + RECORD_HEADER_SIZE + 12);
    await fs.rm(await packStarting(repo, 3 * PER_PACK));
    const lost = PER_PACK - garbageCount(3 * PER_PACK, 4 * PER_PACK);

    const index = await verifyJson([], small);
    expect(index.code).toBe(1);
    expect(index.report.damagedChunks).toHaveLength(lost); // header checks do not see payload rot
    const reports = [];
    for (const env of [undefined, small]) {
      const full = await verifyJson(['--full'], env);
      expect(full.code).toBe(1);
      expect(full.report.damagedChunks).toHaveLength(lost + 9);
      expect(full.report.damagedPacks).toEqual([expect.objectContaining({ problem: 'pack file is missing' })]);
      reports.push(full.report);
    }
    const strip = (r: { durationMs: number }) => ({ ...r, durationMs: 0 });
    expect(strip(reports[1])).toEqual(strip(reports[0]));
  });
});

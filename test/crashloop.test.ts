/**
 * Crash loop: backups, prunes and gcs killed with SIGKILL at random moments, 30 times.
 * After each kill the repository verifies clean (verify --full) and every committed
 * generation restores to exactly the bytes it was made from.
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CLI, Scratch, gv, gvOk, prng } from './helpers.js';

let s: Scratch;
let repo: string;
const sums = new Map<string, string>(); // tag -> sha256 of the source

function source(n: number): Buffer {
  // 8 MiB: half shared between all sources (dedup), half of its own, some zeros
  return Buffer.concat([prng(1000, 3 << 20), prng(n, 3 << 20), Buffer.alloc(1 << 20), prng(n + 7, 1 << 20)]);
}

function runAndKill(args: string[], input: Buffer | null, delayMs: number): Promise<void> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [CLI, '-r', repo, ...args], { stdio: ['pipe', 'ignore', 'ignore'] });
    child.stdin.on('error', () => undefined);
    if (input) child.stdin.end(input);
    else child.stdin.end();
    const t = setTimeout(() => child.kill('SIGKILL'), delayMs);
    child.on('exit', () => {
      clearTimeout(t);
      resolve();
    });
  });
}

beforeAll(async () => {
  s = await Scratch.create();
  repo = s.path('repo');
  await gvOk(repo, ['init']);
  sums.set('src-1', createHash('sha256').update(source(1)).digest('hex'));
});

afterAll(async () => {
  await s?.cleanup();
});

describe('crash loop', () => {
  it('30 kills of backup, prune and gc leave a repository that verifies and restores', async () => {
    // seed: one committed generation
    const seed = source(1);
    const r0 = await gv(repo, ['backup', '-', '--name', 'vm', '--tag', 'src-1'], { input: seed });
    expect(r0.code, r0.stderr).toBe(0);
    let rand = 12345;
    const next = () => (rand = (Math.imul(rand, 1103515245) + 12345) >>> 0) / 2 ** 32;
    for (let i = 0; i < 30; i++) {
      const op = i % 3;
      const delay = 30 + Math.floor(next() * 900);
      if (op === 0) {
        const n = 10 + i;
        const data = source(n);
        sums.set(`src-${n}`, createHash('sha256').update(data).digest('hex'));
        await runAndKill(['backup', '-', '--name', i % 2 ? 'vm' : 'vm2', '--tag', `src-${n}`], data, delay);
      } else if (op === 1) {
        await runAndKill(['prune', '--keep-last', '2', '--min-age', '0'], null, delay);
      } else {
        await runAndKill(['gc'], null, delay);
      }
      const v = await gv(repo, ['verify', '--full']);
      expect(v.code, `after kill ${i} (op ${op}, ${delay} ms): ${v.stdout}${v.stderr}`).toBe(0);
      const gens = JSON.parse(await gvOk(repo, ['list', '--json']));
      expect(gens.length).toBeGreaterThan(0);
      for (const g of gens) {
        const out = s.path('out.img');
        await gvOk(repo, ['restore', `${g.name}@${g.id}`, out, '--force']);
        const got = createHash('sha256').update(await fs.readFile(out)).digest('hex');
        expect(got, `${g.name}@${g.id} after kill ${i}`).toBe(sums.get(g.tags[0]));
      }
    }
    // and the repository still takes a backup and a complete gc
    const last = await gv(repo, ['backup', '-', '--name', 'vm', '--tag', 'src-1'], { input: seed });
    expect(last.code, last.stderr).toBe(0);
    const gc = await gv(repo, ['gc']);
    expect(gc.code, gc.stderr).toBe(0);
  }, 600_000);
});

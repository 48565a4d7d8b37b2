/**
 * kill -9 of a running backup: no visible generation, earlier generations restore,
 * and the next backup cleans up and succeeds.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CLI, Scratch, gvOk, prng, sha256File } from './helpers.js';

let s: Scratch;
let repo: string;

async function dirBytes(dir: string): Promise<number> {
  let n = 0;
  for (const e of await fs.readdir(dir, { withFileTypes: true, recursive: true })) {
    if (!e.isFile()) continue;
    // A backup starting meanwhile removes the packs a killed run left: gone counts as 0.
    const st = await fs.stat(path.join(e.parentPath ?? (e as unknown as { path: string }).path, e.name)).catch((err) => {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
      throw err;
    });
    n += st?.size ?? 0;
  }
  return n;
}

/** Every pack file of the repository, by path. */
async function packFiles(): Promise<string[]> {
  const dir = path.join(repo, 'packs');
  const out: string[] = [];
  for (const sub of await fs.readdir(dir).catch(() => [] as string[])) {
    for (const f of await fs.readdir(path.join(dir, sub)).catch(() => [] as string[])) out.push(path.join(dir, sub, f));
  }
  return out;
}

beforeAll(async () => {
  s = await Scratch.create();
  repo = s.path('repo');
  await gvOk(repo, ['init']);
});

afterAll(async () => {
  await s?.cleanup();
});

describe('kill -9 during backup', () => {
  it('leaves the repository usable, repeatedly', async () => {
    const base = s.path('base.img');
    await fs.writeFile(base, prng(11, 12 << 20));
    await gvOk(repo, ['backup', base, '--name', 'vm1']);
    const baseSum = await sha256File(base);

    for (let round = 0; round < 3; round++) {
      // Feed a backup through a pipe and kill it once pack data is being written.
      const child = spawn(process.execPath, [CLI, '-r', repo, 'backup', '-', '--name', round % 2 ? 'vm1' : 'vm2'], {
        stdio: ['pipe', 'ignore', 'ignore'],
      });
      child.stdin.on('error', () => undefined);
      // Pack files there before this run (the killed runs' ones go when it starts: the
      // total size of packs/ can shrink meanwhile, so only a new file's data says it writes).
      const packsBefore = new Set(await packFiles());
      for (let i = 0; i < 6; i++) {
        child.stdin.write(prng(100 + round * 10 + i, 4 << 20));
      }
      const writing = async () => {
        for (const f of await packFiles()) {
          if (!packsBefore.has(f) && ((await fs.stat(f).catch(() => null))?.size ?? 0) > 0) return true;
        }
        return false;
      };
      for (let i = 0; i < 600 && !(await writing()); i++) await new Promise((r) => setTimeout(r, 50));
      expect(await writing(), `round ${round}: the backup never wrote pack data`).toBe(true);
      child.kill('SIGKILL');
      await new Promise((r) => child.on('exit', r));

      const list = JSON.parse(await gvOk(repo, ['list', '--json']));
      expect(list.map((g: { name: string }) => g.name)).toEqual(['vm1']);
      const out = s.path(`r${round}.img`);
      await gvOk(repo, ['restore', 'vm1@latest', out]);
      expect(await sha256File(out)).toBe(baseSum);
      await fs.rm(out);
    }
    // The dead runs left writer records; the next backup removes them and their uncommitted data.
    const locks = path.join(repo, 'locks');
    expect((await fs.readdir(locks)).some((f) => f.startsWith('writer-'))).toBe(true);
    const next = s.path('next.img');
    await fs.writeFile(next, prng(12, 8 << 20));
    await gvOk(repo, ['backup', next, '--name', 'vm2']);
    expect((await fs.readdir(locks)).filter((f) => f.startsWith('writer-') || f.startsWith('image-'))).toEqual([]);
    const out = s.path('next.out');
    await gvOk(repo, ['restore', 'vm2@latest', out]);
    expect(await sha256File(out)).toBe(await sha256File(next));
    // Only committed data remains: about 20 MiB of incompressible input, nothing of the killed runs.
    expect(await dirBytes(path.join(repo, 'packs'))).toBeLessThan(22 << 20);
  });
});

/**
 * The progress line: on a terminal only (never a byte of it under cron or redirected), and
 * never wider than the terminal, however narrow.
 */
import fs from 'node:fs/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { progressLine } from '../src/util/progress.js';
import { CLI, Scratch, gv, gvOk, prng, sh } from './helpers.js';

let s: Scratch;
let repo: string;
let img: string;

beforeAll(async () => {
  s = await Scratch.create('genvault-progress-');
  repo = s.path('repo');
  img = s.path('img.bin');
  await fs.writeFile(img, Buffer.concat([prng(7, 6 << 20), Buffer.alloc(2 << 20)]));
  await gvOk(repo, ['init']);
});

afterAll(async () => {
  await s?.cleanup();
});

describe('progressLine', () => {
  const MiB = 1 << 20;

  it('is the full line on a wide terminal', () => {
    expect(progressLine('backup vm1', 256 * MiB, 1024 * MiB, 50 * MiB, 15_360, 200)).toBe(
      'backup vm1 [######..................]  25%  256 MiB / 1.00 GiB  50.0 MiB/s  ETA 15.4s',
    );
    expect(progressLine('backup vm1', 3 * MiB, null, MiB, 0, 200)).toBe('backup vm1 3.00 MiB  1.00 MiB/s');
  });

  it('fits any width: the bar shrinks, then the ETA, speed and amounts go, never a wrapped line', () => {
    const label = 'backup a-rather-long-image-name';
    for (let cols = 1; cols <= 140; cols++) {
      for (const total of [1024 * MiB, null]) {
        const line = progressLine(label, 300 * MiB, total, 50 * MiB, 90_000, cols);
        expect(line.length, `${cols} columns: ${line}`).toBeLessThanOrEqual(Math.max(1, cols - 1));
        expect(line.startsWith(label.slice(0, Math.max(1, cols - 1)))).toBe(true);
      }
    }
    const at = (cols: number) => progressLine(label, 300 * MiB, 1024 * MiB, 50 * MiB, 90_000, cols);
    expect(at(120)).toBe(`${label} [#######.................]  29%  300 MiB / 1.00 GiB  50.0 MiB/s  ETA 1m30s`);
    expect(at(100)).toBe(`${label} [#####............]  29%  300 MiB / 1.00 GiB  50.0 MiB/s  ETA 1m30s`);
    expect(at(80)).toBe(`${label} [##......]  29%  300 MiB / 1.00 GiB  50.0 MiB/s`);
    expect(at(50)).toBe(`${label} [###.......]  29%`);
    expect(at(40)).toBe(`${label}  29%`);
    expect(at(20)).toBe(label.slice(0, 19));
  });
});

describe('progress on stderr', () => {
  it('redirected (as under cron): not one byte of progress, even without GENVAULT_NO_PROGRESS', async () => {
    const r = await gv(repo, ['backup', img, '--name', 'quiet'], { env: { GENVAULT_NO_PROGRESS: '' } });
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toBe('');
    expect(r.stdout).not.toMatch(/[\r\x1b]/);
  });

  it('on a terminal: drawn in place within its width, and cleared at the end', async () => {
    // script(1) gives the command a pseudo-terminal of 60 columns.
    const cmd = `stty cols 60; GENVAULT_NO_PROGRESS= ${process.execPath} ${CLI} -r ${repo} backup ${img} --name shown 2>&1 >/dev/null`;
    const r = await sh('script', ['-qec', cmd, '/dev/null']);
    expect(r.code, r.stdout).toBe(0);
    const draws = r.stdout.split('\r\x1b[K').slice(1);
    expect(draws.length, JSON.stringify(r.stdout)).toBeGreaterThanOrEqual(2);
    expect(draws.at(-1)!.trim()).toBe(''); // cleared
    for (const d of draws.slice(0, -1)) {
      expect(d).toMatch(/^backup shown /);
      expect(d.length).toBeLessThanOrEqual(59);
    }
  });
});

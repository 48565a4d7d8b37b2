/**
 * Every failure ends in one clear line on stderr, a non-zero exit, and nothing
 * half-written left visible.
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { exitText } from '../src/util/proc.js';
import { dataPackFiles, flipByte, gv, gvOk, must, oneLine, prng, sh, sha256File, Scratch } from './helpers.js';

let s: Scratch;
let repo: string;
let img: string;


beforeAll(async () => {
  s = await Scratch.create();
  repo = s.path('repo');
  img = s.path('img.bin');
  await fs.writeFile(img, Buffer.concat([prng(1, 6 << 20), Buffer.alloc(2 << 20), Buffer.alloc(4 << 20, 'text ')]));
  await gvOk(repo, ['init']);
  await gvOk(repo, ['backup', img, '--name', 'vm1']);
});

afterAll(async () => {
  await s?.cleanup();
});

describe('clear errors', () => {
  it('missing repository, and no repository given', async () => {
    const r = await gv(s.path('nowhere'), ['list']);
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/not a genvault repository .*genvault init/);
    const u = await gv(null, ['list'], { env: { GENVAULT_REPO: '' } });
    expect(u.code).toBe(2);
    expect(oneLine(u.stderr)).toMatch(/no repository given/);
  });

  it('repository of a newer format, and a corrupt config', async () => {
    const other = s.path('repo2');
    await gvOk(other, ['init']);
    const cfgFile = path.join(other, 'config.json');
    const cfg = JSON.parse(await fs.readFile(cfgFile, 'utf8'));
    await fs.writeFile(cfgFile, JSON.stringify({ ...cfg, version: 99 }));
    let r = await gv(other, ['list']);
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/format version 99 is newer than this genvault supports/);
    await fs.writeFile(cfgFile, '{"format": "genvault-repo');
    r = await gv(other, ['list']);
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/corrupt repository config: not valid JSON/);
    await fs.writeFile(cfgFile, JSON.stringify({ ...cfg, chunking: { ...cfg.chunking, min: 'x' } }));
    r = await gv(other, ['backup', img, '--name', 'x']);
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/chunking\.min/);
  });

  it('init refuses an existing repository', async () => {
    const r = await gv(repo, ['init']);
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/already exists/);
  });

  it('unreadable sources', async () => {
    let r = await gv(repo, ['backup', s.path('missing.img'), '--name', 'vm1']);
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/cannot read source .*missing\.img: no such file or directory/);
    r = await gv(repo, ['backup', s.dir, '--name', 'vm1']);
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/is a directory/);
    r = await gv(repo, ['backup', img, '--name', '../evil']);
    expect(r.code).toBe(2);
    expect(oneLine(r.stderr)).toMatch(/invalid image name/);
    r = await gv(repo, ['backup', img]);
    expect(r.code).toBe(2);
  });

  it('unknown image and revision', async () => {
    let r = await gv(repo, ['restore', 'nope@latest', s.path('x')]);
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/no image named nope/);
    r = await gv(repo, ['restore', 'vm1@7', s.path('x')]);
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/only 1 generation/);
    await expect(fs.stat(s.path('x'))).rejects.toThrow();
  });

  it('refuses to overwrite a non-empty target unless --force', async () => {
    const target = s.path('exists.img');
    await fs.writeFile(target, 'precious');
    const r = await gv(repo, ['restore', 'vm1@latest', target]);
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/exists and is not empty; use --force/);
    expect(await fs.readFile(target, 'utf8')).toBe('precious');
    await gvOk(repo, ['restore', 'vm1@latest', target, '--force']);
    expect(await sha256File(target)).toBe(await sha256File(img));
  });

  it('usage errors exit 2', async () => {
    expect((await gv(repo, ['frobnicate'])).code).toBe(2);
    expect((await gv(repo, ['restore'])).code).toBe(2);
    const help = await gv(repo, ['--help']);
    expect(help.code).toBe(0);
    expect(help.stdout).toMatch(/backup/);
  });
});

describe('damaged chunk during restore', () => {
  it('fails naming the range, leaves no file, and --ignore-damage writes zeros there', async () => {
    const drepo = s.path('damaged');
    await gvOk(drepo, ['init']);
    await gvOk(drepo, ['backup', img, '--name', 'vm1']);
    await flipByte((await dataPackFiles(drepo))[0]!, 100_000);

    const target = s.path('out-damaged.img');
    const r = await gv(drepo, ['restore', 'vm1@latest', target]);
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/1 damaged chunk\(s\) at image bytes \d+-\d+; use --ignore-damage/);
    expect((await fs.readdir(s.dir)).filter((f) => f.includes('out-damaged'))).toEqual([]);

    const r2 = await gv(drepo, ['restore', 'vm1@latest', target, '--ignore-damage', '--json']);
    expect(r2.code).toBe(1);
    const res = JSON.parse(r2.stdout);
    expect(res.damaged).toHaveLength(1);
    const { offset, length } = res.damaged[0];
    const got = await fs.readFile(target);
    const want = await fs.readFile(img);
    expect(got.subarray(offset, offset + length).equals(Buffer.alloc(length))).toBe(true);
    expect(got.subarray(0, offset).equals(want.subarray(0, offset))).toBe(true);
    expect(got.subarray(offset + length).equals(want.subarray(offset + length))).toBe(true);
  });
});

describe('disk full during backup', () => {
  it('fails with one line, commits nothing, and succeeds once space is freed', async () => {
    const fsImg = s.path('small-fs.img');
    await must('truncate', ['-s', '64M', fsImg]);
    await must('mkfs.ext4', ['-q', '-F', fsImg]);
    const dev = await s.loopAttach(fsImg);
    const mnt = s.path('smallfs');
    await s.mount(dev, mnt);
    const frepo = path.join(mnt, 'repo');
    await gvOk(frepo, ['init']);
    const small = s.path('small.bin');
    await fs.writeFile(small, prng(3, 1 << 20));
    await gvOk(frepo, ['backup', small, '--name', 'first']);
    // leave ~8 MiB free, then back up 24 MiB of incompressible data
    const free = Number((await must('df', ['-B1', '--output=avail', mnt])).trim().split('\n')[1]);
    await must('fallocate', ['-l', String(free - (8 << 20)), path.join(mnt, 'filler')]);
    const big = s.path('big.bin');
    await fs.writeFile(big, prng(4, 24 << 20));
    const r = await gv(frepo, ['backup', big, '--name', 'vm2']);
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toBe(`genvault: ${frepo}: no space left on device (backup of vm2 failed; nothing was committed)`);
    const list = JSON.parse(await gvOk(frepo, ['list', '--json']));
    expect(list.map((g: { name: string }) => g.name)).toEqual(['first']);
    expect((await fs.readdir(path.join(frepo, 'locks'))).filter((f) => f.startsWith('writer-'))).toEqual([]);
    const v = await gv(frepo, ['verify', '--full']);
    expect(v.code, v.stdout + v.stderr).toBe(0);
    await fs.rm(path.join(mnt, 'filler'));
    await gvOk(frepo, ['backup', big, '--name', 'vm2']);
    const out = s.path('vm2.out');
    await gvOk(frepo, ['restore', 'vm2@latest', out]);
    expect(await sha256File(out)).toBe(await sha256File(big));
    await gvOk(frepo, ['restore', 'first@latest', s.path('first.out')]);
    expect(await sha256File(s.path('first.out'))).toBe(await sha256File(small));
    await sh('umount', [mnt]);
  });
});

describe('describeFsError', () => {
  it('names the file for errno errors and keeps an inner layer\'s message', async () => {
    const { GenvaultError, describeFsError } = await import('../src/util/errors.js');
    const raw = Object.assign(new Error('EIO: i/o error, read'), { code: 'EIO' });
    const inner = describeFsError(raw, 'reading /srv/vm1.img at offset 4096');
    expect(inner).toBeInstanceOf(GenvaultError);
    expect(inner.message).toBe('reading /srv/vm1.img at offset 4096: input/output error');
    // An outer caller that only knows the source's description must not replace it.
    expect(describeFsError(inner, 'reading file:/srv/vm1.img at offset 0')).toBe(inner);
  });
});

describe('exitText', () => {
  it('names the status or the signal, and puts no peer-chosen text into the line', () => {
    expect(exitText(3)).toBe('exited with status 3');
    expect(exitText(null, 'SIGTERM')).toBe('killed by SIGTERM');
    expect(exitText(null, 'KILL')).toBe('killed by SIGKILL');
    expect(exitText(null, null)).toBe('ended without an exit status');
    expect(exitText(null, 'TERM\n\u001b[2Jroot password: ')).toBe('killed by a signal');
    expect(exitText(null, 'X'.repeat(200))).toBe('killed by a signal');
  });
});

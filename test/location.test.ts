/**
 * Where a repository is (src/repository/location.ts): an s3:// repository's cache
 * directory names its bucket in store.json, a file that decides where genvault connects,
 * so it is read as hostile: each malformation is one clear error, before any connection.
 */
import fs from 'node:fs/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readStoreFile } from '../src/repository/location.js';
import { Scratch, gv, oneLine } from './helpers.js';

let s: Scratch;
beforeAll(async () => {
  s = await Scratch.create('genvault-location-');
});
afterAll(() => s?.cleanup());

const good = { version: 1, kind: 's3', url: 's3://bkt/p', endpoint: 'http://127.0.0.1:1', region: 'us-east-1', bucket: 'bkt', prefix: 'p', virtualHost: false };

describe('store.json of a cache directory', () => {
  it('a directory without one is a local repository; a well-formed one is read back', async () => {
    expect(await readStoreFile(s.path('none'))).toBeNull();
    await fs.mkdir(s.path('ok'));
    await fs.writeFile(s.path('ok', 'store.json'), JSON.stringify(good));
    expect(await readStoreFile(s.path('ok'))).toEqual(good);
  });

  it('refuses every malformed one in one line, and a command on it exits non-zero without connecting', async () => {
    const cases: Array<[string, string, RegExp]> = [
      ['json', '{not json', /not valid JSON/],
      ['kind', JSON.stringify({ ...good, kind: 'gcs' }), /not a store file genvault knows/],
      ['version', JSON.stringify({ ...good, version: 2 }), /not a store file genvault knows/],
      ['missing', JSON.stringify({ ...good, endpoint: undefined }), /"endpoint" missing/],
      ['scheme', JSON.stringify({ ...good, endpoint: 'file:///etc/passwd' }), /"endpoint" is not an http\(s\) URL/],
      ['bucket', JSON.stringify({ ...good, url: 's3://other/p' }), /"url" does not name its bucket/],
    ];
    for (const [name, text, why] of cases) {
      const dir = s.path(`bad-${name}`);
      await fs.mkdir(dir);
      await fs.writeFile(`${dir}/store.json`, text);
      await expect(readStoreFile(dir), name).rejects.toThrow(why);
      const r = await gv(dir, ['list'], { env: { AWS_ACCESS_KEY_ID: 'x', AWS_SECRET_ACCESS_KEY: 'y' } });
      expect(r.code, name).not.toBe(0);
      expect(oneLine(r.stderr), name).toMatch(why);
    }
  });

  it('a bad --grace is refused before anything is opened', async () => {
    const r = await gv(s.path('nowhere'), ['gc', '--grace', 'soon']);
    expect(r.code).toBe(2);
    expect(oneLine(r.stderr)).toMatch(/--grace/);
  });
});

/** The local store against the contract in src/store/store.ts, in a scratch directory. */
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LocalAppender, LocalStore, LocalSyncReader } from '../src/store/local.js';
import { openStore, openSyncReader } from '../src/store/open.js';
import { checkName } from '../src/store/store.js';
import { Scratch, prng } from './helpers.js';
import { storeContract } from './store-contract.js';

let s: Scratch;
let store: LocalStore;
beforeAll(async () => {
  s = await Scratch.create('genvault-store-');
  store = new LocalStore(s.dir);
});
afterAll(async () => {
  await store?.close();
  await s?.cleanup();
});

const code = async (p: Promise<unknown>) => p.then(() => 'resolved', (e: NodeJS.ErrnoException) => e.code);

describe('contract (shared with the S3 store)', () => storeContract(() => store, 'contract'));

describe('names', () => {
  it('accepts relative names and refuses the rest, with EINVAL, before touching anything', async () => {
    for (const ok of ['config.json', 'packs/ab/x.pack', 'a.b/c..d']) expect(checkName(ok)).toBe(ok);
    for (const bad of ['', '../x', 'a/../../x', '/abs', 'a//b', 'a/', './a', 'a/.', 'a\0b', 'a\\b']) {
      expect(() => checkName(bad), bad).toThrow(expect.objectContaining({ code: 'EINVAL' }));
      expect(await code(store.get(bad)), bad).toBe('EINVAL');
      expect(await code(store.put(bad, 'x')), bad).toBe('EINVAL');
      expect(await code(store.create(bad)), bad).toBe('EINVAL');
      expect(await code(store.delete(bad)), bad).toBe('EINVAL');
    }
    await expect(fs.access(path.join(s.dir, '..', 'x'))).rejects.toThrow();
  });
});

describe('whole objects', () => {
  it('put replaces atomically, leaves no temporary, and takes the mode asked for', async () => {
    await store.put('dir/one.json', 'first');
    expect((await store.get('dir/one.json')).toString()).toBe('first');
    await store.put('dir/one.json', Buffer.from('second'), { mode: 0o600 });
    expect((await store.get('dir/one.json')).toString()).toBe('second');
    expect((await fs.stat(store.path('dir/one.json'))).mode & 0o7777).toBe(0o600);
    expect(await fs.readdir(path.join(s.dir, 'dir'))).toEqual(['one.json']);
  });

  it('exclusive put fails with EEXIST and keeps the object', async () => {
    await store.put('ex.json', 'kept', { exclusive: true });
    expect(await code(store.put('ex.json', 'lost', { exclusive: true }))).toBe('EEXIST');
    expect((await store.get('ex.json')).toString()).toBe('kept');
    expect((await fs.readdir(s.dir)).filter((f) => f.startsWith('ex.json'))).toEqual(['ex.json']);
  });

  it('a missing object: get and read say ENOENT, stat null, delete succeeds', async () => {
    expect(await code(store.get('nope'))).toBe('ENOENT');
    expect(await code(store.read('nope', Buffer.alloc(4), 0, 4, 0))).toBe('ENOENT');
    expect(await code(store.read('nope', Buffer.alloc(0), 0, 0, 0))).toBe('ENOENT');
    expect(await store.stat('nope')).toBeNull();
    expect(await store.stat('nodir/nope')).toBeNull();
    await store.delete('nope');
    await store.delete('nodir/nope');
  });

  it('reads ranges, short only at the end', async () => {
    const data = prng(7, 10_000);
    await store.put('r/data', data);
    const buf = Buffer.alloc(20_000);
    expect(await store.read('r/data', buf, 5, 1000, 123)).toBe(1000);
    expect(buf.subarray(5, 1005).equals(data.subarray(123, 1123))).toBe(true);
    expect(await store.read('r/data', buf, 0, 5000, 9000)).toBe(1000);
    expect(buf.subarray(0, 1000).equals(data.subarray(9000))).toBe(true);
    expect(await store.read('r/data', buf, 0, 10, 10_000)).toBe(0);
    expect(await store.stat('r/data')).toEqual({ size: 10_000 });
  });

  it('lists the objects under a folder, without temporaries or other kinds of file', async () => {
    await store.put('l/a', 'aa');
    await store.put('l/sub/b', 'bbb');
    await fs.writeFile(path.join(s.dir, 'l', 'x.json.0123.tmp'), 'partial');
    await fs.symlink('/etc/passwd', path.join(s.dir, 'l', 'link'));
    const got: Array<{ name: string; size: number }> = [];
    for await (const o of store.list('l')) got.push({ name: o.name, size: o.size });
    got.sort((a, b) => (a.name < b.name ? -1 : 1));
    expect(got).toEqual([
      { name: 'l/a', size: 2 },
      { name: 'l/sub/b', size: 3 },
    ]);
    const none: unknown[] = [];
    for await (const o of store.list('missing')) none.push(o);
    expect(none).toEqual([]);
  });

  it('delete removes the object even while a read descriptor is cached; truncate cuts it', async () => {
    await store.put('d/x', prng(3, 5000));
    expect(await store.read('d/x', Buffer.alloc(10), 0, 10, 0)).toBe(10);
    await store.truncate('d/x', 100);
    expect(await store.stat('d/x')).toEqual({ size: 100 });
    await store.delete('d/x');
    expect(await store.stat('d/x')).toBeNull();
    expect(await code(store.read('d/x', Buffer.alloc(10), 0, 10, 0))).toBe('ENOENT');
    await store.put('d/x', 'new');
    const buf = Buffer.alloc(3);
    expect(await store.read('d/x', buf, 0, 3, 0)).toBe(3);
    expect(buf.toString()).toBe('new');
  });

  it('opens again from its spec', async () => {
    const again = openStore(structuredClone(store.spec));
    expect(again.spec).toEqual({ kind: 'local', dir: s.dir });
    expect((await again.get('ex.json')).toString()).toBe('kept');
    await again.close();
  });
});

describe('appending', () => {
  /** Append parts, checking the file against everything appended after each step. */
  async function appendAndCheck(name: string) {
    const a = (await store.create(name)) as LocalAppender;
    const file = store.path(name);
    let want = Buffer.alloc(0);
    let seed = 100;
    const add = async (n: number) => {
      const b = prng(seed++, n);
      await a.append(b);
      want = Buffer.concat([want, b]);
      expect(a.size).toBe(want.length);
    };
    const expectFile = async () => expect((await fs.readFile(file)).equals(want)).toBe(true);
    return { a, file, add, expectFile, cut: (n: number) => (want = Buffer.from(want.subarray(0, n))) };
  }

  it('stages O_DIRECT writes across block and stage boundaries; sync, truncate and close keep the file exact', async () => {
    const t = await appendAndCheck('packs/aa/direct.pack');
    expect(t.a.direct).toBe(true); // setup builds the addon; /var/tmp takes O_DIRECT
    expect(await code(store.create('packs/aa/direct.pack'))).toBe('EEXIST');
    await t.add(100);
    expect((await fs.stat(t.file)).size).toBe(0); // staged, nothing written yet
    for (const n of [4000, 4096, (4 << 20) + 17, 3]) await t.add(n);
    await t.a.sync();
    await t.expectFile();
    // Truncate inside the stage (after a sync wrote a padded block), then append.
    const inStage = t.a.size - 10;
    await t.add(50);
    await t.a.truncate(inStage);
    t.cut(inStage);
    await t.add(5000);
    await t.a.sync();
    await t.expectFile();
    // Truncate before the stage, at an offset that is not block-aligned (the tail block is read back).
    const before = 4096 * 3 + 123;
    await t.a.truncate(before);
    t.cut(before);
    await t.add(9000);
    await t.a.sync();
    await t.expectFile();
    // close writes what is staged, unsynced.
    await t.add(77);
    await t.a.close();
    await t.expectFile();
    expect((await fs.stat(t.file)).mode & 0o777).toBe(0o640 & ~process.umask());
  });

  it('a reader of an object being appended to sees a prefix of it', async () => {
    const t = await appendAndCheck('packs/bb/reader.pack');
    await t.add(10_000);
    await t.a.sync();
    await t.add(3000);
    const buf = Buffer.alloc(20_000);
    const got = await store.read('packs/bb/reader.pack', buf, 0, buf.length, 0);
    expect(got).toBeGreaterThanOrEqual(10_000);
    const whole = await fs.readFile(t.file);
    expect(buf.subarray(0, 10_000).equals(whole.subarray(0, 10_000))).toBe(true);
    await t.a.close();
  });
});

describe('sync reader', () => {
  it('returns the bytes the store reads, buffered and O_DIRECT, short at the end', async () => {
    const data = prng(11, 3 * 4096 + 500);
    await store.put('s/data', data);
    const r = openSyncReader(store.spec) as LocalSyncReader;
    try {
      const buf = Buffer.alloc(data.length + 100);
      expect(r.read('s/data', buf, 3, 1000, 4000)).toBe(1000);
      expect(buf.subarray(3, 1003).equals(data.subarray(4000, 5000))).toBe(true);
      expect(r.read('s/data', buf, 0, 1000, data.length - 10)).toBe(10);
      const d = r.readDirect('s/data', 4000, data.length);
      expect(d).not.toBeNull();
      expect(d!.got).toBe(data.length - 4000);
      expect(d!.span.subarray(0, d!.got).equals(data.subarray(4000))).toBe(true);
      const past = r.readDirect('s/data', 100, data.length + 1000);
      expect(past!.got).toBe(data.length - 100);
      expect(() => r.read('../x', buf, 0, 1, 0)).toThrow(expect.objectContaining({ code: 'EINVAL' }));
      expect(() => r.read('s/none', buf, 0, 1, 0)).toThrow(expect.objectContaining({ code: 'ENOENT' }));
    } finally {
      r.close();
    }
  });
});

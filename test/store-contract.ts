/**
 * The contract of src/store/store.ts as checks any Store must pass, for store.test.ts
 * (LocalStore) and s3-store.test.ts (S3Store against radosgw). Each store gets a fresh
 * folder (`root`) so the checks do not see each other's objects.
 */
import { expect, it } from 'vitest';
import { openStore } from '../src/store/open.js';
import { Store, checkName } from '../src/store/store.js';
import { prng } from './helpers.js';

export const code = async (p: Promise<unknown>) => p.then(() => 'resolved', (e: NodeJS.ErrnoException) => e.code);

/** Names and sizes listed; each `modified` checked to be the storage's recent time (within a minute of ours). */
async function listed(store: Store, prefix: string): Promise<Array<{ name: string; size: number }>> {
  const got: Array<{ name: string; size: number }> = [];
  for await (const o of store.list(prefix)) {
    expect(Math.abs(o.modified! - Date.now())).toBeLessThan(60_000);
    got.push({ name: o.name, size: o.size });
  }
  return got.sort((a, b) => (a.name < b.name ? -1 : 1));
}

export function storeContract(getStore: () => Store, root: string): void {
  const n = (s: string) => `${root}/${s}`;

  it('contract: refuses bad names with EINVAL before touching anything', async () => {
    const store = getStore();
    for (const bad of ['', '../x', 'a/../../x', '/abs', 'a//b', 'a/', './a', 'a/.', 'a\0b', 'a\\b']) {
      expect(() => checkName(bad), bad).toThrow(expect.objectContaining({ code: 'EINVAL' }));
      for (const op of [store.get(bad), store.put(bad, 'x'), store.create(bad), store.delete(bad), store.stat(bad), store.read(bad, Buffer.alloc(1), 0, 1, 0)]) {
        expect(await code(op), bad).toBe('EINVAL');
      }
    }
  });

  it('contract: put replaces, exclusive put fails with EEXIST and keeps the object', async () => {
    const store = getStore();
    await store.put(n('dir/one.json'), 'first');
    expect((await store.get(n('dir/one.json'))).toString()).toBe('first');
    await store.put(n('dir/one.json'), Buffer.from('second'));
    expect((await store.get(n('dir/one.json'))).toString()).toBe('second');
    await store.put(n('ex.json'), 'kept', { exclusive: true });
    expect(await code(store.put(n('ex.json'), 'lost', { exclusive: true }))).toBe('EEXIST');
    expect((await store.get(n('ex.json'))).toString()).toBe('kept');
    await store.put(n('empty'), Buffer.alloc(0));
    expect((await store.get(n('empty'))).length).toBe(0);
    expect(await store.stat(n('empty'))).toEqual({ size: 0 });
  });

  it('contract: a missing object: get and read say ENOENT (a 0-byte read too), stat null, delete succeeds', async () => {
    const store = getStore();
    expect(await code(store.get(n('nope')))).toBe('ENOENT');
    expect(await code(store.read(n('nope'), Buffer.alloc(4), 0, 4, 0))).toBe('ENOENT');
    expect(await code(store.read(n('nope'), Buffer.alloc(0), 0, 0, 0))).toBe('ENOENT');
    expect(await store.stat(n('nope'))).toBeNull();
    expect(await store.stat(n('nodir/nope'))).toBeNull();
    await store.delete(n('nope'));
    await store.delete(n('nodir/nope'));
  });

  it('contract: reads ranges, short only at the end', async () => {
    const store = getStore();
    const data = prng(7, 10_000);
    await store.put(n('r/data'), data);
    const buf = Buffer.alloc(20_000);
    expect(await store.read(n('r/data'), buf, 5, 1000, 123)).toBe(1000);
    expect(buf.subarray(5, 1005).equals(data.subarray(123, 1123))).toBe(true);
    expect(await store.read(n('r/data'), buf, 0, 5000, 9000)).toBe(1000);
    expect(buf.subarray(0, 1000).equals(data.subarray(9000))).toBe(true);
    expect(await store.read(n('r/data'), buf, 0, 10, 10_000)).toBe(0);
    expect(await store.read(n('r/data'), buf, 0, 10, 20_000)).toBe(0);
    expect(await store.read(n('r/data'), buf, 0, 0, 0)).toBe(0);
    expect(await store.read(n('empty'), buf, 0, 10, 0)).toBe(0);
    expect(await store.stat(n('r/data'))).toEqual({ size: 10_000 });
  });

  it('contract: lists the objects under a folder, and nothing for a missing one', async () => {
    const store = getStore();
    await store.put(n('l/a'), 'aa');
    await store.put(n('l/sub/b'), 'bbb');
    await store.put(n('la'), 'not in l/');
    expect(await listed(store, n('l'))).toEqual([
      { name: n('l/a'), size: 2 },
      { name: n('l/sub/b'), size: 3 },
    ]);
    expect(await listed(store, n('missing'))).toEqual([]);
  });

  it('contract: delete removes, truncate cuts a closed object', async () => {
    const store = getStore();
    const data = prng(3, 5000);
    await store.put(n('d/x'), data);
    expect(await store.read(n('d/x'), Buffer.alloc(10), 0, 10, 0)).toBe(10);
    await store.truncate(n('d/x'), 100);
    expect(await store.stat(n('d/x'))).toEqual({ size: 100 });
    expect((await store.get(n('d/x'))).equals(data.subarray(0, 100))).toBe(true);
    expect(await code(store.truncate(n('d/none'), 1))).toBe('ENOENT');
    await store.delete(n('d/x'));
    expect(await store.stat(n('d/x'))).toBeNull();
    expect(await code(store.read(n('d/x'), Buffer.alloc(10), 0, 10, 0))).toBe('ENOENT');
  });

  it('contract: opens again from its structured-cloned spec', async () => {
    const store = getStore();
    const again = openStore(structuredClone(store.spec));
    expect(again.spec).toEqual(store.spec);
    expect((await again.get(n('ex.json'))).toString()).toBe('kept');
    await again.close();
  });

  it('contract: an appender makes its bytes durable on sync; sealed or going on as the store says', async () => {
    const store = getStore();
    const name = n('packs/aa/one.pack');
    const a = await store.create(name);
    expect(await code(store.create(n('ex.json')))).toBe('EEXIST');
    const first = prng(21, 70_000);
    await a.append(first.subarray(0, 30_000));
    await a.append(Buffer.from('dropped'));
    await a.truncate(30_000);
    await a.append(first.subarray(30_000));
    expect(a.size).toBe(first.length);
    await a.sync();
    expect((await store.get(name)).equals(first)).toBe(true);
    if (store.sealsOnSync) {
      expect(await code(a.append(Buffer.from('more')))).toBe('ESEALED');
      expect(await code(a.truncate(10))).toBe('ESEALED');
      await a.sync(); // nothing to do
    } else {
      await a.append(Buffer.from('more'));
      await a.sync();
      expect(await store.stat(name)).toEqual({ size: first.length + 4 });
    }
    await a.close();
    expect(await code(store.create(name))).toBe('EEXIST');
    expect((await listed(store, n('packs'))).map((o) => o.name)).toEqual([name]);
  });
}

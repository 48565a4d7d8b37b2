/**
 * Locks between hosts sharing an object-store repository (src/repository/store-locks.ts),
 * against the store contract: a local store stands in for the bucket here; s3.test.ts
 * takes them on radosgw.
 */
import fs from 'node:fs/promises';
import os from 'node:os';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LocalStore } from '../src/store/local.js';
import { REFRESH_MS, STALE_MS, StoreLock, readLocks } from '../src/repository/store-locks.js';
import { Scratch } from './helpers.js';

let s: Scratch;
let n = 0;
beforeAll(async () => {
  s = await Scratch.create('genvault-store-locks-');
});
afterAll(() => s?.cleanup());
const fresh = () => new LocalStore(s.path(`bucket-${++n}`));

describe('store locks', () => {
  it('shared locks coexist; an exclusive one waits for none of them and is refused while one is held', async () => {
    const st = fresh();
    const a = await StoreLock.acquire(st, { exclusive: false, what: 'backup vm1' });
    const b = await StoreLock.acquire(st, { exclusive: false, what: 'restore vm2' });
    await expect(StoreLock.acquire(st, { exclusive: true, what: 'gc' })).rejects.toThrow(/repository in use: (backup vm1|restore vm2) \(pid \d+ on .+\) holds .*locks\/[0-9a-f]{16}\.json, refreshed \d+ s ago/);
    expect((await readLocks(st)).length).toBe(2); // the refused one removed its own
    await a.release();
    await b.release();
    const g = await StoreLock.acquire(st, { exclusive: true, what: 'gc' });
    await expect(StoreLock.acquire(st, { exclusive: false, what: 'backup vm1' })).rejects.toThrow(/repository in use: gc/);
    await g.release();
    expect(await readLocks(st)).toEqual([]);
  });

  it('a lock not rewritten for the stale time by the storage\'s clock, or of a dead process on this host, is ignored and removed by an exclusive taker', async () => {
    const st = fresh();
    const old = await StoreLock.acquire(st, { exclusive: false, what: 'backup vm1', refreshMs: 1e9 });
    // The storage's clock says it was last written 31 minutes ago.
    const past = new Date(Date.now() - STALE_MS - 60_000);
    await fs.utimes(st.path(old.name), past, past);
    const g = await StoreLock.acquire(st, { exclusive: true, what: 'gc' });
    expect((await readLocks(st)).map((l) => l.name)).toEqual([g.name]);
    await g.release();
    await old.release().catch(() => undefined);
    // A dead process of this host: a pid that is not running.
    const dead = { id: 'aaaaaaaaaaaaaaaa', exclusive: true, owner: { pid: 2 ** 22 - 3, start: '1', host: os.hostname() }, what: 'gc', time: Date.now() };
    await st.put('locks/aaaaaaaaaaaaaaaa.json', JSON.stringify(dead));
    const b = await StoreLock.acquire(st, { exclusive: false, what: 'backup vm1' });
    await b.release();
  });

  it('judges ages by the storage\'s clock, not by the clocks of the hosts that wrote the locks', async () => {
    const st = fresh();
    // A holder whose clock is two hours behind wrote this lock a moment ago: it is fresh.
    const skewed = { id: 'cccccccccccccccc', exclusive: false, owner: { pid: 1, start: '', host: 'other-host' }, what: 'genvault backup', time: Date.now() - 2 * 3600_000 };
    await st.put('locks/cccccccccccccccc.json', JSON.stringify(skewed));
    await expect(StoreLock.acquire(st, { exclusive: true, what: 'gc' })).rejects.toThrow(/repository in use: genvault backup \(pid 1 on other-host\)/);
    // And a taker whose own clock runs two hours ahead sees it fresh too.
    await expect(StoreLock.acquire(st, { exclusive: true, what: 'gc', now: () => Date.now() + 2 * 3600_000 })).rejects.toThrow(/repository in use/);
  });

  it('a holder whose lock went unrefreshed for longer than others may wait is told before it commits', async () => {
    const st = fresh();
    const l = await StoreLock.acquire(st, { exclusive: false, what: 'backup vm1', refreshMs: 1e9 });
    let t = performance.now();
    l.monotonic = () => t;
    expect(() => l.assertHeld('backup of vm1')).not.toThrow();
    t += STALE_MS - REFRESH_MS + 1000; // no refresh got through meanwhile (a pause, a partition)
    expect(() => l.assertHeld('backup of vm1')).toThrow(/backup of vm1: the lock .* was last refreshed \d+ s ago, .*nothing was committed/);
    await l.release();
  });

  it('refreshes while held', async () => {
    const st = fresh();
    let clock = 1_000_000;
    const l = await StoreLock.acquire(st, { exclusive: false, what: 'mount', now: () => clock, refreshMs: 20 });
    clock = 2_000_000;
    await new Promise((r) => setTimeout(r, 120));
    const [r] = await readLocks(st);
    expect(typeof r!.lock === 'object' && r!.lock.time).toBe(2_000_000);
    await l.release();
  });

  it('a malformed lock is reported and blocks an exclusive taker, not a shared one', async () => {
    const st = fresh();
    await st.put('locks/bbbbbbbbbbbbbbbb.json', '{"id":"bbbbbbbbbbbbbbbb","exclusive":"yes"}');
    await st.put('locks/not-a-lock.txt', 'ignored');
    const b = await StoreLock.acquire(st, { exclusive: false, what: 'backup vm1' });
    await b.release();
    await expect(StoreLock.acquire(st, { exclusive: true, what: 'gc' })).rejects.toThrow(/repository in use: an unreadable lock holds/);
    expect(await fs.readFile(s.path(`bucket-${n}`, 'locks', 'not-a-lock.txt'), 'utf8')).toBe('ignored');
  });
});

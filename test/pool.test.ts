/** The worker pool: answers reach the task that asked, also with two tasks queued per worker. */
import { afterAll, describe, expect, it } from 'vitest';
// The pool starts dist/work/worker.js next to itself: use the built pool (scripts/test builds first).
import { WorkerPool } from '../dist/work/pool.js';

/** Packs are read from a store; this one is a directory that does not exist. */
const STORE = { kind: 'local', dir: '/nonexistent/genvault-pool-test' } as const;

const pools: Array<{ close(): Promise<void> }> = [];
afterAll(async () => {
  await Promise.all(pools.map((p) => p.close()));
});

/** A load of a pack that does not exist: the worker answers with a damage naming the file. */
function missing(i: number) {
  return {
    op: 'loadMany',
    items: [
      {
        file: `${i}.pack`,
        offset: 0,
        storedLength: 10,
        rawLength: 10,
        compression: 0,
        digest: new Uint8Array(32),
      },
    ],
  };
}

describe('WorkerPool', () => {
  for (const [size, depth] of [
    [1, 1],
    [1, 2],
    [2, 2],
    [3, 3],
  ] as const) {
    it(`routes every answer to its own task (${size} worker(s), ${depth} task(s) each)`, async () => {
      const pool = new WorkerPool(size, 0, depth, STORE);
      pools.push(pool);
      const n = 25;
      const answers = await Promise.all(
        Array.from({ length: n }, (_, i) => pool.run(missing(i))),
      );
      answers.forEach((a, i) => {
        expect(a.results).toHaveLength(1);
        expect(a.results[0]!.damaged).toContain(`/${i}.pack`);
      });
    });
  }

  it('a task that fails in the worker rejects only itself; the worker goes on with the rest', async () => {
    const pool = new WorkerPool(1, 0, 2, STORE);
    pools.push(pool);
    // 'compress' without its shared buffers throws inside the worker.
    const bad = pool.run({ op: 'compress' });
    const good = [pool.run(missing(1)), pool.run(missing(2))];
    await expect(bad).rejects.toThrow();
    const [a, b] = await Promise.all(good);
    expect(a.results[0]!.damaged).toContain('/1.pack');
    expect(b.results[0]!.damaged).toContain('/2.pack');
  });
});

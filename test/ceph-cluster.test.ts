/** The test cluster itself (ceph.ts): it starts, serves RBD and S3, and leaves nothing running. */
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Scratch, sh } from './helpers.js';
import { cephUnavailable, rbdPool, startCeph } from './ceph.js';

const why = await cephUnavailable();
if (why) console.warn(`skipping Ceph tests: ${why}`);

describe.skipIf(why !== null)('ceph test cluster', () => {
  let s: Scratch;
  beforeAll(async () => {
    s = await Scratch.create('genvault-ceph-');
  });
  afterAll(() => s.cleanup());

  it('starts, serves rbd and radosgw, and stops every daemon', async () => {
    const c = await startCeph(s);
    await rbdPool(c);
    await c.rbd(['create', '--size', '16M', 'rbd/x']);
    expect(await c.rbd(['ls', 'rbd'])).toContain('x');
    const r = await fetch(c.s3!.endpoint);
    expect(r.status).toBe(200);
    const pidFiles = (await fs.readdir(path.join(c.dir, 'run'))).filter((f) => f.endsWith('.pid'));
    expect(pidFiles.length).toBe(4); // mon, mgr, osd, radosgw
    await c.stop();
    expect((await sh('pgrep', ['-f', c.conf])).stdout.trim()).toBe('');
  });
});

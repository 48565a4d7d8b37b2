import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Spill } from '../src/util/spill.js';

let parent: string;
const saved = process.env.TMPDIR;

beforeAll(async () => {
  parent = await fs.mkdtemp(path.join(os.tmpdir(), 'genvault-spill-test-'));
  process.env.TMPDIR = parent;
});

afterAll(async () => {
  if (saved === undefined) delete process.env.TMPDIR;
  else process.env.TMPDIR = saved;
  await fs.rm(parent, { recursive: true, force: true });
});

describe('Spill', () => {
  it('gives each bucket back every record appended to it, in order, across many buffer flushes', async () => {
    const buckets = 37;
    const size = 13;
    const spill = await Spill.create('genvault-spill-t', buckets, size);
    const rec = Buffer.alloc(size);
    const n = 200_000;
    for (let i = 0; i < n; i++) {
      rec.fill(i % 251);
      rec.writeUInt32LE(i, 0);
      spill.append(i % buckets, rec);
      if (spill.pendingBytes > 1 << 20) await spill.drain();
    }
    await spill.finish();
    let seen = 0;
    for (let b = 0; b < buckets; b++) {
      const data = await spill.read(b);
      expect(data.length).toBe(spill.counts[b]! * size);
      for (let at = 0, k = 0; at < data.length; at += size, k++) {
        const i = data.readUInt32LE(at);
        expect(i).toBe(b + k * buckets);
        expect(data[at + size - 1]).toBe(i % 251);
        seen++;
      }
    }
    expect(seen).toBe(n);
    await spill.close();
    expect(await fs.readdir(parent)).toEqual([]);
  });

  it('an empty bucket reads as nothing; a directory left by a dead process is removed', async () => {
    const dead = path.join(parent, 'genvault-spill-t-999999999-abc');
    await fs.mkdir(dead);
    const other = path.join(parent, 'genvault-other-999999999-abc');
    await fs.mkdir(other);
    const spill = await Spill.create('genvault-spill-t', 4, 8);
    await spill.finish();
    expect((await spill.read(2)).length).toBe(0);
    const left = await fs.readdir(parent);
    expect(left).not.toContain(path.basename(dead));
    expect(left).toContain(path.basename(other)); // another kind of spill: not ours to judge
    await spill.close();
    await fs.rm(other, { recursive: true });
  });
});

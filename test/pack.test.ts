/** Pack files: O_DIRECT appends through the staging buffer, syncs, rewinds and closes. */
import fs from 'node:fs/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { PACK_HEADER_SIZE } from '../src/format/pack.js';
import { PackWriter } from '../src/store/pack-writer.js';
import { REC_LEAF, encodeMetaRecord } from '../src/format/meta.js';
import { LocalStore } from '../src/store/local.js';
import { Scratch, prng } from './helpers.js';

let s: Scratch;
beforeAll(async () => {
  s = await Scratch.create();
});
afterAll(async () => {
  await s?.cleanup();
});

describe('PackWriter', () => {
  it('writes with O_DIRECT: the file holds exactly what was appended after each sync, rewind and close', async () => {
    const store = new LocalStore(s.dir);
    const w = await PackWriter.create(store, { toc: false, register: async () => undefined }); // any bytes: tables of contents are toc.test.ts's
    const file = store.path(w.name);
    expect(w.name).toBe(`packs/${w.packId.slice(0, 2)}/${w.packId}.pack`);
    // The addon is built by setup, and /var/tmp takes O_DIRECT: the staged path is in use.
    expect((w.out as unknown as { direct: boolean }).direct).toBe(true);
    const header = (await fs.readFile(file)).length === 0; // nothing written before the first sync
    expect(header).toBe(true);
    const parts: Buffer[] = [];
    let seed = 1;
    const add = async (n: number) => {
      const b = prng(seed++, n);
      const at = await w.append(b);
      expect(at).toBe(PACK_HEADER_SIZE + parts.reduce((a, p) => a + p.length, 0));
      parts.push(b);
    };
    const expectFile = async () => {
      const f = await fs.readFile(file);
      expect(f.length).toBe(w.size);
      expect(f.subarray(PACK_HEADER_SIZE).equals(Buffer.concat(parts))).toBe(true);
    };
    for (const n of [100, 4096, 5000, 9 << 20, 3, 70_000]) await add(n); // crosses the 4 MiB stage twice
    await w.sync();
    await expectFile();
    // A sync in the middle of a block, then more appends: the padded block is written again.
    await add(12345);
    await w.sync();
    await expectFile();
    // Rewind within what is staged, and to before it (the tail block is read back).
    const keep = w.size;
    await add(3000);
    await w.rewind(keep);
    parts.pop();
    await add(777);
    await w.sync();
    await expectFile();
    const early = PACK_HEADER_SIZE + parts[0]!.length + parts[1]!.length + 17;
    await w.rewind(early);
    const cut = early - PACK_HEADER_SIZE;
    const flat = Buffer.concat(parts).subarray(0, cut);
    parts.length = 0;
    parts.push(Buffer.from(flat));
    await add(6000);
    await w.sync();
    await expectFile();
    // close writes what is staged (without a sync).
    await add(1234);
    await w.close();
    await expectFile();
  });
});

describe('PackWriter on a store that seals objects on sync (an object store)', () => {
  /** A local store that behaves as store.ts says a sealing store does. */
  class SealingStore extends LocalStore {
    override readonly sealsOnSync = true;
    override async create(name: string) {
      const a = await super.create(name);
      let sealed = false;
      const refuse = () => Promise.reject(Object.assign(new Error(`${name} is sealed`), { code: 'ESEALED' }));
      return {
        get name() { return a.name; },
        get size() { return a.size; },
        append: (d: Buffer) => (sealed ? refuse() : a.append(d)),
        truncate: (n: number) => (sealed ? refuse() : a.truncate(n)),
        sync: async () => {
          if (!sealed) await a.sync();
          sealed = true;
        },
        close: () => a.close(),
      };
    }
  }

  it('is sealed by its first sync (with its table of contents), a second sync adds nothing, an append is refused', async () => {
    const store = new SealingStore(s.path('sealing'));
    const w = await PackWriter.create(store, { toc: true, register: async () => undefined });
    const leaf = () => encodeMetaRecord({ type: REC_LEAF, leaf: prng(7, 1000) }, null);
    await w.append(leaf());
    expect(w.sealed).toBe(false);
    await w.sync();
    expect(w.sealed).toBe(true);
    const size = w.size;
    await w.sync();
    expect(w.size).toBe(size);
    await expect(w.append(leaf())).rejects.toMatchObject({ code: 'ESEALED' });
    await w.close();
    expect((await fs.stat(store.path(w.name))).size).toBe(size);
  });

  it('stays open after a sync on the local store', async () => {
    const w = await PackWriter.create(new LocalStore(s.path('plain')), { toc: false, register: async () => undefined });
    await w.sync();
    expect(w.sealed).toBe(false);
    await w.append(prng(9, 10));
    await w.close();
  });
});

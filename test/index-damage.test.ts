/**
 * Damage to the LevelDB index never turns into wrong bytes or a silently smaller
 * repository: flipped bits in its table and log files, a lost generation record, a
 * deleted index, a CURRENT naming a missing manifest, a truncated MANIFEST. Also reading a
 * repository on read-only media (a read-only bind mount).
 */
import { ClassicLevel } from 'classic-level';
import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Scratch, gv, gvOk, isMounted, packFiles, prng, seededRandom, sh, sha256File, text } from './helpers.js';
import { K_GEN, K_LEAF } from '../src/format/keys.js';

let s: Scratch;

interface Gen {
  id: string;
  name: string;
  created: string;
}

beforeAll(async () => {
  s = await Scratch.create('genvault-index-damage-');
});

afterAll(async () => {
  await s?.cleanup();
});

/** An image of random data, zero runs and text, so that leaves hold every kind of entry. */
function image(seed: number, mib: number): Buffer {
  const parts: Buffer[] = [];
  for (let i = 0; i < mib; i++) {
    const kind = (seed + i) % 4;
    parts.push(kind === 0 ? Buffer.alloc(1 << 20) : kind === 1 ? text(seed * 100 + i, 1 << 20) : prng(seed * 100 + i, 1 << 20));
  }
  return Buffer.concat(parts);
}

const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');

/** Copy a directory tree (cp -a keeps modes; the index holds only regular files when closed). */
async function copyDir(from: string, to: string): Promise<void> {
  await fs.rm(to, { recursive: true, force: true });
  const r = await sh('cp', ['-a', from, to]);
  if (r.code) throw new Error(r.stderr);
}

async function indexFiles(repo: string): Promise<Array<{ file: string; size: number }>> {
  const dir = path.join(repo, 'index');
  const out: Array<{ file: string; size: number }> = [];
  for (const n of await fs.readdir(dir)) {
    if (!/\.(ldb|log)$/.test(n) || n === 'genvault-damage.log') continue;
    const st = await fs.stat(path.join(dir, n));
    if (st.size) out.push({ file: path.join(dir, n), size: st.size });
  }
  return out;
}

/** stderr holds no stack trace and ends in one `genvault:` line. */
function expectOneLineError(r: { code: number; stderr: string }): void {
  expect(r.code).not.toBe(0);
  expect(r.stderr).not.toMatch(/\n\s+at /);
  const lines = r.stderr.trim().split('\n');
  expect(lines.at(-1)).toMatch(/^genvault: /);
}

describe('bit flips in the index', () => {
  let repo: string;
  let pristine: string;
  const want = new Map<string, string>(); // generation id -> sha256 of its image
  let gens: Gen[];

  beforeAll(async () => {
    repo = s.path('repo');
    await gvOk(repo, ['init']);
    // Two images, two generations each; the second generation of each changes a few MiB.
    for (const [name, seed] of [
      ['vm', 3],
      ['db', 7],
    ] as const) {
      const img = image(seed, 12);
      await fs.writeFile(s.path(`${name}.img`), img);
      await gvOk(repo, ['backup', s.path(`${name}.img`), '--name', name]);
      const next = Buffer.from(img);
      prng(seed + 50, 3 << 20).copy(next, 4 << 20);
      next.fill(0, 9 << 20, 10 << 20);
      await fs.writeFile(s.path(`${name}.img`), next);
      await gvOk(repo, ['backup', s.path(`${name}.img`), '--name', name]);
      const list: Gen[] = JSON.parse(await gvOk(repo, ['list', name, '--json']));
      want.set(list[0]!.id, sha(img));
      want.set(list[1]!.id, sha(next));
    }
    gens = JSON.parse(await gvOk(repo, ['list', '--json']));
    expect(gens).toHaveLength(4);
    pristine = s.path('index.pristine');
    await copyDir(path.join(repo, 'index'), pristine);
  });

  it('50 random bit flips in table and log files: every restore is byte-identical or an error', async () => {
    const seed = Number(process.env.GENVAULT_FLIP_SEED ?? 20261206);
    const rand = seededRandom(seed);
    let wrong = 0;
    let errors = 0;
    let identical = 0;
    const failures: string[] = [];
    const aborts: string[] = [];
    // The flips are drawn first (the seed replays them), then tried in two lanes, each on
    // its own copy of the repository: the machine has two cores, and each flip's restores
    // run one after another, every one opening the damaged index itself.
    const files = (await indexFiles(repo)).sort((a, b) => (a.file < b.file ? -1 : 1));
    const total = files.reduce((a, f) => a + f.size, 0);
    const flips = Array.from({ length: 50 }, () => {
      let at = Math.floor(rand() * total);
      const f = files.find((x) => (at < x.size ? true : ((at -= x.size), false)))!;
      return { name: path.basename(f.file), at, bit: Math.floor(rand() * 8) };
    });
    const lane = async (k: number) => {
      const copy = s.path(`flips-${k}`);
      await copyDir(repo, copy);
      const out = s.path(`flips-${k}.img`);
      for (let flip = k; flip < flips.length; flip += 2) {
        const { name, at, bit } = flips[flip]!;
        await copyDir(pristine, path.join(copy, 'index'));
        const fh = await fs.open(path.join(copy, 'index', name), 'r+');
        const b = Buffer.alloc(1);
        await fh.read(b, 0, 1, at);
        b[0]! ^= 1 << bit;
        await fh.write(b, 0, 1, at);
        await fh.close();
        for (const g of gens) {
          await fs.rm(out, { force: true });
          const r = await gv(copy, ['restore', `${g.name}@${g.id}`, out]);
          if (r.code === 0) {
            if ((await sha256File(out)) === want.get(g.id)) identical++;
            else {
              wrong++;
              failures.push(`flip ${flip} (${name} byte ${at} bit ${bit}): ${g.name}@${g.id} restored WRONG bytes with exit 0`);
            }
          } else {
            errors++;
            // LevelDB 1.20 as classic-level ships it asserts on some corrupt table keys and
            // aborts the process (native-notes/leveldb.md, "Corrupt keys abort"): no bytes,
            // but LevelDB's line instead of ours. Counted and shown, not hidden.
            if (/deps\/leveldb\/.*Assertion .* failed/.test(r.stderr)) {
              aborts.push(`flip ${flip} (${name} byte ${at} bit ${bit}): ${g.name}@${g.id}`);
            } else if (/\n\s+at /.test(r.stderr) || !/^genvault: /m.test(r.stderr)) failures.push(`flip ${flip}: ${g.name}@${g.id}: not one clear line: ${r.stderr}`);
          }
        }
      }
      await fs.rm(copy, { recursive: true, force: true });
    };
    await Promise.all([lane(0), lane(1)]);
    console.log(`bit-flip campaign (seed ${seed}): ${identical} identical restores, ${errors} refused (${aborts.length} of them aborted by a LevelDB assertion), ${wrong} wrong`);
    if (aborts.length) console.log(`LevelDB assertion aborts:\n  ${aborts.join('\n  ')}`);
    expect(failures, `seed ${seed} (replay with GENVAULT_FLIP_SEED=${seed})`).toEqual([]);
    expect(wrong).toBe(0);
    expect(identical + errors).toBe(200);
  });

  it('a length changed inside a map leaf (the reproduced 524288 -> 524544) fails restore, cat and the mount read', async () => {
    await copyDir(pristine, path.join(repo, 'index'));
    // Change the leaf in place through LevelDB (no genvault process is running).
    const db = new ClassicLevel<Buffer, Buffer>(path.join(repo, 'index'), { keyEncoding: 'buffer', valueEncoding: 'buffer' });
    let changed = 0;
    for await (const [k, v] of db.iterator({ gte: Buffer.of(K_LEAF), lt: Buffer.of(K_LEAF + 1) })) {
      // find a zero entry (kind 0) of 512 KiB and make it 256 bytes longer
      for (let at = 8; at + 5 <= v.length; ) {
        const len = v.readUInt32LE(at);
        const kind = v[at + 4]!;
        if (kind === 0 && len === 524288) {
          v.writeUInt32LE(524544, at);
          await db.put(k, v);
          changed++;
          break;
        }
        at += 5 + (kind === 0 ? 0 : kind === 1 ? 32 : 64);
      }
      if (changed) break;
    }
    await db.close();
    expect(changed).toBe(1);
    let refused = 0;
    for (const g of gens) {
      const out = s.path('out.img');
      await fs.rm(out, { force: true });
      const r = await gv(repo, ['restore', `${g.name}@${g.id}`, out]);
      const c = await gv(repo, ['cat', `${g.name}@${g.id}`]);
      if (r.code === 0) expect(await sha256File(out)).toBe(want.get(g.id));
      else {
        refused++;
        expectOneLineError(r);
        expect(r.stderr).toMatch(/index damaged: map leaf [0-9a-f]{64} of .*does not match its digest/);
        expectOneLineError(c);
      }
    }
    expect(refused).toBeGreaterThan(0);
    // Through the mount: reading a damaged generation is EIO, never other bytes.
    const mnt = s.path('mnt');
    await fs.mkdir(mnt, { recursive: true });
    await gvOk(repo, ['mount', mnt]);
    s.onCleanup(() => gv(repo, ['umount', mnt]));
    try {
      let eio = 0;
      for (const g of gens) {
        const dir = path.join(mnt, g.name);
        const file = (await fs.readdir(dir)).find((n) => n.includes(g.id.slice(0, 8)))!;
        try {
          const data = await fs.readFile(path.join(dir, file));
          expect(sha(data)).toBe(want.get(g.id));
        } catch (e) {
          expect((e as NodeJS.ErrnoException).code).toBe('EIO');
          eio++;
        }
      }
      expect(eio).toBe(refused);
    } finally {
      await gvOk(repo, ['umount', mnt]);
    }
    expect(await isMounted(mnt)).toBe(false);
  });

  it('a record lost from the LevelDB log is reported by every command and by verify, and gc refuses', async () => {
    await copyDir(pristine, path.join(repo, 'index'));
    const packsBefore = new Set(await packFiles(repo));
    await fs.writeFile(s.path('vm.img'), image(11, 12));
    await gvOk(repo, ['backup', s.path('vm.img'), '--name', 'vm']);
    // The next tests start again from the pristine index: its packs must be the pristine
    // ones too (in format 4 this backup's pack describes a generation that index lacks).
    const dropNewPacks = async () => {
      for (const f of await packFiles(repo)) if (!packsBefore.has(f)) await fs.rm(f);
    };
    // The newest generation's commit is the last record of LevelDB's log until the next open.
    const logs = (await indexFiles(repo)).filter((f) => f.file.endsWith('.log'));
    expect(logs).toHaveLength(1);
    const fh = await fs.open(logs[0]!.file, 'r+');
    const b = Buffer.alloc(1);
    const at = logs[0]!.size - 100;
    await fh.read(b, 0, 1, at);
    b[0]! ^= 0x10;
    await fh.write(b, 0, 1, at);
    await fh.close();
    const list = await gv(repo, ['list', 'vm', '--json']);
    expect(list.code).toBe(0);
    expect(JSON.parse(list.stdout)).toHaveLength(2); // the third is gone from the index...
    expect(list.stderr).toMatch(/^genvault: warning: index damaged: LevelDB dropped or found corrupt records.*'genvault repair'/m); // ...and that is said
    const v = await gv(repo, ['verify', '--full', '--json']);
    expect(v.code).toBe(1);
    const report = JSON.parse(v.stdout);
    expect(report.ok).toBe(false);
    expect(report.indexProblems.join('\n')).toMatch(/dropping \d+ bytes; Corruption: checksum mismatch/);
    const human = await gv(repo, ['verify']);
    expect(human.stdout).toMatch(/^DAMAGED index: LevelDB dropped/m);
    expect(human.stdout).not.toMatch(/no damage found/);
    const g = await gv(repo, ['gc']);
    expectOneLineError(g);
    expect(g.stderr).toMatch(/gc removes nothing/);
    await dropNewPacks();
  });

  it('a generation record lost while its map remains: verify names it and gc refuses', async () => {
    await copyDir(pristine, path.join(repo, 'index'));
    const db = new ClassicLevel<Buffer, Buffer>(path.join(repo, 'index'), { keyEncoding: 'buffer', valueEncoding: 'buffer' });
    let lostKey: Buffer | null = null;
    for await (const k of db.keys({ gte: Buffer.of(K_GEN), lt: Buffer.of(K_GEN + 1) })) lostKey = k;
    await db.del(lostKey!);
    await db.close();
    const lostId = lostKey!.subarray(lostKey!.length - 8).toString('hex');
    const v = await gv(repo, ['verify', '--json']);
    expect(v.code).toBe(1);
    // Format 4: the packs still hold the record, so verify also says where to get it back.
    const lostGen = gens.find((x) => x.id === lostId)!;
    expect(JSON.parse(v.stdout).indexProblems).toEqual([
      `generation map ${lostId} has no generation record: the index lost that generation's record`,
      `index and packs disagree: generation ${lostGen.name}@${lostId} (${lostGen.created}) is in the packs but not in the index`,
    ]);
    const g = await gv(repo, ['gc']);
    expectOneLineError(g);
    expect(g.stderr).toContain(lostId);
  });

  it('a corrupt generation record is left out with a warning, named by verify, and gc refuses', async () => {
    await copyDir(pristine, path.join(repo, 'index'));
    const db = new ClassicLevel<Buffer, Buffer>(path.join(repo, 'index'), { keyEncoding: 'buffer', valueEncoding: 'buffer' });
    let k0: Buffer | null = null;
    let v0: Buffer | null = null;
    for await (const [k, v] of db.iterator({ gte: Buffer.of(K_GEN), lt: Buffer.of(K_GEN + 1), limit: 1 })) [k0, v0] = [k, v];
    const rec = JSON.parse(v0!.toString());
    rec.created = new Date(Date.parse(rec.created) + 1000).toISOString(); // valid JSON, wrong for its key
    await db.put(k0!, Buffer.from(JSON.stringify(rec)));
    await db.close();
    const list = await gv(repo, ['list', '--json']);
    expect(list.code).toBe(0);
    expect(JSON.parse(list.stdout)).toHaveLength(3);
    expect(list.stderr).toMatch(new RegExp(`warning: index damaged: the generation record of ${rec.name}@${rec.id} is corrupt \\(stored under another key\\)`));
    const v = await gv(repo, ['verify', '--json']);
    expect(v.code).toBe(1);
    expect(JSON.parse(v.stdout).damagedGenerations[0].problems).toEqual(['generation record is corrupt (stored under another key)']);
    expectOneLineError(await gv(repo, ['gc']));
  });

  describe('an index that is gone or cannot be opened', () => {
    const cases: Array<[string, (idx: string) => Promise<void>, RegExp]> = [
      ['index/ deleted', (idx) => fs.rm(idx, { recursive: true }), /the index directory is missing/],
      ['CURRENT names a missing manifest', (idx) => fs.writeFile(path.join(idx, 'CURRENT'), 'MANIFEST-000999\n'), /cannot open the index: IO error: .*MANIFEST-000999/],
      [
        'MANIFEST truncated',
        async (idx) => {
          const m = (await fs.readdir(idx)).find((n) => n.startsWith('MANIFEST-'))!;
          await fs.truncate(path.join(idx, m), 10);
        },
        /cannot open the index: Corruption/,
      ],
    ];
    for (const [what, damage, message] of cases) {
      it(`${what}: every command refuses in one line, nothing is created in its place`, async () => {
        await copyDir(pristine, path.join(repo, 'index'));
        await damage(path.join(repo, 'index'));
        // LevelDB's own info logs (LOG, LOG.old) rotate on every open attempt; its data files must not change
        const dataFiles = async () =>
          (await fs.readdir(path.join(repo, 'index')).catch(() => [] as string[]))
            .filter((n) => !n.startsWith('LOG'))
            .sort()
            .map(async (n) => `${n} ${(await fs.stat(path.join(repo, 'index', n))).size}`);
        const before = await Promise.all(await dataFiles());
        for (const args of [['list'], ['info', 'vm@latest'], ['restore', 'vm@latest', s.path('x.img')], ['verify'], ['backup', s.path('vm.img'), '--name', 'vm'], ['gc']]) {
          const r = await gv(repo, args);
          expectOneLineError(r);
          expect(r.stderr.trim()).toMatch(/^genvault: .*: index damaged: /);
          expect(r.stderr).toMatch(message);
          expect(r.stderr.trim()).toMatch(/; 'genvault repair' rebuilds the index from the packs$/);
        }
        const mnt = s.path('mnt-damaged');
        await fs.mkdir(mnt, { recursive: true });
        const m = await gv(repo, ['mount', mnt]);
        expectOneLineError(m);
        expect(await isMounted(mnt)).toBe(false);
        expect(await Promise.all(await dataFiles())).toEqual(before);
        await fs.access(s.path('x.img')).then(
          () => expect.fail('restore wrote a file'),
          () => undefined,
        );
      });
    }
  });

  it('a repository on read-only media: list, info, restore, cat, verify and mount work; writes refuse in one line', async () => {
    await copyDir(pristine, path.join(repo, 'index'));
    const ro = s.path('ro');
    await fs.mkdir(ro, { recursive: true });
    expect((await sh('mount', ['--bind', repo, ro])).code).toBe(0);
    s.onCleanup(() => sh('umount', ['-l', ro]));
    try {
      expect((await sh('mount', ['-o', 'remount,bind,ro', ro])).code).toBe(0);
      await expect(fs.writeFile(path.join(ro, 'probe'), 'x')).rejects.toMatchObject({ code: 'EROFS' });
      const g = gens[1]!;
      expect(JSON.parse(await gvOk(ro, ['list', '--json']))).toHaveLength(4);
      expect(JSON.parse(await gvOk(ro, ['info', `${g.name}@${g.id}`, '--json'])).id).toBe(g.id);
      const out = s.path('ro-out.img');
      await gvOk(ro, ['restore', `${g.name}@${g.id}`, out]);
      expect(await sha256File(out)).toBe(want.get(g.id));
      const c = await sh('sh', ['-c', `GENVAULT_NO_PROGRESS=1 node ${JSON.stringify(path.resolve('dist/cli/main.js'))} -r ${ro} cat ${g.name}@${g.id} | sha256sum`]);
      expect(c.stdout.split(' ')[0]).toBe(want.get(g.id));
      expect(JSON.parse(await gvOk(ro, ['verify', '--full', '--json'])).ok).toBe(true);
      const mnt = s.path('mnt-ro');
      await fs.mkdir(mnt, { recursive: true });
      await gvOk(ro, ['mount', mnt]);
      try {
        const file = (await fs.readdir(path.join(mnt, g.name))).find((n) => n.includes(g.id.slice(0, 8)))!;
        expect(sha(await fs.readFile(path.join(mnt, g.name, file)))).toBe(want.get(g.id));
      } finally {
        await gvOk(ro, ['umount', mnt]);
      }
      for (const args of [['backup', s.path('vm.img'), '--name', 'vm'], ['gc'], ['forget', `${g.name}@${g.id}`], ['protect', `${g.name}@${g.id}`]]) {
        const r = await gv(ro, args);
        expectOneLineError(r);
        expect(r.stderr).toMatch(/read-only media/);
      }
    } finally {
      await sh('umount', [ro]);
    }
    // nothing of the private index copies is left behind
    expect((await fs.readdir('/tmp')).filter((n) => n.startsWith('genvault-index-'))).toEqual([]);
  });
});

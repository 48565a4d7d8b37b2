/**
 * rbd: sources and targets (src/source/rbd.ts, rbd-target.ts) against a real single-node
 * Ceph cluster (test/ceph.ts), one for the whole file: a GPT+ext4 disk made here, imported
 * with `rbd import`, snapshot s1 backed up whole and restored byte-identical; known
 * changes written with `rbd import-diff` (a diff stream made here, so the changed bytes
 * are known exactly), which also makes snapshot s2; the backup of s2 reads only about the
 * changed bytes and restores byte-identical, into a file and into a new RBD image. Then the
 * failures: a missing snapshot, a bad pool, no rbd on PATH, a malformed stream from rbd,
 * and a base snapshot that is gone (a full read, said in one line).
 *
 * The disk is 4 GiB, sparse, as the issue asks: rbd import and export-diff skip what was
 * never written, so only the ext4 metadata and the files cost time; images are compared
 * by a digest of their data extents (contentDigest), not sha256 of every zero.
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Scratch, gv, makeDisk, oneLine, prng, sh, writeFiles } from './helpers.js';
import { cephUnavailable, rbdDiffStream, rbdPool, startCeph, type Ceph } from './ceph.js';
import { holeSeeker } from '../src/util/holes.js';
import { parseRbdSpec } from '../src/source/rbd-cli.js';
import { ConfigError, parseJobsText } from '../src/jobs/config.js';

const why = await cephUnavailable();
if (why) console.warn(`skipping rbd tests: ${why}`);

const DISK_MIB = 4096;
const DISK = DISK_MIB * 2 ** 20;
const BLOCK = 64 << 10;

/**
 * A digest of a file's content that does not depend on where its holes are: its size, and
 * each 64 KiB block that is not all zeros with its offset. Only the data extents are read
 * (SEEK_DATA), so a 4 GiB sparse image costs what it holds, where sha256 of every byte cost
 * seconds per image on this machine.
 */
async function contentDigest(file: string): Promise<string> {
  const fh = await fs.open(file, 'r');
  try {
    const size = (await fh.stat()).size;
    const h = createHash('sha256').update(`size ${size}\n`);
    const seek = holeSeeker();
    const buf = Buffer.alloc(BLOCK);
    const zero = Buffer.alloc(BLOCK);
    let at = 0;
    while (at < size) {
      const data = seek ? seek.seekData(fh.fd, at) : at;
      if (data < 0 || data >= size) break;
      const from = Math.floor(data / BLOCK) * BLOCK;
      const to = seek ? Math.min(size, Math.ceil(seek.seekHole(fh.fd, data) / BLOCK) * BLOCK) : size;
      for (let b = from; b < to; b += BLOCK) {
        const { bytesRead } = await fh.read(buf, 0, Math.min(BLOCK, size - b), b);
        const block = buf.subarray(0, bytesRead);
        if (!block.equals(zero.subarray(0, bytesRead))) h.update(`${b}\n`).update(block);
      }
      at = to;
    }
    return h.digest('hex');
  } finally {
    await fh.close();
  }
}

describe('rbd: specs and job files', () => {
  it('parses rbd: specs, refusing names rbd could take for options', () => {
    expect(parseRbdSpec('rbd:pool/img@s1')).toEqual({ pool: 'pool', namespace: null, image: 'img', snap: 's1' });
    expect(parseRbdSpec('rbd:pool/ns/img')).toEqual({ pool: 'pool', namespace: 'ns', image: 'img', snap: null });
    for (const bad of ['rbd:img', 'rbd:a/b/c/d', 'rbd:pool/-x@s', 'rbd:pool/img@-s', 'rbd:pool/im g', 'rbd:pool/img@']) expect(() => parseRbdSpec(bad), bad).toThrow(/expected rbd:POOL/);
  });

  it('checks a job\'s rbd: source and ceph:', () => {
    const problems = (text: string) => {
      try {
        parseJobsText(text, '/etc/genvault/j.yaml');
        return [];
      } catch (e) {
        return (e as ConfigError).problems.map((p) => `${p.line}: ${p.field}: ${p.message}`);
      }
    };
    const job = parseJobsText('jobs:\n  a:\n    source: rbd:p/i@s\n    ceph: { conf: ceph.conf, id: backup }\n', '/etc/genvault/j.yaml').jobs[0]!;
    expect(job.ceph).toEqual({ conf: '/etc/genvault/ceph.conf', id: 'backup' });
    expect(problems('jobs:\n  a:\n    source: rbd:p/i\n')).toEqual([expect.stringMatching(/^3: jobs\.a\.source: an rbd: job source needs @SNAP/)]);
    expect(problems('jobs:\n  a:\n    source: /x\n    ceph: { id: x }\n')).toEqual([expect.stringMatching(/^4: jobs\.a\.ceph: only for rbd: sources/)]);
    expect(problems('jobs:\n  a:\n    source: rbd:p/i@s\n    ceph: { user: x }\n')[0]).toMatch(/^4: jobs\.a\.ceph/);
  });
});

describe.skipIf(why !== null)('rbd: sources and targets', () => {
  let s: Scratch;
  let c: Ceph;
  let repo: string;
  let disk: string;
  let C: string[];

  /** The content digest of what `rbd export SPEC FILE` writes. */
  const exportDigest = async (spec: string): Promise<string> => {
    const out = s.path('export.img');
    await fs.rm(out, { force: true });
    await c.rbd(['export', '--no-progress', spec, out]);
    const h = await contentDigest(out);
    await fs.rm(out, { force: true });
    return h;
  };

  const backup = async (spec: string, extra: string[] = []) => gv(repo, ['backup', spec, '--name', 'vm', ...C, '--json', ...extra]);

  beforeAll(async () => {
    s = await Scratch.create('genvault-rbd-');
    c = await startCeph(s, 'ceph', { rgw: false });
    C = ['--ceph-conf', c.conf, '--ceph-id', 'admin'];
    await rbdPool(c);
    repo = s.path('repo');
    expect((await gv(repo, ['init'])).code).toBe(0);
    disk = s.path('disk.img');
    await makeDisk(s, disk, DISK_MIB, async (dir) => {
      await writeFiles(dir, 11, 40, 256 << 10);
    });
    await c.rbd(['import', '--no-progress', disk, 'rbd/vm']);
    await c.rbd(['snap', 'create', 'rbd/vm@s1']);
  });

  afterAll(async () => {
    await c?.stop();
    await s?.cleanup();
  });

  it('backs up a snapshot whole (its allocated extents) and restores it byte-identical', async () => {
    const r = await backup('rbd:rbd/vm@s1');
    expect(r.code, r.stderr).toBe(0);
    const g = JSON.parse(r.stdout);
    expect(g.size).toBe(DISK);
    expect(g.source).toMatch(/^rbd:rbd\/vm@s1 \(image [0-9a-f]+, snap \d+\)$/);
    expect(g.rbd.mode).toBe('full');
    expect(g.rbd.readBytes).toBeGreaterThan(0);
    expect(g.rbd.readBytes).toBeLessThan(g.size / 4); // sparse: never-written extents are not sent
    console.log(`full read of ${g.size} bytes: ${g.rbd.readBytes} read from rbd in ${g.stats.durationMs} ms`);
    const out = s.path('r1.img');
    expect((await gv(repo, ['restore', 'vm@latest', out])).code).toBe(0);
    expect(await contentDigest(out)).toBe(await contentDigest(disk));
    await fs.rm(out);
  });

  it('backs up the next snapshot reading only the changed extents', async () => {
    // Changes inside extents s1 has (a write into an object that does not exist yet makes
    // export-diff send the object up to the write): 8 x 512 KiB of new bytes, one 64 KiB zeroed.
    const allocated = JSON.parse(await c.rbd(['diff', '--format', 'json', 'rbd/vm@s1'])) as Array<{ offset: number; length: number; exists: string }>;
    const big = allocated.filter((x) => x.exists === 'true' && x.length >= 1 << 20 && x.offset >= 1 << 20);
    expect(big.length).toBeGreaterThanOrEqual(8);
    const recs = big.slice(0, 8).map((x, i) => ({ tag: 'w' as const, offset: x.offset, data: prng(500 + i, 512 << 10) }));
    const zero = { tag: 'z' as const, offset: big[8]?.offset ?? big[7]!.offset + (768 << 10), length: 64 << 10 };
    const changed = recs.reduce((n, x) => n + x.data.length, 0) + zero.length;
    const stream = rbdDiffStream([{ tag: 't', name: 's2' }, { tag: 's', size: DISK }, ...[...recs, zero].sort((a, b) => a.offset - b.offset), { tag: 'e' }]);
    await fs.writeFile(s.path('changes.diff'), stream);
    await c.rbd(['import-diff', '--no-progress', s.path('changes.diff'), 'rbd/vm']); // writes them and makes @s2
    const fh = await fs.open(disk, 'r+');
    for (const x of recs) await fh.write(x.data, 0, x.data.length, x.offset);
    await fh.write(Buffer.alloc(zero.length), 0, zero.length, zero.offset);
    await fh.close();

    const r = await backup('rbd:rbd/vm@s2');
    expect(r.code, r.stderr).toBe(0);
    const g = JSON.parse(r.stdout);
    expect(g.source).toMatch(/^rbd:rbd\/vm@s2 \(image [0-9a-f]+, snap \d+\) changes since @s1$/);
    expect(g.rbd.mode).toBe('export-diff');
    expect(g.rbd.fromSnap).toBe('s1');
    console.log(`changed ${changed} bytes; read from rbd ${g.rbd.readBytes} (changed extents ${g.rbd.changedBytes}, of them zeroed ${g.rbd.zeroedBytes}); ${g.rbd.parentBytes} from the parent; ${g.stats.durationMs} ms`);
    expect(g.rbd.readBytes).toBeLessThanOrEqual(2 * changed); // the bar
    const out = s.path('r2.img');
    expect((await gv(repo, ['restore', 'vm@latest', out])).code).toBe(0);
    expect(await contentDigest(out)).toBe(await contentDigest(disk));
    expect(await contentDigest(out)).toBe(await exportDigest('rbd/vm@s2'));
    expect(await exportDigest('rbd/vm@s1')).not.toBe(await exportDigest('rbd/vm@s2')); // the digest sees the changes
    await fs.rm(out);
  });

  it('restores into a new RBD image, refuses an existing one, replaces it with --force', async () => {
    const want = await contentDigest(disk);
    const r = await gv(repo, ['restore', 'vm@latest', 'rbd:rbd/back', ...C, '--json']);
    expect(r.code, r.stderr).toBe(0);
    console.log(`restore into rbd: ${JSON.parse(r.stdout).durationMs} ms`);
    expect(JSON.parse(r.stdout).target).toBe('rbd:rbd/back');
    expect(await exportDigest('rbd/back')).toBe(want);
    const du = JSON.parse(await c.rbd(['du', '--format', 'json', 'rbd/back'])) as { images: Array<{ used_size: number }> };
    expect(du.images[0]!.used_size).toBeLessThan((DISK) / 4); // zeros were not written
    const again = await gv(repo, ['restore', 'vm@0', 'rbd:rbd/back', ...C]);
    expect(again.code).not.toBe(0);
    expect(oneLine(again.stderr)).toMatch(/rbd:rbd\/back exists: .*--force/);
    const first = (JSON.parse((await gv(repo, ['list', 'vm', '--json'])).stdout) as Array<{ id: string }>)[0]!.id;
    const forced = await gv(repo, ['restore', `vm@${first}`, 'rbd:rbd/back', ...C, '--force']);
    expect(forced.code, forced.stderr).toBe(0);
    expect(await exportDigest('rbd/back')).toBe(await exportDigest('rbd/vm@s1'));
    expect(await c.rbd(['ls', 'rbd'])).not.toMatch(/genvault-restore/); // no temporary image left
    const n = async (dest: string, re: RegExp, extra: string[] = [], env?: NodeJS.ProcessEnv) => {
      const x = await gv(repo, ['restore', 'vm@latest', dest, ...C, ...extra], { env });
      expect(x.code).not.toBe(0);
      expect(oneLine(x.stderr)).toMatch(re);
    };
    await n('rbd:rbd/vm', /rbd:rbd\/vm has 2 snapshot\(s\); genvault does not remove snapshots/, ['--force']);
    await n('rbd:nopool/x', /error opening pool 'nopool'/);
    await n('rbd:rbd/x@s', /a restore writes an image, not a snapshot/);
    await n('rbd:rbd/x', /rbd not found/, [], { PATH: '/nonexistent' });
    expect(await c.rbd(['ls', 'rbd'])).not.toMatch(/genvault-restore/);
  });

  it('refuses a source without a snapshot, a missing snapshot, a bad pool, no rbd, and --verify-hints, each in one line', async () => {
    const n = async (args: string[], re: RegExp, env?: NodeJS.ProcessEnv) => {
      const r = await gv(repo, ['backup', ...args, '--name', 'vm', ...C], { env });
      expect(r.code).not.toBe(0);
      expect(oneLine(r.stderr)).toMatch(re);
    };
    await n(['rbd:rbd/vm'], /no snapshot.*rbd snap create rbd\/vm@NAME/);
    await n(['rbd:rbd/vm@nope'], /rbd:rbd\/vm@nope: no such snapshot/);
    await n(['rbd:nopool/vm@s1'], /error opening pool 'nopool'/);
    await n(['rbd:rbd/vm@s1'], /rbd not found/, { PATH: '/nonexistent' });
    await n(['rbd:rbd/vm@s2', '--verify-hints', '5'], /--verify-hints is not offered for rbd/);
    const gens = JSON.parse((await gv(repo, ['list', 'vm', '--json'])).stdout) as unknown[];
    expect(gens).toHaveLength(2);
  });

  it('fails on a malformed stream from rbd, committing nothing', async () => {
    // An rbd that answers export-diff with an extent past the image's end.
    const bin = s.path('fake-bin');
    await fs.mkdir(bin, { recursive: true });
    const bad = rbdDiffStream([{ tag: 'f', name: 's2' }, { tag: 't', name: 's2' }, { tag: 's', size: DISK }, { tag: 'z', offset: DISK, length: 4096 }, { tag: 'e' }]);
    await fs.writeFile(path.join(bin, 'bad.diff'), bad);
    await fs.writeFile(path.join(bin, 'rbd'), `#!/bin/sh\ncase " $* " in *" export-diff "*) cat ${path.join(bin, 'bad.diff')}; exit 0;; esac\nexec /usr/bin/rbd "$@"\n`, { mode: 0o755 });
    const r = await gv(repo, ['backup', 'rbd:rbd/vm@s2', '--name', 'vm', ...C], { env: { PATH: `${bin}:${process.env.PATH}` } });
    expect(r.code).not.toBe(0);
    expect(oneLine(r.stderr)).toMatch(/malformed rbd diff stream .*beyond the image size \d+; nothing was committed/);
    const gens = JSON.parse((await gv(repo, ['list', 'vm', '--json'])).stdout) as unknown[];
    expect(gens).toHaveLength(2);
    // An rbd that starts a bad stream and then hangs: stopped, waited for, one line.
    await fs.writeFile(path.join(bin, 'rbd'), `#!/bin/sh\ncase " $* " in *" export-diff "*) printf 'rbd diff v9\\n'; exec sleep 987;; esac\nexec /usr/bin/rbd "$@"\n`, { mode: 0o755 });
    const t0 = Date.now();
    const hung = await gv(repo, ['backup', 'rbd:rbd/vm@s2', '--name', 'vm', ...C], { env: { PATH: `${bin}:${process.env.PATH}` } });
    expect(hung.code).not.toBe(0);
    expect(oneLine(hung.stderr)).toMatch(/malformed rbd diff stream at byte 12: banner "rbd diff v9\\n"/);
    expect(Date.now() - t0).toBeLessThan(30_000);
    expect((await sh('pgrep', ['-f', 'sleep 987'])).stdout.trim()).toBe('');
  });

  it('reads the whole snapshot when the base snapshot is gone, and says so', async () => {
    await c.rbd(['snap', 'create', 'rbd/vm@s3']);
    await c.rbd(['snap', 'rm', '--no-progress', 'rbd/vm@s2']);
    const r = await backup('rbd:rbd/vm@s3');
    expect(r.code, r.stderr).toBe(0);
    expect(oneLine(r.stderr)).toMatch(/reading the whole snapshot: the snapshot s2 .* no longer exists/);
    const g = JSON.parse(r.stdout);
    expect(g.rbd.mode).toBe('full');
    const out = s.path('r3.img');
    expect((await gv(repo, ['restore', 'vm@latest', out])).code).toBe(0);
    expect(await contentDigest(out)).toBe(await contentDigest(disk));
  });

  it('a job backs up rbd: with hooks that make the next snapshot and rotate them, keeping the base', async () => {
    // The recipe of README.md, "RBD sources": the job reads @genvault-next, made by the
    // pre-hook; after a good backup the post-hook drops the old base and renames the new one
    // to @genvault (genvault finds its base by snapshot id, so the rename is fine).
    const img = 'rbd/vm';
    const jobs = s.path('jobs.yaml');
    await fs.writeFile(jobs, [
      `repository: ${repo}`,
      'jobs:',
      '  vm:',
      `    source: rbd:${img}@genvault-next`,
      `    ceph: { conf: ${c.conf}, id: admin }`,
      '    hooks:',
      `      pre: ["rbd snap rm --no-progress ${img}@genvault-next 2>/dev/null; rbd snap create ${img}@genvault-next"]`,
      `      post: ['[ "$GENVAULT_RESULT" = ok ] || exit 0; rbd snap rm --no-progress ${img}@genvault 2>/dev/null; rbd snap rename ${img}@genvault-next ${img}@genvault']`,
      '',
    ].join('\n'));
    const env = { CEPH_CONF: c.conf }; // what the hooks' rbd reads
    for (let i = 0; i < 2; i++) {
      const r = await gv(null, ['run', '--all', '--config', jobs], { env });
      expect(r.code, r.stderr + r.stdout).toBe(0);
    }
    const gens = JSON.parse((await gv(repo, ['list', 'vm', '--json'])).stdout) as Array<{ source: string }>;
    // The first run's base was @s3 (the latest generation before), the second's the first run's snapshot.
    expect(gens.at(-2)!.source).toMatch(/^rbd:rbd\/vm@genvault-next \(image \w+, snap \d+\) changes since @s3$/);
    expect(gens.at(-1)!.source).toMatch(/^rbd:rbd\/vm@genvault-next \(image \w+, snap \d+\) changes since @genvault$/);
    const snaps = (JSON.parse(await c.rbd(['snap', 'ls', '--format', 'json', img])) as Array<{ name: string }>).map((x) => x.name);
    expect(snaps).toContain('genvault');
    expect(snaps).not.toContain('genvault-next');
    const out = s.path('r4.img');
    expect((await gv(repo, ['restore', 'vm@latest', out])).code).toBe(0);
    expect(await contentDigest(out)).toBe(await exportDigest(`${img}@genvault`));
  });

  it('--rbd-live reads the image itself, recorded as live', async () => {
    const r = await gv(repo, ['backup', 'rbd:rbd/back', '--rbd-live', '--name', 'live', ...C, '--json']);
    expect(r.code, r.stderr).toBe(0);
    const g = JSON.parse(r.stdout);
    expect(g.source).toMatch(/^rbd:rbd\/back \(image \w+, live\)$/);
    const out = s.path('r5.img');
    expect((await gv(repo, ['restore', 'live@latest', out])).code).toBe(0);
    expect(await contentDigest(out)).toBe(await exportDigest('rbd/back'));
    const both = await gv(repo, ['backup', 'rbd:rbd/back@x', '--rbd-live', '--name', 'live', ...C]);
    expect(oneLine(both.stderr)).toMatch(/--rbd-live reads the image itself: name no @SNAP/);
  });

  it('reads the whole snapshot for a resized image, another image\'s generation, and --full', async () => {
    const full = async (args: string[], line: RegExp | null) => {
      const r = await gv(repo, ['backup', ...args, ...C, '--json']);
      expect(r.code, r.stderr).toBe(0);
      if (line) expect(oneLine(r.stderr)).toMatch(line);
      else expect(r.stderr).toBe('');
      expect(JSON.parse(r.stdout).rbd.mode).toBe('full');
    };
    await c.rbd(['snap', 'create', 'rbd/back@a']);
    await full(['rbd:rbd/back@a', '--name', 'sized'], /reading the whole snapshot: sized has no generation yet/);
    await c.rbd(['resize', '--no-progress', '--size', `${DISK_MIB + 4}M`, 'rbd/back']);
    await c.rbd(['snap', 'create', 'rbd/back@b']);
    await full(['rbd:rbd/back@b', '--name', 'sized'], /reading the whole snapshot: the image is \d+ bytes, sized@\w+ was \d+/);
    await full(['rbd:rbd/back@b', '--name', 'sized', '--full'], null);
    await full(['rbd:rbd/back@b', '--name', 'vm'], /reading the whole snapshot: vm@\w+ was not read from a snapshot of rbd:rbd\/back/);
  });
});

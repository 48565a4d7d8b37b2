/**
 * Encrypted repositories (format 7: sealed packs and a sealed index) end to end, with the
 * built CLI as real processes:
 * every command round-trips byte-identical (backup, list, info, restore, cat, mount with
 * dd and a loop-mounted ext4, verify --full, forget, protect, prune, gc, repair, upgrade);
 * dedup still works; neither the packs nor the index hold the disk's text, its file names,
 * the SHA-256 or BLAKE3 of any chunk, nor the image's name, source path, tags, job names or
 * hook output; generation records swapped between their keys are damage; without the key
 * status and verify show counts, sizes and times and say names need it; a flipped byte, payloads swapped between packs and
 * a record replayed from another repository with the same passphrase are damage, never
 * other bytes; a wrong passphrase is one line, exit 1, and writes nothing; key slots
 * (add, remove, passwd, export, import; a truncated slot); key files readable by group or
 * others are refused.
 */
import { execFile, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';
import { blake3 } from '@napi-rs/blake-hash';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { scanPack } from '../src/format/scan.js';
import { RECORD_HEADER_SIZE } from '../src/format/pack.js';
import { ClassicLevel } from 'classic-level';
import { Repository } from '../src/repository/repository.js';
import { startSshd } from './sshd.js';
import { Scratch, dataPackFiles, flipByte, gv, isMounted, makeDisk, must, oneLine, packFiles, prng, sh, sha256File, withMountedDisk, writeFiles, type Run } from './helpers.js';

const exec = promisify(execFile);
let s: Scratch;
let repo: string;
let pw: string;
const disks: Record<string, string> = {};
const KNOWN_TEXT = `genvault-known-text-${process.pid}-the-admin-password-is-hunter2 `;
const KNOWN_NAME = `payroll-secret-${process.pid}.xlsx`;

/** genvault with the repository's password file in the environment. */
function eg(r: string | null, args: string[], env: NodeJS.ProcessEnv = {}): Promise<Run> {
  return gv(r, args, { env: { GENVAULT_PASSWORD_FILE: pw, ...env } });
}

async function egOk(r: string, args: string[], env: NodeJS.ProcessEnv = {}): Promise<string> {
  const x = await eg(r, args, env);
  if (x.code !== 0) throw new Error(`genvault ${args.join(' ')} failed (${x.code}): ${x.stderr.trim()}`);
  return x.stdout;
}

async function secretFile(name: string, content: string, mode = 0o600): Promise<string> {
  const f = s.path(name);
  await fs.writeFile(f, content, { mode });
  await fs.chmod(f, mode);
  return f;
}

/** Every file under dir with its size and mtime: "nothing written" is this unchanged. */
async function tree(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const e of await fs.readdir(dir, { recursive: true, withFileTypes: true })) {
    const p = path.join(e.parentPath, e.name);
    const st = await fs.lstat(p);
    out.push(`${path.relative(dir, p)} ${st.isFile() ? st.size : 'd'} ${st.mtimeMs}`);
  }
  return out.sort();
}

beforeAll(async () => {
  s = await Scratch.create();
  repo = s.path('repo');
  pw = await secretFile('pw', 'correct horse battery staple\n');
  disks.gen0 = s.path('vm-0.img');
  disks.gen1 = s.path('vm-1.img');
  await makeDisk(s, disks.gen0, 48, async (dir) => {
    await fs.mkdir(path.join(dir, 'etc'));
    await fs.writeFile(path.join(dir, 'etc', KNOWN_NAME), KNOWN_TEXT.repeat(3000));
    await writeFiles(dir, 11, 40, 300_000);
  });
  await must('cp', ['--sparse=always', disks.gen0, disks.gen1]);
  await withMountedDisk(s, disks.gen1, async (dir) => {
    await fs.writeFile(path.join(dir, 'etc', 'motd'), 'changed the next day\n');
    await writeFiles(path.join(dir, 'new'), 12, 4, 100_000);
  });
  expect(await egOk(repo, ['init', '--encryption', 'aes-256-gcm'])).toMatch(/encrypted/);
  await egOk(repo, ['backup', disks.gen0, '--name', 'vm']);
});

afterAll(async () => {
  await s?.cleanup();
});

describe('an encrypted repository', () => {
  it('is format 7 with a key slot, and a wrong passphrase is one line, exit 1, nothing written', async () => {
    const cfg = JSON.parse(await fs.readFile(path.join(repo, 'config.json'), 'utf8'));
    expect(cfg.version).toBe(7);
    expect(cfg.encryption).toMatchObject({ cipher: 'aes-256-gcm', identity: 'hmac-sha256' });
    const slots = await fs.readdir(path.join(repo, 'keys'));
    expect(slots).toHaveLength(1);
    expect((await fs.stat(path.join(repo, 'keys', slots[0]!))).mode & 0o777).toBe(0o600);
    const bad = await secretFile('bad-pw', 'Correct horse battery staple\n');
    const before = await tree(repo);
    for (const args of [['list'], ['backup', disks.gen1, '--name', 'vm'], ['gc'], ['forget', 'vm@0', '--force-young'], ['restore', 'vm@0', s.path('nope')], ['key', 'add'], ['repair', '--write']]) {
      const r = await eg(repo, args, { GENVAULT_PASSWORD_FILE: bad });
      expect(r.code, args.join(' ')).toBe(1);
      expect(oneLine(r.stderr)).toMatch(/wrong passphrase or key/);
    }
    const viaFlag = await gv(repo, ['--key-file', bad, 'list'], { env: { GENVAULT_PASSWORD_FILE: '' } });
    expect(viaFlag.code).toBe(1);
    expect(oneLine(viaFlag.stderr)).toMatch(/wrong passphrase or key/);
    const none = await gv(repo, ['list'], { env: { GENVAULT_PASSWORD_FILE: '' } });
    expect(none.code).toBe(1);
    expect(oneLine(none.stderr)).toMatch(/encrypted: give --key-file FILE or GENVAULT_PASSWORD_FILE/);
    expect(await tree(repo)).toEqual(before);
    await expect(fs.stat(s.path('nope'))).rejects.toThrow(/ENOENT/);
  });

  it('refuses key files readable by group or others, in one line', async () => {
    for (const mode of [0o640, 0o604, 0o644]) {
      const f = await secretFile(`loose-${mode.toString(8)}`, 'correct horse battery staple\n', mode);
      const r = await gv(repo, ['list'], { env: { GENVAULT_PASSWORD_FILE: f } });
      expect(r.code).toBe(1);
      expect(oneLine(r.stderr)).toMatch(/readable by (group|others).*refusing/);
      const k = await gv(repo, ['--key-file', f, 'list']);
      expect(k.code).toBe(1);
      expect(oneLine(k.stderr)).toMatch(/readable by (group|others).*refusing/);
    }
    const r = await gv(s.path('never'), ['init', '--encryption', 'aes-256-gcm'], { env: { GENVAULT_PASSWORD_FILE: s.path(`loose-${(0o644).toString(8)}`) } });
    expect(r.code).toBe(1);
    await expect(fs.stat(s.path('never'))).rejects.toThrow(/ENOENT/);
  });

  it('backs up again storing only the changes, and restores and cats every generation byte-identical', async () => {
    const second = JSON.parse(await egOk(repo, ['backup', disks.gen1, '--name', 'vm', '--json']));
    expect(second.stats.newBytes).toBeLessThan(4 << 20); // of a 48 MiB disk with ~12 MiB of files
    expect(second.stats.newBytes).toBeGreaterThan(0);
    const list = JSON.parse(await egOk(repo, ['list', 'vm', '--json']));
    expect(list).toHaveLength(2);
    expect(JSON.parse(await egOk(repo, ['info', 'vm@latest', '--json'])).id).toBe(list[1].id);
    for (const [rev, src] of [['vm@1', disks.gen0], ['vm@0', disks.gen1]] as const) {
      const out = s.path(`restored-${rev}`);
      await egOk(repo, ['restore', rev, out]);
      expect(await sha256File(out)).toBe(await sha256File(src!));
      await fs.rm(out);
    }
    const cat = await exec('sh', ['-c', `GENVAULT_PASSWORD_FILE=${pw} node ${path.resolve('dist/cli/main.js')} -r ${repo} cat vm@0 | sha256sum`]);
    expect(cat.stdout.split(' ')[0]).toBe(await sha256File(disks.gen1));
  });

  it('holds neither the text, the file names, nor any chunk\'s SHA-256 or BLAKE3, nor image, source, tag, job names or hook output, in packs or index', async () => {
    // A job backs up a source with a distinctive path under a distinctive image name and
    // tag, and its run (with a hook's output) goes into the job history.
    const secretDir = s.path(`confidential-dir-${process.pid}`);
    await fs.mkdir(secretDir);
    const secretSource = path.join(secretDir, `confidential-source-${process.pid}.img`);
    await fs.writeFile(secretSource, prng(77, 1 << 20));
    const names = {
      image: `confidential-image-${process.pid}`,
      tag: `confidential-tag-${process.pid}`,
      job: `confidential-job-${process.pid}`,
      hook: `confidential-hook-output-${process.pid}`,
    };
    const jobsFile = s.path('confidential-jobs.yaml');
    await fs.writeFile(
      jobsFile,
      `repository: ${repo}\nkey-file: ${pw}\njobs:\n  ${names.job}:\n    source: ${secretSource}\n    image: ${names.image}\n    tags: [${names.tag}]\n    hooks:\n      pre: ["echo ${names.hook}"]\n`,
      { mode: 0o600 },
    );
    const ran = await gv(null, ['run', '--config', jobsFile, '--all'], { env: { GENVAULT_PASSWORD_FILE: '' } });
    expect(ran.code, ran.stderr).toBe(0);
    const listed = JSON.parse(await egOk(repo, ['list', names.image, '--json']));
    expect(listed).toMatchObject([{ name: names.image, tags: [names.tag], source: expect.stringContaining(secretSource) }]);
    process.env.GENVAULT_PASSWORD_FILE = pw;
    const digests: Buffer[] = [];
    const r = await Repository.open(repo);
    const dump: Buffer[] = [];
    try {
      const img = await fs.readFile(disks.gen0);
      const map = await r.chunkMap((await r.generations('vm'))[0]!);
      let pos = 0;
      for (let i = 0; i < map.refs.length; i++) {
        const leaf = await map.leaf(i);
        for (let j = 0; j < leaf.lengths.length; j++) {
          const chunk = img.subarray(pos, pos + leaf.lengths[j]!);
          if (!leaf.zero[j]) digests.push(createHash('sha256').update(chunk).digest(), blake3(chunk));
          pos += leaf.lengths[j]!;
        }
      }
      for await (const [k, v] of r.db.iterator()) dump.push(Buffer.from(k), Buffer.from(v));
    } finally {
      await r.close();
      delete process.env.GENVAULT_PASSWORD_FILE;
    }
    expect(digests.length).toBeGreaterThan(40);
    const files = [...(await packFiles(repo))];
    for (const f of await fs.readdir(path.join(repo, 'index'))) files.push(path.join(repo, 'index', f));
    const blobs = [Buffer.concat(dump), ...(await Promise.all(files.map((f) => fs.readFile(f))))];
    expect(Buffer.concat(dump).length).toBeGreaterThan(0);
    for (const b of blobs) {
      expect(b.includes(KNOWN_TEXT.slice(0, 40))).toBe(false);
      expect(b.includes(KNOWN_NAME)).toBe(false);
      for (const [what, secret] of Object.entries({ ...names, source: secretSource, sourceFile: path.basename(secretSource), dir: path.basename(secretDir), disk: path.basename(disks.gen0!) })) {
        expect(b.includes(secret), `${what} ${secret}`).toBe(false);
      }
      for (const d of digests) {
        expect(b.includes(d)).toBe(false);
        expect(b.includes(d.toString('hex'))).toBe(false);
      }
    }
    // The same image in an unencrypted repository does show them (the test can see a leak).
    const plain = s.path('plain');
    await gv(plain, ['init']);
    await gv(plain, ['backup', disks.gen0, '--name', 'vm']);
    const packs = Buffer.concat(await Promise.all((await packFiles(plain)).map((f) => fs.readFile(f))));
    expect(packs.includes(KNOWN_NAME)).toBe(true);
    const p = await Repository.open(plain);
    const plainDump: Buffer[] = [];
    try {
      for await (const [k, v] of p.db.iterator()) plainDump.push(Buffer.from(k), Buffer.from(v));
    } finally {
      await p.close();
    }
    expect(Buffer.concat(plainDump).includes(path.basename(disks.gen0!))).toBe(true);
  });

  it('mounts: dd of each generation is byte-identical, and a loop device mounts its ext4', async () => {
    const mnt = s.path('mnt');
    await fs.mkdir(mnt);
    s.onCleanup(async () => {
      if (await isMounted(mnt)) await sh('fusermount', ['-uz', mnt]);
    });
    await egOk(repo, ['mount', mnt]);
    try {
      const files = (await fs.readdir(path.join(mnt, 'vm'))).filter((f) => f.endsWith('.img')).sort();
      expect(files).toHaveLength(2);
      for (const [f, src] of [[files[0]!, disks.gen0], [files[1]!, disks.gen1]] as const) {
        const out = s.path('dd.out');
        await exec('dd', [`if=${path.join(mnt, 'vm', f)}`, `of=${out}`, 'bs=4M', 'status=none']);
        expect(await sha256File(out)).toBe(await sha256File(src!));
        await fs.rm(out);
      }
      const dev = await s.loopAttach(path.join(mnt, 'vm', files[0]!), true);
      const fsdir = s.path('loop-fs');
      await s.mount(await s.partition(dev), fsdir, 'ro');
      expect((await fs.readFile(path.join(fsdir, 'etc', KNOWN_NAME), 'utf8')).startsWith(KNOWN_TEXT)).toBe(true);
      await must('umount', [fsdir]);
      await must('losetup', ['-d', dev]);
    } finally {
      await gv(null, ['umount', mnt]);
    }
  });

  it('verify --full, protect, prune, forget, gc, upgrade and repair --write keep every generation byte-identical', async () => {
    expect(await egOk(repo, ['verify', '--full'])).toMatch(/no damage found/);
    await egOk(repo, ['backup', disks.gen0, '--name', 'vm', '--tag', 'keep']);
    await egOk(repo, ['protect', 'vm@2']);
    await egOk(repo, ['prune', '--keep-last', '1', '--keep-tag', 'keep', '--min-age', '0']);
    await egOk(repo, ['forget', 'vm@0', '--force-young']); // the tagged copy of gen0
    const list = JSON.parse(await egOk(repo, ['list', 'vm', '--json']));
    expect(list.map((g: { protected?: boolean }) => g.protected === true)).toEqual([true]);
    await egOk(repo, ['gc']);
    await egOk(repo, ['upgrade']);
    const before = await egOk(repo, ['list', '--json']);
    await fs.rm(path.join(repo, 'index'), { recursive: true });
    const rebuilt = await egOk(repo, ['repair', '--write']);
    // every pack read from its (authenticated) tables of contents
    const [, packs, viaToc] = /scanned (\d+) pack\(s\) \((\d+) from their tables of contents\)/.exec(rebuilt)!;
    expect(viaToc).toBe(packs);
    expect(await egOk(repo, ['list', '--json'])).toBe(before);
    expect(await egOk(repo, ['verify', '--full'])).toMatch(/no damage found/);
    const out = s.path('after-repair');
    await egOk(repo, ['restore', 'vm@latest', out]);
    expect(await sha256File(out)).toBe(await sha256File(disks.gen0));
    await fs.rm(out);
  });
});

/** The chunk records of a repository's data packs: file, offset, stored length. */
async function chunkRecords(r: string): Promise<Array<{ file: string; offset: number; stored: number }>> {
  const out = [];
  for (const f of await dataPackFiles(r)) {
    const buf = await fs.readFile(f);
    const it = scanPack(async (b, o, l, at) => buf.copy(b, o, at, Math.min(buf.length, at + l)), buf.length, path.basename(f, '.pack'));
    for await (const item of it) if (item.kind === 'chunk') out.push({ file: f, offset: item.offset, stored: item.header.storedLength });
  }
  return out;
}

describe('tampering is damage, never other bytes', () => {
  const small: Record<string, string> = {};
  let a: string;
  let b: string;
  beforeAll(async () => {
    // 16 KiB of random bytes: one raw chunk each, records of the same length.
    for (const n of ['x', 'y', 'z']) {
      small[n] = s.path(`${n}.img`);
      await fs.writeFile(small[n]!, prng(n.charCodeAt(0), 16384));
    }
    a = s.path('repo-a');
    b = s.path('repo-b'); // the same passphrase
    await egOk(a, ['init', '--encryption', 'aes-256-gcm']);
    await egOk(b, ['init', '--encryption', 'aes-256-gcm']);
    await egOk(a, ['backup', small.x!, '--name', 'x']);
    await egOk(a, ['backup', small.y!, '--name', 'y']);
    await egOk(b, ['backup', small.z!, '--name', 'z']);
  });

  async function expectDamage(r: string, name: string): Promise<void> {
    const res = await eg(r, ['restore', `${name}@latest`, s.path(`t-${name}`)]);
    expect(res.code, res.stderr).toBe(1);
    expect(oneLine(res.stderr)).toMatch(/damage/i);
    await expect(fs.stat(s.path(`t-${name}`))).rejects.toThrow(/ENOENT/);
    const v = await eg(r, ['verify', '--full']);
    expect(v.code).toBe(1);
    expect(v.stdout + v.stderr).toMatch(/does not authenticate/);
  }

  async function restoresOk(r: string, name: string, src: string): Promise<void> {
    const out = s.path(`ok-${name}`);
    await egOk(r, ['restore', `${name}@latest`, out]);
    expect(await sha256File(out)).toBe(await sha256File(src));
    await fs.rm(out);
  }

  it('verify --without-key checks structure without the key: a damaged record header is found', async () => {
    const noKey = { GENVAULT_PASSWORD_FILE: '' };
    const ok = await gv(a, ['verify', '--without-key'], { env: noKey });
    expect(ok.code, ok.stderr).toBe(0);
    expect(ok.stdout).toMatch(/verified without the key/);
    expect(ok.stdout + ok.stderr).toMatch(/image names, sources and tags are sealed in this repository: they need its key/);
    expect(ok.stdout + ok.stderr).toMatch(/checked 2 generation\(s\) of 2 image\(s\)/);
    expect((await gv(a, ['verify', '--without-key', '--full'], { env: noKey })).code).toBe(2);
    const [rec] = await chunkRecords(a);
    await flipByte(rec!.file, rec!.offset + 10, 0x01); // the stored length, under the header's CRC
    try {
      const bad = await gv(a, ['verify', '--without-key'], { env: noKey });
      expect(bad.code).toBe(1);
      expect(bad.stdout + bad.stderr).toMatch(/record header/);
    } finally {
      await flipByte(rec!.file, rec!.offset + 10, 0x01);
    }
  });

  it('generation records swapped between their keys are damage, never a wrong listing', async () => {
    const swap = async () => {
      const db = new ClassicLevel<Buffer, Buffer>(path.join(a, 'index'), { keyEncoding: 'buffer', valueEncoding: 'buffer' });
      try {
        const gs: Array<[Buffer, Buffer]> = [];
        for await (const [k, v] of db.iterator({ gte: Buffer.of(0x67), lt: Buffer.of(0x68) })) gs.push([k, v]);
        expect(gs).toHaveLength(2);
        await db.batch([
          { type: 'put', key: gs[0]![0], value: gs[1]![1] },
          { type: 'put', key: gs[1]![0], value: gs[0]![1] },
        ]);
      } finally {
        await db.close();
      }
    };
    await swap();
    try {
      const l = await eg(a, ['list', '--json']);
      expect(JSON.parse(l.stdout)).toEqual([]);
      expect(l.stderr).toMatch(/generation record of .* is corrupt \(sealed value does not authenticate/);
      const r = await eg(a, ['restore', 'x@latest', s.path('swapped')]);
      expect(r.code).toBe(1);
      await expect(fs.stat(s.path('swapped'))).rejects.toThrow(/ENOENT/);
      const v = await eg(a, ['verify']);
      expect(v.code).toBe(1);
      expect(v.stdout + v.stderr).toMatch(/does not authenticate/);
    } finally {
      await swap();
    }
    await restoresOk(a, 'x', small.x!);
    await restoresOk(a, 'y', small.y!);
  });

  it('a flipped ciphertext byte', async () => {
    const [rec] = await chunkRecords(a);
    const at = rec!.offset + RECORD_HEADER_SIZE + 100;
    await flipByte(rec!.file, at, 0x01);
    try {
      const x = await eg(a, ['restore', 'x@latest', s.path('fx')]);
      const y = await eg(a, ['restore', 'y@latest', s.path('fy')]);
      expect([x.code, y.code].sort()).toEqual([0, 1]);
      expect(oneLine((x.code ? x : y).stderr)).toMatch(/damage/i);
    } finally {
      await flipByte(rec!.file, at, 0x01);
    }
    await restoresOk(a, 'x', small.x!);
    await restoresOk(a, 'y', small.y!);
  });

  it('the mount returns EIO for a record that does not authenticate, and logs it', async () => {
    const recs = await chunkRecords(a);
    const mnt = s.path('mnt-a');
    await fs.mkdir(mnt);
    s.onCleanup(async () => {
      if (await isMounted(mnt)) await sh('fusermount', ['-uz', mnt]);
    });
    const at = recs[0]!.offset + RECORD_HEADER_SIZE + 5000;
    await flipByte(recs[0]!.file, at, 0x80);
    const log = s.path('mount-a.log');
    try {
      await egOk(a, ['mount', mnt, '--log', log]);
      const results: string[] = [];
      for (const n of ['x', 'y']) {
        try {
          const got = await fs.readFile(path.join(mnt, n, 'latest'));
          results.push(got.equals(await fs.readFile(small[n]!)) ? `${n}: ok` : `${n}: WRONG BYTES`);
        } catch (e) {
          results.push(`${n}: ${(e as NodeJS.ErrnoException).code}`);
        }
      }
      expect(results.sort()).toEqual(expect.arrayContaining([expect.stringMatching(/: EIO$/), expect.stringMatching(/: ok$/)]));
      expect(await fs.readFile(log, 'utf8')).toMatch(/EIO reading [xy]@[0-9a-f]+ at offset \d+: .*does not authenticate/);
    } finally {
      await gv(null, ['umount', mnt]);
      await flipByte(recs[0]!.file, at, 0x80);
    }
  });

  it('two sealed payloads swapped between packs, headers kept', async () => {
    const recs = await chunkRecords(a);
    expect(recs).toHaveLength(2);
    expect(recs[0]!.file).not.toBe(recs[1]!.file);
    expect(recs[0]!.stored).toBe(recs[1]!.stored);
    const read = async (r: (typeof recs)[0]) => {
      const fh = await fs.open(r.file, 'r');
      const buf = Buffer.alloc(r.stored);
      await fh.read(buf, 0, r.stored, r.offset + RECORD_HEADER_SIZE);
      await fh.close();
      return buf;
    };
    const write = async (r: (typeof recs)[0], buf: Buffer) => {
      const fh = await fs.open(r.file, 'r+');
      await fh.write(buf, 0, buf.length, r.offset + RECORD_HEADER_SIZE);
      await fh.close();
    };
    const [p0, p1] = [await read(recs[0]!), await read(recs[1]!)];
    await write(recs[0]!, p1);
    await write(recs[1]!, p0);
    await expectDamage(a, 'x');
    await expectDamage(a, 'y');
    await write(recs[0]!, p0);
    await write(recs[1]!, p1);
    await restoresOk(a, 'x', small.x!);
  });

  it('a record replayed from another repository with the same passphrase', async () => {
    const [mine] = await chunkRecords(a);
    const [theirs] = await chunkRecords(b);
    expect(theirs!.stored).toBe(mine!.stored);
    const whole = RECORD_HEADER_SIZE + mine!.stored;
    const src = (await fs.readFile(theirs!.file)).subarray(theirs!.offset + RECORD_HEADER_SIZE, theirs!.offset + whole);
    const fh = await fs.open(mine!.file, 'r+');
    const saved = Buffer.alloc(mine!.stored);
    await fh.read(saved, 0, saved.length, mine!.offset + RECORD_HEADER_SIZE);
    await fh.write(src, 0, src.length, mine!.offset + RECORD_HEADER_SIZE);
    await fh.close();
    const x = await eg(a, ['restore', 'x@latest', s.path('rx')]);
    const y = await eg(a, ['restore', 'y@latest', s.path('ry')]);
    expect([x.code, y.code].sort()).toEqual([0, 1]);
    const fh2 = await fs.open(mine!.file, 'r+');
    await fh2.write(saved, 0, saved.length, mine!.offset + RECORD_HEADER_SIZE);
    await fh2.close();
  });
});

describe('key slots', () => {
  let k: string;
  beforeAll(async () => {
    k = s.path('repo-keys');
    await egOk(k, ['init', '--encryption', 'aes-256-gcm']);
    await fs.writeFile(s.path('k.img'), prng(5, 1 << 20));
    await egOk(k, ['backup', s.path('k.img'), '--name', 'k']);
  });
  const restoreWith = async (env: NodeJS.ProcessEnv) => {
    const out = s.path('k.out');
    await fs.rm(out, { force: true });
    const r = await eg(k, ['restore', 'k@latest', out], env);
    if (r.code === 0) expect(await sha256File(out)).toBe(await sha256File(s.path('k.img')));
    return r;
  };

  it('add a second passphrase, remove the first, restore with the second; the last slot stays', async () => {
    const second = await secretFile('pw2', 'second passphrase\n');
    const [first] = JSON.parse(await egOk(k, ['key', 'list', '--json']));
    expect(first).toMatchObject({ kind: 'password', current: true });
    await egOk(k, ['key', 'add', '--new-password-file', second]);
    const both = JSON.parse(await egOk(k, ['key', 'list', '--json'], { GENVAULT_PASSWORD_FILE: second }));
    expect(both).toHaveLength(2);
    expect(both.find((x: { current: boolean }) => x.current).id).not.toBe(first.id);
    await egOk(k, ['key', 'remove', first.id], { GENVAULT_PASSWORD_FILE: second });
    expect((await restoreWith({})).code).toBe(1);
    expect((await restoreWith({ GENVAULT_PASSWORD_FILE: second })).code).toBe(0);
    const [only] = JSON.parse(await egOk(k, ['key', 'list', '--json'], { GENVAULT_PASSWORD_FILE: second }));
    const last = await eg(k, ['key', 'remove', only.id], { GENVAULT_PASSWORD_FILE: second });
    expect(last.code).toBe(1);
    expect(oneLine(last.stderr)).toMatch(/last one/);
    // passwd: the second passphrase replaced by the first again
    await egOk(k, ['key', 'passwd', '--new-password-file', pw], { GENVAULT_PASSWORD_FILE: second });
    expect((await restoreWith({ GENVAULT_PASSWORD_FILE: second })).code).toBe(1);
    expect((await restoreWith({})).code).toBe(0);
  });

  it('export, wipe every slot, import, restore; a truncated slot is reported, never taken', async () => {
    const exported = await egOk(k, ['key', 'export']);
    expect(exported).toMatch(/^key 1: [0-9a-f]{4} /m);
    const slotFiles = await fs.readdir(path.join(k, 'keys'));
    const slot = path.join(k, 'keys', slotFiles[0]!);
    const text = await fs.readFile(slot);
    await fs.writeFile(slot, text.subarray(0, text.length / 2));
    const torn = await eg(k, ['list']);
    expect(torn.code).toBe(1);
    expect(torn.stderr).toMatch(/damaged key slot/);
    for (const f of await fs.readdir(path.join(k, 'keys'))) await fs.rm(path.join(k, 'keys', f));
    expect((await restoreWith({})).code).toBe(1);
    const paper = s.path('paper.txt');
    await fs.writeFile(paper, exported.replace(/^(key 2: )(.*)$/m, (_l, h: string, g: string) => h + g.toUpperCase()));
    const wrong = s.path('paper-typo.txt');
    await fs.writeFile(wrong, exported.replace(/^(key 3: )(.)/m, (_l, h: string, c: string) => h + (c === '0' ? '1' : '0')));
    const typo = await eg(k, ['key', 'import', wrong, '--new-password-file', pw]);
    expect(typo.code).toBe(1);
    expect(oneLine(typo.stderr)).toMatch(/check/);
    await egOk(k, ['key', 'import', paper, '--new-password-file', pw]);
    expect((await restoreWith({})).code).toBe(0);
  });

  it('an unencrypted repository has no keys and works as before', async () => {
    const p = s.path('repo-plain');
    await gv(p, ['init', '--encryption', 'none']);
    expect(JSON.parse(await fs.readFile(path.join(p, 'config.json'), 'utf8')).version).toBe(5);
    const r = await gv(p, ['key', 'list']);
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/not encrypted/);
  });
});

describe('sources and gc on an encrypted repository', () => {
  it('backs up an ssh:// source (auto: cat; agent refused), restoring byte-identical', async () => {
    const sshd = await startSshd(s);
    try {
      const r = s.path('repo-ssh');
      await egOk(r, ['init', '--encryption', 'aes-256-gcm']);
      const args = ['-i', sshd.userKey, '--known-hosts', sshd.knownHosts];
      const agent = await eg(r, ['backup', sshd.url(disks.gen0!), '--name', 'remote', '--ssh-mode', 'agent', ...args], { SSH_AUTH_SOCK: '' });
      expect(agent.code).toBe(2);
      expect(agent.stderr).toMatch(/cannot hash chunks for an encrypted repository/);
      await egOk(r, ['backup', sshd.url(disks.gen0!), '--name', 'remote', ...args], { SSH_AUTH_SOCK: '' });
      const second = JSON.parse(await egOk(r, ['backup', sshd.url(disks.gen1!), '--name', 'remote', '--json', ...args], { SSH_AUTH_SOCK: '' }));
      expect(second.stats.newBytes).toBeLessThan(4 << 20);
      const out = s.path('remote.out');
      await egOk(r, ['restore', 'remote@latest', out]);
      expect(await sha256File(out)).toBe(await sha256File(disks.gen1!));
      await fs.rm(out);
      // and back to an ssh:// target, by the python writer and by cat
      for (const mode of ['agent', 'plain']) {
        await egOk(r, ['restore', 'remote@1', sshd.url(out), '--ssh-mode', mode, ...args], { SSH_AUTH_SOCK: '' });
        expect(await sha256File(out)).toBe(await sha256File(disks.gen0!));
        await fs.rm(out);
      }
    } finally {
      await sshd.stop();
    }
  });

  it('gc copies sealed records unchanged into a new pack, and they still open', async () => {
    const r = s.path('repo-gc');
    await egOk(r, ['init', '--encryption', 'aes-256-gcm']);
    const shared = prng(21, 1 << 20);
    const both = s.path('both.img');
    const one = s.path('one.img');
    await fs.writeFile(both, Buffer.concat([shared, prng(22, 3 << 20)]));
    await fs.writeFile(one, shared);
    await egOk(r, ['backup', both, '--name', 'both']);
    await egOk(r, ['backup', one, '--name', 'one']);
    const before = await chunkRecords(r);
    await egOk(r, ['forget', 'both@latest', '--force-young']);
    const gc = JSON.parse(await egOk(r, ['gc', '--json']));
    expect(gc.packsRepacked).toBe(1);
    const after = await chunkRecords(r);
    expect(after.length).toBeLessThan(before.length);
    expect(new Set(after.map((c) => c.file))).not.toEqual(new Set(before.map((c) => c.file)));
    expect(await egOk(r, ['verify', '--full'])).toMatch(/no damage found/);
    const out = s.path('one.out');
    await egOk(r, ['restore', 'one@latest', out]);
    expect(await sha256File(out)).toBe(await sha256File(one));
  });
});

describe('jobs on an encrypted repository', () => {
  it('a job file\'s key-file opens the repository for run; status needs no key', async () => {
    const r = s.path('repo-jobs');
    await egOk(r, ['init', '--encryption', 'aes-256-gcm']);
    const img = s.path('job.img');
    await fs.writeFile(img, prng(31, 2 << 20));
    const key = await secretFile('job.key', 'correct horse battery staple\n');
    const f = s.path('jobs.yaml');
    await fs.writeFile(f, `repository: ${r}\nkey-file: ${key}\njobs:\n  j:\n    source: ${img}\n`, { mode: 0o600 });
    const noEnv = { GENVAULT_PASSWORD_FILE: '' };
    await fs.chmod(key, 0o640);
    const loose = await gv(null, ['run', '--check', '--config', f], { env: noEnv });
    expect(loose.code).toBe(1);
    expect(loose.stderr).toMatch(/key-file: .*job\.key: readable by group/);
    await fs.chmod(key, 0o600);
    expect((await gv(null, ['run', '--check', '--config', f], { env: noEnv })).code).toBe(0);
    const run = await gv(null, ['run', '--config', f, '--all'], { env: noEnv });
    expect(run.code, run.stderr).toBe(0);
    expect(run.stdout).toMatch(/^j: ok: generation/);
    const st = await gv(null, ['status', '--config', f], { env: noEnv });
    expect(st.stdout, st.stderr).toMatch(/^OK/);
    expect(st.stdout).toMatch(/^j +OK/m);
    // Without the key: counts, sizes and times, and one line saying names need it.
    const sealed = await gv(r, ['status'], { env: noEnv });
    expect(sealed.code, sealed.stderr).toBe(0);
    expect(sealed.stdout).toMatch(/^OK: 0 jobs ok, 1 image/);
    expect(sealed.stdout).toMatch(/\[image [0-9a-f]{16}\] +1 +/);
    expect(sealed.stdout).toMatch(/names, sources and tags are sealed in this repository: they need its key/);
    expect(sealed.stdout).not.toMatch(/\bj\b/);
    await fs.writeFile(key, 'another passphrase\n');
    const wrong = await gv(null, ['run', '--config', f, '--all'], { env: noEnv });
    expect(wrong.code).toBe(1);
    expect(wrong.stdout + wrong.stderr).toMatch(/wrong passphrase or key/);
    const out = s.path('job.out');
    await egOk(r, ['restore', 'j@latest', out]);
    expect(await sha256File(out)).toBe(await sha256File(img));
  });
});

describe('the passphrase prompt', () => {
  /**
   * Run genvault without a password file on a terminal (util-linux script(1) makes the pty)
   * and type `lines`, each once the next prompt ("...: ") has shown; the terminal stays open
   * until the command has ended.
   */
  async function onTerminal(args: string, lines: string[]): Promise<{ code: number; out: string }> {
    const cmd = `env -u GENVAULT_PASSWORD_FILE ${process.execPath} ${path.resolve('dist/cli/main.js')} ${args}; echo "rc=$?"`;
    const child = spawn('script', ['-qec', cmd, '/dev/null'], { stdio: ['pipe', 'pipe', 'inherit'] });
    let out = '';
    let typed = 0;
    child.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      const prompts = out.match(/(?:passphrase for [^\n]*|again): /g)?.length ?? 0;
      while (typed < Math.min(prompts, lines.length)) child.stdin!.write(`${lines[typed++]}\r`);
      if (/rc=\d+/.test(out)) child.stdin!.end();
    });
    const timer = setTimeout(() => child.kill('SIGKILL'), 60_000);
    await new Promise((resolve) => child.on('close', resolve));
    clearTimeout(timer);
    const m = /rc=(\d+)/.exec(out);
    return { code: m ? Number(m[1]) : -1, out };
  }

  it('asks twice at init, without echo; a wrong or mismatched passphrase makes or opens nothing', async () => {
    const r = s.path('repo-tty');
    const made = await onTerminal(`-r ${r} init`, ['typed secret', 'typed secret']);
    expect(made.code, made.out).toBe(0);
    expect(made.out).toMatch(/passphrase for the new repository .*again: .*key slot from the terminal/s);
    expect(made.out).not.toMatch(/typed secret/);
    const wrong = await onTerminal(`-r ${r} list`, ['typed secreT']);
    expect(wrong.code).toBe(1);
    expect(wrong.out).toMatch(/wrong passphrase or key \(from the terminal\)/);
    const right = await onTerminal(`-r ${r} list`, ['typed secret']);
    expect(right.code, right.out).toBe(0);
    const differ = await onTerminal(`-r ${s.path('repo-tty2')} init`, ['one', 'two']);
    expect(differ.code).toBe(1);
    expect(differ.out).toMatch(/the passphrases differ/);
    await expect(fs.stat(s.path('repo-tty2'))).rejects.toThrow(/ENOENT/);
  });

  it('mount asks in the foreground and its background server reads with that key', async () => {
    const r = s.path('repo-tty');
    const img = s.path('tty.img');
    await fs.writeFile(img, prng(41, 3 << 20));
    await egOk(r, ['backup', img, '--name', 't'], { GENVAULT_PASSWORD_FILE: await secretFile('tty-pw', 'typed secret\n') });
    const mnt = s.path('mnt-tty');
    await fs.mkdir(mnt);
    s.onCleanup(async () => {
      if (await isMounted(mnt)) await sh('fusermount', ['-uz', mnt]);
    });
    const m = await onTerminal(`-r ${r} mount ${mnt}`, ['typed secret']);
    expect(m.code, m.out).toBe(0);
    try {
      expect(await sha256File(path.join(mnt, 't', 'latest'))).toBe(await sha256File(img));
    } finally {
      await gv(null, ['umount', mnt]);
    }
  });
});

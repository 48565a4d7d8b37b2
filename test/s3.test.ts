/**
 * s3:// repositories against a real radosgw (test/ceph.ts): every command on a bucket,
 * byte-identical restores, the mount, the index cache lost and rebuilt, two hosts (two
 * cache directories) writing into one bucket and a third collecting garbage, the locks
 * between them, and a backup killed mid-upload. Last, the test cluster itself: it serves
 * RBD beside radosgw, runs its four daemons, and its stop leaves none running.
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CliProcess, Scratch, gv, isMounted, oneLine, prng, sh, sha256File, writeImage } from './helpers.js';
import { cephUnavailable, rbdPool, startCeph, type Ceph } from './ceph.js';

const why = await cephUnavailable();
if (why) console.warn(`skipping s3:// tests: ${why}`);

let s: Scratch;
let ceph: Ceph;
/** The environment of a "host": its own cache directory, the cluster's credentials. */
let hostEnv: (host: string) => NodeJS.ProcessEnv;

beforeAll(async () => {
  if (why) return;
  s = await Scratch.create('genvault-s3-');
  ceph = await startCeph(s, 'ceph');
  hostEnv = (host) => ({
    AWS_ACCESS_KEY_ID: ceph.s3!.accessKey,
    AWS_SECRET_ACCESS_KEY: ceph.s3!.secretKey,
    AWS_ENDPOINT_URL: ceph.s3!.endpoint,
    AWS_CONFIG_FILE: '/nonexistent',
    AWS_SHARED_CREDENTIALS_FILE: '/nonexistent',
    GENVAULT_CACHE_DIR: s.path(`cache-${host}`),
  });
});
afterAll(async () => {
  await s?.cleanup();
});

const on = (host: string, repo: string, args: string[]) => gv(repo, args, { env: hostEnv(host) });
async function ok(host: string, repo: string, args: string[]): Promise<string> {
  const r = await on(host, repo, args);
  if (r.code !== 0) throw new Error(`genvault ${args.join(' ')} on ${host} failed (${r.code}): ${r.stderr.trim()}`);
  return r.stdout;
}

/** An image with data, repeats and a hole: `mib` MiB, deterministic per seed. */
async function image(name: string, seed: number, mib: number): Promise<string> {
  const file = s.path(name);
  const parts: Buffer[] = [];
  for (let i = 0; i < mib; i++) parts.push(i % 5 === 4 ? Buffer.alloc(1 << 20) : i % 3 === 2 ? prng(seed, 1 << 20) : prng(seed * 1000 + i, 1 << 20));
  await writeImage(file, parts);
  return file;
}

/** The multipart uploads not finished in a bucket (the S3 client of the store itself). */
async function uploadsIn(bucket: string): Promise<string[]> {
  const { resolveS3Spec } = await import('../src/store/s3-location.js');
  const { S3Store } = await import('../src/store/s3.js');
  const { listUploads } = await import('../src/store/s3-api.js');
  const st = new S3Store(await resolveS3Spec(`s3://${bucket}`, {}, { env: hostEnv('probe'), home: '/nonexistent' }));
  const out: string[] = [];
  for await (const u of listUploads(st.client, '')) out.push(u.key);
  await st.close();
  return out;
}

/** A host's cache directory of a bucket (one per bucket in these tests). */
async function cacheOf(host: string, bucket: string): Promise<string> {
  const base = path.join(s.path(`cache-${host}`), 's3');
  const d = (await fs.readdir(base)).find((f) => f.startsWith(`${bucket}-`));
  return path.join(base, d!);
}

async function restoredHash(host: string, repo: string, target: string): Promise<string> {
  const out = s.path(`restored-${host}-${target.replace(/[^a-z0-9]/gi, '_')}.img`);
  await fs.rm(out, { force: true });
  await ok(host, repo, ['restore', target, out]);
  return sha256File(out);
}

describe.skipIf(why !== null)('s3:// repositories on radosgw', () => {
  it('init, backup, list, restore, cat, verify, forget and gc, with packs written whole', async () => {
    const repo = 's3://gv-one/repo';
    expect(await ok('a', repo, ['init', '--encryption', 'none'])).toMatch(/s3:\/\/gv-one\/repo/);
    const again = await on('a', repo, ['init', '--encryption', 'none']);
    expect(again.code).not.toBe(0);
    expect(oneLine(again.stderr)).toMatch(/already exists/);
    const img = await image('one.img', 1, 40);
    await ok('a', repo, ['backup', img, '-n', 'vm1']);
    const img2 = s.path('one-b.img');
    const b = await fs.readFile(img);
    prng(99, 3 << 20).copy(b, 7 << 20);
    await fs.writeFile(img2, b);
    await ok('a', repo, ['backup', img2, '-n', 'vm1']);
    const list = JSON.parse(await ok('a', repo, ['list', '--json'])) as Array<{ name: string }>;
    expect(list.filter((g) => g.name === 'vm1')).toHaveLength(2);
    expect(await restoredHash('a', repo, 'vm1@1')).toBe(await sha256File(img));
    expect(await restoredHash('a', repo, 'vm1')).toBe(await sha256File(img2));
    const cat = await sh('sh', ['-c', `"${process.execPath}" dist/cli/main.js -r ${repo} cat vm1 | sha256sum`], { env: hostEnv('a') });
    expect(cat.stdout.split(' ')[0]).toBe(await sha256File(img2));
    expect((await on('a', repo, ['verify', '--full'])).code).toBe(0);
    await ok('a', repo, ['forget', 'vm1@1', '--force-young']);
    // Packs written within the grace period (1 hour by radosgw's clock) are kept whole.
    const kept = JSON.parse(await ok('a', repo, ['gc', '--json'])) as { bytesFreed: number; packsTooYoung: number };
    expect(kept.packsTooYoung).toBeGreaterThan(0);
    expect(kept.bytesFreed).toBe(0);
    const gc = JSON.parse(await ok('a', repo, ['gc', '--grace', '0', '--json'])) as { bytesFreed: number; packsTooYoung: number };
    expect(gc.packsTooYoung).toBe(0);
    expect(gc.bytesFreed).toBeGreaterThan(0);
    expect(await restoredHash('a', repo, 'vm1')).toBe(await sha256File(img2));
    expect((await on('a', repo, ['verify', '--full'])).code).toBe(0);
  });

  it('gc that finds a damaged record while copying a pack gives the new object up whole: no upload or object left', async () => {
    const repo = 's3://gv-damage/repo';
    await ok('a', repo, ['init', '--encryption', 'none']);
    // One pack: 8 MiB that only the first image has, then 64 MiB (~40 MiB stored) that both have.
    const shared = await image('dmg-shared.img', 7, 64);
    const first = s.path('dmg-first.img');
    await fs.writeFile(first, Buffer.concat([prng(71, 8 << 20), await fs.readFile(shared)]));
    await ok('a', repo, ['backup', first, '-n', 'vm1']);
    await ok('a', repo, ['backup', shared, '-n', 'vm2']);
    await ok('a', repo, ['forget', 'vm1', '--force-young']);
    const { resolveS3Spec } = await import('../src/store/s3-location.js');
    const { S3Store } = await import('../src/store/s3.js');
    const st = new S3Store(await resolveS3Spec(repo, {}, { env: hostEnv('probe'), home: '/nonexistent' }));
    try {
      const packs = async () => {
        const out: Array<{ name: string; size: number }> = [];
        for await (const o of st.list('packs')) out.push(o);
        return out.sort((x, y) => y.size - x.size);
      };
      const before = await packs();
      // 512 KiB zeroed far into the biggest pack (record headers among them): more than the
      // 16 MiB after which an upload goes up part by part has been copied when gc gets there.
      const big = before[0]!;
      expect(big.size).toBeGreaterThan(40 << 20);
      const body = await st.get(big.name);
      body.fill(0, Math.floor(big.size * 0.8), Math.floor(big.size * 0.8) + (512 << 10));
      await st.put(big.name, body);
      const gc = JSON.parse(await ok('a', repo, ['gc', '--grace', '0', '--repack-threshold', '100', '--json'])) as { warnings: string[]; packsWritten: number };
      expect(gc.warnings.join('\n')).toMatch(/is damaged; pack left in place/);
      expect(gc.packsWritten).toBe(0);
      expect(await uploadsIn('gv-damage')).toEqual([]);
      // No new object; the damaged pack stays (gc may drop others that only vm1 needed).
      const after = (await packs()).map((p) => p.name);
      expect(after).toContain(big.name);
      expect(after.filter((n) => !before.some((p) => p.name === n))).toEqual([]);
      expect((await on('a', repo, ['verify', '--full'])).code).not.toBe(0);
    } finally {
      await st.close();
    }
  });

  it('a lost index cache is rebuilt from the bucket; a wrong key or bucket is one line', async () => {
    const repo = 's3://gv-two/p/q';
    await ok('a', repo, ['init', '--encryption', 'none']);
    const img = await image('two.img', 2, 24);
    await ok('a', repo, ['backup', img, '-n', 'vm2']);
    await fs.rm(s.path('cache-a'), { recursive: true, force: true });
    expect(await restoredHash('a', repo, 'vm2')).toBe(await sha256File(img));
    const bad = await gv(repo, ['list'], { env: { ...hostEnv('c'), AWS_SECRET_ACCESS_KEY: 'wrong' } });
    expect(bad.code).not.toBe(0);
    expect(oneLine(bad.stderr)).toMatch(/credentials|refused|denied/i);
    const none = await on('c', 's3://gv-absent/x', ['list']);
    expect(none.code).not.toBe(0);
    expect(oneLine(none.stderr)).toMatch(/gv-absent/);
  });

  it('two hosts back up into one bucket at once, a third collects garbage, and all restore', async () => {
    const repo = 's3://gv-shared/r';
    await ok('a', repo, ['init', '--encryption', 'none']);
    const ia = await image('host-a.img', 3, 32);
    const ib = await image('host-b.img', 4, 32);
    const [ra, rb] = await Promise.all([on('a', repo, ['backup', ia, '-n', 'vma']), on('b', repo, ['backup', ib, '-n', 'vmb'])]);
    expect([ra.code, rb.code], ra.stderr + rb.stderr).toEqual([0, 0]);
    await ok('b', repo, ['backup', ib, '-n', 'vmb']);
    await ok('c', repo, ['forget', 'vmb@1', '--force-young']);
    await ok('c', repo, ['gc', '--grace', '0']);
    expect(await restoredHash('a', repo, 'vma')).toBe(await sha256File(ia));
    expect(await restoredHash('a', repo, 'vmb')).toBe(await sha256File(ib));
    expect(await restoredHash('b', repo, 'vma')).toBe(await sha256File(ia));
    expect((await on('b', repo, ['verify', '--full'])).code).toBe(0);
  });

  it('gc is refused while a mount elsewhere holds the repository; dd and a read of the mount are byte-identical', async () => {
    const repo = 's3://gv-mount/r';
    await ok('a', repo, ['init', '--encryption', 'none']);
    const img = await image('mnt.img', 5, 24);
    await ok('a', repo, ['backup', img, '-n', 'vm5']);
    const mnt = s.path('mnt');
    await fs.mkdir(mnt);
    s.onCleanup(async () => {
      if (await isMounted(mnt)) await sh('fusermount', ['-uz', mnt]);
    });
    await ok('a', repo, ['mount', mnt]);
    try {
      const copy = s.path('mnt-copy.img');
      await sh('dd', [`if=${path.join(mnt, 'vm5', 'latest')}`, `of=${copy}`, 'bs=4M']);
      expect(await sha256File(copy)).toBe(await sha256File(img));
      const gc = await on('b', repo, ['gc']);
      expect(gc.code).not.toBe(0);
      expect(oneLine(gc.stderr)).toMatch(/repository in use: genvault mount/);
    } finally {
      await gv(null, ['umount', mnt]);
    }
    expect((await on('b', repo, ['gc'])).code).toBe(0);
  });

  it('backups killed at random moments leave nothing half-visible; gc aborts their uploads, verify is clean', async () => {
    const repo = 's3://gv-kill/r';
    await ok('a', repo, ['init', '--encryption', 'none']);
    const img = await image('kill.img', 6, 96);
    const want = await sha256File(img);
    for (const ms of [300 + Math.floor(Math.random() * 700), 1000 + Math.floor(Math.random() * 1500), 2500 + Math.floor(Math.random() * 2000)]) {
      const p = new CliProcess(['-r', repo, 'backup', img, '-n', 'vm6'], hostEnv('a'));
      await new Promise((r) => setTimeout(r, ms));
      p.kill('SIGKILL');
      await p.exited;
      // Either no generation, or one that is whole.
      const list = JSON.parse(await ok('a', repo, ['list', '--json'])) as unknown[];
      if (list.length) expect(await restoredHash('a', repo, 'vm6')).toBe(want);
      for (const id of (list as Array<{ id: string }>).map((g) => g.id)) await ok('a', repo, ['forget', `vm6@${id}`, '--force-young']);
    }
    const gc = JSON.parse(await ok('a', repo, ['gc', '--grace', '0', '--json'])) as { uploadsAborted: number; spoolsRemoved: number };
    expect(gc.uploadsAborted).toBeGreaterThanOrEqual(0);
    expect(await uploadsIn('gv-kill')).toEqual([]);
    expect((await fs.readdir(path.join(await cacheOf('a', 'gv-kill'), 'tmp'))).filter((f) => f.startsWith('s3-spool-'))).toEqual([]);
    expect((await on('a', repo, ['verify', '--full'])).code).toBe(0);
    await ok('a', repo, ['backup', img, '-n', 'vm6']);
    expect(await restoredHash('a', repo, 'vm6')).toBe(want);
  });

  it('an encrypted repository keeps its key slots in the bucket: a new cache opens it with the passphrase', async () => {
    const repo = 's3://gv-crypt/r';
    const pw = s.path('pw');
    await fs.writeFile(pw, 'correct horse battery staple\n', { mode: 0o600 });
    const env = (h: string) => ({ ...hostEnv(h), GENVAULT_PASSWORD_FILE: pw });
    const run = (h: string, args: string[]) => gv(repo, args, { env: env(h) });
    expect((await run('a', ['init', '--encryption', 'aes-256-gcm'])).code).toBe(0);
    const img = await image('crypt.img', 7, 16);
    expect((await run('a', ['backup', img, '-n', 'vm7'])).code).toBe(0);
    const out = s.path('crypt-restored.img');
    const r = await run('d', ['restore', 'vm7', out]);
    expect(r.code, r.stderr).toBe(0);
    expect(await sha256File(out)).toBe(await sha256File(img));
    const wrong = await gv(repo, ['list'], { env: { ...hostEnv('e'), GENVAULT_PASSWORD_FILE: s.path('one.img') } });
    expect(wrong.code).not.toBe(0);
  });

  it('sync copies local -> s3:// -> local, byte-identical, and a job runs against an s3:// repository', async () => {
    const local = s.path('sync-local');
    const back = s.path('sync-back');
    const bucket = 's3://gv-sync/copy';
    await ok('a', local, ['init']);
    const img = await image('sync.img', 8, 24);
    await ok('a', local, ['backup', img, '-n', 'vm8']);
    await ok('a', bucket, ['init', '--like', local]);
    const first = JSON.parse(await ok('a', local, ['sync', local, bucket, '--json'])) as { copied: unknown[] };
    expect(first.copied).toHaveLength(1);
    await ok('a', back, ['init', '--like', local]);
    await ok('b', back, ['sync', bucket, back]);
    expect(await restoredHash('a', back, 'vm8')).toBe(await sha256File(img));
    // A second sync after a next-day backup sends about what the backup stored.
    const b = await fs.readFile(img);
    prng(123, 1 << 20).copy(b, 5 << 20);
    await fs.writeFile(img, b);
    const day2 = JSON.parse(await ok('a', local, ['backup', img, '-n', 'vm8', '--json'])) as { stats: { newStored: number } };
    const second = JSON.parse(await ok('a', local, ['sync', local, bucket, '--json'])) as { storedAdded: number };
    expect(second.storedAdded).toBeLessThanOrEqual(day2.stats.newStored * 1.1 + 65536);
    expect(await restoredHash('b', bucket, 'vm8')).toBe(await sha256File(img));
    // A job file naming the bucket as its repository, with a sync to a second bucket.
    await ok('a', 's3://gv-sync/job-copy', ['init', '--like', local]);
    const jobs = s.path('jobs.yaml');
    await fs.writeFile(jobs, `repository: ${bucket}\njobs:\n  vm8:\n    source: ${img}\n  offsite:\n    sync: { to: s3://gv-sync/job-copy }\n`);
    const run = await gv(null, ['run', '--config', jobs, '--all', '--json'], { env: hostEnv('a') });
    expect(run.code, run.stderr).toBe(0);
    expect(await restoredHash('c', 's3://gv-sync/job-copy', 'vm8')).toBe(await sha256File(img));
  });

  // Last: it stops the cluster the tests above share.
  it('the test cluster (ceph.ts) serves rbd beside radosgw, runs four daemons, and its stop leaves none', async () => {
    await rbdPool(ceph);
    await ceph.rbd(['create', '--size', '16M', 'rbd/x']);
    expect(await ceph.rbd(['ls', 'rbd'])).toContain('x');
    expect((await fetch(ceph.s3!.endpoint)).status).toBe(200);
    const pidFiles = (await fs.readdir(path.join(ceph.dir, 'run'))).filter((f) => f.endsWith('.pid'));
    expect(pidFiles.length).toBe(4); // mon, mgr, osd, radosgw
    await ceph.stop();
    expect((await sh('pgrep', ['-f', ceph.conf])).stdout.trim()).toBe('');
  });
});

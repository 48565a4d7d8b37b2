/**
 * One repository, many processes: backups, listings and restores while a mount serves
 * reads; the process holding the LevelDB lock killed mid-operation; two backups of one image.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CLI, Scratch, gv, gvOk, isMounted, prng, sh, sha256File, waitGone } from './helpers.js';

let s: Scratch;
let repo: string;
let mnt: string;
let imgA: string;
let imgB: string;

function startBackupFromPipe(name: string, extra: string[] = []) {
  const child = spawn(process.execPath, [CLI, '-r', repo, 'backup', '-', '--name', name, '--json', ...extra], {
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  let out = '';
  let err = '';
  child.stdout.on('data', (d) => (out += d));
  child.stderr.on('data', (d) => (err += d));
  child.stdin.on('error', () => undefined);
  const done = new Promise<{ code: number; out: string; err: string }>((resolve) =>
    child.on('close', (code) => resolve({ code: code ?? -1, out, err })),
  );
  return { child, done };
}

beforeAll(async () => {
  s = await Scratch.create();
  repo = s.path('repo');
  mnt = s.path('mnt');
  await fs.mkdir(mnt);
  s.onCleanup(async () => {
    await gv(null, ['umount', mnt]);
    if (await isMounted(mnt)) await sh('fusermount', ['-uz', mnt]);
  });
  imgA = s.path('a.img');
  imgB = s.path('b.img');
  await fs.writeFile(imgA, Buffer.concat([prng(1, 48 << 20), Buffer.alloc(16 << 20), Buffer.alloc(32 << 20, 'abc')]));
  await fs.writeFile(imgB, prng(2, 40 << 20));
  await gvOk(repo, ['init']);
  await gvOk(repo, ['backup', imgA, '--name', 'a']);
  // The mount starts first, so it holds the LevelDB lock and serves the others.
  const r = await gv(repo, ['mount', mnt]);
  expect(r.code, r.stderr).toBe(0);
});

afterAll(async () => {
  await s?.cleanup();
});

describe('while mounted', () => {
  it('dd through the mount, a backup of another image, list and restore all run at once', async () => {
    const ddOut = s.path('dd.out');
    const restoreOut = s.path('restore.out');
    const [dd, backup, list, restore] = await Promise.all([
      sh('dd', [`if=${path.join(mnt, 'a', 'latest')}`, `of=${ddOut}`, 'bs=4M', 'status=none']),
      gv(repo, ['backup', imgB, '--name', 'b', '--json']),
      gv(repo, ['list', '--json']),
      gv(repo, ['restore', 'a@latest', restoreOut]),
    ]);
    expect(dd.code, dd.stderr).toBe(0);
    expect(backup.code, backup.stderr).toBe(0);
    expect(list.code, list.stderr).toBe(0);
    expect(restore.code, restore.stderr).toBe(0);
    const sumA = await sha256File(imgA);
    expect(await sha256File(ddOut)).toBe(sumA);
    expect(await sha256File(restoreOut)).toBe(sumA);
    // b appears in the mount within 2 s and reads back identical
    const t0 = Date.now();
    while (Date.now() - t0 < 2000 && !(await fs.readdir(mnt)).includes('b')) await new Promise((r) => setTimeout(r, 100));
    expect(await fs.readdir(mnt)).toContain('b');
    expect(await sha256File(path.join(mnt, 'b', 'latest'))).toBe(await sha256File(imgB));
  });

  it('a second backup of the same image fails clearly, or waits with --wait', async () => {
    const first = startBackupFromPipe('c');
    first.child.stdin.write(prng(3, 8 << 20));
    // wait until the first holds the image lock
    const locks = path.join(repo, 'locks');
    const lock = path.join(locks, 'image-c.lock');
    for (let i = 0; i < 600 && !(await fs.stat(lock).catch(() => null)); i++) await new Promise((r) => setTimeout(r, 50));
    expect(JSON.parse(await fs.readFile(lock, 'utf8')).pid).toBe(first.child.pid);
    const second = await gv(repo, ['backup', imgB, '--name', 'c']);
    expect(second.code).toBe(1);
    expect(second.stderr.trim()).toMatch(/another backup of image c is running \(pid \d+\); use --wait/);
    let settled = false;
    const waiting = gv(repo, ['backup', imgB, '--name', 'c', '--wait', '--json']).finally(() => (settled = true));
    // Until it has the lock, a backup trying for it keeps its own candidate lock file
    // (image-c.lock.<random>.tmp-<pid>) beside it: seen while the first still holds the
    // lock, the second is queued behind it.
    const queued = async () => (await fs.readdir(locks)).some((f) => f.startsWith('image-c.lock.') && !f.endsWith(`-${first.child.pid}`));
    for (let i = 0; i < 600 && !settled && !(await queued()); i++) await new Promise((r) => setTimeout(r, 50));
    expect(await queued(), settled ? `the --wait backup ended while the first held the lock: ${(await waiting).stderr}` : 'not queued').toBe(true);
    first.child.stdin.end(prng(4, 8 << 20));
    const [a, b] = await Promise.all([first.done, waiting]);
    expect(a.code, a.err).toBe(0);
    expect(b.code, b.stderr).toBe(0);
    const gens = JSON.parse(await gvOk(repo, ['list', 'c', '--json']));
    expect(gens).toHaveLength(2);
  });
});

describe('durability while mounted', () => {
  it("a backup's commit is fsynced by the index holder that writes it (write options do not cross the socket)", async () => {
    const holder = (await sh('pgrep', ['-f', `index-holder.js ${path.join(repo, 'index')}`])).stdout.trim().split('\n').filter(Boolean);
    expect(holder).toHaveLength(1);
    const log = s.path('holder-syncs.log');
    // Without -q, strace says on stderr when it has attached to the process and all its
    // threads ("Process N attached with M threads"); from then on every call is traced.
    const st = spawn('strace', ['-f', '-e', 'trace=fsync,fdatasync', '-o', log, '-p', holder[0]!], { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    const exited = new Promise((r) => st.once('exit', r));
    try {
      const attached = new RegExp(`Process ${holder[0]} attached`);
      await new Promise<void>((resolve, reject) => {
        st.stderr!.on('data', (d) => {
          stderr += d;
          if (attached.test(stderr)) resolve();
        });
        void exited.then(() => reject(new Error(`strace exited before attaching: ${stderr}`)));
      });
      // Count calls made: with -f, strace splits a call that overlaps another thread's into
      // "fdatasync(7 <unfinished ...>" and "<... fdatasync resumed>) = 0".
      const calls = (text: string) => text.split('\n').filter((l) => /\bf(data)?sync\(\d+/.test(l)).length;
      const before = calls(await fs.readFile(log, 'utf8').catch(() => ''));
      await gvOk(repo, ['backup', imgB, '--name', 'synced']);
      // The backup has its answer, so the holder's calls are made; strace writes them all out as it detaches.
      st.kill('SIGINT');
      await exited;
      const after = calls(await fs.readFile(log, 'utf8'));
      // at least the pack-commit batch and the generation commit
      expect(after - before, stderr).toBeGreaterThanOrEqual(2);
    } finally {
      st.kill('SIGINT');
      await exited;
    }
  });
});

describe('CPU priority', () => {
  it('the mount server drops to the lowest CPU priority while a backup runs, and comes back after', async () => {
    const pid = Number((await sh('pgrep', ['-f', `mount ${mnt}`])).stdout.trim().split('\n')[0]);
    expect(pid).toBeGreaterThan(0);
    const autogroup = async () => (await fs.readFile(`/proc/${pid}/autogroup`, 'utf8').catch(() => '')).trim();
    const niceOf = async () => Number((await fs.readFile(`/proc/${pid}/stat`, 'utf8')).split(') ')[1]!.split(' ')[16]);
    const hasAutogroup = (await autogroup()) !== '';
    const waitFor = async (want: number) => {
      for (let i = 0; i < 60; i++) {
        const ag = await autogroup();
        if ((hasAutogroup ? Number(/nice (-?\d+)/.exec(ag)?.[1]) : await niceOf()) === want) return true;
        await new Promise((r) => setTimeout(r, 100));
      }
      return false;
    };
    expect(await waitFor(0)).toBe(true);
    const b = startBackupFromPipe('prio');
    b.child.stdin.write(prng(5, 4 << 20));
    expect(await waitFor(19)).toBe(true);
    expect(await niceOf()).toBe(19); // the FUSE thread itself
    // Reads keep working meanwhile.
    const r = await sh('dd', [`if=${mnt}/a/latest`, 'of=/dev/null', 'bs=1M', 'count=8', 'status=none']);
    expect(r.code, r.stderr).toBe(0);
    b.child.stdin.end();
    expect((await b.done).code).toBe(0);
    expect(await waitFor(0)).toBe(true);
    expect(await niceOf()).toBe(0);
  });
});

describe('removing a generation that is open in the mount', () => {
  it('disappears from the tree, keeps reading correct bytes until closed, then gc reclaims it', async () => {
    const img = s.path('e.img');
    const data = prng(77, 24 << 20);
    await fs.writeFile(img, data);
    const g = JSON.parse(await gvOk(repo, ['backup', img, '--name', 'e', '--json']));
    const t0 = Date.now();
    while (Date.now() - t0 < 3000 && !(await fs.readdir(mnt)).includes('e')) await new Promise((r) => setTimeout(r, 100));
    const fh = await fs.open(path.join(mnt, 'e', 'latest'), 'r');
    try {
      const head = Buffer.alloc(4096);
      await fh.read(head, 0, 4096, 0);
      expect(head.equals(data.subarray(0, 4096))).toBe(true);
      const f = await gv(repo, ['forget', `e@${g.id}`, '--force-young']);
      expect(f.code, f.stderr).toBe(0);
      const t1 = Date.now();
      while (Date.now() - t1 < 2000 && (await fs.readdir(mnt)).includes('e')) await new Promise((r) => setTimeout(r, 100));
      expect(await fs.readdir(mnt)).not.toContain('e');
      const packsBefore = Number((await sh('du', ['-sb', path.join(repo, 'packs')])).stdout.split('\t')[0]);
      const gc1 = await gv(repo, ['gc']);
      expect(gc1.code, gc1.stderr).toBe(0);
      // the open file still reads every byte correctly
      const all = Buffer.alloc(data.length);
      for (let off = 0; off < data.length; off += 1 << 20) await fh.read(all, off, 1 << 20, off);
      expect(all.equals(data)).toBe(true);
      const packsMid = Number((await sh('du', ['-sb', path.join(repo, 'packs')])).stdout.split('\t')[0]);
      expect(packsMid).toBeGreaterThan(packsBefore - (1 << 20));
    } finally {
      await fh.close();
    }
    // closed: once the mount has dropped its pin (FUSE sends the release after close()
    // returns), the next gc gives the space back
    const pinned = async () => (await fs.readdir(path.join(repo, 'locks'))).some((f) => f.startsWith(`pin-${g.id}-`));
    for (let i = 0; i < 600 && (await pinned()); i++) await new Promise((r) => setTimeout(r, 50));
    expect(await pinned()).toBe(false);
    const packsClosed = Number((await sh('du', ['-sb', path.join(repo, 'packs')])).stdout.split('\t')[0]);
    const gc2 = await gv(repo, ['gc']);
    expect(gc2.code, gc2.stderr).toBe(0);
    const packsAfter = Number((await sh('du', ['-sb', path.join(repo, 'packs')])).stdout.split('\t')[0]);
    expect(packsAfter).toBeLessThan(packsClosed - (20 << 20));
    const v = await gv(repo, ['verify']);
    expect(v.code, v.stdout).toBe(0);
  });
});

describe('the process holding the index dies', () => {
  it('kill -9 of the mount and of its index holder (the leader) mid-backup: the backup finishes, later commands work', async () => {
    const pgrep = async (pat: string) => (await sh('pgrep', ['-f', pat])).stdout.trim().split('\n').filter(Boolean).map(Number);
    const mountPids = await pgrep(`mount ${mnt}`);
    const holderPids = await pgrep(`index-holder.js ${path.join(repo, 'index')}`);
    expect(mountPids.length).toBeGreaterThan(0);
    expect(holderPids).toHaveLength(1);
    const pids = [...holderPids, ...mountPids];
    // The generations committed so far (by beforeAll, and by the tests that ran before this one).
    const namesBefore = (JSON.parse(await gvOk(repo, ['list', '--json'])) as Array<{ name: string }>).map((g) => g.name);
    expect(namesBefore).not.toContain('d');
    const b = startBackupFromPipe('d');
    b.child.stdin.write(prng(5, 16 << 20));
    // Mid-backup: registered, and writing pack data (so it has been using the index).
    const writing = async () => {
      const locks = path.join(repo, 'locks');
      for (const f of (await fs.readdir(locks)).filter((x) => /^writer-[0-9a-f]+\.json$/.test(x))) {
        const rec = JSON.parse((await fs.readFile(path.join(locks, f), 'utf8').catch(() => '{}')) || '{}');
        if (rec.what === 'backup d' && rec.owner?.pid === b.child.pid && rec.packs?.length > 0) return true;
      }
      return false;
    };
    for (let i = 0; i < 600 && !(await writing()); i++) await new Promise((r) => setTimeout(r, 50));
    expect(await writing()).toBe(true);
    for (const p of pids) process.kill(p, 'SIGKILL');
    await waitGone(pids);
    b.child.stdin.end(prng(6, 16 << 20));
    const res = await Promise.race([
      b.done,
      new Promise<{ code: number; out: string; err: string }>((r) => setTimeout(() => r({ code: -2, out: '', err: 'timeout' }), 60_000)),
    ]);
    expect(res.code, res.err).toBe(0);
    const gen = JSON.parse(res.out);
    expect(gen.size).toBe(32 << 20);
    const list = JSON.parse(await gvOk(repo, ['list', '--json']));
    expect(list.map((g: { name: string }) => g.name).sort()).toEqual([...namesBefore, 'd'].sort());
    const out = s.path('d.out');
    await gvOk(repo, ['restore', 'd@latest', out]);
    expect((await fs.readFile(out)).equals(Buffer.concat([prng(5, 16 << 20), prng(6, 16 << 20)]))).toBe(true);
    // the killed mount left a stale mountpoint; mounting again clears it
    const again = await gv(repo, ['mount', mnt]);
    expect(again.code, again.stderr).toBe(0);
    expect(again.stderr).toMatch(/stale mount/);
    expect((await fs.readdir(mnt)).sort()).toEqual([...new Set([...namesBefore, 'd'])].sort());
  });
});

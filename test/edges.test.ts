/**
 * Edges of "one line, a known exit code, nothing half-committed": exit codes of every
 * way a command can end (usage, errors, crashes, signals), sources without a size
 * (--max-size), a full repository file system, and interrupted backups.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CLI, Run, Scratch, gv, gvOk, must, oneLine, prng, sh, sha256File } from './helpers.js';

let s: Scratch;
let repo: string;
let img: string;

beforeAll(async () => {
  s = await Scratch.create();
  repo = s.path('repo');
  img = s.path('img.bin');
  await fs.writeFile(img, Buffer.concat([prng(1, 3 << 20), Buffer.alloc(1 << 20)]));
  await gvOk(repo, ['init']);
  await gvOk(repo, ['backup', img, '--name', 'vm1']);
});

afterAll(async () => {
  await s?.cleanup();
});

const names = async (r: string): Promise<string[]> =>
  (JSON.parse(await gvOk(r, ['list', '--json'])) as Array<{ name: string }>).map((g) => g.name);

async function newRepo(name: string): Promise<string> {
  const r = s.path(name);
  await gvOk(r, ['init']);
  return r;
}

/** Total bytes of the files under dir. */
async function dirBytes(dir: string): Promise<number> {
  let n = 0;
  for (const e of await fs.readdir(dir, { withFileTypes: true, recursive: true })) {
    if (e.isFile()) n += (await fs.stat(path.join(e.parentPath ?? e.path, e.name))).size;
  }
  return n;
}

/** Start the CLI as a child process (node options first), to signal it or crash it. */
function start(nodeArgs: string[], args: string[]) {
  const child = spawn(process.execPath, [...nodeArgs, CLI, ...args], {
    env: { ...process.env, GENVAULT_NO_PROGRESS: '1' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d) => (stdout += d));
  child.stderr.on('data', (d) => (stderr += d));
  const done = new Promise<Run>((resolve) => child.on('close', (code) => resolve({ code: code ?? -1, stdout, stderr })));
  return { child, done };
}

describe('exit codes', () => {
  it('usage 2, errors 1, and for status 3 (UNKNOWN) on its own usage errors', async () => {
    const none = await gv(repo, []);
    expect(none.code).toBe(2); // help shown because no command was given
    expect((await gv(repo, ['help'])).code).toBe(0);
    expect((await gv(repo, ['list', '--bogus'])).code).toBe(2);
    const missing = await gv(s.path('nowhere'), ['list']);
    expect(missing.code).toBe(1);
    expect(oneLine(missing.stderr)).toMatch(/not a genvault repository/);
    const unknown = await gv(repo, ['list', 'nope']);
    expect(unknown.code).toBe(1);
    expect(oneLine(unknown.stderr)).toMatch(/^genvault: no image named nope/);
    expect((await gv(repo, ['info', 'nope@latest'])).code).toBe(1);

    const badNow = await gv(repo, ['status', '--now', 'soon']);
    expect(badNow.code).toBe(3);
    expect(badNow.stdout.split('\n')[0]).toBe("UNKNOWN: option '--now <time>' argument 'soon' is invalid. Expected an ISO date or time such as 2026-05-01 or 2026-05-01T06:00:00Z.");
    expect(badNow.stderr).toBe('');
    const badOpt = await gv(repo, ['status', '--bogus']);
    expect(badOpt.code).toBe(3);
    expect(badOpt.stdout.split('\n')[0]).toMatch(/^UNKNOWN: unknown option '--bogus'/);
    const noRepo = await gv(null, ['status'], { env: { GENVAULT_REPO: '' } });
    if (!(await fs.stat('/etc/genvault/jobs.yaml').catch(() => null))) {
      expect(noRepo.code).toBe(3);
      expect(noRepo.stdout.split('\n')[0]).toMatch(/^UNKNOWN: no repository given/);
    } else {
      console.log('status without a repository not checked: /etc/genvault/jobs.yaml exists here, and status takes the repository from it');
    }
    const ok = await gv(repo, ['status']);
    expect(ok.code, ok.stdout).toBe(0);
  });

  it('an uncaught exception or unhandled rejection anywhere: one line, exit 1', async () => {
    const r = await newRepo('repo-crash');
    // A throw and a rejection from outside any command's code, while a backup runs: as soon
    // as this process has registered as a writer (a killed run's registration stays behind).
    const inject = (code: string) => [`--import=data:text/javascript,${encodeURIComponent(code)}`];
    const whenRunning = (act: string) =>
      `import fs from "node:fs"; const dir = ${JSON.stringify(path.join(r, 'locks'))};` +
      ` const mine = (f) => { try { return JSON.parse(fs.readFileSync(dir + "/" + f, "utf8")).owner.pid === process.pid; } catch { return false; } };` +
      ` const t0 = Date.now(); const t = setInterval(() => {` +
      ` if (fs.readdirSync(dir).some((f) => f.startsWith("writer-") && mine(f))) { clearInterval(t); ${act} }` +
      ` else if (Date.now() - t0 > 60000) { clearInterval(t); throw new Error("no backup registered within 60 s"); } }, 20);`;
    const args = ['-r', r, 'backup', '/dev/zero', '--name', 'z', '--max-size', '1T'];
    for (const code of [whenRunning('throw new Error("boom");'), whenRunning('Promise.reject(new Error("boom"));')]) {
      const res = await start(inject(code), args).done;
      expect(res.code, res.stderr).toBe(1);
      expect(oneLine(res.stderr)).toBe('genvault: internal error: boom');
    }
    expect(await names(r)).toEqual([]);
  });

  it('a read-only repository: one line and exit 1, never 13', async () => {
    const ro = s.path('ro');
    await fs.mkdir(ro);
    await must('mount', ['--bind', repo, ro]);
    s.onCleanup(() => sh('umount', ['-l', ro]));
    await must('mount', ['-o', 'remount,ro,bind', ro]);
    const b = await gv(ro, ['backup', img, '--name', 'vm1']);
    expect(b.code).toBe(1);
    expect(oneLine(b.stderr)).toMatch(/read-only media/i);
    // Reading works on read-only media (from a private copy of the index).
    for (const args of [['list'], ['info', 'vm1@latest']]) {
      const r = await gv(ro, args);
      expect(r.code, `${args}: ${r.stderr}`).toBe(0);
    }
    await must('umount', [ro]);
  });
});

describe('--max-size', () => {
  it('a character device needs it; more than it fails and commits nothing', async () => {
    const r = await newRepo('repo-max');
    const refused = await gv(r, ['backup', '/dev/zero', '--name', 'z']);
    expect(refused.code).toBe(2);
    expect(oneLine(refused.stderr)).toBe('genvault: /dev/zero: a character device has no size; give --max-size');
    const bad = await gv(r, ['backup', '/dev/zero', '--name', 'z', '--max-size', 'lots']);
    expect(bad.code).toBe(2);
    expect(oneLine(bad.stderr)).toMatch(/^genvault: option '--max-size <size>' argument 'lots' is invalid\. Expected a size such as .*512M/);

    const zero = await gv(r, ['backup', '/dev/zero', '--name', 'z', '--max-size', '8M']);
    expect(zero.code).toBe(1);
    expect(oneLine(zero.stderr)).toMatch(/^genvault: backup of z failed: stream:\/dev\/zero yields more than --max-size 8388608 bytes$/);
    const file = await gv(r, ['backup', img, '--name', 'f', '--max-size', '3M']);
    expect(file.code).toBe(1);
    expect(oneLine(file.stderr)).toMatch(/^genvault: backup of f failed: file:.*img\.bin is 4194304 bytes, more than --max-size 3145728$/);
    const stdin = await gv(r, ['backup', '-', '--name', 'p', '--max-size', '1M'], { input: prng(2, (1 << 20) + 1) });
    expect(stdin.code).toBe(1);
    expect(oneLine(stdin.stderr)).toMatch(/^genvault: backup of p failed: stdin yields more than --max-size 1048576 bytes$/);
    expect(await names(r)).toEqual([]);
    expect((await fs.readdir(path.join(r, 'locks'))).filter((f) => f.startsWith('writer-'))).toEqual([]);

    // Exactly the limit is fine, for a stream and for a file.
    const exactStream = await gv(r, ['backup', '-', '--name', 'p', '--max-size', '1M'], { input: prng(2, 1 << 20) });
    expect(exactStream.code, exactStream.stderr).toBe(0);
    const exactFile = await gv(r, ['backup', img, '--name', 'f', '--max-size', '4M']);
    expect(exactFile.code, exactFile.stderr).toBe(0);
    expect((await names(r)).sort()).toEqual(['f', 'p']);
  });
});

describe('disk full', () => {
  it('a full repository file system: one line, exit 1, nothing committed; fine once space is freed', async () => {
    const mnt = s.path('tmpfs');
    await fs.mkdir(mnt);
    await must('mount', ['-t', 'tmpfs', '-o', 'size=40M', 'tmpfs', mnt]);
    s.onCleanup(() => sh('umount', ['-l', mnt]));
    const r = path.join(mnt, 'repo');
    await gvOk(r, ['init']);
    await gvOk(r, ['backup', img, '--name', 'vm1']);
    const big = s.path('big.bin');
    await fs.writeFile(big, prng(3, 20 << 20));
    const filler = path.join(mnt, 'filler');
    // 2 KiB free: the lock files and the index fail; 4 MiB: a pack write fails mid-run.
    for (const left of [2048, 4 << 20]) {
      const free = Number((await must('df', ['-B1', '--output=avail', mnt])).trim().split('\n')[1]);
      await must('fallocate', ['-l', String(free - left), filler]);
      const res = await gv(r, ['backup', big, '--name', 'big']);
      expect(res.code, res.stderr).toBe(1);
      // With 2 KiB left LevelDB cannot even open the index (its recovery writes a table):
      // that is said about the index; a failure inside the backup about the backup.
      const line = oneLine(res.stderr);
      if (line.startsWith(`genvault: ${r}/index:`)) expect(line).toBe(`genvault: ${r}/index: no space left on device`);
      else expect(line).toBe(`genvault: ${r}: no space left on device (backup of big failed; nothing was committed)`);
      await fs.rm(filler);
      expect(await names(r)).toEqual(['vm1']);
    }
    await gvOk(r, ['backup', big, '--name', 'big']);
    const v = await gv(r, ['verify', '--full']);
    expect(v.code, v.stdout + v.stderr).toBe(0);
    await gvOk(r, ['restore', 'big@latest', s.path('big.out')]);
    expect(await sha256File(s.path('big.out'))).toBe(await sha256File(big));
    await must('umount', [mnt]);
  });
});

describe('interrupted backup', () => {
  it('SIGINT or SIGTERM: one line, exit 1, no generation; the next backup says it cleaned up', async () => {
    const r = await newRepo('repo-sig');
    const packs = path.join(r, 'packs');
    for (const sig of ['SIGINT', 'SIGTERM'] as const) {
      const run = start([], ['-r', r, 'backup', '/dev/urandom', '--name', 'rnd', '--max-size', '1T']);
      // Wait until pack data is being written, not a fixed time.
      for (let i = 0; i < 600 && (await dirBytes(packs)) < 8 << 20; i++) await new Promise((t) => setTimeout(t, 50));
      expect(await dirBytes(packs)).toBeGreaterThanOrEqual(8 << 20);
      run.child.kill(sig);
      const res = await run.done;
      expect(res.code, res.stderr).toBe(1);
      expect(oneLine(res.stderr)).toBe(
        'genvault: backup of rnd interrupted; nothing was committed (any partial pack is removed by the next backup or gc)',
      );
      expect(await names(r)).not.toContain('rnd');
      expect((await fs.readdir(path.join(r, 'locks'))).some((f) => f.startsWith('writer-'))).toBe(true);

      const next = await gv(r, ['backup', img, '--name', 'vm1']);
      expect(next.code, next.stderr).toBe(0);
      expect(oneLine(next.stderr)).toMatch(
        /^genvault: cleaned up after backup rnd \(pid \d+, started [^)]+\), which did not finish: 1 uncommitted pack\(s\) removed \([\d.]+ MiB\)$/,
      );
      expect((await fs.readdir(path.join(r, 'locks'))).filter((f) => f.startsWith('writer-'))).toEqual([]);
      expect(await dirBytes(packs)).toBeLessThan(5 << 20);
      // Nothing left to clean: no line.
      const again = await gv(r, ['backup', img, '--name', 'vm1']);
      expect(again.stderr).toBe('');
    }
    const v = await gv(r, ['verify', '--full']);
    expect(v.code, v.stdout + v.stderr).toBe(0);
    expect(await names(r)).toEqual(['vm1', 'vm1', 'vm1', 'vm1']);
  });
});

describe('errno behind LevelDB errors', () => {
  it('finds ENOSPC in a cause chain, and behind "Database is not open" once the index failed', async () => {
    const { describeFsError, errnoOf, isNoSpace, noteIndexFailure } = await import('../src/util/errors.js');
    const level = (message: string, code: string, cause?: Error) => Object.assign(new Error(message, { cause }), { code });
    const get = level('Could not get value', 'LEVEL_IO_ERROR', level('IO error: /r/index/000006.log: No space left on device', 'LEVEL_IO_ERROR'));
    expect(isNoSpace(get)).toBe(true);
    expect(describeFsError(get, 'backup of x failed').message).toBe('backup of x failed: no space left on device');
    const other = level('Could not get value', 'LEVEL_IO_ERROR', level('IO error: /r/index/000005.ldb: bad block', 'LEVEL_IO_ERROR'));
    expect(errnoOf(other)).toBeUndefined();
    expect(describeFsError(other, 'reading').message).toBe('reading: IO error: /r/index/000005.ldb: bad block');
    // Text that merely mentions it, outside LevelDB, is not an errno.
    expect(errnoOf(new Error('ssh: Permission denied (publickey)'))).toBeUndefined();
    const notOpen = level('Database is not open', 'LEVEL_DATABASE_NOT_OPEN');
    expect(errnoOf(notOpen)).toBeUndefined();
    noteIndexFailure(level('Database is not open', 'LEVEL_DATABASE_NOT_OPEN', level('IO error: /r/index/LOCK: Read-only file system', 'LEVEL_IO_ERROR')));
    expect(errnoOf(notOpen)).toBe('EROFS');
  });
});

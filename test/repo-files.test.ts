/**
 * What genvault reads from and how it leaves the repository's own files:
 * - paths and ids in lock and registration files are never trusted: a dead writer's
 *   registration naming a file outside packs/ (or any malformed pack id) is reported and
 *   ignored, junk in locks/gc.json does not block gc, and a live gc still does;
 * - permissions: 0700/0600 (2750/0640 with `init --group`), the LevelDB socket included,
 *   another local user cannot look in, a loosened repository is tightened by the next
 *   backup and `verify` warns about it before.
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import type { Stats } from 'node:fs';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CLI, Scratch, gv, gvOk, prng, sh } from './helpers.js';
import { Unpriv, unprivUser } from './unpriv.js';

let s: Scratch;
let img: string;

beforeAll(async () => {
  s = await Scratch.create('genvault-repofiles-');
  // Traversable by everyone, so only the repository's own modes keep another user out.
  await fs.chmod(s.dir, 0o755);
  img = s.path('disk.img');
  await fs.writeFile(img, Buffer.concat([prng(1, 3 << 20), Buffer.alloc(1 << 20), prng(2, 1 << 20)]));
});

afterAll(async () => {
  await s?.cleanup();
});

async function newRepo(name: string, args: string[] = []): Promise<string> {
  const repo = s.path(name);
  await gvOk(repo, ['init', ...args]);
  return repo;
}

async function exists(f: string): Promise<boolean> {
  return fs.lstat(f).then(
    () => true,
    () => false,
  );
}

/** Lines of stderr that mention `what`. */
function linesAbout(stderr: string, what: string): string[] {
  return stderr.split('\n').filter((l) => l.includes(what));
}

/** A registration of a writer that is gone (a pid that cannot exist). */
function deadRegistration(id: string, packs: unknown[]): string {
  return JSON.stringify({ id, owner: { pid: 999999999, start: '1', host: os.hostname() }, started: new Date().toISOString(), what: 'backup x', packs });
}

async function processStart(pid: number): Promise<string> {
  const stat = await fs.readFile(`/proc/${pid}/stat`, 'utf8');
  return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19]!;
}

/** A gc paused after its last marking (GENVAULT_GC_PAUSE_FILE); it holds gc.json and the index. */
async function pausedGc(repo: string) {
  const pause = s.path(`gc-pause-${randomBytes(4).toString('hex')}`);
  await fs.writeFile(pause, '');
  const child = spawn(process.execPath, [CLI, '-r', repo, 'gc'], {
    env: { ...process.env, GENVAULT_NO_PROGRESS: '1', GENVAULT_GC_PAUSE_FILE: pause },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  child.stderr!.on('data', (d) => (stderr += d));
  child.stdout!.resume();
  const exited = new Promise<number>((r) => child.on('exit', (code) => r(code ?? -1)));
  const t0 = Date.now();
  while (!/gc: paused/.test(stderr)) {
    if (child.exitCode !== null || Date.now() - t0 > 60_000) throw new Error(`gc did not pause: ${stderr}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    get stderr() {
      return stderr;
    },
    /** Let it finish; resolves with its exit code. */
    async finish(): Promise<number> {
      await fs.rm(pause, { force: true });
      return exited;
    },
    kill(): void {
      child.kill('SIGKILL');
    },
  };
}

/** Every file and directory under `dir` (itself included), with lstat. */
async function walk(dir: string): Promise<Array<{ path: string; st: Stats }>> {
  const out = [{ path: dir, st: await fs.lstat(dir) }];
  for (const e of await fs.readdir(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) out.push(...(await walk(p)));
    else out.push({ path: p, st: await fs.lstat(p) });
  }
  return out;
}

const modeOf = (st: Stats) => (st.mode & 0o7777).toString(8).padStart(4, '0');

describe('paths and ids read from repository files', () => {
  it('a dead registration naming files outside packs/ is reported and ignored; a valid one is still cleaned', async () => {
    const repo = await newRepo('repo-reg');
    await gvOk(repo, ['backup', img, '--name', 'a']);
    const packsDir = path.join(repo, 'packs');
    const [sub] = await fs.readdir(packsDir);
    const [packFile] = await fs.readdir(path.join(packsDir, sub!));
    const committed = path.join(packsDir, sub!, packFile!);
    const committedSize = (await fs.stat(committed)).size;

    // Files the odd names would reach through packPath(): each must survive.
    const victim = s.path('victim.pack');
    const hex31 = randomBytes(16).toString('hex').slice(0, 31);
    const decoys = [
      victim,
      path.join(packsDir, 'zz', 'zz.pack'),
      path.join(packsDir, hex31.slice(0, 2), `${hex31}.pack`),
      path.join(packsDir, 'e', 'etc', 'passwd.pack'), // where "/etc/passwd" lands inside packs/
      path.join(packsDir, 'AB', `${'AB'.repeat(16)}.pack`), // upper case is not a pack id
    ];
    for (const d of decoys) {
      await fs.mkdir(path.dirname(d), { recursive: true });
      await fs.writeFile(d, 'decoy');
    }
    const passwd = await fs.readFile('/etc/passwd');
    const odd: unknown[] = [`../../../..${s.path('victim')}`, '/etc/passwd', 'zz', hex31, 'AB'.repeat(16)];
    const locks = path.join(repo, 'locks');
    const bad: string[] = [];
    for (const p of odd) {
      const id = randomBytes(8).toString('hex');
      bad.push(`writer-${id}.json`);
      // The odd entry after a valid id that would be cleaned: nothing of it is acted on.
      await fs.writeFile(path.join(locks, `writer-${id}.json`), deadRegistration(id, [randomBytes(16).toString('hex'), p]));
    }
    // An id that is not the file's own would name another file under locks/ (or outside).
    const idMismatch = randomBytes(8).toString('hex');
    bad.push(`writer-${idMismatch}.json`);
    await fs.writeFile(path.join(locks, `writer-${idMismatch}.json`), deadRegistration('../../../../etc/x', []));
    const junk = randomBytes(8).toString('hex');
    bad.push(`writer-${junk}.json`);
    await fs.writeFile(path.join(locks, `writer-${junk}.json`), 'not json {');

    // A valid dead registration: an uncommitted pack (removed) and a committed one with a
    // torn tail (cut back to its committed size).
    const orphanId = randomBytes(16).toString('hex');
    const orphan = path.join(packsDir, orphanId.slice(0, 2), `${orphanId}.pack`);
    await fs.mkdir(path.dirname(orphan), { recursive: true });
    await fs.writeFile(orphan, 'uncommitted');
    await fs.appendFile(committed, Buffer.alloc(4096, 7));
    const goodId = randomBytes(8).toString('hex');
    await fs.writeFile(path.join(locks, `writer-${goodId}.json`), deadRegistration(goodId, [orphanId, packFile!.replace(/\.pack$/, '')]));

    const r = await gv(repo, ['backup', img, '--name', 'b']);
    for (const d of decoys) expect(await fs.readFile(d, 'utf8'), d).toBe('decoy');
    expect(r.code, r.stderr).toBe(0);
    expect(await fs.readFile('/etc/passwd')).toEqual(passwd);
    for (const f of bad) {
      const lines = linesAbout(r.stderr, f);
      expect(lines, r.stderr).toHaveLength(1);
      expect(lines[0]).toMatch(/invalid writer registration .*; ignored$/);
      expect(await exists(path.join(locks, f)), f).toBe(true); // ignored, not acted on
    }
    expect(linesAbout(r.stderr, `../../../..${s.path('victim')}`)).toHaveLength(1);
    // The valid one was cleaned as before.
    expect(await exists(path.join(locks, `writer-${goodId}.json`))).toBe(false);
    expect(await exists(orphan)).toBe(false);
    expect((await fs.stat(committed)).size).toBe(committedSize);
    expect(linesAbout(r.stderr, goodId)).toEqual([]);

    // Still ignored by gc (reported once per process, nothing removed); not a string either.
    const notString = randomBytes(8).toString('hex');
    bad.push(`writer-${notString}.json`);
    await fs.writeFile(path.join(locks, `writer-${notString}.json`), deadRegistration(notString, [42]));
    const g = await gv(repo, ['gc']);
    expect(g.code, g.stderr).toBe(0);
    for (const f of bad) expect(linesAbout(g.stderr, f), g.stderr).toHaveLength(1);
    for (const d of decoys) expect(await exists(d), d).toBe(true);
    const v = await gv(repo, ['verify']);
    expect(v.code, v.stdout + v.stderr).toBe(0);
  });

  it('junk in locks/gc.json does not block gc: reported as malformed and moved aside', async () => {
    const repo = await newRepo('repo-gcjunk');
    await gvOk(repo, ['backup', img, '--name', 'a']);
    const lock = path.join(repo, 'locks', 'gc.json');
    for (const junk of ['{"pid":1}', 'not json', '', '[]', `{"pid":1,"start":"x","host":"${os.hostname()}"}`]) {
      await fs.writeFile(lock, junk);
      // A backup does not take it for a running gc.
      const b = await gv(repo, ['backup', img, '--name', 'a']);
      expect(b.code, b.stderr).toBe(0);
      expect(linesAbout(b.stderr, 'gc.json'), b.stderr).toEqual([expect.stringMatching(/malformed gc lock .*treated as stale, no gc is running/)]);
      const r = await gv(repo, ['gc']);
      expect(r.code, `${JSON.stringify(junk)}: ${r.stderr}`).toBe(0);
      const lines = linesAbout(r.stderr, 'gc.json');
      expect(lines, r.stderr).toHaveLength(1);
      expect(lines[0]).toMatch(/locks\/gc\.json: malformed gc lock \(.+\): treated as stale, moved aside to gc\.json\.malformed-\d+$/);
      expect(await exists(lock)).toBe(false);
    }
    // A directory in its place is moved aside too, not removed.
    await fs.mkdir(lock);
    await fs.writeFile(path.join(lock, 'x'), 'x');
    const r = await gv(repo, ['gc']);
    expect(r.code, r.stderr).toBe(0);
    expect(linesAbout(r.stderr, 'gc.json')[0]).toMatch(/not a regular file/);
    const aside = (await fs.readdir(path.join(repo, 'locks'))).filter((f) => f.startsWith('gc.json.malformed-'));
    expect(aside.length).toBeGreaterThanOrEqual(1);
    expect((await fs.readdir(path.join(repo, 'locks'))).filter((f) => !f.startsWith('gc.json.malformed-'))).toEqual([]);
  });

  it('a live gc still blocks a second one', async () => {
    const repo = await newRepo('repo-gclive');
    await gvOk(repo, ['backup', img, '--name', 'a']);
    const lock = path.join(repo, 'locks', 'gc.json');

    // A real gc, paused mid-run.
    const first = await pausedGc(repo);
    try {
      const second = await gv(repo, ['gc']);
      expect(second.code).toBe(1);
      expect(second.stderr.trim()).toMatch(/^genvault: another gc is running \(pid \d+\); wait for it to finish$/);
      expect(await exists(lock)).toBe(true);
    } finally {
      expect(await first.finish(), first.stderr).toBe(0);
    }
    expect(await exists(lock)).toBe(false);

    // A well-formed gc.json naming a live process (this one).
    await fs.writeFile(lock, JSON.stringify({ pid: process.pid, start: await processStart(process.pid), host: os.hostname() }));
    const r = await gv(repo, ['gc']);
    expect(r.code).toBe(1);
    expect(r.stderr.trim()).toBe(`genvault: another gc is running (pid ${process.pid}); wait for it to finish`);
    expect(await fs.readFile(lock, 'utf8')).toContain(String(process.pid));
    await fs.rm(lock);
  });
});

describe('permissions', () => {
  let user: Unpriv;

  beforeAll(async () => {
    user = await unprivUser();
  });

  /** The user can neither list nor read anything that matters in the repository. */
  async function keptOut(repo: string): Promise<void> {
    for (const d of [repo, path.join(repo, 'index'), path.join(repo, 'packs')]) {
      const r = await user.run('ls', [d]);
      expect(r.code, `${d}: ${r.stdout}`).not.toBe(0);
    }
    for (const f of [path.join(repo, 'config.json'), path.join(repo, 'index', 'CURRENT')]) {
      const r = await user.run('cat', [f]);
      expect(r.code, `${f}: ${r.stdout}`).not.toBe(0);
    }
  }

  it('init and a backup leave nothing open to group or others, the index socket included', async () => {
    // An existing empty directory with a loose mode is taken in hand by init.
    const repo = s.path('repo-private');
    await fs.mkdir(repo, { mode: 0o755 });
    await fs.chmod(repo, 0o755);
    await gvOk(repo, ['init']);
    expect(modeOf(await fs.stat(repo))).toBe('0700');
    await gvOk(repo, ['backup', img, '--name', 'a']);

    // While a process holds the index (its socket exists).
    const g = await pausedGc(repo);
    try {
      const all = await walk(repo);
      expect(all.some((e) => e.st.isSocket() && e.path === path.join(repo, 'index', 'rave-level.sock'))).toBe(true);
      expect(all.filter((e) => e.path.endsWith('.pack')).length).toBeGreaterThan(0);
      for (const e of all) {
        expect(`${e.path} ${modeOf(e.st)}`).toBe(`${e.path} ${e.st.isDirectory() ? '0700' : e.st.isSocket() ? modeOf(e.st) : '0600'}`);
        expect(e.st.mode & 0o077, `${e.path} ${modeOf(e.st)}`).toBe(0);
      }
      await keptOut(repo);
    } finally {
      expect(await g.finish(), g.stderr).toBe(0);
    }
    const v = await gv(repo, ['verify', '--json']);
    expect(v.code, v.stderr).toBe(0);
    expect(JSON.parse(v.stdout).warnings).toEqual([]);
  });

  it('init --group: directories 2750 and files 0640 with that group', async () => {
    const group = 'genvault-test-grp';
    if ((await sh('getent', ['group', group])).code !== 0) {
      const add = await sh('groupadd', ['--system', group]);
      if ((await sh('getent', ['group', group])).code !== 0) throw new Error(`groupadd: ${add.stderr}`);
    }
    const gid = Number((await sh('getent', ['group', group])).stdout.split(':')[2]);
    const repo = await newRepo('repo-group', ['--group', group]);
    expect(JSON.parse(await fs.readFile(path.join(repo, 'config.json'), 'utf8')).group).toBe(group);
    await gvOk(repo, ['backup', img, '--name', 'a']);
    const g = await pausedGc(repo);
    try {
      const all = await walk(repo);
      expect(all.some((e) => e.st.isSocket())).toBe(true);
      for (const e of all) {
        const want = e.st.isDirectory() ? '2750' : e.st.isSocket() ? modeOf(e.st) : e.path.includes('/locks/') ? '0600' : '0640';
        expect(`${e.path} ${modeOf(e.st)} ${e.st.gid}`).toBe(`${e.path} ${want} ${gid}`);
        expect(e.st.mode & 0o027, `${e.path} ${modeOf(e.st)}`).toBe(0);
      }
      await keptOut(repo); // the test user is not in the group
    } finally {
      expect(await g.finish(), g.stderr).toBe(0);
    }
    const v = await gv(repo, ['verify', '--json']);
    expect(JSON.parse(v.stdout).warnings).toEqual([]);

    const bad = await gv(s.path('repo-nogroup'), ['init', '--group', 'no-such-group-here']);
    expect(bad.code).toBe(2);
    expect(bad.stderr.trim()).toBe('genvault: no group named no-such-group-here on this machine');
    expect(await exists(s.path('repo-nogroup'))).toBe(false);
  });

  it('a loosened repository: verify warns, the next backup tightens it', async () => {
    const repo = await newRepo('repo-loose');
    await gvOk(repo, ['backup', img, '--name', 'a']);
    // What an older genvault left: directories 0755, files 0644.
    for (const e of await walk(repo)) await fs.chmod(e.path, e.st.isDirectory() ? 0o755 : 0o644);
    const ls = await user.run('ls', [path.join(repo, 'index')]);
    expect(ls.code, ls.stderr).toBe(0); // the test can see a loose repository
    expect(ls.stdout).toMatch(/CURRENT/);

    const v = await gv(repo, ['verify']);
    expect(v.code, v.stdout + v.stderr).toBe(0);
    const warned = v.stdout.split('\n').filter((l) => l.startsWith('warning: '));
    expect(warned).toHaveLength(3);
    expect(warned[0]).toBe(`warning: loose permissions: repository directory ${repo} is mode 0755, open to others and its group (no group in config.json); the next backup or gc tightens it (or: chmod 700)`);
    expect(warned[1]).toMatch(/index\/ .* is mode 0755/);
    expect(warned[2]).toMatch(/packs\/ .* is mode 0755/);
    expect(v.stdout).toMatch(/no damage found/);
    const vj = await gv(repo, ['verify', '--json']);
    expect(vj.code).toBe(0);
    const report = JSON.parse(vj.stdout);
    expect(report.ok).toBe(true);
    expect(report.warnings).toEqual(warned.map((l) => l.slice('warning: '.length)));

    await gvOk(repo, ['backup', img, '--name', 'a']);
    for (const e of await walk(repo)) {
      if (e.st.isDirectory()) expect(`${e.path} ${modeOf(e.st)}`).toBe(`${e.path} 0700`);
    }
    expect(modeOf(await fs.stat(path.join(repo, 'config.json')))).toBe('0600');
    await keptOut(repo);
    const after = await gv(repo, ['verify', '--json']);
    expect(JSON.parse(after.stdout).warnings).toEqual([]);
  });
});

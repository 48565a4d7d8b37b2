/**
 * A hostile local user against root's genvault: symlinks planted at predictable names in a
 * shared temporary directory (the mount's pid file and log must live in a private run
 * directory instead), and job files or SSH identities that someone other than root controls
 * (refused before a hook runs, as cron and sudo refuse theirs).
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runDirPath } from '../src/util/rundir.js';
import { Scratch, gv, gvOk, isMounted, oneLine, prng, sh } from './helpers.js';
import { Sshd, startSshd } from './sshd.js';
import { Unpriv, sharedStickyDir, unprivUser } from './unpriv.js';

let s: Scratch;
let u: Unpriv;
let shared: string;
let repo: string;
let img: string;

beforeAll(async () => {
  s = await Scratch.create('genvault-hostile-');
  u = await unprivUser();
  shared = await sharedStickyDir(s); // also makes s.dir 0755: the user can look around
  repo = s.path('repo');
  img = s.path('vm.img');
  await fs.writeFile(img, prng(5, 4 << 20));
  await gvOk(repo, ['init']);
  await gvOk(repo, ['backup', img, '--name', 'vm']);
});

afterAll(async () => {
  await s?.cleanup();
});

/** Detach a mount (if still there) and wait for its server to exit, so cleanup can remove the repository. */
async function unmountAndWait(mnt: string): Promise<void> {
  await sh('fusermount', ['-uz', mnt]);
  for (let i = 0; i < 100; i++) {
    if ((await sh('pgrep', ['-f', `mount ${mnt}( |$)`])).code !== 0) return;
    await new Promise((r) => setTimeout(r, 100));
  }
}

async function mode(p: string): Promise<number> {
  return (await fs.lstat(p)).mode & 0o7777;
}

describe('mount run state (pid file, log)', () => {
  it('ignores symlinks planted at the old /tmp names; pid and log live in a private 0700 directory', async () => {
    const mnt = s.path('mnt');
    await fs.mkdir(mnt);
    const runDir = s.path('run');
    const victim = s.path('victim');
    await fs.writeFile(victim, 'precious root-owned content\n', { mode: 0o644 });
    const wouldCreate = s.path('created-by-root');
    // The names the old code used in $TMPDIR, planted by the user as symlinks.
    const oldPid = path.join(shared, `genvault-mount-${Buffer.from(mnt).toString('base64url')}.pid`);
    const oldLog = path.join(shared, 'genvault-mount-0.log');
    expect((await u.run('ln', ['-s', victim, oldPid])).code).toBe(0);
    expect((await u.run('ln', ['-s', wouldCreate, oldLog])).code).toBe(0);
    // The run directory's name is known too, but its parent is root's: no plant there.
    const plantDir = await u.run('ln', ['-s', shared, runDir]);
    expect(plantDir.code).not.toBe(0);
    expect(plantDir.stderr).toMatch(/Permission denied/);

    const env = { TMPDIR: shared, GENVAULT_RUN_DIR: runDir };
    s.onCleanup(() => unmountAndWait(mnt));
    const r = await gv(repo, ['mount', mnt], { env });
    expect(r.code, r.stderr).toBe(0);
    expect(await isMounted(mnt)).toBe(true);
    // The symlink targets are untouched: the victim unchanged, nothing created.
    expect(await fs.readFile(victim, 'utf8')).toBe('precious root-owned content\n');
    await expect(fs.access(wouldCreate)).rejects.toThrow();

    const st = await fs.lstat(runDir);
    expect(st.isDirectory()).toBe(true);
    expect(st.uid).toBe(0);
    expect(await mode(runDir)).toBe(0o700);
    const pidFile = path.join(runDir, `mount-${Buffer.from(mnt).toString('base64url')}.pid`);
    const pid = Number((await fs.readFile(pidFile, 'utf8')).trim());
    expect(r.stdout).toContain(`(pid ${pid})`);
    expect(await mode(pidFile)).toBe(0o600);
    expect(await mode(path.join(runDir, 'mount.log'))).toBe(0o600);
    expect((await fs.readdir(runDir)).sort()).toEqual(['mount.log', path.basename(pidFile)].sort());
    // Inside the private directory the user can plant nothing, even knowing the names.
    const plantIn = await u.run('ln', ['-s', victim, path.join(runDir, 'x')]);
    expect(plantIn.code).not.toBe(0);
    expect(plantIn.stderr).toMatch(/Permission denied/);

    const um = await gv(null, ['umount', mnt], { env });
    expect(um.code, um.stderr).toBe(0);
    expect(await isMounted(mnt)).toBe(false);
    // umount found the pid file and waited for the server to exit; the server removed it.
    expect(() => process.kill(pid, 0)).toThrow();
    await expect(fs.access(pidFile)).rejects.toThrow();

    // Still untouched after umount; the plants are still there, nothing else of ours is.
    expect(await fs.readFile(victim, 'utf8')).toBe('precious root-owned content\n');
    await expect(fs.access(wouldCreate)).rejects.toThrow();
    expect((await fs.lstat(oldPid)).isSymbolicLink()).toBe(true);
    expect((await fs.lstat(oldLog)).isSymbolicLink()).toBe(true);
    expect((await fs.readdir(shared)).sort()).toEqual([path.basename(oldLog), path.basename(oldPid)].sort());
  });

  it('refuses a run directory that is a symlink, writable by others, or not ours; --log is not followed', async () => {
    const mnt = s.path('mnt2');
    await fs.mkdir(mnt);
    s.onCleanup(() => unmountAndWait(mnt));
    const target = path.join(shared, 'user-dir');
    expect((await u.run('mkdir', ['-m', '0700', target])).code).toBe(0);
    const link = s.path('run-link');
    await fs.symlink(target, link);
    const ww = s.path('run-ww');
    await fs.mkdir(ww);
    await fs.chmod(ww, 0o777);
    const theirs = s.path('run-theirs');
    await fs.mkdir(theirs, { mode: 0o700 });
    await fs.chown(theirs, u.uid, u.gid);
    for (const [dir, why] of [
      [link, 'is a symlink'],
      [ww, 'is writable by others \\(mode 0777\\)'],
      [theirs, `is owned by uid ${u.uid}, not 0`],
    ] as const) {
      const r = await gv(repo, ['mount', mnt], { env: { GENVAULT_RUN_DIR: dir } });
      expect(r.code).toBe(1);
      expect(oneLine(r.stderr)).toMatch(new RegExp(`^genvault: run directory ${dir} ${why}: refusing$`));
      expect(await isMounted(mnt)).toBe(false);
      const fg = await gv(repo, ['mount', mnt, '--foreground'], { env: { GENVAULT_RUN_DIR: dir } });
      expect(fg.code).toBe(1);
      expect(oneLine(fg.stderr)).toMatch(/run directory .*: refusing$/);
      expect(await isMounted(mnt)).toBe(false);
    }
    expect(await fs.readdir(target)).toEqual([]);

    // An explicit --log that is a symlink (planted by the user) is not followed.
    const victim = s.path('victim2');
    await fs.writeFile(victim, 'keep\n');
    const logLink = path.join(shared, 'admin.log');
    expect((await u.run('ln', ['-s', victim, logLink])).code).toBe(0);
    const r = await gv(repo, ['mount', mnt, '--log', logLink], { env: { GENVAULT_RUN_DIR: s.path('run') } });
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/cannot open log file .*admin\.log: is a symlink \(not followed\)/);
    expect(await isMounted(mnt)).toBe(false);
    expect(await fs.readFile(victim, 'utf8')).toBe('keep\n');
  });

  it('defaults to /run/genvault as root', () => {
    const saved = process.env.GENVAULT_RUN_DIR;
    delete process.env.GENVAULT_RUN_DIR;
    try {
      expect(runDirPath()).toBe('/run/genvault');
    } finally {
      if (saved !== undefined) process.env.GENVAULT_RUN_DIR = saved;
    }
  });
});

describe('job files and identities controlled by someone else', () => {
  let sshd: Sshd;
  beforeAll(async () => {
    sshd = await startSshd(s);
  });
  afterAll(async () => {
    await sshd?.stop();
  });

  let n = 0;
  /** A job file in `dir` whose pre-hook touches a marker; returns both paths. */
  async function jobFile(dir: string, opts: { source?: string; ssh?: string } = {}): Promise<{ file: string; marker: string }> {
    n++;
    const marker = s.path(`marker-${n}`);
    const file = path.join(dir, `jobs-${n}.yaml`);
    const lines = [
      `repository: ${repo}`,
      'jobs:',
      `  j${n}:`,
      `    source: ${opts.source ?? img}`,
      ...(opts.ssh ? [`    ssh: ${opts.ssh}`] : []),
      `    hooks: { pre: ["touch ${marker}"] }`,
      '',
    ];
    await fs.writeFile(file, lines.join('\n'), { mode: 0o600 });
    return { file, marker };
  }

  async function expectRefused(file: string, marker: string, re: RegExp): Promise<void> {
    for (const args of [['run', '--all', '-c', file], ['run', '--check', '-c', file]]) {
      const r = await gv(null, args);
      expect(r.code, r.stderr).toBe(1);
      expect(oneLine(r.stderr)).toMatch(re);
      expect(r.stdout).toBe('');
    }
    await expect(fs.access(marker)).rejects.toThrow();
  }

  it('refuses a job file owned by another user, writable by others or group, or in a writable directory', async () => {
    const etc = s.path('etc');
    await fs.mkdir(etc, { mode: 0o755 });

    const owned = await jobFile(etc);
    await fs.chown(owned.file, u.uid, u.gid);
    await expectRefused(owned.file, owned.marker, new RegExp(`^genvault: ${owned.file}: owned by uid ${u.uid} \\(not root\\): refusing$`));

    const ww = await jobFile(etc);
    await fs.chmod(ww.file, 0o666);
    await expectRefused(ww.file, ww.marker, new RegExp(`^genvault: ${ww.file}: writable by others \\(mode 0666\\): refusing$`));

    const gw = await jobFile(etc);
    await fs.chmod(gw.file, 0o660);
    await expectRefused(gw.file, gw.marker, /: writable by group \(mode 0660\): refusing$/);

    // Root's own 0600 file, but in a directory anyone may write to (sticky or not).
    const inShared = await jobFile(shared);
    await expectRefused(
      inShared.file,
      inShared.marker,
      new RegExp(`^genvault: ${shared}: directory holding ${path.basename(inShared.file)} is writable by others \\(mode 1777\\): refusing$`),
    );
    // A symlink in a proper directory to a file in a writable one.
    const link = path.join(etc, 'linked.yaml');
    await fs.symlink(inShared.file, link);
    await expectRefused(link, inShared.marker, /directory holding linked\.yaml is writable by others/);

    // A proper file runs, and its hook with it.
    const good = await jobFile(etc);
    const check = await gv(null, ['run', '--check', '-c', good.file]);
    expect(check.code, check.stderr).toBe(0);
    const r = await gv(null, ['run', '--all', '-c', good.file]);
    expect(r.code, r.stderr).toBe(0);
    await fs.access(good.marker);
  });

  it('refuses an SSH identity readable by others (0644), in a job and with -i; 0600 works', async () => {
    const etc = s.path('etc-ssh');
    await fs.mkdir(etc, { mode: 0o755 });
    const loose = path.join(etc, 'id-loose');
    await fs.copyFile(sshd.userKey, loose);
    await fs.chmod(loose, 0o644);
    const tight = path.join(etc, 'id-tight');
    await fs.copyFile(sshd.userKey, tight);
    await fs.chmod(tight, 0o600);
    const env = { SSH_AUTH_SOCK: '' };
    const source = sshd.url(img);

    const bad = await jobFile(etc, { source, ssh: `{ identity: ${loose}, known-hosts: ${sshd.knownHosts}, mode: plain }` });
    const check = await gv(null, ['run', '--check', '-c', bad.file], { env });
    expect(check.code).toBe(1);
    expect(oneLine(check.stderr)).toMatch(new RegExp(`^${bad.file}: jobs\\.j${n}\\.ssh: ${loose}: readable by others \\(mode 0644; a private key must be 0600\\): refusing$`));
    const run = await gv(null, ['run', '--all', '-c', bad.file], { env });
    expect(run.code).toBe(1);
    expect(oneLine(run.stderr.replace(/.*native crypto binding.*\n/, ''))).toMatch(new RegExp(`${loose}: readable by others .*: refusing`));
    await expect(fs.access(bad.marker)).rejects.toThrow();

    const direct = await gv(repo, ['backup', source, '--name', 'vm-ssh', '--ssh-mode', 'plain', '-i', loose, '--known-hosts', sshd.knownHosts], { env });
    expect(direct.code).toBe(1);
    expect(oneLine(direct.stderr.replace(/.*native crypto binding.*\n/, ''))).toMatch(new RegExp(`^genvault: ${loose}: readable by others \\(mode 0644; a private key must be 0600\\): refusing$`));

    const good = await jobFile(etc, { source, ssh: `{ identity: ${tight}, known-hosts: ${sshd.knownHosts}, mode: plain }` });
    const ok = await gv(null, ['run', '--all', '-c', good.file], { env });
    expect(ok.code, ok.stderr).toBe(0);
    await fs.access(good.marker);
  });
});

/**
 * README promises about SSH that no other test covered, each with real parts: a real
 * sshd on 127.0.0.1, a real ssh-agent, real key files under a scratch HOME, a remote
 * session without python3 on its PATH, and a job whose SSH connection is killed while
 * its source is being read.
 *
 * - "Keys as OpenSSH: -i FILE, else ssh-agent (SSH_AUTH_SOCK), else ~/.ssh/id_ed25519,
 *   id_ecdsa, id_rsa"
 * - "`auto` (default) picks the agent when the remote has python3" (else `cat`), and
 *   restore to ssh:// uses "`cat` without python3"
 * - "post-hooks always run (over a new connection if the old one dropped)"
 */
import { spawn } from 'node:child_process';
import { constants as C } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { RunRecord } from '../src/jobs/history.js';
import { CLI, Scratch, gv, gvOk, must, openersOf, prng, sh, sha256File, text } from './helpers.js';
import { Sshd, fingerprint, keygen, startSshAgent, startSshd } from './sshd.js';

let s: Scratch;
let sshd: Sshd;
let repo: string;
let disk: string;
let diskSha: string;

/** No agent unless a test gives one; HOME is set per test to a scratch directory. */
const noAgent = { SSH_AUTH_SOCK: '' };

beforeAll(async () => {
  s = await Scratch.create('genvault-sshp-');
  // PATH and HOME from authorized_keys `environment=` (test 3: a session without python3).
  sshd = await startSshd(s, 'sshd', { config: ['PermitUserEnvironment PATH,HOME'] });
  repo = s.path('repo');
  disk = s.path('disk.img');
  // 8 MiB: random, a zero run, text; seeded.
  const img = Buffer.alloc(8 << 20);
  prng(2101, 3 << 20).copy(img, 0);
  text(2102, 3 << 20).copy(img, 5 << 20);
  await fs.writeFile(disk, img);
  diskSha = await sha256File(disk);
  await gvOk(repo, ['init']);
});

afterAll(async () => {
  await sshd?.stop();
  await s?.cleanup();
});

/** Non-empty stderr lines, without the (environment-dependent) native crypto notice. */
function errLines(stderr: string): string[] {
  return stderr.trim().split('\n').filter((l) => l && !/native crypto binding/.test(l));
}

/** Exit 1 and exactly one line on stderr, matching re. */
function expectOneLine(r: { code: number; stderr: string }, re: RegExp): void {
  expect(r.code, r.stderr).toBe(1);
  const lines = errLines(r.stderr);
  expect(lines, r.stderr).toHaveLength(1);
  expect(lines[0]).toMatch(re);
}

/** Wait for a condition that an event outside this process makes true (a log line arriving). */
async function until<T>(what: string, f: () => T | null | undefined | false, ms = 10_000): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = f();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** A HOME with an empty ~/.ssh, plus the given private keys under their OpenSSH names. */
async function scratchHome(name: string, keys: Record<string, string> = {}): Promise<string> {
  const home = s.path(name);
  await fs.mkdir(path.join(home, '.ssh'), { recursive: true, mode: 0o700 });
  for (const [as, from] of Object.entries(keys)) {
    await fs.copyFile(from, path.join(home, '.ssh', as));
    await fs.chmod(path.join(home, '.ssh', as), 0o600);
  }
  return home;
}

/** Generations of an image in the repository. */
async function gens(name: string): Promise<Array<{ id: string }>> {
  return (JSON.parse(await gvOk(repo, ['list', '--json'])) as Array<{ id: string; name: string }>).filter((g) => g.name === name);
}

/** The latest generation of `name` restored here is byte-identical to the source disk. */
async function expectLatestIsDisk(name: string): Promise<void> {
  const out = s.path(`${name}.restored`);
  await fs.rm(out, { force: true });
  await gvOk(repo, ['restore', `${name}@latest`, out]);
  expect(await sha256File(out)).toBe(diskSha);
  await fs.rm(out);
}

/** Back up the disk over ssh:// with only the environment's keys (no -i); returns the run and who logged in. */
async function backupWith(name: string, env: NodeJS.ProcessEnv) {
  const logins = sshd.acceptedKeys().length;
  const r = await gv(repo, ['backup', sshd.url(disk), '--name', name, '--known-hosts', sshd.knownHosts], { env });
  // sshd logs the login long before the backup ends; its stderr reaches us asynchronously.
  const accepted = r.code === 0 ? await until('the login in the sshd log', () => sshd.acceptedKeys().length > logins && sshd.acceptedKeys().slice(logins)) : [];
  return { ...r, accepted };
}

describe('authentication without -i', () => {
  it('logs in with a key held only by a real ssh-agent (SSH_AUTH_SOCK); without it there is no key at all', async () => {
    const home = await scratchHome('home-agent');
    const key = s.path('agent_key');
    await keygen(key);
    await sshd.authorize(`${key}.pub`);
    const fp = await fingerprint(`${key}.pub`);

    const sock = s.path('agent.sock');
    const stopAgent = await startSshAgent(s, sock);
    try {
      const add = await sh('ssh-add', [key], { env: { SSH_AUTH_SOCK: sock } });
      expect(add.code, add.stderr).toBe(0);
      // From now on the key exists only in the agent.
      await fs.rm(key);

      // HOME has no keys and there is no -i: without the agent, nothing to log in with.
      const none = await gv(repo, ['backup', sshd.url(disk), '--name', 'agent', '--known-hosts', sshd.knownHosts], { env: { ...noAgent, HOME: home } });
      expectOneLine(none, /^genvault: no SSH key to log in to root@127\.0\.0\.1:\d+: give -i\/--identity FILE, start ssh-agent, or create ~\/\.ssh\/id_ed25519$/);

      const r = await backupWith('agent', { HOME: home, SSH_AUTH_SOCK: sock });
      expect(r.code, r.stderr).toBe(0);
      expect(r.accepted).toEqual([fp]);
      expect(await gens('agent')).toHaveLength(1);
      await expectLatestIsDisk('agent');

      // The agent gone, its socket still named: no other key, so one line that says so.
      await stopAgent();
      const gone = await gv(repo, ['backup', sshd.url(disk), '--name', 'agent', '--known-hosts', sshd.knownHosts], { env: { HOME: home, SSH_AUTH_SOCK: sock } });
      expectOneLine(gone, /^genvault: authentication refused by root@127\.0\.0\.1:\d+ \(tried ssh-agent \(failed to connect to agent\)\)$/);
    } finally {
      await stopAgent();
    }
  });

  it('falls back to ~/.ssh/id_ecdsa and ~/.ssh/id_rsa; a key sshd refuses is one clear line, exit 1', async () => {
    const ecdsa = s.path('ecdsa_key');
    const rsa = s.path('rsa_key');
    const refusedRsa = s.path('refused_rsa_key');
    await Promise.all([keygen(ecdsa, 'ecdsa'), keygen(rsa, 'rsa'), keygen(refusedRsa, 'rsa')]);
    await sshd.authorize(`${ecdsa}.pub`);
    await sshd.authorize(`${rsa}.pub`);
    const [ecdsaFp, rsaFp] = await Promise.all([fingerprint(`${ecdsa}.pub`), fingerprint(`${rsa}.pub`)]);

    // Only ~/.ssh/id_ecdsa.
    const h1 = await scratchHome('home-ecdsa', { id_ecdsa: ecdsa });
    const r1 = await backupWith('keys', { ...noAgent, HOME: h1 });
    expect(r1.code, r1.stderr).toBe(0);
    expect(r1.accepted).toEqual([ecdsaFp]);

    // SSH_AUTH_SOCK left over from an agent that is gone: skipped, as OpenSSH does.
    const stale = await backupWith('keys', { SSH_AUTH_SOCK: s.path('gone-agent.sock'), HOME: h1 });
    expect(stale.code, stale.stderr).toBe(0);
    expect(stale.accepted).toEqual([ecdsaFp]);

    // Only ~/.ssh/id_rsa.
    const h2 = await scratchHome('home-rsa', { id_rsa: rsa });
    const r2 = await backupWith('keys', { ...noAgent, HOME: h2 });
    expect(r2.code, r2.stderr).toBe(0);
    expect(r2.accepted).toEqual([rsaFp]);

    // A refused ~/.ssh/id_ed25519 first: the next key in OpenSSH's order still gets its turn.
    const h3 = await scratchHome('home-fallback', { id_ed25519: sshd.otherKey, id_rsa: rsa });
    const r3 = await backupWith('keys', { ...noAgent, HOME: h3 });
    expect(r3.code, r3.stderr).toBe(0);
    expect(r3.accepted).toEqual([rsaFp]);

    expect(await gens('keys')).toHaveLength(4);
    await expectLatestIsDisk('keys');

    // Only a key sshd does not accept.
    const h4 = await scratchHome('home-refused', { id_rsa: refusedRsa });
    const bad = await backupWith('refused', { ...noAgent, HOME: h4 });
    const file = path.join(h4, '.ssh', 'id_rsa').replace(/[.*+?^${}()|[\]\\/]/g, '\\$&');
    expectOneLine(bad, new RegExp(`^genvault: authentication refused by root@127\\.0\\.0\\.1:${sshd.port} \\(tried ${file}\\)$`));
    expect(await gens('refused')).toHaveLength(0);
  });
});

describe('--ssh-mode auto without python3 on the remote host', () => {
  /** A key whose sessions get a PATH of links to every standard tool except python*, and an empty HOME (no ~/.bashrc adding one back). */
  let nopyKey: string;

  beforeAll(async () => {
    const bin = s.path('nopython-bin');
    const remoteHome = s.path('nopython-home');
    await fs.mkdir(bin);
    await fs.mkdir(remoteHome);
    for (const dir of ['/usr/local/sbin', '/usr/local/bin', '/usr/sbin', '/usr/bin', '/sbin', '/bin']) {
      for (const name of await fs.readdir(dir).catch(() => [] as string[])) {
        if (/^python/i.test(name)) continue;
        await fs.symlink(path.join(dir, name), path.join(bin, name)).catch((e: NodeJS.ErrnoException) => {
          if (e.code !== 'EEXIST') throw e;
        });
      }
    }
    nopyKey = s.path('nopython_key');
    await keygen(nopyKey);
    await sshd.authorize(`${nopyKey}.pub`, `environment="PATH=${bin}",environment="HOME=${remoteHome}"`);

    // The setup does what it should: that session finds cat but no python3, the normal one finds python3.
    const probe = async (key: string) => {
      const r = await sh('ssh', [
        '-F', '/dev/null', '-o', 'BatchMode=yes', '-o', `UserKnownHostsFile=${sshd.knownHosts}`, '-o', 'IdentitiesOnly=yes',
        '-i', key, '-p', String(sshd.port), 'root@127.0.0.1', 'command -v cat; command -v python3 || echo no-python3',
      ], { env: noAgent });
      expect(r.code, r.stderr).toBe(0);
      return r.stdout.trim().split('\n');
    };
    expect(await probe(nopyKey)).toEqual([path.join(bin, 'cat'), 'no-python3']);
    expect((await probe(sshd.userKey))[1]).toMatch(/python3$/);
  });

  const ssh = (key: string) => ['-i', key, '--known-hosts', sshd.knownHosts];

  it('backup streams with cat, byte-identical; with python3 the same command uses the agent', async () => {
    // The CLI says "N of chunk data over SSH" exactly when the remote agent did the reading.
    const viaAgent = /, [\d.]+ (B|KiB|MiB) of chunk data over SSH$/m;

    const plain = await gv(repo, ['backup', sshd.url(disk), '--name', 'nopy', ...ssh(nopyKey)], { env: noAgent });
    expect(plain.code, plain.stderr).toBe(0);
    expect(plain.stdout).toMatch(/^nopy@[0-9a-f]+: 8\.00 MiB read/);
    expect(plain.stdout).not.toMatch(viaAgent);
    expect(errLines(plain.stderr)).toEqual([]);
    await expectLatestIsDisk('nopy');

    const agent = await gv(repo, ['backup', sshd.url(disk), '--name', 'withpy', ...ssh(sshd.userKey)], { env: noAgent });
    expect(agent.code, agent.stderr).toBe(0);
    expect(agent.stdout).toMatch(viaAgent);
    await expectLatestIsDisk('withpy');

    // And asking for the agent there is refused, so auto really did fall back.
    const forced = await gv(repo, ['backup', sshd.url(disk), '--name', 'nopy', '--ssh-mode', 'agent', ...ssh(nopyKey)], { env: noAgent });
    expectOneLine(forced, /cannot back up ssh:\/\/root@127\.0\.0\.1:\d+\/.*disk\.img incrementally: python3 not found on 127\.0\.0\.1/);
    expect(await gens('nopy')).toHaveLength(1);
  });

  it('restore to ssh:// streams into cat, byte-identical; with python3 it uses the writer', async () => {
    await gvOk(repo, ['backup', disk, '--name', 'to-restore']);
    const plainTarget = s.path('restored-nopython.img');
    const r = await gv(repo, ['restore', 'to-restore@latest', sshd.url(plainTarget), ...ssh(nopyKey), '--json'], { env: noAgent });
    expect(r.code, r.stderr).toBe(0);
    const res = JSON.parse(r.stdout);
    expect(res).toMatchObject({ mode: 'plain', sparse: false, bytes: 8 << 20, wireBytes: 8 << 20 });
    expect(await sha256File(plainTarget)).toBe(diskSha);
    // Nothing left behind under a temporary name.
    expect((await fs.readdir(s.dir)).filter((f) => f.includes('genvault-partial'))).toEqual([]);

    const writerTarget = s.path('restored-python.img');
    const w = JSON.parse(await gvOk(repo, ['restore', 'to-restore@latest', sshd.url(writerTarget), ...ssh(sshd.userKey), '--json']));
    expect(w).toMatchObject({ mode: 'agent', sparse: true });
    expect(w.wireBytes).toBeLessThan(8 << 20); // the zero run was not sent
    expect(await sha256File(writerTarget)).toBe(diskSha);

    const forced = await gv(repo, ['restore', 'to-restore@latest', sshd.url(s.path('never.img')), '--ssh-mode', 'agent', ...ssh(nopyKey)], { env: noAgent });
    expectOneLine(forced, /cannot restore to ssh:\/\/root@127\.0\.0\.1:\d+\/.*never\.img with the writer: python3 not found on 127\.0\.0\.1/);
    await expect(fs.stat(s.path('never.img'))).rejects.toThrow(/ENOENT/);
  });
});

describe('jobs', () => {
  it('a connection dropped while the source is read: post-hooks run over a new connection, the run is recorded failed', async () => {
    // The source is a FIFO this test feeds, so the connection dies mid-read for sure.
    const fifo = s.path('job-source.fifo');
    await must('mkfifo', [fifo]);
    const log = s.path('job-hooks.log');
    const jobDir = s.path('etc');
    await fs.mkdir(jobDir, { mode: 0o700 });
    const jobs = path.join(jobDir, 'jobs.yaml');
    await fs.writeFile(
      jobs,
      [
        `repository: ${repo}`,
        'jobs:',
        '  dropped:',
        `    source: ${sshd.url(fifo)}`,
        `    ssh: { identity: ${sshd.userKey}, known-hosts: ${sshd.knownHosts} }`,
        '    hooks:',
        `      pre: ['echo "pre $SSH_CONNECTION" >> ${log}']`,
        '      post:',
        `        - 'echo "post1 $GENVAULT_RESULT $SSH_CONNECTION" >> ${log}'`,
        `        - 'echo "post2 $GENVAULT_PHASE $SSH_CONNECTION" >> ${log}'`,
        '',
      ].join('\n'),
      { mode: 0o600 },
    );
    // Hooks run as root: the job file must be root's and not writable by others.
    await fs.chmod(jobs, 0o600);

    const logins = sshd.acceptedKeys().length;
    const child = spawn(process.execPath, [CLI, 'run', '-c', jobs, '--all', '--json'], {
      env: { ...process.env, ...noAgent, GENVAULT_NO_PROGRESS: '1' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout!.on('data', (b: Buffer) => (stdout += b.toString()));
    child.stderr!.on('data', (b: Buffer) => (stderr += b.toString()));
    const exited = new Promise<number>((r) => child.on('exit', (c) => r(c ?? -1)));
    s.onCleanup(async () => {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      // Release an open() of the FIFO for writing still waiting for a reader.
      await (await fs.open(fifo, C.O_RDONLY | C.O_NONBLOCK)).close();
    });

    // Opening the FIFO for writing returns once the remote side opened it to read.
    const opening = fs.open(fifo, 'w');
    const first = await Promise.race([opening.then(() => 'open' as const), exited.then(() => 'exit' as const)]);
    if (first === 'exit') {
      const unblock = await fs.open(fifo, C.O_RDONLY | C.O_NONBLOCK);
      await (await opening).close();
      await unblock.close();
      throw new Error(`genvault exited before reading its source: ${stderr}`);
    }
    const w = await opening;
    try {
      // Returns once the remote reader took (nearly) all of it: the read is under way.
      await w.write(prng(2103, 6 << 20));
      // Who reads the FIFO on the "remote" side, and the sshd serving that connection.
      const readers = await openersOf(fifo);
      expect(readers.length, 'a process reading the FIFO').toBeGreaterThan(0);
      const session = [...new Set((await Promise.all(readers.map((p) => sshd.sessionOf(p)))).flat())];
      expect(session.length, 'the sshd serving the reader').toBeGreaterThan(0);
      for (const pid of session) process.kill(pid, 'SIGKILL');
      const code = await exited;
      expect(code, stderr).toBe(1);
    } finally {
      await w.close().catch(() => undefined);
    }

    const rec = (JSON.parse(stdout) as RunRecord[])[0]!;
    expect(rec.status).toBe('failed');
    expect(rec.stage).toBe('backup');
    expect(rec.error).toMatch(/connection (to .* )?lost/);
    expect(rec.hooks.map((h) => [h.phase, h.on, h.ok])).toEqual([
      ['pre', 'source', true],
      ['post', 'source', true],
      ['post', 'source', true],
    ]);
    // Both post-hooks ran on the host, after the read failed, over a second connection.
    const lines = (await fs.readFile(log, 'utf8')).trim().split('\n');
    const conn = (l: string) => / (127\.0\.0\.1 \d+ 127\.0\.0\.1 \d+)$/.exec(l)?.[1];
    expect(lines.map((l) => l.replace(/ 127\.0\.0\.1 .*$/, ''))).toEqual(['pre', 'post1 failed', 'post2 post']);
    expect(conn(lines[0]!)).toMatch(new RegExp(` ${sshd.port}$`));
    expect(conn(lines[1]!)).toBeDefined();
    expect(conn(lines[1]!)).not.toBe(conn(lines[0]!));
    expect(conn(lines[2]!)).toBe(conn(lines[1]!));
    await until('both logins in the sshd log', () => sshd.acceptedKeys().length - logins >= 2);
    expect(sshd.acceptedKeys().length - logins).toBe(2);

    // Recorded in the repository: status sees the failed run; no generation was made.
    const st = await gv(null, ['status', '-c', jobs, '--json'], { env: noAgent });
    expect(st.code).toBe(2);
    const job = JSON.parse(st.stdout).jobs[0];
    expect(job).toMatchObject({ job: 'dropped', state: 'CRIT' });
    expect(job.lastError).toBe(rec.error);
    expect(await gens('dropped')).toHaveLength(0);
  });
});

/**
 * ssh:// through the OpenSSH client configuration, against two real sshds on 127.0.0.1:
 * a jump host (A, which may forward only to B) and a target (B). An alias in
 * ~/.ssh/config with HostName, Port, User, IdentityFile with %-tokens and ProxyJump
 * reaches B through A with the built-in client, and with `--ssh-command ssh`; the
 * order of precedence (command line, then ~/.ssh/config, then /etc/ssh/ssh_config); one
 * line for a bad config.
 */
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseJobsText } from '../src/jobs/config.js';
import { expandPath, hostPatternsMatch, lookupHostConfig, sshConfigFiles } from '../src/source/ssh-config.js';
import { resolveHost } from '../src/source/ssh.js';
import { splitCommand } from '../src/source/ssh-command.js';
import { Scratch, gv, prng, sh, sha256File, text } from './helpers.js';
import { Sshd, fingerprint, freePort, startSshAgent, startSshd } from './sshd.js';

let s: Scratch;
let jump: Sshd; // A
let target: Sshd; // B
let home: string;
let keys: string;
let kh: string;
let absCfg: string;
let repo: string;
let img: string;
let imgHash: string;
let closedPort: number;

const env = () => ({ HOME: home, SSH_AUTH_SOCK: '' });

/** One line on stderr, exit 1, matching re. */
function expectOneLine(r: { code: number; stderr: string }, re: RegExp): void {
  expect(r.code, r.stderr).toBe(1);
  const lines = r.stderr.trim().split('\n').filter((l) => !/native crypto binding/.test(l));
  expect(lines, r.stderr).toHaveLength(1);
  expect(lines[0]).toMatch(re);
}

/** direct-tcpip requests sshd A granted to B's port (sshd logs them at DEBUG1). */
const forwardsToTarget = () => jump.log().split('\n').filter((l) => l.includes(`target 127.0.0.1 port ${target.port}`)).length;

/** The config, with the home directory as %d (built-in client) or as an absolute path (the system ssh reads the passwd home). */
function configText(homeToken: string, extra: string[] = []): string {
  return [
    ...extra,
    'Host jump',
    '  HostName 127.0.0.1',
    `  Port ${jump.port}`,
    'Host target',
    '  HostName 127.0.0.1',
    `  Port ${target.port}`,
    '  ProxyJump jump',
    'Host blocked',
    '  HostName 127.0.0.1',
    `  Port ${closedPort}`,
    '  ProxyJump jump',
    'Host direct-b',
    '  HostName 127.0.0.1',
    `  Port ${target.port}`,
    'Host *',
    '  User root',
    `  IdentityFile ${homeToken}/.ssh/keys/%r@%h-%p`,
    `  UserKnownHostsFile ${homeToken}/.ssh/known_hosts_test`,
    '',
  ].join('\n');
}

beforeAll(async () => {
  s = await Scratch.create('genvault-sshcfg-');
  // The target first: the jump host may forward to its port only.
  target = await startSshd(s, 'sshd-b');
  s.onCleanup(() => target.stop());
  jump = await startSshd(s, 'sshd-a', { config: ['LogLevel DEBUG1', 'AllowTcpForwarding yes', `PermitOpen 127.0.0.1:${target.port}`] });
  s.onCleanup(() => jump.stop());
  closedPort = await freePort();

  home = s.path('home');
  keys = path.join(home, '.ssh', 'keys');
  await fs.mkdir(keys, { recursive: true, mode: 0o700 });
  await fs.chmod(path.join(home, '.ssh'), 0o700);
  // Each host's key under the name the IdentityFile tokens make: %r@%h-%p.
  await fs.copyFile(jump.userKey, path.join(keys, `root@127.0.0.1-${jump.port}`));
  await fs.copyFile(target.userKey, path.join(keys, `root@127.0.0.1-${target.port}`));
  kh = path.join(home, '.ssh', 'known_hosts_test');
  await fs.writeFile(kh, (await fs.readFile(jump.knownHosts, 'utf8')) + (await fs.readFile(target.knownHosts, 'utf8')), { mode: 0o600 });
  await fs.writeFile(path.join(home, '.ssh', 'config'), configText('%d'), { mode: 0o600 });
  absCfg = s.path('ssh_config_abs');
  await fs.writeFile(absCfg, configText(home), { mode: 0o600 });

  repo = s.path('repo');
  img = s.path('vm.img');
  await fs.writeFile(img, Buffer.concat([prng(1, 5 << 20), Buffer.alloc(3 << 20), text(2, 2 << 20), prng(3, 12345)]));
  imgHash = await sha256File(img);
  const init = await gv(repo, ['init']);
  expect(init.code, init.stderr).toBe(0);
}, 120_000);

afterAll(async () => {
  await s?.cleanup();
});

describe('config resolution (in-process)', () => {
  it('matches Host patterns as OpenSSH: *, ? for one character, !negation, first value wins', async () => {
    expect(hostPatternsMatch(['web?'], 'web1')).toBe(true);
    expect(hostPatternsMatch(['web?'], 'web')).toBe(false);
    expect(hostPatternsMatch(['web?'], 'web12')).toBe(false);
    expect(hostPatternsMatch(['*.example.org', '!bad.example.org'], 'a.example.org')).toBe(true);
    expect(hostPatternsMatch(['*.example.org', '!bad.example.org'], 'bad.example.org')).toBe(false);
    expect(hostPatternsMatch(['!x'], 'y')).toBe(false); // a negation alone matches nothing
    const f = s.path('cfg-first');
    await fs.writeFile(f, ['Port 1000', 'Host x*', '  Port 1001', '  User first', 'Host x', '  Port 1002', '  User second', 'IdentityFile /k1', 'Host *', '  IdentityFile /k2', ''].join('\n'));
    const c = await lookupHostConfig('x', { user: f, system: null });
    expect(c.values.get('port')).toEqual(['1000']); // before any Host line: applies to all, and came first
    expect(c.values.get('user')).toEqual(['first']);
    expect(c.values.get('identityfile')).toEqual(['/k1', '/k2']); // every IdentityFile counts
    // Include: files in glob order, inside a Host block only when it matches.
    const d = s.path('conf.d');
    await fs.mkdir(d);
    await fs.writeFile(path.join(d, '20-b.conf'), 'Host y\n  Port 2020\n');
    await fs.writeFile(path.join(d, '10-a.conf'), 'User fromdir\nHost y\n  Port 1010\n');
    await fs.writeFile(path.join(d, 'skip.txt'), 'User nottaken\n');
    const inc = s.path('cfg-include');
    await fs.writeFile(inc, ['Host nomatch', `  Include ${d}/*.conf`, 'Host y', `  Include ${d}/*.conf`, '  User late', ''].join('\n'));
    const y = await lookupHostConfig('y', { user: inc, system: null });
    expect(y.values.get('user')).toEqual(['fromdir']);
    expect(y.values.get('port')).toEqual(['1010']);
    expect((await lookupHostConfig('z', { user: inc, system: null })).values.size).toBe(0);
  });

  it('takes the command line over ~/.ssh/config over /etc/ssh/ssh_config', async () => {
    const user = s.path('cfg-user');
    const system = s.path('cfg-system');
    await fs.writeFile(user, ['Host h', '  Port 1111', 'Host *', '  User fromuser', ''].join('\n'));
    await fs.writeFile(system, ['Host h', '  Port 2222', '  User fromsystem', '  HostName real.%h.example', '  StrictHostKeyChecking accept-new', '  UserKnownHostsFile /kh/%h-%p', ''].join('\n'));
    const files = { user, system };
    const r = await resolveHost({ host: 'h', path: '/img' }, {}, files);
    expect(r.spec).toMatchObject({ user: 'fromuser', host: 'real.h.example', port: 1111, alias: { name: 'h' } });
    expect(r.strict).toBe('accept-new');
    expect(r.knownHosts).toEqual(['/kh/real.h.example-1111']);
    const flags = await resolveHost({ host: 'h', user: 'bob', port: 22, path: '/img' }, { identity: '/id', knownHosts: '/kh2', acceptNewHostKey: false }, files);
    expect(r.identity).toBeUndefined();
    expect(flags.spec).toMatchObject({ user: 'bob', port: 22, host: 'real.h.example' });
    expect(flags.identity).toBe('/id');
    expect(flags.knownHosts).toEqual(['/kh2']);
    // Only the system file: its values apply.
    const sys = await resolveHost({ host: 'h', path: '/img' }, {}, { user: null, system });
    expect(sys.spec).toMatchObject({ user: 'fromsystem', port: 2222 });
    // --ssh-config FILE replaces both files (as ssh -F); none reads nothing; GENVAULT_SSH_CONFIG is the default.
    expect(sshConfigFiles('none')).toEqual({ user: null, system: null });
    expect(sshConfigFiles('/x/cfg')).toEqual({ user: '/x/cfg', system: null, given: true });
    expect(sshConfigFiles()).toEqual({ user: path.join(os.homedir(), '.ssh', 'config'), system: '/etc/ssh/ssh_config' });
  });

  it('expands %-tokens and ~ in file names, and refuses an unknown token', () => {
    const t = { host: 'h.example', original: 'h', port: 2200, user: 'bob' };
    const me = os.userInfo().username;
    expect(expandPath('~/.ssh/%r@%h:%p-%n-%u-%%', t, 'here')).toBe(path.join(os.homedir(), `.ssh/bob@h.example:2200-h-${me}-%`));
    expect(expandPath('%d/k', t, 'here')).toBe(path.join(os.homedir(), 'k'));
    expect(expandPath('id_x', t, 'here')).toBe(path.resolve('id_x'));
    expect(() => expandPath('/k/%Z', t, 'cfg line 3')).toThrow(/cfg line 3: unknown token %Z/);
  });

  it('never applies a Match block (it is skipped with a warning)', async () => {
    const f = s.path('cfg-match');
    await fs.writeFile(f, ['Match host m', '  Port 9999', 'Host m', '  Port 1234', ''].join('\n'));
    const c = await lookupHostConfig('m', { user: f, system: null });
    expect(c.values.get('port')).toEqual(['1234']);
  });

  it('takes ssh: { config, command } in a job file', () => {
    const f = parseJobsText('jobs:\n  a:\n    source: ssh://target/img\n    ssh: { config: cfg/ssh_config, command: "ssh -F /x" }\n', '/etc/gv/jobs.yaml');
    expect(f.jobs[0]!.ssh).toMatchObject({ config: '/etc/gv/cfg/ssh_config', command: 'ssh -F /x' });
    const none = parseJobsText('jobs:\n  a:\n    source: ssh://target/img\n    ssh: { config: none }\n', '/etc/gv/jobs.yaml');
    expect(none.jobs[0]!.ssh.config).toBe('none');
  });

  it('splits --ssh-command as a shell would for plain words and quotes', () => {
    expect(splitCommand(`ssh -F "/a b/cfg" -o 'X=1'`)).toEqual(['ssh', '-F', '/a b/cfg', '-o', 'X=1']);
  });
});

describe('ssh://alias through ~/.ssh/config with the built-in client', () => {
  it('backs up ssh://target/... through the jump host and restores byte-identical, to a file and to ssh://target', async () => {
    const before = forwardsToTarget();
    const r = await gv(repo, ['backup', `ssh://target${img}`, '--name', 'cfg', '--json'], { env: env() });
    expect(r.code, r.stderr).toBe(0);
    const g = JSON.parse(r.stdout);
    expect(g.source).toBe(`ssh://root@target${img}`);
    expect(g.size).toBe((await fs.stat(img)).size);
    // Through A: A granted a forward to B's port, and each logged in with its own key (%h-%p).
    expect(forwardsToTarget()).toBe(before + 1);
    expect(jump.acceptedKeys()).toContain(await fingerprint(`${jump.userKey}.pub`));
    expect(target.acceptedKeys()).toContain(await fingerprint(`${target.userKey}.pub`));
    const out = s.path('restored.img');
    const local = await gv(repo, ['restore', 'cfg@latest', out], { env: env() });
    expect(local.code, local.stderr).toBe(0);
    expect(await sha256File(out)).toBe(imgHash);
    const remoteOut = s.path('restored-remote.img');
    const remote = await gv(repo, ['restore', 'cfg@latest', `ssh://target${remoteOut}`], { env: env() });
    expect(remote.code, remote.stderr).toBe(0);
    expect(await sha256File(remoteOut)).toBe(imgHash);
    expect(forwardsToTarget()).toBe(before + 2);
  });

  it('goes through the jump host only: a forward it does not permit fails with one line', async () => {
    const r = await gv(repo, ['backup', `ssh://blocked${img}`, '--name', 'blocked'], { env: env() });
    expectOneLine(r, new RegExp(`cannot reach \\[127\\.0\\.0\\.1\\]:${closedPort} through the jump host root@jump.*prohibited`));
    expect(jump.log()).toMatch(new RegExp(`to connect to host 127\\.0\\.0\\.1 port ${closedPort}, but the request was denied`));
  });

  it('lets the command line win: -i, --known-hosts, and the port in the URL', async () => {
    const wrongKey = await gv(repo, ['backup', `ssh://direct-b${img}`, '--name', 'prec', '-i', jump.otherKey], { env: env() });
    expectOneLine(wrongKey, /authentication refused by root@direct-b \(tried identity .*other_key\)/);
    const emptyKh = s.path('kh-empty');
    await fs.writeFile(emptyKh, '', { mode: 0o600 });
    const unknown = await gv(repo, ['backup', `ssh://direct-b${img}`, '--name', 'prec', '--known-hosts', emptyKh], { env: env() });
    expectOneLine(unknown, new RegExp(`host \\[127\\.0\\.0\\.1\\]:${target.port} is not in .*kh-empty`));
    // The URL's port over the config's: A's port, so A's key by the %p token, and A logs it.
    const logins = jump.acceptedKeys().length;
    const port = await gv(repo, ['backup', `ssh://direct-b:${jump.port}${img}`, '--name', 'prec', '--json'], { env: env() });
    expect(port.code, port.stderr).toBe(0);
    expect(JSON.parse(port.stdout).source).toBe(`ssh://root@direct-b:${jump.port}${img}`);
    expect(jump.acceptedKeys().length).toBe(logins + 1);
  });

  it('reads --ssh-config FILE or GENVAULT_SSH_CONFIG instead of ~/.ssh/config', async () => {
    const elsewhere = { HOME: s.path('empty-home'), SSH_AUTH_SOCK: '' };
    await fs.mkdir(elsewhere.HOME, { recursive: true });
    const byFlag = await gv(repo, ['backup', `ssh://target${img}`, '--name', 'cfgfile', '--ssh-config', absCfg], { env: elsewhere });
    expect(byFlag.code, byFlag.stderr).toBe(0);
    const byEnv = await gv(repo, ['backup', `ssh://target${img}`, '--name', 'cfgfile'], { env: { ...elsewhere, GENVAULT_SSH_CONFIG: absCfg } });
    expect(byEnv.code, byEnv.stderr).toBe(0);
    const missing = await gv(repo, ['backup', `ssh://target${img}`, '--name', 'cfgfile', '--ssh-config', s.path('nope')], { env: elsewhere });
    expectOneLine(missing, /^genvault: cannot read SSH config .*nope: no such file/);
  });

  it('fails with one line naming the file and line of a bad value, and on ProxyCommand', async () => {
    const bad = s.path('cfg-bad');
    await fs.writeFile(bad, ['Host target', '  HostName 127.0.0.1', '  Port twenty-two', ''].join('\n'), { mode: 0o600 });
    const r = await gv(repo, ['backup', `ssh://target${img}`, '--name', 'bad', '--ssh-config', bad], { env: env() });
    expectOneLine(r, new RegExp(`^genvault: ${bad} line 3: bad Port "twenty-two"$`));
    await fs.writeFile(bad, ['Host target', '  User root', '  HostName 127.0.0.1 extra', ''].join('\n'), { mode: 0o600 });
    const two = await gv(repo, ['backup', `ssh://target${img}`, '--name', 'bad', '--ssh-config', bad], { env: env() });
    expectOneLine(two, new RegExp(`^genvault: ${bad} line 3: HostName takes one value, not "127\\.0\\.0\\.1 extra"$`));
    await fs.writeFile(bad, ['Host target', '  ProxyCommand nc %h %p', ''].join('\n'), { mode: 0o600 });
    const pc = await gv(repo, ['backup', `ssh://target${img}`, '--name', 'bad', '--ssh-config', bad], { env: env() });
    expectOneLine(pc, new RegExp(`^genvault: ${bad} line 2: ProxyCommand is not supported by genvault's SSH client: use --ssh-command ssh`));
    await fs.writeFile(bad, ['Host target', '  HostName "127.0.0.1', ''].join('\n'), { mode: 0o600 });
    const parse = await gv(repo, ['backup', `ssh://target${img}`, '--name', 'bad', '--ssh-config', bad], { env: env() });
    expectOneLine(parse, new RegExp(`^genvault: ${bad}: cannot parse it`));
  });
});

describe('StrictHostKeyChecking and jobs through the config', () => {
  /** A config file: the lines given first (so they win), then the usual aliases. */
  async function cfgWith(name: string, first: string[]): Promise<string> {
    const f = s.path(name);
    await fs.writeFile(f, configText(home, first), { mode: 0o600 });
    return f;
  }

  it('follows StrictHostKeyChecking: yes refuses, accept-new records, no goes on past a changed key with a warning', async () => {
    const fresh = s.path('kh-fresh');
    const yes = await cfgWith('cfg-strict-yes', [`UserKnownHostsFile ${fresh}`, 'StrictHostKeyChecking yes']);
    const refused = await gv(repo, ['backup', `ssh://direct-b${img}`, '--name', 'strict', '--ssh-config', yes], { env: env() });
    expectOneLine(refused, new RegExp(`host \\[127\\.0\\.0\\.1\\]:${target.port} is not in .*kh-fresh`));
    const acceptNew = await cfgWith('cfg-strict-new', [`UserKnownHostsFile ${fresh}`, 'StrictHostKeyChecking accept-new']);
    const added = await gv(repo, ['backup', `ssh://direct-b${img}`, '--name', 'strict', '--ssh-config', acceptNew], { env: env() });
    expect(added.code, added.stderr).toBe(0);
    expect(added.stderr).toMatch(/added host key of \[127\.0\.0\.1\]:\d+ to .*kh-fresh/);
    expect(await fs.readFile(fresh, 'utf8')).toContain(`[127.0.0.1]:${target.port} ${target.hostPub}`);
    // A changed key: refused under accept-new, taken with a warning under no; the file is left alone.
    const changed = s.path('kh-changed');
    const otherPub = (await fs.readFile(`${target.otherKey}.pub`, 'utf8')).split(' ').slice(0, 2).join(' ');
    await fs.writeFile(changed, `[127.0.0.1]:${target.port} ${otherPub}\n`, { mode: 0o600 });
    const strictNew = await cfgWith('cfg-strict-changed', [`UserKnownHostsFile ${changed}`, 'StrictHostKeyChecking accept-new']);
    expectOneLine(await gv(repo, ['backup', `ssh://direct-b${img}`, '--name', 'strict', '--ssh-config', strictNew], { env: env() }), /has CHANGED/);
    const no = await cfgWith('cfg-strict-no', [`UserKnownHostsFile ${changed}`, 'StrictHostKeyChecking no']);
    const goesOn = await gv(repo, ['backup', `ssh://direct-b${img}`, '--name', 'strict', '--ssh-config', no], { env: env() });
    expect(goesOn.code, goesOn.stderr).toBe(0);
    expect(goesOn.stderr).toMatch(/warning: host key for \[127\.0\.0\.1\]:\d+ has CHANGED .*StrictHostKeyChecking no/);
    expect(await fs.readFile(changed, 'utf8')).toBe(`[127.0.0.1]:${target.port} ${otherPub}\n`);
  });

  it('IdentitiesOnly yes: the agent offers only the keys an IdentityFile names (its .pub will do)', async () => {
    const sock = s.path('agent.sock');
    const stopAgent = await startSshAgent(s, sock);
    try {
      const add = await sh('ssh-add', [target.userKey], { env: { SSH_AUTH_SOCK: sock } });
      expect(add.code, add.stderr).toBe(0);
      // The IdentityFile itself does not exist; its .pub says which agent key it means.
      const io = s.path('io');
      await fs.mkdir(io, { recursive: true });
      const cfg = async (pub: string, only: string) => {
        await fs.copyFile(pub, path.join(io, 'only.pub'));
        const f = s.path(`cfg-io-${only}`);
        const lines = ['Host b', '  HostName 127.0.0.1', `  Port ${target.port}`, '  User root', `  UserKnownHostsFile ${kh}`];
        await fs.writeFile(f, [...lines, `  IdentitiesOnly ${only}`, `  IdentityFile ${io}/only`, ''].join('\n'), { mode: 0o600 });
        return f;
      };
      const withAgent = { HOME: s.path('empty-home'), SSH_AUTH_SOCK: sock };
      await fs.mkdir(withAgent.HOME, { recursive: true });
      const named = await gv(repo, ['backup', `ssh://b${img}`, '--name', 'io', '--ssh-config', await cfg(`${target.userKey}.pub`, 'yes')], { env: withAgent });
      expect(named.code, named.stderr).toBe(0);
      const other = await gv(repo, ['backup', `ssh://b${img}`, '--name', 'io', '--ssh-config', await cfg(`${jump.userKey}.pub`, 'yes')], { env: withAgent });
      expectOneLine(other, /authentication refused by root@b \(tried ssh-agent\)/);
      const notOnly = await gv(repo, ['backup', `ssh://b${img}`, '--name', 'io', '--ssh-config', await cfg(`${jump.userKey}.pub`, 'no')], { env: withAgent });
      expect(notOnly.code, notOnly.stderr).toBe(0);
    } finally {
      await stopAgent();
    }
  });

  it.each([
    ['the built-in client', ''],
    ['--ssh-command ssh', ', command: ssh'],
  ])('runs a job on ssh://target with hooks over one connection through the jump host (%s)', async (what, command) => {
    const log = s.path(`job-${command ? 'sys' : 'builtin'}.log`);
    const f = s.path(`job-${command ? 'sys' : 'builtin'}.yaml`);
    await fs.writeFile(
      f,
      [
        `repository: ${repo}`,
        'jobs:',
        '  viajump:',
        `    source: ssh://target${img}`,
        `    ssh: { config: ${absCfg}${command} }`,
        '    hooks:',
        `      pre: ['echo "pre $SSH_CONNECTION" >> ${log}']`,
        `      post: ['echo "post $SSH_CONNECTION" >> ${log}']`,
        '',
      ].join('\n'),
    );
    const logins = () => (target.log().match(/Accepted publickey/g) ?? []).length;
    const before = logins();
    const forwards = forwardsToTarget();
    const r = await gv(null, ['run', '-c', f, '--all'], { env: env() });
    expect(r.code, `${what}: ${r.stderr}`).toBe(0);
    const lines = (await fs.readFile(log, 'utf8')).trim().split('\n');
    const pre = /^pre 127\.0\.0\.1 (\d+) 127\.0\.0\.1 (\d+)$/.exec(lines[0]!);
    expect(pre, lines[0]).not.toBeNull();
    expect(pre![2]).toBe(String(target.port));
    expect(lines[1]).toBe(`post 127.0.0.1 ${pre![1]} 127.0.0.1 ${target.port}`);
    expect(logins() - before).toBe(1);
    expect(forwardsToTarget() - forwards).toBe(1);
  });
});

describe('--ssh-command ssh (the system OpenSSH client)', () => {
  it('backs up ssh://target/... through the same jump host and restores byte-identical', async () => {
    const before = forwardsToTarget();
    // The agent (chunk lists, then the chunks asked for) and plain cat, both over ssh's pipes.
    const r = await gv(repo, ['backup', `ssh://target${img}`, '--name', 'sys', '--ssh-command', 'ssh', '--ssh-config', absCfg, '--ssh-mode', 'agent'], { env: env() });
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/ of chunk data over SSH/);
    const plain = await gv(repo, ['backup', `ssh://target${img}`, '--name', 'sys', '--ssh-command', 'ssh', '--ssh-config', absCfg, '--ssh-mode', 'plain', '--json'], { env: env() });
    expect(plain.code, plain.stderr).toBe(0);
    expect(JSON.parse(plain.stdout).source).toBe(`ssh://root@target${img}`);
    expect(forwardsToTarget()).toBe(before + 2);
    const out = s.path('restored-sys.img');
    const remote = await gv(repo, ['restore', 'sys@latest', `ssh://target${out}`, '--ssh-command', `ssh -F ${absCfg}`], { env: env() });
    expect(remote.code, remote.stderr).toBe(0);
    expect(await sha256File(out)).toBe(imgHash);
    // One connection per run (a master and its control socket): one more forward for the restore.
    expect(forwardsToTarget()).toBe(before + 3);
  });

  it('fails with ssh’s reason on one line', async () => {
    const emptyKh = s.path('kh-empty-sys');
    await fs.writeFile(emptyKh, '', { mode: 0o600 });
    const r = await gv(repo, ['backup', `ssh://direct-b${img}`, '--name', 'sysbad', '--ssh-command', `ssh -F ${absCfg}`, '--known-hosts', emptyKh], { env: env() });
    expectOneLine(r, /^genvault: cannot connect to ssh:\/\/direct-b with ssh: Host key verification failed\./);
    const bad = s.path('cfg-bad-sys');
    await fs.writeFile(bad, ['Host target', '  Port twenty-two', ''].join('\n'), { mode: 0o600 });
    const cfg = await gv(repo, ['backup', `ssh://target${img}`, '--name', 'sysbad', '--ssh-command', 'ssh', '--ssh-config', bad], { env: env() });
    expectOneLine(cfg, /^genvault: ssh cannot use ssh:\/\/target: .*line 2: Bad port 'twenty-two'/);
  });
});

/**
 * Backups from a remote host over SSH, against a real OpenSSH sshd on 127.0.0.1 with
 * keys generated for the test: plain pulls restored byte-identical, host key and
 * authentication failures as one clear line, a missing remote path, a connection killed
 * mid-backup leaving no generation, and the remote Python agent's chunker matching
 * src/format/chunker.ts bit for bit.
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as backupModule from '../src/backup/backup.js';
import { chunkSegment } from '../src/format/chunker.js';
import { defaultConfig } from '../src/format/config.js';
import { AGENT_PY, openSshAgentSource } from '../src/source/ssh-agent.js';
import { checkHostKey, hostFieldMatches, parseKnownHosts, parseSshSpec } from '../src/source/ssh.js';
import { Scratch, gv, gvOk, makeDisk, must, openersOf, prng, sh, sha256File, text, writeFiles } from './helpers.js';
import { Sshd, freePort, startSshd } from './sshd.js';

let s: Scratch;
let sshd: Sshd | null = null;
let port = 0;
let repo: string;
let disk: string;
let home: string;
let userKey: string;
let otherKey: string;
let knownHosts: string;
let hostPub: string;

const noAgent = { SSH_AUTH_SOCK: '' };
/** Whether src/backup/backup.ts asks a chunked source for missing chunks only. */
const chunkedBackup = (backupModule as Record<string, unknown>).SUPPORTS_CHUNKED_SOURCES === true;

/** Bytes from a human size ("1.50 MiB"). */
function parseSize(t: string): number {
  const m = /^([\d.]+) (B|KiB|MiB|GiB)$/.exec(t)!;
  return Number(m[1]) * 1024 ** ['B', 'KiB', 'MiB', 'GiB'].indexOf(m[2]!);
}

const src = (p: string, user = 'root') => `ssh://${user}@127.0.0.1:${port}${p}`;
const sshArgs = () => ['-i', userKey, '--known-hosts', knownHosts];

beforeAll(async () => {
  s = await Scratch.create('genvault-ssh-');
  home = s.path('home');
  await fs.mkdir(path.join(home, '.ssh'), { recursive: true, mode: 0o700 });
  sshd = await startSshd(s);
  ({ port, userKey, otherKey, knownHosts, hostPub } = sshd);

  repo = s.path('repo');
  disk = s.path('vm.img');
  await makeDisk(s, disk, 64, async (dir) => {
    await writeFiles(dir, 3, 80, 250_000);
  });
  await gvOk(repo, ['init']);
});

afterAll(async () => {
  await sshd?.stop();
  await s?.cleanup();
});

/** One line on stderr, exit 1, matching re. */
function expectOneLine(r: { code: number; stderr: string }, re: RegExp): void {
  expect(r.code, r.stderr).toBe(1);
  const lines = r.stderr.trim().split('\n').filter((l) => !/native crypto binding/.test(l));
  expect(lines, r.stderr).toHaveLength(1);
  expect(lines[0]).toMatch(re);
}

describe('ssh:// sources', () => {
  it('parses specs and known_hosts entries, hashed and [host]:port', async () => {
    expect(parseSshSpec('ssh://bob@example.org:2222/dev/vg/x')).toEqual({ user: 'bob', host: 'example.org', port: 2222, path: '/dev/vg/x' });
    expect(parseSshSpec('ssh://[::1]/img').host).toBe('::1');
    expect(parseSshSpec('ssh://h/a%20b').path).toBe('/a b');
    expect(() => parseSshSpec('ssh://host')).toThrow(/expected ssh:\/\//);
    expect(hostFieldMatches('*.example.org,!bad.example.org', 'a.example.org')).toBe(true);
    expect(hostFieldMatches('*.example.org,!bad.example.org', 'bad.example.org')).toBe(false);
    // A hashed file made by OpenSSH itself.
    const f = s.path('kh-hashed');
    await fs.writeFile(f, `[127.0.0.1]:${port} ${hostPub}\nother.example ${hostPub}\n`);
    await must('ssh-keygen', ['-H', '-f', f]);
    const entries = parseKnownHosts(await fs.readFile(f, 'utf8'));
    expect(entries.every((e) => e.hosts.startsWith('|1|'))).toBe(true);
    const blob = Buffer.from(hostPub.split(' ')[1]!, 'base64');
    expect(checkHostKey(entries, '127.0.0.1', port, blob).status).toBe('ok');
    expect(checkHostKey(entries, '127.0.0.1', 22, blob).status).toBe('unknown');
    expect(checkHostKey(entries, 'other.example', 22, blob).status).toBe('ok');
  });

  it('pulls a disk image twice and restores it byte-identical', async () => {
    const first = await gv(repo, ['backup', src(disk), '--name', 'remote', '--ssh-mode', 'plain', ...sshArgs(), '--json'], { env: noAgent });
    expect(first.code, first.stderr).toBe(0);
    const g1 = JSON.parse(first.stdout);
    expect(g1.size).toBe(64 << 20);
    expect(g1.source).toBe(`ssh://root@127.0.0.1:${port}${disk}`);
    const second = JSON.parse(await gvOk(repo, ['backup', src(disk), '--name', 'remote', '--ssh-mode', 'plain', ...sshArgs(), '--json']));
    expect(second.stats.newStored).toBeLessThan(0.01 * second.size);
    expect(second.parent).toBe(g1.id);
    const out = s.path('restored.img');
    await gvOk(repo, ['restore', 'remote@latest', out]);
    expect(await sha256File(out)).toBe(await sha256File(disk));
    await fs.rm(out);
  });

  it('uses ~/.ssh keys, refuses an unknown host, and trusts it on first use only when asked', async () => {
    await fs.copyFile(userKey, path.join(home, '.ssh', 'id_ed25519'));
    const env = { ...noAgent, HOME: home };
    const refused = await gv(repo, ['backup', src(disk), '--name', 'tofu'], { env });
    expectOneLine(refused, new RegExp(`host \\[127\\.0\\.0\\.1\\]:${port} is not in .*known_hosts.*--accept-new-host-key`));
    const accepted = await gv(repo, ['backup', src(disk), '--name', 'tofu', '--accept-new-host-key'], { env });
    expect(accepted.code, accepted.stderr).toBe(0);
    const kh = await fs.readFile(path.join(home, '.ssh', 'known_hosts'), 'utf8');
    expect(kh).toContain(`[127.0.0.1]:${port} ${hostPub}`);
    // Strict again, now known; and a hashed known_hosts works the same.
    await must('ssh-keygen', ['-H', '-f', path.join(home, '.ssh', 'known_hosts')]);
    const again = await gv(repo, ['backup', src(disk), '--name', 'tofu'], { env });
    expect(again.code, again.stderr).toBe(0);
  });

  it('fails with one line when the host key changed, even with --accept-new-host-key', async () => {
    const bad = s.path('kh-changed');
    const otherPub = (await fs.readFile(`${otherKey}.pub`, 'utf8')).split(' ').slice(0, 2).join(' ');
    await fs.writeFile(bad, `[127.0.0.1]:${port} ${otherPub}\n`);
    for (const extra of [[], ['--accept-new-host-key']]) {
      const r = await gv(repo, ['backup', src(disk), '--name', 'changed', '-i', userKey, '--known-hosts', bad, ...extra], { env: noAgent });
      expectOneLine(r, new RegExp(`host key for \\[127\\.0\\.0\\.1\\]:${port} has CHANGED`));
    }
    expect(await fs.readFile(bad, 'utf8')).toBe(`[127.0.0.1]:${port} ${otherPub}\n`);
  });

  it('refuses a host known only by another key type, even with --accept-new-host-key, plain or hashed', async () => {
    // The server has an ed25519 host key; this known_hosts lists only an RSA key for it.
    const rsa = s.path('rsa_host_key');
    await must('ssh-keygen', ['-q', '-t', 'rsa', '-b', '2048', '-N', '', '-C', 'genvault-test', '-f', rsa]);
    const rsaPub = (await fs.readFile(`${rsa}.pub`, 'utf8')).split(' ').slice(0, 2).join(' ');
    const plain = s.path('kh-rsa-only');
    await fs.writeFile(plain, `[127.0.0.1]:${port} ${rsaPub}\n`);
    const hashed = s.path('kh-rsa-only-hashed');
    await fs.writeFile(hashed, `[127.0.0.1]:${port} ${rsaPub}\n`);
    await must('ssh-keygen', ['-H', '-f', hashed]);
    for (const kh of [plain, hashed]) {
      const before = await fs.readFile(kh, 'utf8');
      for (const extra of [['--accept-new-host-key'], []]) {
        const r = await gv(repo, ['backup', src(disk), '--name', 'othertype', '-i', userKey, '--known-hosts', kh, ...extra], { env: noAgent });
        expectOneLine(r, new RegExp(`host \\[127\\.0\\.0\\.1\\]:${port} offered a ssh-ed25519 key, but .* knows it only by ssh-rsa: refusing`));
      }
      expect(await fs.readFile(kh, 'utf8')).toBe(before);
    }
    // And the other way round, and the verdicts OpenSSH gives.
    const ed = Buffer.from(hostPub.split(' ')[1]!, 'base64');
    const rsaBlob = Buffer.from(rsaPub.split(' ')[1]!, 'base64');
    const edOnly = parseKnownHosts(`[127.0.0.1]:${port} ${hostPub}\n`);
    expect(checkHostKey(edOnly, '127.0.0.1', port, rsaBlob)).toEqual({ status: 'othertype', type: 'ssh-rsa', known: ['ssh-ed25519'] });
    expect(checkHostKey(edOnly, '127.0.0.1', port + 1, rsaBlob).status).toBe('unknown');
    const both = parseKnownHosts(`[127.0.0.1]:${port} ${rsaPub}\n[127.0.0.1]:${port} ${hostPub}\n`);
    expect(checkHostKey(both, '127.0.0.1', port, ed).status).toBe('ok');
    // A wildcard entry or a @revoked key: the first makes the host known, the second does not.
    expect(checkHostKey(parseKnownHosts(`[127.0.0.1]:* ${rsaPub}\n`), '127.0.0.1', port, ed).status).toBe('othertype');
    expect(checkHostKey(parseKnownHosts(`@revoked [127.0.0.1]:${port} ${rsaPub}\n`), '127.0.0.1', port, ed).status).toBe('unknown');
    const list = JSON.parse(await gvOk(repo, ['list', '--json']));
    expect(list.filter((g: { name: string }) => g.name === 'othertype')).toHaveLength(0);
  });

  it('fails with one line when the server refuses the key', async () => {
    const r = await gv(repo, ['backup', src(disk), '--name', 'wrongkey', '-i', otherKey, '--known-hosts', knownHosts], { env: noAgent });
    expectOneLine(r, /authentication refused by root@127\.0\.0\.1:\d+ \(tried identity .*other_key\)/);
    const missingKey = await gv(repo, ['backup', src(disk), '--name', 'wrongkey', '-i', s.path('nokey'), '--known-hosts', knownHosts], { env: noAgent });
    expectOneLine(missingKey, /cannot read identity file .*nokey: no such file/);
  });

  it('fails with one line for a missing remote path, a directory, and a refused connection', async () => {
    const r = await gv(repo, ['backup', src('/nonexistent/disk.img'), '--name', 'missing', ...sshArgs()], { env: noAgent });
    expectOneLine(r, /cannot read source ssh:\/\/root@127\.0\.0\.1:\d+\/nonexistent\/disk\.img: no such file or directory/);
    const dir = await gv(repo, ['backup', src(s.dir), '--name', 'missing', ...sshArgs()], { env: noAgent });
    expectOneLine(dir, /is a directory/);
    const closed = await freePort();
    const refused = await gv(repo, ['backup', `ssh://root@127.0.0.1:${closed}/x`, '--name', 'missing', ...sshArgs()], { env: noAgent });
    expectOneLine(refused, /cannot connect to .*connection refused/);
    const list = JSON.parse(await gvOk(repo, ['list', '--json']));
    expect(list.filter((g: { name: string }) => g.name === 'missing')).toHaveLength(0);
  });

  it('fails with one line when the remote path may not be read', async () => {
    // Write-only for everyone, root included (reading it is refused by the kernel).
    const wo = '/proc/sys/vm/compact_memory';
    const r = await gv(repo, ['backup', src(wo), '--name', 'denied', ...sshArgs()], { env: noAgent });
    expectOneLine(r, new RegExp(`cannot read source ssh://root@127\\.0\\.0\\.1:\\d+${wo}: permission denied`));
  });

  it('a connection killed mid-backup fails the backup and leaves no generation', async () => {
    // The remote path is a FIFO the test feeds, so the kill lands mid-transfer for sure.
    const fifo = s.path('feed.fifo');
    await must('mkfifo', [fifo]);
    const child = spawn(process.execPath, [path.resolve('dist/cli/main.js'), '-r', repo, 'backup', src(fifo), '--name', 'killed', ...sshArgs()], {
      env: { ...process.env, ...noAgent, GENVAULT_NO_PROGRESS: '1' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stderr = '';
    child.stderr!.on('data', (b: Buffer) => (stderr += b.toString()));
    const exited = new Promise<number>((r) => child.on('exit', (c) => r(c ?? -1)));
    const w = await fs.open(fifo, 'w'); // returns once the remote cat opened it
    await w.write(prng(7, 24 << 20));
    await new Promise((r) => setTimeout(r, 500));
    const pids = await sshd!.sessionPids();
    expect(pids.length).toBeGreaterThan(0);
    for (const pid of pids) process.kill(pid, 'SIGKILL');
    const code = await exited;
    await w.close().catch(() => undefined);
    expectOneLine({ code, stderr }, /backup of killed failed: connection (lost|to .* lost)/);
    const list = JSON.parse(await gvOk(repo, ['list', '--json']));
    expect(list.filter((g: { name: string }) => g.name === 'killed')).toHaveLength(0);
    // The repository is fine afterwards: the next backup of the same image works.
    const ok = await gv(repo, ['backup', src(disk), '--name', 'killed', ...sshArgs()], { env: noAgent });
    expect(ok.code, ok.stderr).toBe(0);
  });

  it('a remote reader killed by a signal fails the backup naming the signal', async () => {
    // The connection stays up: sshd reports the signal (exit-signal), and the line says which.
    const fifo = s.path('term.fifo');
    await must('mkfifo', [fifo]);
    const r = gv(repo, ['backup', src(fifo), '--name', 'termed', ...sshArgs()], { env: noAgent });
    const w = await fs.open(fifo, 'w'); // returns once the remote cat opened it
    await w.write(prng(8, 4 << 20));
    const readers = await openersOf(fifo);
    expect(readers.length).toBeGreaterThan(0);
    for (const pid of readers) process.kill(pid, 'SIGTERM');
    const res = await r;
    await w.close().catch(() => undefined);
    expectOneLine(res, /^genvault: reading ssh:\/\/root@127\.0\.0\.1:\d+\/.*term\.fifo: remote command killed by SIGTERM$/);
    const list = JSON.parse(await gvOk(repo, ['list', '--json']));
    expect(list.filter((g: { name: string }) => g.name === 'termed')).toHaveLength(0);
  });
});

describe('remote agent (incremental mode)', () => {
  const params = defaultConfig().chunking;

  const small = { block: 4096, min: 8192, maskBits: 2, max: 65536, segment: 1 << 20 };
  it.each([
    ['the repository default', params],
    ['small chunks and segments', small],
  ])('chunks exactly like src/format/chunker.ts (boundaries and SHA-256) with %s', async (_what, params) => {
    // Data, text, zero runs shorter and longer than min, a max-size run, an odd tail.
    const parts: Buffer[] = [
      prng(1, 3 << 20), Buffer.alloc(8192), text(2, 1 << 20), Buffer.alloc(40_000 - (40_000 % 4096)), prng(3, 5000),
      Buffer.alloc(1 << 20), prng(4, 9 << 20), text(5, 777_777), Buffer.alloc(3000), prng(6, 12345),
    ];
    const data = Buffer.concat(parts);
    const f = s.path(`parity-${params.segment}.bin`);
    await fs.writeFile(f, data);
    const expected: Array<[number, number, boolean, string | null]> = [];
    for (let off = 0; off < data.length; off += params.segment) {
      const seg = Buffer.from(data.subarray(off, off + params.segment));
      for (const c of chunkSegment(seg, seg.length, params)) {
        const h = c.zero ? null : createHash('sha256').update(seg.subarray(c.start, c.start + c.length)).digest('hex');
        expected.push([off + c.start, c.length, c.zero, h]);
      }
    }
    const args = ['-c', AGENT_PY, '--chunk-file', f, ...[params.segment, params.block, params.min, params.maskBits, params.max].map(String)];
    const r = await sh('python3', args);
    expect(r.code, r.stderr).toBe(0);
    const got = JSON.parse(r.stdout);
    expect(got.length).toBe(expected.length);
    expect(expected.length).toBeGreaterThan(50);
    expect(got).toEqual(expected);
  });

  it('sends chunk lists, and bytes only for the chunks asked for', async () => {
    const opts = { identity: userKey, knownHosts };
    const seen = new Set<string>();
    const first = await openSshAgentSource(src(disk), params, opts);
    const parts: Buffer[] = [];
    try {
      for (;;) {
        const seg = await first.readSegment(async (_o, cs) => cs.map(({ digest: d }) => !seen.has(d.toString('hex')) && (seen.add(d.toString('hex')), true)));
        if (!seg) break;
        const b = Buffer.alloc(seg.length);
        for (const c of seg.chunks) {
          if (c.data) c.data.copy(b, c.start);
        }
        parts.push(b);
      }
    } finally {
      await first.close();
    }
    expect(first.size).toBe(64 << 20);
    expect(first.transferred.raw).toBeGreaterThan(10 << 20);
    // Everything known now: a second pass moves no chunk bytes at all.
    const second = await openSshAgentSource(src(disk), params, opts);
    let total = 0;
    try {
      for (;;) {
        const seg = await second.readSegment(async (_o, cs) => cs.map(({ digest: d }) => !seen.has(d.toString('hex'))));
        if (!seg) break;
        total += seg.length;
      }
    } finally {
      await second.close();
    }
    expect(total).toBe(64 << 20);
    expect(second.transferred.raw).toBe(0);
    // The read() view reassembles the image byte-identical (zeros never sent).
    const third = await openSshAgentSource(src(disk), params, opts);
    const h = createHash('sha256');
    const buf = Buffer.alloc(params.segment);
    try {
      for (;;) {
        const n = await third.read(buf, buf.length);
        if (!n) break;
        h.update(buf.subarray(0, n));
      }
    } finally {
      await third.close();
    }
    expect(h.digest('hex')).toBe(await sha256File(disk));
    expect(third.transferred.wire).toBeLessThan(third.transferred.raw);
  });

  it('backs up through the agent with the CLI (--ssh-mode agent) and restores byte-identical', async () => {
    const irepo = s.path('repo-agent');
    await gvOk(irepo, ['init']);
    // A sparse image: 8 MiB of zeros in the middle never cross the network.
    const img = s.path('agent.img');
    const data = Buffer.concat([await fs.readFile(disk), Buffer.alloc(8 << 20), text(9, 3 << 20)]);
    await fs.writeFile(img, data);
    const run = async () => {
      const r = await gv(irepo, ['backup', src(img), '--name', 'inc', '--ssh-mode', 'agent', ...sshArgs()], { env: noAgent });
      expect(r.code, r.stderr).toBe(0);
      const m = / ([\d.]+ (?:B|KiB|MiB|GiB)) of chunk data over SSH/.exec(r.stdout);
      expect(m, r.stdout).not.toBeNull();
      return parseSize(m![1]!);
    };
    const first = await run();
    expect(first).toBeLessThan(data.length - (8 << 20));
    const second = await run();
    if (chunkedBackup) {
      expect(second).toBe(0); // every chunk known: only chunk lists crossed
    } else {
      expect(second).toBe(first); // backup.ts reads every byte until it uses readSegment
    }
    // The next day: 1 MiB rewritten in place.
    prng(11, 1 << 20).copy(data, 20 << 20);
    await fs.writeFile(img, data);
    const third = await run();
    if (chunkedBackup) expect(third).toBeLessThan(3 << 20);
    const list = JSON.parse(await gvOk(irepo, ['list', 'inc', '--json']));
    expect(list).toHaveLength(3);
    expect(list[1].stats.newBytes).toBe(0);
    expect(list[2].stats.newBytes).toBeGreaterThanOrEqual(1 << 20);
    expect(list[2].stats.newBytes).toBeLessThan(3 << 20);
    const out = s.path('agent.out');
    await gvOk(irepo, ['restore', 'inc@latest', out]);
    expect(await sha256File(out)).toBe(createHash('sha256').update(data).digest('hex'));
    await fs.rm(out);
  });

  it('a connection killed mid-backup in agent mode leaves no generation', async () => {
    const fifo = s.path('feed2.fifo');
    await must('mkfifo', [fifo]);
    const child = spawn(process.execPath, [path.resolve('dist/cli/main.js'), '-r', repo, 'backup', src(fifo), '--name', 'killed2', '--ssh-mode', 'agent', ...sshArgs()], {
      env: { ...process.env, ...noAgent, GENVAULT_NO_PROGRESS: '1' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stderr = '';
    child.stderr!.on('data', (b: Buffer) => (stderr += b.toString()));
    const exited = new Promise<number>((r) => child.on('exit', (c) => r(c ?? -1)));
    const w = await fs.open(fifo, 'w');
    await w.write(prng(8, 24 << 20));
    await new Promise((r) => setTimeout(r, 500));
    for (const pid of await sshd!.sessionPids()) process.kill(pid, 'SIGKILL');
    const code = await exited;
    await w.close().catch(() => undefined);
    expectOneLine({ code, stderr }, /backup of killed2 failed: connection (lost|to .* lost)/);
    const list = JSON.parse(await gvOk(repo, ['list', '--json']));
    expect(list.filter((g: { name: string }) => g.name === 'killed2')).toHaveLength(0);
  });
});


describe('restore to ssh://', () => {
  it('writes a file sparse through the writer, zero ranges not sent, and byte-identical through cat', async () => {
    const out = s.path('remote-restore.img');
    const r = await gv(repo, ['restore', 'remote@latest', src(out), ...sshArgs(), '--json'], { env: noAgent });
    expect(r.code, r.stderr).toBe(0);
    const res = JSON.parse(r.stdout);
    expect(res.mode).toBe('agent');
    expect(await sha256File(out)).toBe(await sha256File(disk));
    const st = await fs.stat(out);
    expect(st.size).toBe(64 << 20);
    expect(res.wireBytes).toBeLessThan(st.size / 2);
    expect(st.blocks * 512).toBeLessThan(st.size / 2);
    // An existing file is refused without --force, with one line, and left alone.
    const before = await sha256File(out);
    const refused = await gv(repo, ['restore', 'remote@0', src(out), ...sshArgs()], { env: noAgent });
    expectOneLine(refused, new RegExp(`ssh://root@127\\.0\\.0\\.1:${port}${out}: exists and is not empty; use --force to overwrite it`));
    expect(await sha256File(out)).toBe(before);
    const plain = await gv(repo, ['restore', 'remote@0', src(out), '--force', '--ssh-mode', 'plain', ...sshArgs(), '--json'], { env: noAgent });
    expect(plain.code, plain.stderr).toBe(0);
    expect(JSON.parse(plain.stdout)).toMatchObject({ mode: 'plain', wireBytes: 64 << 20 });
    expect(await sha256File(out)).toBe(before);
    const dirs = await fs.readdir(s.dir);
    expect(dirs.filter((n) => n.includes('genvault-partial'))).toEqual([]);
    await fs.rm(out);
  });

  it('fails with one line for a missing remote directory', async () => {
    for (const mode of ['agent', 'plain']) {
      const r = await gv(repo, ['restore', 'remote@latest', src('/nonexistent/dir/x.img'), '--ssh-mode', mode, ...sshArgs()], { env: noAgent });
      expectOneLine(r, /\/nonexistent\/dir\/x\.img: cannot create it: (no such file or directory|permission denied)/);
    }
  });

  it('a connection killed mid-restore leaves no file behind', async () => {
    const big = s.path('big.img');
    await fs.writeFile(big, prng(21, 160 << 20));
    await gvOk(repo, ['backup', big, '--name', 'big']);
    const dir = s.path('rdir');
    await fs.mkdir(dir);
    const out = path.join(dir, 'big.out');
    const child = spawn(process.execPath, [path.resolve('dist/cli/main.js'), '-r', repo, 'restore', 'big@latest', src(out), ...sshArgs()], {
      env: { ...process.env, ...noAgent, GENVAULT_NO_PROGRESS: '1' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stderr = '';
    child.stderr!.on('data', (b: Buffer) => (stderr += b.toString()));
    const exited = new Promise<number>((r) => child.on('exit', (c) => r(c ?? -1)));
    // Kill the session once the partial file has some bytes in it.
    for (let i = 0; i < 2000; i++) {
      const names = await fs.readdir(dir);
      const partial = names.find((n) => n.includes('genvault-partial'));
      if (partial && (await fs.stat(path.join(dir, partial)).catch(() => ({ size: 0 }))).size > 0) break;
      await new Promise((r) => setTimeout(r, 5));
    }
    for (const pid of await sshd!.sessionPids()) process.kill(pid, 'SIGKILL');
    const code = await exited;
    expect(code, stderr).toBe(1);
    expect(stderr.trim().split('\n').filter((l) => !/native crypto/.test(l))).toHaveLength(1);
    expect(stderr).toMatch(/connection|closed|lost/);
    // The remote writer removes its partial file once it sees the end of its input.
    for (let i = 0; i < 50 && (await fs.readdir(dir)).length; i++) await new Promise((r) => setTimeout(r, 100));
    expect(await fs.readdir(dir)).toEqual([]);
    await fs.rm(big);
  });
});

/**
 * A real OpenSSH sshd on 127.0.0.1 for tests: host and user keys made in a scratch
 * directory, a known_hosts file for it, and a way to kill its sessions (to drop
 * connections mid-transfer).
 */
import { spawn, ChildProcess } from 'node:child_process';
import fs from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { Scratch, must, sh } from './helpers.js';

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const p = (srv.address() as net.AddressInfo).port;
      srv.close(() => resolve(p));
    });
  });
}

async function waitForPort(p: number, log: () => string): Promise<void> {
  for (let i = 0; i < 100; i++) {
    const ok = await new Promise<boolean>((resolve) => {
      const c = net.connect(p, '127.0.0.1');
      c.once('connect', () => {
        c.destroy();
        resolve(true);
      });
      c.once('error', () => resolve(false));
    });
    if (ok) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`sshd did not listen on ${p}: ${log()}`);
}

export async function keygen(file: string, type: 'ed25519' | 'ecdsa' | 'rsa' = 'ed25519'): Promise<void> {
  const bits = type === 'rsa' ? ['-b', '2048'] : [];
  await must('ssh-keygen', ['-q', '-t', type, ...bits, '-N', '', '-C', 'genvault-test', '-f', file]);
}

/** "SHA256:..." of a key, as sshd logs it on "Accepted publickey". */
export async function fingerprint(pubFile: string): Promise<string> {
  return (await must('ssh-keygen', ['-l', '-E', 'sha256', '-f', pubFile])).split(' ')[1]!;
}

/**
 * A real ssh-agent listening on `sock`, stopped by the scratch's cleanup (and by the
 * function returned, which tests call in their own `finally`). Resolves once it listens.
 */
export async function startSshAgent(s: Scratch, sock: string): Promise<() => Promise<void>> {
  const agent: ChildProcess = spawn('ssh-agent', ['-D', '-a', sock], { stdio: ['ignore', 'pipe', 'pipe'] });
  const agentExited = new Promise<void>((r) => agent.once('exit', () => r()));
  const stopAgent = async () => {
    if (agent.exitCode === null && agent.signalCode === null) agent.kill('SIGTERM');
    await agentExited;
  };
  s.onCleanup(stopAgent);
  // ssh-agent -D prints its environment once the socket listens.
  await new Promise<void>((resolve, reject) => {
    let out = '';
    let err = '';
    agent.stdout!.on('data', (b: Buffer) => {
      out += b.toString();
      if (/Agent pid \d+/.test(out)) resolve();
    });
    agent.stderr!.on('data', (b: Buffer) => (err += b.toString()));
    agent.once('error', reject);
    agent.once('exit', (c) => reject(new Error(`ssh-agent exited (${c}): ${err}`)));
  });
  return stopAgent;
}

export interface Sshd {
  port: number;
  /** A key the server accepts, and one it does not. */
  userKey: string;
  otherKey: string;
  /** known_hosts holding the server's key. */
  knownHosts: string;
  /** "ssh-ed25519 AAAA..." of the server. */
  hostPub: string;
  /** ssh://root@127.0.0.1:PORT + path */
  url(p: string, user?: string): string;
  /** pids of sshd's per-connection children (kill them to drop connections). */
  sessionPids(): Promise<number[]>;
  /**
   * The sshd processes serving the connection that process `pid` (say, a remote command)
   * runs under: its ancestors below the listening sshd. Kill them to drop that one
   * connection. Empty when `pid` is not under this sshd.
   */
  sessionOf(pid: number): Promise<number[]>;
  /** Authorize one more public key, with authorized_keys options (`environment="..."`). */
  authorize(pubFile: string, options?: string): Promise<void>;
  /** SHA256 fingerprints of the keys that logged in, in order, from sshd's log. */
  acceptedKeys(): string[];
  log(): string;
  stop(): Promise<void>;
}

export interface SshdOptions {
  /** More sshd_config lines (e.g. PermitUserEnvironment); they come first, so they override the defaults (sshd keeps a keyword's first value). */
  config?: string[];
}

/** Parent pid of a process, from /proc (null once it is gone). */
async function ppidOf(pid: number): Promise<number | null> {
  const stat = await fs.readFile(`/proc/${pid}/stat`, 'utf8').catch(() => null);
  if (stat === null) return null;
  // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
  return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
}

export async function startSshd(s: Scratch, sub = 'sshd', opts: SshdOptions = {}): Promise<Sshd> {
  await fs.mkdir('/run/sshd', { recursive: true });
  const d = s.path(sub);
  await fs.mkdir(d, { recursive: true });
  await keygen(path.join(d, 'host_key'));
  const userKey = path.join(d, 'user_key');
  const otherKey = path.join(d, 'other_key');
  await keygen(userKey);
  await keygen(otherKey);
  await fs.copyFile(`${userKey}.pub`, path.join(d, 'authorized_keys'));
  const port = await freePort();
  const cfg = path.join(d, 'sshd_config');
  await fs.writeFile(
    cfg,
    [
      ...(opts.config ?? []),
      `Port ${port}`,
      'ListenAddress 127.0.0.1',
      `HostKey ${path.join(d, 'host_key')}`,
      `AuthorizedKeysFile ${path.join(d, 'authorized_keys')}`,
      `PidFile ${path.join(d, 'sshd.pid')}`,
      'PermitRootLogin yes',
      'StrictModes no',
      'UsePAM no',
      'PasswordAuthentication no',
      'KbdInteractiveAuthentication no',
      'LogLevel VERBOSE',
      '',
    ].join('\n'),
  );
  let sshdLog = '';
  const sshd: ChildProcess = spawn('/usr/sbin/sshd', ['-D', '-e', '-f', cfg], { stdio: ['ignore', 'ignore', 'pipe'] });
  sshd.stderr!.on('data', (b: Buffer) => {
    if (sshdLog.length < 200_000) sshdLog += b.toString();
  });
  await waitForPort(port, () => sshdLog);
  const hostPub = (await fs.readFile(path.join(d, 'host_key.pub'), 'utf8')).split(' ').slice(0, 2).join(' ');
  const knownHosts = path.join(d, 'known_hosts');
  await fs.writeFile(knownHosts, `[127.0.0.1]:${port} ${hostPub}\n`);
  const sessionPids = async () => {
    const r = await sh('ps', ['-o', 'pid=', '--ppid', String(sshd.pid)]);
    return r.stdout.split('\n').map((l) => Number(l.trim())).filter((n) => n > 0);
  };
  const sessionOf = async (pid: number) => {
    const chain: number[] = [];
    for (let p: number | null = await ppidOf(pid); p && p > 1; p = await ppidOf(p)) {
      if (p === sshd.pid) return chain;
      const comm = await fs.readFile(`/proc/${p}/comm`, 'utf8').catch(() => '');
      if (comm.startsWith('sshd')) chain.push(p); // "sshd", or "sshd-session" (OpenSSH 9.8+)
    }
    return [];
  };
  const authorizedKeys = path.join(d, 'authorized_keys');
  return {
    port,
    userKey,
    otherKey,
    knownHosts,
    hostPub,
    url: (p, user = 'root') => `ssh://${user}@127.0.0.1:${port}${p}`,
    sessionPids,
    sessionOf,
    async authorize(pubFile, options) {
      const pub = (await fs.readFile(pubFile, 'utf8')).trim();
      await fs.appendFile(authorizedKeys, `${options ? `${options} ` : ''}${pub}\n`);
    },
    acceptedKeys: () => [...sshdLog.matchAll(/Accepted publickey for \S+ from \S+ port \d+ ssh2: \S+ (SHA256:\S+)/g)].map((m) => m[1]!),
    log: () => sshdLog,
    async stop() {
      if (!sshd.pid) return;
      for (const pid of await sessionPids().catch(() => [])) {
        try {
          process.kill(pid, 'SIGKILL');
        } catch {
          /* gone */
        }
      }
      sshd.kill('SIGTERM');
    },
  };
}

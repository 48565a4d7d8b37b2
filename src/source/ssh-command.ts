/**
 * `--ssh-command CMD`: the system OpenSSH client as the transport, as restic and borg
 * use it, so everything ssh itself honours (its whole config, Match, ProxyCommand,
 * certificates, hardware keys) applies. The remote protocol is unchanged: every exec of
 * the built-in client is one `ssh HOST COMMAND` here, a byte stream each way on the
 * process's stdin and stdout, stderr, and the remote exit status as ssh's own.
 *
 * One connection per run, as with the built-in client (the hooks and the source share
 * it): a master `ssh -M -S SOCKET -N` is started first, and each command runs through its
 * control socket (`ssh -S SOCKET`), so authentication happens once and the hooks see one
 * `$SSH_CONNECTION`. CMD must therefore be OpenSSH's client (or take its -M/-S/-G options).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { EventEmitter } from 'node:events';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { GenvaultError, UsageError } from '../util/errors.js';
import { exitText } from '../util/proc.js';
import { connectSsh, parseSshUrl, runToClose, type RemoteChannel, type SshConnection, type SshOptions, type SshSpec, type SshUrl } from './ssh.js';

/** Connects with the built-in client, or through the system ssh when `opts.command` is set. */
export function openSshConnection(target: string, opts: SshOptions = {}): Promise<SshConnection> {
  return opts.command ? connectSystemSsh(parseSshUrl(target), opts) : connectSsh(target, opts);
}

/** Words of a command line, with '...' and "..." quoting and backslash escapes (no other shell syntax). */
export function splitCommand(cmd: string): string[] {
  const out: string[] = [];
  let cur: string | null = null;
  for (let i = 0; i < cmd.length; i++) {
    const c = cmd[i]!;
    if (/\s/.test(c)) {
      if (cur !== null) out.push(cur);
      cur = null;
    } else if (c === "'" || c === '"') {
      const end = cmd.indexOf(c, i + 1);
      if (end < 0) throw new UsageError(`--ssh-command: unterminated ${c} in "${cmd}"`);
      cur = (cur ?? '') + cmd.slice(i + 1, end);
      i = end;
    } else if (c === '\\' && i + 1 < cmd.length) {
      cur = (cur ?? '') + cmd[++i];
    } else cur = (cur ?? '') + c;
  }
  if (cur !== null) out.push(cur);
  if (!out.length) throw new UsageError('--ssh-command is empty');
  return out;
}

/** The ssh options that carry genvault's flags; on ssh's command line they win over its config, as they do for the built-in client. */
function sshArgs(words: string[], url: SshUrl, opts: SshOptions): string[] {
  const cfg = opts.config ?? (process.env.GENVAULT_SSH_CONFIG || undefined);
  const q = (f: string) => `"${path.resolve(f)}"`;
  return [
    ...words.slice(1),
    ...(cfg ? ['-F', cfg === 'none' ? 'none' : path.resolve(cfg)] : []),
    // No terminal, no escape character, no X11, no prompts: the channel carries binary data and nobody answers.
    '-T', '-x', '-e', 'none',
    '-o', 'BatchMode=yes',
    '-o', `ConnectTimeout=${Math.ceil((opts.timeoutMs ?? 20_000) / 1000)}`,
    '-o', 'ServerAliveInterval=15', '-o', 'ServerAliveCountMax=4',
    ...(url.port !== undefined ? ['-p', String(url.port)] : []),
    ...(url.user !== undefined ? ['-l', url.user] : []),
    ...(opts.identity ? ['-i', path.resolve(opts.identity), '-o', 'IdentitiesOnly=yes'] : []),
    ...(opts.knownHosts ? ['-o', `UserKnownHostsFile=${q(opts.knownHosts)}`] : []),
    ...(opts.acceptNewHostKey ? ['-o', 'StrictHostKeyChecking=accept-new'] : []),
  ];
}

interface Done {
  code: number | null;
  signal: string | null;
  stdout: string;
  stderr: string;
}

function runToEnd(cmd: string, args: string[]): Promise<Done> {
  return new Promise((resolve) => {
    const p = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    p.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    p.on('error', (e) => resolve({ code: 255, signal: null, stdout, stderr: `${cmd}: ${e.message}` }));
    p.on('close', (code, signal) => resolve({ code, signal, stdout, stderr }));
  });
}

/** ssh's reason for a failure: its last line that is not a warning about an added host key. */
function sshReason(stderr: string, code: number | null, signal: string | null): string {
  // ssh's summary of a bad config ("terminating, 1 bad configuration options") follows the line that says what is wrong.
  const lines = stderr.split('\n').map((l) => l.trim()).filter((l) => l && !/^Warning: Permanently added|terminating, \d+ bad configuration option/.test(l));
  return lines.at(-1) ?? exitText(code, signal);
}

/** What the config makes of the URL (`ssh -G`): user, host and port, for messages; a bad config fails here, with ssh's words. */
async function resolvedSpec(bin: string, args: string[], url: SshUrl): Promise<SshSpec> {
  const r = await runToEnd(bin, [...args, '-G', '--', url.host]);
  if (r.code !== 0) throw new GenvaultError(`${bin} cannot use ssh://${url.host}: ${sshReason(r.stderr, r.code, r.signal)}`, 'SSH_CONFIG');
  const get = (k: string) => new RegExp(`^${k} (.*)$`, 'm').exec(r.stdout)?.[1];
  const host = get('hostname') ?? url.host;
  const port = Number(get('port') ?? 22);
  const spec: SshSpec = { user: get('user') ?? url.user ?? os.userInfo().username, host, port, path: url.path };
  if (host !== url.host || (url.port === undefined && port !== 22)) spec.alias = { name: url.host, port: url.port };
  return spec;
}

/** A command run by `ssh -S SOCKET HOST CMD`, as a RemoteChannel. */
class ProcessChannel extends EventEmitter implements RemoteChannel {
  readonly stderr: NodeJS.ReadableStream;
  constructor(private p: ChildProcess) {
    super();
    this.stderr = p.stderr!;
    p.stdout!.on('data', (d: Buffer) => this.emit('data', d));
    p.stdin!.on('drain', () => this.emit('drain'));
    // The remote end going away first shows as EPIPE here; its exit status tells why.
    p.stdin!.on('error', () => undefined);
    p.on('exit', (code, signal) => this.emit('exit', code, signal ?? undefined));
    p.on('close', () => this.emit('close'));
  }
  write(b: Buffer | string, cb?: (e?: Error | null) => void): boolean {
    return this.p.stdin!.write(b, cb);
  }
  end(b?: Buffer | string): void {
    if (b !== undefined) this.p.stdin!.end(b);
    else this.p.stdin!.end();
  }
  pause(): void {
    this.p.stdout!.pause();
  }
  resume(): void {
    this.p.stdout!.resume();
  }
  destroy(): void {
    this.p.kill('SIGTERM');
  }
  close(): void {
    this.p.kill('SIGTERM');
  }
  /** Ending the local ssh ends the remote command's session (sshd hangs it up), which is what a KILL request asks for. */
  signal(name: string): void {
    this.p.kill(`SIG${name}` as NodeJS.Signals);
  }
}

/** Waits for the master's control socket (it appears once ssh has logged in), or for the master to fail. */
async function masterReady(master: ChildProcess, ctl: string, stderr: () => string, bin: string, where: string, timeoutMs: number): Promise<void> {
  let exited = undefined as { code: number | null; signal: string | null } | undefined;
  master.once('exit', (code, signal) => (exited = { code, signal }));
  const deadline = Date.now() + timeoutMs + 5_000;
  while (Date.now() < deadline) {
    if (exited !== undefined) throw new GenvaultError(`cannot connect to ${where} with ${bin}: ${sshReason(stderr(), exited.code, exited.signal)}`, 'SSH_CONNECT');
    if (await fs.stat(ctl).then(() => true, () => false)) return;
    await new Promise((r) => setTimeout(r, 20));
  }
  master.kill('SIGTERM');
  throw new GenvaultError(`cannot connect to ${where} with ${bin}: timed out`, 'SSH_CONNECT');
}

/** A connection through the system ssh: a master process, and one `ssh -S` process per command. */
export async function connectSystemSsh(url: SshUrl, opts: SshOptions): Promise<SshConnection> {
  const words = splitCommand(opts.command!);
  const bin = words[0]!;
  const args = sshArgs(words, url, opts);
  const spec = await resolvedSpec(bin, args, url);
  const where = `ssh://${url.user ? `${url.user}@` : ''}${url.host}${url.port ? `:${url.port}` : ''}`;
  // The control socket's path must fit in a sockaddr_un (108 bytes): a short private directory.
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'gv-ssh-'));
  const ctl = path.join(dir, 'm');
  let log = '';
  const master = spawn(bin, [...args, '-M', '-S', ctl, '-o', 'ControlPersist=no', '-N', '--', url.host], { stdio: ['ignore', 'ignore', 'pipe'] });
  master.stderr!.on('data', (d: Buffer) => {
    if (log.length < 65536) log += d.toString();
  });
  master.on('error', (e) => (log += `\n${bin}: ${e.message}`));
  const cleanup = () => fs.rm(dir, { recursive: true, force: true }).catch(() => undefined);
  try {
    await masterReady(master, ctl, () => log, bin, where, opts.timeoutMs ?? 20_000);
  } catch (e) {
    await cleanup();
    throw e;
  }
  return systemConnection(spec, bin, args, url.host, ctl, master, cleanup);
}

function systemConnection(
  spec: SshSpec, bin: string, args: string[], host: string, ctl: string, master: ChildProcess, cleanup: () => Promise<unknown>,
): SshConnection {
  let lost: GenvaultError | null = null;
  let closing = false;
  const handlers: Array<(e: GenvaultError) => void> = [];
  master.on('exit', () => {
    void cleanup();
    if (closing || lost) return;
    lost = new GenvaultError(`connection to ssh://${host} lost`, 'SSH_DISCONNECTED');
    for (const h of handlers) h(lost);
  });
  const exec = async (cmd: string): Promise<RemoteChannel> => {
    if (lost) throw lost;
    const p = spawn(bin, [...args, '-S', ctl, '-o', 'ControlMaster=no', '--', host, cmd], { stdio: ['pipe', 'pipe', 'pipe'] });
    await new Promise<void>((resolve, reject) => {
      p.once('spawn', resolve);
      p.once('error', (e) => reject(new GenvaultError(`cannot run ${bin}: ${e.message}`, 'SSH_EXEC')));
    });
    return new ProcessChannel(p);
  };
  return {
    spec,
    exec,
    get lost() {
      return lost;
    },
    onLost(fn) {
      handlers.push(fn);
    },
    async run(cmd, input) {
      return runToClose(await exec(cmd), input, () => lost);
    },
    close() {
      closing = true;
      master.kill('SIGTERM');
    },
  };
}

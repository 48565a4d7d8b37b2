/**
 * Remote sources over SSH: `ssh://[user@]host[:port]/path/to/device-or-image`.
 *
 * Authentication and host key checking follow OpenSSH: an identity file given with
 * `-i`, else the agent at SSH_AUTH_SOCK, else ~/.ssh/id_ed25519, id_ecdsa, id_rsa (those
 * that exist). Host keys are checked against ~/.ssh/known_hosts (plain, wildcard,
 * `[host]:port` and hashed `|1|salt|hash` entries); an unknown host is refused unless
 * `acceptNewHostKey` (trust on first use, appended to the file), a changed key always, and
 * so is a host known by keys of other types only (it is not new: OpenSSH's accept-new).
 *
 * Plain mode streams the image with `cat` over an exec channel. Incremental mode
 * (src/source/ssh-agent.ts) runs a small Python agent remotely that chunks and hashes
 * there and sends only the chunks the repository lacks.
 */
import { createHmac } from 'node:crypto';
import fs from 'node:fs/promises';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import type ssh2 from 'ssh2';
import type { Client as SshClient, ConnectConfig, AnyAuthMethod, ParsedKey } from 'ssh2';
import type { Duplex } from 'node:stream';
import { GenvaultError, UsageError } from '../util/errors.js';
import {
  expandPath, lookupHostConfig, parseJumpHop, parsePort, parseStrict, parseYesNo, sshConfigFiles, type SshConfigFiles, type StrictMode,
} from './ssh-config.js';
import { exitText } from '../util/proc.js';
import { readTrustedFile } from '../util/trust.js';
import type { Source } from '../backup/source.js';

/**
 * ssh2 is loaded on first use: its import is a noticeable part of start-up, which every
 * local backup and restore paid before (their commands import this module for
 * isSshSpec). Measured: native-notes/performance.md, "Figures behind code comments".
 */
let ssh2Module: typeof ssh2 | null = null;
function loadSsh2(): typeof ssh2 {
  return (ssh2Module ??= createRequire(import.meta.url)('ssh2') as typeof ssh2);
}

export interface SshSpec {
  user: string;
  /** The host to connect to (after the config's HostName). */
  host: string;
  port: number;
  path: string;
  /** The name in the URL, when the SSH config made it another host or port: messages and the recorded source use it. */
  alias?: { name: string; port?: number };
}

/** An ssh:// URL as written: user and port only when given. */
export interface SshUrl {
  user?: string;
  host: string;
  port?: number;
  path: string;
}

export interface SshOptions {
  /** Identity (private key) file; when given, the only key tried. */
  identity?: string;
  /** known_hosts file (default ~/.ssh/known_hosts). */
  knownHosts?: string;
  /** Trust and record the key of a host with no key in known_hosts (never a changed one, nor one known by another key type). */
  acceptNewHostKey?: boolean;
  /** Connection timeout in ms (default 20 s). */
  timeoutMs?: number;
  /** --ssh-config: FILE read instead of ~/.ssh/config and /etc/ssh/ssh_config, or none (default: GENVAULT_SSH_CONFIG, else both). */
  config?: string;
  /** --ssh-command: run this OpenSSH client (e.g. "ssh") instead of the built-in one (src/source/ssh-command.ts). */
  command?: string;
}

/** True for sources the CLI should open with openSshSource. */
export function isSshSpec(spec: string): boolean {
  return spec.startsWith('ssh://');
}

/** An ssh:// URL with the defaults filled in (user: the local user, port 22), before any SSH config. */
export function parseSshSpec(spec: string): SshSpec {
  const u = parseSshUrl(spec);
  return { user: u.user ?? defaultUser(), host: u.host, port: u.port ?? 22, path: u.path };
}

export function parseSshUrl(spec: string): SshUrl {
  const m = /^ssh:\/\/(?:([^@/]+)@)?(\[[^\]/]+\]|[^:/@[\]]+)(?::(\d*))?(\/.*)?$/.exec(spec);
  if (!m || !m[4] || m[4] === '/') {
    throw new UsageError(`bad SSH source "${spec}": expected ssh://[user@]host[:port]/path/to/device-or-image`);
  }
  const port = m[3] ? Number(m[3]) : undefined;
  if (port !== undefined && (!Number.isInteger(port) || port < 1 || port > 65535)) throw new UsageError(`bad port in SSH source "${spec}"`);
  let p: string;
  try {
    p = decodeURIComponent(m[4]);
  } catch {
    p = m[4];
  }
  const host = m[2]!.startsWith('[') ? m[2]!.slice(1, -1) : m[2]!;
  return { user: m[1] ? decodeURIComponent(m[1]) : undefined, host, port, path: p };
}

export function defaultUser(): string {
  try {
    return os.userInfo().username;
  } catch {
    return process.env.USER ?? 'root';
  }
}

/** user@host[:port] as shown in messages about the connection. */
export function describeLogin(s: SshSpec): string {
  const name = s.alias?.name ?? s.host;
  const h = name.includes(':') ? `[${name}]` : name;
  const port = s.alias ? s.alias.port : s.port;
  return `${s.user}@${h}${port === undefined || port === 22 ? '' : `:${port}`}`;
}

/** The source as recorded and shown: with a config alias, the alias (the config says where it leads). */
export function describeSpec(s: SshSpec): string {
  return `ssh://${describeLogin(s)}${s.path}`;
}

/** Print one line when ssh2's native crypto binding is missing (transfers are several times slower without it). */
export function warnIfNoNativeCrypto(write: (line: string) => void = (l) => process.stderr.write(l)): boolean {
  let available = false;
  try {
    const req = createRequire(import.meta.url);
    available = !!(req('ssh2/lib/protocol/crypto.js') as { bindingAvailable?: boolean }).bindingAvailable;
  } catch {
    available = false;
  }
  if (!available) write('ssh2 native crypto binding not available: SSH transfers will be about 5x slower\n');
  return available;
}

// ---------------------------------------------------------------------------------
// known_hosts

export interface KnownHostEntry {
  /** Host patterns (comma list) or a hashed `|1|salt|hash` entry. */
  hosts: string;
  type: string;
  key: Buffer;
  marker: string | null;
}

/** The name OpenSSH looks up for host:port. */
export function knownHostsName(host: string, port: number): string {
  return port === 22 ? host : `[${host}]:${port}`;
}

export function parseKnownHosts(text: string): KnownHostEntry[] {
  const out: KnownHostEntry[] = [];
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (!line || line.startsWith('#')) continue;
    const f = line.split(/\s+/);
    let marker: string | null = null;
    if (f[0]!.startsWith('@')) marker = f.shift()!;
    if (f.length < 3) continue;
    out.push({ hosts: f[0]!, type: f[1]!, key: Buffer.from(f[2]!, 'base64'), marker });
  }
  return out;
}

function globMatch(pattern: string, name: string): boolean {
  const re = new RegExp(
    '^' + pattern.replace(/[.+^${}()|\\]/g, '\\$&').replace(/\*/g, '.*').replace(/\?/g, '.').replace(/\[/g, '\\[').replace(/\]/g, '\\]') + '$',
    'i',
  );
  return re.test(name);
}

/** Whether a known_hosts host field matches `name` (as from knownHostsName). */
export function hostFieldMatches(field: string, name: string): boolean {
  if (field.startsWith('|1|')) {
    const [, , salt, hash] = field.split('|');
    if (!salt || !hash) return false;
    const h = createHmac('sha1', Buffer.from(salt, 'base64')).update(name).digest('base64');
    return h === hash;
  }
  let matched = false;
  for (const pat of field.split(',')) {
    if (pat.startsWith('!')) {
      if (globMatch(pat.slice(1), name)) return false;
    } else if (globMatch(pat, name)) matched = true;
  }
  return matched;
}

/** Key type name inside an SSH public key blob ("ssh-ed25519", "ssh-rsa", ...). */
export function keyBlobType(blob: Buffer): string {
  if (blob.length < 4) return '';
  const n = blob.readUInt32BE(0);
  return blob.subarray(4, 4 + n).toString('latin1');
}

/**
 * As OpenSSH: `unknown` only when no key of any type is recorded for the host (only such
 * a host may be trusted on first use); `othertype` when keys of other types are known
 * but not of the offered one (accept-new refuses that too); `changed` when a key of the
 * offered type is known and differs.
 */
export type HostKeyVerdict =
  | { status: 'ok' }
  | { status: 'unknown' }
  | { status: 'othertype'; type: string; known: string[] }
  | { status: 'changed'; type: string }
  | { status: 'revoked' };

export function checkHostKey(entries: KnownHostEntry[], host: string, port: number, blob: Buffer): HostKeyVerdict {
  const name = knownHostsName(host, port);
  const type = keyBlobType(blob);
  let ok = false;
  let changed = false;
  const known = new Set<string>();
  for (const e of entries) {
    if (!hostFieldMatches(e.hosts, name)) continue;
    if (e.marker === '@revoked') {
      if (e.key.equals(blob)) return { status: 'revoked' };
      continue;
    }
    if (e.marker) continue; // @cert-authority: certificates are not supported
    known.add(keyBlobType(e.key));
    if (e.key.equals(blob)) ok = true;
    else if (keyBlobType(e.key) === type) changed = true;
  }
  if (ok) return { status: 'ok' };
  if (changed) return { status: 'changed', type };
  if (known.size) return { status: 'othertype', type, known: [...known].sort() };
  return { status: 'unknown' };
}

/** Key types (as in known_hosts) recorded for host:port, to prefer those host key algorithms. */
function knownTypes(entries: KnownHostEntry[], host: string, port: number): string[] {
  const name = knownHostsName(host, port);
  const t = new Set<string>();
  for (const e of entries) if (!e.marker && hostFieldMatches(e.hosts, name)) t.add(keyBlobType(e.key));
  return [...t];
}

const HOST_KEY_ALGOS: Record<string, string[]> = {
  'ssh-ed25519': ['ssh-ed25519'],
  'ecdsa-sha2-nistp256': ['ecdsa-sha2-nistp256'],
  'ecdsa-sha2-nistp384': ['ecdsa-sha2-nistp384'],
  'ecdsa-sha2-nistp521': ['ecdsa-sha2-nistp521'],
  'ssh-rsa': ['rsa-sha2-512', 'rsa-sha2-256', 'ssh-rsa'],
};
const ALL_HOST_KEY_ALGOS = [
  'ssh-ed25519', 'ecdsa-sha2-nistp256', 'ecdsa-sha2-nistp384', 'ecdsa-sha2-nistp521', 'rsa-sha2-512', 'rsa-sha2-256', 'ssh-rsa',
];

// ---------------------------------------------------------------------------------
// identities

async function readIdentity(file: string, explicit: boolean): Promise<{ key: Buffer; file: string } | null> {
  let data: Buffer;
  try {
    // Owned by root or us and 0600, as OpenSSH wants of a private key (src/util/trust.ts).
    data = await readTrustedFile(file, { secret: true });
  } catch (e) {
    if (e instanceof GenvaultError) throw e;
    if (!explicit && (e as NodeJS.ErrnoException).code === 'ENOENT') return null;
    const code = (e as NodeJS.ErrnoException).code;
    const why = code === 'ENOENT' ? 'no such file' : code === 'EACCES' ? 'permission denied' : (e as Error).message;
    throw new GenvaultError(`cannot read identity file ${file}: ${why}`, 'SSH_IDENTITY');
  }
  const parsed = loadSsh2().utils.parseKey(data);
  if (parsed instanceof Error) {
    const enc = /encrypted|passphrase/i.test(parsed.message);
    const msg = enc
      ? `identity file ${file} is protected by a passphrase: load it into ssh-agent (ssh-add ${file}) instead`
      : `identity file ${file} is not a usable private key (${parsed.message})`;
    if (!explicit && !enc) return null;
    throw new GenvaultError(msg, 'SSH_IDENTITY');
  }
  return { key: data, file };
}

// ---------------------------------------------------------------------------------
// connection

/**
 * What the remote protocol needs of a command's channel: its stdin, stdout, stderr and
 * exit status, with flow control. An ssh2 exec channel is one; so is a system `ssh`
 * process (src/source/ssh-command.ts).
 */
export interface RemoteChannel {
  on(event: 'data', fn: (d: Buffer) => void): unknown;
  on(event: 'exit', fn: (code: number | null, signal?: string) => void): unknown;
  on(event: 'close', fn: () => void): unknown;
  once(event: 'drain', fn: () => void): unknown;
  readonly stderr: { on(event: 'data', fn: (d: Buffer) => void): unknown };
  /** `cb` once the channel has taken `b` (its memory may then be reused). */
  write(b: Buffer | string, cb?: (e?: Error | null) => void): boolean;
  end(b?: Buffer | string): unknown;
  pause(): unknown;
  resume(): unknown;
  destroy(): unknown;
  close(): unknown;
  signal(name: string): unknown;
}

export interface RunResult {
  stdout: Buffer;
  stderr: string;
  code: number | null;
  signal: string | null;
}

export interface SshConnection {
  spec: SshSpec;
  /** The ssh2 client (the built-in transport only: jump hosts forward through it). */
  client?: SshClient;
  /** Run a command; resolves with the channel once it is open. */
  exec(cmd: string): Promise<RemoteChannel>;
  /** Run a command to completion: stdout, stderr, exit code, or the signal that killed it (both null: the channel closed without saying). */
  run(cmd: string, input?: Buffer | string): Promise<RunResult>;
  /** Set once the connection is gone (error or close), with a one-line reason. */
  readonly lost: GenvaultError | null;
  onLost(fn: (e: GenvaultError) => void): void;
  close(): void;
}

/** POSIX shell single-quoting. */
export function shq(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

/** Reads known_hosts ('' if it does not exist). */
async function readKnownHostsText(khFile: string): Promise<string> {
  try {
    // Whoever may write it decides which hosts we trust: root's or ours alone.
    return (await readTrustedFile(khFile)).toString('utf8');
  } catch (e) {
    if (e instanceof GenvaultError) throw e;
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') {
      throw new GenvaultError(`cannot read known hosts file ${khFile}: ${(e as Error).message}`, 'SSH_KNOWN_HOSTS');
    }
    return '';
  }
}

/**
 * What one host is, after the SSH config: where to connect, the keys, the known_hosts
 * files, host key checking and the jump hosts. Command-line flags (-i, --known-hosts,
 * --accept-new-host-key, user and port in the URL) win over the config, as in OpenSSH.
 */
export interface ResolvedHost {
  spec: SshSpec;
  /** -i: the only key tried. */
  identity?: string;
  /** IdentityFile values, expanded (empty: the default ~/.ssh/id_* files). */
  identityFiles: string[];
  identitiesOnly: boolean;
  /** known_hosts files; new keys go to the first. Empty: UserKnownHostsFile none. */
  knownHosts: string[];
  strict: StrictMode;
  /** ProxyJump hops, each to be resolved through the config in turn. */
  jumps: Array<{ user?: string; host: string; port?: number }>;
  /** Where the ProxyJump came from, for messages. */
  jumpWhere: string;
}

/** Resolves a URL (or a ProxyJump hop) through the SSH config. `flags` are the command line's, for the destination only. */
export async function resolveHost(url: SshUrl, flags: SshOptions, files: SshConfigFiles, ignoreJump = false): Promise<ResolvedHost> {
  const c = await lookupHostConfig(url.host, files);
  const first = (k: string) => c.values.get(k)?.[0];
  const at = (k: string) => c.where.get(k) ?? 'SSH config';
  const cmd = first('proxycommand');
  const jumpValue = ignoreJump ? undefined : first('proxyjump');
  // Whichever of ProxyCommand and ProxyJump comes first wins in OpenSSH; a ProxyCommand cannot be honoured here.
  if (cmd && cmd.toLowerCase() !== 'none' && !(jumpValue && c.order.get('proxyjump')! < c.order.get('proxycommand')!)) {
    throw new GenvaultError(`${at('proxycommand')}: ProxyCommand is not supported by genvault's SSH client: use --ssh-command ssh, or ProxyJump`, 'SSH_CONFIG');
  }
  const rawHost = first('hostname');
  const port = url.port ?? (first('port') !== undefined ? parsePort(first('port')!, at('port')) : 22);
  const user = url.user ?? first('user') ?? defaultUser();
  const host = rawHost ? rawHost.replace(/%(.)/g, (_m, ch: string) => (ch === 'h' ? url.host : ch === '%' ? '%' : `%${ch}`)) : url.host;
  const tok = { host, original: url.host, port, user };
  const spec: SshSpec = { user, host, port, path: url.path };
  if (host !== url.host || (url.port === undefined && port !== 22)) spec.alias = { name: url.host, port: url.port };
  const strictCfg = parseStrict(first('stricthostkeychecking'), at('stricthostkeychecking'));
  const kh = c.values.get('userknownhostsfile');
  const jumpsText = jumpValue && jumpValue.toLowerCase() !== 'none' ? jumpValue : '';
  return {
    spec,
    identity: flags.identity,
    identityFiles: (c.values.get('identityfile') ?? []).filter((f) => f.toLowerCase() !== 'none').map((f) => expandPath(f, tok, at('identityfile'))),
    identitiesOnly: parseYesNo(first('identitiesonly'), 'IdentitiesOnly', at('identitiesonly')) ?? false,
    knownHosts: flags.knownHosts
      ? [flags.knownHosts]
      : kh
        ? kh.filter((f) => f.toLowerCase() !== 'none').map((f) => expandPath(f, tok, at('userknownhostsfile')))
        : [path.join(os.homedir(), '.ssh', 'known_hosts')],
    strict: flags.acceptNewHostKey ? 'accept-new' : (strictCfg ?? 'yes'),
    jumps: jumpsText ? jumpsText.split(',').map((h) => parseJumpHop(h.trim(), at('proxyjump'))) : [],
    jumpWhere: at('proxyjump'),
  };
}

/** Public key blobs of identity files (FILE.pub, else the unencrypted key itself), for IdentitiesOnly's agent filter. */
async function identityBlobs(files: string[]): Promise<Buffer[]> {
  const out: Buffer[] = [];
  for (const f of files) {
    for (const cand of [`${f}.pub`, f]) {
      const data = await fs.readFile(cand).catch(() => null);
      if (!data) continue;
      const k = loadSsh2().utils.parseKey(data);
      if (!(k instanceof Error)) {
        out.push((Array.isArray(k) ? k[0]! : k).getPublicSSH());
        break;
      }
    }
  }
  return out;
}

/** The agent at `sock`, offering only the keys whose public halves are in `allowed` (IdentitiesOnly yes). */
function filteredAgent(sock: string, allowed: Buffer[]): NonNullable<ConnectConfig['agent']> {
  const { OpenSSHAgent } = loadSsh2();
  class Filtered extends OpenSSHAgent {
    override getIdentities(cb: Parameters<InstanceType<typeof OpenSSHAgent>['getIdentities']>[0]): void {
      super.getIdentities((err, keys) => {
        if (err || !keys) return cb(err, keys);
        cb(undefined, (keys as ParsedKey[]).filter((k) => allowed.some((b) => b.equals(k.getPublicSSH()))));
      });
    }
  }
  return new Filtered(sock);
}

/** Authentication methods, in OpenSSH's order, and how each is named in "tried ..." messages. */
async function gatherAuthMethods(r: ResolvedHost, where: string): Promise<{ methods: AnyAuthMethod[]; tried: string[] }> {
  const methods: AnyAuthMethod[] = [];
  const tried: string[] = [];
  const username = r.spec.user;
  if (r.identity) {
    const id = (await readIdentity(path.resolve(r.identity), true))!;
    methods.push({ type: 'publickey', username, key: id.key });
    tried.push(`identity ${id.file}`);
  } else {
    // As OpenSSH: the agent first (with IdentitiesOnly, only its keys named by IdentityFile),
    // then the IdentityFile keys, or the default ones when the config names none.
    const agentSock = process.env.SSH_AUTH_SOCK;
    if (agentSock && (!r.identitiesOnly || r.identityFiles.length)) {
      const agent = r.identitiesOnly ? filteredAgent(agentSock, await identityBlobs(r.identityFiles)) : agentSock;
      methods.push({ type: 'agent', username, agent } as AnyAuthMethod);
      tried.push('ssh-agent');
    }
    const files = r.identityFiles.length ? r.identityFiles : ['id_ed25519', 'id_ecdsa', 'id_rsa'].map((n) => path.join(os.homedir(), '.ssh', n));
    for (const f of files) {
      // A passphrase-protected IdentityFile is left to the agent when there is one.
      const id = await readIdentity(f, false).catch((e: unknown) => {
        if (agentSock && e instanceof GenvaultError && /passphrase/.test(e.message)) return null;
        throw e;
      });
      if (id) {
        methods.push({ type: 'publickey', username, key: id.key });
        tried.push(id.file);
      }
    }
  }
  if (!methods.length) {
    throw new GenvaultError(
      `no SSH key to log in to ${where}: give -i/--identity FILE, start ssh-agent, or create ~/.ssh/id_ed25519`,
      'SSH_AUTH',
    );
  }
  return { methods, tried };
}

/** Host key algorithms, those we already know a key for first, as OpenSSH does. */
function hostKeyAlgorithms(entries: KnownHostEntry[], spec: SshSpec): string[] {
  const kt = knownTypes(entries, spec.host, spec.port);
  const preferred = kt.flatMap((t) => HOST_KEY_ALGOS[t] ?? []);
  return [...preferred, ...ALL_HOST_KEY_ALGOS.filter((a) => !preferred.includes(a))];
}

/** One connection's state, shared by the connect steps, the client's handlers and the connection's methods. */
interface ConnState {
  spec: SshSpec;
  /** describeLogin(spec), for messages. */
  where: string;
  khFile: string;
  /** UserKnownHostsFile none: nothing known, nothing recorded. */
  khNone: boolean;
  client: SshClient;
  /** Why the host key was refused, if it was: the error the connection fails with. */
  hostKeyError: GenvaultError | null;
  /** The known_hosts line to append once connected (a new host key accepted on first use). */
  newKeyLine: string | null;
  lost: GenvaultError | null;
  lostHandlers: Array<(e: GenvaultError) => void>;
  ready: boolean;
  closing: boolean;
}

function setLost(st: ConnState, e: GenvaultError): void {
  if (st.lost) return;
  st.lost = e;
  for (const h of st.lostHandlers) h(e);
}

/** ssh2's hostVerifier: checks the offered key against known_hosts, setting st.hostKeyError or st.newKeyLine. */
function hostKeyVerifier(st: ConnState, entries: KnownHostEntry[], strict: StrictMode): (blob: Buffer) => boolean {
  const { spec, khFile } = st;
  return (blob: Buffer): boolean => {
    const v = checkHostKey(entries, spec.host, spec.port, blob);
    const name = knownHostsName(spec.host, spec.port);
    if (v.status === 'ok') return true;
    if (v.status === 'changed' && strict === 'no') {
      // StrictHostKeyChecking no, as OpenSSH: the connection goes on, loudly; the old key stays.
      process.stderr.write(`genvault: warning: host key for ${name} has CHANGED (${v.type} key differs from the one in ${khFile}); connecting anyway because of StrictHostKeyChecking no\n`);
      return true;
    }
    if (v.status === 'changed') {
      st.hostKeyError = new GenvaultError(
        `host key for ${name} has CHANGED (${v.type} key differs from the one in ${khFile}): possible man-in-the-middle attack; ` +
          `if the host was reinstalled, remove the old key with: ssh-keygen -R '${name}' -f ${khFile}`,
        'SSH_HOSTKEY_CHANGED',
      );
      return false;
    }
    if (v.status === 'othertype' && strict !== 'no') {
      // Not a new host: OpenSSH's accept-new refuses it as well.
      st.hostKeyError = new GenvaultError(
        `host ${name} offered a ${v.type} key, but ${khFile} knows it only by ${v.known.join(', ')}: refusing (possible man-in-the-middle); ` +
          `check the new key's fingerprint and add it (ssh-keyscan -t ${v.type} -p ${spec.port} ${spec.host} >> ${khFile})`,
        'SSH_HOSTKEY_OTHER_TYPE',
      );
      return false;
    }
    if (v.status === 'revoked') {
      st.hostKeyError = new GenvaultError(`host key for ${name} is marked @revoked in ${khFile}`, 'SSH_HOSTKEY_REVOKED');
      return false;
    }
    if (strict !== 'yes') {
      st.newKeyLine = `${name} ${keyBlobType(blob)} ${blob.toString('base64')}\n`;
      return true;
    }
    st.hostKeyError = new GenvaultError(
      `host ${name} is not in ${khFile} (${keyBlobType(blob)} key offered): check its fingerprint and add it ` +
        `(ssh-keyscan -p ${spec.port} ${spec.host} >> ${khFile}), or pass --accept-new-host-key to trust it on first use`,
      'SSH_HOSTKEY_UNKNOWN',
    );
    return false;
  };
}

/** The one-line error for a client 'error' event (other than the agent's). */
function clientError(st: ConnState, err: Error & { level?: string; code?: string }, tried: string[]): GenvaultError {
  const { where } = st;
  if (st.hostKeyError) return st.hostKeyError;
  if (err.level === 'client-authentication') {
    return new GenvaultError(`authentication refused by ${where} (tried ${tried.join(', ')})`, 'SSH_AUTH');
  } else if (err.level === 'client-timeout') {
    return new GenvaultError(`cannot connect to ${where}: timed out`, 'SSH_CONNECT');
  } else if (err.code === 'ECONNREFUSED') {
    return new GenvaultError(`cannot connect to ${where}: connection refused`, 'SSH_CONNECT');
  } else if (err.code === 'ENOTFOUND' || err.code === 'EAI_AGAIN') {
    return new GenvaultError(`cannot connect to ${where}: unknown host ${st.spec.host}`, 'SSH_CONNECT');
  } else if (err.code === 'EHOSTUNREACH' || err.code === 'ENETUNREACH') {
    return new GenvaultError(`cannot connect to ${where}: host unreachable`, 'SSH_CONNECT');
  } else if (st.ready) {
    return new GenvaultError(`connection to ${where} lost: ${err.message}`, 'SSH_DISCONNECTED');
  }
  return new GenvaultError(`SSH connection to ${where} failed: ${err.message}`, 'SSH_CONNECT');
}

/** Connects with the error and close handlers in place: they reject before 'ready', and mark the connection lost after. */
function connectClient(st: ConnState, cfg: ConnectConfig, tried: string[]): Promise<void> {
  const { client, where } = st;
  return new Promise<void>((resolve, reject) => {
    client.once('ready', () => {
      st.ready = true;
      resolve();
    });
    client.on('error', (err: Error & { level?: string; code?: string }) => {
      if (err.level === 'agent') {
        // An unusable agent (a stale SSH_AUTH_SOCK, a failed signature): ssh2 goes on with
        // the next key, as OpenSSH does; named if every key is refused.
        const i = tried.indexOf('ssh-agent');
        if (i >= 0) tried[i] = `ssh-agent (${err.message.charAt(0).toLowerCase()}${err.message.slice(1)})`;
        return;
      }
      const e = clientError(st, err, tried);
      if (!st.ready) reject(e);
      else setLost(st, e);
    });
    client.on('close', () => {
      const e = st.hostKeyError ?? new GenvaultError(`connection to ${where} closed`, 'SSH_DISCONNECTED');
      if (!st.ready) reject(e);
      else if (!st.closing) setLost(st, new GenvaultError(`connection to ${where} lost`, 'SSH_DISCONNECTED'));
    });
    try {
      client.connect(cfg);
    } catch (err) {
      reject(new GenvaultError(`SSH connection to ${where} failed: ${(err as Error).message}`, 'SSH_CONNECT'));
    }
  });
}

/** Appends a host key accepted on first use to known_hosts; on failure ends the connection and throws. */
async function recordNewHostKey(st: ConnState, khText: string): Promise<void> {
  if (!st.newKeyLine || st.khNone) return;
  const { khFile, spec } = st;
  try {
    await fs.mkdir(path.dirname(khFile), { recursive: true, mode: 0o700 });
    const prefix = khText && !khText.endsWith('\n') ? '\n' : '';
    await fs.appendFile(khFile, prefix + st.newKeyLine, { mode: 0o600 });
    process.stderr.write(`genvault: added host key of ${knownHostsName(spec.host, spec.port)} to ${khFile}\n`);
  } catch (e) {
    st.client.end();
    throw new GenvaultError(`cannot record the host key in ${khFile}: ${(e as Error).message}`, 'SSH_KNOWN_HOSTS');
  }
}

/** The SshConnection over a ready client: exec and run, loss reporting, close. */
function wrapConnection(st: ConnState): SshConnection {
  const { spec, client, where } = st;
  const exec = (cmd: string) =>
    new Promise<RemoteChannel>((resolve, reject) => {
      if (st.lost) return reject(st.lost);
      client.exec(cmd, (err, ch) => {
        if (err) reject(st.lost ?? new GenvaultError(`cannot run a command on ${where}: ${err.message}`, 'SSH_EXEC'));
        else resolve(ch as unknown as RemoteChannel);
      });
    });

  const conn: SshConnection = {
    spec,
    client,
    exec,
    get lost() {
      return st.lost;
    },
    onLost(fn) {
      st.lostHandlers.push(fn);
    },
    async run(cmd, input) {
      return runToClose(await exec(cmd), input, () => st.lost);
    },
    close() {
      st.closing = true;
      client.end();
    },
  };
  return conn;
}

/** A command's channel run to its close: its output and how it ended, or `lost()` if the connection went meanwhile. */
export function runToClose(ch: RemoteChannel, input: Buffer | string | undefined, lost: () => GenvaultError | null): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let code: number | null = null;
    let signal: string | null = null;
    ch.on('data', (d: Buffer) => out.push(d));
    ch.stderr.on('data', (d: Buffer) => err.push(d));
    ch.on('exit', (c: number | null, sig?: string) => {
      code = c;
      signal = sig ?? null;
    });
    ch.on('close', () => {
      const gone = lost();
      if (gone) reject(gone);
      else resolve({ stdout: Buffer.concat(out), stderr: Buffer.concat(err).toString(), code, signal });
    });
    ch.end(input);
  });
}

/** One TCP-level hop: the jump connections made so far and the channel to the next host through the last one. */
interface Path {
  jumps: SshConnection[];
  sock?: Duplex;
}

/** A direct-tcpip channel to host:port through `via` (what `ssh -J` asks of a jump host). */
function forwardThrough(via: SshConnection, host: string, port: number): Promise<Duplex> {
  return new Promise((resolve, reject) => {
    via.client!.forwardOut('127.0.0.1', 0, host, port, (err, ch) => {
      if (err) {
        // RFC 4254's reason codes: ssh2 leaves them out of the message.
        const reason = (err as Error & { reason?: number }).reason;
        const why = ({ 1: 'administratively prohibited', 2: 'connect failed', 3: 'unknown channel type', 4: 'resource shortage' } as Record<number, string>)[reason ?? 0];
        const msg = `cannot reach ${knownHostsName(host, port)} through the jump host ${describeLogin(via.spec)}: ${why ?? err.message}`;
        reject(new GenvaultError(msg, 'SSH_CONNECT'));
      } else resolve(ch);
    });
  });
}

/**
 * Connects through the ProxyJump hops of `r`, as OpenSSH: the first hop with its own
 * config (its own ProxyJump included), each later one resolved through the config but
 * reached through the one before; command-line flags apply to the destination only.
 */
async function jumpPath(r: ResolvedHost, files: SshConfigFiles, opts: SshOptions, depth: number): Promise<Path> {
  if (!r.jumps.length) return { jumps: [] };
  if (depth >= 8) throw new GenvaultError(`${r.jumpWhere}: ProxyJump chain too long (a loop?)`, 'SSH_CONFIG');
  const jumps: SshConnection[] = [];
  const hopOpts: SshOptions = { timeoutMs: opts.timeoutMs, config: opts.config };
  try {
    let sock: Duplex | undefined;
    for (const [i, hop] of r.jumps.entries()) {
      const hr = await resolveHost({ ...hop, path: '/' }, {}, files, i > 0);
      const conn = await connectResolved(hr, hopOpts, files, depth + 1, sock);
      jumps.push(conn);
      const next = r.jumps[i + 1];
      if (next) {
        const nr = await resolveHost({ ...next, path: '/' }, {}, files, true);
        sock = await forwardThrough(conn, nr.spec.host, nr.spec.port);
      }
    }
    return { jumps, sock: await forwardThrough(jumps.at(-1)!, r.spec.host, r.spec.port) };
  } catch (e) {
    for (const j of jumps) j.close();
    throw e;
  }
}

/** Connects to a resolved host, through its jump hosts (or over `sock`, a channel through the previous hop). */
async function connectResolved(r: ResolvedHost, opts: SshOptions, files: SshConfigFiles, depth: number, sock?: Duplex): Promise<SshConnection> {
  const { spec } = r;
  const where = describeLogin(spec);
  const khFile = r.knownHosts[0] ?? 'UserKnownHostsFile none';
  // The way there first, as OpenSSH: a jump host that fails is the first thing to report.
  const via = sock ? { jumps: [] as SshConnection[], sock } : await jumpPath(r, files, opts, depth);
  const closeJumps = () => {
    for (const j of via.jumps) j.close();
  };
  let texts: string[];
  let auth: Awaited<ReturnType<typeof gatherAuthMethods>>;
  try {
    texts = await Promise.all(r.knownHosts.map((f) => readKnownHostsText(f)));
    auth = await gatherAuthMethods(r, where);
  } catch (e) {
    closeJumps();
    throw e;
  }
  const { methods, tried } = auth;
  const entries = texts.flatMap((t) => parseKnownHosts(t));
  const hostKeyAlgos = hostKeyAlgorithms(entries, spec);

  const st: ConnState = {
    spec,
    where,
    khFile,
    khNone: !r.knownHosts.length,
    client: new (loadSsh2().Client)(),
    hostKeyError: null,
    newKeyLine: null,
    lost: null,
    lostHandlers: [],
    ready: false,
    closing: false,
  };
  // The jump connections live as long as this one.
  st.client.on('close', closeJumps);
  const cfg: ConnectConfig = {
    host: spec.host,
    port: spec.port,
    username: spec.user,
    sock: via.sock,
    readyTimeout: opts.timeoutMs ?? 20_000,
    keepaliveInterval: 15_000,
    keepaliveCountMax: 4,
    hostVerifier: hostKeyVerifier(st, entries, r.strict),
    authHandler: methods,
    algorithms: {
      serverHostKey: hostKeyAlgos as never,
      cipher: ['aes128-gcm@openssh.com', 'aes256-gcm@openssh.com', 'chacha20-poly1305@openssh.com', 'aes128-ctr', 'aes256-ctr'] as never,
    },
  };
  try {
    await connectClient(st, cfg, tried);
  } catch (e) {
    closeJumps();
    throw e;
  }
  await recordNewHostKey(st, texts[0] ?? '');
  return wrapConnection(st);
}

/**
 * Connects to an ssh:// URL with the built-in client, after the SSH config
 * (src/source/ssh-config.ts): HostName, Port, User, keys, known_hosts, ProxyJump.
 */
export async function connectSsh(target: string | SshUrl, opts: SshOptions = {}): Promise<SshConnection> {
  const url = typeof target === 'string' ? parseSshUrl(target) : target;
  const files = sshConfigFiles(opts.config);
  return connectResolved(await resolveHost(url, opts, files), opts, files, 0);
}

// ---------------------------------------------------------------------------------
// remote path

export interface RemoteInfo {
  kind: 'device' | 'file' | 'other';
  size: number | null;
  python: boolean;
}

/** What the remote path is, its size (best effort), and whether python3 is there. */
export async function probeRemote(conn: SshConnection): Promise<RemoteInfo> {
  const p = shq(conn.spec.path);
  const where = describeSpec(conn.spec);
  const script =
    `p=${p}; ` +
    `if [ -d "$p" ]; then echo dir; elif [ -b "$p" ]; then echo device; blockdev --getsize64 "$p" 2>/dev/null || echo; ` +
    `elif [ -f "$p" ]; then echo file; stat -L -c %s "$p" 2>/dev/null || echo; elif [ -e "$p" ]; then echo other; echo; ` +
    `else echo missing; (exec 3< "$p") 2>&1 | tail -n 1; fi; ` +
    `if [ -r "$p" ]; then echo readable; else echo unreadable; fi; ` +
    `if command -v python3 >/dev/null 2>&1; then echo python3; else echo nopython; fi`;
  const r = await conn.run(`sh -c ${shq(script)}`);
  const lines = r.stdout.toString().split('\n').map((l) => l.trim());
  if (r.code !== 0 || lines.length < 4) {
    const last = r.stderr.trim().split('\n').filter(Boolean).at(-1);
    throw new GenvaultError(`cannot inspect ${where}: ${last || `remote shell ${exitText(r.code, r.signal)}`}`, 'SSH_REMOTE');
  }
  const [kind, size, readable, py] = lines;
  if (kind === 'missing') {
    // Not visible: either absent or behind a directory we may not search.
    if (/permission denied/i.test(size ?? '')) throw new GenvaultError(`cannot read source ${where}: permission denied`, 'EACCES');
    throw new GenvaultError(`cannot read source ${where}: no such file or directory`, 'ENOENT');
  }
  if (kind === 'dir') throw new GenvaultError(`cannot read source ${where}: is a directory`, 'EISDIR');
  if (readable !== 'readable') throw new GenvaultError(`cannot read source ${where}: permission denied`, 'EACCES');
  const n = size && /^\d+$/.test(size) ? Number(size) : null;
  return { kind: kind as RemoteInfo['kind'], size: kind === 'other' ? null : n, python: py === 'python3' };
}

/** One line from a remote command's stderr, mapped like local errors. */
export function remoteError(where: string, stderr: string, code: number | null): GenvaultError {
  const line = stderr.trim().split('\n').filter(Boolean).at(-1) ?? '';
  if (/permission denied/i.test(line)) return new GenvaultError(`cannot read source ${where}: permission denied`, 'EACCES');
  if (/no such file/i.test(line)) return new GenvaultError(`cannot read source ${where}: no such file or directory`, 'ENOENT');
  if (/input\/output error/i.test(line)) return new GenvaultError(`reading ${where}: input/output error`, 'EIO');
  return new GenvaultError(`reading ${where} failed: ${line || `remote command ${exitText(code)}`}`, 'SSH_REMOTE');
}

// ---------------------------------------------------------------------------------
// plain mode

/**
 * Bytes from a channel, as a pull-based reader with bounded buffering: the channel is
 * paused above `highWater` bytes (SSH window flow control stops the remote side).
 */
export class ChannelReader {
  private pending: Buffer[] = [];
  private pendingBytes = 0;
  private ended = false;
  private error: GenvaultError | null = null;
  private waiter: (() => void) | null = null;
  exitCode: number | null = null;
  exitSignal: string | null = null;
  stderr = '';

  constructor(
    private ch: RemoteChannel,
    conn: SshConnection,
    private where: string,
    private highWater = 32 << 20,
  ) {
    ch.on('data', (d: Buffer) => {
      this.pending.push(d);
      this.pendingBytes += d.length;
      if (this.pendingBytes > this.highWater) ch.pause();
      this.wake();
    });
    ch.stderr.on('data', (d: Buffer) => {
      if (this.stderr.length < 65536) this.stderr += d.toString();
    });
    ch.on('exit', (code: number | null, signal?: string) => {
      this.exitCode = code;
      this.exitSignal = signal ?? null;
    });
    ch.on('close', () => {
      this.ended = true;
      this.wake();
    });
    conn.onLost((e) => {
      this.error ??= e;
      this.wake();
    });
  }

  private wake() {
    const w = this.waiter;
    this.waiter = null;
    w?.();
  }

  /** Fill buf[off, off+length); returns bytes read (short only at the end of the stream). */
  async read(buf: Buffer, off: number, length: number): Promise<number> {
    let got = 0;
    while (got < length) {
      if (this.error) throw this.error;
      if (this.pending.length) {
        const d = this.pending[0]!;
        const n = Math.min(d.length, length - got);
        d.copy(buf, off + got, 0, n);
        got += n;
        this.pendingBytes -= n;
        if (n === d.length) this.pending.shift();
        else this.pending[0] = d.subarray(n);
        continue;
      }
      if (this.ended) break;
      if (this.pendingBytes <= this.highWater) this.ch.resume();
      await new Promise<void>((r) => (this.waiter = r));
    }
    return got;
  }

  /** Exactly n bytes or an error naming what was cut short. */
  async readExact(n: number): Promise<Buffer> {
    const b = Buffer.allocUnsafe(n);
    const got = await this.read(b, 0, n);
    if (got < n) throw this.endError();
    return b;
  }

  /** The error for a stream that ended early: remote failure, signal, or lost connection. */
  endError(): GenvaultError {
    if (this.error) return this.error;
    if (this.exitCode !== null && this.exitCode !== 0) return remoteError(this.where, this.stderr, this.exitCode);
    if (this.exitSignal) return new GenvaultError(`reading ${this.where}: remote command ${exitText(null, this.exitSignal)}`, 'SSH_REMOTE');
    if (this.exitCode === null) return new GenvaultError(`connection lost while reading ${this.where}`, 'SSH_DISCONNECTED');
    return new GenvaultError(`reading ${this.where}: stream ended early`, 'SSH_REMOTE');
  }

  get done(): boolean {
    return this.ended && !this.pending.length;
  }

  destroy() {
    this.ch.destroy();
  }
}

class SshPlainSource implements Source {
  private pos = 0;
  constructor(
    readonly description: string,
    readonly size: number | null,
    private conn: SshConnection,
    private reader: ChannelReader,
  ) {}

  async read(buf: Buffer, length: number): Promise<number> {
    const n = await this.reader.read(buf, 0, length);
    this.pos += n;
    if (n < length) {
      // End of stream: only a clean exit (status 0) of the remote command is the end of the image.
      if (this.reader.exitCode !== 0) throw this.reader.endError();
      if (this.conn.lost) throw this.conn.lost;
    }
    return n;
  }

  async close(): Promise<void> {
    this.reader.destroy();
    this.conn.close();
  }
}

/** Stream the remote path with `cat` over an exec channel, as a plain Source. */
export async function startPlainSource(conn: SshConnection, info: RemoteInfo): Promise<Source> {
  const where = describeSpec(conn.spec);
  const ch = await conn.exec(`exec cat -- ${shq(conn.spec.path)}`);
  ch.end();
  const reader = new ChannelReader(ch, conn, where);
  return new SshPlainSource(where, info.size, conn, reader);
}

/** Connect, check the remote path, and stream it with `cat` (plain mode). */
export async function openSshSource(specText: string, opts: SshOptions = {}): Promise<Source> {
  const conn = await connectSsh(specText, opts);
  try {
    return await startPlainSource(conn, await probeRemote(conn));
  } catch (e) {
    conn.close();
    throw e;
  }
}

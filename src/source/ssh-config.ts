/**
 * OpenSSH client configuration for ssh:// sources and targets: ~/.ssh/config, then
 * /etc/ssh/ssh_config (or one file given with --ssh-config / GENVAULT_SSH_CONFIG, as
 * `ssh -F`, which skips the system file; `none` reads no file).
 *
 * The `ssh-config` package tokenizes the files (quoting, `=` separators, Host and Match
 * sections). Its own `compute()` is not used: it runs `Match exec` commands through a
 * shell, lets `?` match zero characters and knows no Include; so the matching is done
 * here, as OpenSSH does it: for each keyword the first value obtained wins, Host
 * patterns with `*`, `?` and `!negation`, Include (conditional inside a Host block).
 * `Match` blocks are not evaluated: they are skipped with a warning, never applied.
 */
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import SSHConfig, { LineType, type Line } from 'ssh-config';
import { GenvaultError } from '../util/errors.js';
import { readTrustedFile } from '../util/trust.js';

/** The keywords genvault acts on (lowercase, as OpenSSH compares them). */
const HONOURED = new Set([
  'hostname', 'port', 'user', 'identityfile', 'identitiesonly', 'userknownhostsfile', 'stricthostkeychecking', 'proxyjump', 'proxycommand',
]);
/** Keywords whose every occurrence counts (the others: the first value wins). */
const REPEATED = new Set(['identityfile']);

export interface SshConfigFiles {
  /** Read first: ~/.ssh/config, or the file given. */
  user: string | null;
  /** Read second: /etc/ssh/ssh_config (not read when a file is given, as `ssh -F`). */
  system: string | null;
  /** A file given by name must exist (as `ssh -F`); ~/.ssh/config need not. */
  given?: boolean;
}

/** Which files to read: `opt` is --ssh-config's value (FILE or none), else GENVAULT_SSH_CONFIG, else OpenSSH's two. */
export function sshConfigFiles(opt?: string): SshConfigFiles {
  const v = opt ?? (process.env.GENVAULT_SSH_CONFIG || undefined);
  if (v === 'none') return { user: null, system: null };
  if (v !== undefined) return { user: path.resolve(v), system: null, given: true };
  return { user: path.join(os.homedir(), '.ssh', 'config'), system: '/etc/ssh/ssh_config' };
}

/** Values from the config for one host name: keyword (lowercase) -> value(s) and where each was set. */
export interface HostConfig {
  values: Map<string, string[]>;
  /** `FILE line N` of each keyword's (first) value, for messages. */
  where: Map<string, string>;
  /** The order in which keywords got their first value (ProxyJump against ProxyCommand). */
  order: Map<string, number>;
}

/** Match lines already warned about: a run resolves several hosts (jump hosts), one warning each is enough. */
const warnedMatch = new Set<string>();

interface Scan {
  host: string;
  out: HostConfig;
  warned: Set<string>;
  depth: number;
  requireUser: boolean;
}

/** Line numbers of a parsed file's directives: the library keeps the text around each one, so the newlines before it count. */
function lineNumbers(cfg: SSHConfig): Map<Line, number> {
  const at = new Map<Line, number>();
  let line = 1;
  const nl = (s: string | undefined) => (s ? s.split('\n').length - 1 : 0);
  const walk = (lines: Line[]) => {
    for (const l of lines) {
      line += nl(l.before);
      at.set(l, line);
      if (l.type === LineType.DIRECTIVE) line += nl(l.param);
      line += nl(l.after);
      if ('config' in l) walk(l.config);
    }
  };
  walk(cfg);
  return at;
}

function words(v: string | Array<{ val: string }>): string[] {
  return Array.isArray(v) ? v.map((x) => x.val) : v.split(/\s+/).filter(Boolean);
}

/** OpenSSH's pattern match: `*` any run, `?` exactly one character; host names compare case-insensitively. */
export function sshPatternMatch(pattern: string, name: string): boolean {
  const re = pattern.replace(/[.+^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '.*').replace(/\?/g, '.');
  return new RegExp(`^${re}$`, 'i').test(name);
}

/** A Host line's pattern list: a negated match rules the block out whatever else matches. */
export function hostPatternsMatch(patterns: string[], host: string): boolean {
  let hit = false;
  for (const p of patterns) {
    if (p.startsWith('!')) {
      if (sshPatternMatch(p.slice(1), host)) return false;
    } else if (sshPatternMatch(p, host)) hit = true;
  }
  return hit;
}

function badLine(where: string, why: string): GenvaultError {
  return new GenvaultError(`${where}: ${why}`, 'SSH_CONFIG');
}

/** The files an Include names: `~` and relative names as OpenSSH (~/.ssh or /etc/ssh), wildcards in the last part. */
async function includeFiles(arg: string, userFile: boolean): Promise<string[]> {
  let p = arg.startsWith('~/') ? path.join(os.homedir(), arg.slice(2)) : arg;
  if (!path.isAbsolute(p)) p = path.join(userFile ? path.join(os.homedir(), '.ssh') : '/etc/ssh', p);
  const dir = path.dirname(p);
  const base = path.basename(p);
  if (/[*?[]/.test(dir)) throw new GenvaultError(`Include ${arg}: wildcards are supported in the last part of the path only`, 'SSH_CONFIG');
  if (!/[*?]/.test(base)) return [p];
  const names = await fs.readdir(dir).catch(() => [] as string[]);
  // glob(3) order, as OpenSSH; dot files only when the pattern starts with a dot.
  return names.filter((n) => (base.startsWith('.') || !n.startsWith('.')) && sshPatternMatch(base, n)).sort().map((n) => path.join(dir, n));
}

/** Reads and parses one config file (null when it does not exist). */
async function loadFile(file: string): Promise<{ cfg: SSHConfig; lines: Map<Line, number> } | null> {
  let text: string;
  try {
    // Whoever may write it chooses our keys and hosts: root's or ours alone, as OpenSSH.
    text = (await readTrustedFile(file)).toString('utf8');
  } catch (e) {
    if (e instanceof GenvaultError) throw e;
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw new GenvaultError(`cannot read SSH config ${file}: ${(e as Error).message}`, 'SSH_CONFIG');
  }
  let cfg: SSHConfig;
  try {
    cfg = SSHConfig.parse(text);
  } catch (e) {
    throw new GenvaultError(`${file}: cannot parse it: ${(e as Error).message}`, 'SSH_CONFIG');
  }
  return { cfg, lines: lineNumbers(cfg) };
}

/** One directive inside an active block: Include, or a keyword genvault honours (first value wins). */
async function applyDirective(
  sc: Scan, d: { param: string; value: string | Array<{ val: string }>; quoted?: boolean }, where: string, userFile: boolean,
): Promise<void> {
  const key = d.param.trim().toLowerCase();
  const vals = words(d.value);
  if (key === 'include') {
    if (!vals.length) throw badLine(where, 'Include needs a file name');
    if (sc.depth >= 16) throw badLine(where, 'Include nested too deeply');
    for (const v of vals) for (const f of await includeFiles(v, userFile)) await scanFile(sc, f, userFile, true);
    return;
  }
  if (!HONOURED.has(key)) return;
  if (!vals.length) throw badLine(where, `${d.param.trim()} needs a value`);
  // As OpenSSH's "garbage at end of line": these take one word (a quoted IdentityFile may hold spaces).
  if (vals.length > 1 && !d.quoted && /^(hostname|port|user|identitiesonly|stricthostkeychecking|proxyjump)$/.test(key)) {
    throw badLine(where, `${d.param.trim()} takes one value, not "${vals.join(' ')}"`);
  }
  const have = sc.out.values.get(key);
  if (have && !REPEATED.has(key)) return;
  // Multi-word values: a command keeps its words, the others are one value or a list.
  const v = key === 'proxycommand' ? [vals.join(' ')] : key === 'identityfile' || key === 'hostname' || key === 'user' || key === 'port' ? [typeof d.value === 'string' ? d.value : vals.join(' ')] : vals;
  if (have) have.push(...v);
  else {
    sc.out.values.set(key, v);
    sc.out.where.set(key, where);
    sc.out.order.set(key, sc.out.order.size);
  }
}

/**
 * Applies one file's directives for sc.host. Host lines switch blocks on and off; an
 * included file starts in the including block's state and cannot change it.
 */
async function scanFile(sc: Scan, file: string, userFile: boolean, included: boolean): Promise<void> {
  // A missing file (~/.ssh/config, an Include's) is no error, as in OpenSSH; a missing --ssh-config FILE is.
  const loaded = await loadFile(file);
  if (!loaded) {
    if (!included && sc.requireUser && userFile) throw new GenvaultError(`cannot read SSH config ${file}: no such file`, 'SSH_CONFIG');
    return;
  }
  sc.depth++;
  try {
    for (const top of loaded.cfg) {
      if (top.type !== LineType.DIRECTIVE) continue;
      const where = `${file} line ${loaded.lines.get(top) ?? '?'}`;
      if (/^host$/i.test(top.param)) {
        const pats = words(top.value);
        if (!pats.length) throw badLine(where, 'Host needs a pattern');
        if (!hostPatternsMatch(pats, sc.host) || !('config' in top)) continue;
        for (const d of top.config) {
          if (d.type === LineType.DIRECTIVE) await applyDirective(sc, d, `${file} line ${loaded.lines.get(d) ?? '?'}`, userFile);
        }
      } else if (/^match$/i.test(top.param)) {
        if (!sc.warned.has(where)) {
          sc.warned.add(where);
          process.stderr.write(`genvault: warning: ${where}: Match blocks are not evaluated by genvault's SSH client; this one is ignored (--ssh-command ssh honours it)\n`);
        }
      } else {
        await applyDirective(sc, top, where, userFile);
      }
    }
  } finally {
    sc.depth--;
  }
}

/** The config values for host `host` (the name as given, before HostName), from the files in order. */
export async function lookupHostConfig(host: string, files: SshConfigFiles): Promise<HostConfig> {
  const sc: Scan = { host, out: { values: new Map(), where: new Map(), order: new Map() }, warned: warnedMatch, depth: 0, requireUser: !!files.given };
  if (files.user) await scanFile(sc, files.user, true, false);
  if (files.system) await scanFile(sc, files.system, false, false);
  return sc.out;
}

export interface TokenContext {
  /** %h: the host name to connect to (after HostName). */
  host: string;
  /** %n: the name as given. */
  original: string;
  port: number;
  /** %r: the remote user. */
  user: string;
}

/** OpenSSH's %-tokens and `~` in a file name: %% %d %h %i %l %L %n %p %r %u, and ${VAR}. */
export function expandPath(value: string, t: TokenContext, where: string): string {
  let local: { uid: number; username: string };
  try {
    local = os.userInfo();
  } catch {
    // No passwd entry (a container's arbitrary uid): what the environment says.
    local = { uid: process.getuid?.() ?? 0, username: process.env.USER ?? 'root' };
  }
  const hostname = os.hostname();
  const map: Record<string, string> = {
    '%': '%', d: os.homedir(), h: t.host, i: String(local.uid), l: hostname, L: hostname.split('.')[0]!, n: t.original, p: String(t.port), r: t.user, u: local.username,
  };
  let out = value.replace(/%(.)/g, (_m, c: string) => {
    const v = map[c];
    if (v === undefined) throw badLine(where, `unknown token %${c} in "${value}" (genvault knows %% %d %h %i %l %L %n %p %r %u)`);
    return v;
  });
  out = out.replace(/\$\{([A-Za-z_][A-Za-z0-9_]*)\}/g, (_m, n: string) => {
    const v = process.env[n];
    if (v === undefined) throw badLine(where, `environment variable ${n} in "${value}" is not set`);
    return v;
  });
  if (out === '~' || out.startsWith('~/')) out = path.join(os.homedir(), out.slice(1));
  // A relative name stays relative to the working directory, as ssh leaves it (only Include's are under ~/.ssh).
  return path.resolve(out);
}

/** `[user@]host[:port]` or `ssh://[user@]host[:port]`, one ProxyJump hop. */
export function parseJumpHop(hop: string, where: string): { user?: string; host: string; port?: number } {
  const m = /^(?:ssh:\/\/)?(?:([^@/]+)@)?(\[[^\]/]+\]|[^:/@[\]]+)(?::(\d+))?\/?$/.exec(hop);
  if (!m) throw badLine(where, `bad ProxyJump hop "${hop}": expected [user@]host[:port]`);
  const port = m[3] ? Number(m[3]) : undefined;
  if (port !== undefined && (port < 1 || port > 65535)) throw badLine(where, `bad port in ProxyJump hop "${hop}"`);
  const host = m[2]!.startsWith('[') ? m[2]!.slice(1, -1) : m[2]!;
  return { user: m[1], host, port };
}

export type StrictMode = 'yes' | 'accept-new' | 'no';

/** StrictHostKeyChecking's value: yes, accept-new, no/off; ask (and unset) is genvault's strict default, since nothing can be asked in a backup job. */
export function parseStrict(v: string | undefined, where: string): StrictMode | undefined {
  if (v === undefined) return undefined;
  switch (v.toLowerCase()) {
    case 'yes':
    case 'ask':
      return 'yes';
    case 'accept-new':
      return 'accept-new';
    case 'no':
    case 'off':
      return 'no';
    default:
      throw badLine(where, `bad StrictHostKeyChecking "${v}" (yes, accept-new, no, off or ask)`);
  }
}

export function parseYesNo(v: string | undefined, key: string, where: string): boolean | undefined {
  if (v === undefined) return undefined;
  const l = v.toLowerCase();
  if (l === 'yes' || l === 'true') return true;
  if (l === 'no' || l === 'false') return false;
  throw badLine(where, `bad ${key} "${v}" (yes or no)`);
}

export function parsePort(v: string, where: string): number {
  const n = /^\d+$/.test(v) ? Number(v) : NaN;
  if (!Number.isInteger(n) || n < 1 || n > 65535) throw badLine(where, `bad Port "${v}"`);
  return n;
}

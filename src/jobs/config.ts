/**
 * The job file (YAML, default /etc/genvault/jobs.yaml): which repository, and per job the
 * source, schedule, retention, tags, SSH options and hooks. Every problem is reported as
 * `FILE:LINE: FIELD: what is wrong`, so an admin can go straight to it.
 *
 *   repository: /srv/genvault
 *   timezone: UTC                      # schedules in this zone (default: the host's)
 *   defaults:                          # merged into every job (a job's own fields win)
 *     schedule: "0 2 * * *"
 *     retention: { keep-daily: 7, keep-weekly: 4 }
 *   jobs:
 *     vm1:
 *       source: ssh://root@kvm1/dev/vg0/vm1-snap
 *       hooks:
 *         pre:  ["lvcreate -s -L 2G -n vm1-snap vg0/vm1"]
 *         post: ["lvremove -f vg0/vm1-snap"]
 *     offsite:                         # instead of source: copy generations (genvault sync)
 *       sync: { to: /mnt/offsite/gv, images: [vm1], keep: { keep-daily: 14 } }
 *       (to: ssh://backup@offsite/srv/gv for a served repository; the job's ssh: applies)
 *       schedule: "0 4 * * *"
 */
import path from 'node:path';
import YAML, { isCollection, isMap, isScalar, isSeq, LineCounter, Node as YamlNode, Pair, YAMLMap } from 'yaml';
import { GenvaultError } from '../util/errors.js';
import { checkTrustedFile, readTrustedFile } from '../util/trust.js';
import { tryParseDuration } from '../util/duration.js';
import { IMAGE_NAME_RE } from '../format/config.js';
import type { RetentionRules } from '../lifecycle/retention.js';
import { isSshSpec, parseSshSpec } from '../source/ssh.js';
import { isNbdUri, parseNbdUri } from '../nbd/client.js';
import { isRbdSpec, parseRbdSpec, type CephCluster } from '../source/rbd-cli.js';
import { isSshMode, type SshMode } from '../source/ssh-agent.js';
import { Schedule } from './schedule.js';

export const DEFAULT_JOBS_FILE = '/etc/genvault/jobs.yaml';
/** A hook that runs longer than this is killed and counts as failed. */
export const DEFAULT_HOOK_TIMEOUT_MS = 30 * 60_000;
/** How long after a scheduled time a run may take before status counts it as missed. */
export const DEFAULT_GRACE_MS = 60 * 60_000;

export interface HookSpec {
  run: string;
  /** Where it runs: `source` is the source's host (over the job's SSH connection), or here for local sources. */
  on: 'source' | 'local';
  timeoutMs: number;
  line: number;
}

export interface JobSsh {
  identity?: string;
  knownHosts?: string;
  acceptNewHostKey?: boolean;
  /** ssh config file read instead of ~/.ssh/config and /etc/ssh/ssh_config, or none (--ssh-config). */
  config?: string;
  /** The system ssh client as the transport (--ssh-command). */
  command?: string;
  mode: SshMode;
}

/** Where to report a run: a command, e-mail through sendmail, an HTTP webhook (any of them). */
export interface NotifySpec {
  /** failure: failed runs only; always: every run. */
  on: 'failure' | 'always';
  command?: string;
  email?: string[];
  /** The sendmail program (it reads the message with -t). */
  sendmail: string;
  webhook?: string;
  timeoutMs: number;
  line: number;
}

export const DEFAULT_SENDMAIL = '/usr/sbin/sendmail';
export const DEFAULT_NOTIFY_TIMEOUT_MS = 60_000;

/** A sync job's `sync:` (genvault sync from the job file's repository to `to`). */
export interface SyncJobSpec {
  /** The destination repository (made with `genvault -r TO init --like REPOSITORY`). */
  to: string;
  /** Images to copy (empty: all). */
  images: string[];
  /** Retention applied at the destination after the copy; null: none. */
  rules: RetentionRules | null;
  minAgeMs?: number;
  /** The destination's key or passphrase file (0600), when it is not the job file's key-file. */
  keyFile?: string;
}

export interface JobConfig {
  name: string;
  /** Image name in the repository (default: the job name). */
  image: string;
  source: string;
  schedule: Schedule | null;
  tags: string[];
  /** Retention rules applied to the image after each successful backup; null: keep all. */
  retention: RetentionRules | null;
  /** Minimum age guard for the retention (default: the repository's). */
  minAgeMs?: number;
  graceMs: number;
  hooks: { pre: HookSpec[]; post: HookSpec[] };
  ssh: JobSsh;
  /** nbd:// sources: the QEMU dirty bitmap whose dirty extents alone are read (native-notes/nbd.md). */
  bitmap?: string;
  /** rbd: sources: the cluster and client (rbd's -c, --id, --keyring); unset fields are rbd's defaults. */
  ceph?: CephCluster;
  /** Null: no notification. */
  notify: NotifySpec | null;
  /** A sync job (no source: it copies generations to another repository). */
  sync?: SyncJobSpec;
  /** Line of the job's name in the file. */
  line: number;
}

export interface JobsFile {
  file: string;
  repository: string | null;
  /** `key-file:` an encrypted repository's key or passphrase file (0600), unless --key-file is given. */
  keyFile: string | null;
  timezone: string | null;
  jobs: JobConfig[];
  /** The defaults' notify: also where `genvault notify` (a unit's OnFailure=) reports. */
  notify: NotifySpec | null;
}

export interface ConfigProblem {
  line: number;
  field: string;
  message: string;
}

export class ConfigError extends GenvaultError {
  constructor(
    readonly file: string,
    readonly problems: ConfigProblem[],
  ) {
    const first = problems[0]!;
    const more = problems.length > 1 ? ` (and ${problems.length - 1} more; list them all with: genvault run --check --config ${file})` : '';
    super(`${formatProblem(file, first)}${more}`, 'CONFIG', 1);
  }
}

export function formatProblem(file: string, p: ConfigProblem): string {
  return `${file}:${p.line}: ${p.field ? `${p.field}: ` : ''}${p.message}`;
}

const TOP_KEYS = ['repository', 'key-file', 'timezone', 'defaults', 'jobs'];
const JOB_KEYS = ['source', 'image', 'schedule', 'tags', 'retention', 'hooks', 'ssh', 'grace', 'notify', 'bitmap', 'sync', 'ceph'];
const CEPH_KEYS = ['conf', 'id', 'keyring'];
const SYNC_KEYS = ['to', 'images', 'keep', 'key-file'];
const DEFAULT_KEYS = ['schedule', 'tags', 'retention', 'hooks', 'ssh', 'grace', 'notify'];
const NOTIFY_KEYS = ['on', 'command', 'email', 'webhook', 'sendmail', 'timeout'];
const RETENTION_KEYS: Record<string, keyof RetentionRules | 'min-age'> = {
  'keep-last': 'keepLast',
  'keep-hourly': 'keepHourly',
  'keep-daily': 'keepDaily',
  'keep-weekly': 'keepWeekly',
  'keep-monthly': 'keepMonthly',
  'keep-yearly': 'keepYearly',
  'keep-tags': 'keepTags',
  'min-age': 'min-age',
};
const SSH_KEYS = ['identity', 'known-hosts', 'accept-new-host-key', 'config', 'command', 'mode'];
const HOOK_KEYS = ['run', 'on', 'timeout'];

/** Levenshtein distance, for "did you mean" on misspelt fields. */
function distance(a: string, b: string): number {
  const d = Array.from({ length: a.length + 1 }, (_, i) => [i, ...Array<number>(b.length).fill(0)]);
  for (let j = 1; j <= b.length; j++) d[0]![j] = j;
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      d[i]![j] = Math.min(d[i - 1]![j]! + 1, d[i]![j - 1]! + 1, d[i - 1]![j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1));
    }
  }
  return d[a.length]![b.length]!;
}

class Checker {
  problems: ConfigProblem[] = [];
  constructor(private lc: LineCounter) {}

  line(node: unknown): number {
    const r = (node as YamlNode | undefined)?.range;
    return r ? this.lc.linePos(r[0]).line : 1;
  }

  add(node: unknown, field: string, message: string): void {
    this.problems.push({ line: this.line(node), field, message });
  }

  /** The pairs of a mapping, checking keys against `allowed`. */
  pairs(node: unknown, field: string, allowed: string[] | null): Array<{ key: string; value: unknown; pair: Pair; keyNode: unknown }> {
    if (!isMap(node)) {
      this.add(node, field, 'expected a mapping (key: value lines)');
      return [];
    }
    const out = [];
    const seen = new Map<string, number>();
    for (const pair of (node as YAMLMap).items) {
      const keyNode = pair.key;
      const key = isScalar(keyNode) ? String(keyNode.value) : null;
      if (key === null) {
        this.add(keyNode ?? node, field, 'keys must be plain names');
        continue;
      }
      const f = field ? `${field}.${key}` : key;
      if (seen.has(key)) {
        this.add(keyNode, f, `given twice (first on line ${seen.get(key)})`);
        continue;
      }
      seen.set(key, this.line(keyNode));
      if (allowed && !allowed.includes(key)) {
        const near = allowed.filter((a) => distance(a, key) <= 2);
        this.add(keyNode, f, `unknown field${near.length ? ` (did you mean ${near.join(' or ')}?)` : ` (expected one of: ${allowed.join(', ')})`}`);
        continue;
      }
      out.push({ key, value: pair.value, pair, keyNode });
    }
    return out;
  }

  string(node: unknown, field: string): string | null {
    if (isScalar(node) && typeof node.value === 'string' && node.value.trim() !== '') return node.value;
    if (isScalar(node) && (typeof node.value === 'number' || typeof node.value === 'boolean')) return String(node.value);
    this.add(node, field, 'expected a non-empty string');
    return null;
  }

  count(node: unknown, field: string): number | null {
    if (isScalar(node) && typeof node.value === 'number' && Number.isInteger(node.value) && node.value >= 0) return node.value;
    this.add(node, field, 'expected a whole number >= 0');
    return null;
  }

  bool(node: unknown, field: string): boolean | null {
    if (isScalar(node) && typeof node.value === 'boolean') return node.value;
    this.add(node, field, 'expected true or false');
    return null;
  }

  duration(node: unknown, field: string): number | null {
    const s = isScalar(node) && (typeof node.value === 'string' || node.value === 0) ? String(node.value) : null;
    const ms = s === null ? null : tryParseDuration(s);
    if (ms === null) this.add(node, field, 'expected a duration such as 90s, 30m, 36h, 7d, 2w or 0');
    return ms;
  }

  stringList(node: unknown, field: string): string[] {
    if (isScalar(node) && typeof node.value === 'string') return [node.value];
    if (!isSeq(node)) {
      this.add(node, field, 'expected a list of strings');
      return [];
    }
    const out: string[] = [];
    node.items.forEach((item, i) => {
      const v = this.string(item, `${field}[${i}]`);
      if (v !== null) out.push(v);
    });
    return out;
  }
}

interface PartialJob {
  schedule?: { value: Schedule | null; node: unknown };
  tags?: string[];
  retention?: { rules: RetentionRules; minAgeMs?: number } | null;
  hooks?: { pre: HookSpec[]; post: HookSpec[] };
  ssh?: Partial<JobSsh>;
  graceMs?: number;
  notify?: NotifySpec | null;
}

function parseSchedule(c: Checker, node: unknown, field: string, tz: string | null): Schedule | null {
  if (isScalar(node) && node.value === null) return null;
  const s = c.string(node, field);
  if (s === null) return null;
  try {
    return new Schedule(s, tz);
  } catch (e) {
    c.add(node, field, (e as Error).message);
    return null;
  }
}

function parseRetention(c: Checker, node: unknown, field: string): { rules: RetentionRules; minAgeMs?: number } | null {
  if (isScalar(node) && (node.value === null || node.value === false)) return null;
  const rules: RetentionRules = {};
  let minAgeMs: number | undefined;
  const before = c.problems.length;
  for (const { key, value } of c.pairs(node, field, Object.keys(RETENTION_KEYS))) {
    const k = RETENTION_KEYS[key]!;
    const f = `${field}.${key}`;
    if (k === 'min-age') minAgeMs = c.duration(value, f) ?? undefined;
    else if (k === 'keepTags') rules.keepTags = c.stringList(value, f);
    else {
      const n = c.count(value, f);
      if (n !== null) rules[k] = n;
    }
  }
  const any = Object.entries(rules).some(([k, v]) => (k === 'keepTags' ? (v as string[]).length > 0 : (v as number) > 0));
  if (!any && isMap(node) && c.problems.length === before) c.add(node, field, 'keeps nothing: give at least one keep-* rule above 0 (or leave retention out to keep every generation)');
  return { rules, minAgeMs };
}

function parseHookList(c: Checker, node: unknown, field: string): HookSpec[] {
  if (isScalar(node) && node.value === null) return [];
  const items = isSeq(node) ? node.items : [node];
  const out: HookSpec[] = [];
  items.forEach((item, i) => {
    const f = isSeq(node) ? `${field}[${i}]` : field;
    if (isScalar(item)) {
      const run = c.string(item, f);
      if (run !== null) out.push({ run, on: 'source', timeoutMs: DEFAULT_HOOK_TIMEOUT_MS, line: c.line(item) });
      return;
    }
    let run: string | null = null;
    let on: HookSpec['on'] = 'source';
    let timeoutMs = DEFAULT_HOOK_TIMEOUT_MS;
    for (const { key, value } of c.pairs(item, f, HOOK_KEYS)) {
      if (key === 'run') run = c.string(value, `${f}.run`);
      else if (key === 'on') {
        const v = c.string(value, `${f}.on`);
        if (v === 'source' || v === 'local') on = v;
        else if (v !== null) c.add(value, `${f}.on`, 'expected "source" (the host the source is read from) or "local" (this host)');
      } else if (key === 'timeout') timeoutMs = c.duration(value, `${f}.timeout`) ?? timeoutMs;
    }
    if (run === null && isMap(item)) c.add(item, `${f}.run`, 'missing: the command to run');
    if (run !== null) out.push({ run, on, timeoutMs, line: c.line(item) });
  });
  return out;
}

function parseSsh(c: Checker, node: unknown, field: string, base: string): Partial<JobSsh> {
  const out: Partial<JobSsh> = {};
  for (const { key, value } of c.pairs(node, field, SSH_KEYS)) {
    const f = `${field}.${key}`;
    if (key === 'identity' || key === 'known-hosts') {
      const v = c.string(value, f);
      if (v !== null) out[key === 'identity' ? 'identity' : 'knownHosts'] = path.resolve(base, v);
    } else if (key === 'accept-new-host-key') out.acceptNewHostKey = c.bool(value, f) ?? undefined;
    else if (key === 'config') {
      const v = c.string(value, f);
      if (v !== null) out.config = v === 'none' ? v : path.resolve(base, v);
    } else if (key === 'command') {
      const v = c.string(value, f);
      if (v !== null) out.command = v;
    } else if (key === 'mode') {
      const v = c.string(value, f);
      if (isSshMode(v)) out.mode = v;
      else if (v !== null) c.add(value, f, 'expected auto, agent or plain');
    }
  }
  return out;
}

/** A job's or the defaults' `notify:`; null (`notify: null` or `false`) turns the defaults' off. */
function parseNotify(c: Checker, node: unknown, field: string): NotifySpec | null {
  if (isScalar(node) && (node.value === null || node.value === false)) return null;
  const out: NotifySpec = { on: 'failure', sendmail: DEFAULT_SENDMAIL, timeoutMs: DEFAULT_NOTIFY_TIMEOUT_MS, line: c.line(node) };
  const before = c.problems.length;
  for (const { key, value } of c.pairs(node, field, NOTIFY_KEYS)) {
    const f = `${field}.${key}`;
    const v = key === 'email' || key === 'timeout' ? null : c.string(value, f);
    if (key === 'on') {
      if (v === 'failure' || v === 'always') out.on = v;
      else if (v !== null) c.add(value, f, 'expected "failure" (failed runs only) or "always" (every run)');
    } else if (key === 'command' && v !== null) out.command = v;
    else if (key === 'email') {
      const list = c.stringList(value, f);
      list.forEach((a) => {
        if (!/^[^\s@<>,;"']+@[^\s@<>,;"']+$/.test(a)) c.add(value, f, `${JSON.stringify(a)} is not an e-mail address (such as root@example.com)`);
      });
      out.email = list;
    } else if (key === 'webhook' && v !== null) {
      let url: URL | null = null;
      try {
        url = new URL(v);
      } catch {
        /* reported below */
      }
      if (!url || (url.protocol !== 'http:' && url.protocol !== 'https:')) c.add(value, f, 'expected an http:// or https:// URL');
      else out.webhook = v;
    } else if (key === 'sendmail' && v !== null) {
      if (path.isAbsolute(v)) out.sendmail = v;
      else c.add(value, f, 'expected the absolute path of a sendmail program');
    } else if (key === 'timeout') out.timeoutMs = c.duration(value, f) ?? out.timeoutMs;
  }
  if (isMap(node) && c.problems.length === before && !out.command && !out.email?.length && !out.webhook) {
    c.add(node, field, 'sends nothing: give command, email or webhook (or notify: false to turn it off)');
  }
  return out;
}

function parsePartial(c: Checker, node: unknown, field: string, allowed: string[], tz: string | null, base: string): PartialJob & { rest: Map<string, unknown> } {
  const out: PartialJob & { rest: Map<string, unknown> } = { rest: new Map() };
  for (const { key, value } of c.pairs(node, field, allowed)) {
    const f = `${field}.${key}`;
    switch (key) {
      case 'schedule':
        out.schedule = { value: parseSchedule(c, value, f, tz), node: value };
        break;
      case 'tags':
        out.tags = c.stringList(value, f);
        break;
      case 'retention':
        out.retention = parseRetention(c, value, f);
        break;
      case 'hooks': {
        const h = { pre: [] as HookSpec[], post: [] as HookSpec[] };
        for (const p of c.pairs(value, f, ['pre', 'post'])) h[p.key as 'pre' | 'post'] = parseHookList(c, p.value, `${f}.${p.key}`);
        out.hooks = h;
        break;
      }
      case 'ssh':
        out.ssh = parseSsh(c, value, f, base);
        break;
      case 'grace':
        out.graceMs = c.duration(value, f) ?? undefined;
        break;
      case 'notify':
        out.notify = parseNotify(c, value, f);
        break;
      default:
        out.rest.set(key, value);
    }
  }
  return out;
}

/**
 * Where a quoted string or flow collection that an error at `pos` lies in was opened, or
 * null. An unclosed quote or bracket is reported where the text ends (often past the last
 * line); the admin needs the line that opened it.
 */
function unclosedAt(doc: YAML.Document, pos: number): number | null {
  let start: number | null = null;
  YAML.visit(doc, (_k, n) => {
    const r = (n as YamlNode | null)?.range;
    if (!r || r[0] > pos || pos > r[2]) return;
    const flow = isCollection(n) && n.flow === true;
    const quoted = isScalar(n) && (n.type === 'QUOTE_DOUBLE' || n.type === 'QUOTE_SINGLE');
    if (flow || quoted) start = r[0]; // the innermost wins: visited last
  });
  return start;
}

/** The document's root mapping; throws ConfigError on YAML syntax errors or a root that is not a mapping. */
function parseRoot(text: string, file: string): { c: Checker; root: YAMLMap } {
  const lc = new LineCounter();
  const doc = YAML.parseDocument(text, { lineCounter: lc, uniqueKeys: false, prettyErrors: false });
  const c = new Checker(lc);
  if (doc.errors.length) {
    for (const e of doc.errors) {
      const opened = unclosedAt(doc, e.pos[0]);
      const line = lc.linePos(opened ?? e.pos[0]).line;
      const what = e.message.split('\n')[0]!.replace(/ at line \d+, column \d+:?$/, '');
      c.problems.push({ line, field: '', message: `YAML syntax: ${what}${opened !== null ? ` (opened here, still open at line ${lc.linePos(e.pos[0]).line})` : ''}` });
    }
    throw new ConfigError(file, c.problems);
  }
  const root = doc.contents;
  if (!isMap(root)) {
    c.add(root ?? undefined, '', 'expected a mapping with "jobs:" (and usually "repository:")');
    throw new ConfigError(file, c.problems);
  }
  return { c, root };
}

/** The top-level `timezone:`, null if absent or unknown (reported). */
function parseTimezone(c: Checker, tzNode: unknown): string | null {
  let timezone = c.string(tzNode, 'timezone');
  if (timezone !== null) {
    try {
      new Intl.DateTimeFormat('en', { timeZone: timezone });
    } catch {
      c.add(tzNode, 'timezone', `unknown time zone ${JSON.stringify(timezone)} (use e.g. UTC or Europe/Berlin)`);
      timezone = null;
    }
  }
  return timezone;
}

/** A job's `source:`, null if missing or invalid (reported). */
function parseJobSource(c: Checker, p: PartialJob & { rest: Map<string, unknown> }, value: unknown, keyNode: unknown, f: string): string | null {
  let source: string | null = null;
  const srcNode = p.rest.get('source');
  if (srcNode === undefined) {
    if (isMap(value)) c.add(keyNode, `${f}.source`, 'missing: an image file, a block device, or ssh://[user@]host[:port]/path');
  } else {
    source = c.string(srcNode, `${f}.source`);
    if (source !== null) {
      if (isSshSpec(source)) {
        try {
          parseSshSpec(source);
        } catch (e) {
          c.add(srcNode, `${f}.source`, (e as Error).message);
        }
      } else if (isNbdUri(source)) {
        try {
          parseNbdUri(source);
        } catch (e) {
          c.add(srcNode, `${f}.source`, (e as Error).message);
        }
      } else if (isRbdSpec(source)) {
        try {
          if (parseRbdSpec(source).snap === null) c.add(srcNode, `${f}.source`, 'an rbd: job source needs @SNAP (a pre-hook makes it; see "RBD sources" in README.md)');
        } catch (e) {
          c.add(srcNode, `${f}.source`, (e as Error).message);
        }
      } else if (source === '-') {
        c.add(srcNode, `${f}.source`, 'standard input cannot be a job source');
      } else if (!path.isAbsolute(source)) {
        c.add(srcNode, `${f}.source`, 'expected an absolute path, an ssh:// URL, an nbd:// URI or rbd:POOL/IMAGE@SNAP');
      }
    }
  }
  return source;
}

/** A job's `sync:` (paths relative to the job file's directory). */
function parseSyncSpec(c: Checker, node: unknown, field: string, base: string): SyncJobSpec | null {
  let to: string | null = null;
  const spec: Omit<SyncJobSpec, 'to'> = { images: [], rules: null };
  for (const { key, value } of c.pairs(node, field, SYNC_KEYS)) {
    const f = `${field}.${key}`;
    if (key === 'to') {
      const v = c.string(value, f);
      // A directory (relative to the job file), a served repository (ssh://user@host/path) or a bucket (s3://).
      if (v !== null) to = v.startsWith('ssh://') || v.startsWith('s3://') ? v : path.resolve(base, v);
    } else if (key === 'images') {
      spec.images = c.stringList(value, f);
      for (const n of spec.images) if (!IMAGE_NAME_RE.test(n) || n === 'latest') c.add(value, f, `invalid image name ${JSON.stringify(n)}`);
    } else if (key === 'keep') {
      const r = parseRetention(c, value, f);
      spec.rules = r?.rules ?? null;
      if (r?.minAgeMs !== undefined) spec.minAgeMs = r.minAgeMs;
    } else if (key === 'key-file') {
      const v = c.string(value, f);
      if (v !== null) spec.keyFile = path.resolve(base, v);
    }
  }
  if (to === null) {
    if (isMap(node)) c.add(node, `${field}.to`, 'missing: the destination repository (a directory, ssh://user@host/path or s3://BUCKET/PREFIX)');
    return null;
  }
  return { to, ...spec };
}

/** What one entry of `jobs:` is parsed with: the checker, the file-wide settings, and the images taken so far. */
interface JobsContext {
  c: Checker;
  defaults: PartialJob;
  timezone: string | null;
  base: string;
  /** Image name -> the job that backs it up. */
  images: Map<string, string>;
}

/** A job's `ceph:` (conf and keyring relative to the job file's directory), only for rbd: sources. */
function parseCeph(c: Checker, node: unknown, field: string, source: string | null, base: string): CephCluster | undefined {
  if (node === undefined) return undefined;
  if (source !== null && !isRbdSpec(source)) c.add(node, field, 'only for rbd: sources');
  const out: CephCluster = {};
  for (const { key, value } of c.pairs(node, field, CEPH_KEYS)) {
    const v = c.string(value, `${field}.${key}`);
    if (v === null) continue;
    if (key === 'id') out.id = v;
    else if (key === 'conf') out.conf = path.resolve(base, v);
    else out.keyring = path.resolve(base, v);
  }
  return out;
}

/** One entry of `jobs:`, merged with the defaults; null if it has no valid source (problems reported). */
function parseJob(x: JobsContext, name: string, value: unknown, keyNode: unknown): JobConfig | null {
  const { c, defaults, images } = x;
  const f = `jobs.${name}`;
  if (!IMAGE_NAME_RE.test(name) || name === 'latest') {
    c.add(keyNode, f, "invalid job name: use letters, digits, '.', '_' and '-' (not starting with '.' or '-')");
    return null;
  }
  const p = parsePartial(c, value, f, JOB_KEYS, x.timezone, x.base);
  if (p.rest.has('sync')) return parseSyncJob(x, name, p, keyNode);
  const source = parseJobSource(c, p, value, keyNode, f);
  let image = name;
  if (p.rest.has('image')) {
    const v = c.string(p.rest.get('image'), `${f}.image`);
    if (v !== null && (!IMAGE_NAME_RE.test(v) || v === 'latest')) c.add(p.rest.get('image'), `${f}.image`, 'invalid image name');
    else if (v !== null) image = v;
  }
  const other = images.get(image);
  if (other) c.add(keyNode, f, `image ${image} is already backed up by job ${other}: two jobs writing one image would fight over it`);
  images.set(image, name);
  const ssh: JobSsh = { mode: 'auto', ...defaults.ssh, ...p.ssh };
  const h0 = p.hooks ?? defaults.hooks ?? { pre: [], post: [] };
  const hooks = { pre: h0.pre.map((h) => ({ ...h })), post: h0.post.map((h) => ({ ...h })) };
  if (source !== null && !isSshSpec(source)) {
    // A local source's "source host" is this host.
    for (const h of [...hooks.pre, ...hooks.post]) h.on = h.on === 'source' ? 'local' : h.on;
  }
  let bitmap: string | undefined;
  if (p.rest.has('bitmap')) {
    bitmap = c.string(p.rest.get('bitmap'), `${f}.bitmap`) ?? undefined;
    if (bitmap !== undefined && source !== null && !isNbdUri(source)) c.add(p.rest.get('bitmap'), `${f}.bitmap`, 'only for nbd:// and nbd+unix:// sources');
  }
  const ceph = parseCeph(c, p.rest.get('ceph'), `${f}.ceph`, source, x.base);
  const schedule = p.schedule ?? defaults.schedule;
  const retention = p.retention !== undefined ? p.retention : defaults.retention;
  if (source === null) return null;
  return {
    name,
    image,
    source,
    schedule: schedule?.value ?? null,
    tags: p.tags ?? defaults.tags ?? [],
    retention: retention?.rules ?? null,
    minAgeMs: retention?.minAgeMs,
    graceMs: p.graceMs ?? defaults.graceMs ?? DEFAULT_GRACE_MS,
    hooks,
    ssh,
    notify: p.notify !== undefined ? p.notify : (defaults.notify ?? null),
    ...(bitmap !== undefined ? { bitmap } : {}),
    ...(ceph ? { ceph } : {}),
    line: c.line(keyNode),
  };
}

/**
 * A sync job: `sync:` instead of `source:` (and no image, bitmap or retention of its own:
 * its `keep:` applies at the destination). Its lock and history go by the job's name;
 * hooks run on this host.
 */
function parseSyncJob(x: JobsContext, name: string, p: PartialJob & { rest: Map<string, unknown> }, keyNode: unknown): JobConfig | null {
  const { c, defaults } = x;
  const f = `jobs.${name}`;
  for (const k of ['source', 'image', 'bitmap']) if (p.rest.has(k)) c.add(p.rest.get(k), `${f}.${k}`, 'not with sync: a sync job copies generations of the repository');
  if (p.retention !== undefined) c.add(keyNode, `${f}.retention`, 'not with sync: give the destination\'s rules as sync.keep');
  const spec = parseSyncSpec(c, p.rest.get('sync'), `${f}.sync`, x.base);
  const other = x.images.get(name);
  if (other) c.add(keyNode, f, `image ${name} is backed up by job ${other}: a sync job takes its name for its lock and history; rename it`);
  x.images.set(name, name);
  const h0 = p.hooks ?? defaults.hooks ?? { pre: [], post: [] };
  const local = (h: HookSpec) => ({ ...h, on: 'local' as const });
  if (!spec) return null;
  const schedule = p.schedule ?? defaults.schedule;
  return {
    name,
    image: name,
    source: `sync to ${spec.to}`,
    schedule: schedule?.value ?? null,
    tags: [],
    retention: null,
    graceMs: p.graceMs ?? defaults.graceMs ?? DEFAULT_GRACE_MS,
    hooks: { pre: h0.pre.map(local), post: h0.post.map(local) },
    // identity, known-hosts, config and command reach an ssh:// destination.
    ssh: { mode: 'auto', ...defaults.ssh, ...p.ssh },
    notify: p.notify !== undefined ? p.notify : (defaults.notify ?? null),
    sync: spec,
    line: c.line(keyNode),
  };
}

/** Parse and check a job file's text; throws ConfigError listing every problem. */
export function parseJobsText(text: string, file: string): JobsFile {
  const { c, root } = parseRoot(text, file);
  const base = path.dirname(path.resolve(file));
  const top = new Map(c.pairs(root, '', TOP_KEYS).map((p) => [p.key, p]));
  let repository: string | null = null;
  if (top.has('repository')) {
    const v = c.string(top.get('repository')!.value, 'repository');
    if (v !== null) repository = v.startsWith('s3://') ? v : path.resolve(base, v);
  }
  let keyFile: string | null = null;
  if (top.has('key-file')) {
    const v = c.string(top.get('key-file')!.value, 'key-file');
    if (v !== null) keyFile = path.resolve(base, v);
  }
  const timezone = top.has('timezone') ? parseTimezone(c, top.get('timezone')!.value) : null;
  const defaults: PartialJob = top.has('defaults') ? parsePartial(c, top.get('defaults')!.value, 'defaults', DEFAULT_KEYS, timezone, base) : {};

  const jobs: JobConfig[] = [];
  const jobsPair = top.get('jobs');
  if (!jobsPair) c.add(root, 'jobs', 'missing: a mapping of job names to jobs');
  else {
    const x: JobsContext = { c, defaults, timezone, base, images: new Map() };
    for (const { key: name, value, keyNode } of c.pairs(jobsPair.value, 'jobs', null)) {
      const job = parseJob(x, name, value, keyNode);
      if (job) jobs.push(job);
    }
    if (isMap(jobsPair.value) && !jobsPair.value.items.length) c.add(jobsPair.value, 'jobs', 'no jobs defined');
  }
  if (c.problems.length) throw new ConfigError(file, c.problems.sort((a, b) => a.line - b.line));
  return { file, repository, keyFile, timezone, jobs, notify: defaults.notify ?? null };
}

/**
 * Read and check a job file. Its hooks run as the user running genvault (root), so like
 * cron and sudo it is refused unless it and its directory are owned by root (or that user)
 * and not writable by group or others (src/util/trust.ts).
 */
export async function loadJobsFile(file: string): Promise<JobsFile> {
  let text: string;
  try {
    text = (await readTrustedFile(file, { dir: true })).toString('utf8');
  } catch (e) {
    if (e instanceof GenvaultError) throw e;
    const code = (e as NodeJS.ErrnoException).code;
    const why = code === 'ENOENT' ? 'no such file (give --config FILE)' : code === 'EACCES' ? 'permission denied' : (e as Error).message;
    throw new GenvaultError(`cannot read job file ${file}: ${why}`, code === 'ENOENT' ? 'ENOENT' : 'CONFIG');
  }
  return parseJobsText(text, file);
}

/** The files a job file names for SSH (identity, known_hosts), checked as connecting would; a missing one passes. */
export async function checkJobFiles(f: JobsFile): Promise<string[]> {
  const out: string[] = [];
  const seen = new Set<string>();
  // The repository's key file: refused when group or others may read it, as when it is used.
  if (f.keyFile) await checkTrustedFile(f.keyFile, { secret: true }).catch((e: Error) => out.push(`key-file: ${e.message}`));
  for (const j of f.jobs) {
    if (j.sync?.keyFile) await checkTrustedFile(j.sync.keyFile, { secret: true }).catch((e: Error) => out.push(`jobs.${j.name}.sync.key-file: ${e.message}`));
    for (const [file, secret] of [[j.ssh.identity, true], [j.ssh.knownHosts, false]] as const) {
      if (!file || seen.has(file)) continue;
      seen.add(file);
      await checkTrustedFile(file, { secret }).catch((e: Error) => out.push(`jobs.${j.name}.ssh: ${e.message}`));
    }
  }
  return out;
}

/** The jobs named on the command line, in the file's order; unknown names are an error. */
export function selectJobs(f: JobsFile, names: string[]): JobConfig[] {
  if (!names.length) return f.jobs;
  for (const n of names) {
    if (!f.jobs.some((j) => j.name === n)) {
      throw new GenvaultError(`no job named ${n} in ${f.file} (jobs: ${f.jobs.map((j) => j.name).join(', ')})`, 'NOT_FOUND');
    }
  }
  return f.jobs.filter((j) => names.includes(j.name));
}

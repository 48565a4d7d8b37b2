/**
 * The `rbd` command (Debian's ceph-common) as genvault runs it, for rbd: sources and
 * restore targets: image specs, the cluster options, and the processes. genvault links
 * no Ceph library and maps nothing in the kernel: every byte comes through rbd's stdout
 * or goes through its stdin (native-notes/ceph.md, "RBD"). rbd reads CEPH_CONF and
 * CEPH_ARGS from the environment it inherits; --ceph-conf, --ceph-id and --ceph-keyring
 * become -c, --id and --keyring.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { GenvaultError, UsageError } from '../util/errors.js';

/** Which cluster, as whom: each unset field is left to ceph.conf and the environment. */
export interface CephCluster {
  conf?: string;
  id?: string;
  keyring?: string;
}

/** rbd:POOL/IMAGE[@SNAP] or rbd:POOL/NAMESPACE/IMAGE[@SNAP]. */
export interface RbdSpec {
  pool: string;
  namespace: string | null;
  image: string;
  snap: string | null;
}

export function isRbdSpec(s: string): boolean {
  return s.startsWith('rbd:');
}

/**
 * Pool, namespace, image and snapshot names as genvault accepts them: no '/', '@' or
 * white space, and not starting with '-' (so a name can never pass for an option of rbd).
 */
const NAME = /^[^/@\s-][^/@\s]*$/;

export function parseRbdSpec(s: string): RbdSpec {
  const bad = (why: string) => new UsageError(`${JSON.stringify(s)}: ${why} (expected rbd:POOL/IMAGE@SNAP or rbd:POOL/NAMESPACE/IMAGE@SNAP)`);
  if (!isRbdSpec(s)) throw bad('not an rbd: spec');
  const body = s.slice(4);
  const at = body.indexOf('@');
  const path = at < 0 ? body : body.slice(0, at);
  const snap = at < 0 ? null : body.slice(at + 1);
  const parts = path.split('/');
  if (parts.length < 2 || parts.length > 3) throw bad('give the pool and the image');
  for (const p of parts) if (!NAME.test(p)) throw bad(`${JSON.stringify(p)} is not a pool, namespace or image name`);
  if (snap !== null && !NAME.test(snap)) throw bad(`${JSON.stringify(snap)} is not a snapshot name`);
  return { pool: parts[0]!, namespace: parts.length === 3 ? parts[1]! : null, image: parts.at(-1)!, snap };
}

/** POOL/[NAMESPACE/]IMAGE, as rbd takes it (and as descriptions show it). */
export function imagePath(spec: RbdSpec): string {
  return [spec.pool, ...(spec.namespace !== null ? [spec.namespace] : []), spec.image].join('/');
}

/** POOL/[NAMESPACE/]IMAGE[@SNAP]. */
export function snapPath(spec: RbdSpec): string {
  return imagePath(spec) + (spec.snap !== null ? `@${spec.snap}` : '');
}

function clusterArgs(c: CephCluster): string[] {
  return [...(c.conf ? ['-c', c.conf] : []), ...(c.id ? ['--id', c.id] : []), ...(c.keyring ? ['--keyring', c.keyring] : [])];
}

/**
 * The line of rbd's stderr that says what went wrong: its own "rbd: ..." line when there is
 * one (the library's log lines before it carry timestamps and thread ids), else the last.
 */
export function rbdErrorLine(stderr: string): string {
  const lines = stderr.split('\n').map((l) => l.trim()).filter(Boolean);
  return (lines.filter((l) => l.startsWith('rbd:')).at(-1) ?? lines.at(-1) ?? 'no message').slice(0, 400);
}

/** rbd's stderr, kept to its last 64 KiB (it is read only for the error line). */
const STDERR_KEEP = 64 << 10;

/** A running rbd. `exited` settles once it is gone: null if it exited 0, else the one-line reason. */
export interface RbdProcess {
  child: ChildProcess;
  what: string;
  exited: Promise<string | null>;
  /** Ends it (if still running) and waits until it is gone. */
  kill(): Promise<void>;
}

/** Starts `rbd ARGS`; stdout is a pipe, stdin a pipe when `stdin`. Never throws: a missing rbd shows in `exited`. */
export function spawnRbd(cluster: CephCluster, args: string[], stdin = false): RbdProcess {
  const what = `rbd ${args.filter((a) => a !== '--no-progress').join(' ')}`;
  const child = spawn('rbd', [...clusterArgs(cluster), ...args], { stdio: [stdin ? 'pipe' : 'ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr!.setEncoding('utf8');
  child.stderr!.on('data', (d: string) => {
    stderr = (stderr + d).slice(-STDERR_KEEP);
  });
  // stdin and stdout errors (EPIPE once rbd is gone) surface through `exited` or the reader.
  child.stdin?.on('error', () => undefined);
  const exited = new Promise<string | null>((resolve) => {
    child.once('error', (e: NodeJS.ErrnoException) => {
      resolve(e.code === 'ENOENT' ? 'rbd not found: install ceph-common (Debian: apt install ceph-common) or put rbd on PATH' : `${what}: ${e.message}`);
    });
    child.once('close', (code, signal) => {
      if (code === 0) resolve(null);
      else resolve(`${what} failed: ${signal ? `killed by ${signal}` : rbdErrorLine(stderr)}`);
    });
  });
  const kill = async () => {
    if (child.exitCode === null && child.signalCode === null && child.pid !== undefined) child.kill('SIGTERM');
    const t = setTimeout(() => child.kill('SIGKILL'), 10_000);
    await exited;
    clearTimeout(t);
  };
  return { child, what, exited, kill };
}

/** Runs `rbd ARGS` to its end; its stdout (bounded), or a GenvaultError with its one line. */
export async function runRbd(cluster: CephCluster, args: string[], maxOut = 16 << 20): Promise<string> {
  const p = spawnRbd(cluster, args);
  const out: Buffer[] = [];
  let n = 0;
  p.child.stdout!.on('data', (d: Buffer) => {
    n += d.length;
    if (n <= maxOut) out.push(d);
    else void p.kill();
  });
  const why = await p.exited;
  if (n > maxOut) throw new GenvaultError(`${p.what}: more than ${maxOut} bytes of output`, 'RBD');
  if (why !== null) throw new GenvaultError(why, 'RBD');
  return Buffer.concat(out).toString('utf8');
}

/** `rbd ARGS --format json`, parsed; rbd's answer is checked by the caller. */
export async function rbdJson(cluster: CephCluster, args: string[]): Promise<unknown> {
  const text = await runRbd(cluster, [...args, '--format', 'json']);
  try {
    return JSON.parse(text) as unknown;
  } catch {
    throw new GenvaultError(`rbd ${args.join(' ')}: its output is not JSON`, 'RBD');
  }
}

/** What genvault needs to know of an image (or one of its snapshots), from `rbd info`. */
export interface RbdImageInfo {
  /** The image's id: stays with the image across renames, differs for a new image of the same name. */
  id: string;
  size: number;
  /** More than 1: fancy striping, whose extents export-diff does not give in image order. */
  stripeCount: number;
}

export async function rbdInfo(cluster: CephCluster, spec: RbdSpec): Promise<RbdImageInfo> {
  const j = (await rbdJson(cluster, ['info', snapPath(spec)])) as Record<string, unknown>;
  const bad = () => new GenvaultError(`rbd info ${snapPath(spec)}: unexpected answer`, 'RBD');
  if (typeof j !== 'object' || j === null || typeof j.id !== 'string' || !/^[0-9a-zA-Z._-]{1,64}$/.test(j.id)) throw bad();
  if (!Number.isSafeInteger(j.size) || (j.size as number) < 0) throw bad();
  const sc = j.stripe_count === undefined ? 1 : j.stripe_count;
  if (!Number.isSafeInteger(sc)) throw bad();
  return { id: j.id, size: j.size as number, stripeCount: sc as number };
}

/** A snapshot: its id (never reused: a snapshot made again under an old name has a new one) and the image's size in it. */
export interface RbdSnapshot {
  id: number;
  size: number;
}

/** The image's snapshots by name. */
export async function rbdSnapshots(cluster: CephCluster, spec: RbdSpec): Promise<Map<string, RbdSnapshot>> {
  const j = await rbdJson(cluster, ['snap', 'ls', imagePath(spec)]);
  if (!Array.isArray(j)) throw new GenvaultError(`rbd snap ls ${imagePath(spec)}: unexpected answer`, 'RBD');
  const out = new Map<string, RbdSnapshot>();
  for (const s of j as Array<Record<string, unknown>>) {
    if (typeof s?.name === 'string' && Number.isSafeInteger(s.id) && Number.isSafeInteger(s.size) && (s.size as number) >= 0) {
      out.set(s.name, { id: s.id as number, size: s.size as number });
    }
  }
  return out;
}

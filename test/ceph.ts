/**
 * A real single-node Ceph cluster for tests, from Debian's packages, made by
 * scripts/ceph-cluster (which the bench uses too): one monitor, one manager, one OSD on
 * memstore, and optionally radosgw, on 127.0.0.1 ports picked free, in a scratch directory.
 * Startup takes about 15 s on this machine; one cluster per test file.
 *
 * Stopped by the scratch's cleanup (and by stop(), which tests call in their own
 * `finally`): every daemon is signalled by the pid it wrote, waited for, killed if it
 * lingers. native-notes/ceph.md has the why of each setting.
 */
import path from 'node:path';
import { ROOT, Scratch, must, sh } from './helpers.js';
import { freePort } from './sshd.js';

export interface Ceph {
  dir: string;
  /** The cluster's ceph.conf; the admin keyring is named in it (`keyring = DIR/$name.keyring`). */
  conf: string;
  /** `-c CONF`, for ceph, rbd, rados and radosgw-admin. */
  confArgs: string[];
  /** radosgw, when started with `rgw`: endpoint URL and one user's keys. */
  s3: { endpoint: string; port: number; accessKey: string; secretKey: string } | null;
  /** `rbd -c CONF ARGS...`; throws with its stderr on failure. */
  rbd(args: string[]): Promise<string>;
  /** `ceph -c CONF ARGS...`. */
  ceph(args: string[]): Promise<string>;
  stop(): Promise<void>;
}

const BINARIES = ['ceph-mon', 'ceph-mgr', 'ceph-osd', 'radosgw', 'radosgw-admin', 'ceph', 'rbd', 'ceph-authtool', 'monmaptool'];

/**
 * Why a cluster cannot start here (a binary missing), or null. Tests skip with this reason,
 * unless GENVAULT_TEST_REQUIRE_CEPH=1 (CI on this machine), where they fail instead.
 */
export async function cephUnavailable(): Promise<string | null> {
  const missing: string[] = [];
  for (const b of BINARIES) {
    const r = await sh('sh', ['-c', `command -v ${b}`]);
    if (r.code !== 0) missing.push(b);
  }
  if (!missing.length) return null;
  const why = `Ceph is not installed (${missing.join(', ')} missing; scripts/setup installs it)`;
  if (process.env.GENVAULT_TEST_REQUIRE_CEPH === '1') throw new Error(why);
  return why;
}

const SCRIPT = path.join(ROOT, 'scripts', 'ceph-cluster');

export interface CephOptions {
  /** Start radosgw and make an S3 user (default true). */
  rgw?: boolean;
  /** The OSD's memstore size (default 6 GiB; memory is taken only as objects are written). */
  memBytes?: number;
}

/** A cluster in `s.path(sub)` (scripts/ceph-cluster), stopped by the scratch's cleanup. */
export async function startCeph(s: Scratch, sub = 'ceph', opts: CephOptions = {}): Promise<Ceph> {
  const dir = s.path(sub);
  const conf = path.join(dir, 'ceph.conf');
  const C = ['-c', conf];
  let stopped = false;
  const stop = async () => {
    if (stopped) return;
    stopped = true;
    await must(SCRIPT, ['stop', dir]);
  };
  s.onCleanup(stop);
  const run = async (cmd: string, args: string[]) => {
    const r = await sh(cmd, args);
    if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.code}): ${r.stderr.trim() || r.stdout.trim()}`);
    return r.stdout;
  };
  const extra = [...(opts.rgw === false ? ['--no-rgw'] : []), ...(opts.memBytes ? ['--mem', String(opts.memBytes)] : [])];
  const out = await run(SCRIPT, ['start', dir, String(await freePort()), String(await freePort()), ...extra]);
  const got = JSON.parse(out.trim().split('\n').at(-1)!) as { endpoint: string | null; accessKey: string | null; secretKey: string | null };
  const s3 = got.endpoint ? { endpoint: got.endpoint, port: Number(new URL(got.endpoint).port), accessKey: got.accessKey!, secretKey: got.secretKey! } : null;
  return {
    dir,
    conf,
    confArgs: C,
    s3,
    rbd: (args) => run('rbd', [...C, ...args]),
    ceph: (args) => run('ceph', [...C, '--connect-timeout', '30', ...args]),
    stop,
  };
}

/** A pool for RBD images, initialised (`rbd pool init`). */
export async function rbdPool(c: Ceph, pool = 'rbd'): Promise<string> {
  await c.ceph(['osd', 'pool', 'create', pool, '8']);
  await c.rbd(['pool', 'init', pool]);
  return pool;
}

/** A record of an "rbd diff v1" stream (Ceph's doc/dev/rbd-diff.rst), for rbdDiffStream. */
export type DiffRec =
  | { tag: 'f' | 't'; name: string }
  | { tag: 's'; size: number }
  | { tag: 'w'; offset: number; data: Buffer }
  | { tag: 'z'; offset: number; length: number }
  | { tag: 'e' };

/**
 * The bytes of an rbd diff stream (v1, or v2 with each record's length after its tag):
 * what `rbd import-diff` takes, and what the parser's tests feed it.
 */
export function rbdDiffStream(recs: DiffRec[], version: 1 | 2 = 1): Buffer {
  const out: Buffer[] = [Buffer.from(`rbd diff v${version}\n`)];
  const u32 = (n: number) => {
    const b = Buffer.alloc(4);
    b.writeUInt32LE(n);
    return b;
  };
  const u64 = (n: number) => {
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(BigInt(n));
    return b;
  };
  for (const r of recs) {
    let body: Buffer;
    if (r.tag === 'f' || r.tag === 't') body = Buffer.concat([u32(Buffer.byteLength(r.name)), Buffer.from(r.name)]);
    else if (r.tag === 's') body = u64(r.size);
    else if (r.tag === 'w') body = Buffer.concat([u64(r.offset), u64(r.data.length), r.data]);
    else if (r.tag === 'z') body = Buffer.concat([u64(r.offset), u64(r.length)]);
    else body = Buffer.alloc(0);
    out.push(Buffer.from(r.tag), ...(version === 2 && r.tag !== 'e' ? [u64(body.length)] : []), body);
  }
  return Buffer.concat(out);
}

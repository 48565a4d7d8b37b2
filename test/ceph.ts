/**
 * A real single-node Ceph cluster for tests, from Debian's packages: one monitor, one
 * manager, one OSD on memstore (objects in the OSD's memory, so nothing is written to the
 * disk and teardown is a kill), and optionally radosgw with the beast frontend, all on
 * 127.0.0.1 ports picked free, in a scratch directory, with cephx. Pools have size 1.
 * Startup takes about 15 s on this machine; one cluster per test file.
 *
 * Stopped by the scratch's cleanup (and by stop(), which tests call in their own
 * `finally`): every daemon is signalled by the pid it wrote, waited for, killed if it
 * lingers. native-notes/ceph.md has the why of each setting.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { Scratch, must, sh, waitGone } from './helpers.js';
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

function config(dir: string, fsid: string, monPort: number, memBytes: number): string {
  return `[global]
fsid = ${fsid}
mon host = v1:127.0.0.1:${monPort}
public addr = 127.0.0.1
ms bind ipv6 = false
ms bind msgr2 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = ${dir}/$name.keyring
run dir = ${dir}/run
admin socket = ${dir}/run/$name.asok
log file = ${dir}/log/$name.log
pid file = ${dir}/run/$name.pid
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
osd crush chooseleaf type = 0
rgw dns name = 127.0.0.1
[mon]
mon data = ${dir}/mon
[mgr]
mgr data = ${dir}/mgr
[osd]
osd data = ${dir}/osd
osd objectstore = memstore
memstore device bytes = ${memBytes}
osd max object name len = 460
osd max object namespace len = 64
`;
}

async function pidsOf(dir: string): Promise<number[]> {
  const run = path.join(dir, 'run');
  const pids: number[] = [];
  for (const f of await fs.readdir(run).catch(() => [] as string[])) {
    if (!f.endsWith('.pid')) continue;
    const n = Number((await fs.readFile(path.join(run, f), 'utf8').catch(() => '')).trim());
    if (Number.isInteger(n) && n > 0) pids.push(n);
  }
  return pids;
}

async function until(what: string, ms: number, probe: () => Promise<boolean>, log: () => Promise<string>): Promise<void> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (await probe()) return;
    await new Promise((r) => setTimeout(r, 250));
  }
  throw new Error(`ceph test cluster: ${what} within ${ms / 1000} s; ${await log()}`);
}

export interface CephOptions {
  /** Start radosgw and make an S3 user (default true). */
  rgw?: boolean;
  /** The OSD's memstore size (default 6 GiB; memory is taken only as objects are written). */
  memBytes?: number;
}

/** A cluster in `s.path(sub)`, stopped by the scratch's cleanup. */
export async function startCeph(s: Scratch, sub = 'ceph', opts: CephOptions = {}): Promise<Ceph> {
  const dir = s.path(sub);
  for (const d of ['mon', 'mgr', 'osd', 'run', 'log', 'rgw']) await fs.mkdir(path.join(dir, d), { recursive: true });
  const conf = path.join(dir, 'ceph.conf');
  const C = ['-c', conf];
  let stopped = false;
  const stop = async () => {
    if (stopped) return;
    stopped = true;
    const pids = await pidsOf(dir);
    for (const p of pids) {
      try {
        process.kill(p, 'SIGTERM');
      } catch {
        /* gone */
      }
    }
    await waitGone(pids, 15_000).catch(async () => {
      for (const p of pids) {
        try {
          process.kill(p, 'SIGKILL');
        } catch {
          /* gone */
        }
      }
      await waitGone(pids, 10_000);
    });
  };
  s.onCleanup(stop);
  const logs = async () => {
    const out: string[] = [];
    for (const f of await fs.readdir(path.join(dir, 'log')).catch(() => [] as string[])) {
      const t = await fs.readFile(path.join(dir, 'log', f), 'utf8').catch(() => '');
      out.push(`${f}: ${t.split('\n').slice(-8).join(' | ')}`);
    }
    return out.join('\n');
  };
  const run = async (cmd: string, args: string[]) => {
    const r = await sh(cmd, args);
    if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.code}): ${r.stderr.trim() || r.stdout.trim()}`);
    return r.stdout;
  };

  const fsid = (await fs.readFile('/proc/sys/kernel/random/uuid', 'utf8')).trim();
  const monPort = await freePort();
  await fs.writeFile(conf, config(dir, fsid, monPort, opts.memBytes ?? 6 * 1024 ** 3));
  const monKeyring = path.join(dir, 'mon.a.keyring');
  const adminKeyring = path.join(dir, 'client.admin.keyring');
  await must('ceph-authtool', ['--create-keyring', monKeyring, '--gen-key', '-n', 'mon.', '--cap', 'mon', 'allow *']);
  await must('ceph-authtool', ['--create-keyring', adminKeyring, '--gen-key', '-n', 'client.admin', '--cap', 'mon', 'allow *', '--cap', 'osd', 'allow *', '--cap', 'mgr', 'allow *']);
  await must('ceph-authtool', [monKeyring, '--import-keyring', adminKeyring]);
  const monmap = path.join(dir, 'monmap');
  await must('monmaptool', ['--create', '--addv', 'a', `[v1:127.0.0.1:${monPort}]`, '--fsid', fsid, monmap]);
  await run('ceph-mon', [...C, '--mkfs', '-i', 'a', '--monmap', monmap, '--keyring', monKeyring]);
  await run('ceph-mon', [...C, '-i', 'a']); // daemonizes once it listens
  const ceph = (args: string[]) => run('ceph', [...C, '--connect-timeout', '30', ...args]);
  await ceph(['mon', 'stat']);

  const osdUuid = (await fs.readFile('/proc/sys/kernel/random/uuid', 'utf8')).trim();
  const osdId = (await ceph(['osd', 'new', osdUuid])).trim();
  await ceph(['auth', 'get-or-create', `osd.${osdId}`, 'mon', 'allow profile osd', 'osd', 'allow *', 'mgr', 'allow profile osd', '-o', path.join(dir, `osd.${osdId}.keyring`)]);
  await run('ceph-osd', [...C, '-i', osdId, '--mkfs', '--osd-uuid', osdUuid]);
  await run('ceph-osd', [...C, '-i', osdId]);
  await ceph(['auth', 'get-or-create', 'mgr.x', 'mon', 'allow profile mgr', 'osd', 'allow *', '-o', path.join(dir, 'mgr.x.keyring')]);
  await run('ceph-mgr', [...C, '-i', 'x']);
  await until('the OSD was not up', 60_000, async () => /1 up/.test(await ceph(['osd', 'stat']).catch(() => '')), logs);

  let s3: Ceph['s3'] = null;
  if (opts.rgw !== false) {
    const port = await freePort();
    await ceph(['auth', 'get-or-create', 'client.rgw.x', 'mon', 'allow rw', 'osd', 'allow rwx', 'mgr', 'allow rw', '-o', path.join(dir, 'client.rgw.x.keyring')]);
    await run('radosgw', [...C, '-n', 'client.rgw.x', '--rgw-frontends', `beast endpoint=127.0.0.1:${port}`, '--rgw-data', path.join(dir, 'rgw')]);
    const endpoint = `http://127.0.0.1:${port}`;
    await until('radosgw did not answer', 90_000, async () => (await sh('curl', ['-s', '-o', '/dev/null', '-w', '%{http_code}', endpoint])).stdout === '200', logs);
    const accessKey = 'GV' + Math.random().toString(36).slice(2, 12).toUpperCase();
    const secretKey = randomBytes(24).toString('base64url');
    await run('radosgw-admin', [...C, 'user', 'create', '--uid=genvault', '--display-name=genvault tests', `--access-key=${accessKey}`, `--secret-key=${secretKey}`]);
    s3 = { endpoint, port, accessKey, secretKey };
  }
  return {
    dir,
    conf,
    confArgs: C,
    s3,
    rbd: (args) => run('rbd', [...C, ...args]),
    ceph,
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

/**
 * Restoring a generation into an RBD image: `rbd import --image-format 2 - POOL/IMAGE` fed
 * the raw image on its stdin. rbd import leaves blocks of zeros unwritten (--sparse-size,
 * 4 KiB by default), so the new image is as sparse as the generation.
 *
 * The image is written under a temporary name next to the target and renamed only once
 * rbd import has exited 0 and the image has the generation's size: an import cut short
 * (genvault killed, its stdin closed early) would otherwise look like a complete image,
 * since rbd cannot tell a short stream from a short image. An existing target is refused,
 * unless --force: then it is replaced (removed, and the restored image renamed to its name)
 * after the import completed, and only if it has no snapshots and no watchers (rbd
 * would refuse to remove it anyway; checking first spares a wasted import).
 */
import { randomBytes } from 'node:crypto';
import type { Generation } from '../format/generation.js';
import { GenvaultError, UsageError } from '../util/errors.js';
import { rawSink, streamChunks, writerOf, type RestoreResult } from '../read/restore.js';
import type { Repository } from '../repository/repository.js';
import { imagePath, parseRbdSpec, rbdInfo, rbdJson, rbdSnapshots, runRbd, spawnRbd, type CephCluster, type RbdSpec } from './rbd-cli.js';

export interface RbdRestoreOptions {
  cluster: CephCluster;
  force?: boolean;
  ignoreDamage?: boolean;
  onProgress?: (done: number, total: number) => void;
}

/** Temporary images of restores under way, removed on failure; named by an interrupt's message. */
const underWay = new Set<string>();

/** For the CLI's interrupt message: the temporary images a signal leaves behind. */
export function abandonRbdRestores(): string[] {
  return [...underWay].map((p) => `the partial image ${p} is left: remove it with \`rbd rm ${p}\``);
}

/** Whether the image exists: false only for rbd's "no such image", never for a pool or cluster failure. */
async function imageExists(cluster: CephCluster, spec: RbdSpec): Promise<boolean> {
  try {
    await rbdInfo(cluster, spec);
    return true;
  } catch (e) {
    if (e instanceof GenvaultError && /error opening image .*\(2\) No such file or directory/.test(e.message)) return false;
    throw e;
  }
}

/** --force on an existing image: refused while it has snapshots or watchers (a VM using it). */
async function checkReplaceable(cluster: CephCluster, spec: RbdSpec): Promise<void> {
  const p = imagePath(spec);
  const snaps = await rbdSnapshots(cluster, spec);
  if (snaps.size) throw new GenvaultError(`rbd:${p} has ${snaps.size} snapshot(s); genvault does not remove snapshots: restore into a new image, or remove them first`, 'EXISTS');
  const st = (await rbdJson(cluster, ['status', p])) as { watchers?: unknown[] };
  if (Array.isArray(st?.watchers) && st.watchers.length) throw new GenvaultError(`rbd:${p} is in use (${st.watchers.length} watcher(s)): stop its user first`, 'BUSY');
}

export async function restoreToRbd(repo: Repository, gen: Generation, dest: string, opts: RbdRestoreOptions): Promise<RestoreResult> {
  const spec = parseRbdSpec(dest);
  if (spec.snap !== null) throw new UsageError(`${dest}: a restore writes an image, not a snapshot (drop @${spec.snap})`);
  const { cluster } = opts;
  const target = imagePath(spec);
  const exists = await imageExists(cluster, spec);
  if (exists && !opts.force) throw new GenvaultError(`rbd:${target} exists: restore into a new image, or pass --force to replace it`, 'EXISTS');
  if (exists) await checkReplaceable(cluster, spec);
  const tmpSpec: RbdSpec = { ...spec, image: `${spec.image}.genvault-restore-${randomBytes(4).toString('hex')}` };
  const tmp = imagePath(tmpSpec);
  underWay.add(tmp);
  try {
    const damaged = await importInto(repo, gen, cluster, tmp, opts);
    const got = await rbdInfo(cluster, tmpSpec);
    if (got.size !== gen.size) throw new GenvaultError(`rbd import made ${tmp} of ${got.size} bytes, not ${gen.size}`, 'SHORT_WRITE');
    if (exists) await runRbd(cluster, ['rm', '--no-progress', target]);
    await runRbd(cluster, ['rename', tmp, target]);
    underWay.delete(tmp);
    return { bytes: gen.size, target: `rbd:${target}`, damaged, sparse: true };
  } catch (e) {
    await runRbd(cluster, ['rm', '--no-progress', tmp]).catch(() => undefined);
    underWay.delete(tmp);
    throw e;
  }
}

/** Streams the generation into `rbd import`; rbd is killed and waited for if anything fails. */
async function importInto(repo: Repository, gen: Generation, cluster: CephCluster, tmp: string, opts: RbdRestoreOptions): Promise<Array<{ offset: number; length: number }>> {
  const proc = spawnRbd(cluster, ['import', '--no-progress', '--image-format', '2', '-', tmp], true);
  // rbd gone early (bad pool, no rights): its line, not the EPIPE of the next write.
  const early = proc.exited.then((why): Promise<never> => {
    if (why !== null) throw new GenvaultError(why, 'RBD');
    return new Promise<never>(() => undefined);
  });
  early.catch(() => undefined);
  try {
    const stdin = proc.child.stdin!;
    const write = writerOf(stdin);
    const damaged = await Promise.race([streamChunks(repo, gen, rawSink(write), { ignoreDamage: opts.ignoreDamage, onProgress: opts.onProgress }), early]);
    stdin.end();
    const why = await proc.exited;
    if (why !== null) throw new GenvaultError(why, 'RBD');
    return damaged;
  } catch (e) {
    // End of input lets rbd finish a short image cleanly (then removed); a kill would
    // leave its exclusive lock for the removal to wait out.
    proc.child.stdin?.end();
    let timer: NodeJS.Timeout | undefined;
    const why = await Promise.race([proc.exited, new Promise<undefined>((r) => (timer = setTimeout(() => r(undefined), 30_000)))]);
    clearTimeout(timer);
    await proc.kill();
    if (why && !(e instanceof GenvaultError && e.code === 'RBD')) throw new GenvaultError(why, 'RBD');
    throw e;
  }
}

/**
 * Restoring a generation into an RBD image: the image is created (`rbd create`, format 2)
 * and the generation streamed into `rbd import-diff -` as an "rbd diff v1" stream of its
 * data chunks only. Zero chunks never cross the pipe nor reach the cluster, so the new image
 * is as sparse as the generation and a mostly empty disk costs its data, not its size (fed
 * the raw image, `rbd import -` would skip writing zero blocks too, but every zero byte
 * would still go through its stdin).
 *
 * The image is written under a temporary name next to the target and renamed only once
 * rbd has exited 0 and the image has the generation's size; a stream cut short (genvault
 * killed) lacks its end record, which rbd import-diff refuses, and is never renamed. An
 * existing target is refused, unless --force: then it is replaced (removed, and the
 * restored image renamed to its name) after the import completed, and only if it has no
 * snapshots and no watchers (rbd would refuse to remove it anyway; checking first spares
 * a wasted import).
 */
import { randomBytes } from 'node:crypto';
import type { Generation } from '../format/generation.js';
import { GenvaultError, UsageError } from '../util/errors.js';
import { streamChunks, writerOf, type RestoreResult, type Sink } from '../read/restore.js';
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

/** Data records of the stream are cut at this size (rbd reads each one into memory whole). */
const RECORD_MAX = 4 << 20;

/**
 * The generation as an "rbd diff v1" stream for `rbd import-diff` (rbd-diff.ts describes
 * the format): the size, a 'w' record for each run of data chunks, 'e'. Zero chunks are
 * not sent at all: the image was created empty.
 */
function diffSink(write: (b: Buffer) => Promise<void>): Sink & { start(size: number): Promise<void>; end(): Promise<void> } {
  let run: { offset: number; parts: Buffer[]; length: number } | null = null;
  const u64 = (n: number) => {
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(BigInt(n));
    return b;
  };
  const flush = async () => {
    if (!run) return;
    const r = run;
    run = null;
    await write(Buffer.concat([Buffer.from('w'), u64(r.offset), u64(r.length)]));
    for (const p of r.parts) await write(p);
  };
  return {
    start: (size) => write(Buffer.concat([Buffer.from('rbd diff v1\ns'), u64(size)])),
    async write(offset, length, data) {
      if (!data) return flush();
      if (run && (run.offset + run.length !== offset || run.length + length > RECORD_MAX)) await flush();
      run ??= { offset, parts: [], length: 0 };
      run.parts.push(data);
      run.length += length;
    },
    async end() {
      await flush();
      await write(Buffer.from('e'));
    },
  };
}

/**
 * Creates the (temporary) image and streams the generation's data into `rbd import-diff`;
 * rbd is stopped and waited for if anything fails.
 */
async function importInto(repo: Repository, gen: Generation, cluster: CephCluster, tmp: string, opts: RbdRestoreOptions): Promise<Array<{ offset: number; length: number }>> {
  // 1 MiB to begin with: the stream's size record sets the size to the byte.
  await runRbd(cluster, ['create', '--no-progress', '--image-format', '2', '--size', '1M', tmp]);
  const proc = spawnRbd(cluster, ['import-diff', '--no-progress', '-', tmp], true);
  proc.child.stdout!.resume(); // says nothing with --no-progress; never let it fill the pipe
  // rbd gone early (no rights, a full cluster): its line, not the EPIPE of the next write.
  const early = proc.exited.then((why): Promise<never> => {
    if (why !== null) throw new GenvaultError(why, 'RBD');
    return new Promise<never>(() => undefined);
  });
  early.catch(() => undefined);
  try {
    const stdin = proc.child.stdin!;
    const sink = diffSink(writerOf(stdin));
    const streamed = (async () => {
      await sink.start(gen.size);
      const damaged = await streamChunks(repo, gen, sink, { ignoreDamage: opts.ignoreDamage, onProgress: opts.onProgress });
      await sink.end();
      return damaged;
    })();
    const damaged = await Promise.race([streamed, early]);
    stdin.end();
    const why = await proc.exited;
    if (why !== null) throw new GenvaultError(why, 'RBD');
    return damaged;
  } catch (e) {
    // A stream without its end record is refused by rbd import-diff (the image is removed after).
    proc.child.stdin?.end();
    let timer: NodeJS.Timeout | undefined;
    const why = await Promise.race([proc.exited, new Promise<undefined>((r) => (timer = setTimeout(() => r(undefined), 30_000)))]);
    clearTimeout(timer);
    await proc.kill();
    if (why && !(e instanceof GenvaultError && e.code === 'RBD')) throw new GenvaultError(why, 'RBD');
    throw e;
  }
}

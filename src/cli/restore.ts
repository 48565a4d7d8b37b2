import { Command, Option } from 'commander';
import { abandonRestores, rawSink, restoreToPath, restoreToPathWith, restoreToStream, showTarget, writerOf } from '../read/restore.js';
import { UsageError } from '../util/errors.js';
import { bytes, duration, rate } from '../util/format.js';
import { Progress } from '../util/progress.js';
import { isSshSpec, warnIfNoNativeCrypto } from '../source/ssh.js';
import { restoreToSsh } from '../source/ssh-target.js';
import { SSH_MODES, type SshMode } from '../source/ssh-agent.js';
import { action, onInterrupt, printJson, wantsJson, withRepo } from './common.js';
import { remoteRepo, withRemote } from './remote.js';
import { remoteFiller, streamRemote } from '../remote/read-client.js';
import { isRbdSpec } from '../source/rbd-cli.js';
import { abandonRbdRestores, restoreToRbd } from '../source/rbd-target.js';
import { addCephOptions, cephCluster, hasCephFlags, type CephFlags } from './ceph.js';

function refuseStdout(json: boolean): void {
  if (process.stdout.isTTY) throw new UsageError('refusing to write a disk image to a terminal; redirect stdout');
  if (json) throw new UsageError('--json cannot be used with - (the image goes to stdout)');
}

/** restore and cat from an ssh:// repository: the server reads and checks, this side writes. */
async function restoreRemote(cmd: Command, target: string, dest: string, opts: { force?: boolean; ignoreDamage?: boolean }): Promise<void> {
  if (opts.ignoreDamage) throw new UsageError('--ignore-damage needs a local repository (run the restore on the repository\'s host)');
  if (isSshSpec(dest)) throw new UsageError('restoring from an ssh:// repository to an ssh:// target is not supported; restore on one of the two hosts');
  if (isRbdSpec(dest)) throw new UsageError('restoring from an ssh:// repository to an rbd: target is not supported; restore on the repository\'s host');
  await withRemote(cmd, async (remote) => {
    const g = await remote.resolve(target);
    if (dest === '-') {
      const sink = rawSink(writerOf(process.stdout));
      await streamRemote(remote, g, (offset, length, data) => sink.write(offset, length, data));
      return;
    }
    const progress = new Progress(`restore ${g.name}`);
    const t0 = Date.now();
    const res = await restoreToPathWith(g, dest, { force: opts.force }, remoteFiller(remote, g, (d, t) => progress.update(d, t))).finally(() => progress.done());
    const ms = Date.now() - t0;
    if (wantsJson(cmd)) printJson({ generation: g.id, name: g.name, ...res, durationMs: ms });
    else process.stdout.write(`restored ${g.name}@${g.id} to ${res.target}: ${bytes(res.bytes)} in ${duration(ms)} (${rate(res.bytes, ms)})\n`);
  });
}

interface RestoreFlags extends CephFlags {
  force?: boolean;
  ignoreDamage?: boolean;
  identity?: string;
  knownHosts?: string;
  sshConfig?: string;
  sshCommand?: string;
  acceptNewHostKey?: boolean;
  sshMode: SshMode;
}

function reportDamage(damaged: Array<{ offset: number; length: number }>): void {
  for (const r of damaged) {
    process.stderr.write(`genvault: damaged chunk: image bytes ${r.offset}-${r.offset + r.length - 1} written as zeros\n`);
  }
}

const RESTORE_HELP =
  '\nA file is written sparse under a temporary name and renamed only when complete and synced;\n' +
    'a block device gets every byte (zeros included) and needs --force; a mounted device, active\n' +
    'swap or one held by LVM, md or device-mapper is refused. Symlinks are followed and the\n' +
    'device or file they lead to is named. Character devices, FIFOs, sockets and directories\n' +
    'are refused. "-" writes the raw image to stdout (like cat; ./- for a file named -).\n' +
    'Every chunk is checked against its digest.\n' +
    'An rbd: target is a new image, written by `rbd import` under a temporary name and renamed\n' +
    'when complete (zero blocks are not written); --force replaces an existing one.\n\n' +
    'Examples:\n  genvault restore vm1@latest /var/lib/libvirt/images/vm1.img\n' +
    '  genvault restore vm1@2026-11-20 /dev/vg0/vm1 --force\n  genvault restore vm1@1 ssh://root@kvm2/dev/vg0/vm1\n' +
    '  genvault restore vm3@latest rbd:rbd/vm3-restored --ceph-id backup';

export function register(program: Command): void {
  const restore = program
    .command('restore')
    .description('write a generation to a file (sparse) or a block device, checking every chunk')
    .argument('<target>', 'NAME@REV (REV: latest, N, id or prefix, ISO date/time)')
    .argument('<dest>', 'file or block device to write, here or ssh://[user@]host[:port]/path, a new RBD image rbd:POOL/[NAMESPACE/]IMAGE, or - for stdout')
    .option('-f, --force', 'overwrite an existing non-empty file or a block device; replace an existing RBD image (one without snapshots or watchers)')
    .option('--ignore-damage', 'write zeros where chunks are damaged and list those ranges, instead of failing')
    .option('-i, --identity <file>', 'ssh:// targets: private key file (default: ssh-agent, then ~/.ssh/id_ed25519, id_ecdsa, id_rsa)')
    .option('--known-hosts <file>', 'ssh:// targets: known hosts file (default ~/.ssh/known_hosts)')
    .option('--accept-new-host-key', 'ssh:// targets: trust and record the key of a host not yet known')
    .option('--ssh-config <file>', 'ssh:// targets: OpenSSH config file read instead of ~/.ssh/config and /etc/ssh/ssh_config, or none (default: $GENVAULT_SSH_CONFIG)')
    .option('--ssh-command <cmd>', 'ssh:// targets: run this OpenSSH client (e.g. ssh, or "ssh -F FILE") instead of the built-in one')
    .addOption(new Option('--ssh-mode <mode>', 'ssh:// targets: agent (python3 writer, zero ranges not sent), plain (cat), or auto').choices(SSH_MODES).default('auto'))
    .option('--json', 'print a JSON summary');
  addCephOptions(restore)
    .addHelpText('after', RESTORE_HELP)
    .action(
      action(async (target: string, dest: string, opts: RestoreFlags, cmd: Command) => {
        const sshMode = opts.sshMode;
        const ssh = isSshSpec(dest);
        if (ssh && !opts.sshCommand) warnIfNoNativeCrypto();
        if (dest === '-') refuseStdout(wantsJson(cmd));
        let progress: Progress | null = null;
        // A signal ends the restore through the CLI's one handler (common.ts): the temporary
        // file of the restore under way is removed synchronously there, before the exit.
        onInterrupt((sig) => {
          progress?.done();
          const notes = [...abandonRestores(), ...abandonRbdRestores()];
          return `restore interrupted by ${sig}${notes.map((n) => `; ${n}`).join('')}`;
        });
        if (hasCephFlags(opts) && !isRbdSpec(dest)) throw new UsageError('--ceph-conf, --ceph-id and --ceph-keyring need an rbd: target');
        if (remoteRepo(cmd)) return restoreRemote(cmd, target, dest, opts);
        await withRepo(cmd, async (repo) => {
          const g = await repo.resolve(target);
          progress = new Progress(`restore ${g.name}`);
          if (dest === '-') {
            const res = await restoreToStream(repo, g, process.stdout, { ignoreDamage: opts.ignoreDamage });
            reportDamage(res.damaged);
            if (res.damaged.length) process.exitCode = 1;
            return;
          }
          const t0 = Date.now();
          const common = { force: opts.force, ignoreDamage: opts.ignoreDamage, onProgress: (d: number, t: number) => progress?.update(d, t) };
          const res = await (isRbdSpec(dest)
            ? restoreToRbd(repo, g, dest, { ...common, cluster: cephCluster(opts) })
            : ssh
            ? restoreToSsh(repo, g, dest, {
                ...common,
                identity: opts.identity,
                knownHosts: opts.knownHosts,
                config: opts.sshConfig, command: opts.sshCommand,
                acceptNewHostKey: opts.acceptNewHostKey,
                mode: sshMode,
              })
            : restoreToPath(repo, g, dest, {
                ...common,
                onTarget: (t) => {
                  if (t.via) process.stderr.write(`genvault: restoring to ${showTarget(t)}\n`);
                },
              })
          ).finally(() => progress?.done());
          const ms = Date.now() - t0;
          reportDamage(res.damaged);
          const to = 'via' in res && res.via ? showTarget({ path: res.target, via: res.via }) : res.target;
          if (wantsJson(cmd)) printJson({ generation: g.id, name: g.name, ...res, durationMs: ms });
          else process.stdout.write(`restored ${g.name}@${g.id} to ${to}: ${bytes(res.bytes)} in ${duration(ms)} (${rate(res.bytes, ms)})\n`);
          if (res.damaged.length) process.exitCode = 1;
        });
      }),
    );

  program
    .command('cat')
    .description('write the raw bytes of a generation to stdout')
    .argument('<target>', 'NAME@REV')
    .option('--ignore-damage', 'write zeros where chunks are damaged instead of failing')
    .action(
      action(async (target: string, opts: { ignoreDamage?: boolean }, cmd: Command) => {
        if (process.stdout.isTTY) {
          const { UsageError } = await import('../util/errors.js');
          throw new UsageError('refusing to write a disk image to a terminal; redirect stdout');
        }
        if (remoteRepo(cmd)) return restoreRemote(cmd, target, '-', opts);
        await withRepo(cmd, async (repo) => {
          const g = await repo.resolve(target);
          const res = await restoreToStream(repo, g, process.stdout, { ignoreDamage: opts.ignoreDamage });
          reportDamage(res.damaged);
          if (res.damaged.length) process.exitCode = 1;
        });
      }),
    );
}

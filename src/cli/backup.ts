import { Command, Option } from 'commander';
import * as backupModule from '../backup/backup.js';
import { openLocalSource } from '../source/local.js';
import { isSshSpec, warnIfNoNativeCrypto } from '../source/ssh.js';
import { SSH_MODES, openRemoteSource, type SshMode } from '../source/ssh-agent.js';
import { isChunkedSource } from '../backup/chunked-source.js';
import type { Source } from '../backup/source.js';
import type { Repository } from '../repository/repository.js';
import { isNbdUri } from '../nbd/client.js';
import { NbdSource, OverlaySource } from '../nbd/source.js';
import { ThinHintedSource, parseThinDelta } from '../source/thin.js';
import { UsageError } from '../util/errors.js';
import { RbdSource } from '../source/rbd.js';
import { isRbdSpec, parseRbdSpec } from '../source/rbd-cli.js';
import { addCephOptions, cephCluster, hasCephFlags, type CephFlags } from './ceph.js';

const { backup } = backupModule;
/**
 * Whether backup() consumes ChunkedSource.readSegment (then only missing chunks cross the
 * network); until it does, `--ssh-mode auto` streams with cat.
 */
const chunkedBackup = (backupModule as Record<string, unknown>).SUPPORTS_CHUNKED_SOURCES === true;
import { bytes, duration, rate } from '../util/format.js';
import { percentArg, rateArg, sizeArg } from './options.js';
import { Progress } from '../util/progress.js';
import { action, collect, holdingSignals, onInterrupt, printJson, repoPath, wantsJson, withRepo } from './common.js';
import { remoteRepo, withRemote } from './remote.js';
import { backupToRemote } from '../remote/upload-client.js';

interface BackupCliOptions extends CephFlags {
  name: string;
  rbdLive?: boolean;
  full?: boolean;
  tag: string[];
  wait?: boolean;
  identity?: string;
  knownHosts?: string;
  sshConfig?: string;
  sshCommand?: string;
  acceptNewHostKey?: boolean;
  sshMode: SshMode;
  maxSize?: number;
  bitmap?: string;
  verifyHints?: number;
  fromNbdOverlay?: boolean;
  thinDelta?: string;
  thinMetadataSnap?: boolean;
  limitRate?: number;
}

/** The source named on the command line: NBD (with a dirty bitmap), an NBD overlay, SSH, or local. */
async function openSource(repo: Repository, src: string, opts: BackupCliOptions, maxSize: number | undefined): Promise<Source> {
  if (opts.fromNbdOverlay) return OverlaySource.open(repo, src);
  if (isRbdSpec(src)) {
    const s = await RbdSource.open(repo, parseRbdSpec(src), { name: opts.name, cluster: cephCluster(opts), live: opts.rbdLive, full: opts.full });
    const why = s.stats.fullReason;
    if (why && why !== '--full' && why !== '--rbd-live') process.stderr.write(`genvault backup: reading the whole snapshot: ${why}\n`);
    return s;
  }
  if (opts.thinDelta !== undefined) {
    const spec = parseThinDelta(opts.thinDelta, opts.thinMetadataSnap === true);
    const s = await ThinHintedSource.open(repo, src, spec, { name: opts.name, verifyPercent: opts.verifyHints });
    if (s.stats.fullReason) process.stderr.write(`genvault backup: reading the whole disk: ${s.stats.fullReason}\n`);
    return s;
  }
  if (isNbdUri(src)) {
    const s = await NbdSource.open(repo, src, { name: opts.name, bitmap: opts.bitmap, verifyPercent: opts.verifyHints });
    if (s.stats.fullReason) process.stderr.write(`genvault backup: reading the whole disk: ${s.stats.fullReason}\n`);
    return s;
  }
  if (isSshSpec(src)) {
    const mode = opts.sshMode;
    return openRemoteSource(src, {
      identity: opts.identity,
      knownHosts: opts.knownHosts,
      config: opts.sshConfig,
      command: opts.sshCommand,
      acceptNewHostKey: opts.acceptNewHostKey,
      mode: mode === 'auto' && (!chunkedBackup || repo.keys) ? 'plain' : mode,
      chunking: repo.config.chunking,
    });
  }
  return openLocalSource(src, { maxSize });
}

/** The generation as --json prints it: with what an NBD, overlay or thin-hinted source read. */
function withSourceStats(gen: object, source: Source): object {
  if (source instanceof NbdSource) return { ...gen, nbd: source.stats };
  if (source instanceof OverlaySource) return { ...gen, overlay: { file: source.overlay.file, base: source.base.id, reusedBytes: source.stats.parentBytes } };
  if (source instanceof ThinHintedSource) return { ...gen, thin: source.stats };
  if (source instanceof RbdSource) return { ...gen, rbd: source.stats };
  return gen;
}

/** The summary's words about what an NBD, overlay or thin-hinted source read. */
function nbdSummary(source: Source): string {
  if (source instanceof OverlaySource) return `, ${bytes(source.stats.parentBytes)} of @${source.base.id} reused unread`;
  if (source instanceof ThinHintedSource) {
    const t = source.stats;
    if (t.mode === 'full') return '';
    return `, ${bytes(t.changedBytes)} changed read (thin_delta), ${bytes(t.parentBytes)} unchanged taken from @${t.parent}${t.verifiedBytes ? ` (${bytes(t.verifiedBytes)} of them checked)` : ''}`;
  }
  if (source instanceof RbdSource) {
    const r = source.stats;
    if (r.mode === 'full') return `, ${bytes(r.readBytes)} of allocated extents read from rbd`;
    return `, ${bytes(r.readBytes)} changed since @${r.fromSnap} read from rbd, ${bytes(r.parentBytes)} unchanged taken from @${r.parent}`;
  }
  if (!(source instanceof NbdSource)) return '';
  const s = source.stats;
  if (s.mode === 'dirty-bitmap') {
    const checked = s.verifiedBytes ? ` (${bytes(s.verifiedBytes)} of them checked against it)` : '';
    return `, ${bytes(s.nbdBytes)} read over NBD, ${bytes(s.parentBytes)} clean taken from @${s.parent}${checked}`;
  }
  return `, ${bytes(s.nbdBytes)} read over NBD${s.zeroBytes ? ` (${bytes(s.zeroBytes)} zero not read)` : ''}`;
}

const BACKUP_HELP =
  '\nOnly chunks the repository lacks are stored; zero regions store nothing.\n' +
    'The generation becomes visible only after all its data is on disk.\n' +
    'A file or block device is read up to its size; stdin and pipes to their end, or\n' +
    'to --max-size; a character device (/dev/zero) only with --max-size.\n\n' +
    'Examples:\n  genvault -r /srv/backup backup /dev/vg0/vm1 --name vm1\n  genvault -r /srv/backup backup ssh://root@host/dev/vg/vm2 --name vm2\n' +
      '  ssh host cat /dev/vg/vm2 | genvault backup - --name vm2\n' +
      "  genvault backup 'nbd+unix:///vda?socket=/run/vm1-backup.sock' --bitmap backup-vda --name vm1\n" +
      '  genvault backup rbd:rbd/vm3@backup-2026-12-06 --name vm3 --ceph-id backup\n' +
      '  genvault backup /srv/backup/overlays/vm1-....overlay --from-nbd-overlay --name vm1\n' +
      'NBD sources and dirty bitmaps: native-notes/nbd.md; rbd: sources (only what changed since the\n' +
      'snapshot the latest generation was read from is read): native-notes/ceph.md';

export function register(program: Command): void {
  const cmd = program
    .command('backup')
    .description('back up an image file, a block device, or stdin (-) as a new generation of NAME')
    .argument('<source>', 'image file, block device, - for standard input, ssh://[user@]host[:port]/path, nbd://host[:port]/export, nbd+unix:///export?socket=PATH or rbd:POOL/[NAMESPACE/]IMAGE@SNAP')
    .requiredOption('-n, --name <name>', 'image name (letters, digits, . _ -)')
    .option('-t, --tag <tag>', 'tag the generation (repeatable)', collect, [])
    .option('--wait', 'wait for a running backup of the same image instead of failing')
    .option('-i, --identity <file>', 'ssh:// sources: private key file (default: ssh-agent, then ~/.ssh/id_ed25519, id_ecdsa, id_rsa)')
    .option('--known-hosts <file>', 'ssh:// sources: known hosts file (default ~/.ssh/known_hosts)')
    .option('--accept-new-host-key', 'ssh:// sources: trust and record the key of a host not yet known (never a changed key)')
    .option('--ssh-config <file>', 'ssh:// sources: OpenSSH config file read instead of ~/.ssh/config and /etc/ssh/ssh_config, or none (default: $GENVAULT_SSH_CONFIG)')
    .option('--ssh-command <cmd>', 'ssh:// sources: run this OpenSSH client (e.g. ssh, or "ssh -F FILE") instead of the built-in one')
    .addOption(
      new Option('--ssh-mode <mode>', 'ssh:// sources: agent (chunk remotely with python3, send only missing chunks), plain (cat), or auto')
        .choices(SSH_MODES)
        .default('auto'),
    )
    .addOption(new Option('--max-size <size>', 'fail, committing nothing, if the source is or yields more than SIZE (e.g. 512M, 10G, 1T); needed for a character device').argParser(sizeArg))
    .option('--bitmap <name>', 'nbd:// sources: read only what the QEMU dirty bitmap NAME marks, the rest from the previous generation')
    .option('--thin-delta <metadata:from:to>', 'LVM thin: read only what thin_delta says differs between thin devices FROM and TO (the source is TO), the rest from the previous generation')
    .option('--thin-metadata-snap', 'with --thin-delta: read the pool\'s reserved metadata snapshot (thin_delta -m), as a live pool needs')
    .addOption(new Option('--verify-hints <percent>', 'with --bitmap or --thin-delta: also read PERCENT of the unchanged blocks and fail if any differs from the previous generation').argParser(percentArg()))
    .option('--rbd-live', 'rbd: sources: read the image itself, no snapshot (NOT consistent while anything writes to it)')
    .option('--full', 'rbd: sources: read the whole snapshot, even when the latest generation was read from an older snapshot of the image')
    .option('--from-nbd-overlay', 'the source is the overlay file of a `genvault nbd --writable` export: its generation with the writes')
    .addOption(new Option('--limit-rate <rate>', 'ssh:// and s3:// repositories: send at most RATE bytes per second (e.g. 20M)').argParser(rateArg))
    .option('--json', 'print the new generation as JSON');
  addCephOptions(cmd)
    .addHelpText('after', BACKUP_HELP)
    .action(
      action(async (src: string, opts: BackupCliOptions, cmd: Command) => {
        const ssh = isSshSpec(src);
        const maxSize = opts.maxSize;
        checkRbdFlags(src, opts);
        if (opts.bitmap !== undefined && !isNbdUri(src)) throw new UsageError('--bitmap needs an nbd:// or nbd+unix:// source');
        if (opts.verifyHints !== undefined && opts.bitmap === undefined && opts.thinDelta === undefined) throw new UsageError('--verify-hints needs --bitmap or --thin-delta');
        if (opts.thinDelta !== undefined && (isNbdUri(src) || ssh || src === '-' || opts.fromNbdOverlay)) throw new UsageError('--thin-delta needs the newer thin snapshot (a block device or image file here) as the source');
        if (opts.thinDelta !== undefined) parseThinDelta(opts.thinDelta);
        if (opts.thinMetadataSnap && opts.thinDelta === undefined) throw new UsageError('--thin-metadata-snap needs --thin-delta');
        if (opts.fromNbdOverlay && (isNbdUri(src) || ssh || src === '-')) throw new UsageError('--from-nbd-overlay needs the overlay file as the source');
        if (ssh && !opts.sshCommand) warnIfNoNativeCrypto();
        if (remoteRepo(cmd)) return backupRemote(src, opts, maxSize, cmd);
        if (opts.limitRate !== undefined && !repoPath(cmd).startsWith('s3://')) throw new UsageError('--limit-rate applies to ssh:// and s3:// repositories');
        await withRepo(cmd, async (repo) => {
          // The remote agent hashes without the repository's key (FORMAT.md, version 6): plain for an encrypted one.
          if (ssh && opts.sshMode === 'agent' && repo.keys) throw new UsageError('--ssh-mode agent: the remote agent cannot hash chunks for an encrypted repository; use plain or auto');
          const source = await openSource(repo, src, opts, maxSize);
          const progress = new Progress(`backup ${opts.name}`);
          // A signal ends the backup at once: what it wrote is trimmed by the next writer
          // (locks.ts). The commit holds signals, so the line is true either way.
          let committed = false;
          onInterrupt(() =>
            committed
              ? `backup of ${opts.name} interrupted after its generation was committed`
              : `backup of ${opts.name} interrupted; nothing was committed (any partial pack is removed by the next backup or gc)`,
          );
          try {
            const gen = await backup(repo, source, {
              name: opts.name,
              tags: opts.tag,
              wait: opts.wait,
              maxSize,
              commit: (run) =>
                holdingSignals(async () => {
                  await run();
                  committed = true;
                }),
              onProgress: (d, t) => progress.update(d, t),
            });
            progress.done();
            if (wantsJson(cmd)) printJson(withSourceStats(gen, source));
            else {
              const s = gen.stats;
              process.stdout.write(
                `${gen.name}@${gen.id}: ${bytes(gen.size)} read in ${duration(s.durationMs)} (${rate(s.bytesRead, s.durationMs)}), ` +
                  `${bytes(s.newBytes)} new (${bytes(s.newStored)} stored), ${bytes(s.zeroBytes)} zero` +
                  (s.unchangedBytes ? `, ${bytes(s.unchangedBytes)} unchanged` : '') +
                  (isChunkedSource(source) && !(source instanceof NbdSource || source instanceof OverlaySource || source instanceof ThinHintedSource || source instanceof RbdSource) ? `, ${bytes(source.transferred.wire)} of chunk data over SSH` : '') +
                  nbdSummary(source) +
                  '\n',
              );
            }
          } finally {
            progress.done();
            await source.close().catch(() => undefined);
          }
        }, { write: true, limitRate: opts.limitRate });
      }),
    );
}

/** The rbd: source's flags, and no rbd flag without one. */
function checkRbdFlags(src: string, opts: BackupCliOptions): void {
  if (!isRbdSpec(src)) {
    if (hasCephFlags(opts) || opts.rbdLive || opts.full) throw new UsageError('--ceph-conf, --ceph-id, --ceph-keyring, --rbd-live and --full need an rbd: source');
    return;
  }
  parseRbdSpec(src);
  if (opts.verifyHints !== undefined) {
    throw new UsageError('--verify-hints is not offered for rbd: sources: rbd cannot read a range of a snapshot, so checking unchanged blocks means reading all of it; --full reads all of it (and stores it)');
  }
  if (opts.bitmap !== undefined || opts.thinDelta !== undefined || opts.fromNbdOverlay) throw new UsageError('--bitmap, --thin-delta and --from-nbd-overlay do not apply to rbd: sources');
}

/**
 * A backup into an ssh:// repository: the source is read and chunked here, the server
 * stores what it lacks (src/remote/upload-client.ts). NBD, overlay and thin-delta sources
 * need the repository's previous generation at hand and are local-repository only.
 */
async function backupRemote(src: string, opts: BackupCliOptions, maxSize: number | undefined, cmd: Command): Promise<void> {
  if (opts.bitmap !== undefined || opts.thinDelta !== undefined || opts.fromNbdOverlay || isNbdUri(src) || isRbdSpec(src)) {
    throw new UsageError('NBD, overlay, --thin-delta and rbd: sources need a local repository (run the backup on the repository\'s host)');
  }
  const limitRate = opts.limitRate;
  await withRemote(
    cmd,
    async (remote) => {
      const source = isSshSpec(src)
        ? await openRemoteSource(src, {
            identity: opts.identity, knownHosts: opts.knownHosts, config: opts.sshConfig, command: opts.sshCommand,
            acceptNewHostKey: opts.acceptNewHostKey, mode: 'plain', chunking: remote.welcome.chunking,
          })
        : await openLocalSource(src, { maxSize });
      const progress = new Progress(`backup ${opts.name}`);
      onInterrupt(() => `backup of ${opts.name} interrupted; nothing was committed (the server removes what it wrote)`);
      try {
        const res = await backupToRemote(remote, source, { name: opts.name, tags: opts.tag, wait: opts.wait, onProgress: (d, t) => progress.update(d, t) });
        progress.done();
        const gen = res.generation;
        if (wantsJson(cmd)) printJson({ ...gen, remote: { repository: remote.dir, sentChunkBytes: res.sentChunkBytes, sentBytes: res.sentBytes, unchangedBytes: res.unchangedBytes } });
        else {
          const s = gen.stats;
          process.stdout.write(
            `${gen.name}@${gen.id}: ${bytes(gen.size)} read in ${duration(s.durationMs)} (${rate(s.bytesRead, s.durationMs)}), ` +
              `${bytes(s.newBytes)} new (${bytes(s.newStored)} stored), ${bytes(s.zeroBytes)} zero` +
              (res.unchangedBytes ? `, ${bytes(res.unchangedBytes)} unchanged` : '') +
              `, ${bytes(res.sentBytes)} sent to ${remote.dir}\n`,
          );
        }
      } finally {
        progress.done();
        await source.close().catch(() => undefined);
      }
    },
    { limitRate },
  );
}

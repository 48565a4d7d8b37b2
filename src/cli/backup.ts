import { Command } from 'commander';
import * as backupModule from '../backup/backup.js';
import { openLocalSource } from '../source/local.js';
import { isSshSpec, warnIfNoNativeCrypto } from '../source/ssh.js';
import { openRemoteSource, parseSshMode } from '../source/ssh-agent.js';
import { isChunkedSource } from '../backup/chunked-source.js';

const { backup } = backupModule;
/**
 * Whether backup() consumes ChunkedSource.readSegment (then only missing chunks cross the
 * network); until it does, `--ssh-mode auto` streams with cat.
 */
const chunkedBackup = (backupModule as Record<string, unknown>).SUPPORTS_CHUNKED_SOURCES === true;
import { bytes, duration, parseSize, rate } from '../util/format.js';
import { Progress } from '../util/progress.js';
import { UsageError } from '../util/errors.js';
import { action, collect, holdingSignals, onInterrupt, printJson, wantsJson, withWritableRepo } from './common.js';

interface BackupCliOptions {
  name: string;
  tag: string[];
  wait?: boolean;
  identity?: string;
  knownHosts?: string;
  acceptNewHostKey?: boolean;
  sshMode: string;
  maxSize?: string;
}

export function register(program: Command): void {
  program
    .command('backup')
    .description('back up an image file, a block device, or stdin (-) as a new generation of NAME')
    .argument('<source>', 'image file, block device, - for standard input, or ssh://[user@]host[:port]/path')
    .requiredOption('-n, --name <name>', 'image name (letters, digits, . _ -)')
    .option('-t, --tag <tag>', 'tag the generation (repeatable)', collect, [])
    .option('--wait', 'wait for a running backup of the same image instead of failing')
    .option('-i, --identity <file>', 'ssh:// sources: private key file (default: ssh-agent, then ~/.ssh/id_ed25519, id_ecdsa, id_rsa)')
    .option('--known-hosts <file>', 'ssh:// sources: known hosts file (default ~/.ssh/known_hosts)')
    .option('--accept-new-host-key', 'ssh:// sources: trust and record the key of a host not yet known (never a changed key)')
    .option(
      '--ssh-mode <mode>',
      'ssh:// sources: agent (chunk remotely with python3, send only missing chunks), plain (cat), or auto',
      'auto',
    )
    .option('--max-size <size>', 'fail, committing nothing, if the source is or yields more than SIZE (e.g. 512M, 10G, 1T); needed for a character device')
    .option('--json', 'print the new generation as JSON')
    .addHelpText(
      'after',
      '\nOnly chunks the repository lacks are stored; zero regions store nothing.\n' +
        'The generation becomes visible only after all its data is on disk.\n' +
        'A file or block device is read up to its size; stdin and pipes to their end, or\n' +
        'to --max-size; a character device (/dev/zero) only with --max-size.\n\n' +
        'Examples:\n  genvault -r /srv/backup backup /dev/vg0/vm1 --name vm1\n  genvault -r /srv/backup backup ssh://root@host/dev/vg/vm2 --name vm2\n' +
          '  ssh host cat /dev/vg/vm2 | genvault backup - --name vm2',
    )
    .action(
      action(async (src: string, opts: BackupCliOptions, cmd: Command) => {
        const ssh = isSshSpec(src);
        const sshMode = parseSshMode(opts.sshMode);
        const maxSize = opts.maxSize === undefined ? undefined : parseSize(opts.maxSize, '--max-size');
        if (ssh) warnIfNoNativeCrypto();
        await withWritableRepo(cmd, async (repo) => {
          // The remote agent hashes without the repository's key (FORMAT.md, version 6): plain for an encrypted one.
          if (ssh && sshMode === 'agent' && repo.keys) throw new UsageError('--ssh-mode agent: the remote agent cannot hash chunks for an encrypted repository; use plain or auto');
          const mode = sshMode === 'auto' && (!chunkedBackup || repo.keys) ? 'plain' : sshMode;
          const source = ssh
            ? await openRemoteSource(src, {
                identity: opts.identity,
                knownHosts: opts.knownHosts,
                acceptNewHostKey: opts.acceptNewHostKey,
                mode,
                chunking: repo.config.chunking,
              })
            : await openLocalSource(src, { maxSize });
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
            if (wantsJson(cmd)) printJson(gen);
            else {
              const s = gen.stats;
              process.stdout.write(
                `${gen.name}@${gen.id}: ${bytes(gen.size)} read in ${duration(s.durationMs)} (${rate(s.bytesRead, s.durationMs)}), ` +
                  `${bytes(s.newBytes)} new (${bytes(s.newStored)} stored), ${bytes(s.zeroBytes)} zero` +
                  (s.unchangedBytes ? `, ${bytes(s.unchangedBytes)} unchanged` : '') +
                  (isChunkedSource(source) ? `, ${bytes(source.transferred.wire)} of chunk data over SSH` : '') +
                  '\n',
              );
            }
          } finally {
            progress.done();
            await source.close().catch(() => undefined);
          }
        });
      }),
    );
}

import { Command } from 'commander';
import * as backupModule from '../repo/backup.js';
import { openLocalSource } from '../source/local.js';
import { isSshSpec, warnIfNoNativeCrypto } from '../source/ssh.js';
import { openRemoteSource, parseSshMode } from '../source/ssh-agent.js';
import { isChunkedSource } from '../source/chunked.js';

const { backup } = backupModule;
/**
 * Whether backup() consumes ChunkedSource.readSegment (then only missing chunks cross the
 * network); until it does, `--ssh-mode auto` streams with cat.
 */
const chunkedBackup = (backupModule as Record<string, unknown>).SUPPORTS_CHUNKED_SOURCES === true;
import { bytes, duration, rate } from '../util/format.js';
import { Progress } from '../util/progress.js';
import { action, collect, printJson, wantsJson, withWritableRepo } from './common.js';

interface BackupCliOptions {
  name: string;
  tag: string[];
  wait?: boolean;
  identity?: string;
  knownHosts?: string;
  acceptNewHostKey?: boolean;
  sshMode: string;
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
    .option('--json', 'print the new generation as JSON')
    .addHelpText(
      'after',
      '\nOnly chunks the repository lacks are stored; zero regions store nothing.\n' +
        'The generation becomes visible only after all its data is on disk.\n\n' +
        'Examples:\n  genvault -r /srv/backup backup /dev/vg0/vm1 --name vm1\n  genvault -r /srv/backup backup ssh://root@host/dev/vg/vm2 --name vm2\n' +
          '  ssh host cat /dev/vg/vm2 | genvault backup - --name vm2',
    )
    .action(
      action(async (src: string, opts: BackupCliOptions, cmd: Command) => {
        const ssh = isSshSpec(src);
        const sshMode = parseSshMode(opts.sshMode);
        if (ssh) warnIfNoNativeCrypto();
        await withWritableRepo(cmd, async (repo) => {
          const mode = sshMode === 'auto' && !chunkedBackup ? 'plain' : sshMode;
          const source = ssh
            ? await openRemoteSource(src, {
                identity: opts.identity,
                knownHosts: opts.knownHosts,
                acceptNewHostKey: opts.acceptNewHostKey,
                mode,
                chunking: repo.config.chunking,
              })
            : await openLocalSource(src);
          const progress = new Progress(`backup ${opts.name}`);
          try {
            const gen = await backup(repo, source, {
              name: opts.name,
              tags: opts.tag,
              wait: opts.wait,
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

import { Command } from 'commander';
import { backup } from '../repo/backup.js';
import { openLocalSource } from '../source/local.js';
import { bytes, duration, rate } from '../util/format.js';
import { Progress } from '../util/progress.js';
import { action, collect, printJson, wantsJson, withRepo } from './common.js';

export function register(program: Command): void {
  program
    .command('backup')
    .description('back up an image file, a block device, or stdin (-) as a new generation of NAME')
    .argument('<source>', 'image file, block device, or - for standard input')
    .requiredOption('-n, --name <name>', 'image name (letters, digits, . _ -)')
    .option('-t, --tag <tag>', 'tag the generation (repeatable)', collect, [])
    .option('--wait', 'wait for a running backup of the same image instead of failing')
    .option('--json', 'print the new generation as JSON')
    .addHelpText(
      'after',
      '\nOnly chunks the repository lacks are stored; zero regions store nothing.\n' +
        'The generation becomes visible only after all its data is on disk.\n\n' +
        'Examples:\n  genvault -r /srv/backup backup /dev/vg0/vm1 --name vm1\n  ssh host cat /dev/vg/vm2 | genvault backup - --name vm2',
    )
    .action(
      action(async (src: string, opts: { name: string; tag: string[]; wait?: boolean }, cmd: Command) => {
        await withRepo(cmd, async (repo) => {
          const source = await openLocalSource(src);
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
                  `${bytes(s.newBytes)} new (${bytes(s.newStored)} stored), ${bytes(s.zeroBytes)} zero\n`,
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

import { Command } from 'commander';
import { generationFileName } from '../format/generation.js';
import { bytes, duration, table } from '../util/format.js';
import { action, printJson, repoPath, wantsJson, withRepo } from './common.js';
import { remoteRepo, withRemote } from './remote.js';

export function register(program: Command): void {
  program
    .command('list')
    .alias('ls')
    .description('list generations, newest last (of one image, or of all)')
    .argument('[name]', 'image name')
    .option('--json', 'print JSON')
    .action(
      action(async (name: string | undefined, _o: unknown, cmd: Command) => {
        {
          const gens = remoteRepo(cmd) ? await withRemote(cmd, (r) => r.generations(name)) : await withRepo(cmd, (repo) => repo.generations(name));
          if (name !== undefined && !gens.length) {
            const { GenvaultError } = await import('../util/errors.js');
            throw new GenvaultError(`no image named ${name} in ${repoPath(cmd)}`, 'NOT_FOUND');
          }
          if (wantsJson(cmd)) {
            printJson(gens.map((g) => ({ ...g, protected: g.protected === true, file: generationFileName(g) })));
            return;
          }
          if (!gens.length) {
            process.stdout.write('no generations yet\n');
            return;
          }
          const rows = [['IMAGE', 'REV', 'ID', 'CREATED (UTC)', 'SIZE', 'NEW', 'STORED', 'TIME', 'PROT', 'TAGS']];
          const byName = new Map<string, typeof gens>();
          for (const g of gens) byName.set(g.name, [...(byName.get(g.name) ?? []), g]);
          for (const [n, list] of byName) {
            list.forEach((g, i) => {
              rows.push([
                n,
                String(list.length - 1 - i),
                g.id,
                g.created.replace('T', ' ').replace(/\.\d+Z$/, ''),
                bytes(g.size),
                bytes(g.stats.newBytes),
                bytes(g.stats.newStored),
                duration(g.stats.durationMs),
                g.protected ? 'yes' : '-',
                g.tags.join(','),
              ]);
            });
          }
          process.stdout.write(table(rows, [1, 4, 5, 6, 7]) + '\n');
        }
      }),
    );
}

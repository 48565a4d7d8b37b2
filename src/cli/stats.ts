import { Command } from 'commander';
import { repositorySpace } from '../lifecycle/stats.js';
import { GenvaultError } from '../util/errors.js';
import { bytes, table } from '../util/format.js';
import { action, printJson, wantsJson, withRepo } from './common.js';

export function register(program: Command): void {
  program
    .command('stats')
    .description('space per image: stored bytes, shared with other images and unique to it (what forgetting it would free)')
    .argument('[name]', 'one image: also what forgetting each of its generations would free')
    .option('--json', 'print JSON')
    .addHelpText(
      'after',
      '\nFrom the chunk maps and the chunk index; no pack is read. STORED counts every distinct chunk\n' +
        "the image's generations use, compressed, as stored; UNIQUE the part no other image uses:\n" +
        'what `genvault forget` of all its generations and then `genvault gc` would free. SHARED\n' +
        'is the rest. With NAME, FREES is what forgetting that one generation would free.\n' +
        'Protected generations must be unprotected before they can be forgotten.\n\n' +
        'Examples:\n' +
        '  genvault stats\n' +
        '  genvault stats vm1 --json',
    )
    .action(
      action(async (name: string | undefined, _o: unknown, cmd: Command) => {
        await withRepo(cmd, async (repo) => {
          const space = await repositorySpace(repo, { perGeneration: name !== undefined });
          const images = name === undefined ? space.images : space.images.filter((i) => i.name === name);
          if (name !== undefined && !images.length) throw new GenvaultError(`no image named ${name} in ${repo.dir}`, 'NOT_FOUND');
          if (wantsJson(cmd)) {
            printJson({ ...space, images });
            return;
          }
          const rows = [['IMAGE', 'GENS', 'SIZE', 'STORED', 'SHARED', 'UNIQUE (FREED BY FORGETTING IT)']];
          for (const i of images) rows.push([i.name, String(i.generations), bytes(i.size), bytes(i.storedBytes), bytes(i.sharedBytes), bytes(i.uniqueBytes)]);
          let out = table(rows, [1, 2, 3, 4, 5]) + '\n';
          for (const i of images.filter((x) => x.perGeneration)) {
            const g = [['REV', 'ID', 'CREATED (UTC)', 'PROT', 'FREES']];
            i.perGeneration!.forEach((x, k, all) => g.push([String(all.length - 1 - k), x.id, x.created.replace('T', ' ').replace(/\.\d+Z$/, ''), x.protected ? 'yes' : '-', bytes(x.uniqueBytes)]));
            out += `\n${table(g, [0, 4])}\n`;
          }
          out += `\nrepository: ${bytes(space.referencedBytes)} referenced, ${bytes(space.unreferencedBytes)} unreferenced (gc reclaims it), ${bytes(space.packBytes)} in pack files\n`;
          if (space.missingChunks) out += `warning: ${space.missingChunks} chunks referenced by maps are missing from the index (run 'genvault verify')\n`;
          process.stdout.write(out);
        });
      }),
    );
}

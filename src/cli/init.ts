import { Command } from 'commander';
import { Repository } from '../repo/repository.js';
import { action, printJson, repoPath, wantsJson } from './common.js';

export function register(program: Command): void {
  program
    .command('init')
    .description('create a new, empty repository in the directory given by -r/GENVAULT_REPO')
    .option('--json', 'print the new repository config as JSON')
    .action(
      action(async (_opts: unknown, cmd: Command) => {
        const dir = repoPath(cmd);
        const cfg = await Repository.init(dir);
        if (wantsJson(cmd)) printJson({ repository: dir, ...cfg });
        else process.stdout.write(`created genvault repository ${cfg.id} at ${dir}\n`);
      }),
    );
}

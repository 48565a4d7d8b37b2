import { Command } from 'commander';
import { Repository } from '../repository/repository.js';
import { GROUP_NAME_RE } from '../format/config.js';
import { UsageError } from '../util/errors.js';
import { action, printJson, repoPath, wantsJson } from './common.js';

export function register(program: Command): void {
  program
    .command('init')
    .description('create a new, empty repository in the directory given by -r/GENVAULT_REPO')
    .option('--group <group>', 'let this group read the repository (directories 2750, files 0640); default: owner only (0700, 0600)')
    .option('--json', 'print the new repository config as JSON')
    .action(
      action(async (opts: { group?: string }, cmd: Command) => {
        const dir = repoPath(cmd);
        if (opts.group !== undefined && !GROUP_NAME_RE.test(opts.group)) throw new UsageError(`--group: invalid group name ${JSON.stringify(opts.group)}`);
        const cfg = await Repository.init(dir, opts.group !== undefined ? { group: opts.group } : {});
        if (wantsJson(cmd)) printJson({ repository: dir, ...cfg });
        else process.stdout.write(`created genvault repository ${cfg.id} at ${dir}\n`);
      }),
    );
}

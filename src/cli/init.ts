import { Command } from 'commander';
import { Repository } from '../repository/repository.js';
import { GROUP_NAME_RE } from '../format/config.js';
import { UsageError } from '../util/errors.js';
import { currentSecret } from '../repository/keys.js';
import { action, printJson, repoPath, wantsJson } from './common.js';

export function register(program: Command): void {
  program
    .command('init')
    .description('create a new, empty repository in the directory given by -r/GENVAULT_REPO')
    .option('--group <group>', 'let this group read the repository (directories 2750, files 0640); default: owner only (0700, 0600)')
    .option('--encryption <mode>', 'aes-256-gcm (the key from --key-file, $GENVAULT_PASSWORD_FILE or a prompt), or none', 'aes-256-gcm')
    .option('--json', 'print the new repository config as JSON')
    .action(
      action(async (opts: { group?: string; encryption: string }, cmd: Command) => {
        const dir = repoPath(cmd);
        if (opts.group !== undefined && !GROUP_NAME_RE.test(opts.group)) throw new UsageError(`--group: invalid group name ${JSON.stringify(opts.group)}`);
        if (opts.encryption !== 'none' && opts.encryption !== 'aes-256-gcm') throw new UsageError(`--encryption must be aes-256-gcm or none, not "${opts.encryption}"`);
        // The secret before anything is made: a refused key file leaves no directory behind.
        const secret = opts.encryption === 'none' ? null : await currentSecret(`the new repository ${dir}`, true);
        const cfg = await Repository.init(dir, opts.group !== undefined ? { group: opts.group } : {}, secret);
        if (wantsJson(cmd)) printJson({ repository: dir, ...cfg });
        else process.stdout.write(`created genvault repository ${cfg.id} at ${dir}${secret ? ` (encrypted; key slot from ${secret.from})` : ''}\n`);
      }),
    );
}

import { Command } from 'commander';
import { forgetGeneration } from '../lifecycle/prune.js';
import { action, printJson, wantsJson, withWritableRepo } from './common.js';
import { remoteRepo, withRemote } from './remote.js';
import type { Generation } from '../format/generation.js';

export function register(program: Command): void {
  program
    .command('forget')
    .description('remove one generation (its data stays until `genvault gc` reclaims what nothing uses)')
    .argument('<target>', 'NAME@REV (REV: latest, N with 0 the newest, id or prefix, ISO date/time)')
    .option('--force-young', 'remove it even if it is younger than the minimum age (config guards.minAge, default 1d)')
    .option('--json', 'print the removed generation as JSON')
    .addHelpText(
      'after',
      '\nRefuses a protected generation (run `genvault unprotect` first) and one younger than the\n' +
        "repository's minimum age unless --force-young. Map leaves, chunks and pack space are left\n" +
        'for `genvault gc`.\n\nExample:\n  genvault forget vm1@3',
    )
    .action(
      action(async (target: string, opts: { forceYoung?: boolean }, cmd: Command) => {
        {
          const g = remoteRepo(cmd)
            ? await withRemote(cmd, async (r) => (await r.call<{ forgotten: Generation }>('forget', { target, forceYoung: opts.forceYoung === true })).forgotten)
            : await withWritableRepo(cmd, (repo) => forgetGeneration(repo, target, { forceYoung: opts.forceYoung }));
          if (wantsJson(cmd)) printJson({ forgotten: g });
          else process.stdout.write(`forgot ${g.name}@${g.id} (created ${g.created}); run 'genvault gc' to reclaim its space\n`);
        }
      }),
    );
}

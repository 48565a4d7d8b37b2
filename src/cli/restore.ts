import { Command } from 'commander';
import { restoreToPath, restoreToStream } from '../repo/restore.js';
import { bytes, duration, rate } from '../util/format.js';
import { Progress } from '../util/progress.js';
import { action, printJson, wantsJson, withRepo } from './common.js';

function reportDamage(damaged: Array<{ offset: number; length: number }>): void {
  for (const r of damaged) {
    process.stderr.write(`genvault: damaged chunk: image bytes ${r.offset}-${r.offset + r.length - 1} written as zeros\n`);
  }
}

export function register(program: Command): void {
  program
    .command('restore')
    .description('write a generation to a file (sparse) or a block device, checking every chunk')
    .argument('<target>', 'NAME@REV (REV: latest, N, id or prefix, ISO date/time)')
    .argument('<dest>', 'file or block device to write')
    .option('-f, --force', 'overwrite an existing non-empty file')
    .option('--ignore-damage', 'write zeros where chunks are damaged and list those ranges, instead of failing')
    .option('--json', 'print a JSON summary')
    .action(
      action(async (target: string, dest: string, opts: { force?: boolean; ignoreDamage?: boolean }, cmd: Command) => {
        await withRepo(cmd, async (repo) => {
          const g = await repo.resolve(target);
          const progress = new Progress(`restore ${g.name}`);
          const t0 = Date.now();
          const res = await restoreToPath(repo, g, dest, {
            force: opts.force,
            ignoreDamage: opts.ignoreDamage,
            onProgress: (d, t) => progress.update(d, t),
          }).finally(() => progress.done());
          const ms = Date.now() - t0;
          reportDamage(res.damaged);
          if (wantsJson(cmd)) printJson({ generation: g.id, name: g.name, ...res, durationMs: ms });
          else process.stdout.write(`restored ${g.name}@${g.id} to ${res.target}: ${bytes(res.bytes)} in ${duration(ms)} (${rate(res.bytes, ms)})\n`);
          if (res.damaged.length) process.exitCode = 1;
        });
      }),
    );

  program
    .command('cat')
    .description('write the raw bytes of a generation to stdout')
    .argument('<target>', 'NAME@REV')
    .option('--ignore-damage', 'write zeros where chunks are damaged instead of failing')
    .action(
      action(async (target: string, opts: { ignoreDamage?: boolean }, cmd: Command) => {
        if (process.stdout.isTTY) {
          const { UsageError } = await import('../util/errors.js');
          throw new UsageError('refusing to write a disk image to a terminal; redirect stdout');
        }
        await withRepo(cmd, async (repo) => {
          const g = await repo.resolve(target);
          const res = await restoreToStream(repo, g, process.stdout, { ignoreDamage: opts.ignoreDamage });
          reportDamage(res.damaged);
          if (res.damaged.length) process.exitCode = 1;
        });
      }),
    );
}

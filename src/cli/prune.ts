import { Command, Option } from 'commander';
import { prune } from '../lifecycle/prune.js';
import type { RetentionRules } from '../lifecycle/retention.js';
import { formatDuration } from '../util/duration.js';
import { table } from '../util/format.js';
import { action, collect, printJson, wantsJson, withWritableRepo } from './common.js';
import { countArg, durationArg } from './options.js';

/** The --keep-* options as commander gives them: the rules, with --keep-tag repeated. */
export interface KeepFlags extends Omit<RetentionRules, 'keepTags'> {
  keepTag?: string[];
  /** Milliseconds. */
  minAge?: number;
}

interface PruneFlags extends KeepFlags {
  dryRun?: boolean;
  allowEmpty?: boolean;
}

/** The --keep-* options (prune, sync). */
export function keepOptions(c: Command): Command {
  const count = (flags: string, description: string) => new Option(flags, description).argParser(countArg);
  return c
    .addOption(count('--keep-last <n>', 'keep the n newest generations'))
    .addOption(count('--keep-hourly <n>', 'keep the newest generation of each of the n most recent hours (UTC) that have one'))
    .addOption(count('--keep-daily <n>', 'keep the newest generation of each of the n most recent days (UTC) that have one'))
    .addOption(count('--keep-weekly <n>', 'keep the newest generation of each of the n most recent ISO weeks that have one'))
    .addOption(count('--keep-monthly <n>', 'keep the newest generation of each of the n most recent months that have one'))
    .addOption(count('--keep-yearly <n>', 'keep the newest generation of each of the n most recent years that have one'))
    .option('--keep-tag <tag>', 'keep every generation with this tag (repeatable)', collect)
    .addOption(new Option('--min-age <duration>', "keep generations younger than this (e.g. 0, 90m, 36h, 7d; default: the repository's guards.minAge, 1d)").argParser(durationArg));
}

/** The rules the --keep-* options give. */
export function keepRules(o: KeepFlags): RetentionRules {
  return {
    keepLast: o.keepLast,
    keepHourly: o.keepHourly,
    keepDaily: o.keepDaily,
    keepWeekly: o.keepWeekly,
    keepMonthly: o.keepMonthly,
    keepYearly: o.keepYearly,
    keepTags: o.keepTag ?? [],
  };
}

export function register(program: Command): void {
  keepOptions(
    program
      .command('prune')
      .description('remove the generations a retention policy does not keep (per image; space is reclaimed by `genvault gc`)')
      .argument('[names...]', 'images to prune (default: all)'),
  )
    .option('-n, --dry-run', 'only show what would be kept and removed, and why')
    .option('--allow-empty', 'allow removing every generation of an image')
    .option('--json', 'print the decisions as JSON')
    .addHelpText(
      'after',
      '\nRules combine: a generation is kept if any rule keeps it. Protected generations\n' +
        '(`genvault protect`) and generations younger than the minimum age are always kept.\n' +
        'Removing every generation of an image is refused without --allow-empty.\n' +
        'Pruning removes generation records only; run `genvault gc` to reclaim the space.\n\n' +
        'Examples:\n' +
        '  genvault prune --keep-daily 7 --keep-weekly 4 --keep-monthly 12 --dry-run\n' +
        '  genvault prune vm1 --keep-last 3 --keep-tag release',
    )
    .action(
      action(async (names: string[], o: PruneFlags, cmd: Command) => {
        const rules = keepRules(o);
        const minAgeMs = o.minAge;
        await withWritableRepo(cmd, async (repo) => {
          const res = await prune(repo, { names, rules, minAgeMs, dryRun: o.dryRun, allowEmpty: o.allowEmpty });
          const images = new Set(res.decisions.map((d) => d.gen.name)).size;
          if (wantsJson(cmd)) {
            printJson({
              dryRun: res.dryRun,
              minAge: formatDuration(res.minAgeMs),
              images,
              kept: res.kept.length,
              removed: res.removed.length,
              generations: res.decisions.map((d) => ({
                name: d.gen.name,
                id: d.gen.id,
                created: d.gen.created,
                tags: d.gen.tags,
                protected: d.gen.protected === true,
                action: d.keep ? 'keep' : 'remove',
                reasons: d.reasons,
              })),
            });
            return;
          }
          if (!res.decisions.length) {
            process.stdout.write('no generations to prune\n');
            return;
          }
          const rows = [['IMAGE', 'ID', 'CREATED (UTC)', res.dryRun ? 'WOULD' : 'ACTION', 'REASONS']];
          for (const d of res.decisions) {
            rows.push([
              d.gen.name,
              d.gen.id,
              d.gen.created.replace('T', ' ').replace(/\.\d+Z$/, ''),
              d.keep ? 'keep' : 'remove',
              d.keep ? d.reasons.join(', ') : 'no keep rule matches',
            ]);
          }
          process.stdout.write(table(rows) + '\n');
          const of = `${res.removed.length} of ${res.decisions.length} generation(s) of ${images} image(s)`;
          if (res.dryRun) process.stdout.write(`would remove ${of}; nothing changed (dry run)\n`);
          else if (res.removed.length) process.stdout.write(`removed ${of}; run 'genvault gc' to reclaim their space\n`);
          else process.stdout.write(`removed 0 of ${res.decisions.length} generation(s): every one is kept\n`);
        });
      }),
    );
}

import { Command } from 'commander';
import { diffGenerations } from '../read/diff.js';
import { bytes, table } from '../util/format.js';
import { action, printJson, wantsJson, withRepo } from './common.js';

export function register(program: Command): void {
  program
    .command('diff')
    .description('byte ranges that changed between two generations, from their chunk maps (no data is read)')
    .argument('<a>', 'NAME@REV, the older one')
    .argument('<b>', 'NAME@REV, the newer one (may be of another image)')
    .option('--json', 'print JSON')
    .addHelpText(
      'after',
      '\nA range is listed when the chunks there differ. Chunks cut at other boundaries count as\n' +
        'changed (their bytes are not read), so a range can be slightly wider than the bytes that\n' +
        'really changed; identical map leaves are skipped whole. A changed size counts the grown or\n' +
        'cut part. Changed files of a file system (--files) are not implemented.\n\n' +
        'Examples:\n' +
        '  genvault diff vm1@1 vm1@latest\n' +
        '  genvault diff vm1@2026-11-20 vm1@2026-11-22 --json',
    )
    .action(
      action(async (aSpec: string, bSpec: string, _o: unknown, cmd: Command) => {
        await withRepo(cmd, async (repo) => {
          const a = await repo.resolve(aSpec);
          const b = await repo.resolve(bSpec);
          const d = await diffGenerations(repo, a, b);
          const ref = (g: typeof a) => ({ name: g.name, id: g.id, created: g.created, size: g.size });
          if (wantsJson(cmd)) {
            printJson({ a: ref(a), b: ref(b), ...d });
            return;
          }
          const pct = d.size ? ((100 * d.changedBytes) / d.size).toFixed(2) : '0.00';
          let out = `${a.name}@${a.id} -> ${b.name}@${b.id}: ${d.ranges.length} changed range${d.ranges.length === 1 ? '' : 's'}, ${bytes(d.changedBytes)} of ${bytes(d.size)} (${pct}%)\n`;
          if (a.size !== b.size) out += `size ${a.size} -> ${b.size} bytes\n`;
          if (d.ranges.length) {
            const rows = [['OFFSET', 'END', 'LENGTH', '']];
            for (const r of d.ranges) rows.push([String(r.offset), String(r.offset + r.length), String(r.length), bytes(r.length)]);
            out += '\n' + table(rows, [0, 1, 2, 3]) + '\n';
          }
          process.stdout.write(out);
        });
      }),
    );
}

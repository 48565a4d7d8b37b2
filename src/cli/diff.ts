import { Command } from 'commander';
import { diffGenerations } from '../read/diff.js';
import { bytes, table } from '../util/format.js';
import { spawnSync } from 'node:child_process';
import { changedFiles, type FileSystemChanges } from '../fuse/changed-files.js';
import { action, onInterrupt, printJson, wantsJson, withRepo } from './common.js';

export function register(program: Command): void {
  program
    .command('diff')
    .description('byte ranges that changed between two generations, from their chunk maps (no data is read)')
    .argument('<a>', 'NAME@REV, the older one')
    .argument('<b>', 'NAME@REV, the newer one (may be of another image)')
    .option('--files', 'also name the files of ext2/3/4 file systems whose blocks changed (mounts both generations privately; needs debugfs)')
    .option('--json', 'print JSON')
    .addHelpText(
      'after',
      '\nA range is listed when the chunks there differ. Chunks cut at other boundaries count as\n' +
        'changed (their bytes are not read), so a range can be slightly wider than the bytes that\n' +
        'really changed; identical map leaves are skipped whole. A changed size counts the grown or\n' +
        'cut part.\n\n' +
        '--files reads the changed ranges of both generations (through a private mount), keeps the\n' +
        'sectors that differ, and maps the blocks of each ext2/3/4 file system (on a partition or\n' +
        'the whole disk) to the files and directories that own them with e2fsprogs\' debugfs:\n' +
        '~ blocks changed in both (modified in place), + only\n' +
        'in B (new, or rewritten elsewhere), - only in A (overwritten elsewhere since). A removed\n' +
        'or renamed file leaves its data as it was: its directory shows as changed. A journal that was\n' +
        'not replayed (an image of a running system) is not applied. Other file systems are listed\n' +
        'with their changed bytes only.\n\n' +
        'Examples:\n' +
        '  genvault diff vm1@1 vm1@latest\n' +
        '  genvault diff vm1@2026-11-20 vm1@2026-11-22 --json\n' +
        '  genvault diff vm1@1 vm1@latest --files',
    )
    .action(
      action(async (aSpec: string, bSpec: string, o: { files?: boolean }, cmd: Command) => {
        await withRepo(cmd, async (repo) => {
          const a = await repo.resolve(aSpec);
          const b = await repo.resolve(bSpec);
          const d = await diffGenerations(repo, a, b);
          let fileSystems: FileSystemChanges[] | undefined;
          if (o.files) {
            // A signal must not leave the private mount behind: detach it lazily on the way out.
            let mounted: string | null = null;
            onInterrupt(() => {
              if (mounted) spawnSync('fusermount', ['-uz', mounted]);
              return null;
            });
            fileSystems = await changedFiles(repo, a, b, d.ranges, (dir) => (mounted = dir));
            onInterrupt(null);
          }
          const ref = (g: typeof a) => ({ name: g.name, id: g.id, created: g.created, size: g.size });
          if (wantsJson(cmd)) {
            printJson({ a: ref(a), b: ref(b), ...d, ...(fileSystems ? { fileSystems } : {}) });
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
          if (fileSystems) out += describeFiles(fileSystems);
          process.stdout.write(out);
        });
      }),
    );
}

/** The --files part of the text output: per file system, its changed files marked ~ + -. */
function describeFiles(list: FileSystemChanges[]): string {
  let out = '';
  for (const f of list) {
    const where = f.partition === null ? 'whole disk' : `partition ${f.partition}`;
    if (!f.fs) {
      out += `\n${where} (at ${f.offset}): ${f.changedBytes ? `${bytes(f.changedBytes)} changed, not an ext2/3/4 file system` : 'unchanged'}\n`;
      continue;
    }
    out += `\n${where} (ext2/3/4 at ${f.offset}): ${f.files.length} changed path${f.files.length === 1 ? '' : 's'}, ${f.metadataBlocks} changed metadata blocks\n`;
    for (const x of f.files) out += `  ${x.in.length === 2 ? '~' : x.in[0] === 'b' ? '+' : '-'} ${x.path}\n`;
  }
  return out;
}

import { Command } from 'commander';
import { repair, type RepairReport } from '../lifecycle/repair.js';
import type { IndexDiff } from '../lifecycle/index-diff.js';
import { bytes, duration } from '../util/format.js';
import { Progress } from '../util/progress.js';
import { action, printJson, localRepoDir, wantsJson } from './common.js';

const HUMAN_LIMIT = 20;

function diffLines(d: IndexDiff): string[] {
  const out: string[] = [];
  for (const [what, k] of Object.entries(d)) {
    if (!k.missing && !k.extra && !k.different) continue;
    out.push(`  ${what}: ${k.missing} missing from the index, ${k.extra} only in the index, ${k.different} different`);
    for (const e of k.examples) out.push(`    ${e}`);
  }
  return out;
}

function indexLines(r: RepairReport): string[] {
  const i = r.index;
  if (i.state === 'missing') return ['index: missing'];
  if (i.state === 'unreadable') return [`index: unreadable (${i.problem})`];
  if (i.agrees) return ['index and packs agree'];
  return ['index and packs differ:', ...diffLines(i.diff)];
}

function printHuman(r: RepairReport): void {
  const out: string[] = [];
  out.push(
    `scanned ${r.packs} pack(s) (${r.packsViaToc} from their tables of contents), ${bytes(r.bytes)}: ${r.chunks} chunks, ${r.leaves} map leaves, ` +
      `${r.generationsFound} generation(s) found, ${r.generationsRestored} restorable; took ${duration(r.durationMs)}`,
  );
  for (const t of r.tornTails) out.push(`torn tail: pack ${t.pack}: ${t.bytes} bytes after its last whole record (${t.problem})`);
  for (const d of r.damagedRecords.slice(0, HUMAN_LIMIT)) out.push(`DAMAGED record: pack ${d.pack} offset ${d.offset}, ${d.length} bytes: ${d.problem}`);
  if (r.damagedRecords.length > HUMAN_LIMIT) out.push(`... and ${r.damagedRecords.length - HUMAN_LIMIT} more damaged records (--json lists them all)`);
  for (const g of r.incomplete) {
    const lost = g.missingChunks || g.missingLeaves ? ` (${bytes(g.missingBytes)} of the image)` : '';
    out.push(`NOT WHOLE: ${g.name}@${g.id}${g.created ? ` (${g.created})` : ''}: ${g.problem}${lost}`);
  }
  out.push(...indexLines(r));
  if (!r.write) {
    const agrees = r.index.state === 'readable' && r.index.agrees;
    out.push(agrees ? 'nothing to do' : "dry run: nothing changed; 'genvault repair --write' rebuilds the index from the packs");
  } else {
    out.push(`rebuilt the index from the packs${r.oldIndex ? `; the old index is kept as ${r.oldIndex}` : ''}`);
  }
  process.stdout.write(out.join('\n') + '\n');
}

export function register(program: Command): void {
  program
    .command('repair')
    .description('rebuild the index from the packs (format 4); without --write, only report what it would do')
    .option('--write', 'build a new index beside the old one and swap it in')
    .option('--read-all-packs', 'read every record header, also in packs that have tables of contents')
    .option('--json', 'print the report as JSON')
    .addHelpText(
      'after',
      '\nEvery pack is read: from its tables of contents when it ends in one (format 5), else\n' +
        'header by header from start to end (--read-all-packs: always). Its chunk records, map\n' +
        'leaves, generation maps, generation records and changes say what the index should\n' +
        'hold. The report names torn\n' +
        'pack tails, damaged records, generations that cannot be restored whole (a map leaf or\n' +
        'chunk they need is in no pack), and how the index in place differs from the packs\n' +
        '("index and packs agree" when it does not).\n\n' +
        'By default nothing is changed (the model of the packs is built in\n' +
        'index.repair-PID-RANDOM/ beside index/ and removed). --write builds the new index there,\n' +
        'then renames index/ to index.broken-TIME/ and the new one to index/. Packs are only\n' +
        'read. Killed, it leaves the old index (or none) and runs again from the start. It\n' +
        'needs the repository to itself: it refuses while a backup, gc or any command that has\n' +
        'the index open runs. Job history and damage marks live only in the index: look for\n' +
        'them in the kept index.broken-TIME/.\n\n' +
        'Exit codes: 0 done (or nothing to do), 1 error, or some generation cannot be restored\n' +
        'whole (with --write the rebuilt index is in place all the same), 2 usage.\n\n' +
        'Examples:\n  genvault repair            # what would be rebuilt\n  genvault repair --write    # rebuild index/ from the packs',
    )
    .action(
      action(async (o: { write?: boolean; readAllPacks?: boolean }, cmd: Command) => {
        const progress = new Progress(o.write ? 'repair' : 'repair (dry run)');
        let report: RepairReport;
        try {
          report = await repair(await localRepoDir(cmd), { write: o.write === true, readAll: o.readAllPacks === true, progress: (d, t) => progress.update(d, t) });
        } finally {
          progress.done();
        }
        if (wantsJson(cmd)) printJson(report);
        else printHuman(report);
        if (report.incomplete.length) {
          const names = report.incomplete.map((g) => `${g.name}@${g.id}`);
          process.stderr.write(`genvault: ${names.length} generation(s) cannot be restored whole: ${names.slice(0, 10).join(', ')}${names.length > 10 ? ', ...' : ''}\n`);
          process.exitCode = 1;
        }
      }),
    );
}

import { remoteRepo, withRemote } from './remote.js';
import { Command, Option } from 'commander';
import { Repository } from '../repository/repository.js';
import { VerifyReport, verify } from '../lifecycle/verify.js';
import { bytes, duration } from '../util/format.js';
import { GenvaultError, REPAIR_HINT, UsageError } from '../util/errors.js';
import { Progress } from '../util/progress.js';
import { verifyBucketChunks } from '../util/testhooks.js';
import { OPEN_FILES_FOR_PASSES, limitIndexOpenFiles } from '../index/db.js';
import { action, errorLine, localRepoDir, openRepository, printJson, wantsJson } from './common.js';
import { percentArg } from './options.js';

/** verify's exit codes: 0 clean, 1 damage found, 2 could not run. */
function couldNotRun(e: unknown): GenvaultError {
  if (e instanceof GenvaultError) return e.exitCode === 2 ? e : new GenvaultError(e.message, e.code, 2);
  return new GenvaultError(`verify could not run: ${errorLine(e)}`, 'VERIFY', 2);
}

const HUMAN_LIMIT = 20;

function rangeText(r: { offset: number; length: number }): string {
  return `${r.offset}-${r.offset + r.length - 1}`;
}

function printHuman(r: VerifyReport): void {
  const out: string[] = [];
  out.push(
    `checked ${r.generations} generation(s) of ${r.images} image(s): ${r.leaves} map leaves, ${r.chunks} chunks in ${r.packs} pack(s)`,
  );
  const how =
    r.mode === 'index'
      ? `record headers checked for ${r.headersChecked} chunks (use --full or --sample to re-hash chunk data)`
      : `${r.chunksRead} chunks read and re-hashed (${bytes(r.bytesRead)}${r.mode === 'sample' ? `, a random ${r.samplePercent}%` : ''})` +
        (r.headersChecked ? `, record headers checked for the other ${r.headersChecked}` : '');
  out.push(`  ${how}; took ${duration(r.durationMs)}`);
  for (const p of r.indexProblems) out.push(`DAMAGED index: ${p}`);
  for (const p of r.damagedPacks) out.push(`DAMAGED pack ${p.pack}: ${p.problem}`);
  for (const l of r.damagedLeaves) out.push(`DAMAGED map leaf ${l.digest}: ${l.problem}`);
  for (const c of r.damagedChunks.slice(0, HUMAN_LIMIT)) {
    out.push(`DAMAGED chunk ${c.digest}: ${c.problem}${c.pack ? ` (pack ${c.pack}, offset ${c.packOffset})` : ''}`);
    for (const a of c.affects) {
      const more = a.moreRanges ? ` and ${a.moreRanges} more` : '';
      out.push(`    used by ${a.name}@${a.id} at image bytes ${a.ranges.map(rangeText).join(', ')}${more}`);
    }
  }
  if (r.damagedChunks.length > HUMAN_LIMIT) out.push(`... and ${r.damagedChunks.length - HUMAN_LIMIT} more damaged chunks (--json lists them all)`);
  for (const g of r.damagedGenerations) {
    const where = g.whole
      ? 'unreadable'
      : `${g.ranges.slice(0, 8).map(rangeText).join(', ')}${g.ranges.length > 8 ? ` and ${g.ranges.length - 8} more ranges` : ''} ` +
        `(${bytes(g.ranges.reduce((a, x) => a + x.length, 0))})`;
    out.push(`DAMAGED generation ${g.name}@${g.id}${g.created ? ` (${g.created})` : ''}: ${g.problems.join('; ')}; image bytes ${where}`);
  }
  for (const w of r.warnings) out.push(`warning: ${w}`);
  out.push(r.ok ? 'no damage found' : summary(r));
  process.stdout.write(out.join('\n') + '\n');
}

function summary(r: VerifyReport): string {
  const gens = r.damagedGenerations.map((g) => `${g.name}@${g.id}`);
  const parts = [
    r.damagedChunks.length && `${r.damagedChunks.length} damaged chunk(s)`,
    r.damagedLeaves.length && `${r.damagedLeaves.length} damaged map leaf/leaves`,
    r.damagedPacks.length && `${r.damagedPacks.length} damaged pack(s)`,
    r.indexProblems.length && `index damaged (${r.indexProblems.length} problem(s))`,
  ].filter(Boolean);
  return (
    `damage found: ${parts.join(', ') || 'damaged generation records'}; ` +
    `${gens.length} generation(s) affected${gens.length ? `: ${gens.slice(0, 10).join(', ')}${gens.length > 10 ? ', ...' : ''}` : ''}` +
    // Leaves and index-wide problems are the index's: the packs still hold good copies.
    (r.indexProblems.length || r.damagedLeaves.length ? ` (${REPAIR_HINT})` : '')
  );
}

/**
 * verify on an ssh:// repository: the server reads, decompresses and checks every chunk of
 * the session's generations (its namespace), as --full does for them; the repository-wide
 * checks (packs, index) stay with the server's admin.
 */
async function verifyRemote(cmd: Command, o: { sample?: number; withoutKey?: boolean }): Promise<void> {
  if (o.sample !== undefined || o.withoutKey) throw new UsageError('--sample and --without-key need a local repository; on an ssh:// repository verify reads every chunk of your generations');
  type Report = { generations: Array<{ generation: { name: string; id: string; size: number }; damaged: Array<{ offset: number; length: number }> }> };
  let report: Report;
  try {
    report = await withRemote(cmd, (r) => r.call<Report>('verify'));
  } catch (e) {
    throw couldNotRun(e);
  }
  const bad = report.generations.filter((g) => g.damaged.length);
  if (wantsJson(cmd)) printJson({ ok: !bad.length, ...report });
  else {
    const total = report.generations.reduce((n, g) => n + g.generation.size, 0);
    process.stdout.write(`${report.generations.length} generation(s), ${bytes(total)}: every chunk read and checked on the server\n`);
    for (const g of bad) {
      for (const r of g.damaged) process.stdout.write(`  damaged: ${g.generation.name}@${g.generation.id} bytes ${r.offset}-${r.offset + r.length - 1}\n`);
    }
  }
  if (bad.length) {
    process.stderr.write(`genvault: damage found: ${bad.length} generation(s) affected: ${bad.map((g) => `${g.generation.name}@${g.generation.id}`).join(', ')}\n`);
    process.exitCode = 1;
  }
}

export function register(program: Command): void {
  program
    .command('verify')
    .description('check the repository: generations, maps, chunk index and pack records; --full also re-hashes all chunk data')
    .option('--full', 'read, decompress and re-hash every chunk that any generation uses')
    .addOption(new Option('--sample <percent>', 'read, decompress and re-hash a random PERCENT of the chunks (e.g. 5), checking the rest by their headers').argParser(percentArg()))
    .option('--without-key', 'an encrypted repository without its key: record headers, maps and the index only')
    .option('--json', 'print the report as JSON (for monitoring)')
    .addHelpText(
      'after',
      '\nWithout --full or --sample: every generation record, map and map leaf is decoded and\n' +
        'checked against its digest; every chunk used must be in the index, its pack present and\n' +
        'long enough, and the record header at its offset intact and matching the index.\n' +
        'Damage is reported with the generations and image byte ranges it affects.\n\n' +
        'Exit codes: 0 no damage, 1 damage found, 2 verify could not run.\n\n' +
        'Examples:\n  genvault verify --sample 5      # daily: a different 5% of the data each run\n  genvault verify --full --json   # weekly, for monitoring',
    )
    .action(
      action(async (o: { full?: boolean; sample?: number; withoutKey?: boolean }, cmd: Command) => {
        if (remoteRepo(cmd)) return verifyRemote(cmd, o);
        if (o.withoutKey && (o.full || o.sample !== undefined)) throw new UsageError('--without-key checks structure only: --full and --sample need the key');
        const samplePercent = o.sample;
        if (samplePercent !== undefined && o.full) throw new UsageError('use either --full or --sample, not both');
        let report: VerifyReport;
        let repo: Repository;
        // verify looks up every referenced chunk: every index table it touches would stay
        // memory-mapped, and in its RSS, for as long as LevelDB's table cache keeps it.
        limitIndexOpenFiles(OPEN_FILES_FOR_PASSES);
        try {
          repo = await openRepository(await localRepoDir(cmd), { withoutKey: o.withoutKey === true });
        } catch (e) {
          throw couldNotRun(e);
        }
        // One bar per phase (packs, map leaves, chunks), on a terminal only.
        let progress: Progress | null = null;
        let phase = '';
        try {
          report = await verify(repo, {
            full: o.full,
            samplePercent,
            bucketChunks: verifyBucketChunks(),
            onProgress: (p, d, t) => {
              if (p !== phase) {
                progress?.done();
                progress = new Progress(`verify ${p}`);
                phase = p;
              }
              progress!.update(d, t);
            },
          });
        } catch (e) {
          throw couldNotRun(e);
        } finally {
          (progress as Progress | null)?.done();
          await repo.close().catch(() => undefined);
        }
        if (wantsJson(cmd)) printJson(report);
        else printHuman(report);
        if (!report.ok) {
          process.stderr.write(`genvault: ${summary(report)}\n`);
          process.exitCode = 1;
        }
      }),
    );
}

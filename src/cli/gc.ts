import { Command, Option } from 'commander';
import { GcResult, OBJECT_STORE_GRACE_MS, gc } from '../lifecycle/gc.js';
import { OPEN_FILES_FOR_PASSES, limitIndexOpenFiles } from '../index/db.js';
import { bytes, duration } from '../util/format.js';
import { action, printJson, wantsJson, withRepo } from './common.js';
import { durationArg, percentArg } from './options.js';

/** One status line on stderr, on a terminal only, redrawn at most 5 times a second. */
class StatusLine {
  private last = 0;
  private drawn = false;
  private lastPhase = '';
  readonly enabled = process.stderr.isTTY === true && !process.env.GENVAULT_NO_PROGRESS;

  show(line: string): void {
    if (!this.enabled) return;
    const now = Date.now();
    const phase = line.split(':').slice(0, 2).join(':');
    if (phase === this.lastPhase && now - this.last < 200) return;
    this.lastPhase = phase;
    this.last = now;
    const width = process.stderr.columns || 100;
    process.stderr.write(`\r\x1b[K${line.slice(0, width - 1)}`);
    this.drawn = true;
  }

  done(): void {
    if (this.drawn) process.stderr.write('\r\x1b[K');
    this.drawn = false;
  }
}

function plural(n: number, one: string, many = `${one}s`): string {
  return `${n} ${n === 1 ? one : many}`;
}

function human(r: GcResult): string {
  const out: string[] = [];
  out.push(
    `${r.generations} generation(s) use ${plural(r.referencedChunks, 'chunk')} and ${plural(r.referencedLeaves, 'map leaf', 'map leaves')}`,
  );
  if (r.recovered.condemned || r.recovered.leaves) {
    out.push(
      `finished an interrupted gc: ${plural(r.recovered.condemned, 'condemned chunk')} resolved, ` +
        `${plural(r.recovered.chunks, 'index entry', 'index entries')} and ${plural(r.recovered.leaves, 'map leaf', 'map leaves')} put back`,
    );
  }
  if (r.waitedFor) out.push(`waited for ${plural(r.waitedFor, 'running backup')}`);
  if (r.packsTooYoung) out.push(`kept ${plural(r.packsTooYoung, 'pack')} written within the grace period whole`);
  if (r.uploadsAborted || r.spoolsRemoved) out.push(`cleaned up after killed writers: ${plural(r.uploadsAborted, 'unfinished upload')} aborted, ${plural(r.spoolsRemoved, 'spool file')} removed`);
  out.push(
    `${r.dryRun ? 'would remove' : 'removed'} ${plural(r.chunksRemoved, 'unreferenced chunk')} (${bytes(r.chunkBytesRemoved)} stored) ` +
      `and ${plural(r.leavesRemoved, 'map leaf', 'map leaves')}`,
  );
  if (r.chunksSpared) out.push(`kept ${plural(r.chunksSpared, 'chunk')} that backups committed meanwhile use again`);
  if (r.chunksDeferred) out.push(`kept ${plural(r.chunksDeferred, 'unreferenced chunk')} a concurrent backup commit made unsafe to remove now; the next gc removes them`);
  if (r.leavesDeferred) out.push(`kept ${plural(r.leavesDeferred, 'unreferenced map leaf', 'unreferenced map leaves')} while backups were running; the next gc removes them`);
  const packs = [
    `${r.packsDeleted} ${r.dryRun ? 'to delete' : 'deleted'}`,
    `${r.packsRepacked} ${r.dryRun ? 'to rewrite' : 'rewritten'}` + (r.packsRepacked ? ` (${bytes(r.bytesCopied)} of live data copied into ${plural(r.packsWritten, 'new pack')})` : ''),
  ];
  out.push(`packs: ${packs.join(', ')}`);
  if (r.metadataKept || r.metadataDropped) {
    out.push(
      `metadata records in those packs: ${r.metadataKept} ${r.dryRun ? 'to keep' : 'kept'} (copied into the new packs), ` +
        `${r.metadataDropped} ${r.dryRun ? 'to drop' : 'dropped'} (nothing needs them any more)`,
    );
  }
  for (const w of r.warnings) out.push(`warning: ${w}`);
  if (r.dryRun) out.push(`would free about ${bytes(r.bytesFreed)}; nothing changed (dry run)`);
  else out.push(`freed ${bytes(r.bytesFreed)} in ${duration(r.durationMs)}`);
  return out.join('\n') + '\n';
}

export function register(program: Command): void {
  program
    .command('gc')
    .description('reclaim the space of chunks and map leaves no generation uses; rewrite packs that are mostly unused')
    .option('-n, --dry-run', 'only report what would be removed and how much space that frees')
    .addOption(
      new Option('--repack-threshold <percent>', 'rewrite packs whose live data is under this percentage (0 never rewrites; 100 rewrites any pack with unused data)')
        .argParser(percentArg(true))
        .default(50),
    )
    .addOption(new Option('--grace <duration>', 's3:// repositories: keep packs written less than this long ago whole (by the object store\'s clock)').argParser(durationArg).default(OBJECT_STORE_GRACE_MS, '1h'))
    .option('--json', 'print the result as JSON')
    .addHelpText(
      'after',
      '\nRuns while backups and mounts run: chunks gc is about to remove are not reused by\n' +
        'backups that start meanwhile (they store fresh copies), and gc waits for backups\n' +
        'that were already running before it removes anything. One gc at a time.\n' +
        'On an s3:// repository gc runs only while no other command holds it (on any host),\n' +
        'aborts the uploads of killed backups, and keeps packs younger than --grace whole.\n\n' +
        'Examples:\n' +
        '  genvault prune --keep-daily 7 && genvault gc\n' +
        '  genvault gc --dry-run\n' +
        '  genvault gc --repack-threshold 80 --json',
    )
    .action(
      action(async (o: { dryRun?: boolean; repackThreshold: number; grace: number }, cmd: Command) => {
        const repackThreshold = o.repackThreshold;
        const status = new StatusLine();
        // gc passes over the whole index several times: every table it touches would stay
        // memory-mapped, and in its RSS, for as long as LevelDB's table cache keeps it.
        limitIndexOpenFiles(OPEN_FILES_FOR_PASSES);
        await withRepo(cmd, async (repo) => {
          let r: GcResult;
          try {
            r = await gc(repo, { dryRun: o.dryRun === true, repackThreshold, graceMs: o.grace, onProgress: (l) => status.show(l) });
          } finally {
            status.done();
          }
          if (wantsJson(cmd)) printJson(r);
          else process.stdout.write(human(r));
        }, { write: true, exclusive: true }); // an object store: no other command may run (store-locks.ts)
      }),
    );
}

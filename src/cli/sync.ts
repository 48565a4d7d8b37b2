import { Command, Option } from 'commander';
import fs from 'node:fs/promises';
import path from 'node:path';
import { sync, type SyncResult } from '../sync/sync.js';
import { LocalSource } from '../sync/local-source.js';
import { LocalDestination } from '../sync/local-destination.js';
import type { RetentionRules } from '../lifecycle/retention.js';
import { checkImageName } from '../format/config.js';
import { bytes, duration } from '../util/format.js';
import { Progress } from '../util/progress.js';
import { UsageError } from '../util/errors.js';
import { action, onInterrupt, printJson, repoDirOf, wantsJson } from './common.js';
import { keepOptions, keepRules, type KeepFlags } from './prune.js';
import { rateArg } from './options.js';
import { remoteOptions } from './remote.js';
import { isRemoteRepo } from '../remote/client.js';
import { RemoteDestination, RemoteSource } from '../remote/sync-client.js';
import type { SyncDestination, SyncSource } from '../sync/endpoint.js';

interface SyncFlags extends KeepFlags {
  dryRun?: boolean;
  wait?: boolean;
  limitRate?: number;
}

/**
 * Where an end is: ssh:// as given, a local directory, or an s3:// repository's cache
 * directory (resolved once: the same-repository check and the opening use it).
 */
async function endOf(arg: string, cmd: Command): Promise<{ arg: string; at: string }> {
  return { arg, at: isRemoteRepo(arg) ? arg : await repoDirOf(arg, cmd) };
}

/** SRC: a local directory, s3://, or ssh:// (a `genvault serve` with --permissions full and no namespace). */
function openSource(src: { at: string }, cmd: Command): Promise<SyncSource> {
  return isRemoteRepo(src.at) ? RemoteSource.open(src.at, remoteOptions(cmd)) : LocalSource.open(src.at);
}

function openDestination(dst: { arg: string; at: string }, o: SyncFlags, cmd: Command): Promise<SyncDestination> {
  const limitRate = o.limitRate;
  if (isRemoteRepo(dst.at)) return RemoteDestination.open(dst.at, { ...remoteOptions(cmd, { limitRate }), wait: o.wait });
  if (limitRate !== undefined && !dst.arg.startsWith('s3://')) throw new UsageError('--limit-rate applies to an ssh:// or s3:// destination');
  // GENVAULT_SYNC_FLUSH_ENTRIES: a test hook (many small flushes, for the kill tests).
  const flushEntries = Number(process.env.GENVAULT_SYNC_FLUSH_ENTRIES) || undefined;
  return LocalDestination.open(dst.at, { wait: o.wait, flushEntries, dryRun: o.dryRun, limitRate });
}

/** A directory's real path (as given when it does not exist: opening it then says so). */
async function realpath(dir: string): Promise<string> {
  return fs.realpath(dir).catch(() => path.resolve(dir));
}

/** The rules given, or null when no --keep-* option is. */
function rulesOf(o: SyncFlags): RetentionRules | null {
  const r = keepRules(o);
  const any = Object.entries(r).some(([k, v]) => (k === 'keepTags' ? (v as string[]).length > 0 : v !== undefined));
  return any ? r : null;
}

function plural(n: number, one: string, many = `${one}s`): string {
  return `${n} ${n === 1 ? one : many}`;
}

function summary(r: SyncResult, ms: number): string {
  const parts = [
    `${r.dryRun ? 'would copy' : 'copied'} ${plural(r.copied.length, 'generation')}`,
    `${r.skipped} already there`,
  ];
  if (r.updated) parts.push(`${r.updated} with tags or protection ${r.dryRun ? 'to update' : 'updated'}`);
  if (r.notKept) parts.push(`${r.notKept} not copied (the --keep rules would remove them)`);
  if (r.vanished) parts.push(`${r.vanished} forgotten at the source meanwhile`);
  if (!r.dryRun) parts.push(`${plural(r.chunks, 'chunk')} and ${plural(r.leaves, 'map leaf', 'map leaves')} sent (${bytes(r.bytesSent)}), ${bytes(r.storedAdded)} stored, in ${duration(ms)}`);
  if (r.pruned.length) parts.push(`${r.dryRun ? 'would prune' : 'pruned'} ${r.pruned.length} at the destination`);
  return `${parts.join(', ')}${r.dryRun ? ' (dry run: nothing changed)' : ''}\n`;
}

export function register(program: Command): void {
  keepOptions(
    program
      .command('sync')
      .description('copy generations (all images, or the named ones) from repository SRC to repository DST, sending only what DST lacks')
      .argument('<src>', 'the repository to copy from (a directory, s3://BUCKET/PREFIX or ssh://user@host/path; read only)')
      .argument('<dst>', 'the repository to copy to (a directory, s3://BUCKET/PREFIX or ssh://user@host/path, made with `genvault -r DST init --like SRC`)')
      .argument('[names...]', 'images to copy (default: all)'),
  )
    .option('-n, --dry-run', 'only say which generations would be copied, updated and pruned')
    .option('--wait', 'wait for a running backup or sync of an image at DST instead of failing')
    .addOption(new Option('--limit-rate <rate>', 'an ssh:// or s3:// DST: send at most RATE bytes per second (e.g. 20M)').argParser(rateArg))
    .option('--json', 'print a summary as JSON')
    .addHelpText(
      'after',
      '\nStored records are copied as they are (not decompressed, re-chunked or re-sealed), each\n' +
        'checked first; a generation appears at DST only once everything it references is\n' +
        'durable there. Killed at any moment, run it again: it copies what is missing.\n' +
        'Generations DST has already (same id) are skipped; their tags and protection are\n' +
        'brought up to SRC\'s. With --keep-* rules, generations they would remove at once are\n' +
        'not copied, and DST is pruned afterwards as by `genvault prune` (space: `genvault gc`).\n' +
        'SRC and DST must chunk alike and, encrypted, share their keys: make DST with\n' +
        '`genvault -r DST init --like SRC`. DST\'s key: --key-file, $GENVAULT_PASSWORD_FILE or a\n' +
        'prompt; SRC is read without its key. An ssh:// end is a `genvault serve` with\n' +
        '--permissions full and no namespace (the repository admin\'s key): it checks every record\n' +
        'with its own key; the global --repo-identity, --repo-known-hosts, --repo-ssh-command and\n' +
        '--remote-command options apply to it.\n\n' +
        'Examples:\n' +
        '  genvault -r /mnt/offsite/gv init --like /srv/genvault\n' +
        '  genvault sync /srv/genvault /mnt/offsite/gv\n' +
        '  genvault sync /srv/genvault /mnt/offsite/gv vm1 --keep-daily 14 --keep-monthly 6\n' +
        '  genvault sync /srv/genvault ssh://backup@offsite/srv/gv --limit-rate 20M',
    )
    .action(
      action(async (srcDir: string, dstDir: string, names: string[], o: SyncFlags, cmd: Command) => {
        for (const n of names) checkImageName(n);
        const rules = rulesOf(o);
        const minAgeMs = o.minAge;
        const started = Date.now();
        const srcEnd = await endOf(srcDir, cmd);
        const dstEnd = await endOf(dstDir, cmd);
        if (!isRemoteRepo(srcDir) && !isRemoteRepo(dstDir) && (await realpath(srcEnd.at)) === (await realpath(dstEnd.at))) {
          throw new UsageError(`${srcDir} and ${dstDir} are the same repository`);
        }
        const src = await openSource(srcEnd, cmd);
        try {
          const dst = await openDestination(dstEnd, o, cmd);
          const progress = new Progress('sync');
          // A signal ends the sync at once; what it committed stays, the rest is trimmed by the next writer.
          onInterrupt(() => `sync to ${dstDir} interrupted; generations already committed there stay, a rerun copies the rest`);
          try {
            const r = await sync(src, dst, { names, rules, minAgeMs, dryRun: o.dryRun, onProgress: (d, t) => progress.update(d, t) });
            progress.done();
            if (wantsJson(cmd)) printJson({ source: src.description, destination: dst.description, ...r, durationMs: Date.now() - started });
            else process.stdout.write(summary(r, Date.now() - started));
          } finally {
            progress.done();
            await dst.close().catch(() => undefined);
          }
        } finally {
          await src.close().catch(() => undefined);
        }
      }),
    );
}

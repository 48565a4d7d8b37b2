import { Command } from 'commander';
import { upgrade } from '../lifecycle/upgrade.js';
import { action, printJson, wantsJson, withWritableRepo } from './common.js';

export function register(program: Command): void {
  program
    .command('upgrade')
    .description('bring a repository to the current format version (5: packs hold all metadata, so `repair` can rebuild the index; 7 for an encrypted one: its index sealed)')
    .option('--json', 'print what was done as JSON')
    .addHelpText(
      'after',
      '\nVersion 4 writes map leaves, generation maps and generation records into packs as well as\n' +
        'into the index, so a lost or damaged index can be rebuilt with `genvault repair`.\n' +
        'upgrade writes them for everything already stored, then changes config.json. It waits\n' +
        'for protect/forget/prune to finish, refuses while backups or gc run, and can be run\n' +
        'again at any time (killed, it leaves a working repository). Genvault versions that only\n' +
        'know format 3 refuse a version 4 repository.\n\n' +
        'An encrypted repository of format 6 becomes format 7: image and job names in the index\n' +
        'are replaced by keyed tags, generation records and job runs are sealed (nothing is\n' +
        'written into packs; it needs the key and no running writer; restart mounts after it).\n\nExample:\n  genvault -r /srv/backup upgrade',
    )
    .action(
      action(async (_o: unknown, cmd: Command) => {
        await withWritableRepo(cmd, async (repo) => {
          const tty = process.stderr.isTTY;
          const r = await upgrade(repo, { progress: tty ? (l) => process.stderr.write(`${l}\n`) : undefined });
          if (wantsJson(cmd)) printJson(r);
          else if (r.from === r.to && r.leaves + r.generations + (r.sealed ?? 0) === 0) process.stdout.write(`${repo.dir} is already at format version ${r.to}\n`);
          else if (r.sealed !== undefined) process.stdout.write(`${repo.dir}: format version ${r.from} -> ${r.to}: sealed ${r.sealed} generation records in the index\n`);
          else process.stdout.write(`${repo.dir}: format version ${r.from} -> ${r.to}: wrote ${r.leaves} map leaves and ${r.generations} generations into packs\n`);
        });
      }),
    );
}

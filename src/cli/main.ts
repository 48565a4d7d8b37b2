#!/usr/bin/env node
/** genvault command line: parses and prints; the work happens in src/repo, src/fuse, src/source. */
import { Command, CommanderError } from 'commander';
import { createRequire } from 'node:module';
import { fail } from './common.js';
import { register as init } from './init.js';
import { register as backup } from './backup.js';
import { register as list } from './list.js';
import { register as info } from './info.js';
import { register as restore } from './restore.js';
import { register as mount } from './mount.js';
import { register as verify } from './verify.js';
import { register as protect } from './protect.js';
import { register as forget } from './forget.js';
import { register as prune } from './prune.js';
import { register as gc } from './gc.js';
import { register as run } from './run.js';
import { register as daemon } from './daemon.js';
import { register as status } from './status.js';

const pkg = createRequire(import.meta.url)('../../package.json') as { version: string };

const program = new Command();
program
  .name('genvault')
  .description('Deduplicated backups of disk images; every generation mountable as a read-only file.')
  .version(pkg.version)
  .option('-r, --repo <dir>', 'repository directory (default: $GENVAULT_REPO)')
  .showHelpAfterError('(run with --help for usage)')
  .addHelpText(
    'after',
    '\nRevisions (NAME@REV): latest, N (0 = newest), a generation id or unique prefix,\n' +
      'or an ISO date/time (the newest generation at or before it).\n' +
      'Exit codes: 0 ok, 1 error, 2 usage.',
  )
  .exitOverride();

for (const reg of [init, backup, list, info, restore, mount, verify, protect, forget, prune, gc, run, daemon, status]) reg(program);

process.stdout.on('error', (e: NodeJS.ErrnoException) => {
  if (e.code === 'EPIPE') process.exit(0);
});

try {
  await program.parseAsync(process.argv);
} catch (e) {
  if (e instanceof CommanderError) {
    if (e.code === 'commander.helpDisplayed' || e.code === 'commander.version' || e.code === 'commander.help') process.exit(0);
    process.exit(2);
  }
  fail(e);
}

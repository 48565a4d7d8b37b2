#!/usr/bin/env -S node --max-semi-space-size=4
/** genvault command line: parses and prints; the work happens in src/repo, src/fuse, src/source. */
// The V8 flag on the line above caps each young-generation half at 4 MiB (V8 grows it to
// 16 MiB under a restore's allocation rate, and every new page costs ~13 us in this VM):
// faster restores with less memory, measured in native-notes/performance.md ("V8's young
// generation"). `env -S` splits the line (GNU coreutils 8.30+); `node dist/cli/main.js`
// runs without the flag.
import { Command, CommanderError } from 'commander';
import { createRequire } from 'node:module';
import { fail } from './common.js';
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

// Each command's module is imported only when that command runs: ssh2, fuse-native, yaml
// and cron-parser cost ~0.1 s of start-up together, paid by every cron-run `backup`.
// Help, unknown commands and anything not recognised load them all, so commander's
// listing and suggestions are unchanged.
type Registrar = { register: (p: Command) => void };
const commands: Record<string, () => Promise<Registrar>> = {
  init: () => import('./init.js'),
  backup: () => import('./backup.js'),
  list: () => import('./list.js'),
  info: () => import('./info.js'),
  restore: () => import('./restore.js'),
  mount: () => import('./mount.js'),
  verify: () => import('./verify.js'),
  protect: () => import('./protect.js'),
  forget: () => import('./forget.js'),
  prune: () => import('./prune.js'),
  gc: () => import('./gc.js'),
  run: () => import('./run.js'),
  daemon: () => import('./daemon.js'),
  status: () => import('./status.js'),
};
// Commands and aliases registered by another command's module.
for (const [name, home] of [['ls', 'list'], ['cat', 'restore'], ['umount', 'mount'], ['unmount', 'mount'], ['unprotect', 'protect']] as const)
  commands[name] = commands[home]!;

/** The command named on the command line, skipping the global -r/--repo option and its value. */
function namedCommand(argv: string[]): string | undefined {
  for (let i = 2; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '-r' || a === '--repo') i++;
    else if (!a.startsWith('-')) return Object.hasOwn(commands, a) ? a : undefined;
  }
  return undefined;
}

const named = namedCommand(process.argv);
for (const load of named ? [commands[named]!] : new Set(Object.values(commands))) (await load()).register(program);

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

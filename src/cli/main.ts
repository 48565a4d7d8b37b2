#!/usr/bin/env -S node --max-semi-space-size=1
/** genvault command line: parses and prints; the work happens in the layers below (README: Architecture). */
// The V8 flag on the line above caps each young-generation half at 1 MiB. Left alone, V8
// grows it under a restore's or a backup's allocation rate and commits far more than is
// live, and fresh pages are expensive in a VM. On Node.js 24 the cap of 1 MiB costs no CPU
// and saves tens of MiB in backups, restores and the mount's server (Node.js 20 did best
// with 4): native-notes/performance.md, "V8's young generation" and "Node.js 24".
// `env -S` splits the line (GNU coreutils 8.30+); `node dist/cli/main.js` runs without the
// flag. scripts/install's wrapper passes the same flag.
import { Command, CommanderError } from 'commander';
import { setCommandName } from '../util/proc.js';
import { createRequire } from 'node:module';
import { allowedExitCodes, errorExitCode, exitOnSignals, fail, useMonitoringExitCodes } from './common.js';
import { useKeyFile } from '../repository/keys.js';
import { describeFsError, noteOfIndexFailure, reportIndexFailureInErrorLine } from '../util/errors.js';
const pkg = createRequire(import.meta.url)('../../package.json') as { version: string };

const program = new Command();
program
  .name('genvault')
  .description('Deduplicated backups of disk images; every generation mountable as a read-only file.')
  .version(pkg.version, '-V, --version', 'print the version (`genvault version --json` for more)')
  .option('-r, --repo <dir>', 'repository: a directory, ssh://[USER@]HOST[:PORT]/PATH or s3://BUCKET/PREFIX (default: $GENVAULT_REPO)')
  .option('--s3-endpoint <url>', 's3:// repositories: the S3 endpoint, e.g. http://rgw.example:7480 (default: $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, the profile\'s endpoint_url, else AWS)')
  .option('--s3-region <region>', 's3:// repositories: the region to sign for (default: $AWS_REGION, the profile\'s, else us-east-1)')
  .option('--cache-dir <dir>', 's3:// repositories: where the local index cache and locks live (default: $GENVAULT_CACHE_DIR, else /var/cache/genvault as root)')
  .option('--key-file <file>', 'an encrypted repository\'s key file (else $GENVAULT_PASSWORD_FILE, else a prompt)')
  .option('--repo-identity <file>', 'ssh:// repositories: private key file (default: ssh-agent, then ~/.ssh/id_*)')
  .option('--repo-known-hosts <file>', 'ssh:// repositories: known hosts file (default ~/.ssh/known_hosts)')
  .option('--repo-ssh-command <cmd>', 'ssh:// repositories: run this OpenSSH client (e.g. ssh) instead of the built-in one')
  .option('--remote-command <cmd>', 'ssh:// repositories: genvault on the server (default: genvault, or $GENVAULT_REMOTE_COMMAND); a forced command overrides it')
  .addHelpText(
    'after',
    '\nRepositories: a directory, or ssh://[user@]host[:port]/path served by `genvault serve` there.\n' +
      'Revisions (NAME@REV): latest, N (0 = newest), a generation id or unique prefix,\n' +
      'or an ISO date/time (the newest generation at or before it).\n' +
      'Exit codes: 0 ok, 1 error, 2 usage.',
  )
  // An argument too many is an error, not silently ignored (`restore a b c`).
  .allowExcessArguments(false)
  .exitOverride()
  .hook('preAction', (_root, action) => {
    useKeyFile((action.optsWithGlobals() as { keyFile?: string }).keyFile);
    const words: string[] = [];
    for (let c: Command | null = action; c?.parent; c = c.parent) words.unshift(c.name());
    setCommandName(['genvault', ...words].join(' '));
  });

// Each command's module is imported only when that command runs: ssh2, fuse-native, yaml
// and cron-parser are a visible part of start-up, paid by every cron-run `backup`
// (performance.md, "Figures behind code comments").
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
  upgrade: () => import('./upgrade.js'),
  repair: () => import('./repair.js'),
  key: () => import('./key.js'),
  version: () => import('./version.js'),
  stats: () => import('./stats.js'),
  diff: () => import('./diff.js'),
  notify: () => import('./notify.js'),
  nbd: () => import('./nbd.js'),
  serve: () => import('./serve.js'),
  sync: () => import('./sync.js'),
};
// Commands and aliases registered by another command's module.
for (const [name, home] of [['ls', 'list'], ['cat', 'restore'], ['umount', 'mount'], ['unmount', 'mount'], ['unprotect', 'protect']] as const)
  commands[name] = commands[home]!;

/** The command named on the command line, skipping the global -r/--repo option and its value. */
function namedCommand(argv: string[]): string | undefined {
  for (let i = 2; i < argv.length; i++) {
    const a = argv[i]!;
    if (['-r', '--repo', '--key-file', '--repo-identity', '--repo-known-hosts', '--repo-ssh-command', '--remote-command'].includes(a)) i++;
    else if (!a.startsWith('-')) return Object.hasOwn(commands, a) ? a : undefined;
  }
  return undefined;
}

const named = namedCommand(process.argv);

// Commander's own errors (an unknown option or command, a missing argument) are one line
// like every other error: "genvault: WHAT (HINT)". Under `status` the UNKNOWN line on
// stdout (written below) is the only one: monitoring reads stdout.
program.configureOutput({
  outputError: (str, write) => {
    if (named === 'status') return;
    const [first, ...rest] = str.trim().replace(/^error: /, '').split('\n');
    const hint = rest.map((l) => l.replace(/^\((.*)\)$/, '$1')).join('; ');
    write(`genvault: ${first}${hint ? ` (${hint})` : ''} (see: genvault ${named ? `${named} ` : ''}--help)\n`);
  },
});

// Exit codes are 0, 1 (error) and 2 (usage) only (status: 0-3, see common.ts), whatever
// ends the process: an errno, a signal, an uncaught exception or unhandled rejection,
// commander, or process.exitCode. mount, daemon and nbd keep their own signal handling.
if (named === 'status') useMonitoringExitCodes();
// Their index failures are logged as they happen (db.ts); a command's error line says it.
if (named !== 'mount' && named !== 'daemon' && named !== 'nbd') {
  exitOnSignals();
  reportIndexFailureInErrorLine();
}
process.on('uncaughtException', (e) => fail(e));
process.on('unhandledRejection', (e) => fail(e));
let finished = false;
process.on('beforeExit', () => {
  // Nothing left to run, yet the command has not finished: what it awaits can no longer
  // happen (node would exit 13 for the unsettled top-level await below).
  if (!finished) fail(noteOfIndexFailure() ?? new Error('the command stopped before finishing (nothing left to wait for)'));
});
process.on('exit', (code) => {
  const c = Number(process.exitCode ?? code);
  if (!allowedExitCodes().includes(c)) {
    process.stderr.write(`genvault: internal error: exit code ${c}\n`);
    process.exitCode = errorExitCode();
  }
});

for (const load of named ? [commands[named]!] : new Set(Object.values(commands))) (await load()).register(program);

process.stdout.on('error', (e: NodeJS.ErrnoException) => {
  if (e.code === 'EPIPE') process.exit(0);
  fail(describeFsError(e, 'writing standard output'));
});
process.stderr.on('error', () => undefined); // nowhere left to say it

try {
  await program.parseAsync(process.argv);
  finished = true;
} catch (e) {
  finished = true;
  if (e instanceof CommanderError) {
    // --help, --version, `help`: 0. Usage errors, and help shown because no command was given: 2.
    if (e.code === 'commander.helpDisplayed' || e.code === 'commander.version' || (e.code === 'commander.help' && e.exitCode === 0)) process.exit(0);
    if (named === 'status') process.stdout.write(`UNKNOWN: ${e.message.replace(/^error: /, '').split('\n')[0]}\n`);
    process.exit(errorExitCode(true));
  }
  fail(e);
}

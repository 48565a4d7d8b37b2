import { Command, Option } from 'commander';
import { Repository } from '../repository/repository.js';
import { PLAIN_FORMAT_VERSION, type RepoConfig } from '../format/config.js';
import { UsageError } from '../util/errors.js';
import { currentSecret, readSecretFile, unlock, type Secret } from '../repository/keys.js';
import { action, printJson, localRepoDir, localRepoPath, repoDirOf, wantsJson } from './common.js';
import { groupArg } from './options.js';

interface InitFlags {
  group?: string;
  encryption?: string;
  like?: string;
  newPasswordFile?: string;
  newKeyFile?: string;
}

/**
 * `init --like REPO`: the settings that must match for `genvault sync` to copy stored
 * records as they are and keep dedup across the copy (chunking, compression, pack and
 * leaf sizes, guards), and for an encrypted REPO its repository id and master key. The
 * format is REPO's, or the current one for an unencrypted REPO of an older format (a
 * newer destination reads everything an older source holds). An unencrypted copy gets an
 * id of its own: nothing but the records' associated data (format 6) needs them equal.
 */
async function likeSettings(likeArg: string, o: InitFlags, givenEncryption: string | undefined, cmd: Command): Promise<{ overrides: Partial<RepoConfig>; secret: Secret | null; master: Buffer | null }> {
  const like = await repoDirOf(likeArg, cmd);
  const cfg = await Repository.readConfig(like);
  if (givenEncryption !== undefined && (givenEncryption === 'none') === !!cfg.encryption) {
    throw new UsageError(`--encryption ${givenEncryption}: ${like} is ${cfg.encryption ? 'encrypted' : 'not encrypted'}, and --like makes the new repository the same`);
  }
  const overrides: Partial<RepoConfig> = {
    chunking: { ...cfg.chunking },
    compression: { ...cfg.compression },
    packTargetSize: cfg.packTargetSize,
    leaf: { ...cfg.leaf },
    version: Math.max(cfg.version, PLAIN_FORMAT_VERSION),
  };
  if (cfg.guards) overrides.guards = { ...cfg.guards };
  if (o.group !== undefined) overrides.group = o.group;
  if (!cfg.encryption) return { overrides, secret: null, master: null };
  // The master key of REPO, opened with this process's secret; the new slot's secret.
  const u = await unlock(like, cfg);
  overrides.id = cfg.id;
  let secret: Secret = u.secret;
  if (o.newPasswordFile) secret = await readSecretFile(o.newPasswordFile, 'password');
  else if (o.newKeyFile) secret = await readSecretFile(o.newKeyFile, 'key-file');
  return { overrides, secret, master: u.master };
}

export function register(program: Command): void {
  program
    .command('init')
    .description('create a new, empty repository in the directory given by -r/GENVAULT_REPO')
    .addOption(new Option('--group <group>', 'let this group read the repository (directories 2750, files 0640); default: owner only (0700, 0600)').argParser(groupArg))
    .addOption(
      new Option('--encryption <mode>', 'aes-256-gcm (the key from --key-file, $GENVAULT_PASSWORD_FILE or a prompt), or none')
        .choices(['aes-256-gcm', 'none'])
        .default('aes-256-gcm'),
    )
    .option('--like <repo>', 'made like REPO for `genvault sync`: its chunking, compression and format, and, encrypted, its id and master key (opened with --key-file, $GENVAULT_PASSWORD_FILE or a prompt)')
    .option('--new-password-file <file>', 'with --like an encrypted REPO: the new repository\'s key slot takes this passphrase (default: the secret that opened REPO)')
    .option('--new-key-file <file>', 'with --like an encrypted REPO: the new repository\'s key slot takes this key file')
    .option('--json', 'print the new repository config as JSON')
    .action(
      action(async (opts: InitFlags, cmd: Command) => {
        const given = localRepoPath(cmd);
        const dir = await localRepoDir(cmd);
        // --like takes the encryption of the repository it names; an --encryption given as well must agree.
        const givenEncryption = cmd.getOptionValueSource('encryption') === 'cli' ? opts.encryption : undefined;
        if ((opts.newPasswordFile || opts.newKeyFile) && opts.like === undefined) throw new UsageError('--new-password-file and --new-key-file go with --like (for another repository\'s key slots: genvault key add)');
        if (opts.newPasswordFile && opts.newKeyFile) throw new UsageError('give --new-password-file or --new-key-file, not both');
        let cfg: RepoConfig;
        let secret: Secret | null;
        if (opts.like !== undefined) {
          const l = await likeSettings(opts.like, opts, givenEncryption, cmd);
          secret = l.secret;
          cfg = await Repository.init(dir, l.overrides, secret, l.master);
        } else {
          // The secret before anything is made: a refused key file leaves no directory behind.
          secret = opts.encryption === 'none' ? null : await currentSecret(`the new repository ${dir}`, true);
          cfg = await Repository.init(dir, opts.group !== undefined ? { group: opts.group } : {}, secret);
        }
        if (wantsJson(cmd)) printJson({ repository: dir, ...cfg });
        else {
          const like = opts.like !== undefined ? ` like ${opts.like}${cfg.encryption ? ' (same id and master key)' : ''}` : '';
          const where = dir === given ? dir : `${given} (index cache in ${dir})`;
          process.stdout.write(`created genvault repository ${cfg.id} at ${where}${like}${secret ? ` (encrypted; key slot from ${secret.from})` : ''}\n`);
        }
      }),
    );
}

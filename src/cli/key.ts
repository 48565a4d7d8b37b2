import { Command } from 'commander';
import fs from 'node:fs/promises';
import path from 'node:path';
import { constants as C } from 'node:fs';
import { Repository } from '../repository/repository.js';
import { addSlot, promptSecret, readSecretFile, readSlots, removeSlot, unlock, type Secret, type Unlocked } from '../repository/keys.js';
import { exportText, keyMatches, parseExport } from '../format/crypto.js';
import type { RepoConfig } from '../format/config.js';
import { GenvaultError, UsageError, describeFsError } from '../util/errors.js';
import { action, printJson, localRepoDir, wantsJson } from './common.js';

interface NewSecretOpts {
  newPasswordFile?: string;
  newKeyFile?: string;
}

async function encrypted(cmd: Command): Promise<{ dir: string; config: RepoConfig }> {
  const dir = path.resolve(await localRepoDir(cmd));
  const config = await Repository.readConfig(dir);
  if (!config.encryption) throw new GenvaultError(`${dir}: not encrypted (made with --encryption none): it has no keys`, 'NOT_ENCRYPTED');
  return { dir, config };
}

async function opened(cmd: Command): Promise<{ dir: string; config: RepoConfig; u: Unlocked }> {
  const { dir, config } = await encrypted(cmd);
  return { dir, config, u: await unlock(dir, config) };
}

/** The secret a new slot gets: --new-password-file, --new-key-file, else asked twice. */
async function newSecret(o: NewSecretOpts): Promise<Secret> {
  if (o.newPasswordFile && o.newKeyFile) throw new UsageError('give --new-password-file or --new-key-file, not both');
  if (o.newPasswordFile) return readSecretFile(o.newPasswordFile, 'password');
  if (o.newKeyFile) return readSecretFile(o.newKeyFile, 'key-file');
  return promptSecret('new passphrase: ', true);
}

function newSecretOptions(c: Command): Command {
  return c
    .option('--new-password-file <file>', 'the new slot\'s passphrase, from a file (0600; else a prompt)')
    .option('--new-key-file <file>', 'the new slot\'s key, from a file (0600)');
}

function registerList(key: Command): void {
  key
    .command('list')
    .description('list the key slots; the one that opened the repository is marked current')
    .option('--json', 'print JSON')
    .action(
      action(async (_o: object, cmd: Command) => {
        const { dir, u } = await opened(cmd);
        const { slots } = await readSlots(dir);
        const rows = slots.map((s) => ({ id: s.id, kind: s.kind, created: s.created, current: s.id === u.slotId }));
        if (wantsJson(cmd)) return printJson(rows);
        for (const r of rows) process.stdout.write(`${r.id}  ${r.kind.padEnd(8)}  ${r.created}${r.current ? '  (current)' : ''}\n`);
      }),
    );
}

function registerAddRemove(key: Command): void {
  newSecretOptions(key.command('add').description('add a key slot (another passphrase or key file for the same master key)')).action(
    action(async (o: NewSecretOpts, cmd: Command) => {
      const { dir, config, u } = await opened(cmd);
      const slot = await addSlot(dir, config, u.master, await newSecret(o));
      process.stdout.write(`added key slot ${slot.id} (${slot.kind})\n`);
    }),
  );
  key
    .command('remove')
    .description('remove a key slot (never the last one)')
    .argument('<id>')
    .action(
      action(async (id: string, _o: object, cmd: Command) => {
        const { dir } = await opened(cmd);
        const { slots } = await readSlots(dir);
        if (!slots.some((s) => s.id === id)) throw new GenvaultError(`no key slot ${id} in ${dir}`, 'NOT_FOUND');
        if (slots.length === 1) throw new GenvaultError(`key slot ${id} is the last one: add another first ('genvault key add')`, 'LAST_KEY');
        await removeSlot(dir, id);
        process.stdout.write(`removed key slot ${id}\n`);
      }),
    );
  newSecretOptions(key.command('passwd').description('change the passphrase of the slot that opens the repository (a new slot replaces it)')).action(
    action(async (o: NewSecretOpts, cmd: Command) => {
      const { dir, config, u } = await opened(cmd);
      const slot = await addSlot(dir, config, u.master, await newSecret(o));
      await removeSlot(dir, u.slotId);
      process.stdout.write(`key slot ${u.slotId} replaced by ${slot.id}\n`);
    }),
  );
}

function registerExportImport(key: Command): void {
  key
    .command('export')
    .description('print a paper backup of the master key (anyone holding it can read every backup)')
    .option('-o, --output <file>', 'write it to a new file (0600) instead of standard output')
    .action(
      action(async (o: { output?: string }, cmd: Command) => {
        const { config, u } = await opened(cmd);
        const text = exportText(u.master, config.id);
        if (!o.output) return void process.stdout.write(text);
        const fh = await fs.open(o.output, C.O_WRONLY | C.O_CREAT | C.O_EXCL, 0o600).catch((e) => {
          throw describeFsError(e, o.output!);
        });
        await fh.writeFile(text).finally(() => fh.close());
      }),
    );
  newSecretOptions(
    key
      .command('import')
      .description('make a key slot from a paper backup of the master key (key export), e.g. after every slot was lost')
      .argument('<file>', 'the backup (- for standard input)'),
  ).action(
    action(async (file: string, o: NewSecretOpts, cmd: Command) => {
      const { dir, config } = await encrypted(cmd);
      const text = file === '-' ? await readStdin() : await fs.readFile(file, 'utf8').catch((e) => {
        throw describeFsError(e, file);
      });
      let backup;
      try {
        backup = parseExport(text);
      } catch (e) {
        throw new GenvaultError(`${file}: ${(e as Error).message}`, 'BAD_KEY');
      }
      if (backup.repoId !== config.id) throw new GenvaultError(`${file}: the key of repository ${backup.repoId}, not of ${config.id}`, 'BAD_KEY');
      if (!keyMatches(backup.master, config.encryption!.keyCheck)) throw new GenvaultError(`${file}: the key does not match this repository's key check`, 'BAD_KEY');
      const slot = await addSlot(dir, config, backup.master, await newSecret(o));
      process.stdout.write(`imported the master key into key slot ${slot.id} (${slot.kind})\n`);
    }),
  );
}

async function readStdin(): Promise<string> {
  const parts: Buffer[] = [];
  for await (const d of process.stdin) parts.push(d as Buffer);
  return Buffer.concat(parts).toString('utf8');
}

export function register(program: Command): void {
  const key = program.command('key').description('an encrypted repository\'s key slots: list, add, remove, passwd, export, import');
  registerList(key);
  registerAddRemove(key);
  registerExportImport(key);
}

/**
 * An encrypted repository's key slots (keys/ID.json, FORMAT.md "Version 6: encryption")
 * and where the secret that opens one comes from: `--key-file FILE`, else
 * GENVAULT_PASSWORD_FILE, else a prompt on the terminal (no echo). Secret files must not be
 * readable by group or others. Opening happens before anything in the repository is
 * written: a wrong secret is one line, and the repository is left as it was.
 */
import { GenvaultError, describeFsError } from '../util/errors.js';
import { readTrustedFile } from '../util/trust.js';
import type { RepoConfig } from '../format/config.js';
import {
  SLOT_ID_RE,
  checkSlot,
  deriveKeys,
  keyMatches,
  unwrapMaster,
  wrapMaster,
  type KeySlot,
  type RepoKeys,
  type SlotKind,
} from '../format/crypto.js';
import { deriveIndexKeys, type IndexKeys } from '../format/index-seal.js';
import { repoModes } from './perms.js';
import { storeOf } from './location.js';

export const KEYS_DIR = 'keys';

/** A secret and what it is (the kind a slot made with it records). */
export interface Secret {
  bytes: Buffer;
  kind: SlotKind;
  /** Where it came from, for messages. */
  from: string;
}

let keyFileOption: string | undefined;
let givenSecret: Secret | null = null;

/** The global --key-file option (cli/main.ts). */
export function useKeyFile(file: string | undefined): void {
  keyFileOption = file;
}

/** A secret handed over by another process (the mount's background server, over IPC). */
export function useSecret(s: Secret | null): void {
  givenSecret = s;
}

/** Whether a secret is available without asking anyone (a file or one handed over). */
export function secretWithoutPrompt(): boolean {
  return givenSecret !== null || keyFileOption !== undefined || !!process.env.GENVAULT_PASSWORD_FILE;
}

/** A secret file's bytes, refused when group or others may read it; one trailing newline dropped. */
export async function readSecretFile(file: string, kind: SlotKind): Promise<Secret> {
  let b: Buffer;
  try {
    b = await readTrustedFile(file, { secret: true });
  } catch (e) {
    if (e instanceof GenvaultError) throw e;
    throw describeFsError(e, file);
  }
  if (b.at(-1) === 0x0a) b = b.subarray(0, b.at(-2) === 0x0d ? -2 : -1);
  if (!b.length) throw new GenvaultError(`${file}: empty: a passphrase or key file must hold at least one byte`, 'BAD_KEY');
  return { bytes: b, kind, from: file };
}

/** The secret for opening (or creating) a repository, from wherever this process has one. */
export async function currentSecret(what: string, confirm = false): Promise<Secret> {
  if (givenSecret) return givenSecret;
  if (keyFileOption !== undefined) return readSecretFile(keyFileOption, 'key-file');
  const env = process.env.GENVAULT_PASSWORD_FILE;
  if (env) return readSecretFile(env, 'password');
  return promptSecret(`passphrase for ${what}: `, confirm);
}

/** A passphrase read from the terminal without echo; with `confirm`, asked twice. */
export async function promptSecret(question: string, confirm = false): Promise<Secret> {
  if (!process.stdin.isTTY) {
    throw new GenvaultError('the repository is encrypted: give --key-file FILE or GENVAULT_PASSWORD_FILE, or run on a terminal to be asked', 'NO_KEY');
  }
  const first = await readHidden(question);
  if (confirm && !(await readHidden('again: ')).equals(first)) throw new GenvaultError('the passphrases differ', 'BAD_KEY');
  if (!first.length) throw new GenvaultError('empty passphrase', 'BAD_KEY');
  return { bytes: first, kind: 'password', from: 'the terminal' };
}

function readHidden(question: string): Promise<Buffer> {
  const input = process.stdin;
  // Echo off before the question shows: whatever is typed once it is there stays unseen.
  input.setRawMode(true);
  process.stderr.write(question);
  input.resume();
  const got: number[] = [];
  return new Promise((resolve, reject) => {
    const done = (err: Error | null) => {
      input.off('data', onData);
      input.setRawMode(false);
      input.pause();
      process.stderr.write('\n');
      if (err) reject(err);
      else resolve(Buffer.from(got));
    };
    const onData = (d: Buffer) => {
      for (const c of d) {
        if (c === 0x0d || c === 0x0a) return done(null);
        if (c === 0x03 || c === 0x04) return done(new GenvaultError('no passphrase given', 'NO_KEY'));
        if (c === 0x7f || c === 0x08) got.pop();
        else got.push(c);
      }
    };
    input.on('data', onData);
  });
}

/**
 * The slots in keys/, and the objects there that are not well-formed slots (reported,
 * skipped). Slots are objects of the repository's store (a local directory's keys/, or the
 * bucket of an object-store repository, whose cache directory must not be the only place
 * a key lives).
 */
export async function readSlots(dir: string): Promise<{ slots: KeySlot[]; damaged: string[] }> {
  const store = await storeOf(dir);
  try {
    const names: string[] = [];
    for await (const o of store.list(KEYS_DIR)) names.push(o.name);
    const slots: KeySlot[] = [];
    const damaged: string[] = [];
    for (const n of names.sort()) {
      const m = /^keys\/([0-9a-f]{16})\.json$/.exec(n);
      if (!m) continue;
      try {
        slots.push(checkSlot(JSON.parse((await store.get(n)).toString('utf8')), m[1]!));
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code === 'ENOENT') continue; // removed meanwhile
        damaged.push(`${store.describe(n)}: ${e instanceof SyntaxError ? 'not valid JSON (damaged key slot)' : (e as Error).message}`);
      }
    }
    return { slots, damaged };
  } catch (e) {
    throw describeFsError(e, store.describe(KEYS_DIR));
  } finally {
    await store.close();
  }
}

/** Write a new slot, complete or not at all (the store's exclusive put). */
export async function writeSlot(dir: string, config: Pick<RepoConfig, 'group'>, slot: KeySlot): Promise<void> {
  const store = await storeOf(dir);
  const name = `${KEYS_DIR}/${slot.id}.json`;
  try {
    await store.put(name, JSON.stringify(slot, null, 2) + '\n', { exclusive: true, mode: repoModes(config).file });
  } catch (e) {
    throw describeFsError(e, store.describe(name));
  } finally {
    await store.close();
  }
}

export async function removeSlot(dir: string, id: string): Promise<void> {
  if (!SLOT_ID_RE.test(id)) throw new GenvaultError(`invalid key slot id ${JSON.stringify(id)}`, 'USAGE', 2);
  const store = await storeOf(dir);
  try {
    const name = `${KEYS_DIR}/${id}.json`;
    if (!(await store.stat(name))) throw Object.assign(new Error(`${store.describe(name)}: no such key slot`), { code: 'ENOENT' });
    await store.delete(name);
  } finally {
    await store.close();
  }
}

/** An opened encrypted repository's keys, and the slot that opened it. */
export interface Unlocked {
  master: Buffer;
  keys: RepoKeys;
  /** The keys of a sealed index (format 7; derived for every encrypted repository, used from 7 on). */
  index: IndexKeys;
  slotId: string;
  secret: Secret;
}

const unlockedByDir = new Map<string, Unlocked>();

/**
 * Open an encrypted repository's master key with this process's secret, or `given` (a
 * sync job's destination key file); once per repository per process: the daemon reopens
 * repositories. Throws one line when no slot
 * opens: nothing has been written by then.
 */
export async function unlock(dir: string, config: RepoConfig, given?: Secret): Promise<Unlocked> {
  const known = unlockedByDir.get(dir);
  if (known) return known;
  const { slots, damaged } = await readSlots(dir);
  for (const d of damaged) process.stderr.write(`genvault: warning: ${d}; skipped\n`);
  if (!slots.length) {
    throw new GenvaultError(`${dir}: encrypted, but no usable key slot in ${KEYS_DIR}/ ('genvault key import' makes one from a key backup)`, 'NO_KEY');
  }
  const secret = given ?? (await currentSecret(dir));
  for (const slot of slots) {
    const master = await unwrapMaster(slot, secret.bytes, config.id);
    if (!master) continue;
    if (!keyMatches(master, config.encryption!.keyCheck)) {
      throw new GenvaultError(`${dir}: key slot ${slot.id} holds a key of another repository`, 'BAD_KEY');
    }
    const u = { master, keys: deriveKeys(master, config.id), index: deriveIndexKeys(master, config.id), slotId: slot.id, secret };
    unlockedByDir.set(dir, u);
    return u;
  }
  throw new GenvaultError(`${dir}: wrong passphrase or key (from ${secret.from}): no key slot opens with it`, 'BAD_KEY');
}

/** A new slot for `master` under `secret`, written into keys/. */
export async function addSlot(dir: string, config: RepoConfig, master: Uint8Array, secret: Secret): Promise<KeySlot> {
  const slot = await wrapMaster(master, secret.bytes, config.id, secret.kind);
  await writeSlot(dir, config, slot);
  return slot;
}

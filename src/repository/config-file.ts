/**
 * A repository's config.json read and checked, apart from repository.ts and what it loads
 * (LevelDB, the worker pool): repair reads the config and starts deriving the key before
 * it loads the code that rebuilds the index (lifecycle/repair.ts).
 */
import path from 'node:path';
import { GenvaultError, describeFsError } from '../util/errors.js';
import { checkConfig, type RepoConfig } from '../format/config.js';
import type { Store } from '../store/store.js';
import { describeLocation, storeOf } from './location.js';

export const CONFIG_FILE = 'config.json';

export async function readConfig(dir: string): Promise<RepoConfig> {
  const abs = path.resolve(dir);
  const store = await storeOf(abs);
  try {
    return await readConfigFrom(store, abs);
  } finally {
    await store.close();
  }
}

/** The config.json of the repository at `abs` whose store is already open (Repository.open). */
export async function readConfigFrom(store: Store, abs: string): Promise<RepoConfig> {
  const file = store.describe(CONFIG_FILE);
  let text: string;
  try {
    text = (await store.get(CONFIG_FILE)).toString('utf8');
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENOTDIR') {
      throw new GenvaultError(`${await describeLocation(abs)}: not a genvault repository (no ${CONFIG_FILE}; create one with 'genvault init')`, 'NO_REPO');
    }
    throw describeFsError(e, file);
  }
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch {
    throw new GenvaultError(`${file}: corrupt repository config: not valid JSON`, 'BAD_CONFIG');
  }
  return checkConfig(raw, file);
}

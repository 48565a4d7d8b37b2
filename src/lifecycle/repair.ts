/**
 * `genvault repair`: rebuild the index from the packs (FORMAT.md, "Version 4").
 *
 * The model of the packs (pack-model.ts) is built in a new LevelDB,
 * `index.repair-PID-RANDOM/index/` beside `index/`, never in the index itself. A dry run
 * (the default) reports what it found and how the index in place differs, then removes
 * it. `--write` swaps it in:
 * `index/` becomes `index.broken-TIME/` (kept: job history and damage marks live only
 * there), the new directory becomes `index/`. Packs are only read.
 *
 * Killed at any point, nothing half-made is ever taken for an index: the new directory is
 * named `index` only by the final rename, when it is complete. The next repair removes
 * build directories whose owner is dead and starts over; the packs have not changed, so
 * it builds the same index.
 */
import path from 'node:path';
import { GenvaultError } from '../util/errors.js';
import { readConfig } from '../repository/config-file.js';
import { unlock } from '../repository/keys.js';
import { generationIndex } from '../format/index-seal.js';
import type { RepairOptions, RepairReport } from './rebuild.js';

export type { RepairOptions, RepairReport } from './rebuild.js';

export async function repair(dir: string, opts: RepairOptions = {}): Promise<RepairReport> {
  const started = Date.now();
  const abs = path.resolve(dir);
  const config = await readConfig(abs);
  if (config.version < 4) {
    throw new GenvaultError(
      `${abs}: format version ${config.version}: its packs hold no generation records, so the index cannot be rebuilt from them ('genvault upgrade' writes them, from a readable index)`,
      'FORMAT',
    );
  }
  // The key first: a wrong one ends repair before anything is written. scrypt derives it
  // on libuv's thread pool (slow by design) while the main thread has nothing to
  // do: it loads what rebuilds the index (LevelDB, the scan, rebuild.ts) meanwhile, which
  // is why that is imported here and not above (performance.md, "Rebuilding the index").
  const [unlocked, { rebuild }] = await Promise.all([config.encryption ? unlock(abs, config) : null, import('./rebuild.js')]);
  return rebuild(abs, config, unlocked?.keys ?? null, opts, started, generationIndex(config, unlocked?.index ?? null));
}

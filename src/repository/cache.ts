/**
 * An object-store repository's index is a cache of its bucket (location.ts), and other
 * hosts write to the bucket through caches of their own. Before a command trusts this
 * cache, its packs are compared with the bucket's, under the store lock
 * (store-locks.ts: no gc removes packs while any command holds one):
 *
 * - a pack the index names that the bucket lacks was removed by a gc elsewhere: chunk
 *   entries may point into it, and a backup deduplicating against them would commit a
 *   generation that references nothing;
 * - a pack in the bucket that the index does not know, and that no live writer of this
 *   cache directory is writing, was written elsewhere: generations and chunks this cache
 *   does not list (and a gc here must know every generation before it condemns anything).
 *
 * Either makes the cache behind; the command's caller rebuilds it from the bucket (repair)
 * and opens again. Comparing costs one listing of packs/ (one request per 1000 packs).
 */
import { K_PACK, prefixEnd } from '../format/keys.js';
import type { Db } from '../index/db.js';
import { listPacks } from '../store/pack-reader.js';
import type { Store } from '../store/store.js';
import { liveWriters } from './locks.js';

export interface CacheState {
  /** Packs the index names that the bucket lacks. */
  gone: string[];
  /** Packs in the bucket that the index lacks and no live local writer is writing. */
  unknown: string[];
}

/** The cache's packs compared with the store's. */
export async function cacheState(repoDir: string, store: Store, db: Db): Promise<CacheState> {
  const indexed = new Set<string>();
  const start = Buffer.of(K_PACK);
  for await (const k of db.keys({ gte: start, lt: prefixEnd(start) })) indexed.add(k.subarray(1).toString('hex'));
  const stored = new Set((await listPacks(store)).map((p) => p.packId));
  const writing = new Set<string>();
  for (const w of await liveWriters(repoDir)) for (const p of w.packs) writing.add(p);
  return {
    gone: [...indexed].filter((p) => !stored.has(p)),
    unknown: [...stored].filter((p) => !indexed.has(p) && !writing.has(p)),
  };
}

export function cacheBehind(s: CacheState): boolean {
  return s.gone.length > 0 || s.unknown.length > 0;
}

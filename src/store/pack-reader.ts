/**
 * Reading packs on the main thread (verify, gc): the pack header, and spans of records.
 * Checking what was read against the index is ../format/pack.ts's (checkRecord); the
 * workers read records themselves (work/worker.ts).
 */
import { PACK_HEADER_SIZE, PACK_MAGIC, isPackId, packObject } from '../format/pack.js';
import { scanPack, type ScanEnd, type ScanItem, type ScanOptions } from '../format/scan.js';
import type { Store } from './store.js';

/** A pack's size and whether its header names it; null when the pack is missing. Other errors are thrown. */
export async function readPackHeader(store: Store, packId: string): Promise<{ size: number; headerOk: boolean } | null> {
  const name = packObject(packId);
  const st = await store.stat(name);
  if (!st) return null;
  const head = Buffer.alloc(PACK_HEADER_SIZE);
  const got = await store.read(name, head, 0, PACK_HEADER_SIZE, 0);
  const headerOk = got === PACK_HEADER_SIZE && head.subarray(0, 8).equals(PACK_MAGIC) && head.toString('hex', 8, 24) === packId;
  return { size: st.size, headerOk };
}

/** One pack, opened for reads of record spans. */
export class PackReader {
  private constructor(
    readonly store: Store,
    readonly packId: string,
    readonly name: string,
  ) {}

  /** Throws what keeps the pack from being read at all (missing: code 'ENOENT'). */
  static async open(store: Store, packId: string): Promise<PackReader> {
    const name = packObject(packId);
    await store.read(name, Buffer.alloc(0), 0, 0, 0); // a read of nothing still opens it (store.ts)
    return new PackReader(store, packId, name);
  }

  /** Like readRecordSpan. */
  async read(offset: number, length: number, buf: Buffer): Promise<number> {
    return this.store.read(this.name, buf, 0, length, offset);
  }
}

/**
 * Read `length` bytes of a pack from `offset` into buf (from its start). Returns how many
 * were read: fewer means the pack ends before the span does (the record is cut off).
 */
export async function readRecordSpan(store: Store, packId: string, offset: number, length: number, buf: Buffer): Promise<number> {
  return store.read(packObject(packId), buf, 0, length, offset);
}

/** A pack object found in the store: its id, object name, size and, where the store keeps it, its last write (ObjectInfo.modified). */
export interface StoredPack {
  packId: string;
  name: string;
  size: number;
  modified?: number;
}

/**
 * Every pack in the store, by listing it (not the index): objects named
 * `packs/XX/ID.pack` with ID a pack id starting with XX. Anything else under packs/ is
 * not a pack and left out (reported by the caller if it cares).
 */
export async function listPacks(store: Store): Promise<StoredPack[]> {
  const out: StoredPack[] = [];
  for await (const o of store.list('packs')) {
    const m = /^packs\/([0-9a-f]{2})\/([0-9a-f]{32})\.pack$/.exec(o.name);
    if (m && isPackId(m[2]) && m[2]!.startsWith(m[1]!)) out.push({ packId: m[2]!, name: o.name, size: o.size, modified: o.modified });
  }
  return out.sort((a, b) => (a.packId < b.packId ? -1 : a.packId > b.packId ? 1 : 0));
}

/** Read a pack's records without the index (format/scan.ts), through the store. */
export function scanStoredPack(store: Store, p: StoredPack, size = p.size, opts: ScanOptions = {}): AsyncGenerator<ScanItem, ScanEnd> {
  return scanPack((buf, off, len, pos) => store.read(p.name, buf, off, len, pos), size, p.packId, opts);
}

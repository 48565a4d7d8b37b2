/**
 * The index's key layout (LevelDB under index/; see FORMAT.md). Pure encoding: the
 * database itself is opened in ../index/db.ts.
 *
 * Keys are binary, one prefix byte each (see FORMAT.md):
 *   'c' digest(32)                      -> chunk location (33 bytes, pack.ts)
 *   'l' digest(32)                      -> map leaf (chunkmap.ts)
 *   'g' name 0x00 created(u64 BE ms) id -> generation record (JSON)
 *   'm' id                              -> generation top-level map (chunkmap.ts)
 *   'p' packId(16)                      -> pack record (JSON: committed size)
 *   'd' digest(32)                      -> found damaged (JSON: when, by what); the next backup that
 *                                          reads these bytes stores a good copy and removes this
 *   'x' digest(32)                      -> condemned by a running gc (old location, 33 bytes)
 *   'y' digest(32)                      -> map leaf being removed by a running gc (the leaf's bytes)
 *   'j' job 0x00 started(u64 BE ms)     -> job run (jobs/history.ts)
 * Format 7 (index-seal.ts): 'g' and 'j' keys hold a name tag in place of the name, values sealed.
 */

export const K_CHUNK = 0x63; // 'c'
export const K_LEAF = 0x6c; // 'l'
export const K_GEN = 0x67; // 'g'
export const K_GENMAP = 0x6d; // 'm'
export const K_PACK = 0x70; // 'p'
export const K_CONDEMNED = 0x78; // 'x'
export const K_DAMAGED = 0x64; // 'd'
export const K_MOVED_LEAF = 0x79; // 'y'
/** Job runs (src/jobs/history.ts): 'j' job 0x00 started, or (format 7) 'j' name tag started. */
export const K_JOB_RUN = 0x6a; // 'j'

export function key(prefix: number, ...parts: Array<Uint8Array | string>): Buffer {
  const bufs = parts.map((p) => (typeof p === 'string' ? Buffer.from(p, 'utf8') : p));
  return Buffer.concat([Buffer.of(prefix), ...bufs]);
}

/** prefix + digest: on every chunk's path (backup lookups, repair), so without key()'s arrays. */
function digestKey(prefix: number, digest: Uint8Array): Buffer {
  const k = Buffer.allocUnsafe(1 + digest.length);
  k[0] = prefix;
  k.set(digest, 1);
  return k;
}

export function chunkKey(digest: Uint8Array): Buffer {
  return digestKey(K_CHUNK, digest);
}

export function leafKey(digest: Uint8Array): Buffer {
  return digestKey(K_LEAF, digest);
}

export function damagedKey(digest: Uint8Array): Buffer {
  return digestKey(K_DAMAGED, digest);
}

export function condemnedKey(digest: Uint8Array): Buffer {
  return key(K_CONDEMNED, digest);
}

/** A map leaf a running gc is removing, kept here until it knows no backup raced with it (gc.ts). */
export function movedLeafKey(digest: Uint8Array): Buffer {
  return key(K_MOVED_LEAF, digest);
}

export function packKey(packId: string): Buffer {
  return key(K_PACK, Buffer.from(packId, 'hex'));
}

/** The value under a pack's 'p' key: how many of its bytes are committed (and synced). */
export function packSizeValue(size: number): Buffer {
  return Buffer.from(JSON.stringify({ size }));
}

/** The committed size a 'p' value gives (throws on a value that is not JSON). */
export function packSizeOf(v: Uint8Array): number {
  return (JSON.parse(Buffer.from(v.buffer, v.byteOffset, v.byteLength).toString('utf8')) as { size: number }).size;
}

/** Smallest key greater than every key starting with `prefix`. */
export function prefixEnd(prefix: Buffer): Buffer {
  const end = Buffer.from(prefix);
  for (let i = end.length - 1; i >= 0; i--) {
    if (end[i]! < 0xff) {
      end[i]!++;
      return end.subarray(0, i + 1);
    }
  }
  return Buffer.concat([prefix, Buffer.of(0xff)]);
}

/**
 * gc's set of referenced chunks, in memory bounded however many chunks a repository holds.
 * A `Set` of digest strings cost ~150 bytes a chunk: 7 GB for the 50 million chunks of a
 * bucket of a few tens of terabytes. This set keeps 8 bytes a chunk (plus free slots):
 *
 * - the first 8 bytes of each digest, in 256 open-addressing tables chosen by the first
 *   byte (each grows by half on its own, so a growth never needs twice the whole set);
 * - past `maxBytes` of tables, a Bloom filter of half that size instead, filled from them.
 *
 * Either way the set can only err one way: `has` may say yes for a digest never added
 * (another digest with the same 8-byte prefix, 1 in 2^64 per pair; a Bloom false positive,
 * about 1 in 10^4 at 60 million chunks in 256 MiB), never no for one that was. gc asks "is
 * this chunk referenced?", so an error keeps an unreferenced chunk for a later gc; it never
 * removes a referenced one. The filter is salted per set, so a later gc errs elsewhere.
 */
import { randomBytes } from 'node:crypto';

const TABLES = 256;
const FIRST_SLOTS = 1024;
/** A table doubles past this load (linear probing stays short on uniform digests). */
const MAX_LOAD = 0.8;
const HASHES = 4;

export class MarkSet {
  /** Per first byte: slots of two words each (prefix bytes 0-3, 4-7); 0,0 is empty. */
  private tables: Uint32Array[] | null = [];
  private counts = new Int32Array(TABLES);
  /** Whether the all-zero prefix was added (it cannot be told from an empty slot). */
  private zero = false;
  private bloom: Uint32Array | null = null;
  private salt = new Uint32Array(randomBytes(8).buffer.slice(0));
  private tableBytes = 0;
  private added = 0;

  /** `maxBytes` of tables at most (default 512 MiB: exact up to ~50 million chunks). */
  constructor(readonly maxBytes = 512 << 20) {
    for (let t = 0; t < TABLES; t++) this.tables!.push(new Uint32Array(FIRST_SLOTS * 2));
    this.tableBytes = TABLES * FIRST_SLOTS * 8;
  }

  /** Digests added (distinct 8-byte prefixes while exact; every add once a filter). */
  get size(): number {
    return this.added;
  }

  /** Whether the set is still exact but for 8-byte prefix collisions (no Bloom filter yet). */
  get exact(): boolean {
    return this.bloom === null;
  }

  /** Memory held by the set's tables or filter. */
  get bytes(): number {
    return this.bloom ? this.bloom.byteLength : this.tableBytes;
  }

  /**
   * Empty the set, keeping its tables (or filter, with a new salt) at their size: gc marks
   * twice, and a second set allocated beside the first, not yet collected, would double
   * what gc holds.
   */
  clear(): void {
    if (this.bloom) {
      this.bloom.fill(0);
      this.salt = new Uint32Array(randomBytes(8).buffer.slice(0));
    } else for (const tab of this.tables!) tab.fill(0);
    this.counts.fill(0);
    this.zero = false;
    this.added = 0;
  }

  /** Add the 32-byte digest at `at` in `d` (only its first 8 bytes are kept). */
  add(d: Uint8Array, at = 0): void {
    const lo = word(d, at);
    const hi = word(d, at + 4);
    if (this.bloom) {
      this.bloomSet(lo, hi);
      this.added++;
      return;
    }
    if (lo === 0 && hi === 0) {
      if (!this.zero) this.added++;
      this.zero = true;
      return;
    }
    const t = lo & 0xff;
    if (!insert(this.tables![t]!, lo, hi)) return;
    this.added++;
    if (++this.counts[t]! > (this.tables![t]!.length / 2) * MAX_LOAD) this.grow(t);
  }

  /** Whether the digest at `at` in `d` may have been added (see the header: errs only towards yes). */
  has(d: Uint8Array, at = 0): boolean {
    const lo = word(d, at);
    const hi = word(d, at + 4);
    if (this.bloom) return this.bloomHas(lo, hi);
    if (lo === 0 && hi === 0) return this.zero;
    const tab = this.tables![lo & 0xff]!;
    const s = probe(tab, lo, hi);
    return tab[s * 2] !== 0 || tab[s * 2 + 1] !== 0;
  }

  private grow(t: number): void {
    const old = this.tables![t]!;
    if (this.tableBytes + old.byteLength / 2 > this.maxBytes) {
      this.toBloom();
      return;
    }
    const tab = new Uint32Array(Math.ceil(old.length / 4) * 6); // 1.5 times the slots
    for (let s = 0; s < old.length; s += 2) if (old[s] !== 0 || old[s + 1] !== 0) insert(tab, old[s]!, old[s + 1]!);
    this.tables![t] = tab;
    this.tableBytes += tab.byteLength - old.byteLength;
  }

  /** Every prefix held goes into a filter of maxBytes/2 (a power of two of bits), then the tables go. */
  private toBloom(): void {
    let bits = 1024;
    while (bits * 2 <= (this.maxBytes / 2) * 8 && bits < 2 ** 32) bits *= 2;
    this.bloom = new Uint32Array(bits / 32);
    for (const tab of this.tables!) for (let s = 0; s < tab.length; s += 2) if (tab[s] !== 0 || tab[s + 1] !== 0) this.bloomSet(tab[s]!, tab[s + 1]!);
    if (this.zero) this.bloomSet(0, 0);
    this.tables = null;
  }

  /**
   * The filter's bits for a prefix: bit i of HASHES is (h1 + i*h2) mod bits, h1 and h2 the
   * salted prefix words (double hashing). Sets them, or tells whether all are set.
   */
  private bloomProbe(lo: number, hi: number, set: boolean): boolean {
    const f = this.bloom!;
    const mask = f.length * 32 - 1;
    const h1 = mix(lo ^ this.salt[0]!);
    const h2 = mix(hi ^ this.salt[1]!) | 1;
    for (let i = 0; i < HASHES; i++) {
      const b = ((h1 + Math.imul(i, h2)) >>> 0) & mask;
      if (set) f[b >>> 5] = f[b >>> 5]! | (1 << (b & 31));
      else if ((f[b >>> 5]! & (1 << (b & 31))) === 0) return false;
    }
    return true;
  }

  private bloomSet(lo: number, hi: number): void {
    this.bloomProbe(lo, hi, true);
  }

  private bloomHas(lo: number, hi: number): boolean {
    return this.bloomProbe(lo, hi, false);
  }
}

function word(d: Uint8Array, at: number): number {
  return (d[at]! | (d[at + 1]! << 8) | (d[at + 2]! << 16) | (d[at + 3]! << 24)) >>> 0;
}

/**
 * The first slot to probe, from bits the table choice (the low byte) did not use, scaled
 * to the table's slots (not a power of two: tables grow by half, not double, which holds
 * the same digests in about a quarter less memory on average).
 */
function slotOf(lo: number, hi: number, slots: number): number {
  return Math.floor((((lo >>> 8) ^ (hi << 24)) >>> 0) * (slots / 4294967296));
}

/** The slot holding a (non-zero) prefix, or the empty slot where it would go (linear probing). */
function probe(tab: Uint32Array, lo: number, hi: number): number {
  const slots = tab.length / 2;
  for (let s = slotOf(lo, hi, slots); ; s = s + 1 === slots ? 0 : s + 1) {
    const a = tab[s * 2]!;
    const b = tab[s * 2 + 1]!;
    if ((a === 0 && b === 0) || (a === lo && b === hi)) return s;
  }
}

/** Put a prefix in a table with room; false when it was there. */
function insert(tab: Uint32Array, lo: number, hi: number): boolean {
  const s = probe(tab, lo, hi);
  if (tab[s * 2] !== 0 || tab[s * 2 + 1] !== 0) return false;
  tab[s * 2] = lo;
  tab[s * 2 + 1] = hi;
  return true;
}

/** murmur3's 32-bit finaliser: spreads salted words over all bits. */
function mix(h: number): number {
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  return (h ^ (h >>> 16)) >>> 0;
}

/**
 * An 8-byte key for a record's place (pack id and offset), for a MarkSet of places: the
 * pack id's first 8 bytes mixed with the offset, so that places spread over the tables.
 */
export function placeKey(loc: Uint8Array, into: Uint8Array): Uint8Array {
  const offLo = word(loc, 16);
  const offHi = word(loc, 20);
  putWord(into, 0, mix((word(loc, 0) ^ offLo) >>> 0));
  putWord(into, 4, mix((word(loc, 4) ^ Math.imul(offHi ^ offLo, 0x9e3779b1)) >>> 0));
  return into;
}

/** `word`'s inverse: `v` as 4 little-endian bytes at `at`. */
function putWord(d: Uint8Array, at: number, v: number): void {
  d[at] = v & 0xff;
  d[at + 1] = (v >>> 8) & 0xff;
  d[at + 2] = (v >>> 16) & 0xff;
  d[at + 3] = v >>> 24;
}

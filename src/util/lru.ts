/**
 * A least-recently-used map: a Map whose insertion order is its use order (a hit moves
 * its entry to the end; the first entry is the one to evict). Bounded by its number of
 * entries, or with `sizeOf` by the sum of its values' sizes (the reader's cache of decoded
 * chunks, in bytes). Both kinds serve the mount's reads, once or more per chunk: a get is
 * one lookup and, on a hit, a delete and a set; a set adds one sizeOf call at most.
 */
export class Lru<K, V> {
  private m = new Map<K, V>();
  /** Entries, or with sizeOf the sum of their sizes. */
  private total = 0;
  /**
   * Called for every value that leaves the cache: evicted, replaced under its key by
   * another, or offered and not taken (bigger than `max` alone).
   */
  onEvict: ((v: V) => void) | null = null;

  constructor(
    readonly max: number,
    private readonly sizeOf: ((v: V) => number) | null = null,
  ) {}

  get(k: K): V | undefined {
    const v = this.m.get(k);
    if (v !== undefined) {
      this.m.delete(k);
      this.m.set(k, v);
    }
    return v;
  }

  /** Drop the least recently used entry (onEvict is called); false when empty. */
  evictOldest(): boolean {
    const first = this.m.entries().next();
    if (first.done) return false;
    const [k, v] = first.value;
    this.m.delete(k);
    this.total -= this.sizeOf ? this.sizeOf(v) : 1;
    this.onEvict?.(v);
    return true;
  }

  set(k: K, v: V): void {
    const n = this.sizeOf ? this.sizeOf(v) : 1;
    if (n > this.max) {
      this.onEvict?.(v);
      return;
    }
    const old = this.m.get(k);
    if (old !== undefined) {
      this.total -= this.sizeOf ? this.sizeOf(old) : 1;
      this.m.delete(k);
      if (old !== v) this.onEvict?.(old);
    }
    this.m.set(k, v);
    this.total += n;
    while (this.total > this.max) this.evictOldest();
  }
}

/**
 * An exact set of 32-byte digests in flat memory (open addressing over one buffer of
 * digests): about 40 bytes per digest, no object per entry. Callers that may meet more
 * digests than they can afford to hold give it a limit and fall back to their slower path
 * once it is passed (`size > limit`: the set then stops growing and must not be asked).
 */
export class DigestSet {
  private data: Buffer;
  /** Slot -> index of the digest in `data` + 1; 0: empty. */
  private slots: Int32Array;
  private n = 0;

  constructor(readonly limit: number) {
    this.data = Buffer.allocUnsafe(32 * 1024);
    this.slots = new Int32Array(2048);
  }

  get size(): number {
    return this.n;
  }

  /** Whether the set still holds every digest added (false once more than `limit` were). */
  get whole(): boolean {
    return this.n <= this.limit;
  }

  /** Whether the digest at `at` in `d` is held. */
  has(d: Uint8Array, at = 0): boolean {
    return this.find(d, at) < 0;
  }

  /** Add `d`; false when it was there already. Past the limit it only counts. */
  add(d: Uint8Array): boolean {
    const at = this.find(d);
    if (at < 0) return false;
    if (++this.n > this.limit) return true;
    if ((this.n - 1) * 32 >= this.data.length) {
      const bigger = Buffer.allocUnsafe(this.data.length * 2);
      this.data.copy(bigger);
      this.data = bigger;
    }
    const o = (this.n - 1) * 32;
    for (let i = 0; i < 32; i++) this.data[o + i] = d[i]!;
    this.slots[at] = this.n;
    if (this.n * 2 > this.slots.length) this.grow();
    return true;
  }

  /** The slot holding the digest at `at` in `d` as -(slot + 1), or the empty slot where it would go. */
  private find(d: Uint8Array, at = 0): number {
    const mask = this.slots.length - 1;
    let s = (d[at]! | (d[at + 1]! << 8) | (d[at + 2]! << 16) | (d[at + 3]! << 24)) & mask;
    for (;;) {
      const v = this.slots[s]!;
      if (v === 0) return s;
      if (this.equalAt(d, at, (v - 1) * 32)) return -(s + 1);
      s = (s + 1) & mask;
    }
  }

  /**
   * Whether the digest at `at` in `d` is the one at `o` here. Byte by byte in JavaScript:
   * Buffer.compare is a call into C++ per probe, and was most of the set's time in a
   * rebuild (performance.md).
   */
  private equalAt(d: Uint8Array, at: number, o: number): boolean {
    const data = this.data;
    for (let i = 0; i < 32; i++) if (data[o + i] !== d[at + i]) return false;
    return true;
  }

  /** Every digest held, in the order added (views into the set's memory: copy what is kept). */
  forEach(fn: (d: Buffer) => void): void {
    const held = Math.min(this.n, this.limit);
    for (let i = 0; i < held; i++) fn(this.data.subarray(i * 32, i * 32 + 32));
  }

  private grow(): void {
    const old = this.slots;
    this.slots = new Int32Array(old.length * 2);
    const mask = this.slots.length - 1;
    for (const v of old) {
      if (v === 0) continue;
      const o = (v - 1) * 32;
      let s = (this.data[o]! | (this.data[o + 1]! << 8) | (this.data[o + 2]! << 16) | (this.data[o + 3]! << 24)) & mask;
      while (this.slots[s] !== 0) s = (s + 1) & mask;
      this.slots[s] = v;
    }
  }
}

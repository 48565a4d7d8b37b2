/**
 * A Bloom filter over SHA-256 digests (or any uniformly random 16+ bytes): "certainly not
 * added" or "maybe added". Used where a pass meets millions of digests that are nearly
 * all distinct and a LevelDB lookup per digest would cost more than the pass itself: only
 * the "maybe" answers (the repeats, and a small share of false positives) are looked up.
 * The bits are taken straight from the digest, which is already uniformly random; a
 * hostile input of crafted digests can only make more "maybe" answers, never a wrong "no".
 */
export class DigestFilter {
  private readonly bits: Uint32Array;
  private readonly mask: number;

  /** `log2Bits`: the filter's size, 2^log2Bits bits (27: 16 MiB, ~0.5% false "maybe" at 10M digests). */
  constructor(log2Bits = 27) {
    this.bits = new Uint32Array(2 ** (log2Bits - 5));
    this.mask = 2 ** log2Bits - 1;
  }

  add(d: Uint8Array): void {
    for (let i = 0; i < 16; i += 4) {
      const b = this.bit(d, i);
      this.bits[b >>> 5]! |= 1 << (b & 31);
    }
  }

  maybeHas(d: Uint8Array): boolean {
    for (let i = 0; i < 16; i += 4) {
      const b = this.bit(d, i);
      if (!(this.bits[b >>> 5]! & (1 << (b & 31)))) return false;
    }
    return true;
  }

  private bit(d: Uint8Array, i: number): number {
    return ((d[i]! | (d[i + 1]! << 8) | (d[i + 2]! << 16) | (d[i + 3]! << 24)) & this.mask) >>> 0;
  }
}

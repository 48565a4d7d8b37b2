/**
 * A token bucket shared by every request of one S3 store (`limitRate`, bytes per second,
 * uploads and downloads together). Callers take what they are about to send or have just
 * received; the bucket may run into debt, and each taker waits until its share of the debt
 * is paid, so concurrent requests queue up behind each other in the order they took.
 * A burst of a tenth of a second's worth is allowed after idle time, so small requests
 * after a pause are not held back.
 */
export class RateLimiter {
  private tokens: number;
  private last = performance.now();
  private readonly burst: number;

  constructor(readonly bytesPerSecond: number) {
    if (!(bytesPerSecond > 0) || !Number.isFinite(bytesPerSecond)) {
      throw Object.assign(new Error(`limitRate must be a positive number of bytes per second, not ${bytesPerSecond}`), { code: 'EINVAL' });
    }
    this.burst = Math.max(16 << 10, bytesPerSecond / 10);
    this.tokens = this.burst;
  }

  async take(n: number): Promise<void> {
    const now = performance.now();
    this.tokens = Math.min(this.burst, this.tokens + ((now - this.last) * this.bytesPerSecond) / 1000);
    this.last = now;
    this.tokens -= n;
    if (this.tokens < 0) await new Promise((r) => setTimeout(r, (-this.tokens * 1000) / this.bytesPerSecond));
  }
}

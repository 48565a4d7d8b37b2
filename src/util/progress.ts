/**
 * Progress on a terminal only: one line on stderr, redrawn at most 5 times a second.
 * Under cron or with output redirected nothing is drawn (stderr is not a TTY).
 */
import { bytes, duration } from './format.js';

export class Progress {
  private last = 0;
  private started = Date.now();
  private drawn = false;
  readonly enabled: boolean;

  constructor(
    private label: string,
    enabled = process.stderr.isTTY === true && !process.env.GENVAULT_NO_PROGRESS,
  ) {
    this.enabled = enabled;
  }

  update(done: number, total: number | null): void {
    if (!this.enabled) return;
    const now = Date.now();
    if (now - this.last < 200 && !(total !== null && done >= total)) return;
    this.last = now;
    const secs = (now - this.started) / 1000;
    const speed = secs > 0 ? done / secs : 0;
    let line = `${this.label} ${bytes(done)}`;
    if (total) {
      const pct = Math.min(100, (done / total) * 100);
      const width = 24;
      const fill = Math.round((pct / 100) * width);
      const eta = speed > 0 ? ((total - done) / speed) * 1000 : 0;
      line = `${this.label} [${'#'.repeat(fill)}${'.'.repeat(width - fill)}] ${pct.toFixed(0).padStart(3)}%  ${bytes(done)} / ${bytes(total)}  ${bytes(speed)}/s  ETA ${duration(eta)}`;
    } else {
      line += `  ${bytes(speed)}/s`;
    }
    process.stderr.write(`\r\x1b[K${line}`);
    this.drawn = true;
  }

  done(): void {
    if (this.drawn) process.stderr.write('\r\x1b[K');
    this.drawn = false;
  }
}

/**
 * Progress on a terminal only: one line on stderr, redrawn at most 5 times a second.
 * Under cron or with output redirected nothing is drawn (stderr is not a TTY), nor with
 * GENVAULT_NO_PROGRESS set.
 *
 * The line fits the terminal as it is at each redraw (a resized window included): the bar
 * shrinks first, then the ETA, the speed and the amounts are left out, so the line never
 * wraps (a wrapped line cannot be redrawn in place and scrolls the screen full of copies).
 *
 * Hand-written, not cli-progress (the usual npm progress bar), which was weighed for this
 * (native-notes/performance.md, "CLI libraries"): it does not fit its bar to the width, it
 * cuts the line by switching the terminal's line wrapping off (DECAWM), which a signal
 * that ends the process mid-bar leaves off in the user's shell, it redraws from a timer
 * of its own, and it is one more module to load.
 */
import { bytes, duration } from './format.js';

/** The bar's width on a wide terminal, and the narrowest bar still worth drawing. */
const BAR = 24;
const MIN_BAR = 8;

/**
 * The progress line for `columns` columns, at most columns - 1 characters long (the last
 * column makes some terminals wrap). `speed` in bytes per second.
 */
export function progressLine(label: string, done: number, total: number | null, speed: number, etaMs: number, columns: number): string {
  const max = Math.max(1, columns - 1);
  const fits = (s: string) => (s.length <= max ? s : null);
  if (!total) return fits(`${label} ${bytes(done)}  ${bytes(speed)}/s`) ?? fits(`${label} ${bytes(done)}`) ?? `${label} ${bytes(done)}`.slice(0, max);
  const pct = Math.min(100, (done / total) * 100);
  const percent = ` ${pct.toFixed(0).padStart(3)}%`;
  const tail = [`  ${bytes(done)} / ${bytes(total)}`, `  ${bytes(speed)}/s`, `  ETA ${duration(etaMs)}`];
  for (let n = tail.length; n >= 0; n--) {
    const rest = tail.slice(0, n).join('');
    const width = Math.min(BAR, max - label.length - percent.length - rest.length - 3);
    if (width < MIN_BAR) continue;
    const fill = Math.round((pct / 100) * width);
    return `${label} [${'#'.repeat(fill)}${'.'.repeat(width - fill)}]${percent}${rest}`;
  }
  return fits(`${label}${percent}`) ?? `${label}${percent}`.slice(0, max);
}

export class Progress {
  private last = 0;
  private started = Date.now();
  private drawn = false;
  readonly enabled: boolean;

  constructor(
    private label: string,
    private stream: NodeJS.WriteStream = process.stderr,
  ) {
    this.enabled = stream.isTTY === true && !process.env.GENVAULT_NO_PROGRESS;
  }

  update(done: number, total: number | null): void {
    if (!this.enabled) return;
    const now = Date.now();
    if (now - this.last < 200 && !(total !== null && done >= total)) return;
    this.last = now;
    const secs = (now - this.started) / 1000;
    const speed = secs > 0 ? done / secs : 0;
    const eta = total && speed > 0 ? ((total - done) / speed) * 1000 : 0;
    this.stream.write(`\r\x1b[K${progressLine(this.label, done, total, speed, eta, this.stream.columns || 80)}`);
    this.drawn = true;
  }

  done(): void {
    if (this.drawn) this.stream.write('\r\x1b[K');
    this.drawn = false;
  }
}

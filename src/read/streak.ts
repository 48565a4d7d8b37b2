/**
 * How far a reader has shown that it reads on, for read-ahead: the mount's local reader
 * (reader.ts) and the reader of an ssh:// mount (src/remote/mount-backend.ts) both ask it.
 *
 * A reader going on (a read within the slack of the furthest read of its run) earns a
 * window of twice the bytes it read in order since its last jump, at least `start` and at
 * most `max`; a jump closes the run and earns nothing. A loop-mounted file system hops
 * between nearby small files: a fixed window from every read near the last one, or one
 * doubling with each such read, fetched many times what it read (native-notes/fuse.md,
 * "Read-ahead, group records and the file-level restore"). The kernel's own read-ahead
 * keeps up to 12 requests of 128 KiB in flight and they are answered in any order, hence
 * the slack on both sides.
 */
export const SLACK_BEHIND = 4 << 20;
export const SLACK_AHEAD = 1 << 20;

export class ReadStreak {
  /** Where the furthest read of the current run ended (-1: no read yet). */
  lastEnd = -1;
  /** Bytes read in order since the last jump. */
  private bytes = 0;

  /** Records the read [offset, end); returns the read-ahead window from `end` (0: none). */
  note(offset: number, end: number, start: number, max: number): number {
    const onward = offset === 0 || (this.lastEnd >= 0 && offset >= this.lastEnd - SLACK_BEHIND && offset <= this.lastEnd + SLACK_AHEAD);
    this.bytes = onward ? this.bytes + (end - offset) : 0;
    this.lastEnd = onward ? Math.max(this.lastEnd, end) : end;
    return onward ? Math.min(max, Math.max(start, 2 * this.bytes)) : 0;
  }
}

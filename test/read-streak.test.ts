import { describe, expect, it } from 'vitest';
import { ReadStreak, SLACK_AHEAD, SLACK_BEHIND } from '../src/read/streak.js';

const K = 1 << 10;
const M = 1 << 20;

describe('read-ahead streak (the mount and the ssh:// mount)', () => {
  it('a sequential reader earns twice what it read, from the start window up to the maximum', () => {
    const s = new ReadStreak();
    expect(s.note(0, 128 * K, M, 16 * M)).toBe(M);
    let windows: number[] = [];
    for (let off = 128 * K; off < 16 * M; off += 128 * K) windows.push(s.note(off, off + 128 * K, M, 16 * M));
    expect(windows[0]).toBe(M); // 256 KiB read so far: still the start window
    expect(windows[6]).toBe(2 * M); // 1 MiB read so far
    expect(windows.at(-1)).toBe(16 * M); // capped
    expect(windows.every((w, i) => i === 0 || w >= windows[i - 1]!)).toBe(true);
  });

  it('reads answered out of order within the slack go on from the furthest one', () => {
    const s = new ReadStreak();
    s.note(0, 4 * M, M, 64 * M);
    expect(s.note(5 * M - 1, 5 * M, M, 64 * M)).toBeGreaterThan(0); // 1 MiB ahead of the end
    expect(s.lastEnd).toBe(5 * M);
    expect(s.note(5 * M - SLACK_BEHIND, 5 * M - SLACK_BEHIND + 4 * K, M, 64 * M)).toBeGreaterThan(0);
    expect(s.lastEnd).toBe(5 * M); // a late read does not move the furthest end back
  });

  it('a jump earns nothing and starts a new run', () => {
    const s = new ReadStreak();
    for (let off = 0; off < 32 * M; off += M) s.note(off, off + M, M, 16 * M);
    expect(s.note(100 * M, 100 * M + 4 * K, M, 16 * M)).toBe(0);
    expect(s.note(100 * M + 4 * K, 100 * M + 8 * K, M, 16 * M)).toBe(M); // 8 KiB in order: the start window, not 16 MiB
    expect(s.note(100 * M + 8 * K + SLACK_AHEAD + 1, 100 * M + 12 * K + SLACK_AHEAD, M, 16 * M)).toBe(0);
  });

  it('a file system hopping between nearby small files keeps a small window', () => {
    // 4 KiB reads, each 64 KiB past the last (metadata, then a small file, then the next).
    const s = new ReadStreak();
    s.note(0, 4 * K, M, 32 * M);
    let max = 0;
    for (let i = 1; i < 200; i++) max = Math.max(max, s.note(i * 64 * K, i * 64 * K + 4 * K, M, 32 * M));
    expect(max).toBe(1600 * K); // 200 reads of 4 KiB: 800 KiB in order, twice that at most
  });
});

/** The one LRU (src/util/lru.ts): by entry count (index caches) and by bytes (decoded chunks). */
import { describe, expect, it } from 'vitest';
import { Lru } from '../src/util/lru.js';

describe('Lru', () => {
  it('by count: keeps the most recently used, a get counts as use', () => {
    const l = new Lru<string, number>(2);
    l.set('a', 1);
    l.set('b', 2);
    expect(l.get('a')).toBe(1); // b is now the oldest
    l.set('c', 3);
    expect(l.get('b')).toBeUndefined();
    expect([l.get('a'), l.get('c')]).toEqual([1, 3]);
    l.set('a', 10); // replacing takes no room
    expect([l.get('a'), l.get('c')]).toEqual([10, 3]);
  });

  it('by size: evicts the oldest until the total fits, and reports what leaves', () => {
    const l = new Lru<string, Buffer>(10, (b) => b.length);
    const gone: Buffer[] = [];
    l.onEvict = (v) => gone.push(v);
    const a = Buffer.alloc(4, 1);
    const b = Buffer.alloc(4, 2);
    const c = Buffer.alloc(4, 3);
    l.set('a', a);
    l.set('b', b);
    l.get('a');
    l.set('c', c); // 12 bytes: b (the least recently used) goes
    expect(gone).toEqual([b]);
    expect(l.get('b')).toBeUndefined();
    const big = Buffer.alloc(11);
    l.set('big', big); // bigger than the whole cache: not taken, reported
    expect(gone).toEqual([b, big]);
    expect(l.get('big')).toBeUndefined();
    l.set('a', a); // the same buffer again: nothing leaves
    expect(gone).toEqual([b, big]);
    const a2 = Buffer.alloc(6, 4);
    l.set('a', a2); // replaced: the old one leaves; 6 + 4 fits
    expect(gone).toEqual([b, big, a]);
    expect([l.get('a'), l.get('c')]).toEqual([a2, c]);
  });

  it('evictOldest drops the least recently used entry, reports it and frees its size; false when empty', () => {
    const l = new Lru<string, Buffer>(10, (b) => b.length);
    const gone: Buffer[] = [];
    l.onEvict = (v) => gone.push(v);
    const a = Buffer.alloc(4, 1);
    const b = Buffer.alloc(4, 2);
    l.set('a', a);
    l.set('b', b);
    l.get('a');
    expect(l.evictOldest()).toBe(true);
    expect(gone).toEqual([b]);
    l.set('c', Buffer.alloc(6, 3)); // 4 + 6 fits again: nothing else leaves
    expect(gone).toEqual([b]);
    expect(l.evictOldest()).toBe(true);
    expect(l.evictOldest()).toBe(true);
    expect(l.evictOldest()).toBe(false);
    expect(gone.map((x) => x[0])).toEqual([2, 1, 3]);
  });
});

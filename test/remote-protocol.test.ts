/**
 * The remote protocol's pure parts, in process: framing against split, oversized and cut
 * streams; segment descriptions against every limit; namespaces and permissions.
 */
import { describe, expect, it } from 'vitest';
import { EventEmitter } from 'node:events';
import { FrameReader, MAX_FRAME, encodeFrame } from '../src/remote/frames.js';
import { decodeRead, decodeSegment, encodeRead, encodeSegment, MAX_READ } from '../src/remote/protocol.js';
import { Access } from '../src/remote/access.js';
import { decodeWindow, encodeWindow } from '../src/remote/parent-windows.js';

/** A byte source fed by hand. */
class Feed extends EventEmitter {
  paused = false;
  pause() {
    this.paused = true;
  }
  resume() {
    this.paused = false;
  }
  push(b: Buffer) {
    this.emit('data', b);
  }
  end() {
    this.emit('end');
  }
}

describe('FrameReader', () => {
  it('reassembles frames split at every byte, and ends cleanly between frames', async () => {
    const frames = [encodeFrame(3, 1, Buffer.from('{"op":"list"}')), encodeFrame(6, 2, Buffer.alloc(20, 9)), encodeFrame(11, 7, Buffer.alloc(0))];
    const all = Buffer.concat(frames);
    const feed = new Feed();
    const r = new FrameReader(feed);
    for (let i = 0; i < all.length; i++) feed.push(all.subarray(i, i + 1));
    feed.end();
    const got = [await r.next(), await r.next(), await r.next(), await r.next()];
    expect(got.map((f) => f && [f.type, f.id, f.payload.length])).toEqual([[3, 1, 13], [6, 2, 20], [11, 7, 0], null]);
  });

  it('refuses an oversized or malformed length before reading the payload, and a stream cut mid-frame', async () => {
    const big = Buffer.alloc(9);
    big.writeUInt32BE(MAX_FRAME + 1, 0);
    const f1 = new Feed();
    const r1 = new FrameReader(f1);
    f1.push(big);
    await expect(r1.next()).rejects.toThrow(/oversized frame/);
    const f2 = new Feed();
    const r2 = new FrameReader(f2);
    f2.push(Buffer.from([0, 0, 0, 4, 1, 0, 0, 0]));
    await expect(r2.next()).rejects.toThrow(/malformed frame/);
    const f3 = new Feed();
    const r3 = new FrameReader(f3);
    f3.push(encodeFrame(3, 1, Buffer.alloc(100)).subarray(0, 50));
    f3.end();
    await expect(r3.next()).rejects.toThrow(/ended in the middle of a frame/);
  });

  it('pauses its source while a whole frame waits to be taken', async () => {
    const feed = new Feed();
    const r = new FrameReader(feed, 1024);
    feed.push(encodeFrame(1, 0, Buffer.alloc(1000)));
    feed.push(encodeFrame(1, 1, Buffer.alloc(1000)));
    expect(feed.paused).toBe(true);
    expect((await r.next())!.id).toBe(0);
    expect((await r.next())!.id).toBe(1);
  });
});

describe('segment descriptions and reads', () => {
  const limits = { max: 512 * 1024, segment: 8 << 20 };
  it('round-trip', () => {
    const d = Buffer.alloc(32, 1);
    const chunks = [{ length: 65536, zero: false, digest: d }, { length: 4096, zero: true, digest: null }];
    expect(decodeSegment(encodeSegment(chunks), limits)).toEqual(chunks);
    expect(decodeRead(encodeRead('0123456789abcdef', 12345, 4096))).toEqual({ id: '0123456789abcdef', offset: 12345, length: 4096 });
  });

  it('refuse chunks over max, segments over their size, bad flags, trailing bytes and truncation', () => {
    const d = Buffer.alloc(32);
    expect(() => decodeSegment(encodeSegment([{ length: limits.max + 1, zero: true, digest: null }]), limits)).toThrow(/chunk of/);
    expect(() => decodeSegment(encodeSegment(Array.from({ length: 17 }, () => ({ length: limits.max, zero: true, digest: null }))), limits)).toThrow(/SEGMENT of/);
    const ok = encodeSegment([{ length: 4096, zero: false, digest: d }]);
    const flag = Buffer.from(ok);
    flag[8] = 2;
    expect(() => decodeSegment(flag, limits)).toThrow(/zero flag/);
    expect(() => decodeSegment(Buffer.concat([ok, Buffer.of(0)]), limits)).toThrow(/trailing/);
    expect(() => decodeSegment(ok.subarray(0, ok.length - 1), limits)).toThrow(/truncated/);
    expect(() => decodeSegment(Buffer.from([0, 0, 0, 0]), limits)).toThrow(/of 0 chunks/);
    expect(() => decodeRead(encodeRead('0123456789abcdef', 0, MAX_READ + 1))).toThrow(/READ of/);
    expect(() => decodeRead(Buffer.alloc(19))).toThrow(/READ of 19 bytes/);
  });
});

describe('Access', () => {
  it('maps names into one namespace and nothing outside it', () => {
    const a = new Access('kvm1', 'append');
    expect(a.inner('vm1')).toBe('kvm1:vm1');
    expect(a.owns('kvm1:vm1')).toBe(true);
    expect(a.owns('kvm2:vm1')).toBe(false);
    expect(a.owns('vm1')).toBe(false);
    expect(a.outer('kvm1:vm1')).toBe('vm1');
    for (const bad of ['kvm2:vm1', '../x', 'a/b', '', '.x', '-x', 'latest', 'x\ny', 'x'.repeat(200)]) expect(() => a.inner(bad)).toThrow(/invalid image name/);
    const admin = new Access(null, 'full');
    expect(admin.inner('vm1')).toBe('vm1');
    expect(admin.owns('kvm1:vm1')).toBe(true);
  });

  it('ranks permissions', () => {
    expect(() => new Access(null, 'read').require('append', 'backup')).toThrow(/backup needs append access; this key has read/);
    expect(() => new Access('n', 'append').require('full', 'forget')).toThrow(/forget needs full access; this key has append \(namespace n\)/);
    expect(() => new Access(null, 'full').require('append', 'backup')).not.toThrow();
  });
});

describe('parent windows from a server', () => {
  const chunking = { block: 4096, min: 16384, maskBits: 5, max: 524288, segment: 8 << 20 };
  const w = { starts: Int32Array.of(0, 65536), lengths: Int32Array.of(65536, 4096), fast: new Uint8Array(64).fill(1), sha: new Uint8Array(64).fill(2) };

  it('come back as they were sent', () => {
    const back = decodeWindow(JSON.parse(JSON.stringify(encodeWindow(w))), chunking)!;
    expect([...back.starts]).toEqual([0, 65536]);
    expect([...back.lengths]).toEqual([65536, 4096]);
    expect(Buffer.from(back.fast).equals(Buffer.from(w.fast))).toBe(true);
    expect(decodeWindow(null, chunking)).toBeUndefined();
  });

  it('are refused when inconsistent, overlapping or outside the segment', () => {
    const enc = encodeWindow(w);
    const bad = [
      { ...enc, lengths: encodeWindow({ ...w, lengths: Int32Array.of(65536) }).lengths },
      { ...enc, starts: encodeWindow({ ...w, starts: Int32Array.of(0, 100) }).starts },
      { ...enc, starts: encodeWindow({ ...w, starts: Int32Array.of(0, (8 << 20) - 100) }).starts },
      { ...enc, lengths: encodeWindow({ ...w, lengths: Int32Array.of(65536, 0) }).lengths },
      { ...enc, fast: 'AAAA' },
      { ...enc, sha: 7 },
      'nope',
    ];
    for (const b of bad) expect(() => decodeWindow(b, chunking), JSON.stringify(b).slice(0, 80)).toThrow(/malformed window/);
  });
});

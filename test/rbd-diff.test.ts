/**
 * The parser of `rbd export-diff` streams (src/source/rbd-diff.ts), in process, on crafted
 * bytes: good v1 and v2 streams, and every malformation the source must refuse rather
 * than turn into an image.
 */
import { Readable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { ByteReader, DiffReader, DiffStreamError, type DiffExtent } from '../src/source/rbd-diff.js';
import { rbdDiffStream, type DiffRec } from './ceph.js';

/** The stream as rbd's stdout would deliver it: in pieces of `piece` bytes. */
function reader(bytes: Buffer, piece = 7): ByteReader {
  const parts: Buffer[] = [];
  for (let i = 0; i < bytes.length; i += piece) parts.push(bytes.subarray(i, i + piece));
  return new ByteReader(Readable.from(parts));
}

/** Every extent with its data (for 'w'), read the way the source reads them. */
async function parse(bytes: Buffer, piece?: number): Promise<{ header: DiffReader['header']; extents: Array<DiffExtent & { data?: Buffer }> }> {
  const d = await DiffReader.open(reader(bytes, piece));
  const extents: Array<DiffExtent & { data?: Buffer }> = [];
  for (let x = await d.next(); x; x = await d.next()) {
    if (x.tag === 'w') {
      const data = Buffer.alloc(x.length);
      await d.data(data);
      extents.push({ ...x, data });
    } else extents.push(x);
  }
  return { header: d.header, extents };
}

const W = Buffer.from('0123456789abcdef');
const GOOD: DiffRec[] = [
  { tag: 'f', name: 's1' },
  { tag: 't', name: 's2' },
  { tag: 's', size: 1 << 20 },
  { tag: 'w', offset: 4096, data: W },
  { tag: 'z', offset: 8192, length: 4096 },
  { tag: 'w', offset: (1 << 20) - 16, data: W },
  { tag: 'e' },
];

async function refused(bytes: Buffer, why: RegExp): Promise<void> {
  const e = await parse(bytes).then(() => null, (err: unknown) => err);
  expect(e).toBeInstanceOf(DiffStreamError);
  expect((e as Error).message).toMatch(why);
  expect((e as Error).message).not.toContain('\n');
}

describe('rbd diff stream parser', () => {
  it('reads a v1 stream: names, size, extents in order with their data', async () => {
    const { header, extents } = await parse(rbdDiffStream(GOOD));
    expect(header).toEqual({ version: 1, from: 's1', to: 's2', size: 1 << 20 });
    expect(extents.map((x) => [x.tag, x.offset, x.length])).toEqual([['w', 4096, 16], ['z', 8192, 4096], ['w', (1 << 20) - 16, 16]]);
    expect(extents[0]!.data).toEqual(W);
  });

  it('reads a v2 stream the same, skipping metadata it does not know', async () => {
    const v2 = rbdDiffStream(GOOD, 2);
    // An unknown metadata record ('x', 3 bytes) after the banner: v2 says skip it.
    const unknown = Buffer.concat([Buffer.from('x'), Buffer.from([3, 0, 0, 0, 0, 0, 0, 0]), Buffer.from('abc')]);
    const bytes = Buffer.concat([v2.subarray(0, 12), unknown, v2.subarray(12)]);
    const { header, extents } = await parse(bytes, 1);
    expect(header).toEqual({ version: 2, from: 's1', to: 's2', size: 1 << 20 });
    expect(extents).toHaveLength(3);
  });

  it('skips the data of an extent the reader did not read', async () => {
    const d = await DiffReader.open(reader(rbdDiffStream(GOOD)));
    expect((await d.next())!.offset).toBe(4096);
    expect((await d.next())!.tag).toBe('z');
    expect((await d.next())!.offset).toBe((1 << 20) - 16);
    expect(await d.next()).toBeNull();
  });

  it('refuses malformed streams with one line', async () => {
    const good = rbdDiffStream(GOOD);
    await refused(Buffer.from('rbd diff v3\n'), /banner/);
    await refused(good.subarray(0, 5), /ends at byte 5/);
    await refused(good.subarray(0, good.length - 1), /ends at byte/); // no 'e'
    await refused(good.subarray(0, 60), /ends at byte/); // cut inside the data of a 'w'
    await refused(Buffer.concat([good, Buffer.from('x')]), /bytes after the end record/);
    const rec = (over: DiffRec[]) => rbdDiffStream([{ tag: 's', size: 1 << 20 }, ...over, { tag: 'e' }]);
    await refused(rec([{ tag: 'w', offset: 1 << 20, data: W }]), /beyond the image size/);
    await refused(rec([{ tag: 'z', offset: 0, length: (1 << 20) + 1 }]), /beyond the image size/);
    await refused(rec([{ tag: 'z', offset: 8192, length: 10 }, { tag: 'w', offset: 4096, data: W }]), /precedes/);
    await refused(rec([{ tag: 'w', offset: 0, data: W }, { tag: 'z', offset: 8, length: 8 }]), /overlaps/);
    await refused(rec([{ tag: 's', size: 5 }]), /second 's'/);
    await refused(rec([{ tag: 'w', offset: 0, data: W }, { tag: 't', name: 'late' }]), /among the data records/);
    await refused(rbdDiffStream([{ tag: 'w', offset: 0, data: W }, { tag: 'e' }]), /no size record/);
    await refused(Buffer.concat([Buffer.from('rbd diff v1\n'), Buffer.from('q')]), /unknown record tag 0x71/);
    // A name length of 4 GiB - 1: refused before anything is allocated.
    await refused(Buffer.concat([Buffer.from('rbd diff v1\nf'), Buffer.from([0xff, 0xff, 0xff, 0xff])]), /snapshot name of 4294967295 bytes/);
    // An offset of 2^64 - 1.
    const huge = Buffer.concat([rbdDiffStream([{ tag: 's', size: 1 << 20 }]), Buffer.from('z'), Buffer.alloc(8, 0xff), Buffer.alloc(8)]);
    await refused(huge, /out of range/);
    // v2: a record length that does not match the record.
    const v2 = rbdDiffStream([{ tag: 's', size: 1 << 20 }, { tag: 'z', offset: 0, length: 16 }, { tag: 'e' }], 2);
    v2.writeBigUInt64LE(17n, 12 + 1 + 8 + 8 + 1);
    await refused(v2, /record length 17/);
  });
});

/**
 * The index helpers gc's passes and lookups go through (src/index/db.ts), on a private
 * LevelDB in a scratch directory: slices gives every entry of a range once, in key order;
 * getManyInKeyOrder gives each key's value back in the caller's order, whatever order it
 * looked them up in.
 */
import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { getManyInKeyOrder, openPrivateDb, slices, type Db } from '../src/index/db.js';
import { Scratch } from './helpers.js';

let s: Scratch;
let db: Db;
const entries: Array<[Buffer, Buffer]> = [];

beforeAll(async () => {
  s = await Scratch.create();
  db = await openPrivateDb(s.path('index'));
  for (let i = 0; i < 5000; i++) entries.push([Buffer.concat([Buffer.of(0x63), randomBytes(32)]), randomBytes(41)]);
  await db.batch(entries.map(([key, value]) => ({ type: 'put' as const, key, value })));
  // Neighbours on both sides of the range, which no pass over it may give.
  await db.batch([
    { type: 'put', key: Buffer.of(0x62, 0xff), value: Buffer.of(1) },
    { type: 'put', key: Buffer.of(0x64), value: Buffer.of(2) },
  ]);
});

afterAll(async () => {
  await db?.close();
  await s?.cleanup();
});

describe('index helpers', () => {
  it('slices: every entry of the range once, in key order, at most `size` at a time', async () => {
    const got: Array<[Buffer, Buffer]> = [];
    const sizes: number[] = [];
    for await (const part of slices(db, { gte: Buffer.of(0x63), lt: Buffer.of(0x64) }, 512)) {
      sizes.push(part.length);
      got.push(...part);
    }
    const want = [...entries].sort((a, b) => Buffer.compare(a[0], b[0]));
    expect(got.map(([k]) => k.toString('hex'))).toEqual(want.map(([k]) => k.toString('hex')));
    expect(got.map(([, v]) => v.toString('hex'))).toEqual(want.map(([, v]) => v.toString('hex')));
    expect(Math.max(...sizes)).toBe(512);
  });

  it('getManyInKeyOrder: values in the order asked, missing keys undefined, repeats answered each time', async () => {
    const asked = [...entries.slice(0, 3000).map(([k]) => k), Buffer.concat([Buffer.of(0x63), randomBytes(32)]), entries[7]![0]];
    for (let i = asked.length - 1; i > 0; i--) {
      const j = Math.floor(Math.random() * (i + 1));
      [asked[i], asked[j]] = [asked[j]!, asked[i]!];
    }
    const byKey = new Map(entries.map(([k, v]) => [k.toString('hex'), v.toString('hex')]));
    const got = await getManyInKeyOrder(db, asked);
    expect(got).toHaveLength(asked.length);
    expect(got.map((v) => v?.toString('hex'))).toEqual(asked.map((k) => byKey.get(k.toString('hex'))));
    expect(got.filter((v) => v === undefined)).toHaveLength(1);
    expect(await getManyInKeyOrder(db, [])).toEqual([]);
  });
});

/**
 * LVM thin hints (src/source/thin.ts): thin pool metadata made here with thin_restore
 * (thin-provisioning-tools; no device-mapper needed), thin_delta between two thin devices,
 * a backup that reads only the ranges it names and restores byte-identical, and
 * --verify-hints catching a change the hints do not name.
 */
import fs from 'node:fs/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Scratch, gv, must, oneLine, prng, sha256File } from './helpers.js';
import { parseThinDeltaXml } from '../src/source/thin.js';

const B = 64 << 10; // the pool's data block: 128 sectors
let s: Scratch;
let repo: string;
let meta: string;

/**
 * Device 1: 384 blocks. Device 2, its snapshot: block 10 rewritten, 311-319 unmapped,
 * 320-323 rewritten, 324-383 unmapped.
 */
const METADATA_XML = `<superblock uuid="" time="1" transaction="2" flags="0" version="2" data_block_size="128" nr_data_blocks="2048">
  <device dev_id="1" mapped_blocks="384" transaction="0" creation_time="0" snap_time="0">
    <range_mapping origin_begin="0" data_begin="0" length="384" time="0"/>
  </device>
  <device dev_id="2" mapped_blocks="315" transaction="1" creation_time="1" snap_time="1">
    <range_mapping origin_begin="0" data_begin="0" length="10" time="0"/>
    <single_mapping origin_block="10" data_block="500" time="1"/>
    <range_mapping origin_begin="11" data_begin="11" length="300" time="0"/>
    <range_mapping origin_begin="320" data_begin="600" length="4" time="1"/>
  </device>
</superblock>
`;

function images(): { one: Buffer; two: Buffer } {
  const one = prng(31, 384 * B);
  const two = Buffer.from(one);
  prng(32, B).copy(two, 10 * B);
  two.fill(0, 311 * B, 320 * B);
  prng(33, 4 * B).copy(two, 320 * B);
  two.fill(0, 324 * B);
  return { one, two };
}

beforeAll(async () => {
  s = await Scratch.create('genvault-thin-');
  repo = s.path('repo');
  meta = s.path('tmeta.bin');
  await fs.writeFile(s.path('meta.xml'), METADATA_XML);
  await must('truncate', ['-s', '8M', meta]);
  await must('thin_restore', ['-i', s.path('meta.xml'), '-o', meta]);
  expect((await gv(repo, ['init'])).code).toBe(0);
});

afterAll(async () => {
  await s?.cleanup();
});

describe('thin_delta hints', () => {
  it('parses thin_delta output into changed byte ranges (left_only counts as changed)', () => {
    const xml = '<superblock uuid="" time="1" transaction="2" data_block_size="8" nr_data_blocks="9">\n  <diff left="1" right="2">\n' +
      '    <same begin="0" length="2"/>\n    <different begin="2" length="1"/>\n    <left_only begin="3" length="2"/>\n    <same begin="5" length="1"/>\n    <right_only begin="6" length="1"/>\n  </diff>\n</superblock>\n';
    expect(parseThinDeltaXml(xml)).toEqual([[2 * 4096, 5 * 4096], [6 * 4096, 7 * 4096]]);
    expect(() => parseThinDeltaXml('nonsense')).toThrow(/unexpected output/);
  });

  it('the first backup reads the whole snapshot; the next reads only the changed ranges and restores byte-identical', async () => {
    const { one, two } = images();
    await fs.writeFile(s.path('snap1.img'), one);
    await fs.writeFile(s.path('snap2.img'), two);
    const first = await gv(repo, ['backup', s.path('snap1.img'), '-n', 'thin', '--thin-delta', `${meta}:1:2`, '--json']);
    expect(first.code, first.stderr).toBe(0);
    expect(first.stderr).toMatch(/reading the whole disk: thin has no generation yet/);
    const r = await gv(repo, ['backup', s.path('snap2.img'), '-n', 'thin', '--thin-delta', `${meta}:1:2`, '--json']);
    expect(r.code, r.stderr).toBe(0);
    const changed = (1 + 9 + 4 + 60) * B;
    expect(JSON.parse(r.stdout).thin).toMatchObject({ mode: 'thin-delta', readBytes: changed, changedBytes: changed, parentBytes: two.length - changed });
    // Unchanged chunks are reused by digest: none was read back and hashed again.
    expect(JSON.parse(r.stdout).stats.unchangedBytes ?? 0).toBe(0);
    const out = s.path('restored.img');
    expect((await gv(repo, ['restore', 'thin@latest', out])).code).toBe(0);
    expect(await sha256File(out)).toBe(await sha256File(s.path('snap2.img')));
    await fs.rm(out);
  });

  it('--verify-hints fails the backup on a change the hints do not name, committing nothing', async () => {
    const { two } = images();
    const three = Buffer.from(two);
    three[200 * B + 17] ^= 0xff; // not in thin_delta's answer
    await fs.writeFile(s.path('snap3.img'), three);
    const before = (await gv(repo, ['list', 'thin', '--json'])).stdout;
    // The generation before is snap2's; the same metadata compares 1 and 2 again: hints that lie.
    const r = await gv(repo, ['backup', s.path('snap3.img'), '-n', 'thin', '--thin-delta', `${meta}:1:2`, '--verify-hints', '100']);
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(new RegExp(`thin_delta hints missed a change: byte ${200 * B + 17} differs .*nothing was committed`));
    expect((await gv(repo, ['list', 'thin', '--json'])).stdout).toBe(before);
  });

  it('failures: thin_delta refusing, bad specs', async () => {
    const img = s.path('snap2.img');
    const cases: Array<[string[], number, RegExp]> = [
      [['backup', img, '-n', 'thin', '--thin-delta', `${meta}:1:9`], 1, /thin_delta --snap1 1 --snap2 9 .* failed/],
      [['backup', img, '-n', 'thin', '--thin-delta', 'nonsense'], 2, /expected METADATA:FROM_ID:TO_ID/],
      [['backup', '-', '-n', 'thin', '--thin-delta', `${meta}:1:2`], 2, /--thin-delta needs the newer thin snapshot/],
      [['backup', img, '-n', 'thin', '--thin-metadata-snap'], 2, /--thin-metadata-snap needs --thin-delta/],
    ];
    for (const [args, code, re] of cases) {
      const r = await gv(repo, args);
      expect(r.code, `${args.join(' ')}: ${r.stderr}`).toBe(code);
      expect(oneLine(r.stderr)).toMatch(re);
    }
  });
});

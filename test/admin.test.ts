/**
 * The sysadmin's rough edges: commander's errors in one line, `genvault version`, the real
 * cause when FUSE cannot mount, YAML syntax errors at their line, ISO times in `run --json`,
 * protection in `list`/`info`, `status` performance data.
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CLI, Scratch, gv, gvOk, oneLine, prng, sh } from './helpers.js';

let s: Scratch;
let repo: string;
let img: string;

beforeAll(async () => {
  s = await Scratch.create('genvault-admin-');
  repo = s.path('repo');
  img = s.path('vm.img');
  await fs.writeFile(img, Buffer.concat([prng(21, 3 << 20), Buffer.alloc(1 << 20)]));
  await gvOk(repo, ['init']);
  await gvOk(repo, ['backup', img, '--name', 'vm1']);
});

afterAll(async () => {
  await s?.cleanup();
});

describe('rough edges', () => {
  it("commander's own errors are one line with the genvault: prefix, exit 2", async () => {
    const cases: Array<[string[], RegExp]> = [
      [['list', '--bogus'], /^genvault: unknown option '--bogus' \(see: genvault list --help\)$/],
      [['versoin'], /^genvault: unknown command 'versoin' \(Did you mean version\?\) \(see: genvault --help\)$/],
      [['restore'], /^genvault: missing required argument 'target' \(see: genvault restore --help\)$/],
      [['backup', img], /^genvault: required option '-n, --name <name>' not specified/],
      [['--bogus'], /^genvault: unknown option '--bogus'/],
    ];
    for (const [args, re] of cases) {
      const r = await gv(repo, args);
      expect(r.code, args.join(' ')).toBe(2);
      expect(r.stdout).toBe('');
      expect(oneLine(r.stderr)).toMatch(re);
    }
    // status: UNKNOWN (3) on stdout for monitoring, nothing on stderr.
    const st = await gv(repo, ['status', '--bogus']);
    expect(st.code).toBe(3);
    expect(st.stdout).toBe("UNKNOWN: unknown option '--bogus'\n");
    expect(st.stderr).toBe('');
  });

  it('genvault version, --version and version --json', async () => {
    const pkg = JSON.parse(await fs.readFile(new URL('../package.json', import.meta.url), 'utf8'));
    const v = await gv(null, ['version']);
    expect(v.code).toBe(0);
    expect(v.stdout).toMatch(new RegExp(`^genvault ${pkg.version.replace(/\./g, '\\.')} \\(Node\\.js ${process.versions.node}, repository format 4, `));
    expect((await gv(null, ['--version'])).stdout).toBe(`${pkg.version}\n`);
    const j = JSON.parse((await gv(null, ['version', '--json'])).stdout);
    expect(j).toMatchObject({ version: pkg.version, node: process.versions.node, format: 4 });
  });

  it('mount names why FUSE cannot mount: not empty, missing, not a directory, no /dev/fuse', async () => {
    const full = s.path('full');
    await fs.mkdir(full);
    await fs.writeFile(s.path('full', 'x'), 'x');
    await fs.writeFile(s.path('afile'), 'x');
    const cases: Array<[string, RegExp]> = [
      [full, /cannot mount: .*full is not empty \(1 entry: x\); mount on an empty directory$/],
      [s.path('missing'), /cannot mount: .*missing does not exist \(create an empty directory/],
      [s.path('afile'), /cannot mount: .*afile is not a directory/],
    ];
    for (const [mnt, re] of cases) {
      for (const fg of [[], ['--foreground']]) {
        const r = await gv(repo, ['mount', mnt, ...fg]);
        expect(r.code).toBe(1);
        expect(oneLine(r.stderr)).toMatch(re);
      }
    }
    // No /dev/fuse: a private mount namespace with an empty /dev (only /dev/null).
    const empty = s.path('empty');
    await fs.mkdir(empty);
    const r = await sh('unshare', [
      '-m',
      'sh',
      '-c',
      `mount --make-rprivate / && mount -t tmpfs tmpfs /dev && mknod -m 666 /dev/null c 1 3 && exec "$0" "${CLI}" -r "${repo}" mount "${empty}"`,
      process.execPath,
    ]);
    expect(r.code, r.stderr).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/cannot mount: \/dev\/fuse does not exist: FUSE is not available here/);
  });

  it('YAML syntax errors are reported at their line', async () => {
    const f = s.path('bad.yaml');
    await fs.writeFile(f, `repository: ${repo}\njobs:\n  a:\n    source: /dev/x\n   bad: 1\n`);
    const r = await gv(null, ['run', '--check', '-c', f]);
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toBe(`${f}:5: YAML syntax: All mapping items must start at the same column`);
    await fs.writeFile(f, `repository: ${repo}\njobs:\n  a:\n    source: /dev/x\n    tags: [a, b\n\n\n`);
    const u = await gv(null, ['run', '-c', f]);
    expect(u.code).toBe(1);
    expect(oneLine(u.stderr)).toBe(`genvault: ${f}:5: YAML syntax: Flow sequence in block collection must be sufficiently indented and end with a ] (opened here, still open at line 8)`);
  });

  it('run --json gives ISO times; list and info show protection; status has perfdata', async () => {
    const f = s.path('jobs.yaml');
    await fs.writeFile(f, `repository: ${repo}\ntimezone: UTC\njobs:\n  vm2:\n    source: ${img}\n    schedule: "0 0 * * *"\n`);
    const ran = await gv(null, ['run', '-c', f, '--all', '--json']);
    expect(ran.code, ran.stderr).toBe(0);
    const [rec] = JSON.parse(ran.stdout);
    expect(rec.started).toMatch(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
    expect(rec.finished).toMatch(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
    expect(rec.durationMs).toBe(Date.parse(rec.finished) - Date.parse(rec.started));

    await gvOk(repo, ['protect', 'vm2@latest']);
    const list = JSON.parse(await gvOk(repo, ['list', '--json']));
    expect(list.map((g: { name: string; protected: boolean }) => [g.name, g.protected])).toEqual([
      ['vm1', false],
      ['vm2', true],
    ]);
    expect(await gvOk(repo, ['list'])).toMatch(/PROT\s+TAGS\n.*vm1 .* -\s*\n.*vm2 .* yes\s*\n$/);
    expect(JSON.parse(await gvOk(repo, ['info', 'vm2@latest', '--json'])).protected).toBe(true);
    expect(await gvOk(repo, ['info', 'vm2@latest'])).toMatch(/^protected +yes /m);
    expect(await gvOk(repo, ['info', 'vm1@latest'])).toMatch(/^protected +no$/m);

    const st = await gv(null, ['status', '-c', f]);
    expect(st.code, st.stdout).toBe(0);
    const [summary, perf] = st.stdout.split('\n')[0]!.split(' | ');
    expect(summary).toBe('OK: 1 job ok, 2 images');
    expect(perf).toMatch(/^vm2_age=\d+s;;;0 vm2_missed=0;1;2;0 vm2_generations=1;;;0 vm2_stored=\d+B;;;0 vm1_generations=1;;;0 vm1_stored=\d+B;;;0$/);
  });
});

describe('stats and diff', () => {
  let r: string;
  const MiB = 1 << 20;
  beforeAll(async () => {
    r = s.path('space');
    await gvOk(r, ['init']);
    const a = prng(31, 16 * MiB);
    const b = Buffer.from(a);
    prng(32, MiB).copy(b, 4 * MiB); // one MiB changed at 4 MiB
    const c = Buffer.concat([a, prng(33, 4 * MiB)]); // another image: vm's first disk and 4 MiB more
    for (const [file, data, name] of [['a.img', a, 'vm'], ['b.img', b, 'vm'], ['c.img', c, 'other']] as const) {
      await fs.writeFile(s.path(file), data);
      await gvOk(r, ['backup', s.path(file), '--name', name]);
    }
  });

  it('diff: the changed range from the maps alone, a size change, nothing between equals', async () => {
    // No payload is read: the packs can be away.
    await fs.rename(path.join(r, 'packs'), path.join(r, 'packs.away'));
    const d = JSON.parse(await gvOk(r, ['diff', 'vm@1', 'vm@0', '--json']).finally(() => fs.rename(path.join(r, 'packs.away'), path.join(r, 'packs'))));
    expect(d.ranges).toHaveLength(1);
    const [x] = d.ranges;
    // Covers the changed MiB; wider by at most a chunk (512 KiB) on each side.
    expect(x.offset).toBeLessThanOrEqual(4 * MiB);
    expect(x.offset).toBeGreaterThanOrEqual(4 * MiB - 512 * 1024);
    expect(x.offset + x.length).toBeGreaterThanOrEqual(5 * MiB);
    expect(x.offset + x.length).toBeLessThanOrEqual(5 * MiB + 512 * 1024);
    expect(d.changedBytes).toBe(x.length);
    expect(d.a.name).toBe('vm');

    const grown = JSON.parse(await gvOk(r, ['diff', 'vm@1', 'other@latest', '--json']));
    expect(grown.ranges).toEqual([{ offset: 16 * MiB, length: 4 * MiB }]);
    expect(grown.size).toBe(20 * MiB);

    const same = JSON.parse(await gvOk(r, ['diff', 'vm@0', 'vm@0', '--json']));
    expect(same.ranges).toEqual([]);
    expect(same.sharedLeaves).toBeGreaterThan(0);

    const text = await gvOk(r, ['diff', 'vm@1', 'vm@0']);
    expect(text.split('\n')[0]).toMatch(/^vm@[0-9a-f]{16} -> vm@[0-9a-f]{16}: 1 changed range, [\d.]+ MiB of 16\.0 MiB \(\d+\.\d\d%\)$/);
    const bad = await gv(r, ['diff', 'vm@0', 'nope@0']);
    expect(bad.code).toBe(1);
    expect(oneLine(bad.stderr)).toMatch(/no image named nope/);
  });

  it('stats: stored, shared and unique per image; what forgetting a generation frees is what gc then finds', async () => {
    const st = JSON.parse(await gvOk(r, ['stats', '--json']));
    const by = Object.fromEntries(st.images.map((i: { name: string }) => [i.name, i]));
    for (const i of st.images) expect(i.sharedBytes + i.uniqueBytes).toBe(i.storedBytes);
    expect(by.vm.generations).toBe(2);
    expect(by.other.generations).toBe(1);
    // other's own bytes: its 4 MiB tail (random data does not compress), about one chunk more at most.
    expect(by.other.uniqueBytes).toBeGreaterThan(4 * MiB);
    expect(by.other.uniqueBytes).toBeLessThan(4 * MiB + 600 * 1024);
    // vm's own bytes: the changed MiB of its newest generation.
    expect(by.vm.uniqueBytes).toBeGreaterThan(MiB);
    expect(by.vm.uniqueBytes).toBeLessThan(MiB + 1200 * 1024);
    expect(st.unreferencedBytes).toBe(0);
    expect(st.referencedBytes).toBe(by.vm.uniqueBytes + by.other.storedBytes);

    const one = JSON.parse(await gvOk(r, ['stats', 'vm', '--json']));
    expect(one.images).toHaveLength(1);
    const [older, newer] = one.images[0].perGeneration;
    expect(older.uniqueBytes).toBe(0); // all of it is in other too
    expect(newer.uniqueBytes).toBe(by.vm.uniqueBytes);
    expect(await gvOk(r, ['stats', 'vm'])).toMatch(/REV\s+ID\s+CREATED \(UTC\)\s+PROT\s+FREES\n\s*1 /);

    await gvOk(r, ['forget', 'vm@0', '--force-young']);
    const after = JSON.parse(await gvOk(r, ['stats', '--json']));
    expect(after.unreferencedBytes).toBe(newer.uniqueBytes);
    expect(after.referencedBytes).toBe(st.referencedBytes - newer.uniqueBytes);
    await gvOk(r, ['gc']);
    expect(JSON.parse(await gvOk(r, ['stats', '--json'])).unreferencedBytes).toBe(0);
    const missing = await gv(r, ['stats', 'nope']);
    expect(missing.code).toBe(1);
    expect(oneLine(missing.stderr)).toMatch(/no image named nope/);
  });
});

/**
 * The sysadmin's rough edges: commander's errors in one line, `genvault version`, the real
 * cause when FUSE cannot mount, YAML syntax errors at their line, ISO times in `run --json`,
 * protection in `list`/`info`, `status` performance data.
 */
import { FORMAT_VERSION } from '../src/format/config.js';
import fs from 'node:fs/promises';
import http from 'node:http';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ConfigError, formatProblem, parseJobsText } from '../src/jobs/config.js';
import { CLI, CliProcess, ROOT, Scratch, gv, gvOk, makeDisk, oneLine, prng, sh, withMountedDisk } from './helpers.js';

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
      [['info', 'vm1@latest', 'extra'], /^genvault: too many arguments for 'info'\. Expected 1 argument but got 2\. \(see: genvault info --help\)$/],
      [['run', '--log-format'], /^genvault: option '--log-format <format>' argument missing \(see: genvault run --help\)$/],
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

  it('option values are parsed by commander: a bad one is one line naming the option, the value and a good one, exit 2', async () => {
    const bad = (opt: string, value: string, expected: string) =>
      new RegExp(`^genvault: option '${opt}' argument '${value}' is invalid\\. ${expected}.* \\(see: genvault \\w+ --help\\)$`);
    const cases: Array<[string[], RegExp]> = [
      [['backup', img, '-n', 'x', '--max-size', '10Q'], bad('--max-size <size>', '10Q', 'Expected a size such as 4096, 512M')],
      [['mount', s.path('m'), '--cache-size', 'lots'], bad('--cache-size <size>', 'lots', 'Expected a size such as')],
      [['backup', img, '-n', 'x', '--limit-rate', 'fast'], bad('--limit-rate <rate>', 'fast', 'Expected bytes per second such as 512K or 20M')],
      [['sync', repo, s.path('dst'), '--limit-rate', '-1'], bad('--limit-rate <rate>', '-1', 'Expected bytes per second')],
      [['prune', '--keep-last', '1', '--min-age', '1y'], bad('--min-age <duration>', '1y', 'Expected a duration such as 0, 90m, 36h, 7d, 2w or 1d12h')],
      [['verify', '--sample', '101'], bad('--sample <percent>', '101', 'Expected a percentage above 0 and at most 100')],
      [['gc', '--repack-threshold', '5x'], bad('--repack-threshold <percent>', '5x', 'Expected a percentage from 0 to 100')],
      [['prune', '--keep-daily', '7.5'], bad('--keep-daily <n>', '7\\.5', 'Expected a whole number >= 0, such as 7')],
      [['backup', img, '-n', 'x', '--ssh-mode', 'fast'], bad('--ssh-mode <mode>', 'fast', 'Allowed choices are auto, agent, plain')],
      [['init', '--encryption', 'rot13'], bad('--encryption <mode>', 'rot13', 'Allowed choices are aes-256-gcm, none')],
      [['init', '--group', '-x'], bad('--group <group>', '-x', 'Expected a group name')],
    ];
    for (const [args, re] of cases) {
      const r = await gv(repo, args);
      expect(r.code, args.join(' ')).toBe(2);
      expect(r.stdout, args.join(' ')).toBe('');
      expect(r.stderr.trimEnd().split('\n'), args.join(' ')).toHaveLength(1);
      expect(oneLine(r.stderr), args.join(' ')).toMatch(re);
    }
    // Refused before the action: nothing was backed up.
    expect(JSON.parse((await gvOk(repo, ['list', '--json'])).toString()).some((g: { name: string }) => g.name === 'x')).toBe(false);
    // Good values still parse: percent with %, a size with a binary suffix, a sum of durations.
    const ok = await gv(repo, ['prune', 'vm1', '--keep-last', '1', '--min-age', '1d12h', '--dry-run', '--json']);
    expect(ok.code, ok.stderr).toBe(0);
    expect(JSON.parse(ok.stdout).minAge).toBe('1d12h');
    // status: the same line as UNKNOWN on stdout, exit 3 (monitoring plugins).
    const st = await gv(repo, ['status', '--now', 'tomorrow']);
    expect(st.code).toBe(3);
    expect(st.stdout).toMatch(/^UNKNOWN: option '--now <time>' argument 'tomorrow' is invalid\. Expected an ISO date or time such as 2026-05-01/);
    expect(st.stderr).toBe('');
  });

  it('genvault version, --version and version --json', async () => {
    const pkg = JSON.parse(await fs.readFile(new URL('../package.json', import.meta.url), 'utf8'));
    const v = await gv(null, ['version']);
    expect(v.code).toBe(0);
    expect(v.stdout).toMatch(new RegExp(`^genvault ${pkg.version.replace(/\./g, '\\.')} \\(Node\\.js ${process.versions.node}, repository format ${FORMAT_VERSION}, `));
    expect((await gv(null, ['--version'])).stdout).toBe(`${pkg.version}\n`);
    const j = JSON.parse((await gv(null, ['version', '--json'])).stdout);
    expect(j).toMatchObject({ version: pkg.version, node: process.versions.node, format: FORMAT_VERSION, addons: { holes: true, gcm: true } });
    expect(v.stdout).not.toMatch(/not built/);
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
  it('diff --files: the changed files of an ext4 partition, narrowed to the sectors that differ', async () => {
    const disk = s.path('ext4.img');
    const keep = prng(51, 300 << 10);
    await makeDisk(s, disk, 64, async (dir) => {
      await fs.mkdir(path.join(dir, 'etc'));
      await fs.writeFile(path.join(dir, 'etc', 'keep.bin'), keep);
      await fs.writeFile(path.join(dir, 'etc', 'change.bin'), prng(52, 200 << 10));
      await fs.writeFile(path.join(dir, 'gone.bin'), prng(53, 100 << 10));
    });
    await gvOk(r, ['backup', disk, '--name', 'disk']);
    await withMountedDisk(s, disk, async (dir) => {
      const fh = await fs.open(path.join(dir, 'etc', 'change.bin'), 'r+');
      await fh.write(prng(54, 8192), 0, 8192, 40960); // in place: blocks 10 and 11
      await fh.close();
      await fs.rm(path.join(dir, 'gone.bin'));
      await fs.writeFile(path.join(dir, 'new.bin'), prng(55, 50 << 10));
    });
    await gvOk(r, ['backup', disk, '--name', 'disk']);
    const runDir = s.path('run');
    const j = await gv(r, ['diff', 'disk@1', 'disk@0', '--files', '--json'], { env: { GENVAULT_RUN_DIR: runDir } });
    expect(j.code, j.stderr).toBe(0);
    const [p1] = JSON.parse(j.stdout).fileSystems;
    expect(p1).toMatchObject({ partition: 1, offset: 1 << 20, fs: 'ext2/3/4' });
    expect(p1.files).toEqual([
      { path: '/', in: ['a', 'b'] }, // gone.bin removed, new.bin added: the root directory's block
      { path: '/etc/change.bin', in: ['a', 'b'] },
      { path: '/new.bin', in: ['b'] },
    ]);
    expect(await fs.readdir(runDir)).toEqual([]); // the private mount is gone
    const t = await gvOk(r, ['diff', 'disk@1', 'disk@0', '--files']);
    expect(t).toMatch(/\npartition 1 \(ext2\/3\/4 at 1048576\): 3 changed paths, \d+ changed metadata blocks\n  ~ \/\n  ~ \/etc\/change\.bin\n  \+ \/new\.bin\n$/);
    // An image without a file system: named with its changed bytes, not looked into.
    const raw = JSON.parse(await gvOk(r, ['diff', 'vm@latest', 'other@latest', '--files', '--json']));
    expect(raw.fileSystems).toEqual([expect.objectContaining({ partition: null, offset: 0, fs: null, files: [] })]);
  });
});

describe('logging, notifications, metrics', () => {
  let r: string;
  let hooks: { body: string; headers: http.IncomingHttpHeaders }[];
  let server: http.Server;
  let url: string;
  let failWebhook = false;

  beforeAll(async () => {
    r = s.path('jobs-repo');
    await gvOk(r, ['init']);
    hooks = [];
    server = http.createServer((req, res) => {
      let body = '';
      req.on('data', (d) => (body += d));
      req.on('end', () => {
        hooks.push({ body, headers: req.headers });
        res.statusCode = failWebhook ? 500 : 204;
        res.end();
      });
    });
    await new Promise<void>((ok) => server.listen(0, '127.0.0.1', ok));
    url = `http://127.0.0.1:${(server.address() as { port: number }).port}/hook/secret-token`;
    await fs.writeFile(s.path('sendmail'), `#!/bin/sh\necho "$@" > ${s.path('mail.args')}\ncat >> ${s.path('mail.txt')}\n`, { mode: 0o755 });
  });

  afterAll(async () => {
    await new Promise((ok) => server?.close(ok));
  });

  const jobsFile = async (notify: string) => {
    const f = s.path('notify.yaml');
    await fs.writeFile(
      f,
      `repository: ${r}\ndefaults:\n  notify:\n${notify}jobs:\n  good:\n    source: ${img}\n  bad:\n    source: ${s.path('gone.img')}\n    schedule: "0 0 * * *"\n`,
    );
    return f;
  };

  it('--log-format journal: sd-daemon priorities, failures at err; auto when writing to the journal', async () => {
    const f = await jobsFile(`    command: "true"\n`);
    const run = await gv(null, ['run', '-c', f, '--all', '--log-format', 'journal']);
    expect(run.code).toBe(1);
    expect(run.stdout).toMatch(/^<6>good: ok: generation [0-9a-f]{8}, /);
    expect(run.stderr).toMatch(/^<3>bad: FAILED \(backup\): cannot read source .*gone\.img: no such file or directory\n$/);
    // A command's own error line too.
    const norepo = await gv(null, ['run', '-c', f, '--all', '--log-format', 'journal', '-r', s.path('nowhere')]);
    expect(oneLine(norepo.stderr)).toMatch(/^<3>genvault: .*nowhere: not a genvault repository/);
    const bad = await gv(null, ['run', '-c', f, '--log-format', 'syslog']);
    expect(bad.code).toBe(2);
    expect(oneLine(bad.stderr)).toMatch(/^genvault: option '--log-format <format>' argument 'syslog' is invalid\. Allowed choices are auto, text, journal\./);
    // auto: systemd names the journal stream in JOURNAL_STREAM (device:inode).
    const log = s.path('journal.log');
    await fs.writeFile(log, '');
    const st = await fs.stat(log);
    const auto = await sh('sh', ['-c', `exec "$0" "${CLI}" run -c "${f}" bad --now >>"${log}" 2>&1`, process.execPath], {
      env: { JOURNAL_STREAM: `${st.dev}:${st.ino}`, GENVAULT_NO_PROGRESS: '1' },
    });
    expect(auto.code).toBe(1);
    expect(await fs.readFile(log, 'utf8')).toMatch(/^<3>bad: FAILED \(backup\)/);
    // The daemon: journal lines without time stamps (journald adds its own).
    const df = s.path('daemon.yaml');
    await fs.writeFile(df, `repository: ${r}\njobs:\n  dbad:\n    source: ${s.path('gone.img')}\n    schedule: "0 0 * * *"\n`);
    const d = new CliProcess(['daemon', '-c', df, '--log-format', 'journal', '--metrics-file', s.path('daemon.prom')]);
    try {
      await d.waitFor(/<3>dbad: FAILED/, 30_000);
      d.kill('SIGTERM');
      expect(await d.waitExit(30_000)).toEqual({ code: 0, signal: null });
    } finally {
      d.kill('SIGKILL');
    }
    expect(d.out).toMatch(/^<6>started: 1 jobs from /);
    expect(d.out).toMatch(/<6>stopped\n$/);
    expect(await fs.readFile(s.path('daemon.prom'), 'utf8')).toMatch(/^genvault_job_last_run_success\{job="dbad",image="dbad"\} 0$/m);
  });

  it('notify: a command, an e-mail through sendmail and a webhook on failure, with the job, the error and the figures', async () => {
    hooks.length = 0;
    await fs.rm(s.path('mail.txt'), { force: true });
    const f = await jobsFile(
      `    command: 'cat > ${s.path('cmd.json')}; echo "$GENVAULT_JOB $GENVAULT_STATUS $GENVAULT_STAGE $GENVAULT_BYTES_READ" > ${s.path('cmd.env')}'\n` +
        `    email: [root@example.com, backup@example.org]\n    sendmail: ${s.path('sendmail')}\n    webhook: ${url}\n`,
    );
    const run = await gv(null, ['run', '-c', f, '--all']);
    expect(run.code).toBe(1);
    expect(run.stderr).not.toMatch(/notification/);
    // Failures only (the default): one of each, for the bad job.
    const cmd = JSON.parse(await fs.readFile(s.path('cmd.json'), 'utf8'));
    expect(cmd).toMatchObject({ event: 'failure', job: 'bad', image: 'bad', status: 'failed', stage: 'backup', repository: r });
    expect(cmd.error).toMatch(/cannot read source .*gone\.img: no such file or directory/);
    expect(cmd.started).toMatch(/Z$/);
    expect(await fs.readFile(s.path('cmd.env'), 'utf8')).toBe('bad failed backup 0\n');
    const mail = await fs.readFile(s.path('mail.txt'), 'utf8');
    expect(await fs.readFile(s.path('mail.args'), 'utf8')).toBe('-t -oi\n');
    expect(mail).toMatch(/^To: root@example.com, backup@example.org\nSubject: genvault: job bad FAILED \(backup\) on .+\n/);
    expect(mail).toMatch(/^Error: +cannot read source .*gone\.img/m);
    expect(hooks).toHaveLength(1);
    expect(hooks[0]!.headers['content-type']).toBe('application/json');
    expect(JSON.parse(hooks[0]!.body)).toMatchObject({ event: 'failure', job: 'bad', status: 'failed' });

    // on: always also reports successes, with the figures; a webhook that fails is an err line
    // (its URL's path, which may hold a token, left out), the exit status stays the runs'.
    hooks.length = 0;
    failWebhook = true;
    const g = await jobsFile(`    on: always\n    webhook: ${url}\n`);
    const ok = await gv(null, ['run', '-c', g, 'good', '--now']);
    failWebhook = false;
    expect(ok.code).toBe(0);
    expect(oneLine(ok.stderr)).toMatch(/^good: notification webhook http:\/\/127\.0\.0\.1:\d+ failed: HTTP 500 Internal Server Error$/);
    const sent = JSON.parse(hooks[0]!.body);
    expect(sent).toMatchObject({ event: 'success', job: 'good', status: 'ok', generation: { size: 4 << 20, bytesRead: 4 << 20 } });
    expect(sent.generation.newStored).toBeGreaterThanOrEqual(0);
  });

  it("genvault notify (the units' OnFailure=): the defaults' notify, whatever its on:", async () => {
    hooks.length = 0;
    await fs.rm(s.path('mail.txt'), { force: true });
    const f = await jobsFile(`    command: 'cat > ${s.path('unit.json')}; echo "$GENVAULT_UNIT $GENVAULT_STATUS" > ${s.path('unit.env')}'\n    email: root@example.com\n    sendmail: ${s.path('sendmail')}\n    webhook: ${url}\n`);
    const sentOk = await gv(null, ['notify', '-c', f, '--unit', 'genvault-daemon.service']);
    expect(sentOk.code, sentOk.stderr).toBe(0);
    const sent = JSON.parse(await fs.readFile(s.path('unit.json'), 'utf8'));
    expect(sent).toMatchObject({ event: 'failure', unit: 'genvault-daemon.service', status: 'failed', error: 'genvault-daemon.service failed' });
    expect(Array.isArray(sent.journal)).toBe(true);
    expect(await fs.readFile(s.path('unit.env'), 'utf8')).toBe('genvault-daemon.service failed\n');
    expect(await fs.readFile(s.path('mail.txt'), 'utf8')).toMatch(/^To: root@example.com\nSubject: genvault: genvault-daemon.service FAILED on /);
    expect(JSON.parse(hooks[0]!.body)).toMatchObject({ unit: 'genvault-daemon.service' });
    const m = await gv(null, ['notify', '-c', f, '--message', 'nightly verify found damage']);
    expect(m.code).toBe(0);
    expect(JSON.parse(await fs.readFile(s.path('unit.json'), 'utf8')).error).toBe('nightly verify found damage');
    // Nowhere to send: one line, exit 1.
    const none = s.path('none.yaml');
    await fs.writeFile(none, `repository: ${r}\njobs:\n  a:\n    source: ${img}\n`);
    const n = await gv(null, ['notify', '-c', none, '--unit', 'x.service']);
    expect(n.code).toBe(1);
    expect(oneLine(n.stderr)).toBe(`genvault: ${none}: no notify: under defaults:, nowhere to send to`);
  });

  it('notify: job-file problems named at their line', () => {
    const text = (notify: string) => `repository: /srv/gv\njobs:\n  a:\n    source: /dev/x\n    notify:\n${notify}`;
    const problems = (t: string): string[] => {
      try {
        parseJobsText(t, 'jobs.yaml');
        return [];
      } catch (e) {
        if (e instanceof ConfigError) return e.problems.map((p) => formatProblem('jobs.yaml', p));
        throw e;
      }
    };
    expect(problems(text('      comand: x\n'))).toEqual(['jobs.yaml:6: jobs.a.notify.comand: unknown field (did you mean command?)']);
    expect(problems(text('      on: sometimes\n      command: x\n'))).toEqual(['jobs.yaml:6: jobs.a.notify.on: expected "failure" (failed runs only) or "always" (every run)']);
    expect(problems(text('      email: root\n'))).toEqual(['jobs.yaml:6: jobs.a.notify.email: "root" is not an e-mail address (such as root@example.com)']);
    expect(problems(text('      webhook: ftp://x/y\n'))).toEqual(['jobs.yaml:6: jobs.a.notify.webhook: expected an http:// or https:// URL']);
    expect(problems(text('      email: a@b\n      sendmail: sendmail\n'))).toEqual(['jobs.yaml:7: jobs.a.notify.sendmail: expected the absolute path of a sendmail program']);
    expect(problems(text('      timeout: 5m\n'))).toEqual(['jobs.yaml:6: jobs.a.notify: sends nothing: give command, email or webhook (or notify: false to turn it off)']);
    expect(problems(text('      command: x\n      timeout: soon\n'))).toEqual(['jobs.yaml:7: jobs.a.notify.timeout: expected a duration such as 90s, 30m, 36h, 7d, 2w or 0']);
    // A job turns the defaults' notify off with false.
    const f = parseJobsText('repository: /srv/gv\ndefaults:\n  notify: { command: x }\njobs:\n  a:\n    source: /dev/x\n  b:\n    source: /dev/y\n    notify: false\n', 'j.yaml');
    expect(f.jobs.map((j) => j.notify?.command ?? null)).toEqual(['x', null]);
  });

  it('--metrics-file: Prometheus textfile with every job and the repository, written atomically', async () => {
    const f = await jobsFile(`    command: "true"\n`);
    const dir = s.path('textfile');
    await fs.mkdir(dir);
    const m = path.join(dir, 'genvault.prom');
    const run = await gv(null, ['run', '-c', f, '--all', '--metrics-file', m]);
    expect(run.code).toBe(1);
    expect(await fs.readdir(dir)).toEqual(['genvault.prom']); // no temporary file left
    expect((await fs.stat(m)).mode & 0o777).toBe(0o644);
    const text = await fs.readFile(m, 'utf8');
    const value = (re: RegExp) => Number(text.match(re)?.[1]);
    expect(text).toMatch(/^# HELP genvault_job_last_run_timestamp_seconds .*\n# TYPE genvault_job_last_run_timestamp_seconds gauge\n/);
    expect(value(/^genvault_job_last_run_success\{job="good",image="good"\} (\d+)$/m)).toBe(1);
    expect(value(/^genvault_job_last_run_success\{job="bad",image="bad"\} (\d+)$/m)).toBe(0);
    expect(Math.abs(value(/^genvault_job_last_success_timestamp_seconds\{job="good",image="good"\} ([\d.]+)$/m) - Date.now() / 1000)).toBeLessThan(120);
    expect(text).not.toMatch(/genvault_job_last_success_timestamp_seconds\{job="bad"/);
    expect(value(/^genvault_job_last_success_bytes_read\{job="good",image="good"\} (\d+)$/m)).toBe(4 << 20);
    expect(value(/^genvault_job_last_success_bytes_new\{job="good",image="good"\} (\d+)$/m)).toBeGreaterThanOrEqual(0);
    expect(value(/^genvault_job_last_success_bytes_stored\{job="good",image="good"\} (\d+)$/m)).toBeGreaterThanOrEqual(0);
    expect(value(/^genvault_job_last_success_duration_seconds\{job="good",image="good"\} ([\d.]+)$/m)).toBeGreaterThan(0);
    let packBytes = 0;
    for (const sub of await fs.readdir(path.join(r, 'packs'))) for (const p of await fs.readdir(path.join(r, 'packs', sub))) packBytes += (await fs.stat(path.join(r, 'packs', sub, p))).size;
    expect(value(new RegExp(`^genvault_repository_size_bytes\\{repository="${r}"\\} (\\d+)$`, 'm'))).toBe(packBytes);
    // Nothing due: the file is still rewritten (its time stamp moves on).
    const before = value(/^genvault_metrics_timestamp_seconds (\S+)$/m);
    expect((await gv(null, ['run', '-c', f, '--metrics-file', m])).code).toBe(0);
    const after = Number((await fs.readFile(m, 'utf8')).match(/^genvault_metrics_timestamp_seconds (\S+)$/m)?.[1]);
    expect(after).toBeGreaterThan(before);
    const unwritable = await gv(null, ['run', '-c', f, 'bad', '--now', '--metrics-file', s.path('no-dir', 'x.prom')]);
    expect(unwritable.stderr).toMatch(/^cannot write metrics file .*no-dir\/x\.prom: ENOENT/m);
  });
});

describe('install', () => {
  it('scripts/install: /usr/bin/genvault from cron\'s PATH with the checkout gone; man page, bash completion, units', async () => {
    // Into an overlay of /usr in a private mount namespace: the real /usr is never written.
    // Then the checkout (and the node_modules it links to) is hidden under empty tmpfs
    // mounts, as if moved away, and genvault runs with cron's environment.
    const ovl = s.path('ovl');
    for (const d of ['up', 'work', 'tmp']) await fs.mkdir(path.join(ovl, d), { recursive: true });
    const modules = await fs.realpath(path.join(ROOT, 'node_modules'));
    const sparse = s.path('sparse.img');
    await fs.writeFile(sparse, prng(41, 1 << 20));
    await fs.truncate(sparse, 64 << 20); // a 63 MiB hole at the end
    const mnt = s.path('inst-mnt');
    await fs.mkdir(mnt);
    const cron = 'env -i PATH=/usr/bin:/bin HOME=/root LANG=C';
    const script = [
      'set -e',
      'mount --make-rprivate /',
      `mount -t overlay overlay -o lowerdir=/usr,upperdir=${ovl}/up,workdir=${ovl}/work /usr`,
      `scripts/install 2>${ovl}/install.log`,
      'cd /',
      // node_modules: hidden first, in case it lies elsewhere (a link out of the checkout).
      `mount -t tmpfs tmpfs ${modules}`,
      `mountpoint -q ${ROOT} || mount -t tmpfs tmpfs ${ROOT}`,
      `test ! -e ${ROOT}/package.json`,
      `${cron} sh -c 'command -v genvault'`,
      `${cron} genvault version --json | tr -d '\\n'; echo`,
      `${cron} genvault -r ${s.path('inst-repo')} init --encryption none >/dev/null`,
      `${cron} genvault -r ${s.path('inst-repo')} backup ${sparse} --name sp --json > ${ovl}/backup.json`,
      `${cron} genvault -r ${s.path('inst-repo')} restore sp@latest ${s.path('restored.img')} >/dev/null`,
      `cmp ${sparse} ${s.path('restored.img')}`,
      `${cron} genvault -r ${s.path('inst-repo')} mount ${mnt} >/dev/null`,
      `cmp ${sparse} ${mnt}/sp/latest || { ${cron} genvault umount ${mnt}; exit 1; }`,
      `${cron} genvault umount ${mnt} >/dev/null`,
      `${cron} MANWIDTH=80 man genvault 2>/dev/null | grep -E '^[A-Z][A-Z ]+$|^   genvault (diff|notify)( |$)' | tr '\\n' ,; echo`,
      `bash -c 'source /usr/share/bash-completion/completions/genvault; COMP_WORDS=(genvault sta); COMP_CWORD=1; _genvault; echo "\${COMPREPLY[*]}"; COMP_WORDS=(genvault run --met); COMP_CWORD=2; _genvault; echo "\${COMPREPLY[*]}"'`,
      'grep -h ^ExecStart= /usr/lib/systemd/system/genvault-*.service',
      // The installed units: valid, and rated by systemd's own exposure score.
      'if command -v systemd-analyze >/dev/null; then',
      '  cd /usr/lib/systemd/system',
      '  echo "verify: $(systemd-analyze verify genvault-daemon.service genvault-run.service genvault-run.timer genvault-mount@.service genvault-notify@.service 2>&1)"',
      '  for u in genvault-daemon.service genvault-run.service genvault-mount@.service genvault-notify@.service; do systemd-analyze security --offline=yes --no-pager ./$u | tail -1; done',
      'fi',
    ].join('\n');
    const realBefore = await fs.stat('/usr/lib/genvault/package.json').catch(() => null);
    const r = await sh('unshare', ['-m', 'bash', '-c', script], { cwd: ROOT });
    const log = await fs.readFile(path.join(ovl, 'install.log'), 'utf8').catch(() => '');
    expect(r.code, `${r.stderr}\n${log}`).toBe(0);
    const out = r.stdout.split('\n');
    expect(out[0]).toBe('/usr/bin/genvault');
    const v = JSON.parse(out[1]!);
    expect(v).toMatchObject({ installedAt: '/usr/lib/genvault', format: FORMAT_VERSION, addons: { holes: true, gcm: true } });
    // It runs on the runtime the lock file pins (copied with it), not on cron's PATH's node.
    expect(Number(v.node.split('.')[0])).toBeGreaterThanOrEqual(24);
    // The holes addon came along: (most of) the hole was skipped, not read.
    expect(JSON.parse(await fs.readFile(path.join(ovl, 'backup.json'), 'utf8')).stats.holeBytes).toBeGreaterThan(32 << 20);
    expect(out[2]).toBe('NAME,SYNOPSIS,DESCRIPTION,COMMANDS,   genvault diff <a> <b>,   genvault notify,EXAMPLES,EXIT STATUS,ENVIRONMENT,FILES,SEE ALSO,');
    expect(out[3]).toBe('status stats');
    expect(out[4]).toBe('--metrics-file');
    expect(out.slice(5, 9)).toEqual([
      'ExecStart=/usr/bin/genvault daemon --config /etc/genvault/jobs.yaml --log-format journal --metrics-file /var/lib/genvault/genvault.prom',
      'ExecStart=/usr/bin/genvault mount --foreground %f',
      'ExecStart=/usr/bin/genvault notify --config /etc/genvault/jobs.yaml --unit %i',
      'ExecStart=/usr/bin/genvault run --config /etc/genvault/jobs.yaml --log-format journal --metrics-file /var/lib/genvault/genvault.prom',
    ]);
    if (out[9] === undefined || out[9] === '') {
      console.log('systemd-analyze is not installed: units not verified or scored');
    } else {
      expect(out[9]).toBe('verify: ');
      const scores = out.slice(10, 14).map((l) => l.match(/exposure level for (\S+): ([\d.]+) (\w+)/)!.slice(1));
      console.log(`systemd-analyze security --offline=yes: ${scores.map(([u, n, w]) => `${u} ${n} ${w}`).join(', ')}`);
      for (const [u, n] of scores) expect(Number(n), u).toBeLessThanOrEqual(4.0);
    }
    // Nothing reached the real /usr (where scripts/setup may have installed genvault before: unchanged then).
    const realAfter = await fs.stat('/usr/lib/genvault/package.json').catch(() => null);
    expect(realAfter?.mtimeMs ?? null).toBe(realBefore?.mtimeMs ?? null);
    expect(log).toMatch(/^install: genvault \d+\.\d+\.\d+ in \/usr\/lib\/genvault/m);
  });
});

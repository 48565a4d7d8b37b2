/**
 * The promises the README makes about backup jobs, each shown with real processes:
 * - a second run of a job while the first runs is skipped, says so, and is no failure;
 * - a job's `grace` moves the point where status turns from OK to WARN;
 * - status is CRIT, with a first line saying why, when the job file cannot be read;
 * - stopping the daemon during a run waits for the run's post-hooks;
 * - SIGHUP makes the daemon use the changed job file;
 * - cron and the daemon never run a job twice for one scheduled time.
 *
 * Hooks that must hold a run in place run hold.sh (written to the scratch dir): it records
 * which genvault process ran it and waits (at most 60 s) for a release file the test creates. Every wait here is for an event (a
 * file appearing, a line of output, a process exit) and bounded; afterEach releases every
 * hook and kills every process a test started, whether it passed or not.
 */
import { existsSync } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { loadJobsFile } from '../src/jobs/config.js';
import { recentRuns } from '../src/jobs/history.js';
import { isDue, lastStarted, runJob } from '../src/jobs/runner.js';
import { Repository } from '../src/repository/repository.js';
import { CLI, CliProcess, Scratch, gv, gvOk, prng, sh, waitForFile } from './helpers.js';
import { unprivUser } from './unpriv.js';

let s: Scratch;
let repo: string;
let img: string;
let holdScript: string;
const env = { SSH_AUTH_SOCK: '', SSH_CONNECTION: '' };
const procs: CliProcess[] = [];
const releases: string[] = [];

beforeAll(async () => {
  s = await Scratch.create('genvault-jobprom-');
  // Traversable, not writable, by others: the unprivileged user reads job files here.
  await fs.chmod(s.dir, 0o755);
  repo = s.path('repo');
  img = s.path('small.img');
  await fs.writeFile(img, prng(5, 1 << 20));
  await gvOk(repo, ['init']);
  holdScript = s.path('hold.sh');
  await fs.writeFile(
    holdScript,
    [
      '# hold.sh DIR PID: note that process PID (the genvault running this hook) got here, then',
      '# wait at most 60 s for DIR/release; at the end, note whether PID is still alive.',
      'd=$1; pid=$2',
      'echo "$pid" >> "$d/log"',
      'echo "$pid" > "$d/started.$$" && mv "$d/started.$$" "$d/started"',
      'i=0',
      'while [ ! -e "$d/release" ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done',
      '[ -e "$d/release" ] || exit 9',
      'if kill -0 "$pid" 2>/dev/null; then a=alive; else a=gone; fi',
      'echo "$a" > "$d/end.$$" && mv "$d/end.$$" "$d/end"',
      '',
    ].join('\n'),
  );
});

afterEach(async () => {
  // Let every held hook finish, then make sure no process of this test outlives it.
  for (const r of releases.splice(0)) await fs.writeFile(r, '').catch(() => undefined);
  for (const p of procs) p.kill('SIGKILL');
  await Promise.all(procs.splice(0).map((p) => p.waitExit(10_000).catch(() => undefined)));
});

afterAll(async () => {
  await s?.cleanup();
});

function start(args: string[]): CliProcess {
  const p = new CliProcess(args, env);
  procs.push(p);
  return p;
}

/** A job file (mode 0600) in the scratch dir, written atomically. */
async function jobFile(name: string, body: string): Promise<string> {
  const f = s.path(name);
  await fs.writeFile(`${f}.tmp`, `repository: ${repo}\n${body}`, { mode: 0o600 });
  await fs.rename(`${f}.tmp`, f);
  return f;
}

/** A hook that holds its run until release(); `started` appears when it runs. */
async function holder(name: string) {
  const dir = s.path(`hold-${name}`);
  await fs.mkdir(dir);
  const release = path.join(dir, 'release');
  releases.push(release);
  return {
    hook: `{ run: 'sh ${holdScript} ${dir} $PPID', on: local, timeout: 90s }`,
    started: path.join(dir, 'started'),
    end: path.join(dir, 'end'),
    /** The pids of the genvault processes that ran the hook, in order. */
    owners: async () => (await fs.readFile(path.join(dir, 'log'), 'utf8').catch(() => '')).split('\n').filter(Boolean),
    release: () => fs.writeFile(release, ''),
  };
}

async function generations(image: string): Promise<number> {
  return JSON.parse(await gvOk(repo, ['list', image, '--json'])).length;
}

describe('a second run of a job', () => {
  it('while the first runs is skipped, says so, exits 0 and runs no hook; the first completes', async () => {
    const h = await holder('second');
    const f = await jobFile('second.yaml', `jobs:\n  second:\n    source: ${img}\n    hooks:\n      pre: [${h.hook}]\n`);
    const first = start(['run', '-c', f, 'second', '--now']);
    await waitForFile(h.started, 30_000);
    expect(await h.owners()).toEqual([String(first.pid)]);

    const second = await gv(null, ['run', '-c', f, 'second', '--now'], { env });
    // `run --help`: a job whose image another process is backing up is skipped, not a failure.
    expect(second.code, second.stderr).toBe(0);
    expect(second.stderr).toBe('');
    expect(second.stdout).toBe(`second: skipped: another backup of image second is running (pid ${first.pid})\n`);
    const json = await gv(null, ['run', '-c', f, 'second', '--now', '--json'], { env });
    expect(json.code).toBe(0);
    expect(JSON.parse(json.stdout)).toEqual([{ job: 'second', skipped: `another backup of image second is running (pid ${first.pid})` }]);
    // The skipped runs took no step of a run: no hook, no generation, no run record.
    expect(await h.owners()).toEqual([String(first.pid)]);
    expect(first.running).toBe(true);

    await h.release();
    expect(await first.waitExit(60_000)).toEqual({ code: 0, signal: null });
    expect(first.out).toMatch(/^second: ok: generation [0-9a-f]{8}, 1\.00 MiB read/);
    expect(await generations('second')).toBe(1);
    const r = await Repository.open(repo);
    try {
      expect((await recentRuns(r, 'second')).map((x) => x.status)).toEqual(['ok']);
    } finally {
      await r.close();
    }
    // The lock went with the first run: the next one runs.
    const third = await gv(null, ['run', '-c', f, 'second', '--now'], { env });
    expect(third.code, third.stderr).toBe(0);
    expect(third.stdout).toMatch(/^second: ok: /);
    expect(await h.owners()).toHaveLength(2);
  });
});

describe('grace', () => {
  it("a job's grace decides when a missed scheduled run turns status from OK to WARN", async () => {
    const f = await jobFile(
      'grace.yaml',
      [
        'timezone: UTC',
        'defaults:',
        '  schedule: "0 0 * * *"',
        'jobs:',
        '  g10m:',
        `    source: ${img}`,
        '    grace: 10m',
        '  g1h:', // the default grace
        `    source: ${img}`,
        '  g3h:',
        `    source: ${img}`,
        '    grace: 3h',
        '',
      ].join('\n'),
    );
    const ran = await gv(null, ['run', '-c', f, '--all', '--json'], { env });
    expect(ran.code, ran.stderr).toBe(0);
    const firstStart = Math.min(...JSON.parse(ran.stdout).map((r: { started: string }) => Date.parse(r.started)));
    const day = 86_400_000;
    const midnight = Math.floor(firstStart / day) * day + day; // the first scheduled time after the runs
    const min = 60_000;
    const judge = async (offsetMs: number) => {
      const r = await gv(null, ['status', '-c', f, '--now', new Date(midnight + offsetMs).toISOString(), '--json'], { env });
      const j = JSON.parse(r.stdout);
      expect(r.code).toBe(j.exit);
      return { exit: r.code, states: Object.fromEntries(j.jobs.map((x: { job: string; state: string }) => [x.job, x.state])) };
    };
    expect(await judge(10 * min - 1000)).toEqual({ exit: 0, states: { g10m: 'OK', g1h: 'OK', g3h: 'OK' } });
    expect(await judge(10 * min + 1000)).toEqual({ exit: 1, states: { g10m: 'WARN', g1h: 'OK', g3h: 'OK' } });
    expect(await judge(60 * min + 1000)).toEqual({ exit: 1, states: { g10m: 'WARN', g1h: 'WARN', g3h: 'OK' } });
    expect(await judge(180 * min - 1000)).toEqual({ exit: 1, states: { g10m: 'WARN', g1h: 'WARN', g3h: 'OK' } });
    expect(await judge(180 * min + 1000)).toEqual({ exit: 1, states: { g10m: 'WARN', g1h: 'WARN', g3h: 'WARN' } });
    // The next day's time: 10 minutes of grace have passed for it, not an hour.
    expect(await judge(day + 15 * min)).toEqual({ exit: 2, states: { g10m: 'CRIT', g1h: 'WARN', g3h: 'WARN' } });
    // What the monitoring plugin shows first.
    const text = await gv(null, ['status', '-c', f, '--now', new Date(midnight + 15 * min).toISOString()], { env });
    expect(text.code).toBe(1);
    expect(text.stdout.split('\n')[0]!.split(' | ')[0]).toBe('WARN: g10m 1 scheduled run missed');
  });
});

describe('status when the job file cannot be read', () => {
  const good = () => `jobs:\n  fine:\n    source: ${img}\n`;

  it('is CRIT (exit 2) with a first line that says so: missing, unparsable, invalid, refused', async () => {
    const ok = await jobFile('crit-good.yaml', good());
    const control = await gv(null, ['status', '-c', ok], { env });
    expect(control.code, control.stdout).toBe(0); // the same repository, with a good job file
    const missing = s.path('crit-missing.yaml');
    const broken = await jobFile('crit-broken.yaml', 'jobs:\n  fine: [\n');
    const invalid = await jobFile('crit-invalid.yaml', `jobs:\n  fine:\n    sorce: ${img}\n`);
    const loose = await jobFile('crit-loose.yaml', good());
    await fs.chmod(loose, 0o664);
    const cases: Array<[string, RegExp]> = [
      [missing, new RegExp(`^CRIT: cannot read job file ${missing}: no such file`)],
      [broken, new RegExp(`^CRIT: ${broken}:\\d+: YAML syntax`)],
      [invalid, new RegExp(`^CRIT: ${invalid}:\\d+: jobs\\.fine\\.`)],
      [loose, new RegExp(`^CRIT: ${loose}: writable by group \\(mode 0664\\): refusing$`)],
    ];
    for (const [file, first] of cases) {
      const r = await gv(null, ['status', '-c', file], { env });
      expect(r.code, r.stdout).toBe(2);
      expect(r.stdout.split('\n')[0]!.split(' | ')[0]).toMatch(first);
      const j = await gv(null, ['status', '-c', file, '--json'], { env });
      expect(j.code).toBe(2);
      expect(JSON.parse(j.stdout)).toMatchObject({ state: 'CRIT', exit: 2, error: expect.stringContaining(file) });
    }
  });

  it('is CRIT for a monitoring user who may not read it, given or at the default path', async (ctx) => {
    const u = await unprivUser();
    // A repository the monitoring user can read: only the job file stands in the way.
    const urepo = s.path('urepo');
    await gvOk(urepo, ['init']);
    await sh('chown', ['-R', `${u.uid}:${u.gid}`, urepo]);
    const f = s.path('crit-private.yaml');
    await fs.writeFile(f, `repository: ${urepo}\njobs:\n  fine:\n    source: ${img}\n`, { mode: 0o644 });
    const status = (args: string[]) => u.run(process.execPath, [CLI, 'status', ...args], { env: { GENVAULT_NO_PROGRESS: '1' } });
    const readable = await status(['-c', f]);
    expect(readable.code, readable.stdout + readable.stderr).toBe(0);
    expect(readable.stdout.split('\n')[0]!.split(' | ')[0]).toBe('OK: 1 job ok, 1 image');
    await fs.chmod(f, 0o600);
    const denied = await status(['-c', f]);
    expect(denied.code, denied.stdout + denied.stderr).toBe(2);
    expect(denied.stdout.split('\n')[0]!.split(' | ')[0]).toBe(`CRIT: cannot read job file ${f}: permission denied`);

    // The default /etc/genvault/jobs.yaml, in a directory the user may not enter: it is
    // there, so status must not judge as if there were no job file. Shown in a private
    // mount namespace over an overlay of /etc, so the machine's /etc is never touched.
    const probe = await sh('unshare', ['-m', '--propagation', 'private', 'true']);
    if (probe.code !== 0) {
      ctx.skip(); // reason: no mount namespaces here (unshare -m failed)
      return;
    }
    const ns = s.path('etc-ns');
    await fs.mkdir(ns);
    /** `genvault status` as the user, after `setup` made /etc/genvault (in the namespace only). */
    const withDefault = (setup: string) =>
      sh('unshare', [
        '-m',
        '--propagation',
        'private',
        'sh',
        '-ec',
        [
          `mount -t tmpfs tmpfs ${ns}`,
          `mkdir ${ns}/u ${ns}/w`,
          `mount -t overlay overlay -o lowerdir=/etc,upperdir=${ns}/u,workdir=${ns}/w /etc`,
          'rm -rf /etc/genvault',
          setup,
          `exec runuser -u ${u.name} -- env GENVAULT_NO_PROGRESS=1 ${process.execPath} ${CLI} status -r ${urepo}`,
        ].join('\n'),
      ]);
    const put = (fileMode: string, dirMode: string) =>
      `mkdir /etc/genvault; cp ${f} /etc/genvault/jobs.yaml; chmod ${fileMode} /etc/genvault/jobs.yaml; chmod ${dirMode} /etc/genvault`;
    // Controls: no job file there (images only), and a readable one (judged).
    const none = await withDefault('true');
    expect(none.code, none.stdout + none.stderr).toBe(0);
    expect(none.stdout).toMatch(/^OK: 0 jobs ok, 0 images\n[^]*no job file at \/etc\/genvault\/jobs\.yaml/);
    const used = await withDefault(put('644', '755'));
    expect(used.code, used.stdout + used.stderr).toBe(0);
    expect(used.stdout.split('\n')[0]!.split(' | ')[0]).toBe('OK: 1 job ok, 1 image');
    for (const [setup, first] of [
      [put('600', '755'), 'CRIT: cannot read job file /etc/genvault/jobs.yaml: permission denied'],
      [put('644', '700'), 'CRIT: cannot read job file /etc/genvault/jobs.yaml: permission denied'],
      ['mkdir /etc/genvault; ln -s /etc/genvault/gone.yaml /etc/genvault/jobs.yaml', 'CRIT: cannot read job file /etc/genvault/jobs.yaml: no such file (give --config FILE)'],
    ]) {
      const r = await withDefault(setup!);
      expect(r.code, `${setup}: ${r.stdout}${r.stderr}`).toBe(2);
      expect(r.stdout.split('\n')[0]!.split(' | ')[0], setup).toBe(first);
    }
  });
});

describe('daemon', () => {
  it('stopped during a run, it waits for the running post-hook to finish, then exits 0', async () => {
    const h = await holder('stop');
    // Never ran, so due as soon as the daemon starts.
    const f = await jobFile('stop.yaml', `timezone: UTC\njobs:\n  stopjob:\n    source: ${img}\n    schedule: "0 0 1 1 *"\n    hooks:\n      post: [${h.hook}]\n`);
    const d = start(['daemon', '-c', f]);
    await waitForFile(h.started, 30_000);
    expect(await h.owners()).toEqual([String(d.pid)]);
    let endAtExit: boolean | null = null;
    d.child.on('exit', () => (endAtExit = existsSync(h.end)));
    d.kill('SIGTERM');
    // A daemon that waits says so; one that does not has exited by now. Either way, the
    // checks below decide.
    await Promise.race([d.waitFor(/SIGTERM: stopping after job stopjob finishes/, 30_000).catch(() => undefined), d.exited]);
    const aliveAtRelease = d.running;
    await h.release();
    expect(await d.waitExit(60_000)).toEqual({ code: 0, signal: null });
    expect(aliveAtRelease, d.out).toBe(true);
    expect(endAtExit, 'the post-hook had finished when the daemon exited').toBe(true);
    expect((await fs.readFile(h.end, 'utf8')).trim(), 'the daemon was alive at the end of its post-hook').toBe('alive');
    const lines = d.out.trim().split('\n');
    expect(lines.at(-2)).toMatch(/ stopjob: ok: generation /);
    expect(lines.at(-1)).toMatch(/ stopped$/);
    const r = await Repository.open(repo);
    try {
      const runs = await recentRuns(r, 'stopjob');
      expect(runs).toHaveLength(1);
      expect(runs[0]).toMatchObject({ status: 'ok', by: 'daemon', hooks: [{ phase: 'post', ok: true }] });
    } finally {
      await r.close();
    }
  });

  it('on SIGHUP, uses the changed job file: a new job runs, a changed schedule is followed', async () => {
    const one = `timezone: UTC\njobs:\n  hupa:\n    source: ${img}\n    schedule: "0 0 1 1 *"\n`;
    const f = await jobFile('hup.yaml', one);
    // hupa ran after its last scheduled time: not due until next New Year.
    expect((await gv(null, ['run', '-c', f, 'hupa', '--now'], { env })).code).toBe(0);
    const d = start(['daemon', '-c', f]);
    await d.waitFor(/ started: 1 jobs from /, 30_000);
    // Now hupa every 2 seconds, and a new job hupb (never ran, so due at once).
    await jobFile('hup.yaml', `timezone: UTC\njobs:\n  hupa:\n    source: ${img}\n    schedule: "*/2 * * * * *"\n  hupb:\n    source: ${img}\n    schedule: "0 0 1 1 *"\n`);
    d.kill('SIGHUP');
    await d.waitFor(new RegExp(` reloaded ${f}: 2 jobs\\n`), 15_000);
    await d.waitFor(/ hupb: ok: generation /, 30_000);
    await d.waitFor(/ hupa: ok: generation /, 30_000);
    d.kill('SIGTERM');
    expect(await d.waitExit(60_000)).toEqual({ code: 0, signal: null });
    expect(d.out).not.toMatch(/FAILED|reload failed/);
    expect(await generations('hupb')).toBe(1);
    expect(await generations('hupa')).toBeGreaterThanOrEqual(2);
  });
});

describe('one run per scheduled time', () => {
  it('with the daemon running, cron runs before, at and after the scheduled time add no second run', async () => {
    const h = await holder('once');
    // One scheduled time a few seconds ahead, in the host's zone (the default: no timezone: in the file).
    const T = Math.ceil((Date.now() + 8_000) / 1000) * 1000;
    const t = new Date(T);
    const sched = `${t.getSeconds()} ${t.getMinutes()} ${t.getHours()} ${t.getDate()} ${t.getMonth() + 1} *`;
    const job = `  once:\n    source: ${img}\n    schedule: "${sched}"\n    hooks:\n      pre: [${h.hook}]\n`;
    // A run before T, from a file without the hook: the job is not due again until T.
    const seed = await jobFile('once-seed.yaml', `jobs:\n  once:\n    source: ${img}\n`);
    expect((await gv(null, ['run', '-c', seed, 'once', '--now'], { env })).code).toBe(0);
    const f = await jobFile('once.yaml', `jobs:\n${job}`);
    const d = start(['daemon', '-c', f]);
    await d.waitFor(/ started: 1 jobs from /, 30_000);
    const cron = (n: number) => Array.from({ length: n }, () => start(['run', '-c', f, '-v']));
    const finish = async (ps: CliProcess[]) => {
      for (const p of ps) expect(await p.waitExit(30_000), p.out).toEqual({ code: 0, signal: null });
      return ps.map((p) => p.out);
    };

    // Before T: not due.
    if (Date.now() < T - 2_000) {
      for (const out of await finish(cron(2))) expect(out).toBe(`once: not due, next at ${t.toISOString()}\n`);
    }
    // At T, cron fires while the daemon wakes: whoever takes the job's lock runs it, held
    // in its pre-hook; every other run is skipped and says so.
    await new Promise((r) => setTimeout(r, Math.max(0, T - Date.now()))); // cron's own timing: the scheduled time
    const atT = cron(3);
    await waitForFile(h.started, 30_000);
    const holderPid = Number((await h.owners())[0]);
    const skipped = `once: skipped: another backup of image once is running (pid ${holderPid})\n`;
    const others = atT.filter((p) => p.pid !== holderPid);
    for (const out of await finish(others)) expect(out).toBe(skipped);
    for (const out of await finish(cron(2))) expect(out).toBe(skipped);
    await h.release();
    const holderProc = holderPid === d.pid ? null : atT.find((p) => p.pid === holderPid);
    if (holderProc) expect(await finish([holderProc])).toEqual([expect.stringMatching(/^once: ok: /)]);
    else await d.waitFor(/ once: ok: /, 60_000);

    // After the run: not due, for cron ...
    const next = new Date(T);
    next.setFullYear(next.getFullYear() + 1);
    for (const out of await finish(cron(3))) expect(out).toBe(`once: not due, next at ${next.toISOString()}\n`);
    // ... nor for the daemon: a reload wakes it to check every job in order, once before
    // probe, a new job due at once; probe's run shows the check of once is done.
    await jobFile('once.yaml', `jobs:\n${job}  probe:\n    source: ${img}\n    schedule: "0 0 1 1 *"\n`);
    d.kill('SIGHUP');
    await d.waitFor(/ probe: ok: /, 30_000);
    d.kill('SIGTERM');
    expect(await d.waitExit(60_000)).toEqual({ code: 0, signal: null });

    expect(await h.owners(), 'the pre-hook ran once').toEqual([String(holderPid)]);
    expect(d.out.match(/ once: ok: /g) ?? []).toHaveLength(holderProc ? 0 : 1);
    expect(await generations('once')).toBe(2);
    const r = await Repository.open(repo);
    try {
      const runs = await recentRuns(r, 'once');
      expect(runs.filter((x) => x.started >= T).map((x) => [x.status, x.by])).toEqual([['ok', holderProc ? 'run' : 'daemon']]);
      expect(runs).toHaveLength(2);
    } finally {
      await r.close();
    }
  });

  it('a run that found the job due checks again under its lock: one that ran meanwhile is not repeated', async () => {
    // The interleaving cron and the daemon can hit by chance, made certain: this process
    // finds the job due, another process runs it, then this one takes the lock.
    const f = await jobFile('recheck.yaml', `timezone: UTC\njobs:\n  recheck:\n    source: ${img}\n    schedule: "0 0 1 1 *"\n`);
    const job = (await loadJobsFile(f)).jobs[0]!;
    const r = await Repository.open(repo);
    try {
      expect(isDue(job, await lastStarted(r, 'recheck'), Date.now())).toBe(true);
      const other = await gv(null, ['run', '-c', f], { env });
      expect(other.stdout).toMatch(/^recheck: ok: /);
      const o = await runJob(r, job, { by: 'run', ifDue: true });
      expect(o).toMatchObject({ skipped: true, job: 'recheck', reason: expect.stringMatching(/^already run since its scheduled time /) });
      expect(await recentRuns(r, 'recheck')).toHaveLength(1);
    } finally {
      await r.close();
    }
    expect(await generations('recheck')).toBe(1);
  });
});

/**
 * Backup jobs: the job file and its file:line errors, schedules honoured by `run`, hooks
 * in order and on the right host (a real sshd on 127.0.0.1), failure handling of pre- and
 * post-hooks, `status` exit codes from generated histories and from real runs, and the
 * daemon running a schedule and stopping cleanly.
 */
import fs from 'node:fs/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ConfigError, parseJobsText } from '../src/jobs/config.js';
import type { RunRecord } from '../src/jobs/history.js';
import { isDue } from '../src/jobs/runner.js';
import { judgeJob } from '../src/jobs/status.js';
import { CliProcess, Scratch, gv, gvOk, prng } from './helpers.js';
import { Sshd, startSshd } from './sshd.js';

let s: Scratch;
let sshd: Sshd;
let repo: string;
let img: string;
const env = { SSH_AUTH_SOCK: '', SSH_CONNECTION: '' };

beforeAll(async () => {
  s = await Scratch.create('genvault-jobs-');
  sshd = await startSshd(s);
  repo = s.path('repo');
  img = s.path('vm.img');
  await fs.writeFile(img, prng(11, 6 << 20));
  await gvOk(repo, ['init']);
});

afterAll(async () => {
  await sshd?.stop();
  await s?.cleanup();
});

/** Write a job file under the scratch dir and return its path. */
async function jobFile(name: string, body: string): Promise<string> {
  const f = s.path(name);
  await fs.writeFile(f, `repository: ${repo}\n${body}`);
  return f;
}

function problems(text: string): string[] {
  try {
    parseJobsText(text, 'jobs.yaml');
  } catch (e) {
    if (e instanceof ConfigError) return e.problems.map((p) => `${p.line}: ${p.field}: ${p.message}`);
    throw e;
  }
  return [];
}

describe('job file', () => {
  it('reads jobs, merging defaults', () => {
    const f = parseJobsText(
      [
        'repository: /srv/gv',
        'defaults:',
        '  schedule: "0 2 * * *"',
        '  retention: { keep-daily: 7, min-age: 0 }',
        'jobs:',
        '  vm1:',
        '    source: ssh://root@kvm1/dev/vg0/vm1',
        '    tags: [nightly]',
        '    hooks:',
        '      pre: ["virsh domfsfreeze vm1"]',
        '      post:',
        '        - virsh domfsthaw vm1',
        '        - { run: "logger done", on: local, timeout: 5m }',
        '  disk2:',
        '    source: /dev/sdb',
        '    image: host-sdb',
        '    schedule: "*/15 * * * *"',
        '    retention: { keep-last: 3 }',
        '',
      ].join('\n'),
      'jobs.yaml',
    );
    expect(f.repository).toBe('/srv/gv');
    const [vm1, d2] = f.jobs;
    expect(vm1!.schedule!.expression).toBe('0 2 * * *');
    expect(vm1!.retention).toEqual({ keepDaily: 7 });
    expect(vm1!.minAgeMs).toBe(0);
    expect(vm1!.tags).toEqual(['nightly']);
    expect(vm1!.hooks.pre.map((h) => [h.run, h.on])).toEqual([['virsh domfsfreeze vm1', 'source']]);
    expect(vm1!.hooks.post.map((h) => [h.run, h.on, h.timeoutMs])).toEqual([
      ['virsh domfsthaw vm1', 'source', 30 * 60_000],
      ['logger done', 'local', 5 * 60_000],
    ]);
    expect(vm1!.line).toBe(6);
    expect(d2!.image).toBe('host-sdb');
    expect(d2!.schedule!.expression).toBe('*/15 * * * *');
    expect(d2!.retention).toEqual({ keepLast: 3 });
  });

  it('names the line and field of every problem', () => {
    const text = [
      'repository: /srv/gv', // 1
      'jobs:', // 2
      '  vm1:', // 3
      '    source: ssh://root@kvm1', // 4: no path
      '    shedule: "0 2 * * *"', // 5: misspelt
      '  vm2:', // 6
      '    source: /dev/sdb', // 7
      '    schedule: "0 25 * * *"', // 8: bad hour
      '    retention:', // 9
      '      keep-daily: -1', // 10
      '  vm3:', // 11: no source
      '    schedule: "0 2 * *"', // 12: four fields
      '    hooks:', // 13
      '      pre: [{ on: local }]', // 14: no run
      '  vm4:', // 15
      '    source: relative.img', // 16
      '    image: shared', // 17
      '  vm2b:', // 18
      '    source: /dev/sdc', // 19
      '    image: shared', // 20: image of vm4 already
      '',
    ].join('\n');
    const p = problems(text);
    expect(p).toEqual([
      expect.stringMatching(/^4: jobs\.vm1\.source: bad SSH source/),
      expect.stringMatching(/^5: jobs\.vm1\.shedule: unknown field \(did you mean schedule\?\)/),
      expect.stringMatching(/^8: jobs\.vm2\.schedule: .*not a cron schedule.*range 0-23/),
      expect.stringMatching(/^10: jobs\.vm2\.retention\.keep-daily: expected a whole number/),
      expect.stringMatching(/^11: jobs\.vm3\.source: missing/),
      expect.stringMatching(/^12: jobs\.vm3\.schedule: .*expected 5 fields/),
      expect.stringMatching(/^14: jobs\.vm3\.hooks\.pre\[0\]\.run: missing/),
      expect.stringMatching(/^16: jobs\.vm4\.source: expected an absolute path/),
      expect.stringMatching(/^18: jobs\.vm2b: image shared is already backed up by job vm4/),
    ]);
    expect(problems('jobs:\n  a:\n    source: /x\n    tags: [a, b\n')[0]).toMatch(/^\d+: : YAML syntax/);
    expect(problems('repository: /x\n')).toEqual([expect.stringMatching(/^1: jobs: missing/)]);
    expect(problems('jobs:\n  a:\n    source: /x\n  a:\n    source: /y\n')[0]).toBe('4: jobs.a: given twice (first on line 2)');
  });

  it('the CLI rejects a bad file with one file:line line, and --check lists every problem', async () => {
    const f = await jobFile('bad.yaml', 'jobs:\n  vm1:\n    source: /dev/x\n    schedule: nightly\n  vm2:\n    sorce: /dev/y\n');
    const r = await gv(null, ['run', '--config', f], { env });
    expect(r.code).toBe(1);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr.trim()).toMatch(
      new RegExp(`^genvault: ${f}:5: jobs\\.vm1\\.schedule: "nightly" is not a cron schedule.* \\(and 2 more; list them all with: genvault run --check --config ${f}\\)$`),
    );
    const c = await gv(null, ['run', '--check', '--config', f], { env });
    expect(c.code).toBe(1);
    expect(c.stderr.trim().split('\n')).toEqual([
      expect.stringMatching(new RegExp(`^${f}:5: jobs\\.vm1\\.schedule: "nightly" is not a cron schedule`)),
      `${f}:6: jobs.vm2.source: missing: an image file, a block device, or ssh://[user@]host[:port]/path`,
      `${f}:7: jobs.vm2.sorce: unknown field (did you mean source?)`,
    ]);
    const good = await jobFile('good.yaml', `jobs:\n  a:\n    source: ${img}\n`);
    expect((await gv(null, ['run', '--check', '--config', good], { env })).stdout).toBe(`${good}: ok, 1 job: a\n`);
    const missing = await gv(null, ['run', '--config', s.path('nope.yaml')], { env });
    expect(missing.code).toBe(1);
    expect(missing.stderr.trim()).toBe(`genvault: cannot read job file ${s.path('nope.yaml')}: no such file (give --config FILE)`);
  });
});

describe('schedules', () => {
  // Schedules are in the job file's zone, else the host's: name one, so the times below hold
  // whatever TZ the tests run in.
  const job = parseJobsText('timezone: UTC\njobs:\n  a:\n    source: /x\n    schedule: "0 2 * * *"\n', 'j.yaml').jobs[0]!;
  const at = (t: string) => Date.parse(t);

  it('a job is due once per scheduled time, and at once if it never ran', () => {
    expect(isDue(job, null, at('2026-11-23T12:00:00Z'))).toBe(true);
    expect(isDue(job, at('2026-11-23T02:00:05Z'), at('2026-11-23T12:00:00Z'))).toBe(false);
    expect(isDue(job, at('2026-11-22T02:00:05Z'), at('2026-11-23T01:59:59Z'))).toBe(false);
    expect(isDue(job, at('2026-11-22T02:00:05Z'), at('2026-11-23T02:00:00Z'))).toBe(true);
    const manual = parseJobsText('jobs:\n  a:\n    source: /x\n', 'j.yaml').jobs[0]!;
    expect(isDue(manual, null, Date.now())).toBe(false);
  });

  it('`run` runs due jobs only; --now and --all run them anyway', async () => {
    const f = await jobFile('sched.yaml', `timezone: UTC\njobs:\n  yearly:\n    source: ${img}\n    schedule: "0 0 1 1 *"\n  manual:\n    source: ${img}\n`);
    const count = async (name: string) => JSON.parse(await gvOk(repo, ['list', '--json'])).filter((g: { name: string }) => g.name === name).length;
    const first = await gv(null, ['run', '-c', f], { env });
    expect(first.code, first.stderr).toBe(0);
    expect(first.stdout).toMatch(/^yearly: ok: generation [0-9a-f]{8}, 6\.00 MiB read/);
    expect(await count('yearly')).toBe(1);
    expect(await count('manual')).toBe(0);
    const second = await gv(null, ['run', '-c', f, '-v'], { env });
    expect(second.code).toBe(0);
    expect(second.stdout).toMatch(/yearly: not due, next at \d{4}-01-01T/);
    expect(second.stdout).toMatch(/manual: not due, no schedule/);
    expect(await count('yearly')).toBe(1);
    expect((await gv(null, ['run', '-c', f, 'manual', '--now'], { env })).code).toBe(0);
    expect(await count('manual')).toBe(1);
    const all = await gv(null, ['run', '-c', f, '--all', '--json'], { env });
    expect(all.code, all.stderr).toBe(0);
    expect(JSON.parse(all.stdout).map((r: RunRecord) => [r.job, r.status])).toEqual([
      ['yearly', 'ok'],
      ['manual', 'ok'],
    ]);
    expect(await count('yearly')).toBe(2);
    const usage = await gv(null, ['run', '-c', f, 'nosuch'], { env });
    expect(usage.code).toBe(1);
    expect(usage.stderr).toMatch(/no job named nosuch in .*sched\.yaml \(jobs: yearly, manual\)/);
  });
});

describe('hooks', () => {
  it('run in order around the read, with the job in the environment; a pre-hook can make the source', async () => {
    const log = s.path('hooks-local.log');
    const snap = s.path('snap.img');
    const f = await jobFile(
      'hooks.yaml',
      [
        'jobs:',
        '  snapjob:',
        `    source: ${snap}`,
        '    tags: [nightly]',
        '    hooks:',
        '      pre:',
        `        - echo "pre1 $GENVAULT_JOB $GENVAULT_IMAGE $GENVAULT_PHASE" >> ${log}`,
        `        - cp ${img} $GENVAULT_SOURCE_PATH && echo "pre2 snapshot made" >> ${log}`,
        '      post:',
        `        - echo "post1 $GENVAULT_RESULT $GENVAULT_GENERATION" >> ${log}`,
        `        - rm -f $GENVAULT_SOURCE_PATH && echo post2 >> ${log}`,
        '',
      ].join('\n'),
    );
    const r = await gv(null, ['run', '-c', f, '--all', '--json'], { env });
    expect(r.code, r.stderr).toBe(0);
    const rec = JSON.parse(r.stdout)[0] as RunRecord;
    expect(rec.status).toBe('ok');
    const lines = (await fs.readFile(log, 'utf8')).trim().split('\n');
    expect(lines).toEqual(['pre1 snapjob snapjob pre', 'pre2 snapshot made', `post1 ok ${rec.generation!.id}`, 'post2']);
    await expect(fs.stat(snap)).rejects.toThrow(/ENOENT/);
    const gen = JSON.parse(await gvOk(repo, ['info', 'snapjob@latest', '--json']));
    expect(gen.tags).toEqual(['nightly']);
    expect(gen.size).toBe(6 << 20);
  });

  it('a failing pre-hook skips the read, later pre-hooks too, and every post-hook still runs', async () => {
    const log = s.path('hooks-fail.log');
    const f = await jobFile(
      'hooks-fail.yaml',
      [
        'jobs:',
        '  frozen:',
        `    source: ${img}`,
        '    hooks:',
        `      pre: ["echo pre1 >> ${log}", "echo cannot freeze >&2; exit 3", "echo pre3 >> ${log}"]`,
        `      post: ["echo post1 $GENVAULT_RESULT >> ${log}; exit 1", "echo post2 >> ${log}"]`,
        '',
      ].join('\n'),
    );
    const r = await gv(null, ['run', '-c', f, '--all'], { env });
    expect(r.code).toBe(1);
    expect(r.stderr.trim()).toBe(
      'frozen: FAILED (pre-hook): pre-hook "echo cannot freeze >&2; exit 3" exited with status 3: cannot freeze; source not read',
    );
    expect((await fs.readFile(log, 'utf8')).trim().split('\n')).toEqual(['pre1', 'post1 failed', 'post2']);
    const list = JSON.parse(await gvOk(repo, ['list', '--json']));
    expect(list.filter((g: { name: string }) => g.name === 'frozen')).toHaveLength(0);
  });

  it('a failing post-hook fails the run but keeps the generation; a hook past its timeout is killed', async () => {
    const f = await jobFile(
      'hooks-post.yaml',
      [
        'jobs:',
        '  post:',
        `    source: ${img}`,
        '    hooks:',
        '      post: [{ run: "sleep 30", timeout: 1s }]',
        '',
      ].join('\n'),
    );
    const t0 = Date.now();
    const r = await gv(null, ['run', '-c', f, '--all'], { env });
    expect(Date.now() - t0).toBeLessThan(20_000);
    expect(r.code).toBe(1);
    expect(r.stderr.trim()).toMatch(/^post: FAILED \(post-hook\): post-hook "sleep 30" timed out after 1 s and was killed \[generation [0-9a-f]{8}/);
    expect(JSON.parse(await gvOk(repo, ['list', 'post', '--json']))).toHaveLength(1);
  });

  it('run on the source host over the job\'s own SSH connection; local hooks run here', async () => {
    const log = s.path('hooks-ssh.log');
    const f = await jobFile(
      'hooks-ssh.yaml',
      [
        'jobs:',
        '  remote:',
        `    source: ${sshd.url(img)}`,
        `    ssh: { identity: ${sshd.userKey}, known-hosts: ${sshd.knownHosts} }`,
        '    hooks:',
        '      pre:',
        `        - echo "pre-remote $GENVAULT_PHASE $SSH_CONNECTION" >> ${log}`,
        `        - { run: 'echo "pre-local \${SSH_CONNECTION:-here}" >> ${log}', on: local }`,
        '      post:',
        `        - echo "post-remote $GENVAULT_RESULT $SSH_CONNECTION" >> ${log}`,
        '',
      ].join('\n'),
    );
    const logins = () => (sshd.log().match(/Accepted publickey/g) ?? []).length;
    const before = logins();
    const r = await gv(null, ['run', '-c', f, '--all'], { env });
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^remote: ok: generation/);
    const lines = (await fs.readFile(log, 'utf8')).trim().split('\n');
    expect(lines).toHaveLength(3);
    const pre = /^pre-remote pre 127\.0\.0\.1 (\d+) 127\.0\.0\.1 (\d+)$/.exec(lines[0]!);
    expect(pre, lines[0]).not.toBeNull();
    expect(pre![2]).toBe(String(sshd.port));
    expect(lines[1]).toBe('pre-local here');
    // Same client port: the post-hook ran over the same connection as the pre-hook and the read.
    expect(lines[2]).toBe(`post-remote ok 127.0.0.1 ${pre![1]} 127.0.0.1 ${sshd.port}`);
    expect(logins() - before).toBe(1);

    // A remote pre-hook that fails: nothing is read, the remote post-hook runs.
    await fs.rm(log);
    const g = await jobFile(
      'hooks-ssh-fail.yaml',
      [
        'jobs:',
        '  remote:',
        `    source: ${sshd.url(img)}`,
        `    ssh: { identity: ${sshd.userKey}, known-hosts: ${sshd.knownHosts} }`,
        '    hooks:',
        '      pre: ["lvcreate-does-not-exist --snapshot"]',
        `      post: ["echo post $GENVAULT_RESULT >> ${log}"]`,
        '',
      ].join('\n'),
    );
    const gens = JSON.parse(await gvOk(repo, ['list', 'remote', '--json'])).length;
    const bad = await gv(null, ['run', '-c', g, '--all'], { env });
    expect(bad.code).toBe(1);
    expect(bad.stderr.trim()).toMatch(/^remote: FAILED \(pre-hook\): pre-hook "lvcreate-does-not-exist --snapshot" on 127\.0\.0\.1 exited with status 127: .*not found; source not read$/);
    expect((await fs.readFile(log, 'utf8')).trim()).toBe('post failed');
    expect(JSON.parse(await gvOk(repo, ['list', 'remote', '--json']))).toHaveLength(gens);
  });

  it('a job whose host key changed fails with one line and runs its local post-hooks', async () => {
    const log = s.path('hooks-hostkey.log');
    const kh = s.path('kh-changed');
    const otherPub = (await fs.readFile(`${sshd.otherKey}.pub`, 'utf8')).split(' ').slice(0, 2).join(' ');
    await fs.writeFile(kh, `[127.0.0.1]:${sshd.port} ${otherPub}\n`);
    const f = await jobFile(
      'hostkey.yaml',
      [
        'jobs:',
        '  changed:',
        `    source: ${sshd.url(img)}`,
        `    ssh: { identity: ${sshd.userKey}, known-hosts: ${kh} }`,
        '    hooks:',
        `      post: [{ run: "echo local-post $GENVAULT_RESULT >> ${log}", on: local }]`,
        '',
      ].join('\n'),
    );
    const r = await gv(null, ['run', '-c', f, '--all'], { env });
    expect(r.code).toBe(1);
    const lines = r.stderr.trim().split('\n').filter((l) => !/native crypto/.test(l));
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatch(/^changed: FAILED \(connect\): host key for \[127\.0\.0\.1\]:\d+ has CHANGED/);
    expect((await fs.readFile(log, 'utf8')).trim()).toBe('local-post failed');
  });
});

describe('status', () => {
  const job = parseJobsText('timezone: UTC\njobs:\n  a:\n    source: /x\n    schedule: "0 2 * * *"\n', 'j.yaml').jobs[0]!;
  const run = (started: string, status: 'ok' | 'failed'): RunRecord => ({
    job: 'a',
    image: 'a',
    started: Date.parse(started),
    finished: Date.parse(started) + 60_000,
    status,
    hooks: [],
    by: 'run',
    ...(status === 'failed' ? { error: 'boom', stage: 'backup' as const } : {}),
  });

  it('judges generated histories: OK, WARN for one missed run, CRIT for two or a failure', () => {
    const history = [run('2026-11-22T02:00:03Z', 'ok'), run('2026-11-21T02:00:02Z', 'ok')];
    expect(judgeJob(job, history, Date.parse('2026-11-22T12:00:00Z'))).toMatchObject({ state: 'OK', missed: 0 });
    // Inside the grace period after 02:00 the next day: still OK.
    expect(judgeJob(job, history, Date.parse('2026-11-23T02:30:00Z'))).toMatchObject({ state: 'OK', missed: 0 });
    expect(judgeJob(job, history, Date.parse('2026-11-23T03:30:00Z'))).toMatchObject({ state: 'WARN', missed: 1 });
    expect(judgeJob(job, history, Date.parse('2026-11-24T03:30:00Z'))).toMatchObject({ state: 'CRIT', missed: 2 });
    expect(judgeJob(job, [run('2026-11-23T02:00:01Z', 'failed'), ...history], Date.parse('2026-11-23T02:30:00Z'))).toMatchObject({
      state: 'CRIT',
      reason: 'last run failed: boom',
    });
    // Failed, then a success: OK again.
    expect(judgeJob(job, [run('2026-11-23T02:20:00Z', 'ok'), run('2026-11-23T02:00:01Z', 'failed'), ...history], Date.parse('2026-11-23T04:00:00Z'))).toMatchObject({
      state: 'OK',
    });
    expect(judgeJob(job, [], Date.now())).toMatchObject({ state: 'WARN', reason: 'never run' });
    // Never succeeded and failing for days: CRIT.
    expect(judgeJob(job, [run('2026-11-20T02:00:00Z', 'failed')], Date.parse('2026-11-23T04:00:00Z'))).toMatchObject({ state: 'CRIT', missed: 4 });
  });

  it('exit codes follow real runs: 0 after success, 1 and 2 as scheduled runs are missed, 2 after a failure', async () => {
    const f = await jobFile('status.yaml', `timezone: UTC\njobs:\n  daily:\n    source: ${img}\n    schedule: "0 0 * * *"\n`);
    const never = await gv(null, ['status', '-c', f], { env });
    expect(never.code).toBe(1);
    expect(never.stdout.split('\n')[0]!.split(' | ')[0]).toBe('WARN: daily never run');
    expect((await gv(null, ['run', '-c', f], { env })).code).toBe(0);
    const ok = await gv(null, ['status', '-c', f], { env });
    expect(ok.code, ok.stdout).toBe(0);
    expect(ok.stdout.split('\n')[0]!.split(' | ')[0]).toMatch(/^OK: 1 job ok/);
    expect(ok.stdout).toMatch(/daily\s+OK\s+0 0 \* \* \*/);
    const day = 86_400_000;
    const midnight = Math.floor(Date.now() / day) * day + day; // the next 00:00 UTC, the file's zone
    const at = (ms: number) => new Date(ms).toISOString();
    expect((await gv(null, ['status', '-c', f, '--now', at(midnight + 30 * 60_000)], { env })).code).toBe(0);
    const warn = await gv(null, ['status', '-c', f, '--now', at(midnight + 90 * 60_000)], { env });
    expect(warn.code).toBe(1);
    expect(warn.stdout.split('\n')[0]!.split(' | ')[0]).toBe('WARN: daily 1 scheduled run missed');
    const critJson = await gv(null, ['status', '-c', f, '--now', at(midnight + day + 90 * 60_000), '--json'], { env });
    expect(critJson.code).toBe(2);
    const j = JSON.parse(critJson.stdout);
    expect(j).toMatchObject({ state: 'CRIT', exit: 2 });
    expect(j.jobs[0]).toMatchObject({ job: 'daily', state: 'CRIT', missed: 2, generations: 1 });
    // A failed run is CRIT at once, and names the error.
    const g = await jobFile('status-fail.yaml', `timezone: UTC\njobs:\n  daily:\n    source: ${s.path('gone.img')}\n    schedule: "0 0 * * *"\n`);
    expect((await gv(null, ['run', '-c', g, '--all'], { env })).code).toBe(1);
    const failed = await gv(null, ['status', '-c', g], { env });
    expect(failed.code).toBe(2);
    expect(failed.stdout.split('\n')[0]!.split(' | ')[0]).toMatch(/^CRIT: daily last run failed: cannot read source .*gone\.img: no such file or directory$/);
    // Without a repository: CRIT, one line.
    const norepo = await gv(null, ['status', '-c', f, '-r', s.path('no-repo')], { env });
    expect(norepo.code).toBe(2);
    expect(norepo.stdout.trim()).toMatch(/^CRIT: .*no-repo: not a genvault repository/);
  });
});

describe('daemon', () => {
  it('runs jobs on their schedule, reloads on SIGHUP, and stops cleanly on SIGTERM', async () => {
    const body = `jobs:\n  tick:\n    source: ${img}\n    schedule: "*/2 * * * * *"\n    retention: { keep-last: 2, min-age: 0 }\n`;
    const f = await jobFile('daemon.yaml', body);
    const d = new CliProcess(['daemon', '-c', f], env);
    try {
      await d.waitFor(/tick: ok/, 30_000, 3);
      expect(d.out).toMatch(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ started: 1 jobs from /);
      expect(d.out).toMatch(/pruned 1/);
      // A broken file on reload is reported and the old jobs kept.
      await fs.writeFile(f, 'jobs: [\n');
      d.kill('SIGHUP');
      await d.waitFor(/reload failed/, 10_000);
      expect(d.out).toMatch(/reload failed, keeping the previous jobs: .*daemon\.yaml:\d+: YAML syntax/);
      const n = (d.out.match(/tick: ok/g) ?? []).length;
      await d.waitFor(/tick: ok/, 10_000, n + 1);
      d.kill('SIGTERM');
      expect(await d.waitExit(30_000)).toEqual({ code: 0, signal: null });
    } finally {
      d.kill('SIGKILL');
    }
    expect(d.out).toMatch(/stopped\n$/);
    expect(JSON.parse(await gvOk(repo, ['list', 'tick', '--json']))).toHaveLength(2);
    const st = await gv(null, ['status', '-c', await jobFile('daemon-status.yaml', body), '--json'], { env });
    expect(JSON.parse(st.stdout).jobs).toEqual([expect.objectContaining({ job: 'tick', state: 'OK', generations: 2 })]);
  });
});

describe('shipped examples', () => {
  it('scripts/jobs.example.yaml is a valid job file', async () => {
    const f = parseJobsText(await fs.readFile(new URL('../scripts/jobs.example.yaml', import.meta.url), 'utf8'), 'jobs.example.yaml');
    expect(f.jobs.map((j) => j.name)).toEqual(['web1', 'db-data', 'router', 'app1', 'offsite']);
    expect(f.jobs[4]!.sync).toMatchObject({ to: '/mnt/offsite/genvault', images: ['web1', 'db-data'], rules: { keepDaily: 30, keepMonthly: 12 } });
    expect(f.jobs[0]!.hooks.pre).toHaveLength(3);
    expect(f.jobs[1]!.hooks.pre[0]!.on).toBe('local');
    expect(f.jobs[3]!.bitmap).toBe('backup-vda');
  });
});

/**
 * Crash loop: backups, prunes and gcs killed with SIGKILL while they are inside their
 * work, at least KILLS_EACH times each. After every kill the repository verifies clean
 * (verify --full), holds exactly the generations it should, and every one of them
 * restores to the bytes it was made from (sha256).
 *
 * A kill counts only when the process showed it was working when it died:
 * - backup, one of five ways, picked at random:
 *   'held': its input stops after 3-8 MiB (at least one roll-over to a new pack, whose
 *     flush committed chunk entries); killed once it has read that and has 1-3 packs.
 *   'streaming': it gets all its input; killed once the bytes of its 1st-3rd pack appear
 *     on disk (that pack is being flushed); it may finish first.
 *   For these two: counted if, at the last look before the kill, its writer registration
 *   listed packs holding bytes, and its generation is not committed.
 *   'flushed': held at a pause point just after the index batch of its 1st-3rd flush (the
 *     3rd may be the last one, just before the generation commits), killed there.
 *   'committed': held just after its generation committed, before it closed its packs and
 *     released its registration and image lock, killed there.
 *   'commit': killed as soon as it says its generation commit starts; counted if its
 *     registration is left behind (it died before the end); whether the commit landed is
 *     recorded.
 * - prune: its last trace line is 'locked', 'decided' or 'batch'. It is held at a pause
 *   point (locked, decided, just before its batch), or killed as soon as it says its
 *   batch is being written ('batch': whether the batch landed is recorded, and the
 *   generations must be all removed or all there).
 * - gc: its last trace line is a phase of its work (not 'done'). It is killed as soon as
 *   it reports a phase picked at random, or held at one of its pause points (sweep,
 *   leaves, repack...) and killed there.
 * A process that exits before it is killed, or is killed before or after its work, does
 * not count; the round is tried again, at most ATTEMPTS times. The test fails if fewer
 * kills than asked happened mid-work. Every attempt is followed by the checks.
 *
 * Everything random comes from one seed: GENVAULT_CRASHLOOP_SEED=N replays a run's
 * choices (commands, kill points, data; not the timing of a race), and the seed is
 * printed at the start and in every failure. GENVAULT_CRASHLOOP_VERBOSE=1 prints
 * every attempt.
 */
import { ChildProcess, spawn } from 'node:child_process';
import { createHash, randomInt } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CLI, Scratch, gv, gvOk, prng, seededRandom, text } from './helpers.js';

const KILLS_EACH = 10; // per command: backup, prune, gc
// Per round, until one kill lands inside the work. A gc traced for a phase its run does
// not reach (nothing to repack, no leaves to move) finishes before the kill: a failing run
// lost 10 of its 19 gc attempts that way, and at that rate six misses in a row somewhere in
// ten gc rounds come about once in five runs; twelve make it about once in 200.
const ATTEMPTS = 12;
const WAIT_MS = 30_000; // bound on waiting for any event
const MiB = 1 << 20;
const KEEP = 1; // prune --keep-last

const SEED = process.env.GENVAULT_CRASHLOOP_SEED ? Number(process.env.GENVAULT_CRASHLOOP_SEED) : randomInt(2 ** 31);

type Cmd = 'backup' | 'prune' | 'gc';
interface Gen {
  id: string;
  name: string;
  created: string;
  tags: string[];
}
interface Kill {
  round: number;
  attempt: number;
  cmd: Cmd;
  /** Where it was when killed, or why the attempt does not count. */
  phase: string;
  detail: string;
  midWork: boolean;
}

let s: Scratch;
let repo: string;
const live = new Set<ChildProcess>();
const sums = new Map<string, string>(); // tag -> sha256 of the source it was made from

/**
 * 8 MiB in 1 MiB segments (the repository's segment size here): two shared by every
 * source and one with the previous source (dedup), random and text (compressible: group
 * records) data of its own, zeros. A backup of it writes at least three packs, rolling
 * over (and committing the last pack's entries) at the third segment and again by the
 * eighth.
 */
function source(n: number): Buffer {
  const own = (k: number, len = MiB) => prng(100 + n * 16 + k, len);
  // text() may come out a byte short: pad, so that every segment stays aligned (dedup)
  const words = (k: number) => Buffer.concat([text(100 + n * 16 + k, MiB), Buffer.alloc(8)]).subarray(0, MiB);
  return Buffer.concat([
    own(1), // fills the first pack past packTargetSize
    prng(7001, MiB),
    words(2), // the next pack: the first one's entries are committed
    Buffer.alloc(MiB / 2),
    own(3, MiB / 2),
    own(4),
    prng(100 + (n - 1) * 16 + 4, MiB), // the previous source's own(4): its pack stays partly live
    words(5), // a third pack
    prng(7003, MiB),
  ]);
}

interface Proc {
  child: ChildProcess;
  stderr: () => string;
  done: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  exited: () => boolean;
  /** 'seen' once stderr matches; 'exited' if the process ended first; 'timeout'. */
  waitFor: (re: RegExp) => Promise<'seen' | 'exited' | 'timeout'>;
  /** SIGKILL now; resolves to whether the process died of it. */
  kill: () => Promise<boolean>;
}

function start(args: string[], env: NodeJS.ProcessEnv = {}): Proc {
  const child = spawn(process.execPath, [CLI, '-r', repo, ...args], {
    env: { ...process.env, GENVAULT_NO_PROGRESS: '1', ...env },
    stdio: ['pipe', 'ignore', 'pipe'],
  });
  live.add(child);
  let err = '';
  let closed = false;
  const listeners = new Set<() => void>();
  child.stdin!.on('error', () => undefined);
  child.stderr!.on('data', (d) => {
    err += d;
    for (const l of [...listeners]) l();
  });
  const done = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.on('close', (code, signal) => {
      closed = true;
      live.delete(child);
      resolve({ code, signal });
      for (const l of [...listeners]) l();
    }),
  );
  return {
    child,
    done,
    stderr: () => err,
    exited: () => closed || child.exitCode !== null || child.signalCode !== null,
    waitFor: (re) =>
      new Promise((resolve) => {
        const finish = (r: 'seen' | 'exited' | 'timeout') => {
          clearTimeout(t);
          listeners.delete(check);
          resolve(r);
        };
        const check = () => (re.test(err) ? finish('seen') : closed ? finish('exited') : undefined);
        const t = setTimeout(() => finish('timeout'), WAIT_MS);
        listeners.add(check);
        check();
      }),
    kill: async () => {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      const { signal } = await done;
      return signal === 'SIGKILL';
    },
  };
}

/** The packs a process's writer registration lists, and their bytes on disk; null if it has none. */
async function writerPacks(pid: number): Promise<{ packs: number; bytes: number; last: number } | null> {
  const dir = path.join(repo, 'locks');
  for (const f of await fs.readdir(dir)) {
    if (!/^writer-[0-9a-f]+\.json$/.test(f)) continue;
    let rec: { owner?: { pid?: number }; packs?: string[] };
    try {
      rec = JSON.parse(await fs.readFile(path.join(dir, f), 'utf8'));
    } catch {
      continue; // just removed
    }
    if (rec.owner?.pid !== pid || !rec.packs) continue;
    let bytes = 0;
    let last = 0;
    for (const id of rec.packs) {
      last = (await fs.stat(path.join(repo, 'packs', id.slice(0, 2), `${id}.pack`)).catch(() => null))?.size ?? 0;
      bytes += last;
    }
    return { packs: rec.packs.length, bytes, last };
  }
  return null;
}

const lastTrace = (stderr: string, tool: string) => [...stderr.matchAll(new RegExp(`^${tool}-trace: (\\S+)$`, 'gm'))].at(-1)?.[1] ?? 'none';

async function generations(): Promise<Gen[]> {
  return JSON.parse(await gvOk(repo, ['list', '--json'])) as Gen[];
}

beforeAll(async () => {
  s = await Scratch.create();
  repo = s.path('repo');
  await gvOk(repo, ['init']);
  // Small packs and segments: a backup of 8 MiB rolls over to a new pack (committing the
  // last one's entries) several times, and gc has packs to delete and to rewrite. Small
  // leaves: gc has leaves to remove.
  const cfgFile = path.join(repo, 'config.json');
  const cfg = JSON.parse(await fs.readFile(cfgFile, 'utf8'));
  cfg.packTargetSize = MiB;
  cfg.chunking.segment = MiB;
  cfg.leaf = { minChunks: 4, maxChunks: 16 };
  await fs.writeFile(cfgFile, JSON.stringify(cfg));
});

afterAll(async () => {
  for (const c of live) c.kill('SIGKILL');
  await s?.cleanup();
});

describe('crash loop', () => {
  it(`SIGKILLs inside backup, prune and gc (${KILLS_EACH} each) leave a repository that verifies and restores`, async () => {
    const started = Date.now();
    const rand = seededRandom(SEED);
    const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rand() * xs.length)]!;
    // eslint-disable-next-line no-console
    console.log(`crashloop: seed ${SEED} (replay with GENVAULT_CRASHLOOP_SEED=${SEED})`);
    const kills: Kill[] = [];
    let where = 'setup';
    let nextSource = 1;
    const expected = new Map<string, Gen>(); // id -> the generations the repository must hold

    /** A complete backup of a fresh source. */
    const feed = async (name: string) => {
      const n = nextSource++;
      const data = source(n);
      sums.set(`src-${n}`, createHash('sha256').update(data).digest('hex'));
      const r = await gv(repo, ['backup', '-', '--name', name, '--tag', `src-${n}`, '--json'], { input: data });
      expect(r.code, `${where}: backup: ${r.stderr}`).toBe(0);
      const g = JSON.parse(r.stdout) as Gen;
      expected.set(g.id, g);
    };

    /** verify --full clean; the generations are those expected; each restores to its source's bytes. */
    let checkMs = 0;
    const check = async (what: string) => {
      const t0 = Date.now();
      const v = await gv(repo, ['verify', '--full']);
      expect(v.code, `${what}: verify --full: ${v.stdout}${v.stderr}`).toBe(0);
      const gens = await generations();
      expect(gens.map((g) => g.id).sort(), `${what}: generations`).toEqual([...expected.keys()].sort());
      // Two restores at a time.
      const todo = [...gens];
      const restorer = async (slot: number) => {
        const out = s.path(`out-${slot}.img`);
        for (let g = todo.shift(); g; g = todo.shift()) {
          await gvOk(repo, ['restore', `${g.name}@${g.id}`, out, '--force']);
          const got = createHash('sha256').update(await fs.readFile(out)).digest('hex');
          expect(got, `${what}: ${g.name}@${g.id} (${g.tags[0]})`).toBe(sums.get(g.tags[0]!));
        }
        await fs.rm(out, { force: true });
      };
      await Promise.all([restorer(0), restorer(1)]);
      checkMs += Date.now() - t0;
    };

    const backupAttempt = async (): Promise<Omit<Kill, 'round' | 'attempt' | 'cmd'>> => {
      const n = nextSource++;
      const tag = `src-${n}`;
      const data = source(n);
      sums.set(tag, createHash('sha256').update(data).digest('hex'));
      const name = pick(['vm', 'vm2']);
      const mode = pick(['held', 'streaming', 'flushed', 'commit', 'committed'] as const);
      const held = mode === 'held';
      // held: this much input (at least 3 segments: one roll-over), and no more until killed
      // once it has this many packs (as many as that input surely makes, or fewer).
      // streaming: killed once its Nth pack's bytes appear (that pack is being flushed).
      // flushed: held at its Nth flush (there are at least 3).
      const heldBytes = (3 + Math.floor(rand() * 6)) * MiB;
      const wantPacks = 1 + Math.floor(rand() * (held && heldBytes < 8 * MiB ? 2 : 3));
      const point = mode === 'flushed' ? `flushed-${wantPacks}` : 'committed';
      const pause = s.path(`backup-pause-${kills.length}`);
      const env: NodeJS.ProcessEnv = { GENVAULT_BACKUP_TRACE: '1' };
      if (mode === 'flushed' || mode === 'committed') {
        await fs.writeFile(pause, '');
        Object.assign(env, { GENVAULT_BACKUP_PAUSE_FILE: pause, GENVAULT_BACKUP_PAUSE_AT: point });
      }
      const pausedRe = new RegExp(`^backup: paused at ${point} `, 'm');
      const commitRe = /^backup-trace: commit$/m;
      const p = start(['backup', '-', '--name', name, '--tag', tag], env);
      let consumed = false; // all the held input is in the pipe: the backup has read it, or all but 64 KiB
      if (held) p.child.stdin!.write(data.subarray(0, heldBytes), () => (consumed = true));
      else p.child.stdin!.end(data);
      // The last look at its packs before the kill: the evidence that it was writing.
      let seen: { packs: number; bytes: number; last: number } | null = null;
      // commit: killed the moment it says so (no polling in between)
      if (mode === 'commit') await p.waitFor(commitRe);
      const deadline = Date.now() + WAIT_MS;
      while (mode !== 'commit' && !p.exited() && Date.now() < deadline) {
        seen = await writerPacks(p.child.pid!);
        if (mode === 'held' || mode === 'streaming') {
          if (held && seen && seen.bytes > 0 && seen.packs >= wantPacks && consumed) break;
          if (!held && seen && (seen.packs > wantPacks || (seen.packs === wantPacks && seen.last > 0))) break;
        } else if (pausedRe.test(p.stderr())) {
          break;
        }
        await new Promise((r) => setTimeout(r, 2)); // poll interval, not a synchronisation
      }
      const killed = await p.kill();
      const left = await writerPacks(p.child.pid!); // its registration, left behind if it died before releasing it
      await fs.rm(pause, { force: true });
      const heldAt = (mode === 'flushed' || mode === 'committed') && pausedRe.test(p.stderr());
      const inCommit = mode === 'commit' && commitRe.test(p.stderr());
      const gens = await generations();
      const committed = gens.find((g) => g.tags[0] === tag);
      if (committed) expected.set(committed.id, committed);
      const how =
        mode === 'held'
          ? `held after ${heldBytes / MiB} MiB, until ${wantPacks} pack(s)`
          : mode === 'streaming'
            ? `streaming, until pack ${wantPacks} has bytes`
            : mode === 'commit'
              ? 'as its generation commit starts'
              : `pause at ${point}`;
      const state = seen ? `${seen.packs} pack(s), ${seen.bytes} bytes synced` : 'no registration';
      if (!killed) return { phase: 'exited', detail: `${how}: exited before the kill`, midWork: false };
      // Held at a pause point: that is where it was (the generation is committed at 'committed').
      if (heldAt) return { phase: `paused@${point}`, detail: `${name} ${tag} ${how}: killed there with ${state}`, midWork: true };
      // Killed as it said its generation commit starts, before it released its registration:
      // the commit may have landed or not.
      if (inCommit) {
        if (!left) return { phase: 'commit/released', detail: `${how}: killed after it released its registration`, midWork: false };
        return { phase: `commit/${committed ? 'landed' : 'not-landed'}`, detail: `${name} ${tag} ${how}: killed with ${left.packs} pack(s) registered`, midWork: true };
      }
      if (mode !== 'held' && mode !== 'streaming') return { phase: `no-${mode === 'commit' ? mode : point}`, detail: `${how}: killed elsewhere, with ${state}`, midWork: false };
      if (!seen?.bytes) return { phase: 'no-bytes', detail: `${how}: killed before its packs held synced bytes`, midWork: false };
      if (committed) return { phase: 'committed', detail: `${how}: killed after its generation was committed`, midWork: false };
      return { phase: `${mode}/pack${seen.packs}`, detail: `${name} ${tag} ${how}: killed with ${state}`, midWork: true };
    };

    const pruneAttempt = async (): Promise<Omit<Kill, 'round' | 'attempt' | 'cmd'>> => {
      // Something to remove: an image with more generations than are kept.
      const count = (name: string) => [...expected.values()].filter((g) => g.name === name).length;
      if (count('vm') <= KEEP && count('vm2') <= KEEP) await feed(pick(['vm', 'vm2']));
      const before = new Map(expected);
      const prunable = new Set<string>();
      for (const name of ['vm', 'vm2']) {
        const mine = [...before.values()].filter((g) => g.name === name).sort((a, b) => (a.created < b.created ? -1 : 1));
        for (const g of mine.slice(0, -KEEP)) prunable.add(g.id);
      }
      const mode = pick(['race', 'race', 'locked', 'decided', 'batch'] as const);
      const pause = s.path(`prune-pause-${kills.length}`);
      const env: NodeJS.ProcessEnv = { GENVAULT_PRUNE_TRACE: '1' };
      if (mode !== 'race') {
        await fs.writeFile(pause, '');
        Object.assign(env, { GENVAULT_PRUNE_PAUSE_FILE: pause, GENVAULT_PRUNE_PAUSE_AT: mode });
      }
      const p = start(['prune', '--keep-last', String(KEEP), '--min-age', '0'], env);
      await p.waitFor(mode === 'race' ? /^prune-trace: batch$/m : new RegExp(`^prune: paused at ${mode} `, 'm'));
      const killed = await p.kill();
      await fs.rm(pause, { force: true });
      const now = new Set((await generations()).map((g) => g.id));
      const removed = [...before.keys()].filter((id) => !now.has(id)).sort();
      const untouched = removed.length === 0;
      const landed = removed.length > 0;
      // The batch is all or nothing, and nothing else.
      expect([...now].filter((id) => !before.has(id)), `${where}: generations appeared`).toEqual([]);
      if (landed) expect(removed, `${where}: prune removed part of its batch, or more`).toEqual([...prunable].sort());
      for (const id of before.keys()) if (!now.has(id)) expected.delete(id);
      // Where it was: the last phase it reported (and whether it sat at its pause point).
      const last = lastTrace(p.stderr(), 'prune');
      const heldAt = mode !== 'race' && new RegExp(`^prune: paused at ${mode} `, 'm').test(p.stderr());
      if (heldAt) expect(untouched, `${where}: prune paused at ${mode} removed something`).toBe(true);
      const outcome = `${prunable.size} prunable, batch ${landed ? 'landed' : 'not landed'}`;
      if (!killed) return { phase: 'exited', detail: `${mode}: exited before the kill (${outcome})`, midWork: false };
      if (!['locked', 'decided', 'batch'].includes(last)) {
        return { phase: last === 'none' ? 'not-started' : last, detail: `${mode}: killed in phase ${last} (${outcome})`, midWork: false };
      }
      const phase = heldAt ? `paused@${mode}` : last === 'batch' ? `batch/${landed ? 'landed' : 'not-landed'}` : last;
      return { phase, detail: `${mode}: ${outcome}, last phase ${last}`, midWork: true };
    };

    const GC_PHASES = ['locked', 'mark', 'condemn', 'wait', 'remark', 'sweep', 'leaves', 'repack', 'finish'];
    const GC_PAUSES = ['before-sweep', 'sweep-read', 'leaves-move', 'repack-commit', 'pack-unlink'];
    const gcAttempt = async (): Promise<Omit<Kill, 'round' | 'attempt' | 'cmd'>> => {
      const paused = rand() < 0.4;
      const at = paused ? pick(GC_PAUSES) : pick(GC_PHASES);
      const args = ['gc'];
      if (at === 'repack-commit' || rand() < 0.5) args.push('--repack-threshold', '100');
      const pause = s.path(`gc-pause-${kills.length}`);
      const env: NodeJS.ProcessEnv = { GENVAULT_GC_TRACE: '1' };
      if (paused) {
        await fs.writeFile(pause, '');
        Object.assign(env, { GENVAULT_GC_PAUSE_FILE: pause, GENVAULT_GC_PAUSE_AT: at });
      }
      const p = start(args, env);
      const pausedRe = new RegExp(`^gc: paused at ${at} `, 'm');
      await p.waitFor(paused ? pausedRe : new RegExp(`^gc-trace: ${at}$`, 'm'));
      const killed = await p.kill();
      await fs.rm(pause, { force: true });
      // Where it was: the last phase it reported (and whether it sat at its pause point).
      const last = lastTrace(p.stderr(), 'gc');
      const heldAt = paused && pausedRe.test(p.stderr());
      const mode = `${paused ? 'pause at' : 'trace'} ${at}${args.length > 1 ? ', --repack-threshold 100' : ''}`;
      if (!killed) return { phase: 'exited', detail: `${mode}: exited before the kill, last phase ${last}`, midWork: false };
      if (!GC_PHASES.includes(last)) {
        return { phase: last === 'none' ? 'not-started' : last, detail: `${mode}: killed in phase ${last}`, midWork: false };
      }
      return { phase: heldAt ? `paused@${at}` : last, detail: `${mode}, last phase ${last}`, midWork: true };
    };

    const summary = () => {
      const by = new Map<Cmd, Map<string, number>>();
      for (const k of kills) {
        if (!k.midWork) continue;
        const m = by.get(k.cmd) ?? new Map<string, number>();
        by.set(k.cmd, m.set(k.phase, (m.get(k.phase) ?? 0) + 1));
      }
      const parts = (['backup', 'prune', 'gc'] as const).map((c) => {
        const m = by.get(c) ?? new Map<string, number>();
        const n = [...m.values()].reduce((a, b) => a + b, 0);
        return `${c} ${n} (${[...m].sort().map(([p, k]) => `${p} ${k}`).join(', ')})`;
      });
      const wasted = new Map<string, number>();
      for (const k of kills) if (!k.midWork) wasted.set(`${k.cmd} ${k.phase}`, (wasted.get(`${k.cmd} ${k.phase}`) ?? 0) + 1);
      const counted = kills.filter((k) => k.midWork).length;
      return (
        `crashloop seed ${SEED}: ${counted} kills mid-work in ${kills.length} attempts, ` +
        `${((Date.now() - started) / 1000).toFixed(0)} s (${(checkMs / 1000).toFixed(0)} s checking): ${parts.join('; ')}` +
        (wasted.size ? `; not counted: ${[...wasted].map(([w, k]) => `${w} ${k}`).join(', ')}` : '')
      );
    };

    try {
      // vm starts with two generations, vm2 with one.
      for (const name of ['vm', 'vm2', 'vm']) await feed(name);
      await check('setup');

      const rounds: Cmd[] = (['backup', 'prune', 'gc'] as const).flatMap((c) => Array<Cmd>(KILLS_EACH).fill(c));
      for (let i = rounds.length - 1; i > 0; i--) {
        const j = Math.floor(rand() * (i + 1));
        [rounds[i], rounds[j]] = [rounds[j]!, rounds[i]!];
      }
      for (let round = 0; round < rounds.length; round++) {
        const cmd = rounds[round]!;
        for (let attempt = 0; attempt < ATTEMPTS; attempt++) {
          where = `round ${round} attempt ${attempt} (${cmd})`;
          const r = await (cmd === 'backup' ? backupAttempt() : cmd === 'prune' ? pruneAttempt() : gcAttempt());
          const k: Kill = { round, attempt, cmd, ...r };
          kills.push(k);
          // eslint-disable-next-line no-console
          if (process.env.GENVAULT_CRASHLOOP_VERBOSE) console.log(`${where}: ${k.midWork ? 'killed in' : 'NOT COUNTED:'} ${k.phase}: ${k.detail}`);
          await check(`${where}, killed in ${k.phase} (${k.detail})`);
          if (k.midWork) break;
        }
      }
      // eslint-disable-next-line no-console
      console.log(summary());

      where = 'counting the kills';
      for (const cmd of ['backup', 'prune', 'gc'] as const) {
        const n = kills.filter((k) => k.cmd === cmd && k.midWork).length;
        expect(n, `fewer ${cmd} kills mid-work than asked`).toBeGreaterThanOrEqual(KILLS_EACH);
      }

      // And the repository still takes a backup and a complete gc, after which it is whole.
      where = 'after the loop';
      await feed('vm');
      const gc = await gv(repo, ['gc', '--repack-threshold', '100']);
      expect(gc.code, gc.stderr).toBe(0);
      await check('after a complete gc');
    } catch (e) {
      const err = e as Error;
      const at = err.message.includes(where) ? '' : `${where}: `;
      err.message = `crashloop seed ${SEED} (replay with GENVAULT_CRASHLOOP_SEED=${SEED}): ${at}${err.message}\n${summary()}`;
      throw err;
    }
  }, 600_000);
});

/**
 * `genvault nbd` and NBD sources, against real NBD tools: nbdinfo, nbdcopy, qemu-img,
 * qemu-io (libnbd-bin, qemu-utils), qemu-nbd exporting a qcow2 dirty bitmap. Exports of a
 * GPT+ext4 image, read-only and writable (the overlay becomes a new generation), pinned
 * against forget and gc; dirty-bitmap backups read only dirty extents; hostile clients
 * cost only their own connection, in bounded memory.
 */
import { ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { RECORD_HEADER_SIZE } from '../src/format/pack.js';
import { Repository } from '../src/repository/repository.js';
import { flipByte, gv, makeDisk, must, oneLine, prng, sh, sha256File, waitForFile, withMountedDisk, writeFiles, CliProcess, Scratch } from './helpers.js';

let s: Scratch;
let repo: string;
const src: Record<string, string> = {};
const env = () => ({ GENVAULT_RUN_DIR: s.path('run') });

interface Served {
  proc: CliProcess;
  uri: string;
  address: string;
  overlay: string | null;
  exports: Array<{ name: string; generation: string; image: string; size: number }>;
  pid: number;
}

/** Start `genvault nbd ARGS --json`; stopped (SIGTERM, then SIGKILL) on cleanup. */
async function serve(args: string[]): Promise<Served> {
  const proc = new CliProcess(['-r', repo, 'nbd', ...args, '--json'], env());
  s.onCleanup(async () => {
    proc.kill('SIGTERM');
    await proc.waitExit(20_000).catch(() => proc.kill('SIGKILL'));
  });
  await proc.waitFor(/^\{.*"uri".*\}$/m, 60_000);
  const line = proc.out.split('\n').find((l) => l.startsWith('{'))!;
  return { proc, ...(JSON.parse(line) as Omit<Served, 'proc'>) };
}

async function stop(x: Served): Promise<void> {
  x.proc.kill('SIGTERM');
  const r = await x.proc.waitExit(30_000);
  expect(r.code, x.proc.out).toBe(0);
}

/** Start a background tool (qemu-nbd); killed on cleanup. */
function background(cmd: string, args: string[]): { child: ChildProcess; exited: Promise<void> } {
  const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  child.stderr!.on('data', (d) => (err += d));
  const exited = new Promise<void>((r) => child.on('close', () => r()));
  s.onCleanup(async () => {
    child.kill('SIGKILL');
    await exited;
  });
  child.on('close', (code) => {
    if (code && code !== 0 && err) process.stderr.write(`${cmd}: ${err}`);
  });
  return { child, exited };
}

async function qemuNbd(image: string, sock: string, bitmap: string) {
  await fs.rm(sock, { force: true });
  const q = background('qemu-nbd', ['-r', '-t', '-f', 'qcow2', '-B', bitmap, '-k', sock, image]);
  await waitForFile(sock, 30_000);
  return { stop: async () => { q.child.kill('SIGTERM'); await q.exited; } };
}

const uriOf = (sock: string, name = '') => `nbd+unix:///${encodeURIComponent(name)}?socket=${sock}`;

async function backupJson(args: string[]): Promise<{ gen: Record<string, unknown> & { id: string; nbd?: Record<string, number | string | null> }; stderr: string }> {
  const r = await gv(repo, ['backup', ...args, '--json'], { env: env() });
  expect(r.code, r.stderr).toBe(0);
  return { gen: JSON.parse(r.stdout), stderr: r.stderr };
}

async function restoredSha(spec: string): Promise<string> {
  const out = s.path(`restore-${Date.now()}-${Math.random()}.raw`);
  const r = await gv(repo, ['restore', spec, out], { env: env() });
  expect(r.code, r.stderr).toBe(0);
  const sha = await sha256File(out);
  await fs.rm(out);
  return sha;
}

beforeAll(async () => {
  s = await Scratch.create('genvault-nbd-');
  repo = s.path('repo');
  src.gen0 = s.path('vm1-0.img');
  src.gen1 = s.path('vm1-1.img');
  await makeDisk(s, src.gen0, 48, async (dir) => {
    await writeFiles(dir, 11, 40, 250_000);
  });
  await must('cp', ['--sparse=always', src.gen0, src.gen1]);
  await withMountedDisk(s, src.gen1, async (dir) => {
    await writeFiles(path.join(dir, 'next-day'), 12, 6, 200_000);
  });
  expect((await gv(repo, ['init'])).code).toBe(0);
  for (const f of [src.gen0, src.gen1]) expect((await gv(repo, ['backup', f, '--name', 'vm1'])).code).toBe(0);
});

afterAll(async () => {
  await s?.cleanup();
});

describe('read-only export', () => {
  let a: Served;
  beforeAll(async () => {
    a = await serve(['vm1@latest', 'vm1@1']);
  });

  it('listens on a socket in the run directory; nbdinfo lists the default export and each generation by its file name', async () => {
    expect(a.address).toBe(path.join(s.path('run'), `nbd-vm1-${a.exports[0]!.generation}.sock`));
    const st = await fs.stat(a.address);
    expect(st.isSocket() && (st.mode & 0o777) === 0o600).toBe(true);
    const r = await sh('nbdinfo', ['--list', '--json', a.uri]);
    expect(r.code, r.stderr).toBe(0);
    const info = JSON.parse(r.stdout) as { exports: Array<Record<string, unknown>> };
    const names = info.exports.map((e) => e['export-name']).sort();
    // The default export (empty name) answers NBD_INFO_NAME with its generation's file name.
    expect(names).toEqual([a.exports[0]!.name, ...a.exports.map((e) => e.name)].sort());
    const size0 = (await fs.stat(src.gen1)).size;
    for (const e of info.exports) {
      expect(e.is_read_only).toBe(true);
      expect(e['export-size']).toBe(size0);
      expect(e.contexts).toContain('base:allocation');
    }
  });

  it('nbdcopy and qemu-img compare: each export is identical to its source', async () => {
    const out = s.path('copy.raw');
    await must('nbdcopy', [a.uri, out]);
    expect(await sha256File(out)).toBe(await sha256File(src.gen1));
    await must('nbdcopy', [uriOf(a.address, a.exports[1]!.name), out]);
    expect(await sha256File(out)).toBe(await sha256File(src.gen0));
    await fs.rm(out);
    const cmp = await sh('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src.gen1, a.uri]);
    expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0);
    expect(cmp.stdout).toMatch(/identical/);
  });

  it('nbdinfo --map shows exactly the zero chunks as holes', async () => {
    const r = await sh('nbdinfo', ['--map', '--json', a.uri]);
    expect(r.code, r.stderr).toBe(0);
    const map = JSON.parse(r.stdout) as Array<{ offset: number; length: number; type: number }>;
    const info = JSON.parse((await gv(repo, ['info', 'vm1@latest', '--json'], { env: env() })).stdout) as { size: number; stats: { zeroBytes: number } };
    const holes = map.filter((m) => m.type === 3);
    expect(holes.reduce((n, m) => n + m.length, 0)).toBe(info.stats.zeroBytes);
    expect(info.stats.zeroBytes).toBeGreaterThan(info.size / 4);
    expect(map.filter((m) => m.type === 0).reduce((n, m) => n + m.length, 0)).toBe(info.size - info.stats.zeroBytes);
    const img = await fs.readFile(src.gen1);
    for (const h of holes) expect(img.subarray(h.offset, h.offset + h.length).every((b) => b === 0)).toBe(true);
  });

  it('a qcow2 overlay backed by the export takes a VM\'s writes; the export stays as it was', async () => {
    const ov = s.path('run.qcow2');
    await must('qemu-img', ['create', '-q', '-f', 'qcow2', '-F', 'raw', '-b', a.uri, ov]);
    await must('qemu-io', ['-f', 'qcow2', ov, '-c', 'write -P 0x5a 1M 64k', '-c', 'write -P 0x5b 30000 5000']);
    const out = s.path('ov.raw');
    await must('qemu-img', ['convert', '-O', 'raw', ov, out]);
    const want = await fs.readFile(src.gen1);
    want.fill(0x5a, 1 << 20, (1 << 20) + (64 << 10));
    want.fill(0x5b, 30000, 35000);
    expect((await fs.readFile(out)).equals(want)).toBe(true);
    await fs.rm(out);
    const cmp = await sh('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src.gen1, a.uri]);
    expect(cmp.code, cmp.stdout).toBe(0);
  });

  it('TCP only on an explicit address: --listen 127.0.0.1:0 serves there', async () => {
    const t = await serve(['vm1@latest', '--listen', '127.0.0.1:0']);
    expect(t.uri).toMatch(/^nbd:\/\/127\.0\.0\.1:\d+\/$/);
    const r = await sh('nbdinfo', ['--size', t.uri]);
    expect(r.code, r.stderr).toBe(0);
    expect(Number(r.stdout.trim())).toBe((await fs.stat(src.gen1)).size);
    // A client still connected (here: mid-handshake) does not keep the server from stopping.
    const port = Number(t.address.slice(t.address.lastIndexOf(':') + 1));
    const idle = net.createConnection(port, '127.0.0.1');
    idle.on('error', () => undefined);
    idle.resume();
    await new Promise((r) => idle.once('data', r));
    await stop(t);
    idle.destroy();
  });

  hostilePeers(() => a);
});

/** A raw client: handshake by EXPORT_NAME, then whatever the test sends. */
async function rawClient(sock: string) {
  const sk = net.createConnection(sock);
  let buf = Buffer.alloc(0);
  let wake = () => undefined as void;
  const closed = new Promise<void>((r) => sk.on('close', () => r()));
  sk.on('data', (d: Buffer) => {
    buf = Buffer.concat([buf, d]);
    wake();
  });
  sk.on('error', () => undefined);
  const need = async (n: number) => {
    while (buf.length < n) {
      await Promise.race([new Promise<void>((r) => (wake = r)), closed.then(() => { throw new Error('closed'); })]);
    }
    const out = buf.subarray(0, n);
    buf = buf.subarray(n);
    return out;
  };
  await need(18);
  const opt = Buffer.alloc(16);
  opt.write('IHAVEOPT', 0, 'latin1');
  opt.writeUInt32BE(1, 8);
  sk.write(Buffer.concat([Buffer.from([0, 0, 0, 3]), opt]));
  const info = await need(10);
  const req = (type: number, offset: number, length: number, payload?: Buffer) => {
    const b = Buffer.alloc(28);
    b.writeUInt32BE(0x25609513, 0);
    b.writeUInt16BE(type, 6);
    b.write('hostile!', 8, 'latin1');
    b.writeBigUInt64BE(BigInt(offset), 16);
    b.writeUInt32BE(length, 24);
    sk.write(payload ? Buffer.concat([b, payload]) : b);
  };
  return { sk, need, closed, req, size: Number(info.readBigUInt64BE(0)) };
}

async function rss(pid: number): Promise<number> {
  const st = await fs.readFile(`/proc/${pid}/status`, 'utf8');
  return Number(/VmRSS:\s+(\d+) kB/.exec(st)![1]) * 1024;
}

function hostilePeers(server: () => Served) {
  describe('hostile clients', () => {
    it('garbage instead of a handshake closes that connection only', async () => {
      const sk = net.createConnection(server().address);
      sk.on('error', () => undefined);
      sk.resume();
      const closed = new Promise<void>((r) => sk.on('close', () => r()));
      sk.on('connect', () => sk.write(prng(7, 4096)));
      await closed;
      expect(server().proc.running).toBe(true);
    });

    it('reads past the end and huge reads get EINVAL, a write EPERM, an oversized WRITE closes the connection', async () => {
      const c = await rawClient(server().address);
      c.req(0, c.size - 100, 4096);
      c.req(0, 0, 0xffffffff);
      c.req(0, 2 ** 52, 1);
      c.req(1, 0, 4, Buffer.from('evil'));
      const errs: number[] = [];
      for (let i = 0; i < 4; i++) errs.push((await c.need(16)).readUInt32BE(4));
      expect(errs.sort((x, y) => x - y)).toEqual([1, 22, 22, 22]);
      c.req(0, c.size - 512, 512);
      const ok = await c.need(16 + 512);
      expect(ok.readUInt32BE(4)).toBe(0);
      c.req(1, 0, 0x7fffffff);
      await c.closed;
      expect(server().proc.running).toBe(true);
    });

    it('clients that disconnect mid-reply or never read their replies leave the others served, in bounded memory', async () => {
      const { address, proc } = server();
      for (let k = 0; k < 3; k++) {
        const c = await rawClient(address);
        for (let i = 0; i < 8; i++) c.req(0, 0, 32 << 20);
        await c.need(1000); // part of the first reply, then gone
        c.sk.destroy();
      }
      // One client asks for 3 GiB of reads and does not read the replies, another never stops.
      const flood = await rawClient(address);
      flood.sk.removeAllListeners('data');
      flood.sk.pause();
      for (let i = 0; i < 100; i++) flood.req(0, 0, 32 << 20);
      const base = await rss(proc.pid);
      let peak = base;
      let sampling = true;
      const sampler = (async () => {
        while (sampling) {
          peak = Math.max(peak, await rss(proc.pid).catch(() => 0));
          await new Promise((r) => setTimeout(r, 20));
        }
      })();
      const out = s.path('while-flooded.raw');
      await must('nbdcopy', [server().uri, out]);
      expect(await sha256File(out)).toBe(await sha256File(src.gen1));
      await fs.rm(out);
      // Now read the flood's replies to the end: the server sends them as the client reads.
      let got = 0;
      const want = 100 * (16 + (32 << 20));
      await new Promise<void>((resolve) => {
        flood.sk.on('data', (d: Buffer) => {
          got += d.length;
          if (got >= want) resolve();
        });
        void flood.closed.then(() => resolve());
        flood.sk.resume();
      });
      sampling = false;
      await sampler;
      expect(got).toBe(want);
      flood.sk.destroy();
      // Unbounded, the server would have held 3 GiB of replies.
      process.stderr.write(`nbd server RSS: ${base >> 20} MiB before the flood, peak ${peak >> 20} MiB\n`);
      expect(peak - base, `server RSS grew from ${base} to ${peak}`).toBeLessThan(400 << 20);
      const r = await sh('nbdinfo', ['--size', server().uri]);
      expect(r.code, r.stderr).toBe(0);
    });
  });
}

describe('writable export', () => {
  it('qemu-io writes land in the overlay; the generation is unchanged; the overlay becomes a new generation with the writes', async () => {
    const before = await restoredSha('vm1@latest');
    const w = await serve(['vm1@latest', '--writable', '--socket', s.path('w.sock')]);
    expect(w.overlay).toMatch(new RegExp(`^${repo}/overlays/vm1-${w.exports[0]!.generation}-.*\\.overlay$`));
    const size = w.exports[0]!.size;
    const info = await sh('nbdinfo', ['--json', w.uri]);
    expect(JSON.parse(info.stdout).exports[0].is_read_only).toBe(false);
    await must('qemu-io', ['-f', 'raw', w.uri,
      '-c', 'write -P 0xab 12345 100000', '-c', 'write -z 5M 1M', '-c', 'discard 8M 2M',
      '-c', `write -P 0xcd ${size - 1000} 1000`, '-c', 'read -P 0xab 12345 100000', '-c', 'flush']);
    const want = await fs.readFile(src.gen1);
    want.fill(0xab, 12345, 112345);
    want.fill(0, 5 << 20, 6 << 20);
    want.fill(0, 8 << 20, 10 << 20);
    want.fill(0xcd, size - 1000);
    // Block status through the overlay: zeroed and trimmed blocks are holes, written ones data.
    const map = JSON.parse(await must('nbdinfo', ['--map', '--json', w.uri])) as Array<{ offset: number; length: number; type: number }>;
    const typeAt = (off: number) => map.find((m) => m.offset <= off && off < m.offset + m.length)!.type;
    for (const off of [5 << 20, (6 << 20) - 1, 8 << 20, (10 << 20) - 1]) expect(typeAt(off)).toBe(3);
    for (const off of [12345, 112344, size - 1]) expect(typeAt(off)).toBe(0);
    const out = s.path('w.raw');
    await must('nbdcopy', [w.uri, out]);
    expect((await fs.readFile(out)).equals(want)).toBe(true);
    await fs.rm(out);
    // The overlay cannot be backed up while it is served.
    const busy = await gv(repo, ['backup', w.overlay!, '--from-nbd-overlay', '-n', 'vm1'], { env: env() });
    expect(busy.code).toBe(1);
    expect(oneLine(busy.stderr)).toMatch(/still being served by process \d+/);
    await stop(w);
    const last = JSON.parse(w.proc.out.trim().split('\n').at(-1)!) as { stopped: boolean; changedBlocks: number };
    // 4 KiB blocks: 100000 bytes from 12345 touch 25, 1 MiB and 2 MiB of zeros 768, the last 1000 bytes 1.
    expect(last).toEqual({ stopped: true, overlay: w.overlay, changedBlocks: 25 + 768 + 1 });
    expect(await restoredSha('vm1@latest')).toBe(before);
    const { gen } = await backupJson([w.overlay!, '--from-nbd-overlay', '-n', 'vm1']);
    expect(gen.source).toContain('nbd-overlay:');
    // The generation's chunks the writes do not touch are reused without being read.
    const reused = (gen as unknown as { overlay: { reusedBytes: number; base: string } }).overlay;
    expect(reused.base).toBe(w.exports[0]!.generation);
    expect(reused.reusedBytes).toBeGreaterThan(size - (8 << 20));
    const r = s.path('kept.raw');
    expect((await gv(repo, ['restore', `vm1@${gen.id}`, r], { env: env() })).code).toBe(0);
    expect((await fs.readFile(r)).equals(want)).toBe(true);
    await fs.rm(r);
    // The previous generation is as it was.
    expect(await restoredSha('vm1@1')).toBe(before);
  });

  it('an existing overlay is reused, and refused for another generation', async () => {
    const files = (await fs.readdir(path.join(repo, 'overlays'))).filter((f) => f.endsWith('.overlay'));
    const ov = path.join(repo, 'overlays', files[0]!);
    const id = /^vm1-([0-9a-f]{16})-/.exec(files[0]!)![1]!;
    const again = await serve([`vm1@${id}`, '--writable', '--overlay', ov, '--socket', s.path('w2.sock')]);
    const r = await sh('qemu-io', ['-f', 'raw', again.uri, '-c', 'read -P 0xab 12345 100000']);
    expect(r.code, r.stdout + r.stderr).toBe(0);
    await stop(again);
    const other = await gv(repo, ['nbd', 'vm1@latest', '--writable', '--overlay', ov, '--socket', s.path('w3.sock')], { env: env() });
    expect(other.code).toBe(1);
    expect(oneLine(other.stderr)).toMatch(/is an overlay of vm1@[0-9a-f]{16}, not of vm1@/);
  });
});

describe('pins', () => {
  it('a served generation is pinned: forget and gc leave it readable; the pin goes with the server', async () => {
    expect((await gv(repo, ['backup', src.gen0, '--name', 'pinned'], { env: env() })).code).toBe(0);
    const p = await serve(['pinned@latest', '--socket', s.path('p.sock')]);
    const id = p.exports[0]!.generation;
    const pins = (await fs.readdir(path.join(repo, 'locks'))).filter((f) => f.startsWith(`pin-${id}-`));
    expect(pins).toEqual([`pin-${id}-${p.pid}.json`]);
    const f = await gv(repo, ['forget', 'pinned@latest', '--force-young'], { env: env() });
    expect(f.code, f.stderr).toBe(0);
    const g = await gv(repo, ['gc'], { env: env() });
    expect(g.code, g.stderr).toBe(0);
    const out = s.path('pinned.raw');
    await must('nbdcopy', [p.uri, out]);
    expect(await sha256File(out)).toBe(await sha256File(src.gen0));
    await fs.rm(out);
    const connected = await rawClient(p.address); // a client in transmission when the server stops
    await stop(p);
    await connected.closed;
    expect((await fs.readdir(path.join(repo, 'locks'))).filter((x) => x.startsWith(`pin-${id}-`))).toEqual([]);
  });
});

describe('QEMU dirty bitmap as a source', () => {
  it('the first backup reads the whole disk and says so; the next reads only the dirty extents and restores byte-identical', async () => {
    const qcow = s.path('d.qcow2');
    await must('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', src.gen1, qcow]);
    await must('qemu-img', ['bitmap', '--add', qcow, 'b0']);
    const sock = s.path('q.sock');
    const uri = uriOf(sock);
    let q = await qemuNbd(qcow, sock, 'b0');
    const first = await backupJson([uri, '--bitmap', 'b0', '-n', 'vmq']);
    expect(first.stderr).toMatch(/reading the whole disk: vmq has no generation yet/);
    expect(first.gen.nbd).toMatchObject({ mode: 'full', parentBytes: 0 });
    await q.stop();

    await must('qemu-io', ['-f', 'qcow2', qcow, '-c', 'write -P 0x71 3M 200k', '-c', 'write -P 0x72 20000000 1000', '-c', 'write -z 30M 64k']);
    q = await qemuNbd(qcow, sock, 'b0');
    const map = JSON.parse((await must('nbdinfo', ['--map=qemu:dirty-bitmap:b0', '--json', uri]))) as Array<{ length: number; type: number }>;
    const dirty = map.filter((m) => m.type & 1).reduce((n, m) => n + m.length, 0);
    expect(dirty).toBeGreaterThan(0);
    const next = await backupJson([uri, '--bitmap', 'b0', '-n', 'vmq']);
    const size = (await fs.stat(src.gen1)).size;
    expect(next.gen.nbd).toMatchObject({ mode: 'dirty-bitmap', dirtyBytes: dirty, parent: first.gen.id });
    // Over NBD: the dirty bytes and the clean rest of the chunks they touch; every other
    // byte is the previous generation's chunks, reused by digest.
    const n = next.gen.nbd as { nbdBytes: number; parentBytes: number };
    expect(n.nbdBytes).toBeGreaterThan(dirty);
    expect(n.nbdBytes).toBeLessThan(dirty + 6 * 524288);
    expect(n.nbdBytes + n.parentBytes).toBe(size);
    expect(dirty).toBeLessThan(size / 20);
    // Clean chunks are reused by digest: none was read back from the previous generation and hashed.
    expect((next.gen as unknown as { stats: { unchangedBytes?: number } }).stats.unchangedBytes ?? 0).toBe(0);
    const raw = s.path('d.raw');
    await must('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', qcow, raw]);
    expect(await restoredSha('vmq@latest')).toBe(await sha256File(raw));

    // A bitmap the server does not have: the whole disk again, said so, same bytes.
    const missing = await backupJson([uri, '--bitmap', 'nosuch', '-n', 'vmq']);
    expect(missing.stderr).toMatch(/reading the whole disk: the server does not export the dirty bitmap nosuch/);
    expect(missing.gen.nbd).toMatchObject({ mode: 'full' });
    expect(await restoredSha('vmq@latest')).toBe(await sha256File(raw));
    await q.stop();
    await fs.rm(raw);
  });

  it('a job backs up through a dirty bitmap (source: nbd+unix://, bitmap:)', async () => {
    const qcow = s.path('d.qcow2');
    const sock = s.path('q.sock');
    await must('qemu-io', ['-f', 'qcow2', qcow, '-c', 'write -P 0x73 7M 300k']);
    const q = await qemuNbd(qcow, sock, 'b0');
    const jobs = s.path('jobs.yaml');
    await fs.writeFile(jobs, `repository: ${repo}\njobs:\n  vmq:\n    source: "${uriOf(sock)}"\n    bitmap: b0\n`, { mode: 0o600 });
    const check = await gv(null, ['run', '--check', '--config', jobs], { env: env() });
    expect(check.code, check.stdout + check.stderr).toBe(0);
    const r = await gv(null, ['run', 'vmq', '--now', '--config', jobs], { env: env() });
    expect(r.code, r.stdout + r.stderr).toBe(0);
    await q.stop();
    const latest = JSON.parse((await gv(repo, ['info', 'vmq@latest', '--json'], { env: env() })).stdout) as { source: string };
    expect(latest.source).toBe(`nbd:${uriOf(sock)} bitmap b0`);
    const raw = s.path('d.raw');
    await must('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', qcow, raw]);
    expect(await restoredSha('vmq@latest')).toBe(await sha256File(raw));
    await fs.rm(raw);
    // bitmap: on a source that is not NBD is a problem of the job file.
    await fs.writeFile(jobs, `repository: ${repo}\njobs:\n  vmz:\n    source: ${src.gen0}\n    bitmap: b0\n`, { mode: 0o600 });
    const bad = await gv(null, ['run', '--check', '--config', jobs], { env: env() });
    expect(bad.code).toBe(1);
    expect(bad.stdout + bad.stderr).toMatch(/jobs\.vmz\.bitmap: only for nbd:\/\/ and nbd\+unix:\/\/ sources/);
  });

  it('--verify-hints: a bitmap that missed a write fails the backup loudly; a sound one passes the check', async () => {
    const qcow = s.path('d.qcow2');
    const sock = s.path('q.sock');
    const uri = uriOf(sock);
    // A write the bitmap does not see.
    await must('qemu-img', ['bitmap', '--disable', qcow, 'b0']);
    await must('qemu-io', ['-f', 'qcow2', qcow, '-c', 'write -P 0x7f 40M 64k']);
    await must('qemu-img', ['bitmap', '--enable', qcow, 'b0']);
    const q = await qemuNbd(qcow, sock, 'b0');
    const before = (await gv(repo, ['list', 'vmq', '--json'], { env: env() })).stdout;
    const r = await gv(repo, ['backup', uri, '--bitmap', 'b0', '--verify-hints', '100', '-n', 'vmq'], { env: env() });
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(new RegExp(`dirty bitmap b0 missed a change: byte ${40 << 20} differs .*nothing was committed`));
    expect((await gv(repo, ['list', 'vmq', '--json'], { env: env() })).stdout).toBe(before);
    // A whole read repairs the chain; the check then passes.
    await backupJson([uri, '-n', 'vmq']);
    const ok = await backupJson([uri, '--bitmap', 'b0', '--verify-hints', '5', '-n', 'vmq']);
    expect(ok.gen.nbd).toMatchObject({ mode: 'dirty-bitmap' });
    expect(ok.gen.nbd!.verifiedBytes).toBeGreaterThan(0);
    await q.stop();
    const raw = s.path('d.raw');
    await must('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', qcow, raw]);
    expect(await restoredSha('vmq@latest')).toBe(await sha256File(raw));
    await fs.rm(raw);
  });
});

describe('dirty-bitmap backups of an encrypted repository', () => {
  it('rebuilt chunks get keyed identities (restore and verify --full check every chunk against its HMAC) and the rest dedups against the first backup', async () => {
    const erepo = s.path('erepo');
    const pw = s.path('pw');
    await fs.writeFile(pw, 'nbd test passphrase\n', { mode: 0o600 });
    const eenv = { ...env(), GENVAULT_PASSWORD_FILE: pw };
    const eg = async (args: string[]) => {
      const r = await gv(erepo, args, { env: eenv });
      expect(r.code, r.stderr).toBe(0);
      return r.stdout;
    };
    await eg(['init', '--encryption', 'aes-256-gcm']);
    const qcow = s.path('e.qcow2');
    await must('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', src.gen1, qcow]);
    await must('qemu-img', ['bitmap', '--add', qcow, 'b0']);
    const sock = s.path('qe.sock');
    let q = await qemuNbd(qcow, sock, 'b0');
    await eg(['backup', uriOf(sock), '--bitmap', 'b0', '-n', 'vme']);
    await q.stop();
    // A changed stretch of known bytes: its chunks are rebuilt by the dirty-bitmap path.
    await must('qemu-io', ['-f', 'qcow2', qcow, '-c', 'write -P 0x5a 5M 256k']);
    q = await qemuNbd(qcow, sock, 'b0');
    const next = JSON.parse(await eg(['backup', uriOf(sock), '--bitmap', 'b0', '-n', 'vme', '--json'])) as { nbd: { mode: string }; stats: { newBytes: number } };
    await q.stop();
    expect(next.nbd.mode).toBe('dirty-bitmap');
    expect(next.stats.newBytes).toBeLessThan(4 << 20); // the rest was found by its keyed identity
    const raw = s.path('e.raw');
    await must('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', qcow, raw]);
    const out = s.path('e.out');
    await eg(['restore', 'vme@latest', out]);
    expect(await sha256File(out)).toBe(await sha256File(raw));
    await eg(['verify', '--full']);
    await fs.rm(raw);
    await fs.rm(out);
  });
});

describe('healing through a dirty-bitmap backup', () => {
  it('a damaged chunk the bitmap calls clean is read over NBD (it must hash as before) and heals', async () => {
    const qcow = s.path('d.qcow2');
    const sock = s.path('q.sock');
    // A data chunk of vmq's newest generation far from every write of these tests.
    const r = await Repository.open(repo);
    let victim: { offset: number; length: number; pack: string; at: number } | null = null;
    try {
      const map = await r.chunkMap((await r.generations('vmq')).at(-1)!);
      let pos = 0;
      for (let i = 0; i < map.refs.length && !victim; i++) {
        const leaf = await map.leaf(i);
        for (let j = 0; j < leaf.lengths.length && !victim; j++) {
          const len = leaf.lengths[j]!;
          if (!leaf.zero[j] && pos >= 12 << 20 && pos + len <= 19 << 20) {
            const loc = (await r.location(leaf.digests.subarray(j * 32, j * 32 + 32)))!;
            victim = { offset: pos, length: len, pack: path.join(repo, 'packs', loc.packId.slice(0, 2), `${loc.packId}.pack`), at: loc.offset + RECORD_HEADER_SIZE + 10 };
          }
          pos += len;
        }
      }
    } finally {
      await r.close();
    }
    expect(victim, 'a data chunk between 12 and 19 MiB').not.toBeNull();
    await flipByte(victim!.pack, victim!.at);
    const found = await gv(repo, ['verify', '--full'], { env: env() });
    expect(found.code, found.stdout + found.stderr).toBe(1);
    expect(found.stdout).toMatch(/DAMAGED generation vmq@/);
    const q = await qemuNbd(qcow, sock, 'b0');
    const { gen } = await backupJson([uriOf(sock), '--bitmap', 'b0', '-n', 'vmq']);
    await q.stop();
    const nbd = gen.nbd as { mode: string; nbdBytes: number; dirtyBytes: number };
    expect(nbd.mode).toBe('dirty-bitmap');
    expect(nbd.nbdBytes - nbd.dirtyBytes).toBeGreaterThanOrEqual(victim!.length); // the damaged chunk(s), read again
    // The new generation is whole (other members of a damaged group record that no backup
    // stored again stay damaged for verify: healing is per chunk).
    const healed = await gv(repo, ['verify', '--full'], { env: env() });
    expect(healed.stdout).not.toMatch(new RegExp(`DAMAGED generation vmq@${gen.id}`));
    const raw = s.path('d.raw');
    await must('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', qcow, raw]);
    expect(await restoredSha('vmq@latest')).toBe(await sha256File(raw));
    await fs.rm(raw);
  });
});

describe('NBD sources without a bitmap', () => {
  it('nbd://127.0.0.1:PORT/ from nbdkit: the whole disk, holes (base:allocation) not read, restores byte-identical', async () => {
    const probe = net.createServer().listen(0, '127.0.0.1');
    await new Promise((r) => probe.once('listening', r));
    const port = (probe.address() as net.AddressInfo).port;
    await new Promise((r) => probe.close(r));
    const k = background('nbdkit', ['--foreground', '--exit-with-parent', '-r', '--ipaddr', '127.0.0.1', '--port', String(port), 'file', src.gen0]);
    let out = '';
    for (let i = 0; i < 100 && !/export-size/.test(out); i++) {
      out = (await sh('nbdinfo', [`nbd://127.0.0.1:${port}/`])).stdout;
      if (!/export-size/.test(out)) await new Promise((r) => setTimeout(r, 100));
    }
    const { gen } = await backupJson([`nbd://127.0.0.1:${port}/`, '-n', 'viatcp']);
    const size = (await fs.stat(src.gen0)).size;
    expect(gen.nbd).toMatchObject({ mode: 'full', fullReason: null, parentBytes: 0 });
    expect(Number(gen.nbd!.zeroBytes)).toBeGreaterThan(0);
    expect(Number(gen.nbd!.nbdBytes) + Number(gen.nbd!.zeroBytes)).toBe(size);
    expect(await restoredSha('viatcp@latest')).toBe(await sha256File(src.gen0));
    k.child.kill('SIGTERM');
    await k.exited;
  });
});

describe('command line', () => {
  it('failures are one line with exit 1, usage errors exit 2', async () => {
    const cases: Array<[string[], number, RegExp]> = [
      [['nbd', 'vm1@99'], 1, /only \d+ generation/],
      [['nbd', 'nosuch'], 1, /no image named nosuch/],
      [['nbd', 'vm1', '--listen', '10809'], 2, /expected HOST:PORT/],
      [['nbd', 'vm1', '--listen', '127.0.0.1:1', '--socket', s.path('x.sock')], 2, /exclude each other/],
      [['nbd', 'vm1', '--overlay', s.path('o')], 2, /--overlay needs --writable/],
      [['nbd', 'vm1@0', 'vm1@1', '--writable'], 2, /exactly one generation/],
      [['nbd', 'vm1', '--socket', s.path('x'.repeat(120))], 2, /longer than 107 bytes/],
      [['backup', src.gen0, '-n', 'vm1', '--bitmap', 'b0'], 2, /--bitmap needs an nbd/],
      [['backup', 'nbd://127.0.0.1:1/', '-n', 'vm1', '--verify-hints', '5'], 2, /--verify-hints needs --bitmap/],
      [['backup', 'nbd://127.0.0.1:1/', '-n', 'vm1', '--bitmap', 'b', '--verify-hints', '0'], 2, /'--verify-hints <percent>' argument '0' is invalid\. Expected a percentage/],
      [['backup', 'nbd+unix:///?socket=' + s.path('none.sock'), '-n', 'vm1'], 1, /cannot connect to nbd\+unix/],
      [['backup', src.gen0, '--from-nbd-overlay', '-n', 'vm1'], 1, /not a genvault NBD overlay/],
      [['nbd', 'vm1', '--socket', src.gen0], 1, /cannot listen on .*: a file that is not a socket is there/],
    ];
    const busy = net.createServer().listen(0, '127.0.0.1');
    await new Promise((r) => busy.once('listening', r));
    s.onCleanup(() => new Promise((r) => busy.close(r)));
    cases.push([['nbd', 'vm1', '--listen', `127.0.0.1:${(busy.address() as net.AddressInfo).port}`], 1, /cannot listen on 127\.0\.0\.1:\d+: the address is in use/]);
    for (const [args, code, re] of cases) {
      const r = await gv(repo, args, { env: env() });
      expect(r.code, `${args.join(' ')}: ${r.stderr}`).toBe(code);
      expect(oneLine(r.stderr)).toMatch(re);
    }
  });
});

/**
 * Remote repositories (issue 24): `genvault serve` behind a real OpenSSH sshd on
 * 127.0.0.1, run as forced commands in authorized_keys (namespaces, permissions), and the
 * client commands with -r ssh://.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fs from 'node:fs/promises';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { CLI, CliProcess, Scratch, dataPackFiles, flipByte, gv, gvOk, oneLine, prng, sh, sha256File, writeImage } from './helpers.js';
import { Sshd, keygen, startSshd } from './sshd.js';

let s: Scratch;
let sshd: Sshd;
let repo: string;
const keys: Record<string, string> = {};

/** A client key whose forced command is `genvault serve` with these options. */
async function clientKey(name: string, serveArgs: string): Promise<string> {
  const k = s.path(`key-${name}`);
  await keygen(k);
  await sshd.authorize(`${k}.pub`, `command="${process.execPath} ${CLI} serve --repo ${repo} ${serveArgs}",restrict`);
  return k;
}

/** genvault against the ssh:// repository with one client key. */
function rgv(key: string, args: string[], input?: Buffer) {
  return gv(sshd.url('/srv/ignored'), ['--repo-identity', key, '--repo-known-hosts', sshd.knownHosts, ...args], input ? { input } : {});
}

beforeAll(async () => {
  s = await Scratch.create('genvault-remote-');
  sshd = await startSshd(s);
  repo = s.path('repo');
  await gvOk(repo, ['init']);
  keys.full = await clientKey('full', '');
  keys.kvm1 = await clientKey('kvm1', '--namespace kvm1 --permissions append');
  keys.kvm2 = await clientKey('kvm2', '--namespace kvm2 --permissions full');
  keys.reader = await clientKey('reader', '--namespace kvm1 --permissions read');
}, 60_000);

afterAll(async () => {
  await sshd?.stop();
  await s?.cleanup();
});

async function image(name: string, seed: number, mib = 12): Promise<string> {
  const f = s.path(name);
  await writeImage(f, [prng(seed, (mib - 4) << 20), Buffer.alloc(4 << 20), prng(seed + 1, 123457)]);
  return f;
}

describe('remote repository over ssh', () => {
  it('backs up, lists, restores and cats through a namespaced append key', async () => {
    const img = await image('a.img', 1);
    const b = await rgv(keys.kvm1!, ['backup', img, '--name', 'vm1', '--json']);
    expect(b.stderr).toBe('');
    expect(b.code).toBe(0);
    const gen = JSON.parse(b.stdout);
    expect(gen.name).toBe('vm1');
    // The server holds it in the namespace.
    const local = JSON.parse(await gvOk(repo, ['list', '--json']));
    expect(local.map((g: { name: string }) => g.name)).toContain('kvm1:vm1');
    const l = JSON.parse((await rgv(keys.kvm1!, ['list', '--json'])).stdout);
    expect(l.map((g: { name: string }) => g.name)).toEqual(['vm1']);
    const out = s.path('a.restored');
    const r = await rgv(keys.kvm1!, ['restore', 'vm1@latest', out]);
    expect(r.stderr).toBe('');
    expect(await sha256File(out)).toBe(await sha256File(img));
    // cat: the raw bytes on stdout (zeros included).
    const catOut = s.path('a.cat');
    const c = await sh('bash', ['-c', `"$@" > ${catOut}`, 'gv', process.execPath, CLI, '-r', sshd.url('/x'), '--repo-identity', keys.kvm1!, '--repo-known-hosts', sshd.knownHosts, 'cat', 'vm1']);
    expect(c.stderr).toBe('');
    expect(await sha256File(catOut)).toBe(await sha256File(img));
    const v = await rgv(keys.kvm1!, ['verify']);
    expect(v.code).toBe(0);
    expect(v.stdout).toMatch(/1 generation\(s\).*every chunk read and checked on the server/);
  }, 120_000);

  it('a next-day backup sends only what changed; another namespace sends everything again', async () => {
    const img = await image('b.img', 2);
    const first = JSON.parse((await rgv(keys.kvm1!, ['backup', img, '--name', 'vm2', '--json'])).stdout);
    expect(first.remote.sentChunkBytes).toBeGreaterThan(8 << 20);
    // Next day: 1 MiB changed in the middle.
    const fh = await fs.open(img, 'r+');
    await fh.write(prng(99, 1 << 20), 0, 1 << 20, 3 << 20);
    await fh.close();
    const second = JSON.parse((await rgv(keys.kvm1!, ['backup', img, '--name', 'vm2', '--json'])).stdout);
    expect(second.remote.sentChunkBytes).toBeLessThanOrEqual(1.1 * second.stats.newBytes + (1 << 20));
    expect(second.remote.sentChunkBytes).toBeLessThan(3 << 20);
    // Unchanged chunks were recognised by BLAKE3 against the parent (whose digests the
    // server hashed from the records of the first backup), not identified again.
    expect(first.remote.unchangedBytes).toBe(0);
    expect(second.remote.unchangedBytes).toBeGreaterThan(first.stats.bytesRead - first.stats.zeroBytes - (3 << 20));
    // kvm2 holds none of these chunks: it is asked for every one (no probing of kvm1's data),
    // though the repository stores nothing new for them.
    const other = JSON.parse((await rgv(keys.kvm2!, ['backup', img, '--name', 'vm2', '--json'])).stdout);
    expect(other.stats.newBytes).toBe(0);
    expect(other.remote.sentChunkBytes).toBeGreaterThan(8 << 20);
    // Nor does it get kvm1's parent to compare with.
    expect(other.remote.unchangedBytes).toBe(0);
    const out = s.path('b.kvm2');
    expect((await rgv(keys.kvm2!, ['restore', 'vm2', out])).code).toBe(0);
    expect(await sha256File(out)).toBe(await sha256File(img));
  }, 120_000);

  it('--limit-rate bounds what a backup sends', async () => {
    const img = await image('l.img', 12, 8); // 4 MiB of random data, 4 MiB zeros, a tail
    const t0 = Date.now();
    const r = await rgv(keys.kvm1!, ['backup', img, '--name', 'limited', '--limit-rate', '1M', '--json']);
    const secs = (Date.now() - t0) / 1000;
    expect(r.code, r.stderr).toBe(0);
    const sent = JSON.parse(r.stdout).remote.sentBytes;
    expect(sent).toBeGreaterThan(4 << 20);
    // At 1 MiB/s (a quarter second's burst allowed) the sends alone take this long.
    expect(secs).toBeGreaterThanOrEqual(sent / (1 << 20) - 0.5);
    expect((await rgv(keys.kvm1!, ['backup', img, '--name', 'limited', '--limit-rate', 'fast'])).stderr).toMatch(/--limit-rate/);
  }, 120_000);

  it('an encrypted repository: the server holds the key, the client needs none', async () => {
    const er = s.path('repo-enc');
    const pw = s.path('enc.pw');
    await fs.writeFile(pw, 'correct horse battery staple\n', { mode: 0o600 });
    await gvOk(er, ['--key-file', pw, 'init', '--encryption', 'aes-256-gcm']);
    const k = s.path('key-enc');
    await keygen(k);
    await sshd.authorize(`${k}.pub`, `command="${process.execPath} ${CLI} --key-file ${pw} serve --repo ${er} --namespace kvm1 --permissions append",restrict`);
    const img = await image('enc.img', 41, 8);
    const args = ['--repo-identity', k, '--repo-known-hosts', sshd.knownHosts];
    const b = await gv(sshd.url('/x'), [...args, 'backup', img, '--name', 'sec', '--json'], { env: { GENVAULT_PASSWORD_FILE: '' } });
    expect(b.stderr).toBe('');
    const out = s.path('enc.out');
    const r = await gv(sshd.url('/x'), [...args, 'restore', 'sec', out], { env: { GENVAULT_PASSWORD_FILE: '' } });
    expect(r.stderr).toBe('');
    expect(await sha256File(out)).toBe(await sha256File(img));
    // A next-day backup with the keyed chunker and identities still sends next to nothing.
    const again = JSON.parse((await gv(sshd.url('/x'), [...args, 'backup', img, '--name', 'sec', '--json'])).stdout);
    expect(again.remote.sentChunkBytes).toBeLessThan(64 * 1024);
    // ... and recognises the unchanged chunks by keyed BLAKE3, as a local backup would.
    expect(again.remote.unchangedBytes).toBeGreaterThan(0);
    expect(again.remote.unchangedBytes).toBe(again.stats.bytesRead - again.stats.zeroBytes);
    expect((await gv(er, ['--key-file', pw, 'verify', '--full'])).code).toBe(0);
  }, 120_000);

  it('pulls an ssh:// source into an ssh:// repository', async () => {
    const img = await image('p.img', 11, 10);
    const r = await rgv(keys.kvm1!, ['backup', sshd.url(img), '-i', sshd.userKey, '--known-hosts', sshd.knownHosts, '--name', 'pulled']);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const out = s.path('p.out');
    await gvOk(repo, ['restore', 'kvm1:pulled', out]);
    expect(await sha256File(out)).toBe(await sha256File(img));
  }, 120_000);

  it('keeps namespaces apart and enforces permissions', async () => {
    const img = await image('c.img', 3, 6);
    expect((await rgv(keys.kvm2!, ['backup', img, '--name', 'only2'])).code).toBe(0);
    // kvm1 neither sees nor reaches kvm2's images, under any spelling.
    const l1 = JSON.parse((await rgv(keys.kvm1!, ['list', '--json'])).stdout) as Array<{ name: string }>;
    expect(l1.map((g) => g.name)).not.toContain('only2');
    for (const t of ['only2', 'kvm2:only2', '../kvm2:only2']) {
      const r = await rgv(keys.kvm1!, ['restore', t, s.path('x.img')]);
      expect(r.code).not.toBe(0);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
    }
    expect((await rgv(keys.kvm1!, ['info', 'kvm2:only2'])).stderr).toMatch(/invalid image name/);
    // append: no forget, protect or unprotect.
    for (const c of [['forget', 'vm1@latest', '--force-young'], ['protect', 'vm1'], ['unprotect', 'vm1']]) {
      const r = await rgv(keys.kvm1!, c);
      expect(r.code).toBe(1);
      expect(oneLine(r.stderr)).toMatch(/permission denied: .* needs full access; this key has append \(namespace kvm1\)/);
    }
    // read: no backup; it sees kvm1's images.
    const rb = await rgv(keys.reader!, ['backup', img, '--name', 'r1']);
    expect(oneLine(rb.stderr)).toMatch(/permission denied: backup needs append access; this key has read/);
    const lr = JSON.parse((await rgv(keys.reader!, ['list', '--json'])).stdout) as Array<{ name: string }>;
    expect(lr.map((g) => g.name)).toContain('vm1');
    // Odd names are refused by the server, not mapped.
    for (const n of ['..', 'a/b', 'x:y', '-x', 'latest']) {
      const r = await rgv(keys.kvm2!, ['backup', img, '--name', n]);
      expect(r.code).not.toBe(0);
    }
    // Tags and the source description reach the admin's terminal: no control characters.
    expect(oneLine((await rgv(keys.kvm2!, ['backup', img, '--name', 'tagged', '--tag', 'red\u001b[31m'])).stderr)).toMatch(/invalid tags/);
    // full, in its own namespace: protect, unprotect, forget.
    expect((await rgv(keys.kvm2!, ['protect', 'only2'])).code).toBe(0);
    expect((await rgv(keys.kvm2!, ['forget', 'only2', '--force-young'])).stderr).toMatch(/protected/);
    expect((await rgv(keys.kvm2!, ['unprotect', 'only2'])).code).toBe(0);
    expect((await rgv(keys.kvm2!, ['forget', 'only2', '--force-young'])).code).toBe(0);
    expect(JSON.parse(await gvOk(repo, ['list', '--json'])).map((g: { name: string }) => g.name)).not.toContain('kvm2:only2');
  }, 120_000);

  it('a client killed mid-backup leaves no generation, and gc removes what it wrote', async () => {
    const img = await image('d.img', 4, 40);
    const p = new CliProcess(['-r', sshd.url('/x'), '--repo-identity', keys.kvm1!, '--repo-known-hosts', sshd.knownHosts, 'backup', img, '--name', 'killed', '--limit-rate', '8M']);
    await new Promise((r) => setTimeout(r, 2500));
    expect(p.running).toBe(true);
    p.kill('SIGKILL');
    await p.exited;
    // The server's session sees the end of its input and gives up.
    const serving = async () => (await sh('pgrep', ['-f', `serve --repo ${repo} --namespace kvm1`])).code === 0;
    for (let i = 0; i < 100 && (await serving()); i++) await new Promise((r) => setTimeout(r, 100));
    expect(await serving()).toBe(false);
    const names = JSON.parse(await gvOk(repo, ['list', '--json'])).map((g: { name: string }) => g.name);
    expect(names).not.toContain('kvm1:killed');
    await gvOk(repo, ['gc']);
    const v = await gv(repo, ['verify']);
    expect(v.code).toBe(0);
    // The next run succeeds and restores.
    const again = await rgv(keys.kvm1!, ['backup', img, '--name', 'killed']);
    expect(again.stderr).toBe('');
    const out = s.path('d.out');
    await gvOk(repo, ['restore', 'kvm1:killed', out]);
    expect(await sha256File(out)).toBe(await sha256File(img));
  }, 180_000);

  it('a server killed mid-backup: the client ends with one line, the next run succeeds', async () => {
    const img = await image('f.img', 6, 40);
    const args = ['-r', sshd.url('/x'), '--repo-identity', keys.kvm1!, '--repo-known-hosts', sshd.knownHosts, 'backup', img, '--name', 'srvkill'];
    const p = new CliProcess([...args, '--limit-rate', '8M']);
    await new Promise((r) => setTimeout(r, 2500));
    expect(p.running).toBe(true);
    await sh('pkill', ['-KILL', '-f', `serve --repo ${repo} --namespace kvm1`]);
    const e = await p.waitExit(30_000);
    expect(e.code).toBe(1);
    expect(p.out.trim().split('\n')).toHaveLength(1);
    expect(p.out).toMatch(/genvault: .*(connection closed|lost|went away)/);
    expect(JSON.parse(await gvOk(repo, ['list', '--json'])).map((g: { name: string }) => g.name)).not.toContain('kvm1:srvkill');
    const again = await gv(null, args);
    expect(again.stderr).toBe('');
    expect(again.code).toBe(0);
  }, 180_000);

  it('verify over ssh reports damage in one line and exit 1', async () => {
    const r0 = s.path('repo-damaged');
    await gvOk(r0, ['init']);
    const img = await image('e.img', 5, 6);
    await gvOk(r0, ['backup', img, '--name', 'vmx']);
    const k = s.path('key-dmg');
    await keygen(k);
    await sshd.authorize(`${k}.pub`, `command="${process.execPath} ${CLI} serve --repo ${r0} --permissions read",restrict`);
    const pack = (await dataPackFiles(r0))[0]!;
    await flipByte(pack, 4096);
    const v = await gv(sshd.url('/x'), ['--repo-identity', k, '--repo-known-hosts', sshd.knownHosts, 'verify']);
    expect(v.code).toBe(1);
    expect(v.stderr.trim().split('\n')).toHaveLength(1);
    expect(v.stderr).toMatch(/damage found: 1 generation\(s\) affected: vmx@/);
  }, 120_000);
});

describe('sync through a served repository', () => {
  it('local -> ssh -> local: every generation restores byte-identical; next day sends only the new records; kills are resumed', async () => {
    const src = s.path('sync-src');
    const mid = s.path('sync-mid');
    const far = s.path('sync-far');
    await gvOk(src, ['init']);
    const a = await image('s1.img', 21, 16);
    await gvOk(src, ['backup', a, '--name', 'web', '--tag', 'daily']);
    const b = await image('s2.img', 22, 8);
    await gvOk(src, ['backup', b, '--name', 'db']);
    await gvOk(src, ['protect', 'db']);
    await gvOk(mid, ['init', '--like', src]);
    await gvOk(far, ['init', '--like', src]);
    const k = s.path('key-sync');
    await keygen(k);
    await sshd.authorize(`${k}.pub`, `command="${process.execPath} ${CLI} serve --repo ${mid} --permissions full",restrict`);
    const ssh = ['--repo-identity', k, '--repo-known-hosts', sshd.knownHosts];
    const url = sshd.url(mid);
    const up = await gv(null, [...ssh, 'sync', src, url, '--json']);
    expect(up.stderr).toBe('');
    const r1 = JSON.parse(up.stdout);
    expect(r1.copied).toHaveLength(2);
    const down = await gv(null, [...ssh, 'sync', url, far, '--json']);
    expect(down.stderr).toBe('');
    expect(JSON.parse(down.stdout).copied).toHaveLength(2);
    for (const [name, img] of [['web', a], ['db', b]] as const) {
      const out = s.path(`far-${name}`);
      await gvOk(far, ['restore', `${name}@latest`, out]);
      expect(await sha256File(out)).toBe(await sha256File(img));
    }
    const farList = JSON.parse(await gvOk(far, ['list', '--json'])) as Array<{ name: string; tags: string[]; protected: boolean }>;
    expect(farList.find((g) => g.name === 'db')!.protected).toBe(true);
    expect(farList.find((g) => g.name === 'web')!.tags).toEqual(['daily']);
    // Next day: a 1 MiB change; the second sync stores no more than 110% of what the backup stored.
    const fh = await fs.open(a, 'r+');
    await fh.write(prng(23, 1 << 20), 0, 1 << 20, 5 << 20);
    await fh.close();
    const next = JSON.parse(await gvOk(src, ['backup', a, '--name', 'web', '--json']));
    const up2 = JSON.parse((await gv(null, [...ssh, 'sync', src, url, '--json'])).stdout);
    expect(up2.copied).toHaveLength(1);
    expect(up2.storedAdded).toBeLessThanOrEqual(1.1 * next.stats.newStored + 64 * 1024);
    // Killed at a few moments, then run again: the same end result at the far side.
    await gvOk(src, ['backup', await image('s3.img', 24, 24), '--name', 'big']);
    for (const ms of [300, 900, 1500]) {
      const p = new CliProcess([...ssh, 'sync', src, url]);
      await new Promise((r) => setTimeout(r, ms));
      p.kill('SIGKILL');
      await p.exited;
    }
    // A killed client's server session gives its image lock up only once it sees the end of
    // its input, and on a loaded host one may even start after its client died: the rerun
    // queues behind it, as a sysadmin's would (the refusal says to use --wait).
    const fin = await gv(null, [...ssh, 'sync', src, url, '--wait', '--json']);
    expect(fin.stderr).toBe('');
    expect((await gv(mid, ['verify'])).code).toBe(0);
    await gvOk(mid, ['gc']);
    expect((await gv(mid, ['verify', '--full'])).code).toBe(0);
    const ids = (r: string) => gvOk(r, ['list', '--json']).then((t) => (JSON.parse(t) as Array<{ id: string }>).map((g) => g.id).sort());
    expect(await ids(mid)).toEqual(await ids(src));
    const out = s.path('mid-big');
    await gvOk(mid, ['restore', 'big', out]);
    expect(await sha256File(out)).toBe(await sha256File(s.path('s3.img')));
  }, 300_000);

  it('a sync: job copies to an ssh:// destination and status shows it', async () => {
    const src = s.path('job-src');
    const dst = s.path('job-dst');
    await gvOk(src, ['init']);
    const img = await image('j.img', 31, 6);
    await gvOk(src, ['backup', img, '--name', 'web']);
    await gvOk(dst, ['init', '--like', src]);
    const k = s.path('key-job');
    await keygen(k);
    await sshd.authorize(`${k}.pub`, `command="${process.execPath} ${CLI} serve --repo ${dst} --permissions full",restrict`);
    const file = s.path('jobs.yaml');
    await fs.writeFile(
      file,
      `repository: ${src}\ntimezone: UTC\njobs:\n  offsite:\n    sync: { to: "${sshd.url(dst)}" }\n    ssh: { identity: ${k}, known-hosts: ${sshd.knownHosts} }\n    schedule: "0 4 * * *"\n`,
      { mode: 0o600 },
    );
    const r = await gv(null, ['run', '--config', file, '--now', 'offsite']);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^offsite: ok: synced 1 generation\(s\) to ssh:\/\//m);
    const out = s.path('j.out');
    await gvOk(dst, ['restore', 'web', out]);
    expect(await sha256File(out)).toBe(await sha256File(img));
    const st = JSON.parse((await gv(null, ['status', '--config', file, '--json'])).stdout) as { jobs: Array<{ job: string; state: string }> };
    expect(st.jobs.find((j) => j.job === 'offsite')!.state).toBe('OK');
  }, 120_000);

  it('a namespaced or append key cannot sync', async () => {
    const src = s.path('sync-src');
    for (const key of [keys.kvm1!, keys.kvm2!]) {
      const r = await gv(null, ['--repo-identity', key, '--repo-known-hosts', sshd.knownHosts, 'sync', src, sshd.url('/x')]);
      expect(r.code).toBe(1);
      expect(oneLine(r.stderr)).toMatch(/permission denied: sync copies whole repositories/);
    }
  }, 60_000);
});

/** genvault serve run directly (no ssh) with the given bytes on stdin. */
function serveRaw(input: Buffer, args: string[] = []): Promise<{ code: number | null; stdout: Buffer; stderr: string }> {
  return new Promise((resolve) => {
    const c = spawn(process.execPath, [CLI, '-r', repo, 'serve', ...args], { stdio: ['pipe', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    let err = '';
    c.stdout.on('data', (d: Buffer) => out.push(d));
    c.stderr.on('data', (d: Buffer) => (err += d.toString()));
    c.on('close', (code) => resolve({ code, stdout: Buffer.concat(out), stderr: err }));
    c.stdin.on('error', () => undefined);
    c.stdin.end(input);
  });
}

function frame(type: number, id: number, payload: Buffer): Buffer {
  const h = Buffer.alloc(9);
  h.writeUInt32BE(payload.length + 5, 0);
  h[4] = type;
  h.writeUInt32BE(id, 5);
  return Buffer.concat([h, payload]);
}

const hello = frame(1, 0, Buffer.from(JSON.stringify({ protocol: 1, path: '/nonexistent' })));

describe('a hostile server', () => {
  it('a WELCOME with impossible chunking or a bad identity key ends the command in one line, before any read', async () => {
    const fake = s.path('fake-serve.mjs');
    // Answers HELLO with the WELCOME given in its argument (base64 JSON), then waits.
    await fs.writeFile(
      fake,
      `const w = Buffer.from(process.argv[2], 'base64');
process.stdin.once('data', () => {
  const h = Buffer.alloc(9); h.writeUInt32BE(w.length + 5, 0); h[4] = 2; h.writeUInt32BE(0, 5);
  process.stdout.write(Buffer.concat([h, w]));
});
process.stdin.on('end', () => process.exit(0));
`,
    );
    const good = { algorithm: 'block-cdc', block: 4096, min: 16384, maskBits: 5, max: 524288, segment: 8388608 };
    const cases: Array<[string, object]> = [
      ['huge segments', { chunking: { ...good, segment: 2 ** 40 } }],
      ['not a multiple', { chunking: { ...good, min: 1000 } }],
      ['no chunking', { chunking: null }],
      ['identity key', { encrypted: true, identity: { key: 'zz', seed: [1, 2] } }],
      ['chunker seed', { encrypted: true, identity: { key: 'ab'.repeat(32), seed: ['x', 2] } }],
      ['change detection key', { encrypted: true, identity: { key: 'ab'.repeat(32), seed: [1, 2], fast: 'not hex' } }],
      ['compression level', { records: { level: 99, group: 0 } }],
      ['group size', { records: { level: 2, group: 2 ** 40 } }],
    ];
    const img = await image('h.img', 51, 5);
    for (const [what, w] of cases) {
      const welcome = Buffer.from(JSON.stringify({ protocol: 1, namespace: null, permissions: 'full', format: 5, chunking: good, encrypted: false, identity: null, ...w })).toString('base64');
      const k = s.path(`key-hostile-${cases.findIndex((c) => c[0] === what)}`);
      await keygen(k);
      await sshd.authorize(`${k}.pub`, `command="${process.execPath} ${fake} ${welcome}",restrict`);
      const r = await gv(sshd.url('/x'), ['--repo-identity', k, '--repo-known-hosts', sshd.knownHosts, 'backup', img, '--name', 'h']);
      expect(r.code, what).toBe(1);
      expect(oneLine(r.stderr), what).toMatch(/the server's description of its repository is malformed/);
    }
  }, 120_000);
});

describe('commands that need a local repository', () => {
  it('refuse an ssh:// one in one line, saying what works over SSH', async () => {
    for (const args of [['gc'], ['prune', '--keep-last', '1'], ['stats'], ['repair'], ['key', 'list'], ['upgrade'], ['diff', 'a@0', 'a@1']]) {
      const r = await gv('ssh://backup@127.0.0.1:1/srv/gv', args);
      expect(r.code, args.join(' ')).toBe(2);
      expect(oneLine(r.stderr)).toMatch(new RegExp(`^genvault: ${args[0] === 'key' ? 'key list' : args[0]} needs a local repository; over ssh:// list, info, backup`));
    }
  });
});

describe('protocol abuse', () => {
  it('oversized, truncated, unknown and out-of-place frames end the session with one line', async () => {
    const oversized = Buffer.alloc(9);
    oversized.writeUInt32BE(0x7fffffff, 0);
    const cases: Array<[string, Buffer, RegExp]> = [
      ['oversized', Buffer.concat([hello, oversized]), /oversized frame/],
      ['truncated', Buffer.concat([hello, frame(3, 1, Buffer.from('{"op":"list"}')).subarray(0, 12)]), /ended in the middle of a frame/],
      ['unknown type', Buffer.concat([hello, frame(77, 1, Buffer.alloc(3))]), /unknown frame type 77/],
      ['no hello', frame(3, 1, Buffer.from('{"op":"list"}')), /first frame must be HELLO/],
      ['data outside a backup', Buffer.concat([hello, frame(8, 0, Buffer.alloc(8))]), /backup data outside a backup/],
      ['bad json', Buffer.concat([hello, frame(3, 1, Buffer.from('{nope'))]), /not valid JSON/],
      ['short length', Buffer.concat([hello, Buffer.from([0, 0, 0, 2, 1, 1])]), /malformed frame/],
    ];
    for (const [what, input, re] of cases) {
      const r = await serveRaw(input);
      expect(r.code, what).toBe(1);
      expect(r.stderr.trim().split('\n'), what).toHaveLength(1);
      expect(r.stderr, what).toMatch(re);
      expect(r.stderr, what).toMatch(/^genvault: protocol error: /);
    }
  }, 60_000);

  it('parent-windows asked for too much, out of range or outside the namespace is refused in one line', async () => {
    const call = (args: object) => frame(3, 1, Buffer.from(JSON.stringify({ op: 'parent-windows', ...args })));
    const cases: Array<[string, object, RegExp]> = [
      ['too many segments', { name: 'vm1', from: 0, count: 100000 }, /protocol error: parent-windows: 100000 segments at once/],
      ['negative start', { name: 'vm1', from: -1, count: 1 }, /protocol error: parent-windows: "from" must be a non-negative integer/],
      ['another namespace', { name: 'other:vm1', from: 0, count: 1 }, /invalid image name/],
    ];
    for (const [what, args, re] of cases) {
      const r = await serveRaw(Buffer.concat([hello, call(args)]), ['--namespace', 'kvm1', '--permissions', 'append']);
      expect(r.stdout.toString('latin1') + r.stderr, what).toMatch(re);
    }
    // A read key gets none at all.
    const ro = await serveRaw(Buffer.concat([hello, call({ name: 'vm1', from: 0, count: 1 })]), ['--namespace', 'kvm1', '--permissions', 'read']);
    expect(ro.stdout.toString('latin1')).toMatch(/parent-windows needs append access/);
  }, 60_000);

  it('a backup segment that lies about its chunks is refused and commits nothing', async () => {
    const call = frame(3, 1, Buffer.from(JSON.stringify({ op: 'backup', name: 'liar', size: 65536, source: 'x', tags: [] })));
    // One 64 KiB chunk whose digest is not its bytes' SHA-256.
    const seg = Buffer.alloc(4 + 5 + 32);
    seg.writeUInt32BE(1, 0);
    seg.writeUInt32BE(65536, 4);
    seg[8] = 0;
    const r = await serveRaw(Buffer.concat([hello, call, frame(8, 0, seg), frame(10, 0, Buffer.concat([Buffer.of(0), prng(7, 65536)])), frame(11, 1, Buffer.from('{"bytes":65536}'))]));
    // The session answers the CALL with an ERROR (type 5) naming the mismatch.
    expect(r.stdout.includes(Buffer.from('does not match its identity'))).toBe(true);
    expect(JSON.parse(await gvOk(repo, ['list', '--json'])).map((g: { name: string }) => g.name)).not.toContain('liar');
  }, 60_000);

  it('records whose bytes are not the chunk they name are refused and commit nothing; a client without records still commits', async () => {
    const { createHash } = await import('node:crypto');
    const { encodeRecordHeader, RECORD_HEADER_SIZE } = await import('../src/format/pack.js');
    const data = prng(11, 65536);
    const seg = Buffer.alloc(41);
    seg.writeUInt32BE(1, 0);
    seg.writeUInt32BE(65536, 4);
    createHash('sha256').update(data).digest().copy(seg, 9);
    // A raw record naming the chunk asked for (right digest, right length), other bytes.
    const rec = Buffer.alloc(RECORD_HEADER_SIZE + 65536);
    prng(12, 65536).copy(rec, RECORD_HEADER_SIZE);
    encodeRecordHeader(rec, 0, 0, 65536, 65536, seg.subarray(9));
    const call = frame(3, 1, Buffer.from(JSON.stringify({ op: 'backup', name: 'forger', size: 65536, source: 'x', tags: [] })));
    const r = await serveRaw(Buffer.concat([hello, call, frame(8, 0, seg), frame(10, 0, Buffer.concat([Buffer.of(2), rec])), frame(11, 1, Buffer.from('{"bytes":65536}'))]));
    expect(r.stdout.toString('latin1')).toMatch(/backup of forger failed: .*does not match its identity/);
    // The same chunk as plain bytes (coding 0, what a client before records sends) commits.
    const honest = frame(3, 1, Buffer.from(JSON.stringify({ op: 'backup', name: 'honest', size: 65536, source: 'x', tags: [] })));
    await serveRaw(Buffer.concat([hello, honest, frame(8, 0, seg), frame(10, 0, Buffer.concat([Buffer.of(0), data])), frame(11, 1, Buffer.from('{"bytes":65536}'))]));
    const names = JSON.parse(await gvOk(repo, ['list', '--json'])).map((g: { name: string }) => g.name);
    expect(names).not.toContain('forger');
    expect(names).toContain('honest');
    const out = s.path('honest.img');
    await gvOk(repo, ['restore', 'honest', out]);
    expect((await fs.readFile(out)).equals(data)).toBe(true);
  }, 60_000);

  it('a zstd bomb in CHUNKS decodes no further than what was asked for', async () => {
    const { createRequire } = await import('node:module');
    const z = createRequire(import.meta.url)('zstd-napi/binding.js') as { CCtx: new () => { compress(d: Uint8Array, s: Uint8Array, l: number): number }; compressBound(n: number): number };
    const data = prng(9, 65536);
    const call = frame(3, 1, Buffer.from(JSON.stringify({ op: 'backup', name: 'bomb', size: 65536, source: 'x', tags: [] })));
    const seg = Buffer.alloc(41);
    seg.writeUInt32BE(1, 0);
    seg.writeUInt32BE(65536, 4);
    (await import('node:crypto')).createHash('sha256').update(data).digest().copy(seg, 9);
    const big = Buffer.alloc(256 << 20);
    const packed = Buffer.alloc(z.compressBound(big.length));
    const n = new z.CCtx().compress(packed, big, 1);
    const r = await serveRaw(Buffer.concat([hello, call, frame(8, 0, seg), frame(10, 0, Buffer.concat([Buffer.of(1), packed.subarray(0, n)])), frame(11, 1, Buffer.from('{"bytes":65536}'))]));
    // The backup fails (its ERROR names why); the session itself may go on.
    expect(r.stdout.toString('latin1')).toMatch(/backup of bomb failed: protocol error: backup: CHUNKS do not decode/);
    expect(JSON.parse(await gvOk(repo, ['list', '--json'])).map((g: { name: string }) => g.name)).not.toContain('bomb');
  }, 60_000);

  it('a stream of unknown length cut before END commits nothing', async () => {
    const data = prng(8, 65536);
    const call = frame(3, 1, Buffer.from(JSON.stringify({ op: 'backup', name: 'cut', size: null, source: 'stdin', tags: [] })));
    const seg = Buffer.alloc(41);
    seg.writeUInt32BE(1, 0);
    seg.writeUInt32BE(65536, 4);
    (await import('node:crypto')).createHash('sha256').update(data).digest().copy(seg, 9);
    const r = await serveRaw(Buffer.concat([hello, call, frame(8, 0, seg), frame(10, 0, Buffer.concat([Buffer.of(0), data]))]));
    expect(r.stdout.includes(Buffer.from('nothing was committed'))).toBe(true);
    expect(JSON.parse(await gvOk(repo, ['list', '--json'])).map((g: { name: string }) => g.name)).not.toContain('cut');
  }, 60_000);
});

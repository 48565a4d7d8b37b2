/**
 * Remote repositories (issue 24): `genvault serve` behind a real OpenSSH sshd on
 * 127.0.0.1, run as forced commands in authorized_keys (namespaces, permissions), and the
 * client commands with -r ssh://.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fs from 'node:fs/promises';
import path from 'node:path';
import { CLI, Scratch, gv, gvOk, prng, sha256File, writeImage } from './helpers.js';
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
    const c = await rgv(keys.kvm1!, ['cat', 'vm1']);
    expect(c.code).toBe(0);
    expect(Buffer.from(c.stdout, 'latin1').length).toBeGreaterThan(0);
  }, 120_000);
});

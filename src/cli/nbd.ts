import { Command } from 'commander';
import path from 'node:path';
import { Repository } from '../repository/repository.js';
import { startIndexHolder } from '../index/index-holder.js';
import { ensureRunDir } from '../util/rundir.js';
import { UsageError } from '../util/errors.js';
import { checkSocketPath, parseListen, serveGenerations, type Listen } from '../nbd/serve.js';
import { action, localRepoDir, openRepository, wantsJson } from './common.js';
import { sizeOption } from './options.js';

interface NbdCliOpts {
  socket?: string;
  listen?: string;
  writable?: boolean;
  overlay?: string;
  /** Bytes. */
  cacheSize: number;
  json?: boolean;
}

export function register(program: Command): void {
  program
    .command('nbd')
    .description('serve generations over NBD (instant recovery): a VM can boot from a backup before any restore')
    .argument('<target...>', 'NAME@REV; the first is the default export, each is also exported under its file name in the mount')
    .option('--socket <path>', 'unix socket to listen on (default: nbd-NAME-ID.sock in /run/genvault, or the user\'s run directory)')
    .option('--listen <host:port>', 'listen on TCP instead, e.g. 127.0.0.1:10809 (unauthenticated: anyone who reaches it reads the disk)')
    .option('--writable', 'accept writes into a copy-on-write overlay file; the generation never changes')
    .option('--overlay <file>', 'with --writable: the overlay file (reused if it exists; default: a new file in REPO/overlays/)')
    .addOption(sizeOption('--cache-size <size>', 'memory for decoded chunks shared by all clients', '128M'))
    .option('--json', 'print where it listens and what it exports as one JSON line when ready')
    .addHelpText(
      'after',
      '\nRuns in the foreground until SIGINT or SIGTERM; each generation served is pinned meanwhile\n' +
        '(prune and forget only hide it, gc keeps its data). Exports speak the fixed newstyle handshake, structured\n' +
        'replies and base:allocation block status (zero regions read as holes).\n\n' +
        'Examples:\n' +
        '  genvault nbd vm1@latest --socket /run/vm1.sock\n' +
        '  nbdinfo --list \'nbd+unix:///?socket=/run/vm1.sock\'\n' +
        '  qemu-img create -f qcow2 -F raw -b \'nbd+unix:///?socket=/run/vm1.sock\' /var/tmp/vm1-run.qcow2\n' +
        '  nbdcopy \'nbd+unix:///?socket=/run/vm1.sock\' /dev/vg0/vm1      # restore while the VM runs\n' +
        '  genvault nbd vm1@latest --writable      # then: genvault backup OVERLAY --from-nbd-overlay -n vm1\n' +
        'Protocol notes and libvirt/qemu recipes: native-notes/nbd.md',
    )
    .action(action(nbdAction));
}

async function listenOn(opts: NbdCliOpts, name: string, id: string): Promise<Listen> {
  if (opts.socket && opts.listen) throw new UsageError('--socket and --listen exclude each other');
  if (opts.listen) return parseListen(opts.listen);
  return { socket: checkSocketPath(opts.socket ?? path.join(await ensureRunDir(), `nbd-${name}-${id}.sock`)) };
}

async function nbdAction(targets: string[], opts: NbdCliOpts, cmd: Command): Promise<void> {
  const repoDir = path.resolve(await localRepoDir(cmd));
  const cacheBytes = opts.cacheSize;
  if (opts.overlay && !opts.writable) throw new UsageError('--overlay needs --writable');
  await Repository.readConfig(repoDir);
  // As the mount: the index leader is a small process of its own, so backups keep their speed.
  const holder = await startIndexHolder(repoDir).catch(() => null);
  const repo = await openRepository(repoDir);
  repo.workerNice = 10;
  repo.workerDepth = 1;
  try {
    const gens = [];
    for (const t of targets) gens.push(await repo.resolve(t));
    const listen = await listenOn(opts, gens[0]!.name, gens[0]!.id);
    const s = await serveGenerations(repo, gens, { listen, writable: opts.writable, overlay: opts.overlay, cacheBytes });
    if (wantsJson(cmd)) {
      process.stdout.write(JSON.stringify({ uri: s.uri, address: s.address, overlay: s.overlay?.file ?? null, exports: s.exports, pid: process.pid }) + '\n');
    } else {
      for (const e of s.exports) process.stdout.write(`export ${e.name}: ${e.image}@${e.generation}, ${e.size} bytes${s.overlay ? ', writable' : ''}\n`);
      if (s.overlay) process.stdout.write(`overlay: ${s.overlay.file}\n`);
      process.stdout.write(`serving ${s.uri} (pid ${process.pid}); stop with SIGINT or SIGTERM\n`);
    }
    await new Promise<void>((resolve) => {
      for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.once(sig, () => resolve());
    });
    const changed = s.overlay?.changedBlocks() ?? 0;
    await s.close();
    if (wantsJson(cmd)) process.stdout.write(JSON.stringify({ stopped: true, overlay: s.overlay?.file ?? null, changedBlocks: changed }) + '\n');
    else if (s.overlay) {
      process.stdout.write(`stopped; ${changed} block(s) changed in ${s.overlay.file}; keep them with: genvault backup ${s.overlay.file} --from-nbd-overlay -n ${gens[0]!.name}\n`);
    }
  } finally {
    await repo.close().catch(() => undefined);
    await holder?.stop().catch(() => undefined);
  }
}

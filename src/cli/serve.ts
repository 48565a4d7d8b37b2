import { Command, Option } from 'commander';
import { ServeSession } from '../remote/server.js';
import { checkNamespace } from '../remote/access.js';
import type { Permission } from '../remote/protocol.js';
import { UsageError } from '../util/errors.js';
import { action, type GlobalOpts } from './common.js';

export function register(program: Command): void {
  program
    .command('serve')
    .description('serve a repository to one genvault client over stdin/stdout (run by ssh, usually as a forced command)')
    .option('--namespace <ns>', 'pin the client to the images of namespace NS (stored as NS:NAME); it sees and names no other')
    .addOption(new Option('--permissions <p>', 'read (list, restore, mount, verify), append (also back up; never delete), full (also forget, protect)').choices(['read', 'append', 'full']).default('full'))
    .addHelpText(
      'after',
      '\nThe repository is -r/--repo (or $GENVAULT_REPO); without either, the path the client asks\n' +
        'for. prune and gc are never done through serve: they stay with the server\'s admin.\n\n' +
        'In ~backup/.ssh/authorized_keys on the server, one line per client key:\n' +
        '  command="genvault serve --repo /srv/gv --namespace kvm1 --permissions append",restrict ssh-ed25519 AAAA... root@kvm1\n' +
        'and on the client:\n' +
        '  genvault -r ssh://backup@server/srv/gv backup /dev/vg0/vm1 --name vm1\n' +
        'Threat model and setup: native-notes/remote.md',
    )
    .action(
      action(async (opts: { namespace?: string; permissions: Permission }, cmd: Command) => {
        if (process.stdin.isTTY || process.stdout.isTTY) throw new UsageError('serve speaks the genvault protocol on stdin/stdout; a client runs it over ssh (genvault -r ssh://host/path ...)');
        const o = cmd.optsWithGlobals() as GlobalOpts;
        const repo = o.repo ?? process.env.GENVAULT_REPO ?? null;
        const session = new ServeSession({
          repo,
          namespace: opts.namespace === undefined ? null : checkNamespace(opts.namespace),
          permission: opts.permissions,
          input: process.stdin,
          output: process.stdout,
          log: (l) => process.stderr.write(`genvault serve: ${l}\n`),
        });
        await session.run();
      }),
    );
}

import { Command } from 'commander';
import { setProtected } from '../lifecycle/prune.js';
import { action, printJson, wantsJson, withWritableRepo } from './common.js';
import { remoteRepo, withRemote } from './remote.js';
import type { Generation } from '../format/generation.js';

export function register(program: Command): void {
  for (const on of [true, false]) {
    const name = on ? 'protect' : 'unprotect';
    program
      .command(name)
      .description(
        on
          ? 'protect a generation: prune and forget never remove it until it is unprotected'
          : 'remove the protection of a generation, so that prune and forget may remove it again',
      )
      .argument('<target>', 'NAME@REV (REV: latest, N with 0 the newest, id or prefix, ISO date/time)')
      .option('--json', 'print the generation record as JSON')
      .addHelpText(
        'after',
        on
          ? '\nThe flag is stored in the generation record ("protected": true) and shown by info/list --json.\n\nExample:\n  genvault protect vm1@2026-11-20   # keep the state before the upgrade'
          : '\nExample:\n  genvault unprotect vm1@2026-11-20',
      )
      .action(
        action(async (target: string, _o: unknown, cmd: Command) => {
          {
            const { gen, changed } = remoteRepo(cmd)
              ? await withRemote(cmd, async (r) => {
                  const res = await r.call<{ generation: Generation; changed: boolean }>(name, { target });
                  return { gen: res.generation, changed: res.changed };
                })
              : await withWritableRepo(cmd, (repo) => setProtected(repo, target, on));
            if (wantsJson(cmd)) printJson({ ...gen, protected: gen.protected === true, changed });
            else {
              const what = `${gen.name}@${gen.id} (created ${gen.created})`;
              process.stdout.write(changed ? `${on ? 'protected' : 'unprotected'} ${what}\n` : `${what} was already ${on ? 'protected' : 'unprotected'}\n`);
            }
          }
        }),
      );
  }
}

import { Command } from 'commander';
import { generationFileName } from '../format/generation.js';
import { bytes, duration, rate } from '../util/format.js';
import { action, printJson, wantsJson, withRepo } from './common.js';
import { remoteRepo, withRemote } from './remote.js';

export function register(program: Command): void {
  program
    .command('info')
    .description('show one generation: NAME@REV (REV: latest, N with 0 the newest, id or prefix, ISO date/time)')
    .argument('<target>', 'NAME@REV')
    .option('--json', 'print JSON')
    .action(
      action(async (target: string, _o: unknown, cmd: Command) => {
        {
          const g = remoteRepo(cmd) ? await withRemote(cmd, (r) => r.resolve(target)) : await withRepo(cmd, (repo) => repo.resolve(target));
          if (wantsJson(cmd)) {
            printJson({ ...g, protected: g.protected === true, file: generationFileName(g) });
            return;
          }
          const s = g.stats;
          const dedup = s.bytesRead - s.zeroBytes > 0 ? 1 - s.newBytes / (s.bytesRead - s.zeroBytes) : 1;
          const lines = [
            ['image', g.name],
            ['id', g.id],
            ['created', g.created],
            ['size', `${bytes(g.size)} (${g.size} bytes)`],
            ['source', g.source],
            ['tags', g.tags.join(', ') || '-'],
            ['protected', g.protected ? 'yes (never pruned or forgotten until `genvault unprotect`)' : 'no'],
            ['parent', g.parent ?? '-'],
            ['chunks', `${s.chunks} (${g.leaves} map leaves)`],
            ['zero', bytes(s.zeroBytes) + (s.holeBytes ? ` (${bytes(s.holeBytes)} of it holes of the source file, not read)` : '')],
            ['new data', `${bytes(s.newBytes)} in ${s.newChunks} chunks, ${bytes(s.newStored)} stored`],
            ['deduplicated', `${(dedup * 100).toFixed(1)}% of non-zero data already in the repository`],
            ...(s.unchangedBytes !== undefined
              ? [['unchanged', `${bytes(s.unchangedBytes)} as in the parent generation (recognised by BLAKE3, not re-hashed)`]]
              : []),
            ['backup took', `${duration(s.durationMs)} (${rate(s.bytesRead, s.durationMs)})`],
            ['mount file', `${g.name}/${generationFileName(g)}`],
          ];
          process.stdout.write(lines.map(([k, v]) => `${k!.padEnd(13)} ${v}`).join('\n') + '\n');
        }
      }),
    );
}

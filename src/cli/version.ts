import { Command } from 'commander';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { FORMAT_VERSION } from '../format/config.js';
import { printJson, wantsJson } from './common.js';

const pkg = createRequire(import.meta.url)('../../package.json') as { version: string };

export function register(program: Command): void {
  program
    .command('version')
    .description('print the version of genvault, of Node.js, and the repository format it writes')
    .option('--json', 'print JSON')
    .action((_o: unknown, cmd: Command) => {
      const v = {
        version: pkg.version,
        node: process.versions.node,
        format: FORMAT_VERSION,
        // Where this genvault runs from: an installed copy or a checkout.
        installedAt: path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..'),
      };
      if (wantsJson(cmd)) printJson(v);
      else process.stdout.write(`genvault ${v.version} (Node.js ${v.node}, repository format ${v.format}, ${v.installedAt})\n`);
    });
}

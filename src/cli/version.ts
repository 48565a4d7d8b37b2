import { Command } from 'commander';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { FORMAT_VERSION } from '../format/config.js';
import { printJson, wantsJson } from './common.js';
import { nativeGcm } from '../util/gcm.js';
import { holeSeeker } from '../util/holes.js';

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
        // The optional addons (src/native): without them genvault is correct, only slower.
        addons: { holes: holeSeeker() !== null, gcm: nativeGcm() !== null },
      };
      if (wantsJson(cmd)) printJson(v);
      else {
        const missing = Object.entries(v.addons).filter(([, ok]) => !ok).map(([name]) => name);
        const note = missing.length ? `; addons not built: ${missing.join(', ')} (scripts/setup builds them)` : '';
        process.stdout.write(`genvault ${v.version} (Node.js ${v.node}, repository format ${v.format}, ${v.installedAt}${note})\n`);
      }
    });
}

import { Command } from 'commander';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { DEFAULT_JOBS_FILE, loadJobsFile } from '../jobs/config.js';
import { sendNotice, unitNotice } from '../jobs/notify.js';
import { GenvaultError } from '../util/errors.js';
import { action } from './common.js';

/** The unit's last journal lines, or none where there is no journal to ask. */
async function journalTail(unit: string, lines: number): Promise<string[]> {
  try {
    const { stdout } = await promisify(execFile)('journalctl', ['-u', unit, '-n', String(lines), '-o', 'short-iso', '--no-pager', '-q'], { timeout: 10_000 });
    return stdout.trimEnd().split('\n').filter(Boolean);
  } catch {
    return [];
  }
}

export function register(program: Command): void {
  program
    .command('notify')
    .description("send the job file's notification (defaults: notify:) that something failed: for a systemd unit's OnFailure=")
    .option('-c, --config <file>', 'job file', DEFAULT_JOBS_FILE)
    .option('--unit <unit>', 'the unit that failed (its last journal lines are sent along)')
    .option('--message <text>', 'what failed (default: "UNIT failed")')
    .addHelpText(
      'after',
      '\nSends to every way `notify:` under `defaults:` in the job file names (command, email,\n' +
        'webhook), whatever its `on:`. genvault-notify@.service runs it for the units whose\n' +
        'OnFailure= names it. Exit 1 if any way failed.\n\n' +
        'Examples:\n' +
        '  genvault notify --unit genvault-daemon.service\n' +
        '  genvault notify --message "nightly verify found damage"',
    )
    .action(
      action(async (o: { config: string; unit?: string; message?: string }) => {
        const file = await loadJobsFile(o.config);
        if (!file.notify) throw new GenvaultError(`${o.config}: no notify: under defaults:, nowhere to send to`, 'CONFIG');
        const what = o.unit ?? 'genvault';
        const notice = unitNotice(what, o.message ?? `${what} failed`, o.unit ? await journalTail(o.unit, 20) : []);
        const problems = await sendNotice(file.notify, notice, what);
        for (const p of problems) process.stderr.write(`genvault: ${p}\n`);
        if (problems.length) process.exitCode = 1;
      }),
    );
}

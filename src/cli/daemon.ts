import { Command } from 'commander';
import { DEFAULT_JOBS_FILE } from '../jobs/config.js';
import { Daemon } from '../jobs/daemon.js';
import { isSshSpec, warnIfNoNativeCrypto } from '../source/ssh.js';
import path from 'node:path';
import { type LogLevel, logLine, setLogFormat } from '../util/log.js';
import { action, jobsRepoPath, logFormatOption, metricsFileOption } from './common.js';

export function register(program: Command): void {
  program
    .command('daemon')
    .description('run the job schedule in the foreground (for a systemd service)')
    .option('-c, --config <file>', 'job file', DEFAULT_JOBS_FILE)
    .addOption(logFormatOption())
    .addOption(metricsFileOption())
    .addHelpText(
      'after',
      '\nLogs one line per job run to stdout (the journal under systemd, where --log-format auto\n' +
        'gives each line its priority: failures are err). Jobs due when it starts\n' +
        '(missed while it was down, or never run) run at once. SIGHUP re-reads the job file.\n' +
        'SIGTERM/SIGINT stop it; a running job is finished first (its post-hooks must run), a\n' +
        'second signal stops at once.\n\n' +
        'A unit file ships in scripts/systemd/genvault-daemon.service.',
    )
    .action(
      action(async (o: { config: string; logFormat: string; metricsFile?: string }, cmd: Command) => {
        setLogFormat(o.logFormat, true);
        const log = (line: string, level: LogLevel = 'info') => logLine(level, line);
        const metricsFile = o.metricsFile ? path.resolve(o.metricsFile) : undefined;
        const d = new Daemon({ configFile: o.config, repoFor: (f) => jobsRepoPath(cmd, f.repository, f.keyFile), log, metricsFile });
        await d.load();
        // Resolve the repository now, so a missing one is a start-up error, not a log line per tick.
        jobsRepoPath(cmd, d.jobs!.repository, d.jobs!.keyFile);
        if (d.jobs!.jobs.some((j) => isSshSpec(j.source))) warnIfNoNativeCrypto((l) => log(l.trimEnd(), 'warning'));
        const onStop = (sig: string) => {
          if (d.isStopping) {
            log(`${sig} again: stopping now${d.running ? ` (job ${d.running} interrupted; its post-hooks did not run)` : ''}`, 'warning');
            process.exit(1);
          }
          if (d.running) log(`${sig}: stopping after job ${d.running} finishes (send it again to stop now)`);
          d.stop();
        };
        process.on('SIGTERM', () => onStop('SIGTERM'));
        process.on('SIGINT', () => onStop('SIGINT'));
        process.on('SIGHUP', () => void d.reload());
        await d.loop();
      }),
    );
}

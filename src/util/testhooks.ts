/**
 * Test hooks for the crash and race tests (test/gc.test.ts, test/crashloop.test.ts): they
 * let a test see which phase a process is in, or hold it at a named point, and then kill
 * it there. Inert unless their environment variables are set; nothing in normal use sets
 * them. TOOL is GC, PRUNE, BACKUP, SYNC or MOUNT:
 *
 *   GENVAULT_<TOOL>_TRACE=1        print "<tool>-trace: PHASE" on stderr as each phase starts
 *   GENVAULT_<TOOL>_PAUSE_FILE=F   at the point named by GENVAULT_<TOOL>_PAUSE_AT (each tool
 *                                  has a default), print "<tool>: paused at POINT while F
 *                                  exists" on stderr and wait while F exists
 *
 * The points each tool offers are listed where it calls these (src/lifecycle/gc.ts, prune.ts,
 * backup.ts, src/sync/sync.ts, and src/fuse/mount.ts's `init`). And:
 *
 *   GENVAULT_VERIFY_BUCKET_CHUNKS=N  verify's spill buckets aim at N chunks (small ones make
 *                                    a small repository cross many bucket edges)
 */
import { pathExists } from './paths.js';

export type HookTool = 'gc' | 'prune' | 'backup' | 'sync' | 'mount';

const envName = (tool: HookTool, what: string) => `GENVAULT_${tool.toUpperCase()}_${what}`;

/** With GENVAULT_<TOOL>_TRACE set: one line on stderr naming the phase starting now. */
export function testTrace(tool: HookTool, phase: string): void {
  if (process.env[envName(tool, 'TRACE')]) process.stderr.write(`${tool}-trace: ${phase}\n`);
}

/**
 * With GENVAULT_<TOOL>_PAUSE_FILE set and this point selected by GENVAULT_<TOOL>_PAUSE_AT
 * (default `defaultPoint`): wait while that file exists.
 */
export async function testPause(tool: HookTool, point: string, defaultPoint: string): Promise<void> {
  const f = process.env[envName(tool, 'PAUSE_FILE')];
  if (!f || (process.env[envName(tool, 'PAUSE_AT')] ?? defaultPoint) !== point || !(await pathExists(f))) return;
  process.stderr.write(`${tool}: paused at ${point} while ${f} exists\n`);
  while (await pathExists(f)) await new Promise((r) => setTimeout(r, 50));
}

/** GENVAULT_VERIFY_BUCKET_CHUNKS as a positive integer, or undefined. */
export function verifyBucketChunks(): number | undefined {
  const n = Number(process.env.GENVAULT_VERIFY_BUCKET_CHUNKS);
  return Number.isSafeInteger(n) && n > 0 ? n : undefined;
}

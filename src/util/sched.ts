/**
 * CPU priority of a whole process, as Linux schedules it. With autogroups
 * (CONFIG_SCHED_AUTOGROUP, on by default in Debian), the CPU is shared between sessions
 * first and by nice value only inside a session: a mount server (its own session) would
 * take half the CPU from a backup started by cron, whatever its threads' nice values. The
 * autogroup's own nice value (/proc/self/autogroup) is what moves that split; the calling
 * thread's nice is set too, for kernels without autogroups.
 */
import fs from 'node:fs/promises';
import os from 'node:os';

/** Set this process's autogroup nice and this thread's nice; false if neither could be set. */
export async function setProcessNice(nice: number): Promise<boolean> {
  let ok = false;
  try {
    await fs.writeFile('/proc/self/autogroup', String(nice));
    ok = true;
  } catch {
    /* no autogroups, or lowering the value without CAP_SYS_NICE */
  }
  try {
    os.setPriority(0, nice);
    ok = true;
  } catch {
    /* not permitted */
  }
  return ok;
}

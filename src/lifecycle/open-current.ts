/**
 * Opening a repository whose index may be a cache (an object store's, repository/cache.ts):
 * when it is missing or behind its bucket (another host wrote, or collected garbage), it
 * is rebuilt from the bucket as `genvault repair --write` does, and opened again (a few
 * times: another host may change the bucket in between). A local repository opens as
 * Repository.open opens it.
 */
import { GenvaultError } from '../util/errors.js';
import { Repository } from '../repository/repository.js';
import { repair } from './repair.js';

export async function openCurrent(dir: string, opts: Parameters<typeof Repository.open>[1] = {}): Promise<Repository> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await Repository.open(dir, opts);
    } catch (e) {
      if (!(e instanceof GenvaultError) || e.code !== 'CACHE_BEHIND' || attempt >= 3) throw e;
      await rebuildCache(dir, e.message);
    }
  }
}

async function rebuildCache(dir: string, why: string): Promise<void> {
  // Said on a terminal only: a cron job's mail is for failures.
  if (process.stderr.isTTY) process.stderr.write(`genvault: ${why.replace(/; 'genvault repair.*$/, '')}: rebuilding it from the bucket\n`);
  const r = await repair(dir, { write: true });
  for (const g of r.incomplete) process.stderr.write(`genvault: warning: ${g.name} ${g.id}: cannot be restored whole from the bucket (${g.problem})\n`);
}

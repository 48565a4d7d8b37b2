import v8 from 'node:v8';
import { runInNewContext } from 'node:vm';

/**
 * The V8 garbage collector as a function, without --expose-gc on the command line (null
 * where V8 refuses). For a process whose garbage comes in known waves (the mount's reads,
 * gc's rewrite of one pack): V8 would otherwise let the heap grow over several waves
 * before it collects, and the peak memory with it.
 */
export function exposeGc(): (() => void) | null {
  try {
    v8.setFlagsFromString('--expose-gc');
    return runInNewContext('gc') as () => void;
  } catch {
    return null;
  }
}

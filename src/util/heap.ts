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

/**
 * A check to call once per batch of a long pass: it collects the heap whenever the heap
 * has grown by `slack` bytes since the last collection. A pass over millions of index
 * entries allocates a few hundred bytes per entry, and under the installed command's
 * 1 MiB young generation whatever a pending batch holds is promoted before it dies: V8
 * then let gc's old generation fill with that garbage to many times its live size before
 * it marked, and kept the freed pages pooled (native-notes/performance.md, "gc's heap").
 * With little live, a collection takes milliseconds.
 */
export function heapGuard(slack = 64 << 20): () => void {
  const collect = exposeGc();
  if (!collect) return () => undefined;
  let after = v8.getHeapStatistics().used_heap_size;
  return () => {
    if (v8.getHeapStatistics().used_heap_size < after + slack) return;
    collect();
    after = v8.getHeapStatistics().used_heap_size;
  };
}

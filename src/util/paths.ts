/** Whether something exists at a path (any kind of file; following links). */
import fs from 'node:fs/promises';

export async function pathExists(p: string): Promise<boolean> {
  return fs.stat(p).then(
    () => true,
    () => false,
  );
}

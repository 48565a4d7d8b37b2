/**
 * Runs in every test file. Opening a repository in-process (as some tests do) sets the
 * process umask to the repository's (0077, src/repository/perms.ts), as the CLI should; in the
 * test process it would leak into later tests and into every child they spawn (files
 * created 0600, overlay directories 0700). Each test starts from the usual 022.
 */
import { beforeEach } from 'vitest';

beforeEach(() => {
  process.umask(0o022);
});

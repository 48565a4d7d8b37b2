import { defineConfig } from 'vitest/config';

// Tests drive real loop devices, FUSE mounts, sshd and Ceph, each in its own scratch
// directory, on ports the kernel hands out and loop devices it allocates: two files run at
// a time, one per core (most of a file's time is its child processes and their I/O; one at
// a time the suite outgrew its 20 minutes). Timeouts are generous: the machine is shared,
// and a test that waits for another process to end polls for it rather than sleeping.
export default defineConfig({
  test: {
    root: new URL('..', import.meta.url).pathname,
    include: ['test/**/*.test.ts'],
    setupFiles: ['test/setup.ts'],
    fileParallelism: true,
    maxWorkers: 2,
    minWorkers: 1,
    testTimeout: 180_000,
    hookTimeout: 180_000,
    reporters: ['default'],
    pool: 'forks',
  },
});

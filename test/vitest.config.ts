import { defineConfig } from 'vitest/config';

// Tests drive real loop devices, FUSE mounts and sshd: run files one at a time, with
// generous timeouts (the machine has 2 cores, shared).
export default defineConfig({
  test: {
    root: new URL('..', import.meta.url).pathname,
    include: ['test/**/*.test.ts'],
    setupFiles: ['test/setup.ts'],
    fileParallelism: false,
    testTimeout: 180_000,
    hookTimeout: 180_000,
    reporters: ['default'],
    pool: 'forks',
  },
});

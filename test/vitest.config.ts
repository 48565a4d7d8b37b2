import { defineConfig } from 'vitest/config';

// Tests drive real loop devices, FUSE mounts, sshd and Ceph, each in its own scratch
// directory, on ports the kernel hands out and loop devices it allocates. Most of a file's
// time is its child processes and their I/O, so the files that start no sshd run two at a
// time, one per core (one at a time the suite outgrew its 20 minutes); then the files that
// drive SSH sessions run one at a time: under the other file's load, a remote command of
// ssh-promises.test.ts once came back without an exit status (native-notes/ssh.md), not
// understood yet. Timeouts are generous: the machine is shared, and a test that waits for
// another process to end polls for it rather than sleeping.
const SSH = [
  'test/encryption.test.ts',
  'test/hostile-local.test.ts',
  'test/jobs.test.ts',
  'test/remote-mount.test.ts',
  'test/remote.test.ts',
  'test/ssh-config.test.ts',
  'test/ssh-promises.test.ts',
  'test/ssh.test.ts',
];
const common = {
  root: new URL('..', import.meta.url).pathname,
  setupFiles: ['test/setup.ts'],
  testTimeout: 180_000,
  hookTimeout: 180_000,
  pool: 'forks' as const,
};

export default defineConfig({
  test: {
    reporters: ['default'],
    // The pool is shared: two workers in all (vitest's default is one less than the cores).
    maxWorkers: 2,
    minWorkers: 1,
    projects: [
      { test: { ...common, name: 'local', include: ['test/**/*.test.ts'], exclude: SSH, fileParallelism: true, maxWorkers: 2, minWorkers: 1, sequence: { groupOrder: 0 } } },
      { test: { ...common, name: 'ssh', include: SSH, fileParallelism: false, maxWorkers: 1, minWorkers: 1, sequence: { groupOrder: 1 } } },
    ],
  },
});

/** Commands on an ssh:// repository: the connection, opened from the global options. */
import type { Command } from 'commander';
import { RemoteRepository, isRemoteRepo, type RemoteOptions } from '../remote/client.js';
import { repoPath } from './common.js';

interface RemoteFlags {
  repoIdentity?: string;
  repoKnownHosts?: string;
  repoSshCommand?: string;
  remoteCommand?: string;
}

/** The ssh:// repository of the command, or null for a local one. */
export function remoteRepo(cmd: Command): string | null {
  const p = repoPath(cmd);
  return isRemoteRepo(p) ? p : null;
}

export function remoteOptions(cmd: Command, extra: Partial<RemoteOptions> = {}): RemoteOptions {
  const o = cmd.optsWithGlobals() as RemoteFlags;
  return {
    identity: o.repoIdentity,
    knownHosts: o.repoKnownHosts,
    command: o.repoSshCommand,
    remoteCommand: o.remoteCommand,
    ...extra,
  };
}

/** Run fn with the command's ssh:// repository connected; closed after. */
export async function withRemote<T>(cmd: Command, fn: (r: RemoteRepository) => Promise<T>, extra: Partial<RemoteOptions> = {}): Promise<T> {
  const r = await RemoteRepository.open(repoPath(cmd), remoteOptions(cmd, extra));
  try {
    return await fn(r);
  } finally {
    r.close();
  }
}

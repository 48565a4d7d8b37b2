/**
 * What a serve session may see and do (THREAT MODEL in native-notes/remote.md).
 *
 * A namespace pins a client to its own images: the client names `vm1`, the repository
 * holds `NS:vm1` (the `:` cannot appear in an image name a client gives, so no client
 * name reaches outside its namespace). Without a namespace the session sees every image,
 * as a local user of the repository does.
 *
 * Permissions: read (list, info, restore, cat, mount, verify), append (read, plus new
 * generations: never delete, overwrite, protect or unprotect), full (append, plus forget,
 * protect and unprotect). prune and gc are never done through serve: they stay with the
 * server's admin, who sees every namespace.
 */
import { GenvaultError } from '../util/errors.js';
import { IMAGE_NAME_RE } from '../format/config.js';
import type { Generation } from '../format/generation.js';
import type { Permission } from './protocol.js';

export const NAMESPACE_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

export function checkNamespace(ns: string): string {
  if (!NAMESPACE_RE.test(ns)) {
    throw new GenvaultError(`invalid namespace ${JSON.stringify(ns)}: use letters, digits, '.', '_' and '-' (not starting with '.' or '-')`, 'USAGE', 2);
  }
  return ns;
}

const RANK: Record<Permission, number> = { read: 0, append: 1, full: 2 };

export class Access {
  constructor(
    readonly namespace: string | null,
    readonly permission: Permission,
  ) {}

  /** The repository's name for a client's image name; refuses names outside the rules. */
  inner(clientName: string): string {
    if (typeof clientName !== 'string' || !IMAGE_NAME_RE.test(clientName) || clientName.includes(':') || clientName === 'latest') {
      throw new GenvaultError(`invalid image name ${JSON.stringify(String(clientName)).slice(0, 200)}`, 'USAGE');
    }
    return this.namespace ? `${this.namespace}:${clientName}` : clientName;
  }

  /** Whether an image of the repository is this session's. */
  owns(innerName: string): boolean {
    return this.namespace === null || innerName.startsWith(`${this.namespace}:`);
  }

  /** The client's name for an image of the repository (which it owns). */
  outer(innerName: string): string {
    return this.namespace ? innerName.slice(this.namespace.length + 1) : innerName;
  }

  /** A generation as the client sees it (its own name; nothing of other namespaces). */
  view(g: Generation): Generation {
    return { ...g, name: this.outer(g.name) };
  }

  require(p: Permission, what: string): void {
    if (RANK[this.permission] < RANK[p]) {
      throw new GenvaultError(`permission denied: ${what} needs ${p} access; this key has ${this.permission}${this.namespace ? ` (namespace ${this.namespace})` : ''}`, 'EPERM');
    }
  }
}

/** Opening a store from its spec (in a worker thread, or from a repository's location). */
import { LocalStore, LocalSyncReader } from './local.js';
import { S3Store } from './s3.js';
import type { Store, StoreSpec, SyncReader } from './store.js';

export function openStore(spec: StoreSpec): Store {
  switch (spec.kind) {
    case 'local':
      return new LocalStore(spec.dir);
    case 's3':
      return new S3Store(spec);
  }
}

/** A synchronous range reader, or null for a store whose reads are not local system calls (see store.ts). */
export function openSyncReader(spec: StoreSpec): SyncReader | null {
  switch (spec.kind) {
    case 'local':
      return new LocalSyncReader(spec);
    case 's3':
      return null;
  }
}

/**
 * The storage seam: everything of a repository that is neither its LevelDB index (index/)
 * nor its locks (locks/) is an object of a Store: config.json and the pack files. Backup,
 * restore, the mount, gc and verify reach those objects only through this interface, so
 * another kind of store (an object store, a remote repository) is a new implementation
 * here and a new `StoreSpec` kind, not a change to them: local.ts (a directory) and s3.ts
 * (a bucket of an S3 object store, radosgw among them).
 *
 * Contract, for every implementation:
 *
 * Names. An object is named by a '/'-separated relative name: `config.json`,
 * `packs/ab/<pack id>.pack`. Every name goes through checkName() before it reaches the
 * storage: no empty name or segment, no '.' or '..' segment, no leading '/', no NUL or
 * backslash. Names may come from files (writer registrations under locks/ list pack ids),
 * so a name is treated as hostile until checked; a bad one is an Error with code 'EINVAL'.
 *
 * Errors. A missing object is an Error whose `code` is 'ENOENT' (get, read, truncate,
 * create's parent aside); stat() says null and delete() succeeds instead. Other failures
 * keep the implementation's code (local: the errno name, 'EACCES', 'EIO', ...; S3:
 * 'EACCES' for refused credentials, 'EIO' for what the server refused, 'EPROTO' for an
 * answer that makes no sense, the network's own codes), which callers print as they are.
 *
 * put(name, data): the whole object, atomically: a reader sees the old object or the new
 * one, never a part, and it is durable when put() returns. With `exclusive`, put fails
 * with code 'EEXIST' when the object exists (and leaves it as it was).
 *
 * create(name): a new object that is appended to (a pack being written); fails with
 * 'EEXIST' if it exists. Its Appender: append() hands bytes over (not durable); sync()
 * makes everything appended so far durable (callers commit index entries pointing into
 * the object only after it returned); truncate(size) drops what was appended past size
 * (gc gives up a copy); close() writes out what is pending but does not sync. While an
 * object is appended to, a reader may see any prefix of what was appended: all that was
 * synced, possibly more, possibly a block padded with zeros past the appended end
 * (pack readers check records against the index and never read past a committed size).
 *
 * sealsOnSync: a store that cannot append to an object once it is durable (an object
 * store: an object is written whole, by one PUT or one multipart upload) says true. Its
 * sync() writes the object as it stands and seals the appender: append() and truncate()
 * after it fail with code 'ESEALED', and a writer that has more to write starts a new
 * object (PackWriter.sealed; it never syncs a sealed appender again). Such an appender
 * may also send a large object's bytes before sync() (unseen until it completes): a
 * truncate behind what went up fails with code 'ESENT', and a writer that must go back
 * that far closes the appender (nothing appears) and starts a new object. Before sync()
 * nothing of the object need be visible to readers, and close()
 * without sync() may leave no object at all. The local store says false: its appenders
 * go on after a sync, and close() leaves the file with everything appended.
 *
 * read(name, buf, ...): a byte range into buf; short only at the end of the object. A
 * read of 0 bytes still fails as a read of the object would (missing: 'ENOENT'), so a
 * reader can find out once that an object cannot be read.
 * stat(name): its size, or null when missing. list(prefix): the objects whose names start
 * with `prefix/` (a folder), in no particular order; objects being put (temporaries) and
 * anything that is not a plain object are left out; each with its size and, where the
 * storage keeps one, `modified`: when it was last written, in milliseconds since the epoch
 * by the storage's own clock (local: the file's mtime; S3: LastModified, set by the server),
 * so that ages of objects written by different hosts compare without their clocks (the
 * locks between hosts, repository/store-locks.ts). delete(name): gone when it returns
 * (absent is not an error). truncate(name, size): cut a closed object back to size
 * (trimming a dead writer's pack to what the index committed).
 *
 * spec: a plain, structured-cloneable description that opens the same store elsewhere (a
 * worker thread). openSyncReader (open.ts) gives worker threads a synchronous range
 * reader for stores whose reads are local system calls; a store whose reads are not
 * (an object store, a remote) has none, and the chunk loader then reads spans on the main
 * thread and hands the bytes to the worker.
 *
 * Modes and ownership are a property of the local store only: it creates directories
 * 0750 and packs 0640 (less what the umask the repository set takes away), and put()
 * gives an object the `mode` asked for. Fixing the modes of an existing repository
 * (repository/perms.ts) walks the local directory itself: it is maintenance of that
 * directory, not storage. Not covered here either: the index (LevelDB wants a directory)
 * and locks (they rely on O_EXCL, link and process liveness on one machine).
 */

/** How to open a store again (in a worker thread): structured-cloneable. */
export type StoreSpec = { kind: 'local'; dir: string } | S3Spec;

/** A bucket (and a prefix in it) of an S3 store: see s3.ts, and s3-location.ts, which makes one. */
export interface S3Spec {
  kind: 's3';
  /** http(s)://host[:port][/path] */
  endpoint: string;
  region: string;
  bucket: string;
  /** Keys are `PREFIX/NAME`; '' for names at the bucket's root. */
  prefix: string;
  accessKeyId: string;
  secretAccessKey: string;
  sessionToken?: string;
  /** bucket.host addressing instead of host/bucket (path style, which radosgw needs). */
  virtualHost?: boolean;
  /** Bytes per second, uploads and downloads of this store together. */
  limitRate?: number;
  /** Tuning, for tests mostly: objects above this many bytes go up in a multipart upload. */
  multipartThreshold?: number;
  /** Bytes per part of a multipart upload (S3 wants at least 5 MiB but for the last). */
  partSize?: number;
  /** Parts of one size before the part size doubles (default 1000; s3-appender.ts, partBytes). */
  partsPerSize?: number;
  /** Parts of one multipart upload sent at once (default 4). */
  uploadConcurrency?: number;
  /** Keys asked for per page of a listing. */
  listPageSize?: number;
  /** Attempts per request, the first backoff, the idle socket timeout (s3-client.ts). */
  maxAttempts?: number;
  retryBaseMs?: number;
  timeoutMs?: number;
}

export interface ObjectInfo {
  name: string;
  size: number;
  /** Last written, ms since the epoch by the storage's clock (see the contract); absent when unknown. */
  modified?: number;
}

export interface PutOptions {
  /** Fail with 'EEXIST' if the object exists. */
  exclusive?: boolean;
  /** Local store: the file's mode (not subject to the umask); other stores ignore it. */
  mode?: number;
}

/** A new object being appended to. See the contract above. */
export interface Appender {
  readonly name: string;
  /** Bytes appended so far (after truncate, the size cut to). */
  readonly size: number;
  append(data: Buffer): Promise<void>;
  sync(): Promise<void>;
  truncate(size: number): Promise<void>;
  close(): Promise<void>;
}

export interface Store {
  readonly spec: StoreSpec;
  /** Objects are written whole: an Appender is sealed by its first sync() (see the contract). */
  readonly sealsOnSync: boolean;
  /** Where an object is, for messages (local: its absolute path). */
  describe(name: string): string;
  get(name: string): Promise<Buffer>;
  put(name: string, data: Buffer | string, opts?: PutOptions): Promise<void>;
  create(name: string): Promise<Appender>;
  read(name: string, buf: Uint8Array, bufOffset: number, length: number, position: number): Promise<number>;
  stat(name: string): Promise<{ size: number } | null>;
  list(prefix: string): AsyncIterable<ObjectInfo>;
  delete(name: string): Promise<void>;
  truncate(name: string, size: number): Promise<void>;
  /** Release what the store holds open (cached descriptors); it may be used again after. */
  close(): Promise<void>;
}

/** A synchronous range reader for worker threads (see the contract). */
export interface SyncReader {
  /** Like Store.read: short only at the end of the object. */
  read(name: string, buf: Uint8Array, bufOffset: number, length: number, position: number): number;
  /**
   * Bytes [start, end) read bypassing the cache, for readers that pass over data once;
   * null when that cannot be done here (read them with read()). `got` may be short at the
   * end of the object. The span is valid until the next call.
   */
  readDirect(name: string, start: number, end: number): { span: Buffer; got: number } | null;
  close(): void;
}

function nameError(name: string, why: string): Error {
  return Object.assign(new Error(`invalid object name ${JSON.stringify(name)}: ${why}`), { code: 'EINVAL' });
}

/** The one check of object names (see the contract); returns the name or throws 'EINVAL'. */
export function checkName(name: string): string {
  if (typeof name !== 'string' || name === '') throw nameError(String(name), 'empty');
  if (name.includes('\0') || name.includes('\\')) throw nameError(name, 'NUL or backslash');
  if (name.startsWith('/')) throw nameError(name, 'absolute');
  for (const seg of name.split('/')) {
    if (seg === '') throw nameError(name, 'empty segment');
    if (seg === '.' || seg === '..') throw nameError(name, `'${seg}' segment`);
  }
  return name;
}

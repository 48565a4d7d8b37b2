/**
 * The S3 store: objects are the keys `PREFIX/NAME` of one bucket (contract in store.ts).
 * Reads are ranged GETs, stat a HEAD, list a ListObjectsV2 under `PREFIX/folder/`, put
 * a whole-object PUT (atomic in S3: a reader sees the old object or the new one). Appenders
 * upload on sync() (parts of a large object while it is appended to), then are sealed
 * (sealsOnSync, s3-appender.ts).
 *
 * The bucket and the network are hostile: names are checked before they become keys and
 * again when a listing hands keys back (a key that is no valid name is left out), sizes and
 * ranges in answers are checked (s3-api.ts), and every record read from an object is
 * verified above the store as for the local store.
 */
import { MAX_GET_BYTES, abortMultipart, createBucket, deleteObject, getObject, getRange, headBucket, headObject, listObjects, listUploads, putObject } from './s3-api.js';
import { MAX_PARTS, MAX_PART_BYTES, S3Appender, UploadTuning } from './s3-appender.js';
import { S3Client, S3Error } from './s3-client.js';
import { checkBucket } from './s3-location.js';
import { Appender, ObjectInfo, PutOptions, S3Spec, Store, checkName } from './store.js';

const MIB = 1 << 20;
/** Pieces truncate() copies an object in. */
const COPY_PIECE = 8 * MIB;

export class S3Store implements Store {
  readonly sealsOnSync = true;
  readonly client: S3Client;
  private readonly tuning: UploadTuning;
  private readonly pageSize: number;

  constructor(readonly spec: S3Spec) {
    checkBucket(spec.bucket);
    if (spec.prefix !== '') checkName(spec.prefix);
    this.client = new S3Client({
      endpoint: spec.endpoint,
      region: spec.region,
      bucket: spec.bucket,
      credentials: { accessKeyId: spec.accessKeyId, secretAccessKey: spec.secretAccessKey, sessionToken: spec.sessionToken },
      virtualHost: spec.virtualHost,
      maxAttempts: spec.maxAttempts,
      retryBaseMs: spec.retryBaseMs,
      timeoutMs: spec.timeoutMs,
      limitRate: spec.limitRate,
    });
    // Parts of 8 MiB by default: fewer requests than S3's minimum, and a 256 MiB pack (the
    // default packTargetSize) in 32 of them; larger objects get larger parts (partBytes).
    const partSize = spec.partSize ?? 8 * MIB;
    // S3 (and radosgw: EntityTooSmall at Complete) refuses parts under 5 MiB but for the last.
    if (!Number.isSafeInteger(partSize) || partSize < 5 * MIB || partSize > MAX_PART_BYTES) throw Object.assign(new Error(`S3 part size ${partSize}: from 5 MiB to 5 GiB`), { code: 'EINVAL' });
    const partsPerSize = spec.partsPerSize ?? 1000;
    if (!Number.isSafeInteger(partsPerSize) || partsPerSize < 1) throw Object.assign(new Error(`S3 parts per part size ${partsPerSize}: at least 1`), { code: 'EINVAL' });
    const concurrency = spec.uploadConcurrency ?? 4;
    if (!Number.isSafeInteger(concurrency) || concurrency < 1) throw Object.assign(new Error(`S3 upload concurrency ${concurrency}: at least 1`), { code: 'EINVAL' });
    this.tuning = { multipartThreshold: spec.multipartThreshold ?? 16 * MIB, partSize, partsPerSize, maxParts: MAX_PARTS, concurrency };
    this.pageSize = spec.listPageSize ?? 1000;
  }

  /** The key of an object (the name checked). */
  key(name: string): string {
    checkName(name);
    return this.spec.prefix ? `${this.spec.prefix}/${name}` : name;
  }

  describe(name: string): string {
    return this.client.describe(this.key(name));
  }

  /** Create the bucket when it is missing (repository init). */
  async ensureBucket(): Promise<void> {
    if (!(await headBucket(this.client))) await createBucket(this.client);
  }

  async get(name: string): Promise<Buffer> {
    return getObject(this.client, this.key(name));
  }

  /**
   * One PUT. Exclusive: a HEAD first, for servers that ignore a conditional PUT, and the PUT
   * with `If-None-Match: *`, which S3 and radosgw honour, so that of two racing creators one
   * fails. A retried PUT may find its own first attempt, which went through unanswered:
   * when the object then holds exactly our bytes it is ours.
   */
  async put(name: string, data: Buffer | string, opts: PutOptions = {}): Promise<void> {
    const key = this.key(name);
    const body = typeof data === 'string' ? Buffer.from(data) : data;
    if (opts.exclusive && (await headObject(this.client, key))) throw this.exists(key);
    try {
      await putObject(this.client, key, body, opts.exclusive);
    } catch (e) {
      const err = e as S3Error;
      if (err.code !== 'EEXIST') throw e;
      if (err.retried && body.length <= MAX_GET_BYTES && (await getObject(this.client, key).catch(() => null))?.equals(body)) return;
      throw this.exists(key);
    }
  }

  private exists(key: string): Error {
    return Object.assign(new Error(`${this.client.describe(key)}: exists`), { code: 'EEXIST' });
  }

  /** A new object, uploaded by sync(); fails with EEXIST when the object is there already. */
  async create(name: string): Promise<Appender> {
    const key = this.key(name);
    if (await headObject(this.client, key)) throw this.exists(key);
    return new S3Appender(name, key, this.client, this.tuning);
  }

  async read(name: string, buf: Uint8Array, bufOffset: number, length: number, position: number): Promise<number> {
    const key = this.key(name);
    if (length === 0) {
      if (!(await headObject(this.client, key))) throw Object.assign(new Error(`${this.client.describe(key)}: no such object`), { code: 'ENOENT' });
      return 0;
    }
    const got = await getRange(this.client, key, position, length);
    buf.set(got, bufOffset);
    return got.length;
  }

  async stat(name: string): Promise<{ size: number } | null> {
    return headObject(this.client, this.key(name));
  }

  /** Keys under `PREFIX/prefix/`, page by page; keys that are no valid name are left out. */
  async *list(prefix: string): AsyncIterable<ObjectInfo> {
    const under = this.key(prefix) + '/';
    const root = this.spec.prefix ? this.spec.prefix.length + 1 : 0;
    let token: string | null = null;
    do {
      const page = await listObjects(this.client, under, token, this.pageSize);
      for (const it of page.items) {
        const name = it.key.slice(root);
        try {
          checkName(name);
        } catch {
          continue;
        }
        yield it.modified === undefined ? { name, size: it.size } : { name, size: it.size, modified: it.modified };
      }
      token = page.next;
    } while (token !== null);
  }

  async delete(name: string): Promise<void> {
    await deleteObject(this.client, this.key(name));
  }

  /**
   * Cut a closed object back to `size`. S3 cannot shorten an object: its first `size` bytes
   * are copied into a new upload that replaces it whole (a crash on the way
   * leaves the old object). Rare: only a dead writer's pack is trimmed.
   */
  async truncate(name: string, size: number): Promise<void> {
    const key = this.key(name);
    const st = await headObject(this.client, key);
    if (!st) throw Object.assign(new Error(`${this.client.describe(key)}: no such object`), { code: 'ENOENT' });
    if (!Number.isSafeInteger(size) || size < 0 || size > st.size) throw Object.assign(new Error(`${this.client.describe(key)}: cannot truncate ${st.size} bytes to ${size}`), { code: 'EINVAL' });
    if (size === st.size) return;
    const a = new S3Appender(name, key, this.client, this.tuning);
    try {
      for (let pos = 0; pos < size; pos += COPY_PIECE) {
        const piece = await getRange(this.client, key, pos, Math.min(COPY_PIECE, size - pos));
        if (piece.length !== Math.min(COPY_PIECE, size - pos)) throw Object.assign(new Error(`${this.client.describe(key)}: changed while being truncated`), { code: 'EIO' });
        await a.append(piece);
      }
      await a.sync();
    } finally {
      await a.close();
    }
  }

  /**
   * Abort the multipart uploads under the prefix initiated before `olderThanMs` ago: those
   * of writers that died in a sync (a live sync completes or aborts its own). Returns how many.
   */
  async abortStaleUploads(olderThanMs: number): Promise<number> {
    const cutoff = Date.now() - olderThanMs;
    const stale: Array<{ key: string; uploadId: string }> = [];
    for await (const u of listUploads(this.client, this.spec.prefix ? this.spec.prefix + '/' : '')) {
      if (u.initiated.getTime() <= cutoff) stale.push(u);
    }
    for (const u of stale) await abortMultipart(this.client, u.key, u.uploadId);
    return stale.length;
  }

  async close(): Promise<void> {
    this.client.close();
  }
}

/**
 * An object of an S3 store being appended to (contract in store.ts, sealsOnSync). An object
 * store writes objects whole, so appended bytes wait in a spool file on local disk (packs
 * can be hundreds of MB: not in memory) until sync() uploads the object as it stands, by
 * one PUT up to the multipart threshold, else by a multipart upload completed only at the
 * end of sync(), so the object appears whole or not at all. Then the appender is sealed.
 *
 * Once an object grows past the threshold its multipart upload starts at once, and each
 * part goes up as soon as the spool holds it (EagerUpload), while the writer goes on
 * appending: sync() then sends only the last part and completes. Without that, a backup
 * stopped at every pack's sync for the whole upload (native-notes/ceph.md, "Appenders").
 * Nothing is visible before the completion either way.
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { abortMultipart, completeMultipart, createMultipart, headObject, putObject, uploadPart } from './s3-api.js';
import type { S3Client, S3Error } from './s3-client.js';
import type { Appender } from './store.js';

export interface UploadTuning {
  multipartThreshold: number;
  partSize: number;
  /** Parts uploaded at once. */
  concurrency: number;
}

const MAX_PARTS = 10_000;

/**
 * Part buffers of finished uploads, reused: a backup sends a part every few milliseconds,
 * and an 8 MiB buffer each time kept the garbage collector busy (native-notes/performance.md,
 * Ceph). A part's buffer is free again once its request has answered (retries included).
 */
const PART_BUFFERS: Buffer[] = [];
const PART_BUFFERS_KEPT = 8;

/** Read [pos, pos + n) of a spool file (always there: the spool is ours), into `into` when given. */
async function readSpool(fh: fs.FileHandle, pos: number, n: number, into?: Buffer): Promise<Buffer> {
  const buf = into ? into.subarray(0, n) : Buffer.allocUnsafe(n);
  let got = 0;
  while (got < n) {
    const { bytesRead } = await fh.read(buf, got, n - got, pos + got);
    if (bytesRead === 0) throw Object.assign(new Error(`spool file short at ${pos + got}`), { code: 'EIO' });
    got += bytesRead;
  }
  return buf;
}

/**
 * Upload the parts, `concurrency` at a time (one part's latency would otherwise bound the
 * throughput; each in flight holds one part in memory). On a failure no new part starts,
 * and the ones in flight are waited for, so that an abort after it finds them done.
 */
async function uploadParts(c: S3Client, key: string, uploadId: string, fh: fs.FileHandle, size: number, t: UploadTuning): Promise<string[]> {
  // S3 takes at most MAX_PARTS parts: a larger object gets larger parts.
  const partSize = Math.max(t.partSize, Math.ceil(size / MAX_PARTS));
  const count = Math.ceil(size / partSize);
  const etags: string[] = new Array<string>(count);
  let next = 0;
  let failed = false;
  const worker = async () => {
    while (next < count && !failed) {
      const i = next++;
      const pos = i * partSize;
      try {
        etags[i] = await uploadPart(c, key, uploadId, i + 1, await readSpool(fh, pos, Math.min(partSize, size - pos)));
      } catch (e) {
        failed = true;
        throw e;
      }
    }
  };
  const done = await Promise.allSettled(Array.from({ length: Math.min(t.concurrency, count) }, worker));
  const bad = done.find((d) => d.status === 'rejected');
  if (bad) throw (bad as PromiseRejectedResult).reason;
  return etags;
}

/** A multipart upload of the spool; aborted when it fails, so it leaves no parts behind. */
async function uploadMultipart(c: S3Client, key: string, fh: fs.FileHandle, size: number, t: UploadTuning): Promise<void> {
  const uploadId = await createMultipart(c, key);
  try {
    const etags = await uploadParts(c, key, uploadId, fh, size, t);
    try {
      await completeMultipart(c, key, uploadId, etags);
    } catch (e) {
      // A Complete that went through but whose answer was lost: its retry finds no upload.
      const err = e as S3Error;
      if (!(err.retried && err.s3Code === 'NoSuchUpload' && (await headObject(c, key))?.size === size)) throw e;
    }
  } catch (e) {
    await abortMultipart(c, key, uploadId).catch(() => undefined); // abortStaleUploads gets it otherwise
    throw e;
  }
}

/** Upload the first `size` bytes of a spool file as the object `key`. */
export async function uploadSpool(c: S3Client, key: string, fh: fs.FileHandle, size: number, t: UploadTuning): Promise<void> {
  if (size <= t.multipartThreshold) await putObject(c, key, size ? await readSpool(fh, 0, size) : Buffer.alloc(0));
  else await uploadMultipart(c, key, fh, size, t);
}

/**
 * A multipart upload started while its object is still appended to: parts of exactly
 * `partSize` bytes, uploaded from the spool as soon as it holds them, `concurrency` at a
 * time (an append waits when that many are in flight). A failed part fails the next append
 * or the sync. finish() sends the rest and completes; abort() gives it up.
 */
class EagerUpload {
  private etags: string[] = [];
  /** Bytes of the object handed to parts so far (a multiple of partSize). */
  queued = 0;
  private inFlight = new Set<Promise<void>>();
  private failure: unknown = null;

  private constructor(
    private readonly c: S3Client,
    private readonly key: string,
    private readonly uploadId: string,
    private readonly fh: fs.FileHandle,
    private readonly t: UploadTuning,
  ) {}

  static async start(c: S3Client, key: string, fh: fs.FileHandle, t: UploadTuning): Promise<EagerUpload> {
    return new EagerUpload(c, key, await createMultipart(c, key), fh, t);
  }

  /** Queue every whole part the spool holds up to `size`; waits while `concurrency` are in flight. */
  async feed(size: number): Promise<void> {
    this.check();
    while (size - this.queued >= this.t.partSize) {
      while (this.inFlight.size >= this.t.concurrency) await Promise.race(this.inFlight);
      this.check();
      this.send(this.queued, this.t.partSize);
      this.queued += this.t.partSize;
    }
  }

  private send(pos: number, n: number): void {
    const i = pos / this.t.partSize;
    const part = PART_BUFFERS.pop() ?? Buffer.allocUnsafe(this.t.partSize);
    const p: Promise<void> = readSpool(this.fh, pos, n, part.length >= n ? part : undefined)
      .then((buf) => uploadPart(this.c, this.key, this.uploadId, i + 1, buf))
      .then(
        (etag) => {
          this.etags[i] = etag;
        },
        (e: unknown) => {
          this.failure ??= e;
        },
      )
      .finally(() => {
        this.inFlight.delete(p);
        if (part.length === this.t.partSize && PART_BUFFERS.length < PART_BUFFERS_KEPT) PART_BUFFERS.push(part);
      });
    this.inFlight.add(p);
  }

  private check(): void {
    if (this.failure) throw this.failure;
  }

  /** The last part (whatever is left, possibly nothing), then the completion. */
  async finish(size: number): Promise<void> {
    await this.feed(size);
    if (size > this.queued) this.send(this.queued, size - this.queued);
    await Promise.all(this.inFlight);
    this.check();
    try {
      await completeMultipart(this.c, this.key, this.uploadId, this.etags);
    } catch (e) {
      const err = e as S3Error;
      if (!(err.retried && err.s3Code === 'NoSuchUpload' && (await headObject(this.c, this.key))?.size === size)) throw e;
    }
  }

  /** Give the upload up (its parts are dropped by the store); the parts in flight are waited for first. */
  async abort(): Promise<void> {
    await Promise.all(this.inFlight);
    await abortMultipart(this.c, this.key, this.uploadId).catch(() => undefined); // abortStaleUploads gets it otherwise
  }
}

export class S3Appender implements Appender {
  size = 0;
  private sealed = false;
  private eager: EagerUpload | null = null;

  private constructor(
    readonly name: string,
    private readonly key: string,
    private readonly client: S3Client,
    private readonly tuning: UploadTuning,
    private readonly spool: string,
    private fh: fs.FileHandle | null,
  ) {}

  static async open(client: S3Client, name: string, key: string, spoolDir: string, tuning: UploadTuning): Promise<S3Appender> {
    await fs.mkdir(spoolDir, { recursive: true, mode: 0o700 });
    const spool = path.join(spoolDir, `s3-spool-${randomBytes(8).toString('hex')}`);
    const fh = await fs.open(spool, 'wx+', 0o600);
    return new S3Appender(name, key, client, tuning, spool, fh);
  }

  private writable(what: string): fs.FileHandle {
    if (this.sealed) {
      throw Object.assign(new Error(`${this.client.describe(this.key)}: cannot ${what}: the object was uploaded by sync() and is sealed`), { code: 'ESEALED' });
    }
    if (!this.fh) throw Object.assign(new Error(`${this.client.describe(this.key)}: cannot ${what}: closed`), { code: 'EBADF' });
    return this.fh;
  }

  async append(data: Buffer): Promise<void> {
    const fh = this.writable('append');
    let done = 0;
    while (done < data.length) done += (await fh.write(data, done, data.length - done, this.size + done)).bytesWritten;
    this.size += data.length;
    if (!this.eager && this.size > this.tuning.multipartThreshold) this.eager = await EagerUpload.start(this.client, this.key, fh, this.tuning);
    await this.eager?.feed(this.size);
  }

  async truncate(size: number): Promise<void> {
    const fh = this.writable('truncate');
    if (!Number.isSafeInteger(size) || size < 0 || size > this.size) throw Object.assign(new Error(`${this.client.describe(this.key)}: cannot truncate to ${size}`), { code: 'EINVAL' });
    // Parts already sent past the new end: that upload is given up; sync() starts afresh.
    if (this.eager && size < this.eager.queued) await this.dropEager();
    await fh.truncate(size);
    this.size = size;
  }

  /** Upload the object as it stands and seal; a sealed appender's sync() has nothing to do. */
  async sync(): Promise<void> {
    if (this.sealed) return;
    const fh = this.writable('sync');
    if (this.eager && this.size > this.tuning.multipartThreshold) {
      try {
        await this.eager.finish(this.size);
      } catch (e) {
        await this.dropEager();
        throw e;
      }
      this.eager = null;
    } else {
      await this.dropEager();
      await uploadSpool(this.client, this.key, fh, this.size, this.tuning);
    }
    this.sealed = true;
    await this.dropSpool();
  }

  /** Without sync(), nothing is uploaded: a started upload is aborted, the spool goes. */
  async close(): Promise<void> {
    await this.dropEager();
    await this.dropSpool();
  }

  private async dropEager(): Promise<void> {
    const e = this.eager;
    this.eager = null;
    await e?.abort();
  }

  private async dropSpool(): Promise<void> {
    const fh = this.fh;
    this.fh = null;
    if (!fh) return;
    try {
      await fh.close();
    } finally {
      await fs.rm(this.spool, { force: true });
    }
  }
}

/**
 * An object of an S3 store being appended to (contract in store.ts, sealsOnSync). An object
 * store writes objects whole, so the object is uploaded when sync() is called: by one PUT
 * up to the multipart threshold, else by a multipart upload completed only at the end of
 * sync(), so the object appears whole or not at all. Then the appender is sealed.
 *
 * Appended bytes are copied into part buffers in memory, never to local disk: an object
 * under the threshold is held until sync(); once it grows past the threshold its multipart
 * upload starts at once, and each part goes up as soon as it is full, `concurrency` at a
 * time, while the writer goes on appending (an append waits while that many are in
 * flight). So memory is bounded by the threshold plus the parts in flight, whatever the
 * object's size, and sync() sends only the last part and completes. A spool file on disk,
 * as earlier versions kept, cost a write and a read back of every byte on the cores the
 * backup needs (native-notes/performance.md, Ceph).
 *
 * The price: bytes that went up in a part are no longer here, so truncate() cannot go back
 * behind them (code 'ESENT'); a writer that must (gc giving up a copy) closes the appender
 * instead, which aborts the upload, and starts a new object. Nothing is visible before
 * the completion either way.
 */
import { abortMultipart, completeMultipart, createMultipart, headObject, putObject, uploadPart } from './s3-api.js';
import type { S3Client, S3Error } from './s3-client.js';
import type { Appender } from './store.js';

export interface UploadTuning {
  multipartThreshold: number;
  /** Bytes of the first parts; the size doubles after every `partsPerSize` parts (partBytes). */
  partSize: number;
  partsPerSize: number;
  /** Parts an upload may have: S3's MAX_PARTS (lower in tests). */
  maxParts: number;
  /** Parts uploaded at once. */
  concurrency: number;
}

/** S3's limits: parts per upload, bytes per part (radosgw keeps the same). */
export const MAX_PARTS = 10_000;
export const MAX_PART_BYTES = 5 * 1024 ** 3;

/**
 * The size of part `i` (from 0). Parts need not be equal, only at least 5 MiB but for the
 * last, so the size doubles every `partsPerSize` parts (capped at S3's 5 GiB): 10,000 parts
 * of 8 MiB would end objects at 78 GiB, doubling every 1,000 reaches S3's 5 TiB object
 * limit first, while objects of the usual pack sizes never leave the first size.
 */
export function partBytes(t: UploadTuning, i: number): number {
  return Math.min(MAX_PART_BYTES, t.partSize * 2 ** Math.floor(i / t.partsPerSize));
}

/**
 * Part buffers of finished uploads, reused: a backup sends a part every few milliseconds,
 * and an 8 MiB buffer each time kept the garbage collector busy (native-notes/performance.md,
 * Ceph). A part's buffer is free again once its request has answered (retries included).
 */
const PART_BUFFERS: Buffer[] = [];
const PART_BUFFERS_KEPT = 8;

function takeBuffer(size: number): Buffer {
  const i = PART_BUFFERS.findIndex((b) => b.length === size);
  return i < 0 ? Buffer.allocUnsafe(size) : PART_BUFFERS.splice(i, 1)[0]!;
}

function giveBuffer(b: Buffer): void {
  if (PART_BUFFERS.length < PART_BUFFERS_KEPT) PART_BUFFERS.push(b);
}

/**
 * A multipart upload started while its object is still appended to: parts numbered from 1
 * in the order sent (sized by the appender, see partBytes), `concurrency` in flight. A
 * failed part fails the next send or the finish. finish() completes; abort() gives it up.
 */
class EagerUpload {
  private etags: string[] = [];
  /** Parts sent so far (answered or in flight). */
  parts = 0;
  private inFlight = new Set<Promise<void>>();
  private failure: unknown = null;

  private constructor(
    private readonly c: S3Client,
    private readonly key: string,
    private readonly uploadId: string,
    private readonly t: UploadTuning,
  ) {}

  static async start(c: S3Client, key: string, t: UploadTuning): Promise<EagerUpload> {
    return new EagerUpload(c, key, await createMultipart(c, key), t);
  }

  /** Send the next part: `buf`'s first `n` bytes; `buf` goes back to the pool when answered. Waits while `concurrency` are in flight. */
  async send(buf: Buffer, n: number): Promise<void> {
    while (this.inFlight.size >= this.t.concurrency) await Promise.race(this.inFlight);
    this.check();
    const i = this.parts++;
    const p: Promise<void> = uploadPart(this.c, this.key, this.uploadId, i + 1, buf.subarray(0, n))
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
        giveBuffer(buf);
      });
    this.inFlight.add(p);
  }

  check(): void {
    if (this.failure) throw this.failure;
  }

  /** Wait for the parts in flight, then complete the upload as an object of `size` bytes. */
  async finish(size: number): Promise<void> {
    await Promise.all(this.inFlight);
    this.check();
    try {
      await completeMultipart(this.c, this.key, this.uploadId, this.etags);
    } catch (e) {
      // A Complete that went through but whose answer was lost: its retry finds no upload.
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
  private closed = false;
  /** A sync() failed: what was held is gone with it (nothing was uploaded). */
  private failed = false;
  private eager: EagerUpload | null = null;
  /** Bytes handed to parts so far: the object's first `sent` bytes are no longer here. */
  private sent = 0;
  /** The bytes [sent, size): full part buffers, then `fill` bytes of the last one. */
  private held: Buffer[] = [];
  private fill = 0;

  constructor(
    readonly name: string,
    private readonly key: string,
    private readonly client: S3Client,
    private readonly tuning: UploadTuning,
  ) {}

  private fail(what: string, why: string, code: string): never {
    throw Object.assign(new Error(`${this.client.describe(this.key)}: cannot ${what}: ${why}`), { code });
  }

  private writable(what: string): void {
    if (this.sealed) this.fail(what, 'the object was uploaded by sync() and is sealed', 'ESEALED');
    if (this.closed) this.fail(what, 'closed', 'EBADF');
    if (this.failed) this.fail(what, 'its upload failed (nothing of it was stored; start a new object)', 'EIO');
  }

  async append(data: Buffer): Promise<void> {
    this.writable('append');
    this.eager?.check();
    for (let done = 0; done < data.length; ) {
      if (!this.held.length || this.fill === this.held[this.held.length - 1]!.length) {
        // Every buffer taken becomes the next part: those sent and those held come before it.
        const i = (this.eager?.parts ?? 0) + this.held.length;
        if (i >= this.tuning.maxParts) this.fail(`append past ${this.size} bytes`, `an S3 object has at most ${this.tuning.maxParts} parts (lower packTargetSize in the repository's config.json)`, 'EFBIG');
        this.held.push(takeBuffer(partBytes(this.tuning, i)));
        this.fill = 0;
      }
      const n = data.copy(this.held[this.held.length - 1]!, this.fill, done);
      this.fill += n;
      done += n;
      this.size += n;
      if (!this.eager && this.size > this.tuning.multipartThreshold) this.eager = await EagerUpload.start(this.client, this.key, this.tuning);
      if (this.eager) await this.sendFull();
    }
  }

  /** Hand every full part held to the upload (all but a partly filled last buffer). */
  private async sendFull(): Promise<void> {
    while (this.held.length > 1 || (this.held.length === 1 && this.fill === this.held[0]!.length)) {
      const buf = this.held.shift()!;
      if (!this.held.length) this.fill = 0;
      this.sent += buf.length;
      await this.eager!.send(buf, buf.length);
    }
  }

  async truncate(size: number): Promise<void> {
    this.writable('truncate');
    if (!Number.isSafeInteger(size) || size < 0 || size > this.size) this.fail(`truncate to ${size}`, `${this.size} bytes appended`, 'EINVAL');
    if (size < this.sent) this.fail(`truncate to ${size}`, `the first ${this.sent} bytes went up already (close and start a new object)`, 'ESENT');
    // The held buffers the first `keep` bytes after those sent take, and the last one's fill.
    let keep = size - this.sent;
    let buffers = 0;
    while (buffers < this.held.length && keep > this.held[buffers]!.length) keep -= this.held[buffers++]!.length;
    if (keep > 0) buffers++;
    for (const b of this.held.splice(buffers)) giveBuffer(b);
    this.fill = keep;
    this.size = size;
  }

  /** Upload the object as it stands and seal; a sealed appender's sync() has nothing to do. */
  async sync(): Promise<void> {
    if (this.sealed) return;
    this.writable('sync');
    try {
      if (this.eager) {
        await this.sendFull();
        if (this.held.length) await this.eager.send(this.held.pop()!, this.fill);
        await this.eager.finish(this.size);
        this.eager = null;
      } else {
        const body = Buffer.concat(this.held.map((b, i) => (i === this.held.length - 1 ? b.subarray(0, this.fill) : b)), this.size);
        await putObject(this.client, this.key, body);
      }
    } catch (e) {
      this.failed = true;
      await this.release();
      throw e;
    }
    this.sent = this.size;
    this.sealed = true;
    await this.release();
  }

  /** Without sync(), nothing is uploaded: a started upload is aborted. */
  async close(): Promise<void> {
    this.closed = true;
    await this.release();
  }

  /** Drop what is held and give up an upload under way. */
  private async release(): Promise<void> {
    for (const b of this.held.splice(0)) giveBuffer(b);
    this.fill = 0;
    const e = this.eager;
    this.eager = null;
    await e?.abort();
  }
}

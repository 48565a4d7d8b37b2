/**
 * An S3 client for one bucket: requests addressed (path style by default, which radosgw
 * needs; virtual-host style by option), signed (s3-sign.ts), sent over a keep-alive agent
 * (s3-http.ts), retried, and their failures turned into one-line Errors with a `code`
 * callers know: 'ENOENT' (no such key or bucket), 'EEXIST' (a precondition failed),
 * 'EACCES' (credentials refused), else 'EIO' with S3's own code in `s3Code`.
 *
 * Retries: every request this store sends is idempotent (a whole-object PUT, an
 * UploadPart, a DELETE; a CompleteMultipartUpload repeated after it went through is
 * sorted out by the caller; a CreateMultipartUpload repeated leaves at worst an unused
 * upload, which abortStaleUploads removes), so each is retried on what S3 documents as transient (500,
 * 502, 503, 504, SlowDown, RequestTimeout) and on connection failures, with exponential
 * backoff and full jitter, a bounded number of attempts in all.
 */
import type http from 'node:http';
import { Exchange, exchange, newAgent } from './s3-http.js';
import { RateLimiter } from './s3-rate.js';
import { Credentials, encodePath, canonicalQuery, sha256Hex, signV4 } from './s3-sign.js';
import { XmlError, childText, parseXml } from './s3-xml.js';

export interface S3ClientOptions {
  endpoint: string;
  region: string;
  bucket: string;
  credentials: Credentials;
  virtualHost?: boolean;
  /** Attempts per request in all (default 6). */
  maxAttempts?: number;
  /** The first backoff; doubled each retry, capped at 20 s (default 200 ms). */
  retryBaseMs?: number;
  /** Idle socket time before a request is given up and retried (default 60 s). */
  timeoutMs?: number;
  /** Bytes per second, uploads and downloads together. */
  limitRate?: number;
}

export interface S3Request {
  method: 'GET' | 'PUT' | 'POST' | 'HEAD' | 'DELETE';
  /** The object's key; absent for requests on the bucket. */
  key?: string;
  query?: Record<string, string>;
  headers?: Record<string, string>;
  body?: Buffer;
  /** The most response body bytes accepted (default 1 MiB: an XML answer). */
  maxBody?: number;
  /** Statuses that are answers, not errors (default 2xx). */
  accept?: number[];
}

export interface S3Error extends Error {
  code: string;
  status?: number;
  s3Code?: string;
  /** The request had been sent more than once (a PUT may have gone through before). */
  retried?: boolean;
}

const RETRY_STATUS = new Set([500, 502, 503, 504]);
const RETRY_S3 = new Set(['SlowDown', 'RequestTimeout', 'InternalError', 'ServiceUnavailable']);
const RETRY_NET = new Set(['ECONNRESET', 'ETIMEDOUT', 'EPIPE', 'ECONNREFUSED', 'ECONNABORTED', 'EAI_AGAIN', 'ENETUNREACH', 'EHOSTUNREACH']);
const CREDENTIALS_REFUSED = new Set(['InvalidAccessKeyId', 'SignatureDoesNotMatch', 'AccessDenied', 'InvalidToken', 'ExpiredToken']);

/** Text from the server, made safe for a one-line message. */
export function clean(s: string, max = 200): string {
  const t = s.replace(/[\x00-\x1f\x7f]+/g, ' ').trim();
  return t.length > max ? t.slice(0, max) + '…' : t;
}

export class S3Client {
  readonly endpoint: URL;
  private agent: http.Agent | null = null;
  readonly limiter: RateLimiter | null;
  readonly maxAttempts: number;
  private readonly retryBaseMs: number;
  private readonly timeoutMs: number;

  constructor(readonly opts: S3ClientOptions) {
    this.endpoint = new URL(opts.endpoint);
    if (this.endpoint.protocol !== 'http:' && this.endpoint.protocol !== 'https:') throw Object.assign(new Error(`S3 endpoint ${opts.endpoint}: not http or https`), { code: 'EINVAL' });
    this.limiter = opts.limitRate ? new RateLimiter(opts.limitRate) : null;
    this.maxAttempts = Math.max(1, opts.maxAttempts ?? 6);
    this.retryBaseMs = opts.retryBaseMs ?? 200;
    this.timeoutMs = opts.timeoutMs ?? 60_000;
  }

  get bucket(): string {
    return this.opts.bucket;
  }

  /** Where a key is, for messages. */
  describe(key?: string): string {
    return `s3://${this.opts.bucket}${key === undefined ? '' : '/' + key}`;
  }

  /** The URL of a request (path style: /bucket/key; virtual host: bucket.host/key). */
  url(key: string | undefined, query: Record<string, string>): { url: URL; path: string } {
    const base = this.endpoint.pathname.replace(/\/+$/, '');
    const keyPath = key === undefined ? '/' : '/' + encodePath(key);
    const path = this.opts.virtualHost ? base + keyPath : `${base}/${encodePath(this.opts.bucket)}${key === undefined ? '' : keyPath}`;
    const url = new URL(this.endpoint.href);
    if (this.opts.virtualHost) url.hostname = `${this.opts.bucket}.${url.hostname}`;
    const q = canonicalQuery(query);
    // Encoded here, as signed: the URL keeps %-escapes as they are and has nothing else to
    // encode (checked names and buckets have no '.' or '..' segment for it to resolve).
    url.pathname = path;
    url.search = q ? '?' + q : '';
    return { url, path };
  }

  /** Send a request, retrying what is transient; an answer outside `accept` is thrown. */
  async send(r: S3Request): Promise<Exchange> {
    let attempt = 0;
    for (;;) {
      attempt++;
      let err: S3Error;
      try {
        const x = await this.once(r);
        const ok = r.accept ? r.accept.includes(x.status) : x.status >= 200 && x.status < 300;
        if (ok) return x;
        err = this.answerError(r, x);
      } catch (e) {
        // No answer (or one cut off, or too large): the connection's error, with where it was going.
        const cause = e as S3Error;
        err = Object.assign(new Error(`${this.describe(r.key)}: ${r.method} to ${this.endpoint.host} failed: ${clean(cause.message)}`), { code: cause.code ?? 'EIO' });
      }
      err.retried = attempt > 1;
      const transient = RETRY_NET.has(err.code) || RETRY_STATUS.has(err.status ?? 0) || RETRY_S3.has(err.s3Code ?? '');
      if (!transient) throw err;
      if (attempt >= this.maxAttempts) {
        err.message += ` (gave up after ${attempt} attempts)`;
        throw err;
      }
      // Full jitter: a random wait up to the doubled backoff, so retrying clients spread out.
      const cap = Math.min(20_000, this.retryBaseMs * 2 ** (attempt - 1));
      await new Promise((res) => setTimeout(res, Math.random() * cap));
    }
  }

  private once(r: S3Request): Promise<Exchange> {
    const query = r.query ?? {};
    const { url, path } = this.url(r.key, query);
    const headers = signV4(
      { method: r.method, path, query, headers: { host: url.host, ...r.headers }, payloadHash: sha256Hex(r.body ?? ''), region: this.opts.region },
      this.opts.credentials,
    );
    this.agent ??= newAgent(this.endpoint);
    return exchange({ url, method: r.method, headers, body: r.body, agent: this.agent, timeoutMs: this.timeoutMs, maxBody: r.maxBody ?? 1 << 20, limiter: this.limiter });
  }

  /** The Error for an answer that is not a success. */
  answerError(r: S3Request, x: Exchange): S3Error {
    let s3Code = '';
    let detail = '';
    if (x.body.length) {
      try {
        const doc = parseXml(x.body);
        if (doc.name === 'Error') {
          s3Code = clean(childText(doc, 'Code') ?? '', 60);
          detail = clean(childText(doc, 'Message') ?? '');
        }
      } catch (e) {
        if (!(e instanceof XmlError)) throw e;
      }
    }
    const what = `${r.method} ${this.describe(r.key)}`;
    const e = (code: string, message: string): S3Error => Object.assign(new Error(message), { code, status: x.status, s3Code: s3Code || undefined });
    if (s3Code === 'NoSuchBucket') return e('ENOENT', `bucket ${this.bucket} does not exist at ${this.endpoint.origin}`);
    if (CREDENTIALS_REFUSED.has(s3Code) || (x.status === 403 && !s3Code)) {
      return e('EACCES', `${this.endpoint.origin} refused the credentials for bucket ${this.bucket} (${s3Code || '403 Forbidden'})`);
    }
    if (s3Code === 'NoSuchKey' || (x.status === 404 && !s3Code)) return e('ENOENT', `${this.describe(r.key)}: no such object`);
    if (x.status === 412 || s3Code === 'PreconditionFailed') return e('EEXIST', `${this.describe(r.key)}: exists`);
    const why = s3Code ? `${s3Code}${detail ? ': ' + detail : ''}` : `HTTP ${x.status}`;
    return e('EIO', `${what} at ${this.endpoint.origin} failed: ${why}`);
  }

  /** Drop the kept-alive connections; the client opens new ones when used again. */
  close(): void {
    this.agent?.destroy();
    this.agent = null;
  }
}

/**
 * AWS Signature Version 4 for S3 requests, on node:crypto: the canonical request, the
 * string to sign, the derived signing key, the Authorization header. Hand-written rather
 * than a dependency: it is small, and this way the whole request path is ours to read.
 * Tested against the examples AWS publishes (test/s3-units.test.ts).
 */
import { createHash, createHmac } from 'node:crypto';

export interface Credentials {
  accessKeyId: string;
  secretAccessKey: string;
  sessionToken?: string;
}

export interface SignInput {
  method: string;
  /** The request path as sent, already encoded (encodePath). */
  path: string;
  /** Query parameters, not encoded; a parameter without value is ''. */
  query: Record<string, string>;
  /** Header names in any case; host must be among them. */
  headers: Record<string, string>;
  /** Hex SHA-256 of the body, or 'UNSIGNED-PAYLOAD'. */
  payloadHash: string;
  region: string;
  /** Defaults to now. */
  date?: Date;
}

export const sha256Hex = (data: Buffer | string): string => createHash('sha256').update(data).digest('hex');
const hmac = (key: Buffer | string, data: string): Buffer => createHmac('sha256', key).update(data).digest();

/** RFC 3986 encoding as SigV4 wants it: everything but unreserved characters. */
export function uriEncode(s: string): string {
  return encodeURIComponent(s).replace(/[!'()*]/g, (c) => '%' + c.charCodeAt(0).toString(16).toUpperCase());
}

/** A key or bucket path, each segment encoded, the slashes kept (S3 does not normalise paths). */
export function encodePath(p: string): string {
  return p.split('/').map(uriEncode).join('/');
}

export function canonicalQuery(query: Record<string, string>): string {
  return Object.keys(query)
    .map((k) => [uriEncode(k), uriEncode(query[k])])
    .sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : a[1] < b[1] ? -1 : 1))
    .map(([k, v]) => `${k}=${v}`)
    .join('&');
}

/** 20130524T000000Z */
export function amzDate(d: Date): string {
  return d.toISOString().replace(/[-:]/g, '').replace(/\.\d{3}/, '');
}

/**
 * Sign a request: returns the headers to send (the given ones, plus x-amz-date,
 * x-amz-content-sha256, x-amz-security-token when there is one, and Authorization).
 */
export function signV4(input: SignInput, cred: Credentials): Record<string, string> {
  const date = amzDate(input.date ?? new Date());
  const day = date.slice(0, 8);
  const out: Record<string, string> = { ...input.headers, 'x-amz-date': date, 'x-amz-content-sha256': input.payloadHash };
  if (cred.sessionToken) out['x-amz-security-token'] = cred.sessionToken;
  const lower = new Map<string, string>();
  for (const [k, v] of Object.entries(out)) lower.set(k.toLowerCase(), String(v).trim().replace(/\s+/g, ' '));
  const names = [...lower.keys()].sort();
  const signedHeaders = names.join(';');
  const canonical = [
    input.method,
    input.path,
    canonicalQuery(input.query),
    names.map((n) => `${n}:${lower.get(n)}\n`).join(''),
    signedHeaders,
    input.payloadHash,
  ].join('\n');
  const scope = `${day}/${input.region}/s3/aws4_request`;
  const toSign = ['AWS4-HMAC-SHA256', date, scope, sha256Hex(canonical)].join('\n');
  const key = hmac(hmac(hmac(hmac('AWS4' + cred.secretAccessKey, day), input.region), 's3'), 'aws4_request');
  const signature = createHmac('sha256', key).update(toSign).digest('hex');
  out['Authorization'] = `AWS4-HMAC-SHA256 Credential=${cred.accessKeyId}/${scope},SignedHeaders=${signedHeaders},Signature=${signature}`;
  return out;
}

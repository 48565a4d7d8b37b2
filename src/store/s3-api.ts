/**
 * The S3 operations the store uses, over S3Client.send: what each request looks like and
 * what of its answer is read, checked as hostile input (sizes are safe integers, keys
 * are under the prefix asked for, an ETag is a plain token, a page says how it goes on).
 */
import { S3Client, S3Error, clean } from './s3-client.js';
import { XmlElement, XmlError, children, childText, escapeXml, flag, parseXml, requireSize, requireText } from './s3-xml.js';

export interface ListPage {
  items: Array<{ key: string; size: number; modified?: number }>;
  next: string | null;
}

export interface UploadInfo {
  key: string;
  uploadId: string;
  initiated: Date;
}

/** The largest object get() reads whole into memory (config.json and the like are tiny). */
export const MAX_GET_BYTES = 256 << 20;

function protoError(c: S3Client, what: string): Error {
  return Object.assign(new Error(`${c.describe()} at ${c.endpoint.origin}: ${what}`), { code: 'EPROTO' });
}

/** The response as XML with the root expected; an <Error> in a 200 (which S3 may send on Complete) is thrown. */
function xmlOf(c: S3Client, body: Buffer, root: string, key?: string): XmlElement {
  let doc: XmlElement;
  try {
    doc = parseXml(body);
  } catch (e) {
    if (e instanceof XmlError) throw protoError(c, e.message);
    throw e;
  }
  if (doc.name === 'Error') throw c.answerError({ method: 'POST', key }, { status: 500, headers: {}, body });
  if (doc.name !== root) throw protoError(c, `expected <${root}>, got <${clean(doc.name, 40)}>`);
  return doc;
}

function contentLength(c: S3Client, h: Record<string, unknown>): number {
  const v = String(h['content-length'] ?? '');
  if (!/^[0-9]{1,16}$/.test(v) || !Number.isSafeInteger(Number(v))) throw protoError(c, `bad Content-Length ${JSON.stringify(clean(v, 30))}`);
  return Number(v);
}

export async function headBucket(c: S3Client): Promise<boolean> {
  const x = await c.send({ method: 'HEAD', accept: [200, 404] });
  return x.status === 200;
}

export async function createBucket(c: S3Client): Promise<void> {
  // us-east-1 is the one region that must not be named in the request.
  const body = c.opts.region === 'us-east-1' ? undefined : Buffer.from(`<CreateBucketConfiguration><LocationConstraint>${escapeXml(c.opts.region)}</LocationConstraint></CreateBucketConfiguration>`);
  try {
    await c.send({ method: 'PUT', body });
  } catch (e) {
    if ((e as S3Error).s3Code !== 'BucketAlreadyOwnedByYou') throw e;
  }
}

/** An object's size, or null when it is missing. */
export async function headObject(c: S3Client, key: string): Promise<{ size: number } | null> {
  const x = await c.send({ method: 'HEAD', key, accept: [200, 404] });
  return x.status === 404 ? null : { size: contentLength(c, x.headers) };
}

export async function getObject(c: S3Client, key: string): Promise<Buffer> {
  return (await c.send({ method: 'GET', key, maxBody: MAX_GET_BYTES })).body;
}

/**
 * Bytes [start, start + length) of an object, fewer at its end; length > 0. A range at or
 * past the end is empty (S3 says 416). The answer must be the range asked for.
 */
export async function getRange(c: S3Client, key: string, start: number, length: number): Promise<Buffer> {
  const x = await c.send({ method: 'GET', key, headers: { range: `bytes=${start}-${start + length - 1}` }, maxBody: length, accept: [200, 206, 416] });
  if (x.status === 416) return Buffer.alloc(0);
  if (x.status === 200) {
    // The whole object instead of a range: only right when the range started at 0.
    if (start !== 0) throw protoError(c, `${key}: a range was answered with the whole object`);
    return x.body;
  }
  const m = /^bytes ([0-9]+)-([0-9]+)\/([0-9]+|\*)$/.exec(String(x.headers['content-range'] ?? ''));
  if (!m || Number(m[1]) !== start || Number(m[2]) - start + 1 !== x.body.length) throw protoError(c, `${key}: the answer is not the range asked for`);
  return x.body;
}

export async function putObject(c: S3Client, key: string, body: Buffer, ifNoneMatch = false): Promise<void> {
  await c.send({ method: 'PUT', key, body, headers: ifNoneMatch ? { 'if-none-match': '*' } : {} });
}

export async function deleteObject(c: S3Client, key: string): Promise<void> {
  await c.send({ method: 'DELETE', key, accept: [200, 204, 404] });
}

/** One page of ListObjectsV2 under `prefix`. */
export async function listObjects(c: S3Client, prefix: string, token: string | null, maxKeys: number): Promise<ListPage> {
  const query: Record<string, string> = { 'list-type': '2', prefix, 'max-keys': String(maxKeys) };
  if (token !== null) query['continuation-token'] = token;
  const doc = xmlOf(c, (await c.send({ method: 'GET', query })).body, 'ListBucketResult');
  const items = children(doc, 'Contents').map((el) => ({ key: requireText(el, 'Key'), size: requireSize(el, 'Size'), modified: timeOf(childText(el, 'LastModified')) }));
  for (const it of items) if (!it.key.startsWith(prefix)) throw protoError(c, `listing ${prefix} gave a key outside it`);
  const truncated = flag(doc, 'IsTruncated');
  const next = truncated ? requireText(doc, 'NextContinuationToken') : null;
  if (truncated && (next === '' || next === token)) throw protoError(c, `listing ${prefix} does not go on`);
  return { items, next };
}

export async function createMultipart(c: S3Client, key: string): Promise<string> {
  const doc = xmlOf(c, (await c.send({ method: 'POST', key, query: { uploads: '' } })).body, 'InitiateMultipartUploadResult', key);
  const id = requireText(doc, 'UploadId');
  if (!/^[\x21-\x7e]{1,1024}$/.test(id)) throw protoError(c, `${key}: bad UploadId`);
  return id;
}

/** Upload one part; returns its ETag. */
export async function uploadPart(c: S3Client, key: string, uploadId: string, partNumber: number, body: Buffer): Promise<string> {
  const x = await c.send({ method: 'PUT', key, body, query: { partNumber: String(partNumber), uploadId } });
  const etag = String(x.headers['etag'] ?? '');
  if (!/^"?[\x21\x23-\x7e]{1,200}"?$/.test(etag)) throw protoError(c, `${key}: part ${partNumber} without a usable ETag`);
  return etag;
}

export async function completeMultipart(c: S3Client, key: string, uploadId: string, etags: string[]): Promise<void> {
  const parts = etags.map((e, i) => `<Part><PartNumber>${i + 1}</PartNumber><ETag>${escapeXml(e)}</ETag></Part>`).join('');
  const body = Buffer.from(`<CompleteMultipartUpload>${parts}</CompleteMultipartUpload>`);
  xmlOf(c, (await c.send({ method: 'POST', key, query: { uploadId }, body })).body, 'CompleteMultipartUploadResult', key);
}

export async function abortMultipart(c: S3Client, key: string, uploadId: string): Promise<void> {
  await c.send({ method: 'DELETE', key, query: { uploadId }, accept: [200, 204, 404] });
}

/** Every multipart upload in progress under `prefix`. */
export async function* listUploads(c: S3Client, prefix: string): AsyncIterable<UploadInfo> {
  let marker: { key: string; id: string } | null = null;
  for (;;) {
    const query: Record<string, string> = { uploads: '', prefix };
    if (marker) Object.assign(query, { 'key-marker': marker.key, 'upload-id-marker': marker.id });
    const doc = xmlOf(c, (await c.send({ method: 'GET', query })).body, 'ListMultipartUploadsResult');
    for (const u of children(doc, 'Upload')) {
      const key = requireText(u, 'Key');
      const initiated = new Date(requireText(u, 'Initiated'));
      if (!key.startsWith(prefix) || Number.isNaN(initiated.getTime())) throw protoError(c, `listing uploads under ${prefix}: a bad entry`);
      yield { key, uploadId: requireText(u, 'UploadId'), initiated };
    }
    if (!flag(doc, 'IsTruncated')) return;
    const next = { key: childText(doc, 'NextKeyMarker') ?? '', id: childText(doc, 'NextUploadIdMarker') ?? '' };
    if (!next.key || (marker && next.key === marker.key && next.id === marker.id)) throw protoError(c, `listing uploads under ${prefix} does not go on`);
    marker = next;
  }
}

/** An ISO 8601 time of an answer (LastModified), in ms; undefined when absent or not a time. */
function timeOf(v: string | undefined): number | undefined {
  if (v === undefined || !/^\d{4}-\d{2}-\d{2}T[\d:.]+Z$/.test(v)) return undefined;
  const t = Date.parse(v);
  return Number.isFinite(t) ? t : undefined;
}

/**
 * Where a repository is. Every command works on a local directory:
 *
 * - a local repository is that directory, whole (config.json, packs/, index/, locks/, tmp/,
 *   keys/);
 * - an object-store repository (s3://BUCKET/PREFIX) keeps config.json, the packs and its
 *   key slots in the bucket, and everything else in a local cache directory whose
 *   store.json names the bucket (no secrets: credentials come from the environment and
 *   the AWS files at every open). Its index/ is a cache of the packs, rebuilt from the
 *   bucket when it is missing (FORMAT.md, "Object stores").
 *
 * So a command given s3://... resolves it to its cache directory first, and opening any
 * directory (repository.ts, repair, the mount's server) reads its store from here.
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { GenvaultError, describeFsError } from '../util/errors.js';
import { LocalStore } from '../store/local.js';
import type { Store } from '../store/store.js';

/** A cache directory's store.json: where its bucket is (never credentials). */
export interface ObjectStoreFile {
  version: 1;
  kind: 's3';
  /** s3://BUCKET[/PREFIX], as given to init. */
  url: string;
  endpoint: string;
  region: string;
  bucket: string;
  prefix: string;
  virtualHost: boolean;
}

export interface ObjectStoreOptions {
  endpoint?: string;
  region?: string;
  cacheDir?: string;
}

export const STORE_FILE = 'store.json';

export function isObjectStoreUrl(s: string): boolean {
  return s.startsWith('s3://');
}

/** Where caches go: $GENVAULT_CACHE_DIR, else /var/cache/genvault for root, else ~/.cache/genvault. */
export function cacheBase(explicit?: string): string {
  if (explicit) return path.resolve(explicit);
  if (process.env.GENVAULT_CACHE_DIR) return path.resolve(process.env.GENVAULT_CACHE_DIR);
  if (process.getuid?.() === 0) return '/var/cache/genvault';
  return path.join(process.env.XDG_CACHE_HOME || path.join(os.homedir(), '.cache'), 'genvault');
}

/**
 * The cache directory of an s3:// repository, made (0700, with its store.json) when
 * missing. One per endpoint, bucket and prefix: the name carries the bucket for people and
 * a digest of all three for uniqueness.
 */
export async function objectStoreDir(url: string, opts: ObjectStoreOptions): Promise<string> {
  const { resolveS3Spec } = await import('../store/s3-location.js');
  // Resolved here for the endpoint, region and addressing; credentials again at every open.
  const spec = await resolveS3Spec(url, { endpoint: opts.endpoint, region: opts.region }).catch((e: Error) => {
    throw new GenvaultError(`${url}: ${e.message}`, 'USAGE', 2);
  });
  const file: ObjectStoreFile = { version: 1, kind: 's3', url: url.replace(/\/+$/, ''), endpoint: spec.endpoint, region: spec.region, bucket: spec.bucket, prefix: spec.prefix, virtualHost: spec.virtualHost === true };
  const id = createHash('sha256').update(`${file.endpoint}\0${file.bucket}\0${file.prefix}`).digest('hex').slice(0, 16);
  const dir = path.join(cacheBase(opts.cacheDir), 's3', `${file.bucket}-${id}`);
  const storeFile = path.join(dir, STORE_FILE);
  const have = await readStoreFile(dir);
  if (have) {
    if (have.url !== file.url || have.endpoint !== file.endpoint) throw new GenvaultError(`${storeFile} names ${have.url} at ${have.endpoint}, not ${file.url} at ${file.endpoint}`, 'BAD_CONFIG');
    return dir;
  }
  try {
    await fs.mkdir(dir, { recursive: true, mode: 0o700 });
    const tmp = `${storeFile}.tmp-${process.pid}`;
    await fs.writeFile(tmp, JSON.stringify(file, null, 2) + '\n', { mode: 0o600 });
    await fs.rename(tmp, storeFile);
  } catch (e) {
    throw describeFsError(e, dir);
  }
  return dir;
}

/** A repository path as given, or an s3:// repository's cache directory (endpoint and region from `opts`, else the environment and AWS files). */
export async function objectStoreDirOr(p: string, opts: ObjectStoreOptions = {}): Promise<string> {
  return isObjectStoreUrl(p) ? objectStoreDir(p, opts) : p;
}

/** A cache directory's store.json, checked; null when the directory has none (a local repository). */
export async function readStoreFile(dir: string): Promise<ObjectStoreFile | null> {
  const file = path.join(dir, STORE_FILE);
  let text: string;
  try {
    text = await fs.readFile(file, 'utf8');
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENOTDIR') return null;
    throw describeFsError(e, file);
  }
  return checkStoreFile(text, file);
}

/** store.json is ours, but checked as hostile all the same: it decides where we connect. */
function checkStoreFile(text: string, file: string): ObjectStoreFile {
  const bad = (why: string) => new GenvaultError(`${file}: ${why} (remove the cache directory; it is rebuilt from the bucket)`, 'BAD_CONFIG');
  let v: Partial<ObjectStoreFile>;
  try {
    v = JSON.parse(text) as Partial<ObjectStoreFile>;
  } catch {
    throw bad('not valid JSON');
  }
  if (!v || typeof v !== 'object' || v.version !== 1 || v.kind !== 's3') throw bad('not a store file genvault knows');
  for (const k of ['url', 'endpoint', 'region', 'bucket', 'prefix'] as const) if (typeof v[k] !== 'string') throw bad(`"${k}" missing`);
  if (!/^https?:\/\//.test(v.endpoint!)) throw bad('"endpoint" is not an http(s) URL');
  if (!v.url!.startsWith(`s3://${v.bucket}`)) throw bad('"url" does not name its bucket');
  return { version: 1, kind: 's3', url: v.url!, endpoint: v.endpoint!, region: v.region!, bucket: v.bucket!, prefix: v.prefix!, virtualHost: v.virtualHost === true };
}

/**
 * The store of a repository directory: its bucket when it holds a store.json, else the
 * directory itself.
 */
export async function storeOf(dir: string, opts: { limitRate?: number } = {}): Promise<Store> {
  const abs = path.resolve(dir);
  const file = await readStoreFile(abs);
  if (!file) return new LocalStore(abs);
  const { resolveS3Spec } = await import('../store/s3-location.js');
  const { openStore } = await import('../store/open.js');
  const spec = await resolveS3Spec(file.url, { endpoint: file.endpoint, region: file.region, virtualHost: file.virtualHost, limitRate: opts.limitRate }).catch((e: Error) => {
    throw new GenvaultError(`${file.url}: ${e.message}`, 'USAGE', 2);
  });
  return openStore(spec);
}

/** s3://... for an object store's cache directory, else the directory: what messages name. */
export async function describeLocation(dir: string): Promise<string> {
  const file = await readStoreFile(dir).catch(() => null);
  return file ? file.url : dir;
}

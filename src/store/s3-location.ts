/**
 * Where an S3 store is and who we are to it: an `s3://BUCKET/PREFIX` location, and the
 * endpoint, region and credentials as the AWS tools find them (explicit options, then the
 * environment, then the shared files ~/.aws/credentials and ~/.aws/config of the profile),
 * made into the structured-cloneable S3Spec a store is opened from (open.ts).
 *
 * The shared files are parsed small and strict: a line that is not a section, a setting,
 * a nested setting or a comment is an error naming the file and line, rather than a
 * setting silently missed.
 */
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { S3Spec, checkName } from './store.js';

export interface S3Location {
  bucket: string;
  /** '' or a checked object name, without a trailing '/'. */
  prefix: string;
}

export interface S3Options {
  endpoint?: string;
  region?: string;
  accessKeyId?: string;
  secretAccessKey?: string;
  sessionToken?: string;
  /** The profile of the shared files (else AWS_PROFILE, else 'default'). */
  profile?: string;
  virtualHost?: boolean;
  limitRate?: number;
}

/** What the resolution reads besides the options (tests give their own). */
export interface S3Environment {
  env: Record<string, string | undefined>;
  home: string;
}

function invalid(message: string): Error {
  return Object.assign(new Error(message), { code: 'EINVAL' });
}

/** S3's bucket naming rules (the strict, DNS-compatible ones every store accepts). */
export function checkBucket(b: string): string {
  const why =
    b.length < 3 || b.length > 63
      ? 'it must be 3 to 63 characters'
      : !/^[a-z0-9][a-z0-9.-]*[a-z0-9]$/.test(b)
        ? 'it may hold lowercase letters, digits, dots and hyphens, and starts and ends with a letter or digit'
        : b.includes('..') || b.includes('.-') || b.includes('-.')
          ? 'a dot may not be next to a dot or a hyphen'
          : /^\d+\.\d+\.\d+\.\d+$/.test(b)
            ? 'it may not look like an IP address'
            : b.startsWith('xn--') || b.endsWith('-s3alias')
              ? "it may not start with 'xn--' or end with '-s3alias'"
              : null;
  if (why) throw invalid(`invalid bucket name ${JSON.stringify(b)}: ${why}`);
  return b;
}

/** `s3://BUCKET` or `s3://BUCKET/PREFIX[/]`; the prefix's segments are checked as object names are. */
export function parseS3Url(url: string): S3Location {
  if (!url.startsWith('s3://')) throw invalid(`not an s3:// location: ${JSON.stringify(url)}`);
  const rest = url.slice('s3://'.length);
  const slash = rest.indexOf('/');
  const bucket = checkBucket(slash < 0 ? rest : rest.slice(0, slash));
  const prefix = slash < 0 ? '' : rest.slice(slash + 1).replace(/\/$/, '');
  if (prefix !== '') {
    try {
      checkName(prefix);
    } catch (e) {
      throw invalid(`invalid prefix in ${JSON.stringify(url)}: ${(e as Error).message}`);
    }
  }
  return { bucket, prefix };
}

export type Ini = Map<string, Map<string, string>>;

/**
 * The AWS shared-file INI dialect: `[section]`, `key = value`, comments starting with '#'
 * or ';', and nested settings (an indented `key = value` under a key with no value, as
 * `s3 =` then `  endpoint_url = ...`), stored as `parent.key`.
 */
export function parseIni(text: string, file: string): Ini {
  const out: Ini = new Map();
  let section: Map<string, string> | null = null;
  let parent: string | null = null;
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i].replace(/\r$/, '');
    const t = line.trim();
    if (t === '' || t.startsWith('#') || t.startsWith(';')) continue;
    const bad = (why: string) => invalid(`${file}:${i + 1}: ${why}`);
    const sec = /^\[\s*([^\]]+?)\s*\]$/.exec(t);
    const kv = /^([A-Za-z0-9_.-]+)\s*=\s*(.*)$/.exec(t);
    if (sec && line === line.trimStart()) {
      section = out.get(sec[1]) ?? new Map();
      out.set(sec[1], section);
      parent = null;
    } else if (!kv) {
      throw bad('not a [section], a key = value or a comment');
    } else if (!section) {
      throw bad('a setting before any [section]');
    } else if (line !== line.trimStart()) {
      if (parent === null) throw bad('an indented setting not under a key without value');
      section.set(`${parent}.${kv[1]}`, kv[2]);
    } else {
      section.set(kv[1], kv[2]);
      parent = kv[2] === '' ? kv[1] : null;
    }
  }
  return out;
}

async function readIni(file: string): Promise<Ini> {
  let text: string;
  try {
    text = await fs.readFile(file, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return new Map();
    throw e;
  }
  return parseIni(text, file);
}

/** The profile's settings from both shared files (credentials file first, as the AWS tools read them). */
export async function profileSettings(profile: string, e: S3Environment): Promise<{ credentials: Map<string, string>; config: Map<string, string> }> {
  const aws = path.join(e.home, '.aws');
  const creds = await readIni(e.env.AWS_SHARED_CREDENTIALS_FILE || path.join(aws, 'credentials'));
  const config = await readIni(e.env.AWS_CONFIG_FILE || path.join(aws, 'config'));
  // In the config file every profile but the default is `[profile NAME]`.
  const conf = profile === 'default' ? (config.get('default') ?? config.get('profile default')) : config.get(`profile ${profile}`);
  return { credentials: creds.get(profile) ?? new Map(), config: conf ?? new Map() };
}

function checkEndpoint(url: string, from: string): string {
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    throw invalid(`S3 endpoint ${JSON.stringify(url)} (${from}) is not a URL`);
  }
  if ((u.protocol !== 'http:' && u.protocol !== 'https:') || u.username || u.password || u.search || u.hash) {
    throw invalid(`S3 endpoint ${JSON.stringify(url)} (${from}): an http(s) URL without credentials, query or fragment is needed`);
  }
  return u.href.replace(/\/$/, '');
}

type Profile = () => Promise<{ credentials: Map<string, string>; config: Map<string, string> }>;

interface Resolved {
  accessKeyId: string;
  secretAccessKey: string;
  sessionToken?: string;
}

async function credentialsFor(url: string, o: S3Options, env: S3Environment['env'], profile: string, named: boolean, files: Profile): Promise<Resolved> {
  let cred: Partial<Resolved> & { from: string };
  if (o.accessKeyId || o.secretAccessKey) cred = { ...o, from: 'the options' };
  else if (env.AWS_ACCESS_KEY_ID || env.AWS_SECRET_ACCESS_KEY) {
    cred = { accessKeyId: env.AWS_ACCESS_KEY_ID, secretAccessKey: env.AWS_SECRET_ACCESS_KEY, sessionToken: env.AWS_SESSION_TOKEN || undefined, from: 'AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY' };
  } else {
    const p = await files();
    if (named && !p.credentials.size && !p.config.size) throw invalid(`AWS profile ${JSON.stringify(profile)} is in neither shared file`);
    const get = (k: string) => p.credentials.get(k) || p.config.get(k) || undefined;
    cred = { accessKeyId: get('aws_access_key_id'), secretAccessKey: get('aws_secret_access_key'), sessionToken: get('aws_session_token'), from: `profile ${profile}` };
  }
  if (!cred.accessKeyId || !cred.secretAccessKey) {
    const why = cred.from.startsWith('profile') ? `no credentials in ${cred.from}` : `${cred.from} give only half of them`;
    throw Object.assign(new Error(`no S3 credentials for ${url}: ${why} (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile in ~/.aws/credentials)`), { code: 'EACCES' });
  }
  const out: Resolved = { accessKeyId: cred.accessKeyId, secretAccessKey: cred.secretAccessKey };
  if (cred.sessionToken) out.sessionToken = cred.sessionToken;
  return out;
}

/**
 * The spec of the store at `url`, resolved as described at the top. The shared files are
 * read only when the options and the environment leave something open.
 */
export async function resolveS3Spec(url: string, o: S3Options, e: S3Environment = { env: process.env, home: os.homedir() }): Promise<S3Spec> {
  const { bucket, prefix } = parseS3Url(url);
  const env = e.env;
  const profile = o.profile || env.AWS_PROFILE || 'default';
  let read: ReturnType<Profile> | null = null;
  const files: Profile = () => (read ??= profileSettings(profile, e));
  const cred = await credentialsFor(url, o, env, profile, o.profile !== undefined || !!env.AWS_PROFILE, files);
  const region = o.region || env.AWS_REGION || env.AWS_DEFAULT_REGION || (await files()).config.get('region') || 'us-east-1';
  if (!/^[a-z0-9-]{1,40}$/.test(region)) throw invalid(`invalid S3 region ${JSON.stringify(region)}`);
  const envEndpoint = env.AWS_ENDPOINT_URL_S3 || env.AWS_ENDPOINT_URL;
  let endpoint: string;
  if (o.endpoint) endpoint = checkEndpoint(o.endpoint, 'option');
  else if (envEndpoint) endpoint = checkEndpoint(envEndpoint, 'environment');
  else {
    const c = (await files()).config;
    const fromProfile = c.get('s3.endpoint_url') || c.get('endpoint_url');
    endpoint = fromProfile ? checkEndpoint(fromProfile, `profile ${profile}`) : `https://s3.${region}.amazonaws.com`;
  }
  const spec: S3Spec = { kind: 's3', endpoint, region, bucket, prefix, ...cred };
  // A profile's addressing style goes with the profile's endpoint, not with one given here.
  const virtual = o.virtualHost ?? (o.endpoint || envEndpoint ? undefined : (await files()).config.get('s3.addressing_style') === 'virtual');
  if (virtual) spec.virtualHost = true;
  if (o.limitRate !== undefined) spec.limitRate = o.limitRate;
  return spec;
}

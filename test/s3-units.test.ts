/**
 * The S3 store's parts that need no server: Signature V4 against the examples in AWS's S3
 * documentation ("Examples of signature calculations", Authorization header), the XML
 * parser on hostile input, the shared-file and environment resolution, s3:// locations.
 */
import fs from 'node:fs/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openStore, openSyncReader } from '../src/store/open.js';
import { parseIni, parseS3Url, resolveS3Spec } from '../src/store/s3-location.js';
import { MAX_PARTS, S3Appender, partBytes } from '../src/store/s3-appender.js';
import type { S3Client } from '../src/store/s3-client.js';
import { S3Store } from '../src/store/s3.js';
import { encodePath, sha256Hex, signV4 } from '../src/store/s3-sign.js';
import { parseXml, requireSize } from '../src/store/s3-xml.js';
import { Scratch } from './helpers.js';

describe('Signature V4', () => {
  const cred = { accessKeyId: 'AKIAIOSFODNN7EXAMPLE', secretAccessKey: 'wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY' };
  const date = new Date('2013-05-24T00:00:00Z');
  const host = 'examplebucket.s3.amazonaws.com';
  const empty = sha256Hex('');
  const sign = (method: string, path: string, query: Record<string, string>, headers: Record<string, string>, payloadHash = empty) =>
    signV4({ method, path, query, headers: { host, ...headers }, payloadHash, region: 'us-east-1', date }, cred);

  it('GET Object with a Range header', () => {
    const h = sign('GET', '/test.txt', {}, { range: 'bytes=0-9' });
    expect(h.Authorization).toBe(
      'AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,SignedHeaders=host;range;x-amz-content-sha256;x-amz-date,Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41',
    );
    expect(h['x-amz-date']).toBe('20130524T000000Z');
    expect(h['x-amz-content-sha256']).toBe(empty);
  });

  it('PUT Object, a key that needs encoding, a body hash', () => {
    const body = 'Welcome to Amazon S3.';
    const h = sign('PUT', encodePath('/test$file.text'), {}, { date: 'Fri, 24 May 2013 00:00:00 GMT', 'x-amz-storage-class': 'REDUCED_REDUNDANCY' }, sha256Hex(body));
    expect(h.Authorization).toMatch(/SignedHeaders=date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class,Signature=98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd$/);
  });

  it('GET Bucket lifecycle and a listing: query parameters, with and without values', () => {
    expect(sign('GET', '/', { lifecycle: '' }, {}).Authorization).toMatch(/Signature=fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543$/);
    expect(sign('GET', '/', { prefix: 'J', 'max-keys': '2' }, {}).Authorization).toMatch(/Signature=34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7$/);
  });

  it('signs a session token and encodes keys as S3 wants', () => {
    const h = signV4({ method: 'GET', path: '/', query: {}, headers: { host }, payloadHash: empty, region: 'us-east-1', date }, { ...cred, sessionToken: 'TOKEN' });
    expect(h['x-amz-security-token']).toBe('TOKEN');
    expect(h.Authorization).toContain('SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-security-token,');
    expect(encodePath("b/a b+c!*'()~_.-é")).toBe('b/a%20b%2Bc%21%2A%27%28%29~_.-%C3%A9');
  });
});

describe('XML parser', () => {
  it('reads what S3 sends: declaration, namespaces, entities, self-closing tags, comments', () => {
    const doc = parseXml(
      '\ufeff<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><!-- c --><Contents><Key>a&amp;b&lt;&#65;&#x42;&quot;&apos;&gt;</Key><Size>12</Size></Contents><Empty/></ListBucketResult>',
    );
    expect(doc.name).toBe('ListBucketResult');
    expect(doc.children[0].children[0].text).toBe('a&b<AB"\'>');
    expect(requireSize(doc.children[0], 'Size')).toBe(12);
    expect(doc.children[1]).toEqual({ name: 'Empty', children: [], text: '' });
  });

  it('refuses hostile or broken documents with one XmlError each', () => {
    const bad = [
      '',
      'text',
      '<a>',
      '<a></b>',
      '<a></a><b></b>',
      '<a>x</a>trailing',
      '<!DOCTYPE a [<!ENTITY x "y">]><a>&x;</a>',
      '<a><![CDATA[x]]></a>',
      '<a>&unknown;</a>',
      '<a>& bare</a>',
      '<a>&#0;</a>',
      '<a>&#xD800;</a>',
      '<a>&#x110000;</a>',
      '<a b=c></a>',
      '<1a></1a>',
      '<a>\0</a>',
      '<?pi x?><a/>',
      '<a/><?xml version="1.0"?>',
      '<a>' + '<b>'.repeat(40) + '</b>'.repeat(40) + '</a>',
      '<a>' + '<b/>'.repeat(200_001) + '</a>',
    ];
    for (const x of bad) expect(() => parseXml(x), x.slice(0, 60)).toThrow(expect.objectContaining({ code: 'EPROTO' }));
    expect(() => parseXml(Buffer.alloc(9 << 20, 0x20))).toThrow(/too large/);
    for (const size of ['-1', '1e3', '', '99999999999999999', '0x10']) {
      expect(() => requireSize(parseXml(`<C><Size>${size}</Size></C>`), 'Size'), size).toThrow(/not a size/);
    }
  });
});

describe('s3:// locations', () => {
  it('parses bucket and prefix', () => {
    expect(parseS3Url('s3://my-bucket')).toEqual({ bucket: 'my-bucket', prefix: '' });
    expect(parseS3Url('s3://my-bucket/')).toEqual({ bucket: 'my-bucket', prefix: '' });
    expect(parseS3Url('s3://b.c1/backups/host1/')).toEqual({ bucket: 'b.c1', prefix: 'backups/host1' });
  });

  it('refuses bad buckets and prefixes with EINVAL', () => {
    for (const bad of ['http://b/x', 's3://', 's3://ab', 's3://Upper', 's3://a_b', 's3://-ab', 's3://ab-', 's3://a..b', 's3://a.-b', 's3://192.168.1.1', 's3://xn--ab', 's3://ab-s3alias', 's3://' + 'a'.repeat(64), 's3://bkt/a/../b', 's3://bkt/a//b', 's3://bkt/./a', 's3://bkt/..', 's3://bkt/a\\b', 's3://bkt//a']) {
      expect(() => parseS3Url(bad), bad).toThrow(expect.objectContaining({ code: 'EINVAL' }));
    }
  });
});

describe('S3Store without a server', () => {
  const spec = { kind: 's3' as const, endpoint: 'http://127.0.0.1:1', region: 'us-east-1', bucket: 'bkt', prefix: 'a/b', accessKeyId: 'K', secretAccessKey: 'S' };
  it('opens from its spec, has no sync reader, refuses parts under 5 MiB and bad prefixes', async () => {
    const st = openStore(spec);
    expect(st).toBeInstanceOf(S3Store);
    expect(st.sealsOnSync).toBe(true);
    expect(st.describe('packs/x')).toBe('s3://bkt/a/b/packs/x');
    expect(openSyncReader(spec)).toBeNull();
    expect(() => new S3Store({ ...spec, partSize: 1 << 20 })).toThrow(expect.objectContaining({ code: 'EINVAL' }));
    expect(() => new S3Store({ ...spec, prefix: 'a/../b' })).toThrow(expect.objectContaining({ code: 'EINVAL' }));
    expect(() => new S3Store({ ...spec, bucket: '..' })).toThrow(expect.objectContaining({ code: 'EINVAL' }));
    await st.close();
  });

  it('parts grow so that an upload of 10,000 parts reaches S3\'s 5 TiB object limit; an appender past its last part fails with EFBIG, one line', async () => {
    const MIB = 1 << 20;
    const t = { multipartThreshold: 16 * MIB, partSize: 8 * MIB, partsPerSize: 1000, maxParts: MAX_PARTS, concurrency: 4 };
    expect(partBytes(t, 0)).toBe(8 * MIB);
    expect(partBytes(t, 999)).toBe(8 * MIB);
    expect(partBytes(t, 1000)).toBe(16 * MIB);
    expect(partBytes(t, 9999)).toBe(4096 * MIB);
    expect(partBytes({ ...t, partSize: 4096 * MIB }, 1000)).toBe(5 * 1024 * MIB); // S3's largest part
    let total = 0;
    for (let i = 0; i < MAX_PARTS; i++) total += partBytes(t, i);
    expect(total).toBeGreaterThan(5 * 2 ** 40);
    expect(() => new S3Store({ ...spec, partsPerSize: 0 })).toThrow(expect.objectContaining({ code: 'EINVAL' }));
    expect(() => new S3Store({ ...spec, partSize: 6 * 1024 * MIB })).toThrow(expect.objectContaining({ code: 'EINVAL' }));
    // Under the threshold nothing is sent, so no server is needed: parts of 5, 10 and 20 MiB.
    const client = { describe: (k: string) => `s3://bkt/${k}` } as unknown as S3Client;
    const a = new S3Appender('p', 'a/b/p', client, { ...t, multipartThreshold: Number.MAX_SAFE_INTEGER, partSize: 5 * MIB, partsPerSize: 1, maxParts: 3 });
    await a.append(Buffer.alloc(35 * MIB, 1));
    const e = (await a.append(Buffer.alloc(MIB, 2)).catch((x: Error) => x)) as NodeJS.ErrnoException;
    expect(e.code).toBe('EFBIG');
    expect(e.message).toBe("s3://bkt/a/b/p: cannot append past 36700160 bytes: an S3 object has at most 3 parts (lower packTargetSize in the repository's config.json)");
    expect(a.size).toBe(35 * MIB);
    await a.truncate(12 * MIB + 1); // the third part's buffer keeps 2 MiB + 1 byte
    await a.append(Buffer.alloc(3 * MIB, 3));
    expect(a.size).toBe(15 * MIB + 1);
    await a.close();
  });

  it('addresses requests path style by default, virtual-host style by option', () => {
    const path = new S3Store({ ...spec, endpoint: 'https://rgw.example:8443/base/' }).client;
    expect(path.url('a/b c', { uploads: '', prefix: 'x/' }).url.href).toBe('https://rgw.example:8443/base/bkt/a/b%20c?prefix=x%2F&uploads=');
    expect(path.url(undefined, {}).url.href).toBe('https://rgw.example:8443/base/bkt');
    const vhost = new S3Store({ ...spec, endpoint: 'https://s3.eu-west-3.amazonaws.com', virtualHost: true }).client;
    expect(vhost.url('a/%', {}).url.href).toBe('https://bkt.s3.eu-west-3.amazonaws.com/a/%25');
    expect(vhost.url(undefined, { 'list-type': '2' }).url.href).toBe('https://bkt.s3.eu-west-3.amazonaws.com/?list-type=2');
  });

  it('a connection refused every time: one line after the attempts', async () => {
    const st = new S3Store({ ...spec, maxAttempts: 2, retryBaseMs: 1 });
    const e = (await st.get('x').catch((x: Error) => x)) as NodeJS.ErrnoException;
    expect(e.code).toBe('ECONNREFUSED');
    expect(e.message).toMatch(/^s3:\/\/bkt\/a\/b\/x: GET to 127\.0\.0\.1:1 failed: .* \(gave up after 2 attempts\)$/);
    await st.close();
  });
});

describe('credentials and endpoints', () => {
  let s: Scratch;
  beforeAll(async () => {
    s = await Scratch.create('genvault-s3loc-');
    await fs.mkdir(s.path('.aws'));
    await fs.writeFile(s.path('.aws', 'credentials'), '# keys\n[default]\naws_access_key_id = DEFKEY\naws_secret_access_key = defsecret\n\n[ceph]\r\naws_access_key_id=CEPHKEY\r\naws_secret_access_key = ceph/secret+=\r\naws_session_token = tok\r\n');
    await fs.writeFile(s.path('.aws', 'config'), '[default]\nregion = eu-west-3\n; comment\n[profile ceph]\nregion = default\ns3 =\n  endpoint_url = http://rgw.example:8080\n  addressing_style = virtual\n[profile onlyconf]\naws_access_key_id = CONFKEY\naws_secret_access_key = confsecret\nendpoint_url = https://objects.example/\n');
  });
  afterAll(() => s.cleanup());
  const at = (env: Record<string, string> = {}) => ({ env, home: s.dir });
  const base = {};

  it('explicit options win, and the shared files are not read', async () => {
    const spec = await resolveS3Spec('s3://bkt/p', { ...base, endpoint: 'http://127.0.0.1:9000', region: 'r1', accessKeyId: 'K', secretAccessKey: 'S' }, { env: { AWS_ACCESS_KEY_ID: 'E' }, home: '/nonexistent' });
    expect(spec).toEqual({ kind: 's3', endpoint: 'http://127.0.0.1:9000', region: 'r1', bucket: 'bkt', prefix: 'p', accessKeyId: 'K', secretAccessKey: 'S' });
    expect(structuredClone(spec)).toEqual(spec);
  });

  it('then the environment, then the default profile, then AWS', async () => {
    const env = await resolveS3Spec('s3://bkt', base, at({ AWS_ACCESS_KEY_ID: 'EK', AWS_SECRET_ACCESS_KEY: 'ES', AWS_SESSION_TOKEN: 'ET', AWS_REGION: 'r2', AWS_ENDPOINT_URL: 'http://a:1', AWS_ENDPOINT_URL_S3: 'http://s3:2/' }));
    expect(env).toMatchObject({ accessKeyId: 'EK', secretAccessKey: 'ES', sessionToken: 'ET', region: 'r2', endpoint: 'http://s3:2' });
    const def = await resolveS3Spec('s3://bkt', base, at());
    expect(def).toMatchObject({ accessKeyId: 'DEFKEY', secretAccessKey: 'defsecret', region: 'eu-west-3', endpoint: 'https://s3.eu-west-3.amazonaws.com' });
    expect(def.virtualHost).toBeUndefined();
    expect(def.sessionToken).toBeUndefined();
  });

  it('a named profile: nested s3 settings, CRLF lines; keys from the config file; missing profiles', async () => {
    const ceph = await resolveS3Spec('s3://bkt', base, at({ AWS_PROFILE: 'ceph' }));
    expect(ceph).toMatchObject({ accessKeyId: 'CEPHKEY', secretAccessKey: 'ceph/secret+=', sessionToken: 'tok', region: 'default', endpoint: 'http://rgw.example:8080', virtualHost: true });
    const conf = await resolveS3Spec('s3://bkt', { ...base, profile: 'onlyconf' }, at({ AWS_DEFAULT_REGION: 'r3' }));
    expect(conf).toMatchObject({ accessKeyId: 'CONFKEY', region: 'r3', endpoint: 'https://objects.example' });
    await expect(resolveS3Spec('s3://bkt', { ...base, profile: 'nope' }, at())).rejects.toThrow(/profile "nope" is in neither/);
    await expect(resolveS3Spec('s3://bkt', base, { env: {}, home: '/nonexistent' })).rejects.toMatchObject({ code: 'EACCES', message: expect.stringMatching(/^no S3 credentials for s3:\/\/bkt: no credentials in profile default/) });
    await expect(resolveS3Spec('s3://bkt', base, at({ AWS_ACCESS_KEY_ID: 'only' }))).rejects.toMatchObject({ code: 'EACCES' });
    await expect(resolveS3Spec('s3://bkt', { ...base, endpoint: 'ftp://x' }, at())).rejects.toMatchObject({ code: 'EINVAL' });
    await expect(resolveS3Spec('s3://bkt', { ...base, region: 'a/b' }, at())).rejects.toMatchObject({ code: 'EINVAL' });
  });

  it('the shared files: strict INI with file and line in errors; AWS_CONFIG_FILE and AWS_SHARED_CREDENTIALS_FILE', async () => {
    expect(() => parseIni('key = v\n', 'f')).toThrow('f:1: a setting before any [section]');
    expect(() => parseIni('[a]\ngarbage line\n', 'f')).toThrow('f:2: not a [section]');
    expect(() => parseIni('[a]\nk = v\n  nested = x\n', 'f')).toThrow('f:3: an indented setting');
    expect(() => parseIni('[a]\n k0 = 1\n', 'f')).toThrow('f:2: an indented setting');
    expect(parseIni('[a]\nk = \n  x = 1\n[b]\n', 'f')).toEqual(new Map([['a', new Map([['k', ''], ['k.x', '1']])], ['b', new Map()]]));
    await fs.writeFile(s.path('other-creds'), '[default]\naws_access_key_id = OTHER\naws_secret_access_key = o\n');
    await fs.writeFile(s.path('bad-config'), '[default]\nthis is not ini\n');
    const other = await resolveS3Spec('s3://bkt', { ...base, region: 'r' }, at({ AWS_SHARED_CREDENTIALS_FILE: s.path('other-creds') }));
    expect(other.accessKeyId).toBe('OTHER');
    await expect(resolveS3Spec('s3://bkt', base, at({ AWS_CONFIG_FILE: s.path('bad-config') }))).rejects.toThrow(`${s.path('bad-config')}:2:`);
  });
});

/**
 * `genvault serve`: one client's session with a repository, over stdin/stdout (OpenSSH
 * runs it, usually as a forced command in authorized_keys). The repository is opened here,
 * with the same shared index, locks and pins as any other process: a mount, a local backup
 * or other sessions run beside it. Everything the client sends is checked (protocol.ts,
 * access.ts); a request that fails is an ERROR and the session goes on, protocol abuse is
 * a FATAL and the end of the session. A backup the client abandons (disconnect, kill)
 * fails in the pipeline, which removes what it wrote and commits nothing.
 */
import type { Readable, Writable } from 'node:stream';
import { GenvaultError, errnoOf, innermostMessage } from '../util/errors.js';
import { parseTarget, type Generation } from '../format/generation.js';
import { walkChunks } from '../format/chunkmap.js';
import { isZero } from '../format/chunker.js';
import { Repository } from '../repository/repository.js';
import { Pin } from '../repository/locks.js';
import { ChunkLoader, ImageReader } from '../read/reader.js';
import { streamChunks } from '../read/restore.js';
import { backup } from '../backup/backup.js';
import { forgetGeneration, setProtected } from '../lifecycle/prune.js';
import { DigestSet } from '../util/digest-set.js';
import { Access } from './access.js';
import { FrameReader, MAX_FRAME, ProtocolError, encodeFrame, frameHeader, type Frame } from './frames.js';
import { PROTOCOL_VERSION, T, decodeRead, json, num, parseJson, str, strList, type Permission } from './protocol.js';
import { groupSize } from '../format/config.js';
import { UploadSource, chunksFrameBuffer } from './upload.js';
import { SyncServer } from './sync-server.js';
import { ParentWindows } from './parent-windows.js';

export interface ServeOptions {
  /** The repository (a forced command pins it); null: the path the client asks for. */
  repo: string | null;
  namespace: string | null;
  permission: Permission;
  input: Readable;
  output: Writable;
  /** Lines for the server's log (stderr, which ssh passes to the client). */
  log?: (line: string) => void;
}

const TAG_RE = /^[\x21-\x7e]{1,128}$/;

/** Chunk ids of a namespace held in memory during its backup (~40 bytes each). */
const NAMESPACE_SET_LIMIT = 4 << 20;

/** A backup's frames queued before the server stops reading (SEGMENTs are small; CHUNKS up to a segment of records). */
const QUEUED_SEGMENTS = 16;
const QUEUED_CHUNKS = 4;

/** Requests (CALL, READ) answered at once; the next frame waits beyond this. */
const CONCURRENCY = 16;

/** A generation the client opened for reading: pinned until closed or the session ends. */
interface OpenGen {
  gen: Generation;
  pin: Pin;
  reader: ImageReader;
}

/** A backup in progress: its frames queue here until its source asks for them. */
interface Upload {
  callId: number;
  segments: Frame[];
  chunks: Frame[];
  /** END came: the source is complete once the queued segments are taken. */
  ended: boolean;
  /** The client went away before END: the source fails, nothing is committed. */
  aborted: boolean;
  wake: (() => void) | null;
}

export class ServeSession {
  private repo: Repository | null = null;
  private access: Access;
  private loader: ChunkLoader | null = null;
  private opened = new Map<string, Promise<OpenGen>>();
  private upload: Upload | null = null;
  private inflight = new Set<Promise<void>>();
  private writeChain: Promise<void> = Promise.resolve();
  private recordChain: Promise<void> = Promise.resolve();
  /** A protocol error met inside a request: the session ends with it. */
  private fatal: Error | null = null;

  constructor(private readonly opts: ServeOptions) {
    this.access = new Access(opts.namespace, opts.permission);
  }

  /** Serve until the client closes the stream (resolves) or abuses the protocol (rejects). */
  async run(): Promise<void> {
    const frames = new FrameReader(this.opts.input, MAX_FRAME, chunksFrameBuffer);
    this.opts.output.on('error', () => frames.fail(new GenvaultError('client went away', 'DISCONNECTED')));
    try {
      await this.hello(frames);
      for (;;) {
        const f = await frames.next();
        if (!f || this.fatal) break;
        await this.dispatch(f);
      }
      // The input ended: a backup still waiting for its frames fails (nothing is committed).
      this.endUpload();
      await Promise.allSettled([...this.inflight]);
      if (this.fatal) throw this.fatal;
    } catch (e) {
      if (e instanceof ProtocolError) await this.send(T.FATAL, 0, Buffer.from(e.message)).catch(() => undefined);
      else if (!this.repo) await this.send(T.FATAL, 0, Buffer.from(messageOf(e))).catch(() => undefined);
      throw e;
    } finally {
      this.endUpload();
      await Promise.allSettled([...this.inflight]);
      await this.close();
    }
  }

  private async hello(frames: FrameReader): Promise<void> {
    const f = await frames.next();
    if (!f) throw new ProtocolError('the client sent nothing');
    if (f.type !== T.HELLO) throw new ProtocolError('the first frame must be HELLO');
    const h = parseJson(f.payload, 'HELLO');
    if (h.protocol !== PROTOCOL_VERSION) throw new ProtocolError(`protocol ${String(h.protocol)} is not spoken here (this server speaks ${PROTOCOL_VERSION})`);
    const path = this.opts.repo ?? str(h, 'path', 'HELLO');
    if (!path) throw new ProtocolError('HELLO: no repository path');
    this.repo = await Repository.open(path, { write: this.opts.permission !== 'read' });
    const cfg = this.repo.config;
    const keys = this.repo.keys;
    await this.send(T.WELCOME, f.id, json({
      protocol: PROTOCOL_VERSION,
      namespace: this.access.namespace,
      permissions: this.access.permission,
      format: cfg.version,
      chunking: cfg.chunking,
      encrypted: !!cfg.encryption,
      // A writer chunks and identifies as the repository does. The identity key lets a
      // client compute chunk ids of data it has; it reads nothing (see the threat model).
      identity: keys && this.access.permission !== 'read'
        ? { key: Buffer.from(keys.identity).toString('hex'), seed: keys.chunkSeed, fast: Buffer.from(keys.fast).toString('hex') }
        : null,
      // A writer may send its new chunks as records compressed as this repository would
      // (CHUNKS coding 2): the server then checks and seals them instead of compressing.
      records: this.access.permission !== 'read' ? { level: cfg.compression.level, group: groupSize(cfg) } : null,
    }));
  }

  private async dispatch(f: Frame): Promise<void> {
    switch (f.type) {
      case T.CALL:
        return this.spawn(f.id, () => this.call(f));
      case T.READ:
        return this.spawn(f.id, () => this.read(f));
      case T.RECORD:
        // Records are appended in the order they came (a client streams them).
        return this.spawn(f.id, () => {
          const p = this.recordChain.then(async () => this.send(T.RESULT, f.id, json(await this.syncer.record(f.payload))));
          this.recordChain = p.catch(() => undefined);
          return p;
        });
      case T.RECREAD:
        return this.spawn(f.id, async () => this.send(T.DATA, f.id, Buffer.concat([Buffer.of(0), await this.syncer.readRecord(f.payload)])));
      case T.SEGMENT:
      case T.CHUNKS:
      case T.END:
        return this.toUpload(f);
      default:
        throw new ProtocolError(`unknown frame type ${f.type}`);
    }
  }

  /** Runs a request beside others (at most CONCURRENCY); its failure is its ERROR. */
  private async spawn(id: number, fn: () => Promise<void>): Promise<void> {
    while (this.inflight.size >= CONCURRENCY) await Promise.race(this.inflight);
    const p = fn()
      .catch((e) => {
        if (e instanceof ProtocolError) throw e;
        return this.send(T.ERROR, id, json({ message: messageOf(e), code: (e as { code?: unknown }).code ?? null }));
      })
      .catch((e) => {
        // A protocol error inside a request ends the session: stop reading the input.
        this.fatal ??= e as Error;
        this.opts.input.destroy();
      })
      .finally(() => this.inflight.delete(p));
    this.inflight.add(p);
  }

  private send(type: number, id: number, payload: Buffer): Promise<void> {
    const out = this.opts.output;
    const next = this.writeChain.then(
      () =>
        new Promise<void>((resolve, reject) => {
          if (out.destroyed) return reject(new GenvaultError('client went away', 'DISCONNECTED'));
          // Large payloads follow their header without a copy; both are written whatever the first write says.
          let ok: boolean;
          if (payload.length > 1 << 16) {
            out.write(frameHeader(type, id, payload.length));
            ok = out.write(payload);
          } else ok = out.write(encodeFrame(type, id, payload));
          if (ok) resolve();
          else out.once('drain', resolve);
        }),
    );
    this.writeChain = next.catch(() => undefined);
    return next;
  }

  private get r(): Repository {
    return this.repo!;
  }

  // -- calls -------------------------------------------------------------------------

  private async call(f: Frame): Promise<void> {
    const c = parseJson(f.payload, 'CALL');
    const op = str(c, 'op', 'CALL');
    const result = await this.op(op!, c, f.id);
    if (result !== undefined) await this.send(T.RESULT, f.id, json(result));
  }

  private async op(op: string, c: Record<string, unknown>, id: number): Promise<unknown> {
    const a = this.access;
    switch (op) {
      case 'list': {
        const name = str(c, 'name', 'list', true);
        const gens = await this.r.generations(name === undefined ? undefined : a.inner(name));
        return { generations: gens.filter((g) => a.owns(g.name)).map((g) => a.view(g)) };
      }
      case 'resolve':
        return { generation: a.view(await this.resolve(str(c, 'target', 'resolve')!)) };
      case 'open':
        return this.open(str(c, 'id', 'open')!);
      case 'close':
        await this.closeGen(str(c, 'id', 'close')!);
        return {};
      case 'extents': {
        const g = await this.opened.get(str(c, 'id', 'extents')!);
        if (!g) throw new GenvaultError('generation not open', 'PROTOCOL');
        const offset = num(c, 'offset', 'extents')!;
        const length = num(c, 'length', 'extents')!;
        if (offset + length > g.gen.size) throw new GenvaultError('extents beyond the end of the image', 'RANGE');
        return { runs: await g.reader.extents(offset, length, 4096) };
      }
      case 'forget': {
        a.require('full', 'forget');
        const g = await forgetGeneration(this.r, this.innerSpec(str(c, 'target', 'forget')!), { forceYoung: c.forceYoung === true });
        return { forgotten: a.view(g) };
      }
      case 'protect':
      case 'unprotect': {
        a.require('full', op);
        const res = await setProtected(this.r, this.innerSpec(str(c, 'target', op)!), op === 'protect');
        return { generation: a.view(res.gen), changed: res.changed };
      }
      case 'verify':
        return this.verify(strList(c, 'targets', 'verify'));
      case 'backup':
        a.require('append', 'backup');
        return this.backup(c, id);
      case 'parent-windows':
        a.require('append', op);
        return this.parents.windows(a.inner(str(c, 'name', op)!), num(c, 'from', op)!, num(c, 'count', op)!);
      default: {
        const r = await this.syncer.op(op, c);
        if (r === undefined) throw new GenvaultError(`unknown operation ${JSON.stringify(op).slice(0, 100)}`, 'PROTOCOL');
        return r;
      }
    }
  }

  private parentWindows: ParentWindows | null = null;

  /** A writer's change detection (parent-windows.ts): the latest generation of an image, with BLAKE3 digests. */
  private get parents(): ParentWindows {
    this.parentWindows ??= new ParentWindows(this.r.config.chunking.segment, async (name) => {
      if (this.r.config.version < 2) return null;
      const gen = (await this.r.generations(name)).at(-1);
      return gen ? { gen, map: await this.r.chunkMap(gen) } : null;
    });
    return this.parentWindows;
  }

  private syncServer: SyncServer | null = null;

  private get syncer(): SyncServer {
    this.syncServer ??= new SyncServer(this.r, this.access);
    return this.syncServer;
  }

  /** NAME@REV of the client, as the repository names it (checked: no other namespace). */
  private innerSpec(target: string): string {
    const { name, rev } = parseTarget(target);
    return `${this.access.inner(name)}@${rev}`;
  }

  private async resolve(target: string): Promise<Generation> {
    const { name, rev } = parseTarget(target);
    try {
      return await this.r.resolve(`${this.access.inner(name)}@${rev}`);
    } catch (e) {
      // Errors name the image as the client does.
      if (e instanceof GenvaultError) throw new GenvaultError(e.message.replaceAll(this.access.inner(name), name).replace(` in ${this.r.dir}`, ''), e.code);
      throw e;
    }
  }

  private async generationById(id: string): Promise<Generation> {
    if (!/^[0-9a-f]{16}$/.test(id)) throw new GenvaultError('malformed generation id', 'PROTOCOL');
    const g = (await this.r.generations()).find((x) => x.id === id && this.access.owns(x.name));
    if (!g) throw new GenvaultError(`no generation ${id}`, 'NOT_FOUND');
    return g;
  }

  private async open(id: string): Promise<unknown> {
    let p = this.opened.get(id);
    if (!p) {
      p = (async () => {
        const gen = await this.generationById(id);
        const pin = await Pin.take(this.r.dir, gen.id);
        try {
          this.loader ??= new ChunkLoader(this.r, 128 << 20);
          const reader = await ImageReader.open(this.r, gen, this.loader, 32 << 20);
          return { gen, pin, reader };
        } catch (e) {
          await pin.release();
          throw e;
        }
      })();
      this.opened.set(id, p);
      p.catch(() => this.opened.delete(id));
    }
    const g = await p;
    return { generation: this.access.view(g.gen) };
  }

  private async closeGen(id: string): Promise<void> {
    const p = this.opened.get(id);
    if (!p) return;
    this.opened.delete(id);
    await (await p).pin.release();
  }

  private async read(f: Frame): Promise<void> {
    const q = decodeRead(f.payload);
    const g = await this.opened.get(q.id);
    if (!g) throw new GenvaultError(`generation ${q.id} is not open`, 'PROTOCOL');
    if (q.offset >= g.gen.size) throw new GenvaultError('read beyond the end of the image', 'RANGE');
    const length = Math.min(q.length, g.gen.size - q.offset);
    const out = Buffer.allocUnsafe(length + 1);
    const body = out.subarray(1);
    const n = g.reader.tryRead(body, q.offset, length) ?? (await g.reader.read(body, q.offset, length));
    if (n !== length) throw new GenvaultError(`short read at ${q.offset}`, 'EIO');
    // A run of zeros (holes, mostly) crosses as one byte.
    if (isZero(body, 0, length)) {
      const z = Buffer.alloc(5);
      z[0] = 1;
      z.writeUInt32BE(length, 1);
      return this.send(T.DATA, f.id, z);
    }
    out[0] = 0;
    return this.send(T.DATA, f.id, out);
  }

  private async verify(targets: string[]): Promise<unknown> {
    const gens = targets.length
      ? await Promise.all(targets.map((t) => this.resolve(t)))
      : (await this.r.generations()).filter((g) => this.access.owns(g.name));
    const report: Array<{ generation: Generation; damaged: Array<{ offset: number; length: number }> }> = [];
    for (const g of gens) {
      const pin = await Pin.take(this.r.dir, g.id);
      try {
        const damaged = await streamChunks(this.r, g, { write: async () => undefined }, { ignoreDamage: true });
        report.push({ generation: this.access.view(g), damaged });
      } finally {
        await pin.release();
      }
    }
    return { generations: report };
  }

  // -- backup ------------------------------------------------------------------------

  private async backup(c: Record<string, unknown>, callId: number): Promise<unknown> {
    if (this.upload) throw new GenvaultError('a backup is already running in this session', 'PROTOCOL');
    const name = this.access.inner(str(c, 'name', 'backup')!);
    const size = c.size === null ? null : num(c, 'size', 'backup')!;
    // What the client says lands in records the admin's terminal shows: no control characters.
    const description = (str(c, 'source', 'backup') ?? '').slice(0, 512).replace(/[\p{Cc}\p{Cf}]/gu, '?');
    const tags = strList(c, 'tags', 'backup');
    if (tags.length > 32 || tags.some((t) => !TAG_RE.test(t))) throw new GenvaultError('invalid tags: at most 32, each 1-128 printable characters without spaces', 'USAGE');
    const up: Upload = { callId, segments: [], chunks: [], ended: false, aborted: false, wake: null };
    this.upload = up;
    try {
      const known = this.access.namespace ? await this.namespaceChunks() : null;
      const next = async (type: number): Promise<Frame | null> => {
        const q = type === T.SEGMENT ? up.segments : up.chunks;
        for (;;) {
          if (up.aborted) throw new GenvaultError('the client went away before the end of its source; nothing was committed', 'DISCONNECTED');
          if (q.length) {
            const f = q.shift()!;
            up.wake?.();
            return f;
          }
          if (up.ended) {
            if (type === T.SEGMENT) return null;
            throw new GenvaultError('the client ended the backup early', 'DISCONNECTED');
          }
          await new Promise<void>((r) => (up.wake = r));
        }
      };
      const source = new UploadSource(
        `${description} (via serve)`.trim(),
        size,
        this.r.config.chunking,
        this.r.keys,
        next as never,
        () => up.segments.length > 0,
        (seq, flags) => this.send(T.NEED, seq, flags),
        // Past its limit the set no longer answers: every chunk is then asked for (safe, slower).
        known ? (d) => known.whole && known.has(d) : null,
        (d) => known?.add(d),
        { group: groupSize(this.r.config), fast: this.r.config.version >= 2, adopt: (req) => this.r.pool.run(req) },
      );
      const gen = await backup(this.r, source, { name, tags, wait: c.wait === true });
      return { generation: this.access.view(gen) };
    } finally {
      this.upload = null;
    }
  }

  /** The chunks of the latest generation of each image of the namespace. */
  private async namespaceChunks(): Promise<DigestSet> {
    const set = new DigestSet(NAMESPACE_SET_LIMIT);
    const latest = new Map<string, Generation>();
    for (const g of await this.r.generations()) if (this.access.owns(g.name)) latest.set(g.name, g);
    for (const g of latest.values()) {
      for await (const ch of walkChunks(await this.r.chunkMap(g))) if (!ch.zero) set.add(Buffer.from(ch.digest));
    }
    return set;
  }

  /** A SEGMENT, CHUNKS or END frame for the backup under way; waits while it has queued plenty. */
  private async toUpload(f: Frame): Promise<void> {
    const up = this.upload;
    if (!up || up.ended) throw new ProtocolError('backup data outside a backup');
    if (f.type === T.END) {
      if (f.id !== up.callId) throw new ProtocolError('END for another backup');
      up.ended = true;
    } else (f.type === T.SEGMENT ? up.segments : up.chunks).push(f);
    const w = up.wake;
    up.wake = null;
    w?.();
    // Backpressure: stop reading the client while the pipeline is behind. Never while it
    // waits for a CHUNKS frame: only SEGMENT frames can come before it, and a client
    // describes at most WINDOW + 1 segments ahead of the CHUNKS it sends.
    while (this.upload === up && (up.segments.length > QUEUED_SEGMENTS || up.chunks.length > QUEUED_CHUNKS)) {
      await new Promise<void>((r) => (up.wake = r));
    }
  }

  private endUpload(): void {
    const up = this.upload;
    if (!up || up.ended) return;
    // The stream ended before END: the source fails, whatever it queued; nothing is committed.
    up.aborted = true;
    up.segments.length = 0;
    up.chunks.length = 0;
    up.wake?.();
  }

  private async close(): Promise<void> {
    await this.syncServer?.close();
    for (const id of [...this.opened.keys()]) await this.closeGen(id).catch(() => undefined);
    await this.repo?.close().catch(() => undefined);
  }
}

function messageOf(e: unknown): string {
  if (e instanceof GenvaultError || e instanceof ProtocolError) return e.message;
  if (errnoOf(e)) return innermostMessage(e);
  return e instanceof Error ? e.message : String(e);
}

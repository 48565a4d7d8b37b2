/**
 * A repository on another host, reached over SSH: `-r ssh://user@host/srv/gv`. The
 * connection runs `genvault serve` there (or whatever the key's forced command runs) and
 * speaks protocol.ts with it. The server does the repository's work; this side lists,
 * reads ranges of generations, and for a backup chunks and identifies the source here so
 * that only chunks the server asks for cross the network.
 */
import type { IdentityKeys } from '../format/crypto.js';
import { GenvaultError } from '../util/errors.js';
import { checkChunking, type ChunkingParams } from '../format/config.js';
import type { Generation } from '../format/generation.js';
import { openSshConnection } from '../source/ssh-command.js';
import { describeSpec, parseSshSpec, shq, type RemoteChannel, type SshConnection, type SshOptions } from '../source/ssh.js';
import { FrameReader, MAX_FRAME, ProtocolError, encodeFrame, frameHeader, type Frame } from './frames.js';
import { MAX_READ, PROTOCOL_VERSION, T, encodeRead, json, parseJson, type Permission } from './protocol.js';

export function isRemoteRepo(spec: string): boolean {
  return spec.startsWith('ssh://');
}

export interface RemoteOptions extends SshOptions {
  /** The command that starts the server on the far side (default `genvault serve`). */
  remoteCommand?: string;
  /** Bytes per second sent at most (--limit-rate); 0 or undefined: no limit. */
  limitRate?: number;
}

export interface Welcome {
  protocol: number;
  namespace: string | null;
  permissions: Permission;
  format: number;
  chunking: ChunkingParams;
  encrypted: boolean;
  /** fast: the keyed BLAKE3 key of change detection (absent from servers before it). */
  identity: { key: string; seed: [number, number]; fast?: string } | null;
  /** The repository's compression, when the server takes new chunks as records (CHUNKS coding 2). */
  records: { level: number; group: number } | null;
}

interface Waiter {
  resolve: (f: Frame) => void;
  reject: (e: Error) => void;
}

export class RemoteRepository {
  private waiters = new Map<number, Waiter>();
  private needs = new Map<number, Waiter>();
  private nextId = 1;
  private failure: Error | null = null;
  private stderr = '';
  welcome!: Welcome;
  /** Bytes sent and received in frames. */
  readonly traffic = { sent: 0, received: 0 };
  private limiter: RateLimiter | null;
  /** Resolves when the session failed: writers waiting for 'drain' stop waiting. */
  private readonly failed: Promise<void>;
  private drained: Promise<void> | null = null;
  private onFail!: () => void;

  private constructor(
    /** ssh://... as given, for messages. */
    readonly dir: string,
    private readonly conn: SshConnection,
    private readonly ch: RemoteChannel,
    limitRate: number | undefined,
  ) {
    this.limiter = limitRate ? new RateLimiter(limitRate) : null;
    this.failed = new Promise<void>((r) => (this.onFail = r));
  }

  static async open(url: string, opts: RemoteOptions = {}): Promise<RemoteRepository> {
    const spec = parseSshSpec(url);
    const conn = await openSshConnection(url, opts);
    const where = describeSpec(conn.spec);
    const command = opts.remoteCommand ?? process.env.GENVAULT_REMOTE_COMMAND ?? 'genvault';
    let ch: RemoteChannel;
    try {
      ch = await conn.exec(`${command} serve --repo ${shq(spec.path)}`);
    } catch (e) {
      conn.close();
      throw e;
    }
    const r = new RemoteRepository(where, conn, ch, opts.limitRate);
    try {
      await r.start(spec.path);
    } catch (e) {
      r.close();
      throw e;
    }
    return r;
  }

  private async start(path: string): Promise<void> {
    const frames = new FrameReader(this.ch);
    this.ch.stderr.on('data', (d: Buffer) => {
      if (this.stderr.length < 8192) this.stderr += d.toString();
    });
    this.conn.onLost((e) => frames.fail(e));
    const welcome = this.expect(0);
    void this.pump(frames);
    this.send(T.HELLO, 0, json({ protocol: PROTOCOL_VERSION, path }));
    const w = parseJson((await welcome).payload, 'WELCOME') as unknown as Welcome;
    if (w.protocol !== PROTOCOL_VERSION) throw new GenvaultError(`${this.dir}: the server speaks protocol ${String(w.protocol)}, this client ${PROTOCOL_VERSION}`, 'PROTOCOL');
    this.welcome = this.checkedWelcome(w);
  }

  /**
   * What the server says of its repository drives this side's chunking and buffers: the
   * chunking must be valid and its segments fit a frame, an identity key 32 bytes.
   */
  private checkedWelcome(w: Welcome): Welcome {
    const bad = (why: string) => new GenvaultError(`${this.dir}: the server's description of its repository is malformed: ${why}`, 'PROTOCOL');
    checkChunking(w.chunking as ChunkingParams & { algorithm?: string }, bad);
    if (w.chunking.segment > MAX_FRAME / 2) throw bad(`segments of ${w.chunking.segment} bytes`);
    if (w.chunking.block % 4) throw bad('"chunking.block" not a multiple of 4');
    const id = w.identity;
    if (id !== null && id !== undefined) {
      if (typeof id.key !== 'string' || !/^[0-9a-f]{64}$/.test(id.key)) throw bad('identity key');
      if (!Array.isArray(id.seed) || id.seed.length !== 2 || !id.seed.every((n) => Number.isInteger(n) && n >= -(2 ** 31) && n < 2 ** 31)) throw bad('chunker seed');
      if (id.fast !== undefined && (typeof id.fast !== 'string' || !/^[0-9a-f]{64}$/.test(id.fast))) throw bad('change detection key');
    }
    const r = w.records;
    if (r !== null && r !== undefined) {
      if (!Number.isInteger(r.level) || r.level < -131072 || r.level > 22) throw bad('compression level');
      if (!Number.isInteger(r.group) || r.group < 0 || r.group > 16 << 20) throw bad('group size');
    }
    return { ...w, encrypted: w.encrypted === true, identity: id ?? null, records: r ?? null };
  }

  /** Frames from the server to whoever waits for them, until the stream ends. */
  private async pump(frames: FrameReader): Promise<void> {
    try {
      for (;;) {
        const f = await frames.next();
        if (!f) break;
        this.traffic.received += f.payload.length + 9;
        if (f.type === T.FATAL) throw new GenvaultError(`${this.dir}: server: ${f.payload.toString('utf8').slice(0, 1000)}`, 'REMOTE');
        const map = f.type === T.NEED ? this.needs : this.waiters;
        const w = map.get(f.id);
        if (!w) throw new ProtocolError(`unexpected frame type ${f.type} id ${f.id} from the server`);
        map.delete(f.id);
        w.resolve(f);
      }
      this.fail(this.endError());
    } catch (e) {
      this.fail(e instanceof ProtocolError ? new GenvaultError(`${this.dir}: ${e.message}`, 'PROTOCOL') : (e as Error));
    }
  }

  private endError(): GenvaultError {
    const line = this.stderr.trim().split('\n').filter(Boolean).at(-1)?.replace(/^genvault: /, '');
    return new GenvaultError(`${this.dir}: connection closed by the server${line ? `: ${line}` : ''}`, 'DISCONNECTED');
  }

  private fail(e: Error): void {
    this.failure ??= e;
    this.onFail();
    for (const m of [this.waiters, this.needs]) {
      for (const w of m.values()) w.reject(this.failure);
      m.clear();
    }
  }

  /**
   * The answer to request `id`. Marked handled: a request whose send fails (the connection
   * is lost) never awaits it, and an unhandled rejection would end the process (a mount).
   */
  private expect(id: number, map = this.waiters): Promise<Frame> {
    const p = this.failure ? Promise.reject(this.failure) : new Promise<Frame>((resolve, reject) => map.set(id, { resolve, reject }));
    p.catch(() => undefined);
    return p;
  }

  /** Writes a frame; resolves when the channel takes more (flow control), after the rate limit. */
  /** Before a frame of `len` payload bytes is written: a failed session refuses it, the rate limit waits. */
  private async admit(len: number): Promise<void> {
    if (this.failure) throw this.failure;
    this.traffic.sent += len + 9;
    if (this.limiter) await this.limiter.take(len + 9);
  }

  private async send(type: number, id: number, payload: Buffer): Promise<void> {
    await this.admit(payload.length);
    // Large payloads follow their header without a copy; both are written whatever the first write says.
    let ok: boolean;
    if (payload.length > 1 << 16) {
      this.ch.write(frameHeader(type, id, payload.length));
      ok = this.ch.write(payload);
    } else ok = this.ch.write(encodeFrame(type, id, payload));
    if (!ok) {
      // One 'drain' listener, however many senders wait (requests stream concurrently).
      this.drained ??= new Promise<void>((r) =>
        this.ch.once('drain', () => {
          this.drained = null;
          r();
        }),
      );
      await Promise.race([this.drained, this.failed]);
    }
    if (this.failure) throw this.failure;
  }

  private answer(f: Frame): Frame {
    if (f.type === T.ERROR) {
      const e = parseJson(f.payload, 'ERROR');
      throw new GenvaultError(`${this.dir}: ${String(e.message).slice(0, 1000)}`, typeof e.code === 'string' ? e.code : 'REMOTE');
    }
    return f;
  }

  /** The JSON of a CALL's RESULT (its ERROR thrown). */
  private resultOf(f: Frame, op: string): Record<string, unknown> {
    const a = this.answer(f);
    if (a.type !== T.RESULT) throw new GenvaultError(`${this.dir}: unexpected answer to ${op}`, 'PROTOCOL');
    return parseJson(a.payload, op);
  }

  async call<R = Record<string, unknown>>(op: string, args: Record<string, unknown> = {}): Promise<R> {
    return this.resultOf(await this.request(T.CALL, json({ ...args, op })), op) as R;
  }

  async generations(name?: string): Promise<Generation[]> {
    return (await this.call<{ generations: Generation[] }>('list', name === undefined ? {} : { name })).generations;
  }

  async resolve(target: string): Promise<Generation> {
    return (await this.call<{ generation: Generation }>('resolve', { target })).generation;
  }

  /** Pins the generation on the server for reads (until closeGeneration or the end of the session). */
  async openGeneration(id: string): Promise<Generation> {
    return (await this.call<{ generation: Generation }>('open', { id })).generation;
  }

  async closeGeneration(id: string): Promise<void> {
    await this.call('close', { id });
  }

  /** A request and its answer (RESULT or DATA; an ERROR is thrown). */
  async request(type: number, payload: Buffer): Promise<Frame> {
    const id = this.nextId++;
    const p = this.expect(id);
    await this.send(type, id, payload);
    return this.answer(await p);
  }

  /** Bytes [offset, offset + length) of an open generation (length at most MAX_READ); null: all zeros. */
  async read(id: string, offset: number, length: number): Promise<Buffer | null> {
    if (length > MAX_READ) throw new RangeError('read too large');
    const f = await this.request(T.READ, encodeRead(id, offset, length));
    if (f.type !== T.DATA || f.payload.length < 1) throw new GenvaultError(`${this.dir}: unexpected answer to a read`, 'PROTOCOL');
    if (f.payload[0] === 1) {
      if (f.payload.length !== 5 || f.payload.readUInt32BE(1) !== length) throw new GenvaultError(`${this.dir}: malformed zero answer`, 'PROTOCOL');
      return null;
    }
    if (f.payload.length - 1 !== length) throw new GenvaultError(`${this.dir}: read answered with ${f.payload.length - 1} of ${length} bytes`, 'PROTOCOL');
    return f.payload.subarray(1);
  }

  /**
   * What a writer chunks and identifies with: the identity key and chunker seed the server
   * gave (encrypted), or nothing (SHA-256, unseeded).
   */
  writerKeys(): IdentityKeys | null {
    const id = this.welcome.identity;
    if (!this.welcome.encrypted) return null;
    if (!id) throw new GenvaultError(`${this.dir}: the server did not give the chunk identity key (read-only access?)`, 'EPERM');
    return { identity: Buffer.from(id.key, 'hex'), chunkSeed: id.seed, fast: id.fast === undefined ? undefined : Buffer.from(id.fast, 'hex') };
  }

  /**
   * Whether this side can detect unchanged chunks by BLAKE3 (parent-windows.ts): always
   * unencrypted, encrypted only when the server gave the keyed BLAKE3 key.
   */
  get canDetectChanges(): boolean {
    return !this.welcome.encrypted || this.welcome.identity?.fast !== undefined;
  }

  /** A backup's frames (see upload-client.ts). */
  async sendFrame(type: number, id: number, payload: Buffer): Promise<void> {
    await this.send(type, id, payload);
  }

  /**
   * A frame whose payload is `head` then `body`, `body` written without a copy; resolves
   * once the connection has taken it, after which the caller may reuse `body`'s memory.
   */
  async sendBorrowed(type: number, id: number, head: Buffer, body: Buffer): Promise<void> {
    const len = head.length + body.length;
    await this.admit(len);
    this.ch.write(Buffer.concat([frameHeader(type, id, len), head]));
    const taken = new Promise<void>((resolve, reject) => this.ch.write(body, (e?: Error | null) => (e ? reject(e) : resolve())));
    await Promise.race([taken, this.failed]);
    if (this.failure) throw this.failure;
  }

  /** The NEED frame answering segment `seq` of the backup under way. */
  need(seq: number): Promise<Frame> {
    return this.expect(seq, this.needs);
  }

  /** Starts a CALL whose answer comes later (a backup); returns its id and the answer. */
  async startCall(op: string, args: Record<string, unknown>): Promise<{ id: number; result: Promise<Record<string, unknown>> }> {
    const id = this.nextId++;
    const p = this.expect(id);
    await this.send(T.CALL, id, json({ ...args, op }));
    const result = p.then((f) => this.resultOf(f, op));
    result.catch(() => undefined);
    return { id, result };
  }

  get lost(): Error | null {
    return this.failure;
  }

  close(): void {
    this.failure ??= new GenvaultError(`${this.dir}: closed`, 'CLOSED');
    this.onFail();
    try {
      this.ch.end();
    } catch {
      // already gone
    }
    this.conn.close();
  }
}

/** A token bucket over bytes sent: --limit-rate. */
export class RateLimiter {
  private allowance: number;
  private last = Date.now();

  constructor(private readonly bytesPerSecond: number) {
    this.allowance = bytesPerSecond / 4;
  }

  async take(n: number): Promise<void> {
    for (;;) {
      const now = Date.now();
      this.allowance = Math.min(this.bytesPerSecond / 4, this.allowance + ((now - this.last) * this.bytesPerSecond) / 1000);
      this.last = now;
      if (this.allowance >= 0) {
        this.allowance -= n;
        return;
      }
      await new Promise((r) => setTimeout(r, Math.min(1000, Math.ceil((-this.allowance * 1000) / this.bytesPerSecond))));
    }
  }
}

/**
 * A small NBD client: what a backup needs to read a disk that qemu-nbd, QEMU's built-in
 * NBD server (libvirt's pull-mode backup) or nbdkit exports. Fixed newstyle handshake,
 * structured replies, meta contexts (base:allocation, qemu:dirty-bitmap:NAME), then READ
 * and BLOCK_STATUS, several requests in flight, replies matched by handle.
 *
 * The server is not trusted either: a reply that does not parse, names an unknown
 * handle or writes outside its request fails the connection with one line.
 */
import net from 'node:net';
import { GenvaultError } from '../util/errors.js';
import {
  ByteQueue, CMD, Cursor, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, INFO, MAX_OPTION_DATA, MAX_PAYLOAD,
  NBDMAGIC, NbdProtocolError, OPT, OPTION_REPLY_HEADER_BYTES, REP, REPLY, REPLY_FLAG_DONE,
  decodeBlockStatus, decodeOptionReplyHeader, decodeReplyHeader, encodeInfoRequest,
  encodeMetaContextRequest, encodeOption, encodeRequest, replyHeaderBytes,
} from './protocol.js';

export interface NbdAddress {
  socket?: string;
  host?: string;
  port?: number;
  export: string;
}

/** nbd://host[:port]/export, nbd+unix:///export?socket=PATH (the NBD URI spec's common forms). */
export function parseNbdUri(uri: string): NbdAddress {
  let u: URL;
  try {
    u = new URL(uri);
  } catch {
    throw new GenvaultError(`${uri}: not an NBD URI (nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)`, 'USAGE', 2);
  }
  const name = decodeURIComponent(u.pathname.replace(/^\//, ''));
  if (u.protocol === 'nbd+unix:') {
    const socket = u.searchParams.get('socket');
    if (!socket) throw new GenvaultError(`${uri}: nbd+unix:// needs ?socket=PATH`, 'USAGE', 2);
    return { socket, export: name };
  }
  if (u.protocol === 'nbd:') {
    if (!u.hostname) throw new GenvaultError(`${uri}: no host`, 'USAGE', 2);
    return { host: u.hostname.replace(/^\[|\]$/g, ''), port: u.port ? Number(u.port) : 10809, export: name };
  }
  throw new GenvaultError(`${uri}: only nbd:// and nbd+unix:// are supported (no TLS)`, 'USAGE', 2);
}

export function isNbdUri(s: string): boolean {
  return /^nbd(\+unix)?:\/\//.test(s);
}

const HANDSHAKE_MS = 60_000;

interface Pending {
  type: number;
  offset: number;
  length: number;
  buf: Buffer | null;
  /** READ: bytes of buf the reply chunks have written (data and holes); must reach length. */
  covered: number;
  status: Map<number, Array<{ length: number; flags: number }>>;
  error: { code: number; message: string } | null;
  resolve: () => void;
  reject: (e: Error) => void;
}

export class NbdClient {
  private q = new ByteQueue();
  /** What the reply loop waits for: n bytes, handed over as a Buffer or copied into `into`. */
  private waiter: { n: number; into: Buffer | null; resolve: (b: Buffer) => void; reject: (e: Error) => void } | null = null;
  private failure: Error | null = null;
  private pending = new Map<bigint, Pending>();
  private nextHandle = 1n;
  size = 0;
  flags = 0;
  structured = false;
  /** Meta contexts the server selected, by name. */
  readonly contexts = new Map<string, number>();

  private constructor(
    private sock: net.Socket,
    readonly what: string,
  ) {
    sock.on('data', (d: Buffer) => {
      this.q.push(d);
      this.wake();
    });
    sock.on('error', (e) => this.fail(new GenvaultError(`${what}: ${e.message}`, 'NBD')));
    sock.on('close', () => this.fail(new GenvaultError(`${what}: the NBD server closed the connection`, 'NBD')));
  }

  static async connect(addr: NbdAddress, what: string, contexts: string[] = []): Promise<NbdClient> {
    const sock = addr.socket ? net.createConnection(addr.socket) : net.createConnection(addr.port ?? 10809, addr.host);
    await new Promise<void>((resolve, reject) => {
      sock.once('connect', resolve);
      sock.once('error', (e) => reject(new GenvaultError(`cannot connect to ${what}: ${e.message}`, 'NBD')));
    });
    const c = new NbdClient(sock, what);
    // A server that accepts and then says nothing must not hang a nightly backup.
    const timer = setTimeout(() => c.fail(new GenvaultError(`${what}: no NBD handshake within ${HANDSHAKE_MS / 1000} s`, 'NBD')), HANDSHAKE_MS);
    try {
      await c.handshake(addr.export, contexts);
      clearTimeout(timer);
    } catch (e) {
      clearTimeout(timer);
      sock.destroy();
      if (e instanceof NbdProtocolError) throw new GenvaultError(`${what}: NBD protocol error in the handshake: ${e.message}`, 'NBD');
      throw e;
    }
    void c.replies();
    return c;
  }

  private fail(e: Error): void {
    if (this.failure) return;
    this.failure = e;
    this.sock.destroy();
    this.waiter?.reject(e);
    this.waiter = null;
    for (const p of this.pending.values()) p.reject(e);
    this.pending.clear();
  }

  private wake(): void {
    const w = this.waiter;
    if (w && this.q.length >= w.n) {
      this.waiter = null;
      if (w.into) {
        this.q.takeInto(w.into);
        w.resolve(w.into);
      } else w.resolve(this.q.take(w.n));
    }
  }

  /** The next n bytes from the server; with `into` (n bytes long), copied straight into it. */
  private bytes(n: number, into: Buffer | null = null): Promise<Buffer> {
    if (this.failure) return Promise.reject(this.failure);
    if (n === 0) return Promise.resolve(into ?? Buffer.alloc(0));
    return new Promise((resolve, reject) => {
      this.waiter = { n, into, resolve, reject };
      this.wake();
    });
  }

  private async optionReply(option: number): Promise<{ type: number; data: Buffer }> {
    const h = decodeOptionReplyHeader(await this.bytes(OPTION_REPLY_HEADER_BYTES));
    if (h.option !== option) throw new NbdProtocolError(`reply to option ${h.option}, expected ${option}`);
    if (h.length > MAX_OPTION_DATA) throw new NbdProtocolError(`option reply of ${h.length} bytes`);
    return { type: h.type, data: await this.bytes(h.length) };
  }

  private async handshake(name: string, contexts: string[]): Promise<void> {
    const hello = await this.bytes(18);
    if (hello.readBigUInt64BE(0) !== NBDMAGIC) throw new NbdProtocolError('not an NBD server');
    if (hello.readBigUInt64BE(8) !== IHAVEOPT) throw new NbdProtocolError('only newstyle NBD servers are supported');
    const serverFlags = hello.readUInt16BE(16);
    if (!(serverFlags & FLAG_FIXED_NEWSTYLE)) throw new NbdProtocolError('the server does not speak fixed newstyle');
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE(FLAG_FIXED_NEWSTYLE | (serverFlags & FLAG_NO_ZEROES));
    this.sock.write(flags);

    this.sock.write(encodeOption(OPT.STRUCTURED_REPLY));
    this.structured = (await this.optionReply(OPT.STRUCTURED_REPLY)).type === REP.ACK;
    if (this.structured && contexts.length) {
      this.sock.write(encodeOption(OPT.SET_META_CONTEXT, encodeMetaContextRequest(name, contexts)));
      for (;;) {
        const r = await this.optionReply(OPT.SET_META_CONTEXT);
        if (r.type === REP.META_CONTEXT && r.data.length >= 4) this.contexts.set(r.data.toString('utf8', 4), r.data.readUInt32BE(0));
        else break; // ACK, or an error: the contexts not selected are simply absent
      }
    }
    this.sock.write(encodeOption(OPT.GO, encodeInfoRequest(name, [INFO.BLOCK_SIZE])));
    for (;;) {
      const r = await this.optionReply(OPT.GO);
      if (r.type === REP.ACK) break;
      if (r.type === REP.INFO) {
        const c = new Cursor(r.data);
        if (c.u16() === INFO.EXPORT) {
          this.size = c.u64();
          this.flags = c.u16();
        }
      } else if (r.type >= 0x80000000) {
        const msg = r.data.toString('utf8').slice(0, 200);
        const why = r.type === REP.ERR_UNKNOWN ? 'no such export' : `refused (NBD error 0x${r.type.toString(16)})`;
        throw new GenvaultError(`${this.what}: export ${JSON.stringify(name)}: ${why}${msg ? `: ${msg}` : ''}`, 'NBD');
      }
    }
  }

  /** The reply loop: each chunk to its request, until the connection ends. */
  private async replies(): Promise<void> {
    try {
      for (;;) {
        const head4 = await this.bytes(4);
        const rest = await this.bytes(replyHeaderBytes(head4) - 4);
        const h = decodeReplyHeader(Buffer.concat([head4, rest]));
        const p = this.pending.get(h.handle.readBigUInt64BE(0));
        if (!p) throw new NbdProtocolError('reply to an unknown handle');
        if (!h.structured) await this.simple(p, h.error);
        else await this.chunk(p, h.type, h.length);
        if (h.flags & REPLY_FLAG_DONE) {
          // Still pending here, so that the failure of the connection reaches its caller.
          if (!p.error && p.type === CMD.READ && p.covered !== p.length) throw new NbdProtocolError(`a READ of ${p.length} bytes answered with ${p.covered}`);
          this.pending.delete(h.handle.readBigUInt64BE(0));
          if (p.error) p.reject(new GenvaultError(`${this.what}: NBD error ${p.error.code}${p.error.message ? ` (${p.error.message})` : ''} at offset ${p.offset}`, 'NBD'));
          else p.resolve();
        }
      }
    } catch (e) {
      this.fail(e instanceof NbdProtocolError ? new GenvaultError(`${this.what}: NBD protocol error: ${e.message}`, 'NBD') : (e as Error));
    }
  }

  private async simple(p: Pending, error: number): Promise<void> {
    if (error) p.error = { code: error, message: '' };
    else if (p.type === CMD.READ) {
      await this.bytes(p.length, p.buf!);
      p.covered = p.length;
    }
  }

  private async chunk(p: Pending, type: number, length: number): Promise<void> {
    if (length > MAX_PAYLOAD + 8 + 4096) throw new NbdProtocolError(`reply chunk of ${length} bytes`);
    if (type === REPLY.OFFSET_DATA && p.type === CMD.READ && length >= 8) {
      // Data goes straight from the socket's buffers into the request's: no copy between.
      const off = new Cursor(await this.bytes(8)).u64() - p.offset;
      const n = length - 8;
      if (off < 0 || off + n > p.length) throw new NbdProtocolError('data outside the request');
      await this.bytes(n, p.buf!.subarray(off, off + n));
      p.covered += n;
      return;
    }
    const body = await this.bytes(length);
    const c = new Cursor(body);
    switch (type) {
      case REPLY.NONE:
        return;
      case REPLY.OFFSET_DATA: // a READ's data went above; here it is short of its offset, or answers no READ
        throw new NbdProtocolError(p.type === CMD.READ ? 'a data chunk without its offset' : 'data outside the request');
      case REPLY.OFFSET_HOLE: {
        const off = c.u64() - p.offset;
        const n = c.u32();
        if (p.type !== CMD.READ || off < 0 || off + n > p.length) throw new NbdProtocolError('hole outside the request');
        p.buf!.fill(0, off, off + n);
        p.covered += n;
        return;
      }
      case REPLY.BLOCK_STATUS: {
        const s = decodeBlockStatus(body);
        p.status.set(s.contextId, s.extents);
        return;
      }
      default:
        if (type & 0x8000) {
          const code = c.u32();
          const n = c.u16();
          p.error = { code, message: c.bytes(Math.min(n, body.length - 6)).toString('utf8') };
          return;
        }
        throw new NbdProtocolError(`unknown reply chunk type ${type}`);
    }
  }

  private request(type: number, offset: number, length: number, flags = 0, into: Buffer | null = null): Promise<Pending> {
    if (this.failure) return Promise.reject(this.failure);
    const handle = this.nextHandle++;
    const hb = Buffer.alloc(8);
    hb.writeBigUInt64BE(handle);
    return new Promise((resolve, reject) => {
      const p: Pending = {
        type, offset, length, buf: type === CMD.READ ? (into ?? Buffer.allocUnsafe(length)) : null, covered: 0, status: new Map(), error: null,
        resolve: () => resolve(p), reject,
      };
      this.pending.set(handle, p);
      this.sock.write(encodeRequest({ flags, type, handle: hb, offset, length }));
    });
  }

  /**
   * `length` bytes at `offset` (at most MAX_PAYLOAD), into `into` when given (which must
   * be `length` bytes long, and is written whole or the read fails).
   */
  async read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    if (into && into.length !== length) throw new RangeError(`NBD read of ${length} bytes into a buffer of ${into.length}`);
    return (await this.request(CMD.READ, offset, length, 0, into ?? null)).buf!;
  }

  /**
   * Status runs of one meta context from `offset`: they cover at least some bytes and at
   * most `length` (clipped); the caller asks again from where they end.
   */
  async blockStatus(context: string, offset: number, length: number): Promise<Array<{ length: number; flags: number }>> {
    const id = this.contexts.get(context);
    if (id === undefined) throw new GenvaultError(`${this.what}: meta context ${context} was not negotiated`, 'NBD');
    const p = await this.request(CMD.BLOCK_STATUS, offset, Math.min(length, 0xffffffff), 0);
    const runs = p.status.get(id);
    if (!runs?.length) throw new GenvaultError(`${this.what}: no block status for ${context} at offset ${offset}`, 'NBD');
    const out: Array<{ length: number; flags: number }> = [];
    let left = length;
    for (const r of runs) {
      if (left <= 0) break;
      if (r.length === 0) throw new GenvaultError(`${this.what}: empty extent in block status`, 'NBD');
      const n = Math.min(r.length, left);
      out.push({ length: n, flags: r.flags });
      left -= n;
    }
    return out;
  }

  /** Say goodbye (NBD_CMD_DISC) and close. */
  async close(): Promise<void> {
    if (!this.failure && !this.sock.destroyed) {
      const hb = Buffer.alloc(8);
      this.sock.write(encodeRequest({ flags: 0, type: CMD.DISC, handle: hb, offset: 0, length: 0 }));
      this.failure = new GenvaultError(`${this.what}: closed`, 'NBD');
      await new Promise<void>((r) => this.sock.end(() => r()));
    }
    this.sock.destroy();
  }
}

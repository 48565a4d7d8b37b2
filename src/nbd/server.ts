/**
 * An NBD server: listens on a unix socket or a TCP address and serves a set of exports
 * (export.ts) to any number of clients at once. One Connection per client, a small state
 * machine fed by the socket: the fixed newstyle handshake, options until GO or
 * EXPORT_NAME, then requests, answered as soon as each is done (in any order, as NBD
 * allows; the client matches replies by handle).
 *
 * A client is not trusted: a frame that does not parse, a WRITE larger than MAX_PAYLOAD,
 * option data larger than MAX_OPTION_DATA, or a handshake that takes too long closes
 * that connection only; a request out of range or too large gets an NBD error. Memory is
 * bounded per connection: the socket stops being read while the requests in flight ask
 * for more than MAX_INFLIGHT bytes or the replies not yet sent exceed it.
 */
import net from 'node:net';
import fs from 'node:fs/promises';
import { GenvaultError } from '../util/errors.js';
import type { ExportConnection, NbdExport } from './export.js';
import {
  BASE_ALLOCATION, ByteQueue, CMD, CMD_FLAG, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, INFO, MAX_OPTION_DATA, MAX_PAYLOAD,
  NBD_ERR, NbdProtocolError, OPT, OPTION_HEADER_BYTES, REP, REPLY, REPLY_FLAG_DONE, REQUEST_BYTES, STATE_HOLE, STATE_ZERO,
  TFLAG, blockStatusChunk, decodeInfoRequest, decodeMetaContextRequest, decodeOptionHeader, decodeRequest,
  encodeOptionReply, exportNameReply, infoBlockSize, infoDescription, infoExport, infoName, repMetaContext, repServer,
  serverGreeting, simpleReply, structuredError, structuredHeader, type Request,
} from './protocol.js';

/** Bytes of requests in flight (reads asked for, writes received) and unsent replies before the socket is paused. */
const MAX_INFLIGHT = 64 << 20;
/** A client must finish the handshake within this time. */
const HANDSHAKE_MS = 30_000;
/** Connections served at once; more are closed at once (each may hold up to MAX_INFLIGHT). */
const MAX_CONNECTIONS = 64;
/** Most extents in one block status reply. */
const MAX_EXTENTS = 1024;
const BASE_ALLOCATION_ID = 1;

export interface ServerOptions {
  log?: (line: string) => void;
}

export class NbdServer {
  readonly exports = new Map<string, NbdExport>();
  private servers: net.Server[] = [];
  private conns = new Set<Connection>();
  readonly log: (line: string) => void;

  constructor(opts: ServerOptions = {}) {
    this.log = opts.log ?? ((l) => process.stderr.write(l + '\n'));
  }

  /** Serve `exp` under `name` ('' is the default export). */
  add(name: string, exp: NbdExport): void {
    this.exports.set(name, exp);
  }

  /** Listen on a unix socket path (an existing socket there is replaced) or a TCP host:port. */
  async listen(where: { socket: string } | { host: string; port: number }): Promise<string> {
    const server = net.createServer((sock) => this.accept(sock));
    const what = 'socket' in where ? where.socket : `${where.host}:${where.port}`;
    const listening = new Promise<void>((resolve, reject) => {
      server.once('error', (e: NodeJS.ErrnoException) => {
        const why = e.code === 'EADDRINUSE' ? ('socket' in where ? 'a file that is not a socket is there' : 'the address is in use') : e.message;
        reject(new GenvaultError(`cannot listen on ${what}: ${why}`, 'LISTEN'));
      });
      server.once('listening', () => resolve());
    });
    if ('socket' in where) {
      const st = await fs.lstat(where.socket).catch(() => null);
      if (st?.isSocket()) await fs.rm(where.socket, { force: true });
      server.listen(where.socket);
    } else server.listen(where.port, where.host);
    await listening;
    server.on('error', (e) => this.log(`genvault nbd: ${e.message}`));
    this.servers.push(server);
    if ('socket' in where) {
      await fs.chmod(where.socket, 0o600);
      return where.socket;
    }
    const a = server.address() as net.AddressInfo;
    return `${a.address}:${a.port}`;
  }

  private accept(sock: net.Socket): void {
    if (this.conns.size >= MAX_CONNECTIONS) {
      this.log(`genvault nbd: refusing a connection: ${MAX_CONNECTIONS} already open`);
      sock.destroy();
      return;
    }
    const c = new Connection(this, sock);
    this.conns.add(c);
    sock.on('close', () => this.conns.delete(c));
  }

  get connections(): number {
    return this.conns.size;
  }

  /** Stop listening, close every connection and wait for their open exports to be released. */
  async close(): Promise<void> {
    // net.Server.close() completes only once every connection is gone: destroy them first.
    const listening = this.servers.map((s) => new Promise<void>((r) => s.close(() => r())));
    const conns = [...this.conns];
    for (const c of conns) c.destroy();
    await Promise.all([...listening, ...conns.map((c) => c.finished)]);
  }
}

type Phase = 'flags' | 'options' | 'busy' | 'transmission' | 'closed';

class Connection {
  private q = new ByteQueue();
  private phase: Phase = 'flags';
  private noZeroes = false;
  private structured = false;
  /** Meta contexts selected by SET_META_CONTEXT, for the export they were set for. */
  private contexts: { name: string; base: boolean } | null = null;
  private exp: NbdExport | null = null;
  private ec: ExportConnection | null = null;
  private inflight = 0;
  private inflightBytes = 0;
  private paused = false;
  private disconnecting = false;
  private timer: NodeJS.Timeout;
  private finish!: () => void;
  readonly finished = new Promise<void>((r) => (this.finish = r));

  constructor(
    private server: NbdServer,
    private sock: net.Socket,
  ) {
    sock.setNoDelay?.(true);
    sock.on('data', (d: Buffer) => {
      this.q.push(d);
      this.pump();
    });
    sock.on('error', () => undefined); // a reset by the peer ends this connection only ('close' follows)
    sock.on('close', () => this.closed());
    sock.on('drain', () => this.throttle());
    this.timer = setTimeout(() => {
      if (this.phase !== 'transmission') this.drop('handshake not finished in time');
    }, HANDSHAKE_MS);
    this.timer.unref();
    sock.write(serverGreeting());
  }

  destroy(): void {
    this.sock.destroy();
  }

  private closed(): void {
    this.phase = 'closed';
    clearTimeout(this.timer);
    this.maybeRelease();
  }

  /** Once closed and nothing is in flight: release the export's per-connection state. */
  private maybeRelease(): void {
    if (this.phase !== 'closed' || this.inflight > 0) return;
    const ec = this.ec;
    this.ec = null;
    void Promise.resolve(ec?.close()).catch(() => undefined).then(() => this.finish());
  }

  /** Close this connection for a protocol violation (logged, the other clients go on). */
  private drop(why: string): void {
    if (this.phase === 'closed') return;
    this.server.log(`genvault nbd: closing a connection: ${why}`);
    this.phase = 'closed';
    this.sock.destroy();
  }

  private send(b: Buffer): void {
    if (!this.sock.destroyed) this.sock.write(b);
  }

  private pump(): void {
    try {
      for (;;) {
        if (this.phase === 'flags') {
          if (this.q.length < 4) return;
          const flags = this.q.take(4).readUInt32BE(0);
          if (flags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)) return this.drop('unknown client flags');
          this.noZeroes = (flags & FLAG_NO_ZEROES) !== 0;
          this.phase = 'options';
        } else if (this.phase === 'options') {
          // Replies a client does not read stop the reading of its options, as of its requests.
          this.throttle();
          if (this.paused || this.q.length < OPTION_HEADER_BYTES) return;
          const h = decodeOptionHeader(this.q.peek(OPTION_HEADER_BYTES));
          if (h.length > MAX_OPTION_DATA) return this.drop(`option data of ${h.length} bytes`);
          if (this.q.length < OPTION_HEADER_BYTES + h.length) return;
          this.q.take(OPTION_HEADER_BYTES);
          this.option(h.option, this.q.take(h.length));
        } else if (this.phase === 'transmission') {
          if (this.paused || this.disconnecting || this.q.length < REQUEST_BYTES) return;
          const r = decodeRequest(this.q.peek(REQUEST_BYTES));
          if (r.type === CMD.WRITE) {
            if (r.length > MAX_PAYLOAD) return this.drop(`a WRITE of ${r.length} bytes`);
            if (this.q.length < REQUEST_BYTES + r.length) return;
          }
          this.q.take(REQUEST_BYTES);
          this.request(r, r.type === CMD.WRITE ? Buffer.from(this.q.take(r.length)) : null);
        } else return;
      }
    } catch (e) {
      // Whatever a client's bytes make go wrong costs that client's connection, never the server.
      this.drop(e instanceof NbdProtocolError ? e.message : `internal error: ${(e as Error).message}`);
    }
  }

  private optReply(option: number, type: number, data?: Buffer): void {
    this.send(encodeOptionReply(option, type, data));
  }

  /** One option of the handshake, with its data. */
  private option(option: number, data: Buffer): void {
    switch (option) {
      case OPT.EXPORT_NAME:
        return this.exportName(data.toString('utf8'));
      case OPT.ABORT:
        this.optReply(option, REP.ACK);
        this.sock.end();
        this.phase = 'closed';
        return;
      case OPT.LIST:
        if (data.length) return this.optReply(option, REP.ERR_INVALID);
        for (const [name, exp] of this.server.exports) {
          this.optReply(option, REP.SERVER, Buffer.concat([repServer(name), Buffer.from(exp.description, 'utf8')]));
        }
        return this.optReply(option, REP.ACK);
      case OPT.STRUCTURED_REPLY:
        if (data.length) return this.optReply(option, REP.ERR_INVALID);
        this.structured = true;
        return this.optReply(option, REP.ACK);
      case OPT.LIST_META_CONTEXT:
      case OPT.SET_META_CONTEXT:
        return this.metaContext(option, data);
      case OPT.INFO:
      case OPT.GO:
        return this.infoOrGo(option, data);
      default:
        return this.optReply(option, REP.ERR_UNSUP);
    }
  }

  private metaContext(option: number, data: Buffer): void {
    const set = option === OPT.SET_META_CONTEXT;
    if (!this.structured) return this.optReply(option, REP.ERR_INVALID);
    const { name, queries } = decodeMetaContextRequest(data);
    if (!this.server.exports.has(name)) return this.optReply(option, REP.ERR_UNKNOWN);
    // With no query, LIST lists every context; SET selects none. 'base:' lists the base: namespace.
    const base = queries.some((q) => q === BASE_ALLOCATION || (!set && q === 'base:')) || (!set && queries.length === 0);
    if (base) this.optReply(option, REP.META_CONTEXT, repMetaContext(set ? BASE_ALLOCATION_ID : 0, BASE_ALLOCATION));
    if (set) this.contexts = { name, base };
    this.optReply(option, REP.ACK);
  }

  private flagsOf(exp: NbdExport): number {
    let f = TFLAG.HAS_FLAGS | TFLAG.SEND_FLUSH | TFLAG.CAN_MULTI_CONN;
    if (exp.writable) f |= TFLAG.SEND_FUA | TFLAG.SEND_TRIM | TFLAG.SEND_WRITE_ZEROES;
    else f |= TFLAG.READ_ONLY;
    return f;
  }

  private infoOrGo(option: number, data: Buffer): void {
    const { name, infos } = decodeInfoRequest(data);
    const exp = this.server.exports.get(name);
    if (!exp) return this.optReply(option, REP.ERR_UNKNOWN);
    this.optReply(option, REP.INFO, infoExport(exp.size, this.flagsOf(exp)));
    if (infos.includes(INFO.NAME)) this.optReply(option, REP.INFO, infoName(exp.canonicalName));
    if (infos.includes(INFO.DESCRIPTION)) this.optReply(option, REP.INFO, infoDescription(exp.description));
    this.optReply(option, REP.INFO, infoBlockSize(1, 4096, MAX_PAYLOAD));
    if (option === OPT.INFO) return this.optReply(option, REP.ACK);
    if (this.contexts && this.contexts.name !== name) this.contexts = null;
    this.begin(exp, () => this.optReply(option, REP.ACK), () => this.optReply(option, REP.ERR_PLATFORM));
  }

  private exportName(name: string): void {
    const exp = this.server.exports.get(name);
    if (!exp) return this.drop(`unknown export ${JSON.stringify(name.slice(0, 100))}`);
    this.contexts = null; // EXPORT_NAME cannot carry structured replies' meta contexts to a reply
    this.structured = false;
    this.begin(exp, () => this.send(exportNameReply(exp.size, this.flagsOf(exp), this.noZeroes)), () => this.drop('export cannot be opened'));
  }

  /** Open the export for this connection, then start transmission. */
  private begin(exp: NbdExport, ok: () => void, failed: () => void): void {
    this.phase = 'busy';
    // Nothing is read while the export opens: a client cannot queue data meanwhile.
    this.paused = true;
    this.sock.pause();
    const resume = () => {
      this.paused = false;
      this.sock.resume();
      this.throttle();
    };
    exp.open().then(
      (ec) => {
        resume();
        if (this.phase === 'closed') {
          void ec.close();
          return this.maybeRelease();
        }
        this.exp = exp;
        this.ec = ec;
        ok();
        clearTimeout(this.timer);
        this.phase = 'transmission';
        this.pump();
      },
      (e: Error) => {
        resume();
        this.server.log(`genvault nbd: cannot open export ${exp.canonicalName}: ${e.message}`);
        if (this.phase === 'closed') return this.maybeRelease();
        failed();
        if (this.phase === 'busy') this.phase = 'options';
        this.pump();
      },
    );
  }

  /** Pause reading while too much is in flight; resume when it drained. */
  private throttle(): void {
    const over = this.inflightBytes + this.sock.writableLength > MAX_INFLIGHT;
    if (over && !this.paused) {
      this.paused = true;
      this.sock.pause();
    } else if (!over && this.paused) {
      this.paused = false;
      this.sock.resume();
      this.pump();
    }
  }

  private request(r: Request, payload: Buffer | null): void {
    const cost = r.type === CMD.READ ? Math.min(r.length, MAX_PAYLOAD) : (payload?.length ?? 0);
    if (r.type === CMD.DISC) {
      this.disconnecting = true;
      if (this.inflight === 0) this.sock.end();
      return;
    }
    this.inflight++;
    this.inflightBytes += cost;
    this.throttle();
    this.serve(r, payload)
      .catch((e: Error) => {
        this.server.log(`genvault nbd: ${this.exp?.canonicalName}: request ${r.type} at ${r.offset}+${r.length}: ${e.message}`);
        this.error(r, NBD_ERR.EIO, e.message);
      })
      .finally(() => {
        this.inflight--;
        this.inflightBytes -= cost;
        if (this.phase === 'closed') return this.maybeRelease();
        if (this.disconnecting && this.inflight === 0) this.sock.end();
        this.throttle();
      });
  }

  private error(r: Request, err: number, message = ''): void {
    if (this.structured && (r.type === CMD.READ || r.type === CMD.BLOCK_STATUS)) this.send(structuredError(r.handle, err, message));
    else this.send(simpleReply(r.handle, err));
  }

  private ok(r: Request): void {
    this.send(simpleReply(r.handle, 0));
  }

  /** Checks a request's range; answers the error and returns false when it is bad. */
  private inRange(r: Request, pastEnd: number): boolean {
    const size = this.exp!.size;
    if (r.offset > size || r.length > size - r.offset) {
      this.error(r, pastEnd, `request past the end of the ${size}-byte export`);
      return false;
    }
    return true;
  }

  private async serve(r: Request, payload: Buffer | null): Promise<void> {
    const ec = this.ec!;
    const writable = this.exp!.writable;
    switch (r.type) {
      case CMD.READ:
        if (r.length > MAX_PAYLOAD) return this.error(r, NBD_ERR.EINVAL, `read of more than ${MAX_PAYLOAD} bytes`);
        if (!this.inRange(r, NBD_ERR.EINVAL)) return;
        return this.read(r, ec);
      case CMD.WRITE:
        if (!writable) return this.error(r, NBD_ERR.EPERM);
        if (!this.inRange(r, NBD_ERR.ENOSPC)) return;
        if (r.length) await ec.write!(payload!, r.offset, (r.flags & CMD_FLAG.FUA) !== 0);
        return this.ok(r);
      case CMD.TRIM:
      case CMD.WRITE_ZEROES:
        if (!writable) return this.error(r, NBD_ERR.EPERM);
        if (!this.inRange(r, NBD_ERR.ENOSPC)) return;
        if (r.length) await ec.zero!(r.offset, r.length, (r.flags & CMD_FLAG.FUA) !== 0);
        return this.ok(r);
      case CMD.FLUSH:
        await ec.flush?.();
        return this.ok(r);
      case CMD.CACHE:
        return this.ok(r);
      case CMD.BLOCK_STATUS:
        return this.blockStatus(r, ec);
      default:
        return this.error(r, NBD_ERR.EINVAL, 'unknown command');
    }
  }

  private async read(r: Request, ec: ExportConnection): Promise<void> {
    const data = Buffer.allocUnsafe(r.length);
    if (r.length) await ec.read(data, r.offset, r.length);
    if (this.phase === 'closed') return;
    if (!this.structured) {
      this.send(simpleReply(r.handle, 0));
      this.send(data);
      return;
    }
    const off = Buffer.alloc(8);
    off.writeBigUInt64BE(BigInt(r.offset));
    this.send(structuredHeader(r.handle, REPLY_FLAG_DONE, REPLY.OFFSET_DATA, 8 + data.length));
    this.send(off);
    this.send(data);
  }

  private async blockStatus(r: Request, ec: ExportConnection): Promise<void> {
    const ctx = this.contexts;
    if (!this.structured || !ctx?.base) return this.error(r, NBD_ERR.EINVAL, 'no meta context negotiated');
    if (r.length === 0) return this.error(r, NBD_ERR.EINVAL, 'zero length');
    if (!this.inRange(r, NBD_ERR.EINVAL)) return;
    const runs = await ec.extents(r.offset, r.length, r.flags & CMD_FLAG.REQ_ONE ? 1 : MAX_EXTENTS);
    const extents = runs.map((x) => ({ length: x.length, flags: x.zero ? STATE_HOLE | STATE_ZERO : 0 }));
    if (!extents.length) return this.error(r, NBD_ERR.EIO, 'no extents');
    if (this.phase !== 'closed') this.send(blockStatusChunk(r.handle, true, BASE_ALLOCATION_ID, extents));
  }
}

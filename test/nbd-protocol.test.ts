/**
 * The NBD protocol (src/nbd/protocol.ts) both ways, and genvault's NBD server and client
 * talking to each other in this process over a unix socket, with an in-memory export:
 * handshake, reads, block status, writes, errors, and a peer that sends garbage.
 */
import net from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  ByteQueue, CMD, IHAVEOPT, NBDMAGIC, NBD_ERR, NbdProtocolError, OPT, REP, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
  decodeBlockStatus, decodeInfoRequest, decodeMetaContextRequest, decodeOptionHeader, decodeRequest, encodeInfoRequest,
  encodeMetaContextRequest, encodeOption, encodeRequest, blockStatusChunk, decodeReplyHeader, structuredError, simpleReply,
  REPLY, REPLY_FLAG_DONE, encodeOptionReply, infoExport, serverGreeting, structuredHeader,
} from '../src/nbd/protocol.js';
import { NbdServer } from '../src/nbd/server.js';
import { NbdClient, parseNbdUri } from '../src/nbd/client.js';
import type { ExportConnection, NbdExport } from '../src/nbd/export.js';
import { Scratch, prng } from './helpers.js';

/** An export over a buffer: zero 4 KiB blocks are holes. */
function memoryExport(data: Buffer, writable: boolean): NbdExport {
  const conn: ExportConnection = {
    read: async (out, offset, length) => void data.copy(out, 0, offset, offset + length),
    extents: async (offset, length, maxRuns) => {
      const out: Array<{ length: number; zero: boolean }> = [];
      for (let p = offset; p < offset + length; ) {
        const n = Math.min(4096 - (p % 4096), offset + length - p);
        const zero = data.subarray(p, p + n).every((b) => b === 0);
        const last = out[out.length - 1];
        if (last && last.zero === zero) last.length += n;
        else if (out.length >= maxRuns) break;
        else out.push({ length: n, zero });
        p += n;
      }
      return out;
    },
    write: async (d, offset) => void d.copy(data, offset),
    zero: async (offset, length) => void data.fill(0, offset, offset + length),
    flush: async () => undefined,
    close: () => undefined,
  };
  return { canonicalName: 'mem.img', description: 'memory', size: data.length, writable, open: async () => conn };
}

let s: Scratch;
let server: NbdServer;
let sock: string;
const image = Buffer.concat([prng(1, 64 << 10), Buffer.alloc(128 << 10), prng(2, 64 << 10)]);
const rw = Buffer.alloc(256 << 10);

beforeAll(async () => {
  s = await Scratch.create('genvault-nbdproto-');
  server = new NbdServer({ log: () => undefined });
  server.add('', memoryExport(image, false));
  server.add('rw', memoryExport(rw, true));
  sock = await server.listen({ socket: s.path('nbd.sock') });
});

afterAll(async () => {
  await server?.close();
  await s?.cleanup();
});

describe('encoding', () => {
  it('requests round-trip; a bad magic or a short frame is a protocol error', () => {
    const handle = Buffer.from('01234567');
    const b = encodeRequest({ flags: 8, type: CMD.BLOCK_STATUS, handle, offset: 2 ** 40 + 3, length: 65536 });
    expect(b.readUInt32BE(0)).toBe(REQUEST_MAGIC);
    expect(decodeRequest(b)).toEqual({ flags: 8, type: CMD.BLOCK_STATUS, handle, offset: 2 ** 40 + 3, length: 65536 });
    const bad = Buffer.from(b);
    bad[0] ^= 1;
    expect(() => decodeRequest(bad)).toThrow(NbdProtocolError);
    expect(() => decodeRequest(b.subarray(0, 27))).toThrow(NbdProtocolError);
    // An offset beyond 2^53 stays out of range instead of wrapping.
    const far = Buffer.from(b);
    far.writeBigUInt64BE(0xffffffffffffffffn, 16);
    expect(decodeRequest(far).offset).toBe(Number.MAX_SAFE_INTEGER);
  });

  it('options and their data round-trip; truncated data is refused', () => {
    const o = encodeOption(OPT.GO, encodeInfoRequest('vm1.img', [3, 1]));
    expect(o.readBigUInt64BE(0)).toBe(IHAVEOPT);
    expect(decodeOptionHeader(o)).toEqual({ option: OPT.GO, length: o.length - 16 });
    expect(decodeInfoRequest(o.subarray(16))).toEqual({ name: 'vm1.img', infos: [3, 1] });
    expect(() => decodeInfoRequest(o.subarray(16, o.length - 1))).toThrow(NbdProtocolError);
    const m = encodeMetaContextRequest('', ['base:allocation', 'qemu:dirty-bitmap:b0']);
    expect(decodeMetaContextRequest(m)).toEqual({ name: '', queries: ['base:allocation', 'qemu:dirty-bitmap:b0'] });
    const huge = Buffer.from(m);
    huge.writeUInt32BE(0xffffffff, 0); // a name length far past the data
    expect(() => decodeMetaContextRequest(huge)).toThrow(NbdProtocolError);
  });

  it('replies: simple, structured error, block status', () => {
    const h = Buffer.from('abcdefgh');
    expect(decodeReplyHeader(simpleReply(h, NBD_ERR.EPERM))).toMatchObject({ structured: false, error: 1, handle: h });
    const e = structuredError(h, NBD_ERR.EINVAL, 'no');
    expect(decodeReplyHeader(e)).toMatchObject({ structured: true, type: 0x8001, flags: 1, length: 8 });
    const bs = blockStatusChunk(h, true, 7, [{ length: 4096, flags: 3 }, { length: 512, flags: 0 }]);
    expect(decodeBlockStatus(bs.subarray(20))).toEqual({ contextId: 7, extents: [{ length: 4096, flags: 3 }, { length: 512, flags: 0 }] });
    expect(() => decodeBlockStatus(bs.subarray(20, bs.length - 3))).toThrow(NbdProtocolError);
  });

  it('ByteQueue hands out bytes across the buffers they arrived in', () => {
    const q = new ByteQueue();
    q.push(Buffer.from('abc'));
    q.push(Buffer.from('defg'));
    q.push(Buffer.from('h'));
    expect(q.peek(4).toString()).toBe('abcd');
    expect(q.take(2).toString()).toBe('ab');
    expect(q.take(5).toString()).toBe('cdefg');
    expect(q.length).toBe(1);
    expect(() => q.take(2)).toThrow(RangeError);
  });

  it('NBD URIs', () => {
    expect(parseNbdUri('nbd+unix:///vda?socket=/run/x.sock')).toEqual({ socket: '/run/x.sock', export: 'vda' });
    expect(parseNbdUri('nbd://127.0.0.1:10810/')).toEqual({ host: '127.0.0.1', port: 10810, export: '' });
    expect(parseNbdUri('nbd://[::1]/e')).toEqual({ host: '::1', port: 10809, export: 'e' });
    expect(() => parseNbdUri('nbds://h/')).toThrow(/only nbd/);
    expect(() => parseNbdUri('nbd+unix:///')).toThrow(/socket/);
  });
});

describe('server and client in process', () => {
  it('reads, and answers block status with the zero blocks as holes', async () => {
    const c = await NbdClient.connect({ socket: sock, export: '' }, 'test', ['base:allocation']);
    try {
      expect(c.size).toBe(image.length);
      expect(c.structured).toBe(true);
      expect((await c.read(1000, 200_000)).equals(image.subarray(1000, 201_000))).toBe(true);
      const runs = await c.blockStatus('base:allocation', 0, image.length);
      expect(runs).toEqual([
        { length: 64 << 10, flags: 0 },
        { length: 128 << 10, flags: 3 },
        { length: 64 << 10, flags: 0 },
      ]);
      await expect(c.read(image.length - 10, 20)).rejects.toThrow(/NBD error 22/);
      // The connection survives an error reply.
      expect((await c.read(0, 10)).equals(image.subarray(0, 10))).toBe(true);
    } finally {
      await c.close();
    }
  });

  it('an unknown export is refused in one line', async () => {
    await expect(NbdClient.connect({ socket: sock, export: 'nope' }, 'test')).rejects.toThrow(/no such export/);
  });

  it('a client that sends garbage loses its connection only', async () => {
    const good = await NbdClient.connect({ socket: sock, export: '' }, 'test');
    const bad = net.createConnection(sock);
    const closed = new Promise<void>((r) => bad.on('close', () => r()));
    bad.on('error', () => undefined);
    bad.resume(); // read (and drop) the greeting: a socket never read never sees its close
    bad.on('connect', () => bad.write(Buffer.concat([Buffer.alloc(4), Buffer.from('garbage garbage garbage garbage')])));
    await closed;
    expect((await good.read(0, 4096)).equals(image.subarray(0, 4096))).toBe(true);
    await good.close();
  });
});

describe('raw frames', () => {
  /** Connect and finish the handshake with EXPORT_NAME; returns the socket and a reader of exact byte counts. */
  async function raw(name: string) {
    const sk = net.createConnection(sock);
    const q = new ByteQueue();
    let wake = () => undefined as void;
    sk.on('data', (d: Buffer) => {
      q.push(d);
      wake();
    });
    sk.on('error', () => undefined);
    const need = async (n: number) => {
      while (q.length < n) await new Promise<void>((r) => (wake = r));
      return q.take(n);
    };
    const hello = await need(18);
    expect(hello.readBigUInt64BE(0)).toBe(NBDMAGIC);
    sk.write(Buffer.from([0, 0, 0, 3]));
    sk.write(encodeOption(OPT.EXPORT_NAME, Buffer.from(name)));
    const info = await need(10);
    return { sk, need, size: Number(info.readBigUInt64BE(0)), flags: info.readUInt16BE(8) };
  }

  it('EXPORT_NAME, then simple replies: EINVAL past the end and for huge reads, EPERM for a write to a read-only export', async () => {
    const c = await raw('');
    expect(c.size).toBe(image.length);
    expect(c.flags & 2).toBe(2); // read-only
    const h = Buffer.from('handle01');
    c.sk.write(encodeRequest({ flags: 0, type: CMD.READ, handle: h, offset: image.length, length: 1 }));
    c.sk.write(encodeRequest({ flags: 0, type: CMD.READ, handle: h, offset: 0, length: 0xffffffff }));
    c.sk.write(Buffer.concat([encodeRequest({ flags: 0, type: CMD.WRITE, handle: h, offset: 0, length: 4 }), Buffer.from('abcd')]));
    const errs = [];
    for (let i = 0; i < 3; i++) {
      const r = await c.need(16);
      expect(r.readUInt32BE(0)).toBe(SIMPLE_REPLY_MAGIC);
      errs.push(r.readUInt32BE(4));
    }
    expect(errs.sort()).toEqual([NBD_ERR.EPERM, NBD_ERR.EINVAL, NBD_ERR.EINVAL].sort());
    c.sk.write(encodeRequest({ flags: 0, type: CMD.READ, handle: h, offset: 4096, length: 8 }));
    const r = await c.need(24);
    expect(r.readUInt32BE(4)).toBe(0);
    expect(r.subarray(16).equals(image.subarray(4096, 4104))).toBe(true);
    c.sk.destroy();
  });

  it('writes, zeroes and trims a writable export; a WRITE over the size limit closes the connection', async () => {
    const c = await raw('rw');
    expect(c.flags & 2).toBe(0);
    const h = Buffer.from('handle02');
    c.sk.write(Buffer.concat([encodeRequest({ flags: 0, type: CMD.WRITE, handle: h, offset: 100, length: 5 }), Buffer.from('hello')]));
    expect((await c.need(16)).readUInt32BE(4)).toBe(0);
    expect(rw.subarray(100, 105).toString()).toBe('hello');
    c.sk.write(encodeRequest({ flags: 0, type: CMD.WRITE_ZEROES, handle: h, offset: 101, length: 2 }));
    expect((await c.need(16)).readUInt32BE(4)).toBe(0);
    expect(rw.subarray(100, 105).toString('latin1')).toBe('h\0\0lo');
    c.sk.write(encodeRequest({ flags: 0, type: CMD.WRITE, handle: h, offset: rw.length - 2, length: 4 }));
    c.sk.write(Buffer.from('wxyz'));
    expect((await c.need(16)).readUInt32BE(4)).toBe(NBD_ERR.ENOSPC);
    const closed = new Promise<void>((r) => c.sk.on('close', () => r()));
    c.sk.write(encodeRequest({ flags: 0, type: CMD.WRITE, handle: h, offset: 0, length: 0x7fffffff }));
    await closed;
  });

  it('a zero-length WRITE or WRITE_ZEROES succeeds and changes nothing', async () => {
    const c = await raw('rw');
    const h = Buffer.from('handle03');
    const copy = Buffer.from(rw);
    c.sk.write(encodeRequest({ flags: 0, type: CMD.WRITE, handle: h, offset: 4096, length: 0 }));
    c.sk.write(encodeRequest({ flags: 0, type: CMD.WRITE_ZEROES, handle: h, offset: rw.length, length: 0 }));
    expect((await c.need(16)).readUInt32BE(4)).toBe(0);
    expect((await c.need(16)).readUInt32BE(4)).toBe(0);
    expect(rw.equals(copy)).toBe(true);
    c.sk.destroy();
  });

  it('at most 64 connections at once: more are closed, the others served', async () => {
    const open: net.Socket[] = [];
    for (let i = 0; i < 64; i++) {
      const sk = net.createConnection(sock);
      sk.on('error', () => undefined);
      open.push(sk);
      await new Promise((r) => sk.once('data', r)); // the greeting: accepted
    }
    const extra = net.createConnection(sock);
    extra.on('error', () => undefined);
    extra.resume();
    await new Promise<void>((r) => extra.on('close', () => r()));
    for (const sk of open) sk.destroy();
    await new Promise<void>((r) => {
      const wait = () => (server.connections === 0 ? r() : setImmediate(wait));
      wait();
    });
    const c = await NbdClient.connect({ socket: sock, export: '' }, 'test');
    expect((await c.read(0, 16)).equals(image.subarray(0, 16))).toBe(true);
    await c.close();
  });

  it('LIST names every export; ABORT ends the handshake', async () => {
    const sk = net.createConnection(sock);
    const q = new ByteQueue();
    const chunks: Buffer[] = [];
    sk.on('data', (d: Buffer) => chunks.push(d));
    const closed = new Promise<void>((r) => sk.on('close', () => r()));
    sk.on('connect', () => {
      sk.write(Buffer.from([0, 0, 0, 1]));
      sk.write(encodeOption(OPT.LIST));
      sk.write(encodeOption(OPT.ABORT));
    });
    await closed;
    for (const c of chunks) q.push(c);
    q.take(18);
    const names: string[] = [];
    for (;;) {
      const head = q.take(20);
      const data = q.take(head.readUInt32BE(16));
      if (head.readUInt32BE(12) !== REP.SERVER) {
        expect(head.readUInt32BE(12)).toBe(REP.ACK);
        break;
      }
      names.push(data.toString('utf8', 4, 4 + data.readUInt32BE(0)));
    }
    expect(names.sort()).toEqual(['', 'rw']);
  });
});

/**
 * A scripted NBD server for the client: the handshake, then each READ answered by `answer`
 * with raw structured reply chunks (a server that splits, leaves gaps, or writes outside).
 */
async function scriptedServer(path: string, size: number, answer: (handle: Buffer, offset: number, length: number) => Buffer[]): Promise<net.Server> {
  const srv = net.createServer((sk) => {
    const q = new ByteQueue();
    let stage: 'flags' | 'options' | 'requests' = 'flags';
    sk.write(serverGreeting());
    sk.on('error', () => undefined);
    sk.on('data', (d: Buffer) => {
      q.push(d);
      for (;;) {
        if (stage === 'flags') {
          if (q.length < 4) return;
          q.take(4);
          stage = 'options';
        } else if (stage === 'options') {
          if (q.length < 16) return;
          const h = decodeOptionHeader(q.peek(16));
          if (q.length < 16 + h.length) return;
          q.take(16 + h.length);
          if (h.option === OPT.GO) {
            sk.write(encodeOptionReply(OPT.GO, REP.INFO, infoExport(size, 0)));
            sk.write(encodeOptionReply(OPT.GO, REP.ACK));
            stage = 'requests';
          } else sk.write(encodeOptionReply(h.option, h.option === OPT.STRUCTURED_REPLY ? REP.ACK : REP.ERR_UNSUP));
        } else {
          if (q.length < 28) return;
          const r = decodeRequest(q.take(28));
          if (r.type === CMD.READ) for (const b of answer(r.handle, r.offset, r.length)) sk.write(b);
        }
      }
    });
  });
  await new Promise<void>((res) => srv.listen(path, res));
  return srv;
}

const dataChunk = (h: Buffer, done: boolean, offset: number, data: Buffer) =>
  Buffer.concat([structuredHeader(h, done ? REPLY_FLAG_DONE : 0, REPLY.OFFSET_DATA, 8 + data.length), u64be(offset), data]);
const holeChunk = (h: Buffer, done: boolean, offset: number, n: number) =>
  Buffer.concat([structuredHeader(h, done ? REPLY_FLAG_DONE : 0, REPLY.OFFSET_HOLE, 12), u64be(offset), u32be(n)]);
function u64be(n: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(n));
  return b;
}
function u32be(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n);
  return b;
}

describe('the client against a server that answers READs its own way', () => {
  const disk = prng(9, 1 << 20);
  it('data and holes in several chunks land in the caller\'s buffer; a READ left short or written outside fails in one line', async () => {
    const path = s.path('scripted.sock');
    const srv = await scriptedServer(path, disk.length, (h, off, len) => {
      if (off === 0) {
        // 1000 bytes of data, 4000 of hole, the rest of data; the last chunk first.
        return [dataChunk(h, false, off + 5000, disk.subarray(off + 5000, off + len)), holeChunk(h, false, off + 1000, 4000), dataChunk(h, true, off, disk.subarray(off, off + 1000))];
      }
      if (off === 65536) return [dataChunk(h, true, off, disk.subarray(off, off + len / 2))]; // half of it, then DONE
      return [dataChunk(h, true, off + len - 10, disk.subarray(0, 20))]; // runs past the request
    });
    try {
      const c = await NbdClient.connect({ socket: path, export: '' }, 'scripted');
      const into = Buffer.alloc(8192, 0xee);
      expect(await c.read(0, 8192, into)).toBe(into);
      expect(into.equals(Buffer.concat([disk.subarray(0, 1000), Buffer.alloc(4000), disk.subarray(5000, 8192)]))).toBe(true);
      expect((await c.read(0, 8192)).equals(into)).toBe(true); // without a buffer of the caller's
      await expect(c.read(65536, 8192, Buffer.alloc(8192))).rejects.toThrow(/^scripted: NBD protocol error: a READ of 8192 bytes answered with 4096$/);
      await c.close();
      const c2 = await NbdClient.connect({ socket: path, export: '' }, 'scripted');
      await expect(c2.read(131072, 8192)).rejects.toThrow(/^scripted: NBD protocol error: data outside the request$/);
      await c2.close();
    } finally {
      await new Promise<void>((r) => srv.close(() => r()));
    }
  });
});

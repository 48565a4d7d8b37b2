/**
 * Incremental SSH source: a small Python agent runs on the remote host (sent over the
 * exec channel, nothing installed there), reads the device in the repository's segments,
 * chunks each one exactly like src/format/chunker.ts (block-cdc) and sends the chunk list
 * (length, zero flag, SHA-256). The local side answers with the chunks it needs; only
 * those bytes cross the network (zlib level 1 when that helps; stock python has no zstd).
 *
 * Protocol (all integers big-endian), frames `type u8 | length u32 | payload`:
 *   agent -> local  'H' JSON {v, size}         once, first
 *                   'S' count u32, count x (length u32 | zero u8 | digest(32) if data)
 *                   'D' compression u8 (0 raw, 1 zlib) | bytes   one per requested chunk
 *                   'E' JSON {bytes}           after the last segment
 *                   'X' utf-8 message          fatal error (read error, bad request)
 *   local -> agent  'N' one byte per chunk of the oldest unanswered 'S': 1 = send it
 * The agent keeps up to WINDOW segments described ahead of the answers (latency hiding).
 */
import { createHash } from 'node:crypto';
import { inflateSync } from 'node:zlib';
import type { ChunkingParams } from '../format/config.js';
import { GenvaultError } from '../util/errors.js';
import {
  ChannelReader, RemoteChannel, RemoteInfo, SshConnection, SshOptions, describeSpec, probeRemote, shq, startPlainSource,
} from './ssh.js';
import { openSshConnection } from './ssh-command.js';
import type { Source } from '../backup/source.js';
import { offeredChunks, type ChunkedSegment, type ChunkedSource, type NeedFn, type RemoteChunk } from '../backup/chunked-source.js';

/** The remote agent. Python 3.5+, standard library only. Keep the chunker in step with chunker.ts. */
export const AGENT_PY = String.raw`
import sys, os, struct, hashlib, zlib, json, stat, threading, queue, time
from collections import deque

class Rate:
    # Bytes per second, smoothed over recent samples.
    def __init__(self):
        self.n = 0
        self.value = 0.0
    def add(self, nbytes, secs):
        r = nbytes / max(secs, 1e-6)
        self.value = r if self.n == 0 else 0.7 * self.value + 0.3 * r
        self.n += 1

def chunk_segment(mv, n, B, MIN, MASKBITS, MAX):
    # Port of chunkSegment in src/format/chunker.ts: same boundaries, bit for bit.
    out = []
    mask = (1 << MASKBITS) - 1
    wpb = B >> 2
    step = (wpb >> 4) or 1
    nw = len(range(0, wpb, step))
    unpack = struct.Struct('<' + ('I%dx' % (step * 4 - 4)) * (nw - 1) + 'I').unpack_from
    zb = bytes(B)
    start = 0
    zero_run = False
    pos = 0
    while pos < n:
        blen = B if n - pos >= B else n - pos
        z = mv[pos:pos + blen] == (zb if blen == B else bytes(blen))
        cur = pos - start
        if cur > 0:
            if zero_run and not z:
                if cur >= MIN:
                    out.append((start, cur, True))
                    start = pos
                else:
                    zero_run = False
            elif (not zero_run) and z and cur >= MIN:
                out.append((start, cur, False))
                start = pos
        if pos == start:
            zero_run = z
        pos += blen
        size = pos - start
        if size >= MAX:
            out.append((start, size, zero_run))
            start = pos
            continue
        if (not zero_run) and (not z) and size >= MIN and blen == B:
            h = 0x9e3779b9
            for w in unpack(mv, pos - B):
                h = ((h ^ w) * 0x85ebca6b) & 0xffffffff
                h ^= h >> 13
            h = (h * 0xc2b2ae35) & 0xffffffff
            h ^= h >> 16
            if (h & mask) == 0:
                out.append((start, size, False))
                start = pos
    if pos > start:
        out.append((start, pos - start, zero_run))
    return out

def read_full(f, buf):
    mv = memoryview(buf)
    got = 0
    while got < len(buf):
        k = f.readinto(mv[got:])
        if not k:
            break
        got += k
    return got

def chunk_file(path, SEG, B, MIN, MASKBITS, MAX):
    # Self-test entry: chunk a local file, print JSON lines [offset, length, zero, sha256hex].
    f = open(path, 'rb', buffering=0)
    off = 0
    res = []
    while True:
        buf = bytearray(SEG)
        n = read_full(f, buf)
        if n == 0:
            break
        mv = memoryview(buf)
        for (s, l, z) in chunk_segment(mv, n, B, MIN, MASKBITS, MAX):
            res.append([off + s, l, z, None if z else hashlib.sha256(mv[s:s + l]).hexdigest()])
        off += n
        if n < SEG:
            break
    sys.stdout.write(json.dumps(res))

def main():
    out = sys.stdout.buffer
    inp = sys.stdin.buffer
    def send(t, *parts):
        out.write(t + struct.pack('>I', sum(len(p) for p in parts)))
        for p in parts:
            out.write(p)
    def fail(msg):
        send(b'X', msg.encode('utf-8', 'replace'))
        out.flush()
        sys.exit(1)
    if sys.argv[1] == '--chunk-file':
        return chunk_file(sys.argv[2], *[int(a) for a in sys.argv[3:8]])
    path = sys.argv[1]
    SEG, B, MIN, MASKBITS, MAX, COMP, WIN = [int(a) for a in sys.argv[2:9]]
    try:
        f = open(path, 'rb', buffering=0)
        st = os.fstat(f.fileno())
        size = None
        if stat.S_ISREG(st.st_mode):
            size = st.st_size
        elif stat.S_ISBLK(st.st_mode):
            size = f.seek(0, 2)
            f.seek(0)
    except OSError as e:
        fail('%s: %s' % (path, e.strerror or e))
    send(b'H', json.dumps({'v': 1, 'size': size}).encode())
    # A reader thread reads, chunks and hashes segments ahead (hashlib releases the GIL),
    # while this thread answers need lists, compresses and sends.
    q = queue.Queue(maxsize=2)
    def reader():
        total = 0
        try:
            while True:
                buf = bytearray(SEG)
                try:
                    n = read_full(f, buf)
                except OSError as e:
                    q.put(('X', 'reading %s at offset %d: %s' % (path, total, e.strerror or e)))
                    return
                if n == 0:
                    break
                mv = memoryview(buf)[:n]
                spans = chunk_segment(mv, n, B, MIN, MASKBITS, MAX)
                desc = [struct.pack('>I', len(spans))]
                for (s, l, z) in spans:
                    if z:
                        desc.append(struct.pack('>IB', l, 1))
                    else:
                        desc.append(struct.pack('>IB', l, 0) + hashlib.sha256(mv[s:s + l]).digest())
                q.put(('S', (mv, spans, b''.join(desc))))
                total += n
                if n < SEG:
                    break
        except BaseException as e:
            q.put(('X', 'agent reader: %s' % e))
            return
        q.put(('E', total))
    threading.Thread(target=reader, daemon=True).start()
    # Compress only when it pays: when the connection (or the receiver) is slower than
    # zlib would make up for. Rates are measured as we go: link = bytes / seconds spent
    # blocked in writes, zlib = input bytes / seconds compressing.
    link = Rate()
    zrate = Rate()
    ratio = 0.5
    pending = deque()
    eof = False
    total = 0
    while True:
        while not eof and len(pending) < WIN:
            kind, item = q.get()
            if kind == 'X':
                fail(item)
            if kind == 'E':
                eof = True
                total = item
                break
            mv, spans, desc = item
            send(b'S', desc)
            pending.append((mv, spans))
        t0 = time.monotonic()
        out.flush()
        if not pending:
            break
        hdr = inp.read(5)
        if len(hdr) < 5:
            os._exit(0)  # the local side went away
        t, ln = hdr[:1], struct.unpack('>I', hdr[1:])[0]
        want = inp.read(ln)
        mv, spans = pending.popleft()
        if t != b'N' or len(want) != len(spans):
            fail('protocol error: expected a need list of %d entries' % len(spans))
        # Compress if sending raw takes longer than compressing and sending the result.
        comp = COMP and (link.n < 2 or zrate.n < 1 or 1.0 / link.value > 1.0 / zrate.value + ratio / link.value)
        sent = 0
        tw = 0.0
        for i, (s, l, z) in enumerate(spans):
            if want[i]:
                c = mv[s:s + l]
                if comp:
                    # Try a 16 KiB sample first: incompressible data (media, encrypted,
                    # already compressed) would cost zlib time for nothing.
                    k = 16384 if l > 16384 else l
                    tz = time.monotonic()
                    if len(zlib.compress(c[:k], 1)) < k - (k >> 3):
                        zc = zlib.compress(c, 1)
                        zrate.add(l, time.monotonic() - tz)
                        ratio = 0.8 * ratio + 0.2 * (len(zc) / l)
                        if len(zc) < l - (l >> 5):
                            tw0 = time.monotonic()
                            send(b'D', b'\x01', zc)
                            tw += time.monotonic() - tw0
                            sent += len(zc)
                            continue
                tw0 = time.monotonic()
                send(b'D', b'\x00', c)
                tw += time.monotonic() - tw0
                sent += l
        if sent >= (1 << 20):
            tw0 = time.monotonic()
            out.flush()
            tw += time.monotonic() - tw0
            link.add(sent, max(tw, 1e-6))
    send(b'E', json.dumps({'bytes': total}).encode())
    out.flush()

main()
`;

interface Frame {
  type: string;
  payload: Buffer;
}

class AgentSource implements ChunkedSource {
  private described: Array<Array<{ length: number; zero: boolean; digest: Buffer | null }>> = [];
  private offset = 0;
  private finished = false;
  private total: number | null = null;
  readonly transferred = { raw: 0, wire: 0 };
  // read() adapter state
  private cur: Buffer | null = null;
  private curPos = 0;

  constructor(
    readonly description: string,
    public size: number | null,
    readonly chunking: ChunkingParams,
    private conn: SshConnection,
    private ch: RemoteChannel,
    private reader: ChannelReader,
    private where: string,
  ) {}

  async readFrame(): Promise<Frame> {
    const got = Buffer.allocUnsafe(5);
    const n = await this.reader.read(got, 0, 5);
    if (n < 5) throw this.endError();
    const len = got.readUInt32BE(1);
    const payload = len ? await this.reader.readExact(len).catch(() => { throw this.endError(); }) : Buffer.alloc(0);
    const type = String.fromCharCode(got[0]!);
    if (type === 'X') throw new GenvaultError(`remote agent on ${this.where}: ${payload.toString()}`, 'SSH_REMOTE');
    return { type, payload };
  }

  private endError(): GenvaultError {
    if (this.conn.lost) return new GenvaultError(`connection lost while reading ${this.where}`, 'SSH_DISCONNECTED');
    return this.reader.endError();
  }

  /** Read frames until a segment description is queued (or the end). */
  private async nextDescription(): Promise<boolean> {
    while (!this.described.length) {
      if (this.finished) return false;
      const f = await this.readFrame();
      if (f.type === 'S') this.described.push(parseDescription(f.payload));
      else if (f.type === 'E') {
        this.finished = true;
        this.total = (JSON.parse(f.payload.toString()) as { bytes: number }).bytes;
      } else if (f.type === 'H') {
        this.size = (JSON.parse(f.payload.toString()) as { size: number | null }).size ?? this.size;
      } else throw new GenvaultError(`remote agent on ${this.where}: unexpected message '${f.type}'`, 'SSH_PROTOCOL');
    }
    return true;
  }

  async readSegment(need: NeedFn): Promise<ChunkedSegment | null> {
    if (!(await this.nextDescription())) {
      if (this.total !== null && this.total !== this.offset) {
        throw new GenvaultError(`remote agent on ${this.where} reported ${this.total} bytes but sent ${this.offset}`, 'SSH_PROTOCOL');
      }
      return null;
    }
    const desc = this.described.shift()!;
    const { offered, dataIdx } = offeredChunks(desc);
    const answers = dataIdx.length ? await need(this.offset, offered) : [];
    const flags = Buffer.alloc(desc.length);
    dataIdx.forEach((i, k) => (flags[i] = answers[k] ? 1 : 0));
    const hdr = Buffer.alloc(5);
    hdr.write('N', 0, 'latin1');
    hdr.writeUInt32BE(flags.length, 1);
    this.ch.write(Buffer.concat([hdr, flags]));
    const chunks: RemoteChunk[] = [];
    let start = 0;
    for (let i = 0; i < desc.length; i++) {
      const c = desc[i]!;
      let data: Buffer | null = null;
      if (flags[i]) {
        let f = await this.readFrame();
        while (f.type === 'S') {
          this.described.push(parseDescription(f.payload));
          f = await this.readFrame();
        }
        if (f.type !== 'D') throw new GenvaultError(`remote agent on ${this.where}: unexpected message '${f.type}'`, 'SSH_PROTOCOL');
        this.transferred.wire += f.payload.length - 1;
        data = f.payload[0] === 1 ? inflateSync(f.payload.subarray(1)) : f.payload.subarray(1);
        const d = createHash('sha256').update(data).digest();
        if (data.length !== c.length || !d.equals(c.digest!)) {
          throw new GenvaultError(`chunk from ${this.where} at offset ${this.offset + start} does not match its digest`, 'SSH_PROTOCOL');
        }
        this.transferred.raw += data.length;
      }
      chunks.push({ start, length: c.length, zero: c.zero, digest: c.digest, data });
      start += c.length;
    }
    const seg: ChunkedSegment = { offset: this.offset, length: start, chunks };
    this.offset += start;
    return seg;
  }

  /** Plain-Source view: every data chunk is requested; zero chunks are filled locally. */
  async read(buf: Buffer, length: number): Promise<number> {
    let got = 0;
    while (got < length) {
      if (!this.cur || this.curPos >= this.cur.length) {
        const seg = await this.readSegment(async (_off, cs) => cs.map(() => true));
        if (!seg) break;
        const b = Buffer.alloc(seg.length);
        for (const c of seg.chunks) if (c.data) c.data.copy(b, c.start);
        this.cur = b;
        this.curPos = 0;
      }
      const n = Math.min(length - got, this.cur.length - this.curPos);
      this.cur.copy(buf, got, this.curPos, this.curPos + n);
      this.curPos += n;
      got += n;
    }
    return got;
  }

  async close(): Promise<void> {
    this.reader.destroy();
    this.conn.close();
  }
}

function parseDescription(p: Buffer): Array<{ length: number; zero: boolean; digest: Buffer | null }> {
  const n = p.readUInt32BE(0);
  const out: Array<{ length: number; zero: boolean; digest: Buffer | null }> = [];
  let at = 4;
  for (let i = 0; i < n; i++) {
    const length = p.readUInt32BE(at);
    const zero = p[at + 4] === 1;
    at += 5;
    let digest: Buffer | null = null;
    if (!zero) {
      digest = p.subarray(at, at + 32);
      at += 32;
    }
    out.push({ length, zero, digest });
  }
  return out;
}

/** The shell command that starts the agent; its source follows on stdin. */
export function agentCommand(path: string, p: ChunkingParams, opts: { zlib?: boolean; window?: number } = {}): string {
  const src = Buffer.byteLength(AGENT_PY);
  const args = [p.segment, p.block, p.min, p.maskBits, p.max, opts.zlib === false ? 0 : 1, opts.window ?? 4];
  return `exec python3 -c ${shq(`import sys;exec(sys.stdin.buffer.read(${src}))`)} ${shq(path)} ${args.join(' ')}`;
}

export interface AgentSourceOptions extends SshOptions {
  zlib?: boolean;
  window?: number;
}

/** Start the agent on an open connection (the remote path already probed). */
export async function startAgentSource(
  conn: SshConnection, info: RemoteInfo, chunking: ChunkingParams, opts: { zlib?: boolean; window?: number } = {},
): Promise<ChunkedSource> {
  const where = describeSpec(conn.spec);
  if (!info.python) throw new GenvaultError(`cannot back up ${where} incrementally: python3 not found on ${conn.spec.host}`, 'SSH_NO_PYTHON');
  const ch = await conn.exec(agentCommand(conn.spec.path, chunking, opts));
  ch.write(AGENT_PY);
  const reader = new ChannelReader(ch, conn, where);
  const src = new AgentSource(where, info.size, chunking, conn, ch, reader, where);
  const hello = await src.readFrame();
  if (hello.type !== 'H') throw new GenvaultError(`remote agent on ${where} did not start`, 'SSH_PROTOCOL');
  const h = JSON.parse(hello.payload.toString()) as { size: number | null };
  if (h.size !== null) src.size = h.size;
  return src;
}

/** Open an ssh:// source in incremental mode (fails with code SSH_NO_PYTHON without python3). */
export async function openSshAgentSource(specText: string, chunking: ChunkingParams, opts: AgentSourceOptions = {}): Promise<ChunkedSource> {
  const conn = await openSshConnection(specText, opts);
  try {
    return await startAgentSource(conn, await probeRemote(conn), chunking, opts);
  } catch (e) {
    conn.close();
    throw e;
  }
}

export const SSH_MODES = ['auto', 'agent', 'plain'] as const;
export type SshMode = (typeof SSH_MODES)[number];

export function isSshMode(v: unknown): v is SshMode {
  return (SSH_MODES as readonly unknown[]).includes(v);
}

export interface RemoteSourceOptions extends AgentSourceOptions {
  /** auto: the agent when the remote has python3, else plain; agent: the agent or an error; plain: cat. */
  mode?: SshMode;
  /** The repository's chunking (needed for the agent). */
  chunking: ChunkingParams;
}

/** Open an ssh:// source: one connection, then the agent or plain `cat` by `mode`. */
/**
 * Read the remote image over an open connection: probe it, then start the agent or `cat`
 * by `mode` (auto: the agent when the remote has python3).
 */
export async function startRemoteSource(
  conn: SshConnection, chunking: ChunkingParams, opts: { mode?: SshMode; zlib?: boolean; window?: number } = {},
): Promise<Source | ChunkedSource> {
  const info = await probeRemote(conn);
  const mode = opts.mode ?? 'auto';
  if (mode === 'plain' || (mode === 'auto' && !info.python)) return startPlainSource(conn, info);
  return startAgentSource(conn, info, chunking, opts);
}

export async function openRemoteSource(specText: string, opts: RemoteSourceOptions): Promise<Source | ChunkedSource> {
  const conn = await openSshConnection(specText, opts);
  try {
    return await startRemoteSource(conn, opts.chunking, opts);
  } catch (e) {
    conn.close();
    throw e;
  }
}

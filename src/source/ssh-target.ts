/**
 * Restore to a remote file or block device: `ssh://[user@]host[:port]/path`.
 *
 * With python3 on the remote host, a small writer is sent over the channel (nothing is
 * installed) and the image follows as frames: data at an offset, or a zero range that
 * costs nothing on the wire (holes in a file; written as zeros on a device, which may
 * hold old data). Without python3, the raw image is streamed into `cat`, zeros included.
 *
 * Either way the same rules as a local restore hold: an existing non-empty file is
 * refused without --force, a file is written under a temporary name and renamed only once
 * complete and synced, and a device must be large enough.
 */
import type { Generation } from '../format/generation.js';
import type { Repository } from '../repository/repository.js';
import { RestoreOptions, RestoreResult, rawSink, streamChunks } from '../read/restore.js';
import { GenvaultError } from '../util/errors.js';
import type { SshMode } from './ssh-agent.js';
import { ChannelReader, RemoteChannel, SshConnection, SshOptions, describeSpec, remoteError, shq } from './ssh.js';
import { openSshConnection } from './ssh-command.js';

/** The remote writer. Python 3.5+, standard library only. */
export const WRITER_PY = String.raw`
import os, sys, struct, stat
path, size, force = sys.argv[1], int(sys.argv[2]), sys.argv[3] == '1'
inp = sys.stdin.buffer
def die(msg):
    sys.stderr.write(msg + '\n'); sys.stderr.flush(); sys.exit(1)
def why(e):
    return (e.strerror or str(e)).lower()
def readn(n):
    b = inp.read(n)
    if b is None or len(b) < n: raise EOFError()
    return b
def pwrite_all(fd, data, off):
    mv = memoryview(data)
    while len(mv):
        k = os.pwrite(fd, mv, off); mv = mv[k:]; off += k
try:
    st = os.stat(path)
except FileNotFoundError:
    st = None
except OSError as e:
    die(why(e))
device = st is not None and stat.S_ISBLK(st.st_mode)
tmp = None
if st is not None and stat.S_ISDIR(st.st_mode): die('is a directory')
if device:
    try: fd = os.open(path, os.O_WRONLY)
    except OSError as e: die(why(e))
    have = os.lseek(fd, 0, 2)
    if have < size: die('holds %d bytes, the image needs %d' % (have, size))
else:
    if st is not None and st.st_size > 0 and not force: die('exists and is not empty; use --force to overwrite it')
    d, b = os.path.split(path)
    tmp = os.path.join(d or '.', '.%s.genvault-partial-%d' % (b, os.getpid()))
    try: fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e: die('cannot create it: ' + why(e))
zero = bytes(1 << 20)
try:
    sys.stdout.write('R\n'); sys.stdout.flush()
    while True:
        t = readn(1)
        if t == b'D':
            off, n = struct.unpack('>QI', readn(12))
            pwrite_all(fd, readn(n), off)
        elif t == b'Z':
            off, n = struct.unpack('>QQ', readn(16))
            while device and n > 0:
                k = min(n, len(zero)); pwrite_all(fd, zero[:k], off); off += k; n -= k
        elif t == b'E':
            break
        else:
            die('protocol error')
    if not device: os.ftruncate(fd, size)
    os.fsync(fd); os.close(fd)
    if tmp:
        os.rename(tmp, path); tmp = None
        dfd = os.open(os.path.dirname(path) or '.', os.O_RDONLY)
        try: os.fsync(dfd)
        finally: os.close(dfd)
    sys.stdout.write('OK\n'); sys.stdout.flush()
except EOFError:
    die('connection closed before the end of the image')
except OSError as e:
    die(why(e))
finally:
    if tmp:
        try: os.unlink(tmp)
        except OSError: pass
`;

export interface SshRestoreOptions extends RestoreOptions, SshOptions {
  /** auto: the writer when python3 is there, else cat; agent: the writer or an error; plain: cat. */
  mode?: SshMode;
}

export interface SshRestoreResult extends RestoreResult {
  /** Image bytes sent over the connection (zero ranges cost nothing with the writer). */
  wireBytes: number;
  mode: 'agent' | 'plain';
}

/**
 * Write to a channel, waiting for the SSH window when it is full. If the remote side goes
 * away (it exits on an error, or the connection drops), the waiting write fails with why.
 */
function writer(ch: RemoteChannel, conn: SshConnection, closedError: () => GenvaultError) {
  let closed = false;
  let waiting: ((e: GenvaultError) => void) | null = null;
  ch.on('close', () => {
    closed = true;
    waiting?.(closedError());
  });
  conn.onLost((e) => waiting?.(e));
  return (b: Buffer) =>
    new Promise<void>((resolve, reject) => {
      if (conn.lost) return reject(conn.lost);
      if (closed) return reject(closedError());
      if (ch.write(b)) return resolve();
      waiting = reject;
      ch.once('drain', () => {
        waiting = null;
        resolve();
      });
    });
}

/** The remote side answers R once its checks passed; otherwise it exits with the reason. */
async function remoteReady(reader: ChannelReader, where: string): Promise<void> {
  const ready = Buffer.alloc(2);
  if ((await reader.read(ready, 0, 2)) < 2 || ready.toString() !== 'R\n') throw targetError(where, reader);
}

async function hasPython(conn: SshConnection): Promise<boolean> {
  const r = await conn.run('command -v python3 >/dev/null 2>&1 && echo yes || echo no');
  return r.stdout.toString().trim() === 'yes';
}

function targetError(where: string, reader: ChannelReader): GenvaultError {
  if (reader.exitCode !== null && reader.exitCode !== 0) {
    const line = reader.stderr.trim().split('\n').filter(Boolean).at(-1) ?? '';
    if (line) {
      const code = /no space/.test(line) ? 'ENOSPC' : /exists and is not empty/.test(line) ? 'EXISTS' : /permission denied/.test(line) ? 'EACCES' : 'SSH_REMOTE';
      return new GenvaultError(`${where}: ${line}`, code);
    }
    return remoteError(where, reader.stderr, reader.exitCode);
  }
  return reader.endError();
}

/** Restore `gen` to an ssh:// file or device. */
export async function restoreToSsh(repo: Repository, gen: Generation, target: string, opts: SshRestoreOptions = {}): Promise<SshRestoreResult> {
  const conn = await openSshConnection(target, opts);
  const { spec } = conn;
  const where = describeSpec(spec);
  try {
    const mode = opts.mode ?? 'auto';
    const python = mode === 'plain' ? false : await hasPython(conn);
    if (mode === 'agent' && !python) throw new GenvaultError(`cannot restore to ${where} with the writer: python3 not found on ${spec.host}`, 'SSH_NO_PYTHON');
    return python ? await viaWriter(repo, gen, conn, where, opts) : await viaCat(repo, gen, conn, where, opts);
  } finally {
    conn.close();
  }
}

async function viaWriter(repo: Repository, gen: Generation, conn: SshConnection, where: string, opts: SshRestoreOptions): Promise<SshRestoreResult> {
  const src = Buffer.byteLength(WRITER_PY);
  const ch = await conn.exec(
    `exec python3 -c ${shq(`import sys;exec(sys.stdin.buffer.read(${src}))`)} ${shq(conn.spec.path)} ${gen.size} ${opts.force ? 1 : 0}`,
  );
  const reader = new ChannelReader(ch, conn, where);
  ch.write(WRITER_PY);
  await remoteReady(reader, where);
  const write = writer(ch, conn, () => targetError(where, reader));
  let wire = 0;
  const damaged = await streamChunks(
    repo,
    gen,
    {
      async write(offset, length, data) {
        if (data) {
          const h = Buffer.alloc(13);
          h.write('D', 0);
          h.writeBigUInt64BE(BigInt(offset), 1);
          h.writeUInt32BE(length, 9);
          await write(h);
          await write(data);
          wire += length;
        } else {
          const h = Buffer.alloc(17);
          h.write('Z', 0);
          h.writeBigUInt64BE(BigInt(offset), 1);
          h.writeBigUInt64BE(BigInt(length), 9);
          await write(h);
        }
      },
    },
    opts,
  );
  await write(Buffer.from('E'));
  ch.end();
  const ok = Buffer.alloc(3);
  if ((await reader.read(ok, 0, 3)) < 3 || ok.toString() !== 'OK\n') throw targetError(where, reader);
  return { bytes: gen.size, target: where, damaged, sparse: true, wireBytes: wire, mode: 'agent' };
}

async function viaCat(repo: Repository, gen: Generation, conn: SshConnection, where: string, opts: SshRestoreOptions): Promise<SshRestoreResult> {
  // The shell does what the writer does, minus holes: checks, temporary name, size check, rename.
  const script = [
    `p=${shq(conn.spec.path)}; size=${gen.size}; force=${opts.force ? 1 : 0}`,
    'if [ -d "$p" ]; then echo "is a directory" >&2; exit 1; fi',
    'if [ -b "$p" ]; then',
    '  have=$(blockdev --getsize64 "$p") || exit 1',
    '  if [ "$have" -lt "$size" ]; then echo "holds $have bytes, the image needs $size" >&2; exit 1; fi',
    '  echo R; exec dd of="$p" bs=4M iflag=fullblock conv=fsync,notrunc status=none',
    'fi',
    'if [ -s "$p" ] && [ "$force" != 1 ]; then echo "exists and is not empty; use --force to overwrite it" >&2; exit 1; fi',
    't="$(dirname "$p")/.$(basename "$p").genvault-partial-$$"',
    `trap 'rm -f "$t"' EXIT`,
    '( set -C; : > "$t" ) 2>/dev/null || { echo "cannot create it: permission denied" >&2; exit 1; }',
    'echo R; cat > "$t" || exit 1',
    'got=$(stat -c %s "$t")',
    'if [ "$got" != "$size" ]; then echo "connection closed before the end of the image" >&2; exit 1; fi',
    'sync "$t" 2>/dev/null || sync; mv -f "$t" "$p" && trap - EXIT && echo OK',
  ].join('\n');
  const ch = await conn.exec(`sh -c ${shq(script)}`);
  const reader = new ChannelReader(ch, conn, where);
  await remoteReady(reader, where);
  const write = writer(ch, conn, () => targetError(where, reader));
  const damaged = await streamChunks(repo, gen, rawSink(write), opts);
  ch.end();
  // Devices (dd) print nothing: success is a clean exit.
  const rest = Buffer.alloc(3);
  const n = await reader.read(rest, 0, 3);
  while (!reader.done) await reader.read(Buffer.alloc(64), 0, 64);
  if (reader.exitCode !== 0 || (n > 0 && rest.subarray(0, n).toString() !== 'OK\n')) throw targetError(where, reader);
  return { bytes: gen.size, target: where, damaged, sparse: false, wireBytes: gen.size, mode: 'plain' };
}

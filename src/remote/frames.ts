/**
 * The framing of the remote protocol (`genvault serve` and its clients, PROTOCOL in
 * protocol.ts): a byte stream each way cut into frames
 *
 *   length u32 | type u8 | id u32 | payload (length - 5 bytes)
 *
 * all big-endian. `length` counts type, id and payload, so it is at least 5 and at most
 * MAX_FRAME. The peer is hostile until proven otherwise: a frame longer than MAX_FRAME, a
 * length below 5 or a stream cut mid-frame is one clear error and the end of the session.
 * Reading is pull-based (next()), so a side that does not ask for frames stops reading the
 * stream, and SSH's flow control stops the sender: memory stays bounded whatever it sends.
 */
import type { Readable } from 'node:stream';
import { GenvaultError } from '../util/errors.js';

/** Largest frame: a stored record sync copies (a 16 MiB group, sealed, in a 32 MiB bound) plus headers. */
export const MAX_FRAME = 33 << 20;
export const FRAME_HEADER = 9;

/** The peer broke the protocol: the session ends with this one line. */
export class ProtocolError extends GenvaultError {
  constructor(message: string) {
    super(`protocol error: ${message}`, 'PROTOCOL');
  }
}

export interface Frame {
  type: number;
  id: number;
  payload: Buffer;
}

export function encodeFrame(type: number, id: number, payload: Buffer | Uint8Array = Buffer.alloc(0)): Buffer {
  const b = Buffer.allocUnsafe(FRAME_HEADER + payload.length);
  b.writeUInt32BE(payload.length + 5, 0);
  b[4] = type;
  b.writeUInt32BE(id >>> 0, 5);
  b.set(payload, FRAME_HEADER);
  return b;
}

/** A frame's header alone, for payloads written after it without a copy (large data). */
export function frameHeader(type: number, id: number, payloadLength: number): Buffer {
  const b = Buffer.allocUnsafe(FRAME_HEADER);
  b.writeUInt32BE(payloadLength + 5, 0);
  b[4] = type;
  b.writeUInt32BE(id >>> 0, 5);
  return b;
}

/** Anything that delivers the peer's bytes: a Readable, or an ssh channel (RemoteChannel). */
export interface ByteSource {
  on(event: 'data', fn: (d: Buffer) => void): unknown;
  on(event: 'end' | 'close', fn: () => void): unknown;
  pause(): unknown;
  resume(): unknown;
}

/**
 * Frames from a byte stream, one at a time. At most about two frames are buffered: the
 * stream is paused while a whole frame waits to be taken.
 */
export class FrameReader {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private ended = false;
  private failure: Error | null = null;
  private waiter: (() => void) | null = null;
  /** Bytes received in frames so far (for transfer counts). */
  received = 0;

  /**
   * @param alloc where a frame of this type and total length (header included) that spans
   *   several reads is assembled (null: a fresh buffer). The server assembles a backup's
   *   CHUNKS in shared memory its workers read (upload.ts), saving a copy and the garbage.
   */
  constructor(
    private readonly src: ByteSource | Readable,
    private readonly maxFrame = MAX_FRAME,
    private readonly alloc: ((type: number, length: number) => Buffer | null) | null = null,
  ) {
    src.on('data', (d: Buffer) => {
      this.chunks.push(d);
      this.buffered += d.length;
      if (this.buffered > this.maxFrame + FRAME_HEADER) src.pause();
      this.wake();
    });
    const end = () => {
      this.ended = true;
      this.wake();
    };
    src.on('end', end);
    src.on('close', end);
  }

  /** Ends every waiting and later next() with this error (the transport failed). */
  fail(e: Error): void {
    this.failure ??= e;
    this.wake();
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = null;
    w?.();
  }

  private take(n: number, into: Buffer | null): Buffer {
    if (this.chunks[0]!.length >= n) {
      const first = this.chunks[0]!;
      const out = first.subarray(0, n);
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
      this.buffered -= n;
      return out;
    }
    const out = into ? into.subarray(0, n) : Buffer.allocUnsafe(n);
    let at = 0;
    while (at < n) {
      const c = this.chunks[0]!;
      const k = Math.min(c.length, n - at);
      c.copy(out, at, 0, k);
      at += k;
      if (k === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(k);
    }
    this.buffered -= n;
    return out;
  }

  /** The first `n` bytes buffered (at least `n` are). */
  private peek(n: number): Buffer {
    const first = this.chunks[0]!;
    return first.length >= n ? first : Buffer.concat(this.chunks, n);
  }

  /** The next frame, or null when the stream ended cleanly between frames. */
  async next(): Promise<Frame | null> {
    for (;;) {
      if (this.failure) throw this.failure;
      if (this.buffered >= 4) {
        const len = this.peek(4).readUInt32BE(0);
        if (len < 5) throw new ProtocolError(`malformed frame (length ${len})`);
        if (len > this.maxFrame) throw new ProtocolError(`oversized frame (${len} bytes, at most ${this.maxFrame})`);
        if (this.buffered >= len + 4) {
          const into = this.alloc && this.chunks[0]!.length < len + 4 ? this.alloc(this.peek(5)[4]!, len + 4) : null;
          const f = this.take(len + 4, into && into.length >= len + 4 ? into : null);
          this.received += f.length;
          if (this.buffered <= this.maxFrame) this.src.resume();
          return { type: f[4]!, id: f.readUInt32BE(5), payload: f.subarray(FRAME_HEADER) };
        }
      }
      if (this.ended) {
        if (this.buffered) throw new ProtocolError(`stream ended in the middle of a frame (${this.buffered} bytes)`);
        return null;
      }
      this.src.resume();
      await new Promise<void>((r) => (this.waiter = r));
    }
  }
}

/** The backup's bounded memory: segment and output buffers, reused for the whole run. */
import type { ChunkingParams } from '../format/config.js';
import { RECORD_HEADER_SIZE } from '../format/pack.js';

/**
 * Segments in flight: bounds memory (DEPTH segment buffers, and as many output buffers)
 * while keeping the workers fed. Why 4 and not more: native-notes/performance.md, "Backup:
 * why the code is as it is".
 */
export const DEPTH = 4;

/**
 * Room for the records of one segment's new chunks, however they compress: the chunks,
 * a record header and a group member's entry per chunk, zstd's worst case.
 */
export function recordsRoom(chunking: ChunkingParams): number {
  const seg = chunking.segment;
  return seg + (seg >>> 6) + (seg / chunking.min) * (RECORD_HEADER_SIZE + 64) + (1 << 16);
}

/**
 * A fixed set of shared buffers; acquire() waits while all are in use. Strictly first
 * come, first served: segments take buffers in image order, so a later segment can never
 * hold the buffer an earlier one (which the main loop waits for) needs.
 */
export class BufferPool {
  private free: SharedArrayBuffer[];
  private waiters: Array<(b: SharedArrayBuffer) => void> = [];
  constructor(count: number, size: number) {
    this.free = Array.from({ length: count }, () => new SharedArrayBuffer(size));
  }
  acquire(): Promise<SharedArrayBuffer> {
    const b = this.free.pop();
    return b ? Promise.resolve(b) : new Promise((r) => this.waiters.push(r));
  }
  release(b: SharedArrayBuffer): void {
    const w = this.waiters.shift();
    if (w) w(b);
    else this.free.push(b);
  }
}

/** The zstd binding the workers compress and decode with. */
import { createRequire } from 'node:module';

// zstd-napi's low-level binding compresses into and decompresses out of buffers we
// provide: no intermediate Buffer per chunk, so workers make little garbage.
export interface ZstdBinding {
  CCtx: new () => { compress(dst: Uint8Array, src: Uint8Array, level: number): number };
  DCtx: new () => {
    decompress(dst: Uint8Array, src: Uint8Array): number;
    /** [bytes left to flush (0: frame done), bytes written, bytes consumed] */
    decompressStream(dst: Uint8Array, src: Uint8Array): [number, number, number];
    reset(directive: number): void;
  };
  ResetDirective: { sessionOnly: number };
  compressBound(n: number): number;
}
export const zstd = createRequire(import.meta.url)('zstd-napi/binding.js') as ZstdBinding;

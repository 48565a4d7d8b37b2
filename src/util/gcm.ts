/**
 * AES-256-GCM straight into the caller's buffers, through the small addon src/native/gcm.c
 * (OpenSSL's EVP, as linked into Node itself): no Buffer per update() and no copy into
 * place, which node:crypto costs (native-notes/performance.md, "Encryption").
 * Optional: without the addon (not built, or a runtime that does not export OpenSSL), or
 * with GENVAULT_NATIVE_GCM=0, src/format/crypto.ts uses node:crypto; both write the same
 * bytes (test/crypto.test.ts compares them).
 */
import { createRequire } from 'node:module';

/**
 * enc: seal src into dst and write the tag into `tag`; else open src into dst, checking
 * `tag`: false when it does not authenticate (dst then holds unauthenticated bytes).
 * dst may be src, or overlap it (as when a record is sealed where its plaintext lay).
 */
export type GcmFn = (
  enc: boolean,
  key: Uint8Array,
  nonce: Uint8Array,
  ad: Uint8Array,
  src: Uint8Array,
  dst: Uint8Array,
  tag: Uint8Array,
) => boolean;

let gcm: GcmFn | null | undefined;

export function nativeGcm(): GcmFn | null {
  if (gcm === undefined) {
    gcm = null;
    if (process.env.GENVAULT_NATIVE_GCM !== '0') {
      try {
        gcm = (createRequire(import.meta.url)('genvault-holes/gcm.cjs') as { gcm: GcmFn }).gcm;
      } catch {
        gcm = null;
      }
    }
  }
  return gcm;
}

/*
 * AES-256-GCM straight into the caller's buffers, through the OpenSSL that Node itself
 * carries (its binary exports the EVP symbols, and its headers come with the runtime).
 *
 * Why: node:crypto's update() returns a new Buffer per call, which the caller then copies
 * into place; for every sealed or opened record that is an allocation and a copy of the
 * whole payload, and on the first backup of a disk it was most of what encryption cost
 * beyond the cipher itself (native-notes/performance.md, "Encryption"). Here the cipher
 * writes where the bytes belong, in place when asked.
 *
 * The record format is not this file's business: the caller passes the nonce and the
 * associated data and places nonce, ciphertext and tag (src/format/crypto.ts). A separate
 * addon from holes.c, so that a runtime without these symbols loses only this, not the
 * hole seeks; src/format/crypto.ts falls back to node:crypto then.
 */
#include <node_api.h>
#include <openssl/evp.h>
#include <stdint.h>
#include <string.h>

#define KEY_BYTES 32
#define NONCE_BYTES 12
#define TAG_BYTES 16

static int get_bytes(napi_env env, napi_value v, uint8_t **data, size_t *len) {
  napi_typedarray_type type;
  size_t n, off;
  void *p;
  napi_value ab;
  if (napi_get_typedarray_info(env, v, &type, &n, &p, &ab, &off) != napi_ok || type != napi_uint8_array) return 0;
  *data = (uint8_t *)p;
  *len = n;
  return 1;
}

/* GCM over src into dst (dst may be src; any other overlap: src is ciphered in place and
 * then moved). enc: 1 seal, 0 open. For open, tag is checked; returns 1 if it matched. */
static int gcm(int enc, const uint8_t *key, const uint8_t *nonce, const uint8_t *ad, size_t ad_len, uint8_t *src,
               size_t len, uint8_t *dst, uint8_t *tag) {
  int ok = 0, n = 0;
  /* The tag through a copy: read before and written after anything touches dst, so that
   * it may lie next to (or inside) the bytes being ciphered. */
  uint8_t t[TAG_BYTES];
  if (!enc) memcpy(t, tag, TAG_BYTES);
  int overlap = dst != src && dst < src + len && src < dst + len;
  uint8_t *out = overlap ? src : dst;
  EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
  if (!c) return -1;
  if (EVP_CipherInit_ex(c, EVP_aes_256_gcm(), NULL, NULL, NULL, enc) != 1) goto done;
  if (EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_IVLEN, NONCE_BYTES, NULL) != 1) goto done;
  if (EVP_CipherInit_ex(c, NULL, NULL, key, nonce, enc) != 1) goto done;
  if (ad_len && EVP_CipherUpdate(c, NULL, &n, ad, (int)ad_len) != 1) goto done;
  /* EVP takes int lengths: records are at most a few MiB, but go in 1 GiB steps anyway. */
  for (size_t o = 0; o < len;) {
    int step = (int)(len - o > (1u << 30) ? (1u << 30) : len - o);
    if (EVP_CipherUpdate(c, out + o, &n, src + o, step) != 1 || n != step) goto done;
    o += (size_t)step;
  }
  if (!enc && EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_TAG, TAG_BYTES, t) != 1) goto done;
  if (EVP_CipherFinal_ex(c, out + len, &n) != 1) goto done; /* open: tag mismatch */
  if (enc && EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, TAG_BYTES, t) != 1) goto done;
  if (overlap) memmove(dst, src, len);
  if (enc) memcpy(tag, t, TAG_BYTES);
  ok = 1;
done:
  EVP_CIPHER_CTX_free(c);
  return ok;
}

/* (enc, key, nonce, ad, src, dst, tag): dst.length >= src.length; for seal the tag is
 * written into tag (16 bytes), for open it is read from it. Returns true, or false when an
 * opened record does not authenticate (dst then holds unauthenticated bytes). */
static napi_value run(napi_env env, napi_callback_info info) {
  size_t argc = 7;
  napi_value argv[7];
  bool enc;
  uint8_t *key, *nonce, *ad, *src, *dst, *tag;
  size_t key_len, nonce_len, ad_len, src_len, dst_len, tag_len;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 7 ||
      napi_get_value_bool(env, argv[0], &enc) != napi_ok || !get_bytes(env, argv[1], &key, &key_len) ||
      !get_bytes(env, argv[2], &nonce, &nonce_len) || !get_bytes(env, argv[3], &ad, &ad_len) ||
      !get_bytes(env, argv[4], &src, &src_len) || !get_bytes(env, argv[5], &dst, &dst_len) ||
      !get_bytes(env, argv[6], &tag, &tag_len) || key_len != KEY_BYTES || nonce_len != NONCE_BYTES ||
      tag_len != TAG_BYTES || dst_len < src_len || ad_len > INT32_MAX) {
    napi_throw_type_error(env, NULL, "expected (enc, key[32], nonce[12], ad, src, dst >= src, tag[16])");
    return NULL;
  }
  int r = gcm(enc ? 1 : 0, key, nonce, ad, ad_len, src, src_len, dst, tag);
  if (r < 0 || (enc && r != 1)) {
    napi_throw_error(env, NULL, "AES-256-GCM failed in OpenSSL");
    return NULL;
  }
  napi_value out;
  napi_get_boolean(env, r == 1, &out);
  return out;
}

NAPI_MODULE_INIT() {
  napi_property_descriptor props[] = {
      {"gcm", NULL, run, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
  return exports;
}

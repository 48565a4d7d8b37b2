/*
 * Two things Node has no binding for:
 * - lseek(SEEK_DATA / SEEK_HOLE). Backups of sparse image files use it to skip holes
 *   instead of reading them: a hole read through the page cache costs a zero-filled page
 *   per 4 KiB plus the copy, and evicts useful cache.
 * - The address of a buffer, to align O_DIRECT I/O: backups write and restores read packs
 *   with O_DIRECT (no page-cache pages to allocate and fill, nothing of the machine's
 *   cache evicted), which needs the memory aligned like the offsets.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <node_api.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

/* (fd, offset) -> the next offset >= offset that starts data (SEEK_DATA) or a hole
 * (SEEK_HOLE; the file end counts as one), or -1 when no data follows (ENXIO).
 * Other errors throw, with the errno name as the error code. */
static napi_value do_seek(napi_env env, napi_callback_info info, int whence) {
  size_t argc = 2;
  napi_value argv[2];
  int32_t fd;
  double offset;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 2 ||
      napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
      napi_get_value_double(env, argv[1], &offset) != napi_ok || offset < 0) {
    napi_throw_type_error(env, NULL, "expected (fd, offset >= 0)");
    return NULL;
  }
  off_t r = lseek(fd, (off_t)offset, whence);
  if (r < 0) {
    if (errno == ENXIO) r = -1;
    else {
      const char *name = errno == EINVAL ? "EINVAL" : errno == EBADF ? "EBADF" : "ESEEK";
      napi_throw_error(env, name, strerror(errno));
      return NULL;
    }
  }
  napi_value out;
  napi_create_double(env, (double)r, &out);
  return out;
}

static napi_value seek_data(napi_env env, napi_callback_info info) { return do_seek(env, info, SEEK_DATA); }
static napi_value seek_hole(napi_env env, napi_callback_info info) { return do_seek(env, info, SEEK_HOLE); }

/* (typed array, alignment) -> how many bytes past its start the view's memory is aligned. */
static napi_value align_skip(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  int32_t alignment;
  napi_typedarray_type type;
  size_t length, byte_offset;
  void *data;
  napi_value ab;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 2 ||
      napi_get_typedarray_info(env, argv[0], &type, &length, &data, &ab, &byte_offset) != napi_ok ||
      napi_get_value_int32(env, argv[1], &alignment) != napi_ok || alignment <= 0) {
    napi_throw_type_error(env, NULL, "expected (typed array, alignment > 0)");
    return NULL;
  }
  napi_value out;
  napi_create_int32(env, (int32_t)((alignment - (uintptr_t)data % (uintptr_t)alignment) % (uintptr_t)alignment), &out);
  return out;
}

NAPI_MODULE_INIT() {
  napi_property_descriptor props[] = {
    {"seekData", NULL, seek_data, NULL, NULL, NULL, napi_default, NULL},
    {"seekHole", NULL, seek_hole, NULL, NULL, NULL, napi_default, NULL},
    {"alignSkip", NULL, align_skip, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
  return exports;
}

/** One block of zeros per worker, shared by the ops that fill or write zeros. */
export const ZEROS = new Uint8Array(1 << 20);

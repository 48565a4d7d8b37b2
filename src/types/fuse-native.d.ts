// Minimal typing for fuse-native 2.x (it ships none). Error codes are negative errnos.
declare module 'fuse-native' {
  class Fuse {
    constructor(mnt: string, ops: Record<string, unknown>, opts?: Record<string, unknown>);
    mount(cb: (err: Error | null) => void): void;
    unmount(cb: (err?: Error | null) => void): void;
    static unmount(mnt: string, cb: (err?: Error | null) => void): void;
    static ENOENT: number;
    static EIO: number;
    static EBADF: number;
    static ENOTDIR: number;
    static EISDIR: number;
    static EINVAL: number;
    static EROFS: number;
  }
  export default Fuse;
}

/** A source of image bytes, read once from start to end. */
export interface Source {
  /** Shown in listings and stored with the generation, e.g. "file:/var/lib/vm1.img". */
  readonly description: string;
  /** Total size when known up front (files, block devices); null for streams. */
  readonly size: number | null;
  /** Fill buf[0, length) from the current position; returns bytes read, 0 at the end. */
  read(buf: Buffer, length: number): Promise<number>;
  /**
   * Like read(), except that when the next `length` bytes (or all up to the end) are a
   * hole of a sparse file it returns `hole: true` without touching buf: the caller must
   * treat them as zeros. Optional; sources that cannot tell do not have it.
   */
  readOrHole?(buf: Buffer, length: number): Promise<{ length: number; hole: boolean }>;
  close(): Promise<void>;
}

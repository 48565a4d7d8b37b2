/** A source of image bytes, read once from start to end. */
export interface Source {
  /** Shown in listings and stored with the generation, e.g. "file:/var/lib/vm1.img". */
  readonly description: string;
  /** Total size when known up front (files, block devices); null for streams. */
  readonly size: number | null;
  /** Fill buf[0, length) from the current position; returns bytes read, 0 at the end. */
  read(buf: Buffer, length: number): Promise<number>;
  /**
   * Positional read of [position, position + length), clipped to `size`, for sources of
   * known size; calls may overlap. When the range is all hole in a sparse file it returns
   * `hole: true` without touching buf: the caller must treat the bytes as zeros. Optional;
   * streams do not have it.
   */
  readAt?(buf: Buffer, position: number, length: number): Promise<{ length: number; hole: boolean }>;
  close(): Promise<void>;
}

/** A source of image bytes, read once from start to end. */
export interface Source {
  /** Shown in listings and stored with the generation, e.g. "file:/var/lib/vm1.img". */
  readonly description: string;
  /** Total size when known up front (files, block devices); null for streams. */
  readonly size: number | null;
  /** Fill buf[0, length) from the current position; returns bytes read, 0 at the end. */
  read(buf: Buffer, length: number): Promise<number>;
  close(): Promise<void>;
}

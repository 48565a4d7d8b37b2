/**
 * What the backup pipeline (backup.ts) reads: the abstract Source. It lives here, below
 * src/source/, which holds the concrete sources (local.ts: files, devices, stdin; ssh.ts,
 * ssh-agent.ts: ssh://); see scripts/check-layers for the layering.
 */

/** A source of image bytes, read once from start to end. */
export interface Source {
  /** Shown in listings and stored with the generation, e.g. "file:/var/lib/vm1.img". */
  readonly description: string;
  /** Total size when known up front (files, block devices); null for streams. */
  readonly size: number | null;
  /** Fill buf[0, length) from the current position; returns bytes read, 0 at the end. */
  read(buf: Buffer, length: number): Promise<number>;
  /**
   * For sources backed by a file a worker thread may read itself (regular files, block
   * devices): where the data of [position, position + length) lies. Calls may overlap.
   * Optional; streams do not have it.
   */
  directRead?(position: number, length: number): Promise<DirectRead>;
  close(): Promise<void>;
}

/** How to read a range of a source straight from its file descriptor (see Source.directRead). */
export interface DirectRead {
  /** The source's descriptor; valid until the source is closed. */
  fd: number;
  /** Bytes in the range: clipped to the size, and fewer when the file shrank since it was opened. */
  length: number;
  /**
   * The ranges [from, to) holding data, relative to the position, in order; the rest of
   * the range is hole and reads as zeros. null: all data. Empty: all hole.
   */
  extents: Array<[number, number]> | null;
  /** The source's path, for messages. */
  what: string;
}

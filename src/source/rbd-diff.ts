/**
 * The stream `rbd export-diff` writes ("rbd diff v1", and "v2" should a tool emit it), read
 * as it arrives: a banner line, metadata records (tag 'f' from-snapshot name, 't'
 * to-snapshot name, 's' image size), data records ('w' offset, length and that many bytes;
 * 'z' offset and length, to be zeros) and 'e' at the end. v2 puts a le64 length after each
 * tag but 'e' (so unknown metadata can be skipped). Described in Ceph's doc/dev/rbd-diff.rst.
 *
 * Every byte is treated as hostile: lengths are bounded before anything is allocated,
 * extents must lie inside the announced size and come in image order without overlapping
 * (the source that reads them moves forward only), the stream must end with 'e' and
 * nothing after it. Any other shape is a DiffStreamError, never a guess.
 */
import { GenvaultError } from '../util/errors.js';

export class DiffStreamError extends GenvaultError {
  constructor(message: string) {
    super(message, 'RBD_DIFF');
  }
}

/** Bytes pulled from an async stream on demand: exact reads, the rest kept for the next. */
export class ByteReader {
  private it: AsyncIterator<Buffer>;
  private buf = Buffer.alloc(0);
  private eof = false;
  /** Bytes handed out so far (where the next read starts, for messages). */
  consumed = 0;

  constructor(src: AsyncIterable<Buffer>) {
    this.it = src[Symbol.asyncIterator]();
  }

  private async more(): Promise<boolean> {
    if (this.eof) return false;
    const r = await this.it.next();
    if (r.done) {
      this.eof = true;
      return false;
    }
    this.buf = this.buf.length ? Buffer.concat([this.buf, r.value]) : Buffer.from(r.value);
    return true;
  }

  /** Fill dst, or throw `truncated` if the stream ends first. */
  async readInto(dst: Buffer): Promise<void> {
    let got = 0;
    for (;;) {
      const n = Math.min(this.buf.length, dst.length - got);
      this.buf.copy(dst, got, 0, n);
      this.buf = this.buf.subarray(n);
      got += n;
      this.consumed += n;
      if (got === dst.length) return;
      if (!(await this.more())) throw new DiffStreamError(`the stream ends at byte ${this.consumed}, in the middle of a record`);
    }
  }

  async read(n: number): Promise<Buffer> {
    const b = Buffer.alloc(n);
    await this.readInto(b);
    return b;
  }

  async skip(n: number): Promise<void> {
    for (let left = n; left > 0; ) {
      const k = Math.min(left, 1 << 20);
      await this.readInto(Buffer.alloc(k));
      left -= k;
    }
  }

  /** Whether the stream has ended (nothing more to read). */
  async atEnd(): Promise<boolean> {
    return this.buf.length === 0 && !(await this.more());
  }
}

export interface DiffHeader {
  version: 1 | 2;
  /** The snapshot the diff starts from ('f'); null: from nothing (every allocated extent). */
  from: string | null;
  /** The snapshot it reaches ('t'); null: the image's head. */
  to: string | null;
  /** The image's size at `to` ('s'). */
  size: number;
}

/** A changed extent: 'w' with `length` bytes of data to read next (data()), 'z' reading as zeros. */
export interface DiffExtent {
  tag: 'w' | 'z';
  offset: number;
  length: number;
}

const BANNER_V1 = 'rbd diff v1\n';
const BANNER_V2 = 'rbd diff v2\n';
/** Snapshot names are short; a longer one is not a snapshot name. */
const MAX_NAME = 4096;

export class DiffReader {
  /** Data bytes of the current 'w' extent not yet read. */
  private left = 0;
  /** Where the extent before ended: the next must start there or later. */
  private lastEnd = 0;
  private ended = false;

  private constructor(
    private r: ByteReader,
    readonly header: DiffHeader,
    /** The first data record (or 'e'), read with the metadata. */
    private pending: DiffExtent | 'e' | null,
  ) {}

  private static fail(r: ByteReader, why: string): never {
    throw new DiffStreamError(`malformed rbd diff stream at byte ${r.consumed}: ${why}`);
  }

  /** Reads the banner and the metadata records, up to the first data record. */
  static async open(r: ByteReader): Promise<DiffReader> {
    const banner = (await r.read(BANNER_V1.length)).toString('latin1');
    const version = banner === BANNER_V1 ? 1 : banner === BANNER_V2 ? 2 : DiffReader.fail(r, `banner ${JSON.stringify(banner)} is not "rbd diff v1" or "v2"`);
    let from: string | null = null;
    let to: string | null = null;
    let size: number | null = null;
    const seen = new Set<string>();
    for (;;) {
      const tag = String.fromCharCode((await r.read(1))[0]!);
      if (tag === 'w' || tag === 'z' || tag === 'e') {
        if (size === null) DiffReader.fail(r, 'no size record before the data');
        const h: DiffHeader = { version, from, to, size };
        const first = tag === 'e' ? 'e' : await DiffReader.extent(r, version, tag, size, 0);
        return new DiffReader(r, h, first);
      }
      if (seen.has(tag)) DiffReader.fail(r, `a second '${tag}' record`);
      seen.add(tag);
      const recLen = version === 2 ? await DiffReader.u64(r, 'record length') : null;
      if (tag === 'f' || tag === 't') {
        const name = await DiffReader.name(r, recLen);
        if (tag === 'f') from = name;
        else to = name;
      } else if (tag === 's') {
        if (recLen !== null && recLen !== 8) DiffReader.fail(r, `size record of ${recLen} bytes`);
        size = await DiffReader.u64(r, 'image size');
      } else if (recLen !== null) {
        await r.skip(recLen); // v2 lets unknown metadata be skipped
      } else {
        DiffReader.fail(r, `unknown record tag 0x${tag.charCodeAt(0).toString(16)}`);
      }
    }
  }

  private static async u64(r: ByteReader, what: string): Promise<number> {
    const v = (await r.read(8)).readBigUInt64LE();
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) DiffReader.fail(r, `${what} ${v} is out of range`);
    return Number(v);
  }

  private static async name(r: ByteReader, recLen: number | null): Promise<string> {
    const n = (await r.read(4)).readUInt32LE();
    if (n > MAX_NAME) DiffReader.fail(r, `a snapshot name of ${n} bytes`);
    if (recLen !== null && recLen !== 4 + n) DiffReader.fail(r, `record length ${recLen} for a name of ${n} bytes`);
    return (await r.read(n)).toString('utf8');
  }

  /** The body of a 'w' or 'z' record (its tag read), checked against the size and the extent before. */
  private static async extent(r: ByteReader, version: 1 | 2, tag: 'w' | 'z', size: number, lastEnd: number): Promise<DiffExtent> {
    const recLen = version === 2 ? await DiffReader.u64(r, 'record length') : null;
    const offset = await DiffReader.u64(r, 'offset');
    const length = await DiffReader.u64(r, 'length');
    if (recLen !== null && recLen !== 16 + (tag === 'w' ? length : 0)) DiffReader.fail(r, `record length ${recLen} for a '${tag}' extent of ${length} bytes`);
    if (offset > size || length > size - offset) DiffReader.fail(r, `extent ${offset}+${length} lies beyond the image size ${size}`);
    if (offset < lastEnd) DiffReader.fail(r, `extent at ${offset} overlaps or precedes the one before (which ends at ${lastEnd})`);
    return { tag, offset, length };
  }

  /**
   * The next changed extent in image order, or null after 'e' (then the stream must have
   * ended). Data of the extent before that was not read is skipped.
   */
  async next(): Promise<DiffExtent | null> {
    if (this.ended) return null;
    if (this.left) await this.r.skip(this.left);
    this.left = 0;
    let rec = this.pending;
    this.pending = null;
    if (rec === null) {
      const tag = String.fromCharCode((await this.r.read(1))[0]!);
      if (tag === 'w' || tag === 'z') rec = await DiffReader.extent(this.r, this.header.version, tag, this.header.size, this.lastEnd);
      else if (tag === 'e') rec = 'e';
      else DiffReader.fail(this.r, `record tag 0x${tag.charCodeAt(0).toString(16)} among the data records`);
    }
    if (rec === 'e') {
      this.ended = true;
      if (!(await this.r.atEnd())) DiffReader.fail(this.r, 'bytes after the end record');
      return null;
    }
    this.lastEnd = rec.offset + rec.length;
    if (rec.tag === 'w') this.left = rec.length;
    if (rec.length === 0) return this.next(); // says nothing; harmless
    return rec;
  }

  /** The next dst.length bytes of the current 'w' extent's data. */
  async data(dst: Buffer): Promise<void> {
    if (dst.length > this.left) throw new Error(`DiffReader.data: ${dst.length} bytes asked, ${this.left} left in the extent`);
    await this.r.readInto(dst);
    this.left -= dst.length;
  }
}

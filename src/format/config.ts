/**
 * Repository configuration (config.json) and on-disk constants.
 * The byte layout of everything named here is described in src/format/FORMAT.md;
 * change both together and bump FORMAT_VERSION when old readers would misread.
 */
import { randomBytes } from 'node:crypto';
import { GenvaultError } from '../util/errors.js';
import { tryParseDuration } from '../util/duration.js';

export const FORMAT_NAME = 'genvault-repository';
/** The highest version this genvault reads: 7, an encrypted repository with a sealed index (FORMAT.md). */
export const FORMAT_VERSION = 7;
/**
 * What an unencrypted repository is made with and upgraded to: version 6 differs only in
 * encryption, so an unencrypted repository stays readable by genvaults that know 5.
 */
export const PLAIN_FORMAT_VERSION = 5;
/** The first version of encrypted repositories (6: sealed pack records, plaintext index). */
export const ENCRYPTED_FORMAT_VERSION = 6;
/** Encrypted repositories whose index is sealed too (names keyed, records sealed): what `init` makes. */
export const INDEX_SEALED_VERSION = 7;

export interface ChunkingParams {
  /** Boundaries are only ever placed at multiples of this (filesystem block size). */
  block: number;
  /** Smallest data chunk, except at forced cuts (segment ends, zero/data transitions after min). */
  min: number;
  /** A block ends a chunk when (blockHash & mask) === 0; mask = 2^bits - 1. */
  maskBits: number;
  /** Largest chunk; also the size of all-zero chunks. */
  max: number;
  /** Sources are cut into independent segments of this size (forced boundaries). */
  segment: number;
}

export interface RepoConfig {
  format: typeof FORMAT_NAME;
  version: number;
  id: string;
  created: string;
  digest: 'sha256';
  chunking: ChunkingParams & { algorithm: 'block-cdc' };
  /**
   * `group` (format 3): a backup compresses each run of a segment's new chunks up to this
   * many raw bytes as one zstd frame (a group record); 0 or absent: one frame per chunk.
   */
  compression: { algorithm: 'zstd'; level: number; group?: number };
  /** A writer starts a new pack file once its current one exceeds this many bytes. */
  packTargetSize: number;
  /** Map leaves are cut after a data chunk whose digest's first byte is 0 (about 1 in 256). */
  leaf: { minChunks: number; maxChunks: number };
  /**
   * Optional (absent in repositories made before it existed): guards on deletion.
   * `minAge`: generations younger than this are never pruned or forgotten (unless
   * forced); a duration such as "1d", "36h", "0". Default DEFAULT_MIN_AGE.
   */
  guards?: { minAge?: string };
  /**
   * Optional (`init --group`): a group that may read the repository (directories 2750,
   * files 0640, that group). Absent: only the owner (directories 0700, files 0600).
   * Readers that do not know it ignore it; see perms.ts.
   */
  group?: string;
  /**
   * Format 6: the repository is encrypted (FORMAT.md "Version 6: encryption"); its master
   * key is in key slots under keys/. `keyCheck` ties a master key to this repository.
   */
  encryption?: { cipher: 'aes-256-gcm'; identity: 'hmac-sha256'; keyCheck: string };
}

/** Group names as `groupadd` takes them, or a numeric gid (config.json `group`). */
export const GROUP_NAME_RE = /^(?:[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?|\d{1,10})$/;

/**
 * Raw bytes per group record in new repositories. On the bench disk, 1 MiB groups at zstd
 * level 2 stored 2.5% less than one level-3 frame per chunk, with 10% less CPU for a first
 * backup (native-notes/performance.md).
 */
export const GROUP_BYTES = 1 << 20;

/** Minimum age of a generation before prune/forget may remove it, when config.json does not say. */
export const DEFAULT_MIN_AGE = '1d';

/** The repository's minimum-age guard in milliseconds (config `guards.minAge`, default 1 day). */
export function configMinAge(c: RepoConfig): { ms: number; text: string } {
  const text = c.guards?.minAge ?? DEFAULT_MIN_AGE;
  return { ms: tryParseDuration(text) ?? tryParseDuration(DEFAULT_MIN_AGE)!, text };
}

export function defaultConfig(): RepoConfig {
  return {
    format: FORMAT_NAME,
    version: PLAIN_FORMAT_VERSION,
    id: randomBytes(16).toString('hex'),
    created: new Date().toISOString(),
    digest: 'sha256',
    chunking: {
      algorithm: 'block-cdc',
      block: 4096,
      min: 16 * 1024,
      maskBits: 5,
      max: 512 * 1024,
      segment: 8 * 1024 * 1024,
    },
    compression: { algorithm: 'zstd', level: 2, group: GROUP_BYTES },
    packTargetSize: 256 * 1024 * 1024,
    leaf: { minChunks: 32, maxChunks: 1024 },
    guards: { minAge: DEFAULT_MIN_AGE },
  };
}

/** Validate a parsed config.json; throws one clear line on anything off. */
export function checkConfig(raw: unknown, file: string): RepoConfig {
  const bad = (why: string) =>
    new GenvaultError(`${file}: corrupt repository config: ${why}`, 'BAD_CONFIG');
  if (typeof raw !== 'object' || raw === null) throw bad('not a JSON object');
  const c = raw as Partial<RepoConfig>;
  if (c.format !== FORMAT_NAME) throw bad(`"format" is not "${FORMAT_NAME}"`);
  if (typeof c.version !== 'number' || !Number.isInteger(c.version)) throw bad('"version" missing');
  if (c.version > FORMAT_VERSION) {
    throw new GenvaultError(
      `${file}: repository format version ${c.version} is newer than this genvault supports (${FORMAT_VERSION}); upgrade genvault`,
      'NEWER_FORMAT',
    );
  }
  if (c.version < 1) throw bad(`unknown format version ${c.version}`);
  if (typeof c.id !== 'string' || !/^[0-9a-f]{32}$/.test(c.id)) throw bad('"id" missing or malformed');
  if (c.digest !== 'sha256') throw bad(`unsupported digest ${JSON.stringify(c.digest)}`);
  checkChunking(c.chunking, bad);
  if (!c.compression || c.compression.algorithm !== 'zstd') throw bad('"compression.algorithm" must be "zstd"');
  if (typeof c.compression.level !== 'number') throw bad('"compression.level" invalid');
  const g = c.compression.group;
  if (g !== undefined && (typeof g !== 'number' || !Number.isInteger(g) || g < 0 || g > 16 << 20)) {
    throw bad('"compression.group" must be a byte count from 0 to 16 MiB');
  }
  if (g && c.version < 3) throw bad('"compression.group" needs format version 3');
  if (typeof c.packTargetSize !== 'number' || c.packTargetSize < 1 << 20) throw bad('"packTargetSize" invalid');
  if (!c.leaf || !(c.leaf.minChunks > 0) || !(c.leaf.maxChunks >= c.leaf.minChunks)) throw bad('"leaf" invalid');
  if (c.guards !== undefined) {
    if (typeof c.guards !== 'object' || c.guards === null) throw bad('"guards" invalid');
    const m = c.guards.minAge;
    if (m !== undefined && (typeof m !== 'string' || tryParseDuration(m) === null)) {
      throw bad('"guards.minAge" must be a duration such as "1d", "36h" or "0"');
    }
  }
  if (c.group !== undefined && (typeof c.group !== 'string' || !GROUP_NAME_RE.test(c.group))) {
    throw bad('"group" must be a group name or number');
  }
  const e = c.encryption;
  if (e !== undefined) {
    if (typeof e !== 'object' || e === null || e.cipher !== 'aes-256-gcm' || e.identity !== 'hmac-sha256') throw bad('"encryption" invalid');
    if (typeof e.keyCheck !== 'string' || !/^[0-9a-f]{32}$/.test(e.keyCheck)) throw bad('"encryption.keyCheck" invalid');
  }
  // Versions 6 and 7 are exactly "encrypted": an old genvault must never take an encrypted repository for one it knows.
  if ((e !== undefined) !== (c.version >= ENCRYPTED_FORMAT_VERSION)) throw bad(`format version ${c.version} ${e ? 'cannot be' : 'must be'} encrypted`);
  return c as RepoConfig;
}

/** The chunking parameters' own rules (a config file's, or a remote server's). */
export function checkChunking(ch: (ChunkingParams & { algorithm?: string }) | undefined, bad: (why: string) => Error): void {
  if (!ch || ch.algorithm !== 'block-cdc') throw bad('"chunking.algorithm" must be "block-cdc"');
  for (const k of ['block', 'min', 'maskBits', 'max', 'segment'] as const) {
    if (typeof ch[k] !== 'number' || !Number.isInteger(ch[k]) || ch[k] <= 0) throw bad(`"chunking.${k}" invalid`);
  }
  if (ch.min % ch.block || ch.max % ch.block || ch.segment % ch.max || ch.min > ch.max) {
    throw bad('chunk sizes must be multiples of the block size, segment a multiple of max');
  }
}

/**
 * Image names become directory names in the mount and lock file names. `NS:NAME` is an
 * image of namespace NS, written by a `genvault serve --namespace NS` session
 * (src/remote/access.ts); the local admin sees and names it so.
 */
export const IMAGE_NAME_RE = /^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,63}:)?[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;

export function checkImageName(name: string): string {
  if (!IMAGE_NAME_RE.test(name) || name === 'latest') {
    throw new GenvaultError(
      `invalid image name ${JSON.stringify(name)}: use letters, digits, '.', '_' and '-' (not starting with '.' or '-'; NAMESPACE:NAME for an image of a namespace)`,
      'USAGE',
      2,
    );
  }
  return name;
}

/** The largest group record new chunks are compressed into (0: none; groups came with format 3). */
export function groupSize(cfg: RepoConfig): number {
  return cfg.version >= 3 ? (cfg.compression.group ?? 0) : 0;
}

/**
 * What `genvault sync` needs of the two repositories it copies between, as two small
 * interfaces: a source it reads generations, map leaves and stored records from, and a
 * destination it asks what it lacks and hands records to. The copy loop (sync.ts) sees
 * nothing else of either repository, so a remote endpoint (a repository served over SSH)
 * can implement the same interfaces later; the local implementations are local-source.ts
 * and local-destination.ts.
 *
 * Records cross the interfaces as their stored bytes (header and payload, exactly as in
 * the source pack): nothing is decompressed and compressed again, and sealed records
 * (format 6) are copied as they are, which is why both repositories must share their
 * repository id and keys (`genvault init --like`).
 */
import type { IndexKeys } from '../format/index-seal.js';
import type { RepoConfig } from '../format/config.js';
import type { ChunkLocation } from '../format/pack.js';
import type { Generation } from '../format/generation.js';
import type { LeafRef } from '../format/chunkmap.js';
import type { RetentionRules } from '../lifecycle/retention.js';
import type { RepoKeys } from '../format/crypto.js';

/** A generation being read from the source: pinned there until released. */
export interface PinnedGeneration {
  /** The record as the source holds it now (tags and protection current). */
  gen: Generation;
  /** The generation's top-level map (exactly as stored under `m`), and its leaves, checked against the record. */
  top: Buffer;
  refs: LeafRef[];
  release(): Promise<void>;
}

export interface SyncSource {
  /** For messages: where the repository is. */
  readonly description: string;
  readonly config: RepoConfig;
  /** Generations, oldest first per image (all images, or these). */
  generations(names?: string[]): Promise<Generation[]>;
  /** Read a sealed index with these keys (of a destination with the same id and key check). */
  adoptIndexKeys?(keys: IndexKeys): void;
  /**
   * Pin a generation against a concurrent forget + gc at the source and read its map;
   * null when it is gone (forgotten meanwhile).
   */
  pin(gen: Generation): Promise<PinnedGeneration | null>;
  /** Map leaves' bytes, each checked against its digest (a missing or damaged one throws). */
  leaves(digests: Buffer[]): Promise<Buffer[]>;
  /** Where chunks are stored (null: the source's index has no entry). */
  locate(digests: Buffer[]): Promise<Array<ChunkLocation | null>>;
  /**
   * The stored bytes of the record at `loc` (header and payload; for a group member the
   * whole group record), as read: not checked here, the copy loop checks them.
   */
  readRecord(loc: ChunkLocation): Promise<Buffer>;
  close(): Promise<void>;
}

/** One chunk a record copied to the destination holds. */
export interface RecordMember {
  digest: Buffer;
  rawLength: number;
  /** Group members: where it starts in the group's decoded bytes. */
  inner?: number;
}

export interface SyncDestination {
  readonly description: string;
  readonly config: RepoConfig;
  /** The keys the destination seals its metadata records with (format 6), else null. */
  readonly keys: RepoKeys | null;
  /** The keys of the destination's sealed index (format 7; same as the source's), when it holds them. */
  readonly indexKeys?: IndexKeys | null;
  /** Generations (all images, or these), oldest first per image. */
  generations(names?: string[]): Promise<Generation[]>;
  /** Register as a writer: everything below happens between begin() and end()/abort(). */
  begin(): Promise<void>;
  /** Hold the image's lock while its generations are copied (one writer per image, as backups). */
  lockImage(name: string): Promise<void>;
  unlockImage(): Promise<void>;
  /** For each chunk, whether the destination lacks a copy a new generation may use. */
  lackingChunks(digests: Buffer[]): Promise<boolean[]>;
  /** For each leaf, whether the destination's index lacks it. */
  lackingLeaves(digests: Buffer[]): Promise<boolean[]>;
  /**
   * Append a record (checked by the caller) and give these of its chunks index entries
   * pointing into it; made durable and committed by the next flush.
   */
  putRecord(record: Buffer, members: RecordMember[]): Promise<void>;
  /**
   * A destination that checks records itself (a served repository, which holds the key):
   * the copy loop hands it each record as read, with the location and the chunk it was
   * read for, instead of checking it and calling putRecord; returns the chunks it put.
   */
  copyRecord?(record: Buffer, loc: ChunkLocation, digest: Buffer): Promise<number>;
  /** Map leaves: a leaf record each, and their `l` entries, committed by the next flush. */
  putLeaves(leaves: Array<{ digest: Buffer; bytes: Buffer }>): Promise<void>;
  /** Make everything put so far durable, then commit its index entries in one batch. */
  flush(): Promise<void>;
  /**
   * After a flush: the generation's map and record into a pack of their own, synced, then
   * one batch with that pack's size, `m` and `g`. False when the generation is there already.
   */
  commitGeneration(gen: Generation, top: Buffer): Promise<boolean>;
  /** Bring a generation's tags and protection to these (a change record, as protect does); true if they changed. */
  updateState(gen: Generation, state: { tags: string[]; protected: boolean }): Promise<boolean>;
  /** Apply retention rules to these images, as `genvault prune` does; the generations removed. */
  prune(names: string[], rules: RetentionRules, opts: { minAgeMs?: number; dryRun?: boolean }): Promise<Generation[]>;
  /** Stored bytes appended to packs so far (records, metadata and tables of contents). */
  readonly storedBytes: number;
  /** Release the registration (after a success: everything is committed). */
  end(): Promise<void>;
  /** After a failure: remove what was written and not committed. */
  abort(): Promise<void>;
  close(): Promise<void>;
}

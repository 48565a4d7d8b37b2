import { describe, expect, it } from 'vitest';
import { Generation, parseTarget, resolveRevision, generationFileName } from '../src/format/generation.js';

function gen(id: string, created: string): Generation {
  return {
    id, name: 'vm1', created, size: 1, leaves: 1, tags: [], source: 'x', parent: null,
    chunking: { block: 4096, min: 16384, max: 262144, maskBits: 4 },
    stats: { bytesRead: 1, zeroBytes: 0, chunks: 1, newChunks: 1, newBytes: 1, newStored: 1, durationMs: 1 },
  };
}

const gens = [
  gen('aa11000000000001', '2026-11-20T01:00:00.000Z'),
  gen('ab22000000000002', '2026-11-21T01:00:00.000Z'),
  gen('ab23000000000003', '2026-11-22T01:00:00.000Z'),
];

describe('revision specs', () => {
  it('resolves latest, N, id, unique prefix and dates', () => {
    expect(resolveRevision(gens, 'vm1', 'latest').id).toBe('ab23000000000003');
    expect(resolveRevision(gens, 'vm1', '0').id).toBe('ab23000000000003');
    expect(resolveRevision(gens, 'vm1', '2').id).toBe('aa11000000000001');
    expect(resolveRevision(gens, 'vm1', 'aa11000000000001').id).toBe('aa11000000000001');
    expect(resolveRevision(gens, 'vm1', 'ab22').id).toBe('ab22000000000002');
    expect(resolveRevision(gens, 'vm1', '2026-11-21').id).toBe('ab22000000000002');
    expect(resolveRevision(gens, 'vm1', '2026-11-21T00:59').id).toBe('aa11000000000001');
    expect(resolveRevision(gens, 'vm1', '2026-11-22T03:00:00+02:00').id).toBe('ab23000000000003');
  });

  it('rejects ambiguous, unknown and out-of-range revisions with one line', () => {
    expect(() => resolveRevision(gens, 'vm1', 'ab2')).toThrow(/ambiguous revision, matches ab22000000000002, ab23000000000003/);
    expect(() => resolveRevision(gens, 'vm1', 'ffff')).toThrow(/vm1@ffff: unknown revision/);
    expect(() => resolveRevision(gens, 'vm1', '3')).toThrow(/only 3 generation/);
    expect(() => resolveRevision(gens, 'vm1', '2026-11-19')).toThrow(/no generation at or before/);
    expect(() => resolveRevision(gens, 'vm1', 'yesterday')).toThrow(/unknown revision/);
  });

  it('parses NAME@REV and names mount files so ls sorts them by time', () => {
    expect(parseTarget('vm1')).toEqual({ name: 'vm1', rev: 'latest' });
    expect(parseTarget('vm1@3')).toEqual({ name: 'vm1', rev: '3' });
    expect(() => parseTarget('../etc@1')).toThrow(/invalid image name/);
    const names = gens.map(generationFileName);
    expect(names[0]).toBe('2026-11-20T010000.000Z-aa110000.img');
    expect([...names].sort()).toEqual(names);
  });
});

/**
 * Retention policy as a pure function: generated timelines, every rule alone and combined,
 * ISO week edges, protected generations, tags, the minimum-age guard and the refusal to
 * empty an image. Expected survivors come from an independent reference (group by
 * period, take the newest of the N most recent periods), not from the implementation.
 */
import { describe, expect, it } from 'vitest';
import { RetentionInput, RetentionRules, applyRetention, isoWeek } from '../src/lifecycle/retention.js';
import { parseDuration, formatDuration, tryParseDuration } from '../src/util/duration.js';
import { GenvaultError } from '../src/util/errors.js';
import { prng } from './helpers.js';

const H = 3_600_000;
const D = 24 * H;
const NOW = Date.parse('2026-11-23T16:00:00Z');

let seq = 0;
function g(created: string | number, extra: Partial<RetentionInput> = {}): RetentionInput {
  const iso = new Date(created).toISOString();
  return { id: (++seq).toString(16).padStart(16, '0'), name: 'vm1', created: iso, tags: [], ...extra };
}

function kept(gens: RetentionInput[], rules: RetentionRules, minAgeMs = 0, now = NOW): string[] {
  return applyRetention(gens, rules, { now, minAgeMs })
    .filter((d) => d.keep)
    .map((d) => d.gen.created)
    .sort();
}

function reasonsOf(gens: RetentionInput[], rules: RetentionRules, minAgeMs = 0): Record<string, string[]> {
  const out: Record<string, string[]> = {};
  for (const d of applyRetention(gens, rules, { now: NOW, minAgeMs })) out[d.gen.created] = d.reasons;
  return out;
}

// --- independent reference -------------------------------------------------------------

/** ISO week by the ordinal-date formula (Wikipedia), not by the Thursday trick used in the code. */
function refIsoWeek(t: number): string {
  const d = new Date(t);
  const y = d.getUTCFullYear();
  const ordinal = Math.round((Date.UTC(y, d.getUTCMonth(), d.getUTCDate()) - Date.UTC(y, 0, 1)) / D) + 1;
  const weekday = d.getUTCDay() || 7;
  let week = Math.floor((ordinal - weekday + 10) / 7);
  const weeksIn = (yy: number) => {
    const p = (x: number) => (x + Math.floor(x / 4) - Math.floor(x / 100) + Math.floor(x / 400)) % 7;
    return p(yy) === 4 || p(yy - 1) === 3 ? 53 : 52;
  };
  let wy = y;
  if (week < 1) {
    wy = y - 1;
    week = weeksIn(wy);
  } else if (week > weeksIn(y)) {
    wy = y + 1;
    week = 1;
  }
  return `${wy}-W${String(week).padStart(2, '0')}`;
}

const refPeriod: Record<string, (t: number) => string> = {
  keepHourly: (t) => new Date(t).toISOString().slice(0, 13),
  keepDaily: (t) => new Date(t).toISOString().slice(0, 10),
  keepWeekly: refIsoWeek,
  keepMonthly: (t) => new Date(t).toISOString().slice(0, 7),
  keepYearly: (t) => new Date(t).toISOString().slice(0, 4),
};

function reference(gens: RetentionInput[], rules: RetentionRules, minAgeMs: number): string[] {
  const keep = new Set<string>();
  const newestFirst = [...gens].sort((a, b) => Date.parse(b.created) - Date.parse(a.created));
  newestFirst.slice(0, rules.keepLast ?? 0).forEach((x) => keep.add(x.created));
  for (const [rule, period] of Object.entries(refPeriod)) {
    const n = rules[rule as keyof RetentionRules] as number | undefined;
    if (!n) continue;
    const newestOf = new Map<string, RetentionInput>();
    for (const x of newestFirst) {
      const p = period(Date.parse(x.created));
      if (!newestOf.has(p)) newestOf.set(p, x);
    }
    const periods = [...newestOf.keys()].sort().reverse().slice(0, n);
    for (const p of periods) keep.add(newestOf.get(p)!.created);
  }
  for (const x of gens) {
    if (x.tags.some((t) => rules.keepTags?.includes(t))) keep.add(x.created);
    if (x.protected) keep.add(x.created);
    if (NOW - Date.parse(x.created) < minAgeMs) keep.add(x.created);
  }
  return [...keep].sort();
}

/** ~2.5 years back from NOW, gaps between 20 minutes and 3 days, some tagged, a few protected. */
function timeline(seed: number): RetentionInput[] {
  const r = prng(seed, 4 * 2000);
  const out: RetentionInput[] = [];
  let t = NOW - 10 * 60_000;
  for (let i = 0; t > NOW - 900 * D; i++) {
    const x = r.readUInt32LE((i * 4) % (r.length - 4));
    out.push(g(t, { tags: x % 17 === 0 ? ['monthly'] : x % 5 === 0 ? ['daily'] : [], protected: x % 97 === 0 || undefined }));
    t -= 20 * 60_000 + (x % (3 * D));
  }
  return out.reverse();
}

// --- tests ---------------------------------------------------------------------------------

describe('ISO weeks', () => {
  it.each([
    ['2026-11-20T12:00:00Z', '2026-W47'],
    ['2026-11-23T00:00:00Z', '2026-W48'], // Monday starts the week
    ['2026-11-22T23:59:59Z', '2026-W47'], // Sunday ends it
    ['2020-12-31T12:00:00Z', '2020-W53'],
    ['2021-01-03T23:00:00Z', '2020-W53'], // January days in the previous year's last week
    ['2021-01-04T00:00:00Z', '2021-W01'],
    ['2024-12-30T10:00:00Z', '2025-W01'], // December days in next year's first week
    ['2026-12-31T10:00:00Z', '2026-W53'],
    ['2027-01-03T10:00:00Z', '2026-W53'],
    ['2027-01-04T10:00:00Z', '2027-W01'],
    ['2008-12-29T00:00:00Z', '2009-W01'],
    ['2010-01-03T00:00:00Z', '2009-W53'],
  ])('%s is in %s', (t, w) => {
    expect(isoWeek(Date.parse(t))).toBe(w);
    expect(refIsoWeek(Date.parse(t))).toBe(w);
  });

  it('agrees with the reference for every day of 40 years', () => {
    for (let t = Date.parse('1995-01-01T13:00:00Z'); t < Date.parse('2035-01-01T00:00:00Z'); t += D) {
      expect(isoWeek(t)).toBe(refIsoWeek(t));
    }
  });
});

describe('retention rules', () => {
  it('keep-last keeps the N newest', () => {
    const gens = Array.from({ length: 10 }, (_, i) => g(NOW - 10 * D + i * H));
    expect(kept(gens, { keepLast: 3 })).toEqual(gens.slice(7).map((x) => x.created));
    expect(reasonsOf(gens, { keepLast: 3 })[gens[9]!.created]).toEqual(['last 3']);
    expect(kept(gens, { keepLast: 50 })).toHaveLength(10);
  });

  it('keep-daily keeps the newest of each day, counting only days that have a generation', () => {
    const gens = ['2026-11-01T05:00:00Z', '2026-11-01T22:00:00Z', '2026-11-05T01:00:00Z', '2026-11-06T08:00:00Z', '2026-11-06T23:59:59Z', '2026-11-20T00:00:00Z'].map((t) => g(t));
    expect(kept(gens, { keepDaily: 3 })).toEqual(['2026-11-05T01:00:00.000Z', '2026-11-06T23:59:59.000Z', '2026-11-20T00:00:00.000Z']);
    const r = reasonsOf(gens, { keepDaily: 3 });
    expect(r['2026-11-20T00:00:00.000Z']).toEqual(['daily 2026-11-20']);
    expect(r['2026-11-06T08:00:00.000Z']).toEqual([]);
    expect(kept(gens, { keepDaily: 10 })).toHaveLength(4);
  });

  it('keep-hourly keeps the newest of each UTC hour', () => {
    const gens = Array.from({ length: 12 }, (_, i) => g(Date.parse('2026-11-22T10:00:00Z') + i * 20 * 60_000));
    expect(kept(gens, { keepHourly: 2 })).toEqual(['2026-11-22T12:40:00.000Z', '2026-11-22T13:40:00.000Z']);
    expect(reasonsOf(gens, { keepHourly: 1 })['2026-11-22T13:40:00.000Z']).toEqual(['hourly 2026-11-22T13']);
  });

  it('keep-weekly uses ISO weeks across the year end; monthly and yearly use calendar periods', () => {
    const gens = ['2026-12-20T12:00:00Z', '2026-12-27T12:00:00Z', '2026-12-28T12:00:00Z', '2027-01-02T12:00:00Z', '2027-01-03T12:00:00Z', '2027-01-04T12:00:00Z'].map((t) => g(t));
    const now = Date.parse('2027-01-05T00:00:00Z');
    const keepW = (n: number) => kept(gens, { keepWeekly: n }, 0, now);
    expect(keepW(2)).toEqual(['2027-01-03T12:00:00.000Z', '2027-01-04T12:00:00.000Z']);
    expect(keepW(3)).toEqual(['2026-12-27T12:00:00.000Z', '2027-01-03T12:00:00.000Z', '2027-01-04T12:00:00.000Z']);
    const r = applyRetention(gens, { keepWeekly: 3, keepYearly: 2, keepMonthly: 1 }, { now, minAgeMs: 0 });
    const by = Object.fromEntries(r.map((d) => [d.gen.created.slice(0, 10), d.reasons]));
    expect(by['2027-01-04']).toEqual(['weekly 2027-W01', 'monthly 2027-01', 'yearly 2027']);
    expect(by['2027-01-03']).toEqual(['weekly 2026-W53']);
    expect(by['2026-12-28']).toEqual(['yearly 2026']);
    expect(by['2026-12-27']).toEqual(['weekly 2026-W52']);
    expect(by['2026-12-20']).toEqual([]);
  });

  it('tags, protected and min-age keep generations whatever the rules say', () => {
    const gens = [
      g(NOW - 100 * D, { tags: ['monthly'] }),
      g(NOW - 90 * D, { protected: true }),
      g(NOW - 80 * D),
      g(NOW - 3 * D),
      g(NOW - 20 * H),
      g(NOW - 1 * H),
    ];
    const d = applyRetention(gens, { keepLast: 1, keepTags: ['monthly'] }, { now: NOW, minAgeMs: D });
    expect(d.map((x) => [x.keep, x.reasons])).toEqual([
      [true, ['tag monthly']],
      [true, ['protected']],
      [false, []],
      [false, []],
      [true, ['younger than min-age']],
      [true, ['last 1', 'younger than min-age']],
    ]);
    // min-age 0: only the rules, tags and protection
    expect(kept(gens, { keepLast: 1, keepTags: ['monthly'] }, 0)).toHaveLength(3);
    // a longer guard keeps more
    expect(kept(gens, { keepLast: 1 }, parseDuration('7d'))).toHaveLength(4);
  });

  it('applies rules per image and keeps decisions in input order', () => {
    const a = [g(NOW - 5 * D), g(NOW - 4 * D)];
    const b = [g(NOW - 3 * D, { name: 'vm2' }), g(NOW - 2 * D, { name: 'vm2' })];
    const mixed = [a[0]!, b[0]!, a[1]!, b[1]!];
    const d = applyRetention(mixed, { keepLast: 1 }, { now: NOW, minAgeMs: 0 });
    expect(d.map((x) => x.gen)).toEqual(mixed);
    expect(d.map((x) => x.keep)).toEqual([false, false, true, true]);
  });

  it('refuses to remove every generation of an image unless allowEmpty', () => {
    const gens = [g(NOW - 5 * D), g(NOW - 4 * D), g(NOW - 3 * D, { name: 'vm2', tags: ['keep'] })];
    let err: unknown;
    try {
      applyRetention(gens, { keepTags: ['keep'] }, { now: NOW, minAgeMs: 0 });
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(GenvaultError);
    expect((err as GenvaultError).code).toBe('REFUSED');
    expect((err as GenvaultError).message).toMatch(/refusing to remove all 2 generation\(s\) of image vm1.*--allow-empty/);
    const d = applyRetention(gens, { keepTags: ['keep'] }, { now: NOW, minAgeMs: 0, allowEmpty: true });
    expect(d.map((x) => x.keep)).toEqual([false, false, true]);
    // the min-age guard alone is enough to make it safe
    expect(applyRetention(gens, { keepTags: ['keep'] }, { now: NOW, minAgeMs: 10 * D }).every((x) => x.keep)).toBe(true);
    // no generations at all: nothing to refuse
    expect(applyRetention([], { keepLast: 1 }, { now: NOW, minAgeMs: 0 })).toEqual([]);
  });

  it('rejects missing and invalid rules as usage errors', () => {
    const gens = [g(NOW - 5 * D)];
    for (const rules of [{}, { keepLast: 0 }, { keepTags: [] }, { keepDaily: -1 }, { keepWeekly: 1.5 }] as RetentionRules[]) {
      let err: unknown;
      try {
        applyRetention(gens, rules, { now: NOW, minAgeMs: 0 });
      } catch (e) {
        err = e;
      }
      expect((err as GenvaultError)?.exitCode, JSON.stringify(rules)).toBe(2);
    }
  });
});

describe('generated timelines against the reference', () => {
  const combos: Array<[string, RetentionRules, number]> = [
    ['last 5', { keepLast: 5 }, 0],
    ['hourly 30', { keepHourly: 30 }, 0],
    ['daily 7', { keepDaily: 7 }, 0],
    ['weekly 10', { keepWeekly: 10 }, 0],
    ['monthly 12', { keepMonthly: 12 }, 0],
    ['yearly 5', { keepYearly: 5 }, 0],
    ['daily 7 weekly 4 monthly 12', { keepDaily: 7, keepWeekly: 4, keepMonthly: 12 }, 0],
    ['last 3 daily 14 yearly 2 + tag monthly', { keepLast: 3, keepDaily: 14, keepYearly: 2, keepTags: ['monthly'] }, 0],
    ['everything, min-age 2d', { keepLast: 2, keepHourly: 6, keepDaily: 7, keepWeekly: 5, keepMonthly: 6, keepYearly: 3 }, 2 * D],
    ['weekly 200 (more periods than exist)', { keepWeekly: 200 }, 0],
    ['tag daily only, min-age 36h', { keepTags: ['daily'] }, parseDuration('36h')],
  ];
  for (const seed of [1, 2, 3]) {
    const gens = timeline(seed);
    it.each(combos)(`timeline ${seed}: %s`, (_name, rules, minAge) => {
      expect(gens.length).toBeGreaterThan(300);
      const got = kept(gens, rules, minAge);
      expect(got).toEqual(reference(gens, rules, minAge));
      // every kept generation says why, every removed one has no reason
      for (const d of applyRetention(gens, rules, { now: NOW, minAgeMs: minAge })) expect(d.keep).toBe(d.reasons.length > 0);
    });
  }

  it('period rules keep exactly min(N, periods that have a generation)', () => {
    const gens = timeline(4);
    const days = new Set(gens.map((x) => x.created.slice(0, 10))).size;
    const months = new Set(gens.map((x) => x.created.slice(0, 7))).size;
    const unprotected = gens.map((x) => ({ ...x, protected: undefined }));
    expect(kept(unprotected, { keepDaily: 30 })).toHaveLength(30);
    expect(kept(unprotected, { keepDaily: 100_000 })).toHaveLength(days);
    expect(kept(unprotected, { keepMonthly: 100 })).toHaveLength(months);
  });
});

describe('durations', () => {
  it.each([
    ['0', 0],
    ['90m', 90 * 60_000],
    ['36h', 36 * H],
    ['7d', 7 * D],
    ['2w', 14 * D],
    ['1d12h', 36 * H],
    ['45s', 45_000],
  ])('%s', (text, ms) => {
    expect(parseDuration(text)).toBe(ms);
  });

  it('rejects what is not a duration, and formats back', () => {
    for (const bad of ['', '1', 'd', '1y', '-1d', '1.5h', 'soon']) expect(tryParseDuration(bad)).toBeNull();
    expect(() => parseDuration('1y', '--min-age')).toThrow(/--min-age: "1y" is not a duration/);
    expect(formatDuration(D)).toBe('1d');
    expect(formatDuration(36 * H)).toBe('1d12h');
    expect(formatDuration(0)).toBe('0');
  });
});

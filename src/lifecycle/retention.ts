/**
 * Retention policy: which generations to keep, and why. Pure: no I/O, `now` is given.
 *
 * Semantics are restic's (and borg's, per rule):
 * - keepLast N: the N newest generations of the image.
 * - keepHourly/Daily/Weekly/Monthly/Yearly N: walking from the newest generation back,
 *   the newest generation of each period (UTC hour, UTC day, ISO-8601 week, UTC month,
 *   UTC year) is kept, for the N most recent periods that have a generation at all;
 *   periods without one do not count.
 * - keepTags: generations carrying any of these tags.
 * Rules combine as a union; each kept generation lists every rule that keeps it.
 * On top of the rules, protected generations and generations younger than the minimum
 * age are always kept. Rules apply per image; removing every generation of an image is
 * refused unless `allowEmpty`.
 */
import { GenvaultError, UsageError } from '../util/errors.js';
import { formatDuration } from '../util/duration.js';
import type { Generation } from '../format/generation.js';

export interface RetentionRules {
  keepLast?: number;
  keepHourly?: number;
  keepDaily?: number;
  keepWeekly?: number;
  keepMonthly?: number;
  keepYearly?: number;
  keepTags?: string[];
}

export interface RetentionOptions {
  /** The time to measure ages from (ms since the epoch, or a Date). */
  now: number | Date;
  /** Generations younger than this (ms) are kept whatever the rules say. */
  minAgeMs: number;
  /** Allow removing every generation of an image. */
  allowEmpty?: boolean;
}

export type RetentionInput = Pick<Generation, 'id' | 'name' | 'created' | 'tags'> & { protected?: boolean };

export interface RetentionDecision<G extends RetentionInput = RetentionInput> {
  gen: G;
  keep: boolean;
  /** Why it is kept (empty when it is removed). */
  reasons: string[];
}

const PERIOD_RULES = [
  ['keepHourly', 'hourly'],
  ['keepDaily', 'daily'],
  ['keepWeekly', 'weekly'],
  ['keepMonthly', 'monthly'],
  ['keepYearly', 'yearly'],
] as const;

type PeriodKind = (typeof PERIOD_RULES)[number][1];

const pad = (n: number, w = 2) => String(n).padStart(w, '0');

/** ISO-8601 week of a UTC instant: "2026-W47" (the week-year can differ from the calendar year). */
export function isoWeek(t: number): string {
  const d = new Date(t);
  // The Thursday of this ISO week decides the week-year.
  const day = (d.getUTCDay() + 6) % 7; // Monday 0 .. Sunday 6
  const thursday = Date.UTC(d.getUTCFullYear(), d.getUTCMonth(), d.getUTCDate() - day + 3);
  const year = new Date(thursday).getUTCFullYear();
  const week = 1 + Math.floor((thursday - Date.UTC(year, 0, 1)) / (7 * 86_400_000));
  return `${year}-W${pad(week)}`;
}

/** The period a UTC instant falls in, as shown in reasons: "2026-11-20T14", "2026-11-20", "2026-W47", "2026-11", "2026". */
export function periodKey(kind: PeriodKind, t: number): string {
  const d = new Date(t);
  const y = pad(d.getUTCFullYear(), 4);
  const m = pad(d.getUTCMonth() + 1);
  const day = pad(d.getUTCDate());
  switch (kind) {
    case 'hourly':
      return `${y}-${m}-${day}T${pad(d.getUTCHours())}`;
    case 'daily':
      return `${y}-${m}-${day}`;
    case 'weekly':
      return isoWeek(t);
    case 'monthly':
      return `${y}-${m}`;
    case 'yearly':
      return y;
  }
}

/** Check the rules: counts are whole numbers >= 0, and at least one rule keeps something. */
export function checkRules(rules: RetentionRules): void {
  const counts = ['keepLast', ...PERIOD_RULES.map((r) => r[0])] as const;
  for (const k of counts) {
    const v = rules[k];
    if (v !== undefined && (!Number.isSafeInteger(v) || v < 0)) {
      throw new UsageError(`--${k.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)} must be a whole number >= 0, not ${v}`);
    }
  }
  for (const t of rules.keepTags ?? []) {
    if (!t) throw new UsageError('--keep-tag needs a non-empty tag');
  }
  if (!hasRule(rules)) {
    throw new UsageError('no keep rule given: use at least one of --keep-last, --keep-hourly, --keep-daily, --keep-weekly, --keep-monthly, --keep-yearly, --keep-tag');
  }
}

export function hasRule(rules: RetentionRules): boolean {
  return (
    (rules.keepLast ?? 0) > 0 ||
    PERIOD_RULES.some(([k]) => (rules[k] ?? 0) > 0) ||
    (rules.keepTags?.length ?? 0) > 0
  );
}

/**
 * Decide keep/remove for every generation (of any number of images). Returns one
 * decision per input generation, in input order. Throws a UsageError on bad rules and a
 * GenvaultError (code REFUSED) if an image would lose every generation without allowEmpty.
 */
export function applyRetention<G extends RetentionInput>(gens: G[], rules: RetentionRules, opts: RetentionOptions): RetentionDecision<G>[] {
  checkRules(rules);
  const now = typeof opts.now === 'number' ? opts.now : opts.now.getTime();
  const decisions = new Map<G, RetentionDecision<G>>();
  const byImage = new Map<string, G[]>();
  for (const g of gens) {
    const list = byImage.get(g.name);
    if (list) list.push(g);
    else byImage.set(g.name, [g]);
  }
  const tags = new Set(rules.keepTags ?? []);
  for (const [name, list] of byImage) {
    // Newest first; created is strictly increasing per image, the id breaks ties anyway.
    const times = new Map(list.map((g) => [g, Date.parse(g.created)]));
    for (const g of list) {
      if (Number.isNaN(times.get(g))) throw new GenvaultError(`${name}@${g.id}: invalid creation time ${JSON.stringify(g.created)}`, 'DAMAGED');
    }
    const sorted = [...list].sort((a, b) => times.get(b)! - times.get(a)! || (a.id < b.id ? 1 : a.id > b.id ? -1 : 0));
    const reasons = new Map<G, string[]>(sorted.map((g) => [g, []]));

    const keepLast = rules.keepLast ?? 0;
    sorted.slice(0, keepLast).forEach((g) => reasons.get(g)!.push(`last ${keepLast}`));

    for (const [rule, kind] of PERIOD_RULES) {
      let left = rules[rule] ?? 0;
      let lastPeriod: string | null = null;
      for (const g of sorted) {
        if (left <= 0) break;
        const p = periodKey(kind, times.get(g)!);
        if (p === lastPeriod) continue;
        lastPeriod = p;
        reasons.get(g)!.push(`${kind} ${p}`);
        left--;
      }
    }

    for (const g of sorted) {
      for (const t of g.tags ?? []) if (tags.has(t)) reasons.get(g)!.push(`tag ${t}`);
    }

    let kept = 0;
    for (const g of sorted) {
      const r = reasons.get(g)!;
      if (g.protected) r.push('protected');
      if (now - times.get(g)! < opts.minAgeMs) r.push('younger than min-age');
      if (r.length) kept++;
      decisions.set(g, { gen: g, keep: r.length > 0, reasons: r });
    }
    if (kept === 0 && sorted.length && !opts.allowEmpty) {
      throw new GenvaultError(
        `refusing to remove all ${sorted.length} generation(s) of image ${name}: no keep rule matches any of them ` +
          `(min-age ${formatDuration(opts.minAgeMs)}); use --allow-empty to allow it`,
        'REFUSED',
      );
    }
  }
  return gens.map((g) => decisions.get(g)!);
}

/**
 * Cron schedules, through cron-parser: five fields (minute hour day month weekday), six
 * with a leading seconds field, or an alias (@hourly, @daily, @weekly, @monthly, @yearly).
 * Times are in the job file's time zone, or the host's.
 */
import { CronExpressionParser } from 'cron-parser';

export class Schedule {
  constructor(
    readonly expression: string,
    readonly timezone: string | null = null,
  ) {
    const fields = expression.trim().split(/\s+/);
    const alias = fields.length === 1 && fields[0]!.startsWith('@');
    if (!alias && fields.length !== 5 && fields.length !== 6) {
      throw new Error(
        `${JSON.stringify(expression)} is not a cron schedule: expected 5 fields (minute hour day month weekday), 6 with seconds first, or @daily/@hourly/@weekly/@monthly/@yearly`,
      );
    }
    try {
      this.parse(new Date()).next();
    } catch (e) {
      throw new Error(`${JSON.stringify(expression)} is not a cron schedule: ${(e as Error).message}`);
    }
  }

  private parse(at: Date) {
    return CronExpressionParser.parse(this.expression, { currentDate: at, ...(this.timezone ? { tz: this.timezone } : {}) });
  }

  /** The latest scheduled time at or before `at`, or null if there is none. */
  prev(at: Date | number): Date | null {
    try {
      return this.parse(new Date(+at + 1)).prev().toDate();
    } catch {
      return null;
    }
  }

  /** The first scheduled time strictly after `at`. */
  next(at: Date | number): Date {
    return this.parse(new Date(at)).next().toDate();
  }

  /** Scheduled times in (after, until], oldest first, at most `limit`. */
  between(after: Date | number, until: Date | number, limit: number): Date[] {
    const out: Date[] = [];
    const it = this.parse(new Date(after));
    while (out.length < limit) {
      const d = it.next().toDate();
      if (+d > +until) break;
      out.push(d);
    }
    return out;
  }

  toString(): string {
    return this.expression;
  }
}

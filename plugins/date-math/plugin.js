// `date-math`: calendar and business-day arithmetic on ISO dates (JavaScript,
// componentize-js). Deadlines, SLAs, notice periods, start dates.
//
// Input:
//   { "date": "2025-03-03", "add": "P1M", "business_days": 5,
//     "holidays": ["2025-04-18"], "weekend": ["saturday", "sunday"], "until": "2025-06-30" }
//   -> { "date": "2025-04-10", "weekday": "Thursday", "iso_week": "2025-W15",
//        "quarter": 2, "business_day": true, "days_until": 81, "business_days_until": 56 }
//
// - `date` (required): `YYYY-MM-DD`, or `"today"` (UTC, from the host's clock).
// - `add`: an ISO 8601 duration of whole days: `P1Y2M3W4D`, `P10D`, `-P2W`.
//   Years and months first (the day is kept, or clamped to the month's last day:
//   2025-01-31 + P1M = 2025-02-28), then weeks and days.
// - `business_days` (integer): then move this many business days forward (or back
//   if negative); 0 moves a weekend day or holiday forward to the next business day.
// - `holidays` (list of dates) and `weekend` (weekday names or their first three
//   letters; default Saturday and Sunday): the days that are not business days.
// - `until` (date): also count the days from the result to `until`:
//   `days_until` calendar days and `business_days_until` business days after the
//   result up to and including `until` (both negative when `until` is earlier).
//
// Output: the resulting `date`, its English `weekday`, ISO 8601 week
// (`2025-W15`), `quarter` (1-4), whether it is a `business_day`, and with
// `until` the two counts.
//
// Errors (fatal, naming the field): `date` missing; a date that is not
// `YYYY-MM-DD` or does not exist (``field `holidays[1]`: no such date "2025-02-30"``);
// a malformed duration; `business_days` not an integer or beyond +-100000; an
// unknown weekday; a weekend of all seven days; an unknown field.
//
// Logs one `info` line with the computation.

import { log } from 'trellis:plugin/host@0.1.0';

const NAME = 'date-math';
const VERSION = '1.0.0';
const DESCRIPTION = 'Date arithmetic for deadlines and SLAs: add ISO 8601 durations and business days (weekends, holidays), count days between dates.';

const DATE_PATTERN = '^[0-9]{4}-[0-9]{2}-[0-9]{2}$';
const INPUT_SCHEMA = {
  $schema: 'https://json-schema.org/draft/2020-12/schema',
  type: 'object',
  required: ['date'],
  additionalProperties: false,
  properties: {
    date: { type: 'string', description: 'YYYY-MM-DD or "today" (UTC)' },
    add: { type: 'string', pattern: '^-?P([0-9]+Y)?([0-9]+M)?([0-9]+W)?([0-9]+D)?$', description: 'ISO 8601 duration of whole days' },
    business_days: { type: 'integer', minimum: -100000, maximum: 100000 },
    holidays: { type: 'array', items: { type: 'string', pattern: DATE_PATTERN } },
    weekend: { type: 'array', items: { type: 'string' }, default: ['saturday', 'sunday'] },
    until: { type: 'string', pattern: DATE_PATTERN },
  },
};

const OUTPUT_SCHEMA = {
  $schema: 'https://json-schema.org/draft/2020-12/schema',
  type: 'object',
  required: ['date', 'weekday', 'iso_week', 'quarter', 'business_day'],
  properties: {
    date: { type: 'string', pattern: DATE_PATTERN },
    weekday: { type: 'string' },
    iso_week: { type: 'string', pattern: '^[0-9]{4}-W[0-9]{2}$' },
    quarter: { type: 'integer', minimum: 1, maximum: 4 },
    business_day: { type: 'boolean' },
    days_until: { type: 'integer' },
    business_days_until: { type: 'integer' },
  },
};

const FIELDS = ['date', 'add', 'business_days', 'holidays', 'weekend', 'until'];
// Indexed like Date.prototype.getUTCDay: 0 is Sunday.
const WEEKDAYS = ['Sunday', 'Monday', 'Tuesday', 'Wednesday', 'Thursday', 'Friday', 'Saturday'];
const DAY_MS = 86400000;

/** Bad input: a fatal task error naming the field. */
class InputError extends Error {
  constructor(field, message) {
    super(field ? `invalid input: field \`${field}\`: ${message}` : `invalid input: ${message}`);
  }
}

export function info() {
  return {
    name: NAME,
    version: VERSION,
    description: DESCRIPTION,
    inputSchema: JSON.stringify(INPUT_SCHEMA, null, 2),
    outputSchema: JSON.stringify(OUTPUT_SCHEMA, null, 2),
  };
}

// `run` returns the output JSON text; a thrown object { message, retryable,
// details } is the task-error (the err case of the WIT result).
export function run(ctx, input) {
  try {
    return JSON.stringify(compute(JSON.parse(input)));
  } catch (error) {
    const message = error instanceof InputError ? error.message : `internal error: ${error}`;
    throw { message, retryable: false, details: undefined };
  }
}

function compute(request) {
  if (request === null || typeof request !== 'object' || Array.isArray(request)) {
    throw new InputError(null, 'expected an object');
  }
  for (const key of Object.keys(request)) {
    if (!FIELDS.includes(key)) throw new InputError(key, `unknown field (expected one of ${FIELDS.join(', ')})`);
  }
  if (request.date == null) throw new InputError('date', 'missing (YYYY-MM-DD or "today")');
  const start = request.date === 'today' ? Math.floor(Date.now() / DAY_MS) : parseDate(request.date, 'date');

  const holidays = new Set(
    list(request, 'holidays').map((day, index) => parseDate(day, `holidays[${index}]`)),
  );
  const weekendNames = request.weekend == null ? ['saturday', 'sunday'] : list(request, 'weekend');
  const weekend = new Set(
    weekendNames.map((name, index) => {
      const day = typeof name === 'string' && name.length >= 3
        ? WEEKDAYS.findIndex((w) => w.toLowerCase().startsWith(name.toLowerCase()))
        : -1;
      if (day < 0) throw new InputError(`weekend[${index}]`, `not a weekday: ${JSON.stringify(name)}`);
      return day;
    }),
  );
  if (weekend.size === 7) throw new InputError('weekend', 'every day of the week is a weekend day');
  const isBusinessDay = (day) => !weekend.has(weekday(day)) && !holidays.has(day);

  let day = start;
  const steps = [];
  if (request.add != null) {
    day = addDuration(day, request.add);
    steps.push(request.add.startsWith('-') ? `- ${request.add.slice(1)}` : `+ ${request.add}`);
  }
  if (request.business_days != null) {
    const count = request.business_days;
    if (!Number.isInteger(count) || Math.abs(count) > 100000) {
      throw new InputError('business_days', `expected a whole number from -100000 to 100000, got ${JSON.stringify(count)}`);
    }
    const direction = count < 0 ? -1 : 1;
    if (count === 0) {
      while (!isBusinessDay(day)) day += 1;
    }
    for (let left = Math.abs(count); left > 0; ) {
      day += direction;
      if (isBusinessDay(day)) left -= 1;
    }
    steps.push(`${count < 0 ? '-' : '+'} ${Math.abs(count)} business day(s)`);
  }

  const output = {
    date: formatDate(day),
    weekday: WEEKDAYS[weekday(day)],
    iso_week: isoWeek(day),
    quarter: Math.floor(civil(day).month / 3) + 1,
    business_day: isBusinessDay(day),
  };
  if (request.until != null) {
    const until = parseDate(request.until, 'until');
    output.days_until = until - day;
    let count = 0;
    const [from, to, sign] = until >= day ? [day, until, 1] : [until, day, -1];
    for (let d = from + 1; d <= to; d++) if (isBusinessDay(d)) count += 1;
    // Going back, count the business days after `until` up to the result.
    output.business_days_until = sign * count;
  }

  let line = [formatDate(start), ...steps, '=', output.date, `(${output.weekday})`].join(' ');
  if (request.until != null) {
    line += `; to ${request.until}: ${output.days_until} day(s), ${output.business_days_until} business day(s)`;
  }
  log('info', line);
  return output;
}

/** Days since 1970-01-01 of a `YYYY-MM-DD` string. */
function parseDate(text, field) {
  if (typeof text !== 'string' || !/^[0-9]{4}-[0-9]{2}-[0-9]{2}$/.test(text)) {
    throw new InputError(field, `expected a date YYYY-MM-DD, got ${JSON.stringify(text)}`);
  }
  const [year, month, dayOfMonth] = text.split('-').map(Number);
  const day = Date.UTC(year, month - 1, dayOfMonth) / DAY_MS;
  const back = civil(day);
  if (back.year !== year || back.month !== month - 1 || back.day !== dayOfMonth) {
    throw new InputError(field, `no such date ${JSON.stringify(text)}`);
  }
  return day;
}

function addDuration(day, text) {
  const match = typeof text === 'string' && /^(-)?P(?:([0-9]+)Y)?(?:([0-9]+)M)?(?:([0-9]+)W)?(?:([0-9]+)D)?$/.exec(text);
  if (!match || text.replace(/^-/, '') === 'P') {
    throw new InputError('add', `expected an ISO 8601 duration of whole days such as "P1M", "P2W3D" or "-P10D", got ${JSON.stringify(text)}`);
  }
  const sign = match[1] ? -1 : 1;
  const [years, months, weeks, days] = match.slice(2).map((n) => sign * Number(n ?? 0));
  const { year, month, day: dayOfMonth } = civil(day);
  const totalMonths = year * 12 + month + years * 12 + months;
  const targetYear = Math.floor(totalMonths / 12);
  const targetMonth = totalMonths - targetYear * 12;
  const lastDay = new Date(Date.UTC(targetYear, targetMonth + 1, 0)).getUTCDate();
  const moved = Date.UTC(targetYear, targetMonth, Math.min(dayOfMonth, lastDay)) / DAY_MS;
  return moved + weeks * 7 + days;
}

function civil(day) {
  const date = new Date(day * DAY_MS);
  return { year: date.getUTCFullYear(), month: date.getUTCMonth(), day: date.getUTCDate() };
}

function weekday(day) {
  return new Date(day * DAY_MS).getUTCDay();
}

function formatDate(day) {
  return new Date(day * DAY_MS).toISOString().slice(0, 10);
}

/** ISO 8601 week: weeks start on Monday; week 1 holds the year's first Thursday. */
function isoWeek(day) {
  const thursday = day - ((weekday(day) + 6) % 7) + 3;
  const year = civil(thursday).year;
  const newYear = Date.UTC(year, 0, 1) / DAY_MS;
  const week = Math.floor((thursday - newYear) / 7) + 1;
  return `${year}-W${String(week).padStart(2, '0')}`;
}

function list(request, field) {
  const value = request[field] ?? [];
  if (!Array.isArray(value)) throw new InputError(field, `expected a list, got ${JSON.stringify(value)}`);
  return value;
}

// `slugify`: text to URL slugs, usernames or file names (JavaScript, componentize-js).
//
// Input, one text:
//   { "text": "Crème Brûlée: 10 Recipes!", "separator": "-", "lowercase": true, "max_length": 0 }
//   -> { "slug": "creme-brulee-10-recipes" }
// Several at once, made unique (e.g. logins for new staff):
//   { "texts": ["Ada Lovelace", "Ada Lovelace"], "separator": ".", "unique": true, "taken": ["ada.lovelace"] }
//   -> { "slugs": ["ada.lovelace.2", "ada.lovelace.3"] }
//
// - `text` (string) or `texts` (list of strings): exactly one is required.
// - Latin letters lose their accents (`é` -> `e`, `ß` -> `ss`, `Æ` -> `AE`,
//   `ø` -> `o`, `ł` -> `l`); apostrophes are dropped (`O'Neil` -> `oneil`); every
//   other run of characters that are not ASCII letters or digits becomes one
//   `separator`, never at either end.
// - `separator` (default `-`): ``, `-`, `_`, `.` or `~`.
// - `lowercase` (default true).
// - `max_length` (default 0, no limit): a longer slug is cut at the last
//   separator that fits (or mid-word if there is none).
// - `unique` (default false, `texts` only): a slug equal to an earlier one or to
//   one in `taken` gets `<separator>2`, `<separator>3`, ... appended.
// - `taken` (list of strings, with `unique`): slugs already in use.
//
// Errors (fatal, naming the field): neither or both of `text` and `texts`; a
// value of the wrong type; a text with no letter or digit to keep
// (``field `texts[1]`: no letters or digits in "!!!"``); an unknown field.
//
// Fuel: about 350,000 per text, so the default limit (1e9) takes about 2,800
// texts; give a bulk step more (`limits = { fuel = 20_000_000_000 }`).

const NAME = 'slugify';
const VERSION = '1.0.0';
const DESCRIPTION = 'Text to URL slugs, usernames or file names: accents folded, separator, length limit, unique suffixes.';

const INPUT_SCHEMA = {
  $schema: 'https://json-schema.org/draft/2020-12/schema',
  type: 'object',
  additionalProperties: false,
  oneOf: [{ required: ['text'] }, { required: ['texts'] }],
  properties: {
    text: { type: 'string' },
    texts: { type: 'array', items: { type: 'string' } },
    separator: { enum: ['', '-', '_', '.', '~'], default: '-' },
    lowercase: { type: 'boolean', default: true },
    max_length: { type: 'integer', minimum: 0, default: 0, description: '0: no limit' },
    unique: { type: 'boolean', default: false, description: 'texts only: append -2, -3 to repeats' },
    taken: { type: 'array', items: { type: 'string' }, description: 'slugs already in use (with unique)' },
  },
};

const OUTPUT_SCHEMA = {
  $schema: 'https://json-schema.org/draft/2020-12/schema',
  type: 'object',
  properties: {
    slug: { type: 'string' },
    slugs: { type: 'array', items: { type: 'string' } },
  },
};

const FIELDS = ['text', 'texts', 'separator', 'lowercase', 'max_length', 'unique', 'taken'];

// Latin-1 Supplement and Latin Extended-A letters without their accents
// (StarlingMonkey has no String.prototype.normalize).
const FOLD = {};
for (const [letters, ascii] of [
  ['ÀÁÂÃÄÅĀĂĄ', 'A'], ['àáâãäåāăą', 'a'], ['Æ', 'AE'], ['æ', 'ae'],
  ['ÇĆĈĊČ', 'C'], ['çćĉċč', 'c'], ['ĎĐÐ', 'D'], ['ďđð', 'd'],
  ['ÈÉÊËĒĔĖĘĚ', 'E'], ['èéêëēĕėęě', 'e'], ['ĜĞĠĢ', 'G'], ['ĝğġģ', 'g'],
  ['ĤĦ', 'H'], ['ĥħ', 'h'], ['ÌÍÎÏĨĪĬĮİ', 'I'], ['ìíîïĩīĭįı', 'i'],
  ['Ĳ', 'IJ'], ['ĳ', 'ij'], ['Ĵ', 'J'], ['ĵ', 'j'], ['Ķ', 'K'], ['ķĸ', 'k'],
  ['ĹĻĽĿŁ', 'L'], ['ĺļľŀł', 'l'], ['ÑŃŅŇŊ', 'N'], ['ñńņňŉŋ', 'n'],
  ['ÒÓÔÕÖØŌŎŐ', 'O'], ['òóôõöøōŏő', 'o'], ['Œ', 'OE'], ['œ', 'oe'],
  ['ŔŖŘ', 'R'], ['ŕŗř', 'r'], ['ŚŜŞŠ', 'S'], ['śŝşšſ', 's'], ['ß', 'ss'],
  ['ŢŤŦ', 'T'], ['ţťŧ', 't'], ['Þ', 'TH'], ['þ', 'th'],
  ['ÙÚÛÜŨŪŬŮŰŲ', 'U'], ['ùúûüũūŭůűų', 'u'], ['Ŵ', 'W'], ['ŵ', 'w'],
  ['ÝŸŶ', 'Y'], ['ýÿŷ', 'y'], ['ŹŻŽ', 'Z'], ['źżž', 'z'],
]) {
  for (const letter of letters) FOLD[letter] = ascii;
}

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
    return JSON.stringify(slugifyRequest(JSON.parse(input)));
  } catch (error) {
    const message = error instanceof InputError ? error.message : `internal error: ${error}`;
    throw { message, retryable: false, details: undefined };
  }
}

function slugifyRequest(request) {
  if (request === null || typeof request !== 'object' || Array.isArray(request)) {
    throw new InputError(null, 'expected an object');
  }
  for (const key of Object.keys(request)) {
    if (!FIELDS.includes(key)) throw new InputError(key, `unknown field (expected one of ${FIELDS.join(', ')})`);
  }
  const separator = request.separator ?? '-';
  if (!['', '-', '_', '.', '~'].includes(separator)) {
    throw new InputError('separator', `expected "", "-", "_", "." or "~", got ${JSON.stringify(separator)}`);
  }
  const lowercase = flag(request, 'lowercase', true);
  const unique = flag(request, 'unique', false);
  const maxLength = request.max_length ?? 0;
  if (!Number.isInteger(maxLength) || maxLength < 0) {
    throw new InputError('max_length', `expected a whole number >= 0, got ${JSON.stringify(maxLength)}`);
  }
  const options = { separator, lowercase, maxLength };

  if ((request.text == null) === (request.texts == null)) {
    throw new InputError(request.text == null ? 'text' : 'texts', 'give exactly one of `text` and `texts`');
  }
  if (request.text != null) {
    if (typeof request.text !== 'string') throw new InputError('text', `expected a string, got ${kind(request.text)}`);
    if (unique) throw new InputError('unique', 'only with `texts`');
    return { slug: slug(request.text, options, 'text') };
  }
  if (!Array.isArray(request.texts)) throw new InputError('texts', `expected a list of strings, got ${kind(request.texts)}`);
  const taken = request.taken ?? [];
  if (!Array.isArray(taken) || !taken.every((t) => typeof t === 'string')) {
    throw new InputError('taken', 'expected a list of strings');
  }
  const used = new Set(taken);
  const slugs = request.texts.map((text, index) => {
    const field = `texts[${index}]`;
    if (typeof text !== 'string') throw new InputError(field, `expected a string, got ${kind(text)}`);
    let result = slug(text, options, field);
    if (unique) {
      for (let n = 2; used.has(result); n++) {
        const suffix = `${separator}${n}`;
        result = cut(slug(text, options, field), maxLength ? maxLength - suffix.length : 0, separator) + suffix;
      }
      used.add(result);
    }
    return result;
  });
  return { slugs };
}

function slug(text, { separator, lowercase, maxLength }, field) {
  let folded = '';
  for (const char of text) folded += FOLD[char] ?? char;
  folded = folded.replace(/['’]/g, '');
  if (lowercase) folded = folded.toLowerCase();
  const words = folded.split(/[^A-Za-z0-9]+/).filter((word) => word !== '');
  if (words.length === 0) throw new InputError(field, `no letters or digits in ${JSON.stringify(text)}`);
  return cut(words.join(separator), maxLength, separator);
}

/** `slug` cut to `max` characters, at a separator if one fits. */
function cut(slug, max, separator) {
  if (max <= 0 || slug.length <= max) return slug;
  const head = slug.slice(0, max);
  if (separator !== '' && slug[max] !== separator) {
    const last = head.lastIndexOf(separator);
    if (last > 0) return head.slice(0, last);
  }
  return separator === '' ? head : head.replace(new RegExp(`\\${separator}+$`), '');
}

function flag(request, field, fallback) {
  const value = request[field] ?? fallback;
  if (typeof value !== 'boolean') throw new InputError(field, `expected true or false, got ${JSON.stringify(value)}`);
  return value;
}

function kind(value) {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'a list';
  return { string: 'a string', number: 'a number', boolean: 'a boolean', object: 'an object' }[typeof value] ?? typeof value;
}

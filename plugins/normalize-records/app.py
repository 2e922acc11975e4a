"""`normalize-records`: clean up people or business records (Python, componentize-py).

Typical use: rows from a CSV export or a form, before they feed accounts,
mailing lists or a CRM. Input:

    { "records": [{ "Full Name": "  ADA LOVELACE ", "E-Mail": "Ada@Example.COM" }],
      "rename": { "Full Name": "name", "E-Mail": "email" },
      "fields": { "name": "name", "email": "email", "phone": "phone", "start": "date" },
      "required": ["name", "email"], "unique": "email",
      "date_formats": ["%d.%m.%Y"], "country_code": "+44", "keep_other": true }

- `records` (list of objects, required).
- `rename` (object): old key -> new key, applied first.
- `fields` (object): key -> type. Types:
  - `text`: trimmed, inner runs of spaces made one; a number becomes its text.
  - `name`: text; a name written all in lower or upper case gets capitals
    (`ADA LOVELACE` -> `Ada Lovelace`, `o'neil-smith` -> `O'Neil-Smith`;
    `van`, `von`, `de`, `der`, `da`, `di`, `du`, `la`, `le` stay lower case
    after the first word); mixed case (`McAdams`) is kept.
  - `email`: trimmed, lower-cased, and must look like `local@domain.tld`.
  - `phone`: digits only, `+` kept; `00` becomes `+`; a number with one leading
    `0` gets `country_code` in its place; 7 to 15 digits (E.164).
  - `date`: ISO `YYYY-MM-DD`, or one of `date_formats` (Python `strptime`
    formats, tried in order) -> `YYYY-MM-DD`.
  - `bool`: `true/false`, `yes/no`, `y/n`, `1/0`, `on/off` (any case).
  - `integer`, `number`: a number, or text such as `1,234` or `12.5`.
  - `lower`, `upper`: text in that case.
- `required` (list of keys): a record whose value is missing, empty or `null`
  after cleaning is rejected.
- `unique` (key): records whose value repeats an earlier one are dropped.
- `keep_other` (bool, default true): keep keys not listed in `fields` (string
  values trimmed); false drops them.
- `country_code` (`+` and 1 to 3 digits): for `phone`. Default: the step's
  config `country_code` (`config = { country_code = "+49" }`), else none (a
  national number is then rejected).

Empty strings become `null`. A value that does not fit its type rejects its
record; the run goes on.

Output: `{ "records": [...], "count": 1, "rejected": [{ "index", "field",
"reason" }], "duplicates": [{ "index", "of", "value" }] }`, where `index` is a
record's position in the input (from 0) and `of` the kept record it repeats.

Errors (fatal, naming the field): `records` missing or not a list of objects
(``invalid input: field `records[2]`: expected an object``); an unknown type
in `fields`; a key in `required` or `unique` that is not a string; a bad
`date_formats` or `country_code` (``invalid step config `country_code`: ...``
when it comes from the config); an unknown field.

Logs a `warn` line per rejected or duplicate record and an `info` summary.

Fuel: about 400,000 per record, so the default limit (1e9) cleans about 2,400
records; give a bulk step more (`limits = { fuel = 20_000_000_000 }`).
"""

import _strptime  # noqa: F401  datetime.strptime imports it lazily; see below
import datetime
import json
import re

from componentize_py_types import Err
from wit_world import WitWorld as Task
from wit_world.imports import host, types

# componentize-py keeps the modules imported while it builds the component, and
# only those: a module the standard library imports lazily at run time (such as
# `_strptime` for `strptime`) must be imported above, or the run fails with
# ModuleNotFoundError.

NAME = "normalize-records"
VERSION = "1.0.0"
DESCRIPTION = "Clean people/business records: rename keys, trim, names, emails, phones, dates, booleans, numbers; required fields and duplicates."

TYPES = ["text", "name", "email", "phone", "date", "bool", "integer", "number", "lower", "upper"]

INPUT_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["records"],
    "additionalProperties": False,
    "properties": {
        "records": {"type": "array", "items": {"type": "object"}},
        "rename": {"type": "object", "additionalProperties": {"type": "string"}},
        "fields": {"type": "object", "additionalProperties": {"enum": TYPES}},
        "required": {"type": "array", "items": {"type": "string"}},
        "unique": {"type": ["string", "null"]},
        "keep_other": {"type": "boolean", "default": True},
        "date_formats": {"type": "array", "items": {"type": "string"}, "description": "strptime formats besides ISO"},
        "country_code": {"type": "string", "pattern": "^\\+[0-9]{1,3}$", "description": "default: step config"},
    },
}

OUTPUT_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["records", "count", "rejected", "duplicates"],
    "properties": {
        "records": {"type": "array", "items": {"type": "object"}},
        "count": {"type": "integer", "minimum": 0},
        "rejected": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["index", "field", "reason"],
                "properties": {
                    "index": {"type": "integer"},
                    "field": {"type": "string"},
                    "reason": {"type": "string"},
                },
            },
        },
        "duplicates": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["index", "of", "value"],
                "properties": {"index": {"type": "integer"}, "of": {"type": "integer"}, "value": {}},
            },
        },
    },
}

KNOWN = {"records", "rename", "fields", "required", "unique", "keep_other", "date_formats", "country_code"}
PARTICLES = {"van", "von", "de", "der", "den", "da", "di", "du", "la", "le"}
EMAIL = re.compile(r"[^@\s]+@[^@\s.]+(\.[^@\s.]+)+")
COUNTRY_CODE = re.compile(r"\+[0-9]{1,3}")
TRUE = {"true", "yes", "y", "1", "on"}
FALSE = {"false", "no", "n", "0", "off"}


class InputError(Exception):
    """Bad input: becomes a fatal task error naming the field."""

    def __init__(self, field, message, what="input: field"):
        where = f" `{field}`" if field else ""
        super().__init__(f"invalid {what}{where}: {message}")


class Reject(Exception):
    """A value that does not fit its type: rejects its record."""


class WitWorld(Task):
    def info(self) -> types.PluginInfo:
        return types.PluginInfo(
            name=NAME,
            version=VERSION,
            description=DESCRIPTION,
            input_schema=json.dumps(INPUT_SCHEMA, indent=2),
            output_schema=json.dumps(OUTPUT_SCHEMA, indent=2),
        )

    def run(self, ctx: types.StepContext, input: str) -> str:
        try:
            output = normalize(json.loads(input))
        except InputError as error:
            raise Err(types.TaskError(message=str(error), retryable=False, details=None))
        except Exception as error:  # a bug here: report it rather than trap
            raise Err(types.TaskError(message=f"internal error: {error!r}", retryable=False, details=None))
        return json.dumps(output, ensure_ascii=False)


def normalize(request):
    if not isinstance(request, dict):
        raise InputError(None, "expected an object", "input")
    for key in sorted(request):
        if key not in KNOWN:
            raise InputError(key, "unknown field (expected one of " + ", ".join(sorted(KNOWN)) + ")")
    records = request.get("records")
    if not isinstance(records, list):
        raise InputError("records", "missing or not a list (the records to clean)")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise InputError(f"records[{index}]", "expected an object")
    rename = string_map(request, "rename")
    fields = string_map(request, "fields")
    for key, kind in fields.items():
        if kind not in TYPES:
            raise InputError(f"fields.{key}", f"unknown type {json.dumps(kind)} (expected one of {', '.join(TYPES)})")
    required = request.get("required") or []
    if not isinstance(required, list) or not all(isinstance(key, str) for key in required):
        raise InputError("required", "expected a list of keys")
    unique = request.get("unique")
    if unique is not None and not isinstance(unique, str):
        raise InputError("unique", "expected a key (a string)")
    keep_other = request.get("keep_other", True)
    if not isinstance(keep_other, bool):
        raise InputError("keep_other", "expected true or false")
    date_formats = request.get("date_formats") or []
    if not isinstance(date_formats, list) or not all(isinstance(f, str) and "%" in f for f in date_formats):
        raise InputError("date_formats", "expected a list of strptime formats such as \"%d.%m.%Y\"")
    country_code = request.get("country_code")
    what = "input: field"
    if country_code is None:
        country_code = host.config("country_code")  # the step's `config` table
        what = "step config"
    if country_code is not None and not (isinstance(country_code, str) and COUNTRY_CODE.fullmatch(country_code)):
        raise InputError("country_code", f"expected + and 1 to 3 digits, got {json.dumps(country_code)}", what)

    options = {"date_formats": date_formats, "country_code": country_code}
    kept, rejected, duplicates, seen = [], [], [], {}
    for index, record in enumerate(records):
        record = {rename.get(key, key): value for key, value in record.items()}
        clean, problem = {}, None
        for key, value in record.items():
            kind = fields.get(key)
            if kind is None and not keep_other:
                continue
            try:
                clean[key] = convert(kind or "keep", value, options)
            except Reject as reason:
                problem = (key, str(reason))
                break
        if problem is None:
            for key in required:
                if clean.get(key) is None:
                    problem = (key, "missing")
                    break
        if problem is not None:
            host.log(host.LogLevel.WARN, f"record {index} rejected: {problem[0]}: {problem[1]}")
            rejected.append({"index": index, "field": problem[0], "reason": problem[1]})
            continue
        if unique is not None and clean.get(unique) is not None:
            value = clean[unique]
            marker = json.dumps(value, sort_keys=True)
            if marker in seen:
                host.log(host.LogLevel.WARN, f"record {index} repeats record {seen[marker]} ({unique} {marker})")
                duplicates.append({"index": index, "of": seen[marker], "value": value})
                continue
            seen[marker] = index
        for key in fields:  # every listed field is in the output
            clean.setdefault(key, None)
        kept.append(clean)

    host.log(
        host.LogLevel.INFO,
        f"{len(kept)} record(s) kept, {len(rejected)} rejected, {len(duplicates)} duplicate(s)",
    )
    return {"records": kept, "count": len(kept), "rejected": rejected, "duplicates": duplicates}


def string_map(request, field):
    value = request.get(field) or {}
    if not isinstance(value, dict):
        raise InputError(field, "expected an object")
    for key, item in value.items():
        if not isinstance(item, str):
            raise InputError(f"{field}.{key}", "expected a string")
    return value


def convert(kind, value, options):
    """The clean value of one field, or Reject with the reason."""
    if isinstance(value, str):
        value = value.strip()
        if value == "":
            return None
    if value is None:
        return None
    if kind == "keep":
        return value
    if kind in ("text", "name", "lower", "upper"):
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise Reject(f"expected text, got {json.dumps(value)}")
        text = " ".join(str(value).split())
        if kind == "lower":
            return text.lower()
        if kind == "upper":
            return text.upper()
        if kind == "name":
            return capitalize_name(text)
        return text
    if kind == "email":
        email = str(value).lower()
        if not EMAIL.fullmatch(email):
            raise Reject(f"not an email address: {json.dumps(value)}")
        return email
    if kind == "phone":
        return phone(value, options["country_code"])
    if kind == "date":
        return date(value, options["date_formats"])
    if kind == "bool":
        if isinstance(value, bool):
            return value
        word = str(value).lower()
        if word in TRUE:
            return True
        if word in FALSE:
            return False
        raise Reject(f"not a yes/no value: {json.dumps(value)}")
    # integer, number
    if isinstance(value, bool):
        raise Reject(f"not a number: {json.dumps(value)}")
    if isinstance(value, str):
        text = value.replace(" ", "").replace("_", "")
        if re.fullmatch(r"-?[0-9]{1,3}(,[0-9]{3})+(\.[0-9]+)?", text):
            text = text.replace(",", "")  # thousands separators
        if re.fullmatch(r"-?[0-9]+", text):
            value = int(text)
        elif re.fullmatch(r"-?[0-9]*\.[0-9]+", text):
            value = float(text)
        else:
            raise Reject(f"not a number: {json.dumps(value)}")
    if not isinstance(value, (int, float)):
        raise Reject(f"not a number: {json.dumps(value)}")
    if kind == "integer" and isinstance(value, float):
        if not value.is_integer():
            raise Reject(f"not a whole number: {json.dumps(value)}")
        value = int(value)
    return value


def capitalize_name(text):
    if text != text.lower() and text != text.upper():
        return text  # written with care already: McAdams, DeLuca
    words = []
    for position, word in enumerate(text.lower().split(" ")):
        if position > 0 and word in PARTICLES:
            words.append(word)
        else:
            words.append(re.sub(r"(^|[-'’])(\w)", lambda m: m.group(1) + m.group(2).upper(), word))
    return " ".join(words)


def phone(value, country_code):
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise Reject(f"not a phone number: {json.dumps(value)}")
    text = str(value)
    if re.search(r"[^0-9+()./\- ]", text) or "+" in text[1:]:
        raise Reject(f"not a phone number: {json.dumps(value)}")
    digits = re.sub(r"[^0-9]", "", text)
    if text.startswith("+"):
        number = "+" + digits
    elif digits.startswith("00"):
        number = "+" + digits[2:]
    elif digits.startswith("0"):
        if country_code is None:
            raise Reject(f"national number without a country code (set `country_code`): {json.dumps(value)}")
        number = country_code + digits[1:]
    else:
        raise Reject(f"no country code (start with + or 0): {json.dumps(value)}")
    if not 7 <= len(number) - 1 <= 15:
        raise Reject(f"not a phone number (7 to 15 digits): {json.dumps(value)}")
    return number


def date(value, formats):
    if not isinstance(value, str):
        raise Reject(f"not a date: {json.dumps(value)}")
    for form in ["%Y-%m-%d", *formats]:
        try:
            return datetime.datetime.strptime(value, form).date().isoformat()
        except ValueError:
            continue
    expected = ", ".join(["YYYY-MM-DD", *formats])
    raise Reject(f"not a date ({expected}): {json.dumps(value)}")

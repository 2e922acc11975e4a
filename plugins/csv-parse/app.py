"""`csv-parse`: CSV text to a list of records (Python, componentize-py).

Input:

    { "text": "name,qty\\nAda,2\\n", "delimiter": ",", "header": true,
      "columns": null, "infer": true, "trim": true, "ragged": false }

- `text` (string, required): the CSV document. Quoted fields may hold the
  delimiter, quotes (doubled: `""`) and line breaks. Blank lines are skipped.
- `delimiter` (one character, default `,`): e.g. `;` or a tab (`"\\t"`).
- `header` (bool, default true): the first row names the fields. Names are
  trimmed; an empty or repeated name is an error.
- `columns` (list of strings): the field names to use instead. With `header`
  true the file's header row is skipped; with `header` false every row is data.
- Without `header` and `columns`, each record is a list of values.
- `infer` (bool, default true): `42` and `-7` become integers, `3.5`, `2.0`
  and `1e3` decimal numbers, `true`/`false` (any case) booleans and an empty
  field `null`. Numbers with leading zeros (`007`, zip codes), integers past
  2^53 (long IDs) and anything else stay text.
- `trim` (bool, default true): strip spaces around every value.
- `ragged` (bool, default false): a row with fewer fields than the header is
  padded with `null` and extra fields are dropped; without it such a row is an
  error naming its line.

Output: `{ "columns": ["name", "qty"], "records": [{ "name": "Ada", "qty": 2 }],
"count": 1 }` (`columns` is `null` for list records).

Errors (fatal, naming the field): `text` missing or not a string; an unknown
field; `delimiter` not one character; `columns` not a list of distinct strings;
a bad header; a ragged row (``field `text`: line 3 has 4 fields, the header
has 3``); malformed CSV (an unclosed quote).

Logs one `info` line: how many records and columns were read.

Fuel: about 140,000 per row, so the default limit (1e9) reads about 7,000
rows; give a bulk step more (`limits = { fuel = 20_000_000_000 }`).
"""

import csv
import io
import json
import re

from componentize_py_types import Err
from wit_world import WitWorld as Task
from wit_world.imports import host, types

NAME = "csv-parse"
VERSION = "1.0.0"
DESCRIPTION = "CSV text to a list of records: header row, delimiter, number and boolean inference."

INPUT_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["text"],
    "additionalProperties": False,
    "properties": {
        "text": {"type": "string", "description": "the CSV document"},
        "delimiter": {"type": "string", "minLength": 1, "maxLength": 1, "default": ","},
        "header": {"type": "boolean", "default": True, "description": "the first row names the fields"},
        "columns": {
            "type": ["array", "null"],
            "items": {"type": "string"},
            "description": "field names to use instead of the header row",
        },
        "infer": {"type": "boolean", "default": True, "description": "numbers, booleans and null from text"},
        "trim": {"type": "boolean", "default": True},
        "ragged": {"type": "boolean", "default": False, "description": "pad short rows, drop extra fields"},
    },
}

OUTPUT_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["columns", "records", "count"],
    "properties": {
        "columns": {"type": ["array", "null"], "items": {"type": "string"}},
        "records": {"type": "array", "items": {"type": ["object", "array"]}},
        "count": {"type": "integer", "minimum": 0},
    },
}

DEFAULTS = {"delimiter": ",", "header": True, "columns": None, "infer": True, "trim": True, "ragged": False}

INTEGER = re.compile(r"-?(0|[1-9][0-9]*)")
NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?|-?\.[0-9]+")


class InputError(Exception):
    """Bad input: becomes a fatal task error naming the field."""

    def __init__(self, field, message):
        where = f"field `{field}`: " if field else ""
        super().__init__(f"invalid input: {where}{message}")


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
            output = parse(json.loads(input))
        except InputError as error:
            raise Err(types.TaskError(message=str(error), retryable=False, details=None))
        except Exception as error:  # a bug here: report it rather than trap
            raise Err(types.TaskError(message=f"internal error: {error!r}", retryable=False, details=None))
        return json.dumps(output, ensure_ascii=False)


def parse(request):
    if not isinstance(request, dict):
        raise InputError(None, f"expected an object, got {kind(request)}")
    unknown = sorted(set(request) - set(DEFAULTS) - {"text"})
    if unknown:
        raise InputError(unknown[0], "unknown field (expected one of text, " + ", ".join(DEFAULTS) + ")")
    if "text" not in request:
        raise InputError("text", "missing (the CSV document)")
    options = {**DEFAULTS, **{k: v for k, v in request.items() if v is not None or k == "columns"}}
    text = options.get("text")
    if not isinstance(text, str):
        raise InputError("text", f"expected a string, got {kind(text)}")
    delimiter = options["delimiter"]
    if not isinstance(delimiter, str) or len(delimiter) != 1:
        raise InputError("delimiter", f"expected one character, got {json.dumps(delimiter)}")
    if delimiter in "\"\r\n":
        raise InputError("delimiter", f"cannot be {json.dumps(delimiter)}")
    for flag in ("header", "infer", "trim", "ragged"):
        if not isinstance(options[flag], bool):
            raise InputError(flag, f"expected true or false, got {json.dumps(options[flag])}")
    columns = options["columns"]
    if columns is not None:
        if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
            raise InputError("columns", "expected a list of strings")
        check_names("columns", columns)

    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    rows = []  # (line where the row starts, fields)
    line = 1
    try:
        for row in reader:
            if row and not (len(row) == 1 and row[0].strip() == ""):  # not a blank line
                rows.append((line, row))
            line = reader.line_num + 1
    except csv.Error as error:
        raise InputError("text", f"line {line}: {error}")

    trim = options["trim"]
    if trim:
        rows = [(line, [cell.strip() for cell in row]) for line, row in rows]
    if options["header"]:
        if not rows:
            raise InputError("text", "no header row (the document is empty)")
        _, first = rows.pop(0)
        if columns is None:
            columns = [name.strip() for name in first]
            check_names("text", columns, where="header row: ")

    convert = infer if options["infer"] else (lambda cell: cell)
    records = []
    for line, row in rows:
        values = [convert(cell) for cell in row]
        if columns is None:
            records.append(values)
            continue
        if len(values) != len(columns):
            if not options["ragged"]:
                raise InputError(
                    "text",
                    f"line {line} has {len(values)} field{'s' * (len(values) != 1)}, "
                    f"the header has {len(columns)} (set `ragged` to pad or cut rows)",
                )
            values = (values + [None] * len(columns))[: len(columns)]
        records.append(dict(zip(columns, values)))

    host.log(
        host.LogLevel.INFO,
        f"read {len(records)} record(s)" + (f" with {len(columns)} column(s)" if columns is not None else ""),
    )
    return {"columns": columns, "records": records, "count": len(records)}


def check_names(field, names, where=""):
    seen = set()
    for index, name in enumerate(names):
        if name == "":
            raise InputError(field, f"{where}column {index + 1} has no name")
        if name in seen:
            raise InputError(field, f"{where}column name {json.dumps(name)} appears twice")
        seen.add(name)


def infer(cell):
    if cell == "":
        return None
    lowered = cell.lower()
    if lowered == "true":
        return True
    if lowered == "false":
        return False
    if INTEGER.fullmatch(cell):
        number = int(cell)
        # Past 2^53 a JSON number loses digits: keep such IDs as text.
        return number if abs(number) < 2**53 else cell
    if NUMBER.fullmatch(cell):
        return float(cell)
    return cell


def kind(value):
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}[
        type(value)
    ]

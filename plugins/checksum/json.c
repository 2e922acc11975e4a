// See json.h.
#include "json.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define JSON_MAX_DEPTH 64

typedef struct {
  const char *start;
  const char *p;
  const char *end;
  char *error;
  size_t error_len;
} parser;

static bool fail(parser *ps, const char *what) {
  if (ps->error_len > 0) {
    if (ps->p >= ps->end) {
      snprintf(ps->error, ps->error_len, "%s at the end of the text", what);
    } else {
      snprintf(ps->error, ps->error_len, "%s at byte %zu", what, (size_t)(ps->p - ps->start));
    }
  }
  return false;
}

static void skip_ws(const char **p, const char *end) {
  while (*p < end && (**p == ' ' || **p == '\t' || **p == '\n' || **p == '\r')) {
    (*p)++;
  }
}

static int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Four hex digits at p (p + 4 <= end checked by the caller), or -1.
static int32_t hex4(const char *p) {
  int32_t value = 0;
  for (int i = 0; i < 4; i++) {
    int digit = hex_digit(p[i]);
    if (digit < 0) return -1;
    value = value * 16 + digit;
  }
  return value;
}

static bool parse_string(parser *ps) {
  ps->p++;  // the opening quote
  while (ps->p < ps->end) {
    unsigned char c = (unsigned char)*ps->p;
    if (c == '"') {
      ps->p++;
      return true;
    }
    if (c < 0x20) return fail(ps, "control character in a string");
    if (c != '\\') {
      ps->p++;
      continue;
    }
    if (ps->end - ps->p < 2) return fail(ps, "unterminated string");
    char escape = ps->p[1];
    if (strchr("\"\\/bfnrt", escape) != NULL && escape != '\0') {
      ps->p += 2;
      continue;
    }
    if (escape != 'u') return fail(ps, "invalid escape in a string");
    if (ps->end - ps->p < 6) return fail(ps, "invalid \\u escape");
    int32_t unit = hex4(ps->p + 2);
    if (unit < 0) return fail(ps, "invalid \\u escape");
    if (unit >= 0xDC00 && unit <= 0xDFFF) return fail(ps, "lone surrogate in a \\u escape");
    if (unit >= 0xD800 && unit <= 0xDBFF) {
      int32_t low = (ps->end - ps->p >= 12 && ps->p[6] == '\\' && ps->p[7] == 'u') ? hex4(ps->p + 8) : -1;
      if (low < 0xDC00 || low > 0xDFFF) return fail(ps, "lone surrogate in a \\u escape");
      ps->p += 6;
    }
    ps->p += 6;
  }
  return fail(ps, "unterminated string");
}

static bool digits(parser *ps) {
  const char *first = ps->p;
  while (ps->p < ps->end && *ps->p >= '0' && *ps->p <= '9') ps->p++;
  return ps->p > first;
}

static bool parse_number(parser *ps) {
  if (*ps->p == '-') ps->p++;
  if (ps->p < ps->end && *ps->p == '0') {
    ps->p++;
  } else if (!digits(ps)) {
    return fail(ps, "invalid number");
  }
  if (ps->p < ps->end && *ps->p == '.') {
    ps->p++;
    if (!digits(ps)) return fail(ps, "invalid number");
  }
  if (ps->p < ps->end && (*ps->p == 'e' || *ps->p == 'E')) {
    ps->p++;
    if (ps->p < ps->end && (*ps->p == '+' || *ps->p == '-')) ps->p++;
    if (!digits(ps)) return fail(ps, "invalid number");
  }
  return true;
}

static bool literal(parser *ps, const char *word) {
  size_t len = strlen(word);
  if ((size_t)(ps->end - ps->p) < len || memcmp(ps->p, word, len) != 0) {
    return fail(ps, "expected a JSON value");
  }
  ps->p += len;
  return true;
}

static bool parse_value(parser *ps, int depth, json_value *out);

static bool parse_container(parser *ps, int depth, char close) {
  if (depth >= JSON_MAX_DEPTH) return fail(ps, "nested too deeply");
  ps->p++;  // '[' or '{'
  skip_ws(&ps->p, ps->end);
  if (ps->p < ps->end && *ps->p == close) {
    ps->p++;
    return true;
  }
  for (;;) {
    json_value ignored;
    if (close == '}') {
      if (ps->p >= ps->end || *ps->p != '"') return fail(ps, "expected a string key");
      if (!parse_string(ps)) return false;
      skip_ws(&ps->p, ps->end);
      if (ps->p >= ps->end || *ps->p != ':') return fail(ps, "expected ':'");
      ps->p++;
      skip_ws(&ps->p, ps->end);
    }
    if (!parse_value(ps, depth + 1, &ignored)) return false;
    skip_ws(&ps->p, ps->end);
    if (ps->p < ps->end && *ps->p == ',') {
      ps->p++;
      skip_ws(&ps->p, ps->end);
      continue;
    }
    if (ps->p < ps->end && *ps->p == close) {
      ps->p++;
      return true;
    }
    return fail(ps, close == '}' ? "expected ',' or '}'" : "expected ',' or ']'");
  }
}

static bool parse_value(parser *ps, int depth, json_value *out) {
  if (ps->p >= ps->end) return fail(ps, "expected a JSON value");
  out->start = ps->p;
  bool ok;
  switch (*ps->p) {
    case '{':
      out->type = JSON_OBJECT;
      ok = parse_container(ps, depth, '}');
      break;
    case '[':
      out->type = JSON_ARRAY;
      ok = parse_container(ps, depth, ']');
      break;
    case '"':
      out->type = JSON_STRING;
      ok = parse_string(ps);
      break;
    case 't':
      out->type = JSON_BOOL;
      ok = literal(ps, "true");
      break;
    case 'f':
      out->type = JSON_BOOL;
      ok = literal(ps, "false");
      break;
    case 'n':
      out->type = JSON_NULL;
      ok = literal(ps, "null");
      break;
    default:
      if (*ps->p == '-' || (*ps->p >= '0' && *ps->p <= '9')) {
        out->type = JSON_NUMBER;
        ok = parse_number(ps);
      } else {
        ok = fail(ps, "expected a JSON value");
      }
  }
  out->len = (size_t)(ps->p - out->start);
  return ok;
}

bool json_parse(const char *text, size_t len, json_value *out, char *error, size_t error_len) {
  parser ps = {text, text, text + len, error, error_len};
  skip_ws(&ps.p, ps.end);
  if (!parse_value(&ps, 0, out)) return false;
  skip_ws(&ps.p, ps.end);
  if (ps.p != ps.end) return fail(&ps, "trailing characters after the JSON value");
  return true;
}

const char *json_type_name(json_type type) {
  switch (type) {
    case JSON_NULL: return "null";
    case JSON_BOOL: return "boolean";
    case JSON_NUMBER: return "number";
    case JSON_STRING: return "string";
    case JSON_ARRAY: return "array";
    case JSON_OBJECT: return "object";
  }
  return "?";
}

// The walkers below run on text json_parse accepted, so they cannot fail.

json_iter json_members(const json_value *object) {
  json_iter it = {object->start + 1, object->start + object->len - 1};
  return it;
}

json_iter json_elements(const json_value *array) {
  return json_members(array);
}

static void next_value(json_iter *it, json_value *value) {
  parser ps = {it->p, it->p, it->end, NULL, 0};
  parse_value(&ps, 0, value);
  it->p = ps.p;
  skip_ws(&it->p, it->end);
  if (it->p < it->end && *it->p == ',') it->p++;
}

bool json_next_member(json_iter *it, json_value *key, json_value *value) {
  skip_ws(&it->p, it->end);
  if (it->p >= it->end) return false;
  parser ps = {it->p, it->p, it->end, NULL, 0};
  key->type = JSON_STRING;
  key->start = ps.p;
  parse_string(&ps);
  key->len = (size_t)(ps.p - key->start);
  it->p = ps.p;
  skip_ws(&it->p, it->end);
  it->p++;  // ':'
  skip_ws(&it->p, it->end);
  next_value(it, value);
  return true;
}

bool json_next_element(json_iter *it, json_value *value) {
  skip_ws(&it->p, it->end);
  if (it->p >= it->end) return false;
  next_value(it, value);
  return true;
}

// Appends the UTF-8 encoding of `code` (at most 4 bytes) at `out`.
static size_t utf8_encode(uint32_t code, char *out) {
  if (code < 0x80) {
    out[0] = (char)code;
    return 1;
  }
  if (code < 0x800) {
    out[0] = (char)(0xC0 | (code >> 6));
    out[1] = (char)(0x80 | (code & 0x3F));
    return 2;
  }
  if (code < 0x10000) {
    out[0] = (char)(0xE0 | (code >> 12));
    out[1] = (char)(0x80 | ((code >> 6) & 0x3F));
    out[2] = (char)(0x80 | (code & 0x3F));
    return 3;
  }
  out[0] = (char)(0xF0 | (code >> 18));
  out[1] = (char)(0x80 | ((code >> 12) & 0x3F));
  out[2] = (char)(0x80 | ((code >> 6) & 0x3F));
  out[3] = (char)(0x80 | (code & 0x3F));
  return 4;
}

char *json_string_decode(const json_value *string, size_t *len) {
  const char *p = string->start + 1;
  const char *end = string->start + string->len - 1;
  // Decoding never makes the text longer: "\uXXXX" (6 bytes) is at most 3
  // bytes of UTF-8, a surrogate pair (12) 4 bytes.
  char *out = malloc((size_t)(end - p) + 1);
  if (out == NULL) abort();
  size_t n = 0;
  while (p < end) {
    if (*p != '\\') {
      out[n++] = *p++;
      continue;
    }
    char escape = p[1];
    p += 2;
    switch (escape) {
      case 'b': out[n++] = '\b'; break;
      case 'f': out[n++] = '\f'; break;
      case 'n': out[n++] = '\n'; break;
      case 'r': out[n++] = '\r'; break;
      case 't': out[n++] = '\t'; break;
      case 'u': {
        uint32_t code = (uint32_t)hex4(p);
        p += 4;
        if (code >= 0xD800 && code <= 0xDBFF) {
          uint32_t low = (uint32_t)hex4(p + 2);
          p += 6;
          code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
        }
        n += utf8_encode(code, out + n);
        break;
      }
      default: out[n++] = escape;  // '"', '\\', '/'
    }
  }
  out[n] = '\0';
  *len = n;
  return out;
}

bool json_key_is(const json_value *key, const char *name) {
  size_t name_len = strlen(name);
  // Fast path: no escapes in the key.
  if (key->len == name_len + 2 && memchr(key->start, '\\', key->len) == NULL) {
    return memcmp(key->start + 1, name, name_len) == 0;
  }
  size_t len;
  char *decoded = json_string_decode(key, &len);
  bool same = len == name_len && memcmp(decoded, name, len) == 0;
  free(decoded);
  return same;
}

bool json_uint64(const json_value *number, uint64_t *out) {
  if (number->type != JSON_NUMBER || number->len == 0) return false;
  uint64_t value = 0;
  for (size_t i = 0; i < number->len; i++) {
    char c = number->start[i];
    if (c < '0' || c > '9') return false;  // '-', '.', 'e'
    uint64_t digit = (uint64_t)(c - '0');
    if (value > (UINT64_MAX - digit) / 10) return false;
    value = value * 10 + digit;
  }
  *out = value;
  return true;
}

static void reserve(json_buf *buf, size_t more) {
  if (buf->len + more <= buf->cap) return;
  size_t cap = buf->cap ? buf->cap : 64;
  while (cap < buf->len + more) cap *= 2;
  char *data = realloc(buf->data, cap);
  if (data == NULL) abort();
  buf->data = data;
  buf->cap = cap;
}

void json_buf_raw(json_buf *buf, const char *text, size_t len) {
  reserve(buf, len);
  memcpy(buf->data + buf->len, text, len);
  buf->len += len;
}

void json_buf_str(json_buf *buf, const char *text) {
  json_buf_raw(buf, text, strlen(text));
}

void json_buf_string(json_buf *buf, const char *text, size_t len) {
  json_buf_raw(buf, "\"", 1);
  for (size_t i = 0; i < len; i++) {
    unsigned char c = (unsigned char)text[i];
    char escape[7];
    if (c == '"' || c == '\\' || c == '\n' || c == '\r' || c == '\t') {
      escape[0] = '\\';
      escape[1] = c == '\n' ? 'n' : c == '\r' ? 'r' : c == '\t' ? 't' : (char)c;
      json_buf_raw(buf, escape, 2);
    } else if (c < 0x20) {
      snprintf(escape, sizeof escape, "\\u%04x", c);
      json_buf_raw(buf, escape, 6);
    } else {
      json_buf_raw(buf, (const char *)&text[i], 1);
    }
  }
  json_buf_raw(buf, "\"", 1);
}

void json_buf_uint(json_buf *buf, uint64_t value) {
  char digits[24];
  int len = snprintf(digits, sizeof digits, "%llu", (unsigned long long)value);
  json_buf_raw(buf, digits, (size_t)len);
}

// A small JSON reader (RFC 8259) for plugin input: validate the whole text
// once, then walk objects and arrays and decode the members you need. No
// allocation except for decoded strings; no global state.
//
//   json_value root;
//   char error[128];
//   if (!json_parse(text, len, &root, error, sizeof error)) ... // error says where
//   json_iter it = json_members(&root);     // root.type == JSON_OBJECT
//   json_value key, value;
//   while (json_next_member(&it, &key, &value)) {
//     if (json_key_is(&key, "data")) ...
//   }
#ifndef TRELLIS_JSON_H
#define TRELLIS_JSON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum {
  JSON_NULL,
  JSON_BOOL,
  JSON_NUMBER,
  JSON_STRING,
  JSON_ARRAY,
  JSON_OBJECT,
} json_type;

// A value inside the parsed text: its type and its raw bytes (for a string,
// the quotes and escapes included). Valid while the text is.
typedef struct {
  json_type type;
  const char *start;
  size_t len;
} json_value;

typedef struct {
  const char *p;
  const char *end;
} json_iter;

// Checks that `text` is exactly one JSON value (whitespace around it
// allowed, nesting up to 64 deep). On failure writes e.g.
// "expected ':' at byte 12" into `error` and returns false.
bool json_parse(const char *text, size_t len, json_value *out, char *error, size_t error_len);

// "null", "boolean", "number", "string", "array" or "object".
const char *json_type_name(json_type type);

// Iterates the members of an object / the elements of an array.
json_iter json_members(const json_value *object);
bool json_next_member(json_iter *it, json_value *key, json_value *value);
json_iter json_elements(const json_value *array);
bool json_next_element(json_iter *it, json_value *value);

// Whether the string value `key` equals `name` (escapes decoded).
bool json_key_is(const json_value *key, const char *name);

// Decodes a string value into a new NUL-terminated UTF-8 buffer (malloc;
// the caller frees it) and its length in bytes (it may hold "\u0000").
char *json_string_decode(const json_value *string, size_t *len);

// The value of a number that is an integer literal (no fraction, no
// exponent) from 0 to UINT64_MAX; false otherwise.
bool json_uint64(const json_value *number, uint64_t *out);

// A growable output buffer for building JSON text (malloc; aborts when out
// of memory). Hand `data`/`len` over as the task's output.
typedef struct {
  char *data;
  size_t len;
  size_t cap;
} json_buf;

void json_buf_raw(json_buf *buf, const char *text, size_t len);
void json_buf_str(json_buf *buf, const char *text);        // raw, NUL-terminated
void json_buf_string(json_buf *buf, const char *text, size_t len); // quoted and escaped
void json_buf_uint(json_buf *buf, uint64_t value);

#endif

// `checksum`: a 32-bit checksum of a text, and optionally a stable bucket for
// it. A C plugin (see docs/plugins.md, section C); built by plugins/build-c.sh.
//
// Input:
//   { "data": "db-02.example.com", "algorithm": "crc32", "buckets": 4 }
// - `data` (required): a string; its UTF-8 bytes are checksummed.
// - `algorithm`: `crc32` (IEEE 802.3, as zlib, gzip, zip and PNG compute it),
//   `crc32c` (Castagnoli, as iSCSI, ext4 and Kafka), `adler32` (zlib's),
//   `fnv1a32` (FNV-1a, 32 bits). Default: the step's config value `algorithm`,
//   else `crc32`.
// - `buckets`: an integer from 1 to 4294967295; the output then carries
//   `bucket` = value mod buckets: the same text always lands in the same
//   bucket (canary groups, sharding hosts across workers).
//
// Output:
//   { "algorithm": "crc32", "value": 3819343465, "hex": "e3a68e69", "bytes": 17, "bucket": 1 }
// `value` is the checksum as an unsigned integer, `hex` the same as 8
// lowercase hex digits, `bytes` the length of `data` in UTF-8 bytes.
//
// Errors (fatal, not retryable; details `{"field": NAME}` when a field is at
// fault): input not JSON or not an object; `data` missing or not a string;
// unknown `algorithm`; `buckets` not an integer in range; unknown fields.
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"
#include "task.h"

#define NAME "checksum"
#define VERSION "1.0.0"

static const char *const ALGORITHMS[] = {"crc32", "crc32c", "adler32", "fnv1a32"};
#define ALGORITHM_COUNT (sizeof ALGORITHMS / sizeof ALGORITHMS[0])

static const char INPUT_SCHEMA[] =
    "{\n"
    "  \"$schema\": \"https://json-schema.org/draft/2020-12/schema\",\n"
    "  \"type\": \"object\",\n"
    "  \"required\": [\"data\"],\n"
    "  \"additionalProperties\": false,\n"
    "  \"properties\": {\n"
    "    \"data\": { \"type\": \"string\", \"description\": \"checksummed as its UTF-8 bytes\" },\n"
    "    \"algorithm\": { \"enum\": [\"crc32\", \"crc32c\", \"adler32\", \"fnv1a32\"], "
    "\"description\": \"default: the step config's `algorithm`, else crc32\" },\n"
    "    \"buckets\": { \"type\": \"integer\", \"minimum\": 1, \"maximum\": 4294967295, "
    "\"description\": \"adds `bucket` = value mod buckets\" }\n"
    "  }\n"
    "}";

static const char OUTPUT_SCHEMA[] =
    "{\n"
    "  \"$schema\": \"https://json-schema.org/draft/2020-12/schema\",\n"
    "  \"type\": \"object\",\n"
    "  \"required\": [\"algorithm\", \"value\", \"hex\", \"bytes\"],\n"
    "  \"properties\": {\n"
    "    \"algorithm\": { \"type\": \"string\" },\n"
    "    \"value\": { \"type\": \"integer\", \"minimum\": 0, \"maximum\": 4294967295 },\n"
    "    \"hex\": { \"type\": \"string\", \"pattern\": \"^[0-9a-f]{8}$\" },\n"
    "    \"bytes\": { \"type\": \"integer\", \"minimum\": 0 },\n"
    "    \"bucket\": { \"type\": \"integer\", \"minimum\": 0, \"description\": \"present when `buckets` is\" }\n"
    "  }\n"
    "}";

// info(): every string is a fresh heap copy, because the generated
// `cabi_post_info` frees them after the host has read them.
void exports_task_info(task_plugin_info_t *ret) {
  task_string_dup(&ret->name, NAME);
  task_string_dup(&ret->version, VERSION);
  task_string_dup(&ret->description,
                  "32-bit checksum of a text (crc32, crc32c, adler32, fnv1a32) and a stable bucket for it");
  ret->input_schema.is_some = true;
  task_string_dup(&ret->input_schema.val, INPUT_SCHEMA);
  ret->output_schema.is_some = true;
  task_string_dup(&ret->output_schema.val, OUTPUT_SCHEMA);
}

// --- the checksums -------------------------------------------------------

// Reflected CRC-32 with polynomial `poly`, initial value and final xor ~0.
static uint32_t crc32_reflected(uint32_t poly, const uint8_t *data, size_t len) {
  uint32_t crc = 0xFFFFFFFFu;
  for (size_t i = 0; i < len; i++) {
    crc ^= data[i];
    for (int bit = 0; bit < 8; bit++) {
      crc = (crc >> 1) ^ (poly & (0u - (crc & 1u)));
    }
  }
  return ~crc;
}

static uint32_t adler32(const uint8_t *data, size_t len) {
  uint32_t a = 1, b = 0;
  for (size_t i = 0; i < len; i++) {
    a = (a + data[i]) % 65521u;
    b = (b + a) % 65521u;
  }
  return (b << 16) | a;
}

static uint32_t fnv1a32(const uint8_t *data, size_t len) {
  uint32_t hash = 2166136261u;
  for (size_t i = 0; i < len; i++) {
    hash ^= data[i];
    hash *= 16777619u;
  }
  return hash;
}

static uint32_t checksum(const char *algorithm, const uint8_t *data, size_t len) {
  if (strcmp(algorithm, "crc32c") == 0) return crc32_reflected(0x82F63B78u, data, len);
  if (strcmp(algorithm, "adler32") == 0) return adler32(data, len);
  if (strcmp(algorithm, "fnv1a32") == 0) return fnv1a32(data, len);
  return crc32_reflected(0xEDB88320u, data, len);
}

// The entry of ALGORITHMS named `name` (`len` bytes), or NULL.
static const char *find_algorithm(const char *name, size_t len) {
  for (size_t i = 0; i < ALGORITHM_COUNT; i++) {
    if (strlen(ALGORITHMS[i]) == len && memcmp(ALGORITHMS[i], name, len) == 0) {
      return ALGORITHMS[i];
    }
  }
  return NULL;
}

// --- errors ----------------------------------------------------------------

// Fills `err` with a fatal (not retryable) task-error: the message
// "invalid input: ..." and, when `field` is given, details {"field": field}.
// Returns false, so `return input_error(...)` ends run().
static bool input_error(task_task_error_t *err, const char *field, const char *format, ...) {
  char message[512];
  int len = snprintf(message, sizeof message, "invalid input: ");
  va_list args;
  va_start(args, format);
  vsnprintf(message + len, sizeof message - (size_t)len, format, args);
  va_end(args);
  task_string_dup(&err->message, message);  // freed by cabi_post_run
  err->retryable = false;
  err->details.is_some = field != NULL;
  if (field != NULL) {
    json_buf details = {0};
    json_buf_str(&details, "{\"field\":");
    json_buf_string(&details, field, strlen(field));
    json_buf_str(&details, "}");
    // The buffer is malloc'd: hand it over as is (cabi_post_run frees it).
    err->details.val.ptr = (uint8_t *)details.data;
    err->details.val.len = details.len;
  }
  return false;
}

// Up to 40 bytes of a user's text for an error message, cut on a UTF-8
// character boundary (a string crossing the component boundary must be
// valid UTF-8) and with "..." when cut.
static void excerpt(char *out, size_t out_len, const char *text, size_t len) {
  size_t keep = len;
  const char *more = "";
  if (keep > 40) {
    keep = 40;
    while (keep > 0 && ((unsigned char)text[keep] & 0xC0) == 0x80) keep--;
    more = "...";
  }
  snprintf(out, out_len, "%.*s%s", (int)keep, text, more);
}

// --- run -------------------------------------------------------------------

typedef struct {
  char *data;  // decoded, malloc'd
  size_t data_len;
  const char *algorithm;  // an entry of ALGORITHMS, or NULL: not given
  bool has_buckets;
  uint64_t buckets;
} request;

// `where` names the source of `name` for the message, `field` for the details.
static bool unknown_algorithm(task_task_error_t *err, const char *field, const char *where, const char *name,
                              size_t len) {
  char shown[64];
  excerpt(shown, sizeof shown, name, len);
  return input_error(err, field, "%s: unknown algorithm \"%s\", expected one of crc32, crc32c, adler32, fnv1a32", where, shown);
}

static bool parse_request(const task_string_t *input, request *req, task_task_error_t *err) {
  json_value root;
  char problem[128];
  if (!json_parse((const char *)input->ptr, input->len, &root, problem, sizeof problem)) {
    return input_error(err, NULL, "not JSON: %s", problem);
  }
  if (root.type != JSON_OBJECT) {
    return input_error(err, NULL, "expected an object, got %s", json_type_name(root.type));
  }
  bool seen_data = false, seen_algorithm = false, seen_buckets = false;
  json_iter members = json_members(&root);
  json_value key, value;
  while (json_next_member(&members, &key, &value)) {
    if (json_key_is(&key, "data")) {
      if (seen_data) return input_error(err, "data", "duplicate field `data`");
      seen_data = true;
      if (value.type != JSON_STRING) {
        return input_error(err, "data", "field `data`: expected a string, got %s", json_type_name(value.type));
      }
      req->data = json_string_decode(&value, &req->data_len);
    } else if (json_key_is(&key, "algorithm")) {
      if (seen_algorithm) return input_error(err, "algorithm", "duplicate field `algorithm`");
      seen_algorithm = true;
      if (value.type == JSON_NULL) continue;
      if (value.type != JSON_STRING) {
        return input_error(err, "algorithm", "field `algorithm`: expected a string, got %s",
                           json_type_name(value.type));
      }
      size_t len;
      char *name = json_string_decode(&value, &len);
      req->algorithm = find_algorithm(name, len);
      bool ok = req->algorithm != NULL || unknown_algorithm(err, "algorithm", "field `algorithm`", name, len);
      free(name);
      if (!ok) return false;
    } else if (json_key_is(&key, "buckets")) {
      if (seen_buckets) return input_error(err, "buckets", "duplicate field `buckets`");
      seen_buckets = true;
      if (value.type == JSON_NULL) continue;
      if (!json_uint64(&value, &req->buckets) || req->buckets < 1 || req->buckets > 0xFFFFFFFFu) {
        char shown[64];
        excerpt(shown, sizeof shown, value.start, value.len);
        return input_error(err, "buckets", "field `buckets`: expected an integer from 1 to 4294967295, got %s",
                           shown);
      }
      req->has_buckets = true;
    } else {
      size_t len;
      char *name = json_string_decode(&key, &len);
      char shown[64];
      excerpt(shown, sizeof shown, name, len);
      free(name);
      return input_error(err, NULL, "unknown field `%s`, expected one of `data`, `algorithm`, `buckets`", shown);
    }
  }
  if (!seen_data) return input_error(err, "data", "missing field `data`");
  return true;
}

// The default algorithm from the step's config (`config = { algorithm = ".." }`
// in the workflow), or "crc32".
static bool configured_algorithm(const char **algorithm, task_task_error_t *err) {
  task_string_t key;
  task_string_set(&key, "algorithm");  // borrowed by the call: a literal is fine
  task_string_t value;                 // owned by us when the call returns true
  if (!trellis_plugin_host_config(&key, &value)) {
    *algorithm = "crc32";
    return true;
  }
  *algorithm = find_algorithm((const char *)value.ptr, value.len);
  bool ok = *algorithm != NULL || unknown_algorithm(err, NULL, "step config `algorithm`", (const char *)value.ptr, value.len);
  task_string_free(&value);
  return ok;
}

static void log_line(trellis_plugin_host_log_level_t level, const char *format, ...) {
  char line[256];
  va_list args;
  va_start(args, format);
  int len = vsnprintf(line, sizeof line, format, args);
  va_end(args);
  if (len < 0) return;
  if ((size_t)len >= sizeof line) len = sizeof line - 1;
  task_string_t message = {(uint8_t *)line, (size_t)len};  // borrowed by the call
  trellis_plugin_host_log(level, &message);
}

static bool run(const task_string_t *input, task_string_t *ret, task_task_error_t *err) {
  request req = {0};
  bool ok = parse_request(input, &req, err);
  if (ok && req.algorithm == NULL) ok = configured_algorithm(&req.algorithm, err);
  if (ok) {
    uint32_t value = checksum(req.algorithm, (const uint8_t *)req.data, req.data_len);
    char hex[9];
    snprintf(hex, sizeof hex, "%08x", value);
    log_line(TRELLIS_PLUGIN_HOST_LOG_LEVEL_DEBUG, "%s of %zu bytes: %s", req.algorithm, req.data_len, hex);

    json_buf out = {0};
    json_buf_str(&out, "{\"algorithm\":");
    json_buf_string(&out, req.algorithm, strlen(req.algorithm));
    json_buf_str(&out, ",\"value\":");
    json_buf_uint(&out, value);
    json_buf_str(&out, ",\"hex\":");
    json_buf_string(&out, hex, 8);
    json_buf_str(&out, ",\"bytes\":");
    json_buf_uint(&out, req.data_len);
    if (req.has_buckets) {
      json_buf_str(&out, ",\"bucket\":");
      json_buf_uint(&out, value % req.buckets);
    }
    json_buf_str(&out, "}");
    // Ownership of the malloc'd buffer passes to the result: the generated
    // `cabi_post_run` frees it once the host has copied it out.
    ret->ptr = (uint8_t *)out.data;
    ret->len = out.len;
  }
  free(req.data);
  return ok;
}

// run(): `ctx` and `input` were allocated for us (through cabi_realloc) and
// are ours to free. Returns true with `ret` set, or false with `err` set.
bool exports_task_run(task_step_context_t *ctx, task_string_t *input, task_string_t *ret, task_task_error_t *err) {
  bool ok = run(input, ret, err);
  task_step_context_free(ctx);
  task_string_free(input);
  return ok;
}

//! The shared vocabulary of limits: what one step attempt may use
//! ([`Limits`], [`LimitOverrides`]), the sizes and durations that express them
//! ([`Size`], [`HumanDuration`]), the `[limits]` table that `trellis.toml` and
//! workflow files both write, with its one validation, and the outbound-HTTP
//! allow-list entry ([`HostPattern`]).
//!
//! Boundary: values and their checks only. Nothing here knows the engine, a
//! workflow or the configuration; they all use it.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;
use std::time::Duration;

use http::uri::Scheme;
use serde::de::value::{Error as ValueError, StrDeserializer};
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use toml::Spanned;

/// What one step attempt may use. Every field bounds something a guest could
/// otherwise make the host do without end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Wasm instructions (roughly) before the attempt is stopped: bounds CPU.
    pub fuel: u64,
    /// Bytes over all linear memories and tables of the instance: bounds host RAM.
    pub memory: u64,
    /// Wall-clock time from instantiation to the end of `run`.
    pub timeout: Duration,
    /// Bytes of output JSON the host accepts from `run`.
    pub max_output: u64,
    /// Bytes of log (host `log` lines plus stdout and stderr) kept per attempt;
    /// the rest is dropped and counted.
    pub max_log: u64,
    /// Outbound HTTP requests (`wasi:http`) one attempt may send.
    pub http_requests: u32,
    /// Bytes of one outbound request's body.
    pub http_request_body: u64,
    /// Bytes of one response's body the guest may read; the body is cut off
    /// with an error past this.
    pub http_response_body: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            fuel: 1_000_000_000,
            memory: 128 * 1024 * 1024,
            timeout: Duration::from_secs(60),
            max_output: 16 * 1024 * 1024,
            max_log: 1024 * 1024,
            http_requests: 64,
            http_request_body: 16 * 1024 * 1024,
            http_response_body: 16 * 1024 * 1024,
        }
    }
}

/// Optional overrides of [`Limits`], as a workflow's `[limits]` table or a step's
/// `limits` give them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitOverrides {
    pub fuel: Option<u64>,
    pub memory: Option<u64>,
    pub timeout: Option<Duration>,
    pub max_output: Option<u64>,
    pub max_log: Option<u64>,
    pub http_requests: Option<u32>,
    pub http_request_body: Option<u64>,
    pub http_response_body: Option<u64>,
}

impl LimitOverrides {
    /// `self` on top of `base`.
    pub fn apply(&self, base: Limits) -> Limits {
        Limits {
            fuel: self.fuel.unwrap_or(base.fuel),
            memory: self.memory.unwrap_or(base.memory),
            timeout: self.timeout.unwrap_or(base.timeout),
            max_output: self.max_output.unwrap_or(base.max_output),
            max_log: self.max_log.unwrap_or(base.max_log),
            http_requests: self.http_requests.unwrap_or(base.http_requests),
            http_request_body: self.http_request_body.unwrap_or(base.http_request_body),
            http_response_body: self.http_response_body.unwrap_or(base.http_response_body),
        }
    }

    /// `self` on top of `base`, both partial: what a step overrides wins.
    pub fn over(&self, base: &LimitOverrides) -> LimitOverrides {
        LimitOverrides {
            fuel: self.fuel.or(base.fuel),
            memory: self.memory.or(base.memory),
            timeout: self.timeout.or(base.timeout),
            max_output: self.max_output.or(base.max_output),
            max_log: self.max_log.or(base.max_log),
            http_requests: self.http_requests.or(base.http_requests),
            http_request_body: self.http_request_body.or(base.http_request_body),
            http_response_body: self.http_response_body.or(base.http_response_body),
        }
    }
}

/// The largest memory a step may ask for: a wasm32 instance cannot address more.
pub const MAX_MEMORY: u64 = 4 * 1024 * 1024 * 1024;

/// `[limits]`, or a step's `limits`: each key overrides the one below it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table of limits")]
pub struct LimitsTable {
    pub fuel: Option<Spanned<u64>>,
    pub memory: Option<Spanned<Size>>,
    pub timeout: Option<Spanned<HumanDuration>>,
    pub max_output: Option<Spanned<Size>>,
    pub max_log: Option<Spanned<Size>>,
    pub http_requests: Option<Spanned<u32>>,
    pub http_request_body: Option<Spanned<Size>>,
    pub http_response_body: Option<Spanned<Size>>,
}

impl LimitsTable {
    /// The overrides the table sets, each checked; every value out of bounds
    /// is passed to `report` with its key and span. The one validation of `[limits]`,
    /// in `trellis.toml` and in workflow files alike.
    pub fn overrides(
        &self,
        report: &mut dyn FnMut(&'static str, Range<usize>, String),
    ) -> LimitOverrides {
        let mut check = |key: &'static str, span: Range<usize>, result: Result<(), String>| {
            if let Err(message) = result {
                report(key, span, message);
            }
        };
        if let Some(fuel) = &self.fuel {
            check("fuel", fuel.span(), check_fuel(*fuel.get_ref()));
        }
        if let Some(memory) = &self.memory {
            check("memory", memory.span(), check_memory(memory.get_ref().0));
        }
        if let Some(timeout) = &self.timeout {
            check(
                "timeout",
                timeout.span(),
                check_timeout(timeout.get_ref().0),
            );
        }
        let size = |size: &Option<Spanned<Size>>| size.as_ref().map(|size| size.get_ref().0);
        LimitOverrides {
            fuel: self.fuel.as_ref().map(|fuel| *fuel.get_ref()),
            memory: size(&self.memory),
            timeout: self.timeout.as_ref().map(|timeout| timeout.get_ref().0),
            max_output: size(&self.max_output),
            max_log: size(&self.max_log),
            http_requests: self.http_requests.as_ref().map(|n| *n.get_ref()),
            http_request_body: size(&self.http_request_body),
            http_response_body: size(&self.http_response_body),
        }
    }
}

/// `fuel`: at least 1 (none would stop every step before it starts).
pub fn check_fuel(fuel: u64) -> Result<(), String> {
    if fuel == 0 {
        return Err("`fuel` must be at least 1".to_owned());
    }
    Ok(())
}

/// `memory`: more than nothing, and no more than a wasm32 instance can address.
pub fn check_memory(bytes: u64) -> Result<(), String> {
    if bytes == 0 {
        return Err("`memory` must be more than 0 bytes".to_owned());
    }
    if bytes > MAX_MEMORY {
        return Err(format!(
            "`memory` is {}, but a wasm32 instance cannot use more than {}",
            bytesize::ByteSize(bytes).display().iec(),
            bytesize::ByteSize(MAX_MEMORY).display().iec(),
        ));
    }
    Ok(())
}

/// `timeout`: longer than nothing.
pub fn check_timeout(timeout: Duration) -> Result<(), String> {
    if timeout.is_zero() {
        return Err("`timeout` must be longer than 0s".to_owned());
    }
    Ok(())
}

/// A duration written the humantime way: `"250ms"`, `"10s"`, `"1m 30s"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;

        impl Visitor<'_> for DurationVisitor {
            type Value = HumanDuration;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"10s\"")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<HumanDuration, E> {
                humantime::parse_duration(v.trim())
                    .map(HumanDuration)
                    .map_err(|error| {
                        // humantime lists every unit it knows; the examples say enough.
                        let error = error.to_string();
                        let reason = error.split(", supported units").next().unwrap_or_default();
                        E::custom(format!(
                            "invalid duration \"{v}\" ({reason}); write it like \"250ms\", \"10s\" or \"1m 30s\""
                        ))
                    })
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<HumanDuration, E> {
                Err(needs_unit(v))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<HumanDuration, E> {
                Err(needs_unit(v))
            }
        }

        deserializer.deserialize_any(DurationVisitor)
    }
}

/// A bare number where a duration belongs: seconds? milliseconds? Say so.
fn needs_unit<E: de::Error>(number: impl fmt::Display) -> E {
    E::custom(format!(
        "a duration needs a unit: write it as a string like \"{number}s\" or \"{number}ms\""
    ))
}

/// As in a TOML file: `"10s"`, `"1m 30s"` (an environment variable's value).
impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        HumanDuration::deserialize(StrDeserializer::<ValueError>::new(s))
            .map_err(|error| error.to_string())
    }
}

/// A number of bytes: an integer, or a string with a unit like `"64MiB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;

        impl Visitor<'_> for SizeVisitor {
            type Value = Size;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"64MiB\" or a number of bytes")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom(format!("a size cannot be negative ({v})")))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                v.trim()
                    .parse::<bytesize::ByteSize>()
                    .map(|size| Size(size.as_u64()))
                    .map_err(|_| {
                        E::custom(format!(
                            "invalid size \"{v}\"; write it like \"64MiB\", \"512KiB\", \"1GB\" or as a number of bytes"
                        ))
                    })
            }
        }

        deserializer.deserialize_any(SizeVisitor)
    }
}

/// As in a TOML file: `"64MiB"` or a number of bytes (an environment
/// variable's value).
impl FromStr for Size {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Size::deserialize(StrDeserializer::<ValueError>::new(s)).map_err(|error| error.to_string())
    }
}

/// One `allow_hosts` entry: `[scheme://]host[:port]`.
///
/// - `host` is a name or an IP address (`[::1]` for IPv6), `*.example.com`
///   (any subdomain, not `example.com` itself) or `*` (any host);
/// - without a port only the scheme's default port is allowed (80 for http,
///   443 for https), `:*` allows any port;
/// - without a scheme both http and https are allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    scheme: Option<Scheme>,
    host: HostMatch,
    port: PortMatch,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostMatch {
    Any,
    Exact(String),
    /// `.example.com` for `*.example.com`.
    Subdomain(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PortMatch {
    Default,
    Any,
    Exact(u16),
}

/// Why an `allow_hosts` entry does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PatternError(String);

impl HostPattern {
    pub fn parse(text: &str) -> Result<HostPattern, PatternError> {
        let bad = |why: &str| PatternError(format!("\"{text}\" {why}"));
        if text.is_empty() {
            return Err(bad("is empty"));
        }
        if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("contains whitespace"));
        }
        let (scheme, rest) = match text.split_once("://") {
            Some(("http", rest)) => (Some(Scheme::HTTP), rest),
            Some(("https", rest)) => (Some(Scheme::HTTPS), rest),
            Some((other, _)) => {
                return Err(bad(&format!(
                    "has scheme \"{other}\"; only http and https are supported"
                )));
            }
            None => (None, text),
        };
        if rest.contains('/') || rest.contains('?') || rest.contains('#') {
            return Err(bad("has a path; write only the host and port"));
        }
        if rest.contains('@') {
            return Err(bad("has user info; write only the host and port"));
        }
        let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
            let (address, after) = bracketed
                .split_once(']')
                .ok_or_else(|| bad("has an unclosed '['"))?;
            let port = match after {
                "" => None,
                _ => Some(
                    after
                        .strip_prefix(':')
                        .ok_or_else(|| bad("has text after ']'"))?,
                ),
            };
            address
                .parse::<std::net::Ipv6Addr>()
                .map_err(|_| bad("has an invalid IPv6 address"))?;
            (HostMatch::Exact(address.to_ascii_lowercase()), port)
        } else {
            let (host, port) = match rest.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (rest, None),
            };
            (parse_host(host).map_err(|why| bad(&why))?, port)
        };
        let port = match port {
            None => PortMatch::Default,
            Some("*") => PortMatch::Any,
            Some(port) => match port.parse::<u16>() {
                Ok(0) | Err(_) => {
                    return Err(bad(&format!(
                        "has port \"{port}\"; a port is 1 to 65535, or *"
                    )));
                }
                Ok(port) => PortMatch::Exact(port),
            },
        };
        Ok(HostPattern { scheme, host, port })
    }

    /// Whether a request with this scheme, host and port may be sent.
    pub fn allows(&self, scheme: &Scheme, host: &str, port: u16) -> bool {
        if self.scheme.as_ref().is_some_and(|s| s != scheme) {
            return false;
        }
        let port_ok = match self.port {
            PortMatch::Any => true,
            PortMatch::Exact(p) => p == port,
            PortMatch::Default => default_port(scheme) == Some(port),
        };
        let host = host.trim_end_matches('.');
        let host_ok = match &self.host {
            HostMatch::Any => true,
            HostMatch::Exact(name) => host.eq_ignore_ascii_case(name),
            HostMatch::Subdomain(suffix) => {
                host.len() > suffix.len()
                    && host
                        .get(host.len() - suffix.len()..)
                        .is_some_and(|end| end.eq_ignore_ascii_case(suffix))
            }
        };
        port_ok && host_ok
    }
}

fn parse_host(host: &str) -> Result<HostMatch, String> {
    if host == "*" {
        return Ok(HostMatch::Any);
    }
    let (wild, name) = match host.strip_prefix("*.") {
        Some(name) => (true, name),
        None => (false, host),
    };
    if name.is_empty() {
        return Err("has no host".to_owned());
    }
    if name.contains('*') {
        return Err("has '*' inside the host; use \"*.example.com\" or \"*\"".to_owned());
    }
    let valid = name.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    });
    if !valid {
        return Err(format!("has an invalid host name \"{name}\""));
    }
    let name = name.to_ascii_lowercase();
    Ok(if wild {
        HostMatch::Subdomain(format!(".{name}"))
    } else {
        HostMatch::Exact(name)
    })
}

/// The port a URL of `scheme` without one goes to.
pub(crate) fn default_port(scheme: &Scheme) -> Option<u16> {
    if *scheme == Scheme::HTTP {
        Some(80)
    } else if *scheme == Scheme::HTTPS {
        Some(443)
    } else {
        None
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(scheme) = &self.scheme {
            write!(f, "{scheme}://")?;
        }
        match &self.host {
            HostMatch::Any => f.write_str("*")?,
            HostMatch::Exact(name) if name.contains(':') => write!(f, "[{name}]")?,
            HostMatch::Exact(name) => f.write_str(name)?,
            HostMatch::Subdomain(suffix) => write!(f, "*{suffix}")?,
        }
        match self.port {
            PortMatch::Default => Ok(()),
            PortMatch::Any => f.write_str(":*"),
            PortMatch::Exact(port) => write!(f, ":{port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allows(pattern: &str, url: &str) -> bool {
        let pattern = HostPattern::parse(pattern).unwrap();
        let uri: http::Uri = url.parse().unwrap();
        let scheme = uri.scheme().cloned().unwrap();
        let host = uri
            .host()
            .unwrap()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = uri.port_u16().or_else(|| default_port(&scheme)).unwrap();
        pattern.allows(&scheme, host, port)
    }

    #[test]
    fn host_and_port_must_both_match() {
        assert!(allows("127.0.0.1:9000", "http://127.0.0.1:9000/x"));
        assert!(!allows("127.0.0.1:9000", "http://127.0.0.1:9001/x"));
        assert!(!allows("127.0.0.1:9000", "http://127.0.0.2:9000/x"));
        assert!(allows("127.0.0.1:*", "http://127.0.0.1:1/"));
    }

    #[test]
    fn no_port_means_the_default_port_of_the_scheme() {
        assert!(allows("api.example.com", "https://api.example.com/v1"));
        assert!(allows("api.example.com", "http://api.example.com/v1"));
        assert!(!allows(
            "api.example.com",
            "https://api.example.com:8443/v1"
        ));
        assert!(allows(
            "https://api.example.com",
            "https://API.example.com/"
        ));
        assert!(!allows(
            "https://api.example.com",
            "http://api.example.com/"
        ));
        assert!(!allows(
            "http://api.example.com:443",
            "https://api.example.com/"
        ));
    }

    #[test]
    fn a_wildcard_matches_subdomains_only() {
        assert!(allows("*.example.com", "https://a.example.com/"));
        assert!(allows("*.example.com", "https://a.b.example.com/"));
        assert!(!allows("*.example.com", "https://example.com/"));
        assert!(!allows("*.example.com", "https://badexample.com/"));
        assert!(!allows("*.example.com", "https://example.com.evil.net/"));
        assert!(allows("*", "https://anything.net/"));
        assert!(!allows("*", "https://anything.net:8443/"));
        assert!(allows("*:*", "http://anything.net:8443/"));
    }

    #[test]
    fn ipv6_addresses_are_bracketed() {
        assert!(allows("[::1]:8080", "http://[::1]:8080/"));
        assert!(!allows("[::1]:8080", "http://[::2]:8080/"));
        assert_eq!(
            HostPattern::parse("[::1]:8080").unwrap().to_string(),
            "[::1]:8080"
        );
    }

    #[test]
    fn bad_entries_say_what_is_wrong() {
        let error = |text: &str| HostPattern::parse(text).unwrap_err().to_string();
        assert_eq!(
            error("http://a.com/path"),
            "\"http://a.com/path\" has a path; write only the host and port"
        );
        assert_eq!(
            error("ftp://a.com"),
            "\"ftp://a.com\" has scheme \"ftp\"; only http and https are supported"
        );
        assert_eq!(
            error("a.com:99999"),
            "\"a.com:99999\" has port \"99999\"; a port is 1 to 65535, or *"
        );
        assert_eq!(
            error("a.*.com"),
            "\"a.*.com\" has '*' inside the host; use \"*.example.com\" or \"*\""
        );
        assert_eq!(
            error("user@a.com"),
            "\"user@a.com\" has user info; write only the host and port"
        );
        assert_eq!(
            error("a..com"),
            "\"a..com\" has an invalid host name \"a..com\""
        );
        assert_eq!(error(""), "\"\" is empty");
        assert_eq!(error("[::1"), "\"[::1\" has an unclosed '['");
    }

    #[test]
    fn patterns_print_as_written() {
        for text in [
            "https://*.example.com:*",
            "127.0.0.1:9000",
            "*",
            "http://a.b",
        ] {
            assert_eq!(HostPattern::parse(text).unwrap().to_string(), text);
        }
    }
}

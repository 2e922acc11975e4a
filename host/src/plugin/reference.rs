//! A reference to a plugin, as a workflow step writes it and the registry
//! resolves it: `name` (the highest version loaded), `name@1.2.0` (that
//! version) or `name@sha256:<hex>` (that build). Parsed once, when the
//! workflow is validated; passed on typed from there.

use std::fmt;
use std::str::FromStr;

/// `name`, `name@1.2.0` or `name@sha256:<64 hex digits>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PluginRef {
    /// The registry name (from the plugin's `info()`).
    pub name: String,
    pub pin: PluginPin,
}

/// Which build of a name a [`PluginRef`] asks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PluginPin {
    /// The highest version loaded.
    Latest,
    /// Exactly this version.
    Version(semver::Version),
    /// Exactly this build: the hex SHA-256 of its bytes.
    Digest(String),
}

/// Why a text is not a plugin reference: a full sentence for the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PluginRefError(String);

impl PluginRef {
    /// The highest loaded version of `name`.
    pub fn latest(name: impl Into<String>) -> PluginRef {
        PluginRef {
            name: name.into(),
            pin: PluginPin::Latest,
        }
    }

    /// `name@version`.
    pub fn version(name: impl Into<String>, version: semver::Version) -> PluginRef {
        PluginRef {
            name: name.into(),
            pin: PluginPin::Version(version),
        }
    }

    /// `name@sha256:<digest>`; `digest` is hex, with or without the
    /// `sha256:` that run records write before it.
    pub fn digest(name: impl Into<String>, digest: &str) -> PluginRef {
        PluginRef {
            name: name.into(),
            pin: PluginPin::Digest(digest.strip_prefix("sha256:").unwrap_or(digest).to_owned()),
        }
    }
}

impl FromStr for PluginRef {
    type Err = PluginRefError;

    fn from_str(reference: &str) -> Result<PluginRef, PluginRefError> {
        let (name, pin) = match reference.split_once('@') {
            Some((name, pin)) => (name, Some(pin)),
            None => (reference, None),
        };
        if name.is_empty() || name.chars().any(char::is_whitespace) {
            return Err(PluginRefError(format!(
                "plugin reference \"{reference}\" needs a plugin name without spaces, \
                 like \"uppercase\", \"uppercase@1.0.0\" or \"uppercase@sha256:<hex>\""
            )));
        }
        let Some(pin) = pin else {
            return Ok(PluginRef::latest(name));
        };
        if let Some(hex) = pin.strip_prefix("sha256:") {
            if hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
                return Ok(PluginRef::digest(name, hex));
            }
            return Err(PluginRefError(format!(
                "plugin reference \"{reference}\": a sha256 pin needs 64 hexadecimal digits"
            )));
        }
        match semver::Version::parse(pin) {
            Ok(version) => Ok(PluginRef::version(name, version)),
            Err(error) => Err(PluginRefError(format!(
                "plugin reference \"{reference}\": `{pin}` is not a version like 1.2.0 ({error}); \
                 pin a version as name@1.2.0 or a build as name@sha256:<hex>"
            ))),
        }
    }
}

/// As written: `name`, `name@1.2.0`, `name@sha256:<hex>`.
impl fmt::Display for PluginRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.pin {
            PluginPin::Latest => f.write_str(&self.name),
            PluginPin::Version(version) => write!(f, "{}@{version}", self.name),
            PluginPin::Digest(digest) => write!(f, "{}@sha256:{digest}", self.name),
        }
    }
}

/// Compares the written form: `step.plugin == "uppercase@1.0.0"`.
impl PartialEq<&str> for PluginRef {
    fn eq(&self, other: &&str) -> bool {
        other.parse::<PluginRef>().is_ok_and(|other| *self == other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_once_and_print_as_written() {
        let digest = "ab".repeat(32);
        for text in [
            "uppercase".to_owned(),
            "uppercase@1.2.0".to_owned(),
            "uppercase@1.2.0-beta.1".to_owned(),
            format!("u@sha256:{digest}"),
        ] {
            let reference: PluginRef = text.parse().unwrap();
            assert_eq!(reference.to_string(), text);
        }
        assert_eq!(
            "u@1.2.0".parse::<PluginRef>().unwrap(),
            PluginRef::version("u", semver::Version::new(1, 2, 0))
        );
        assert_eq!(
            PluginRef::digest("u", &format!("sha256:{digest}")),
            PluginRef::digest("u", &digest)
        );
    }

    #[test]
    fn bad_references_say_why() {
        let error = |text: &str| text.parse::<PluginRef>().unwrap_err().to_string();
        assert!(error("u@sha256:abc").contains("64 hexadecimal digits"));
        assert!(error("u@1.2").contains("is not a version like 1.2.0"));
        assert!(error("@1.2.0").contains("needs a plugin name without spaces"));
        assert!(error("").contains("needs a plugin name without spaces"));
        assert!(error("a b").contains("needs a plugin name without spaces"));
    }
}

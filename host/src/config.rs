//! The configuration of a Trellis process: `trellis.toml`, then `TRELLIS_*`
//! environment variables, then command-line flags, each layer over the one
//! before it. Every key has a default, so no layer is required.
//!
//! ```toml
//! bind = "127.0.0.1:8080"          # TRELLIS_BIND, --bind
//! data_dir = "trellis-data"        # TRELLIS_DATA_DIR, --data-dir
//! store = "sqlite"                 # or "postgres://user@host/db"; TRELLIS_STORE
//! durability = "normal"            # or "fsync"; TRELLIS_DURABILITY
//! plugin_dirs = ["plugins"]        # TRELLIS_PLUGIN_DIRS, --plugin-dir (repeatable)
//! workflow_dirs = ["workflows"]    # TRELLIS_WORKFLOW_DIRS, --workflow-dir (repeatable)
//! auth_token = ""                  # TRELLIS_AUTH_TOKEN; empty = no auth (loopback only)
//! max_concurrent_steps = 64        # TRELLIS_MAX_CONCURRENT_STEPS
//! max_body = "16MiB"               # TRELLIS_MAX_BODY
//! header_timeout = "10s"           # TRELLIS_HEADER_TIMEOUT: a request's headers, and an idle keep-alive connection
//! body_timeout = "60s"             # TRELLIS_BODY_TIMEOUT: the whole request body
//! max_connections = 1024           # TRELLIS_MAX_CONNECTIONS: more wait in the listen backlog
//! state_max_keys = 100_000         # TRELLIS_STATE_MAX_KEYS: plugin `state` keys per workflow
//! state_max_bytes = "1GiB"         # TRELLIS_STATE_MAX_BYTES: their keys and values, per workflow
//!
//! [limits]                         # under every workflow's own [limits]
//! fuel = 1_000_000_000             # TRELLIS_FUEL
//! memory = "128MiB"                # TRELLIS_MEMORY
//! timeout = "60s"                  # TRELLIS_TIMEOUT
//! max_output = "16MiB"
//! max_log = "1MiB"
//! http_requests = 64                # outbound HTTP requests per attempt
//! http_request_body = "16MiB"
//! http_response_body = "16MiB"
//!
//! [secrets]                        # names only: values are read when a step needs them
//! api_token = { env = "API_TOKEN" }          # or { file = "/run/secrets/api_token" }
//! ```
//!
//! Paths:
//! - relative paths in the file are relative to the **file's directory**, so a
//!   configuration means the same thing whatever directory the server starts in;
//! - relative paths from the environment or flags, and the defaults
//!   (`trellis-data`, `workflows`), are relative to the current directory;
//! - `TRELLIS_PLUGIN_DIRS` and `TRELLIS_WORKFLOW_DIRS` are lists like `PATH`
//!   (`:`-separated; `;` on Windows).
//!
//! An environment variable set to the empty string counts as unset: it never
//! clears a value from the file (an empty `TRELLIS_AUTH_TOKEN` does not turn off
//! the file's token).
//!
//! Boundary: this module parses and checks values. It does not read secret
//! values, open the store, create directories or bind; [`Config::check_bind`] is
//! for the server to call before it listens.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::diagnostic::{Diagnostics, Reporter};
use crate::limits::{HumanDuration, Limits, LimitsTable, Size};
pub use crate::secrets::SecretSource;
pub use crate::store::StateQuota;

/// The file read when no `--config` is given, if it exists.
pub const DEFAULT_FILE: &str = "trellis.toml";

/// Where the build put the example plugins (`target/plugins`), used when no
/// `--plugin-dir` is given.
pub const BUILTIN_PLUGIN_DIR: Option<&str> = option_env!("TRELLIS_BUILTIN_PLUGIN_DIR");
/// Where `plugins/build.sh` puts the Python, JavaScript and C example plugins
/// (`target/plugins-polyglot`), also used when no `--plugin-dir` is given.
pub const POLYGLOT_PLUGIN_DIR: Option<&str> = option_env!("TRELLIS_POLYGLOT_PLUGIN_DIR");

/// The default plugin dirs: those of [`BUILTIN_PLUGIN_DIR`] and
/// [`POLYGLOT_PLUGIN_DIR`] that exist.
pub fn builtin_plugin_dirs() -> Vec<PathBuf> {
    [BUILTIN_PLUGIN_DIR, POLYGLOT_PLUGIN_DIR]
        .into_iter()
        .flatten()
        .filter(|dir| Path::new(dir).is_dir())
        .map(PathBuf::from)
        .collect()
}

/// What a newcomer runs to build the Python, JavaScript and C examples.
pub const BUILD_EXAMPLES: &str = "bash plugins/build.sh";

/// The language of `name` if it is one of this checkout's Python, JavaScript
/// or C example plugins (`plugins/<name>/app.py`, `plugin.js`, `plugin.c`)
/// and [`BUILD_EXAMPLES`] has not built it into [`POLYGLOT_PLUGIN_DIR`] yet.
/// A fresh clone's `serve` meets these in `workflows/new-hires.toml`.
pub fn unbuilt_example(name: &str) -> Option<&'static str> {
    let sources = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()?
        .join("plugins");
    unbuilt_example_in(name, &sources, Path::new(POLYGLOT_PLUGIN_DIR?))
}

/// [`unbuilt_example`] with the example sources under `sources` and the
/// built plugins in `out`.
fn unbuilt_example_in(name: &str, sources: &Path, out: &Path) -> Option<&'static str> {
    if out.join(format!("{name}.wasm")).is_file() {
        return None;
    }
    let sources = sources.join(name);
    [
        ("app.py", "Python"),
        ("plugin.js", "JavaScript"),
        ("plugin.c", "C"),
    ]
    .into_iter()
    .find(|(file, _)| sources.join(file).is_file())
    .map(|(_, language)| language)
}

/// The resolved configuration: every layer applied, every value checked.
#[derive(Clone, PartialEq, Eq)]
pub struct Config {
    /// Where the HTTP API listens.
    pub bind: SocketAddr,
    /// The SQLite file and the compiled-code cache live here.
    pub data_dir: PathBuf,
    pub store: StoreKind,
    /// What a commit survives (DESIGN.md, "Storage").
    pub durability: Durability,
    /// This node's name in a cluster (PostgreSQL); `None`: `<hostname>-<pid>`.
    pub node_id: Option<String>,
    /// How long a node's claims outlive its last renewal (PostgreSQL); it
    /// renews every third of it.
    pub lease: Duration,
    /// Where plugins are loaded from. Default: the example plugins the build
    /// put in [`builtin_plugin_dirs`], those that exist.
    pub plugin_dirs: Vec<PathBuf>,
    /// Where workflow files are loaded from.
    pub workflow_dirs: Vec<PathBuf>,
    /// The bearer token every route but `/healthz` requires; `None` = no auth.
    pub auth_token: Option<String>,
    /// Step attempts running at once over all runs; at least 1.
    pub max_concurrent_steps: usize,
    /// The largest request body the API accepts, in bytes.
    pub max_body: u64,
    /// How long a client may take to send a request's headers; also how long
    /// a keep-alive connection may sit idle. Bounds slow-header clients.
    pub header_timeout: Duration,
    /// How long a client may take to send a whole request body (else 408).
    pub body_timeout: Duration,
    /// Connections served at once; further ones wait to be accepted.
    pub max_connections: usize,
    /// The most plugin `state` one workflow keeps in the store.
    pub state_quota: StateQuota,
    /// The limits under every workflow's own `[limits]`.
    pub limits: Limits,
    /// Where each named secret comes from; the values are not read here.
    pub secrets: BTreeMap<String, SecretSource>,
}

impl Default for Config {
    fn default() -> Self {
        let plugin_dirs = builtin_plugin_dirs();
        Config {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("trellis-data"),
            store: StoreKind::Sqlite,
            durability: Durability::Normal,
            node_id: None,
            lease: Duration::from_secs(10),
            plugin_dirs,
            workflow_dirs: vec![PathBuf::from("workflows")],
            auth_token: None,
            max_concurrent_steps: 64,
            max_body: 16 * 1024 * 1024,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(60),
            max_connections: 1024,
            state_quota: StateQuota::default(),
            limits: Limits::default(),
            secrets: BTreeMap::new(),
        }
    }
}

/// Like the derived `Debug`, but without the auth token or a database password,
/// so a configuration can be logged.
impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("bind", &self.bind)
            .field("data_dir", &self.data_dir)
            .field("store", &self.store)
            .field("durability", &self.durability)
            .field("node_id", &self.node_id)
            .field("lease", &self.lease)
            .field("plugin_dirs", &self.plugin_dirs)
            .field("workflow_dirs", &self.workflow_dirs)
            .field(
                "auth_token",
                &self.auth_token.as_ref().map(|_| "<redacted>"),
            )
            .field("max_concurrent_steps", &self.max_concurrent_steps)
            .field("max_body", &self.max_body)
            .field("header_timeout", &self.header_timeout)
            .field("body_timeout", &self.body_timeout)
            .field("max_connections", &self.max_connections)
            .field("state_quota", &self.state_quota)
            .field("limits", &self.limits)
            .field("secrets", &self.secrets)
            .finish()
    }
}

/// Where runs are stored.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreKind {
    /// `"sqlite"`: a file in the data dir.
    Sqlite,
    /// `"postgres://..."` (or `postgresql://`): the connection URL, for
    /// several servers sharing one database.
    Postgres(String),
}

impl FromStr for StoreKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "sqlite" {
            return Ok(StoreKind::Sqlite);
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            return Ok(StoreKind::Postgres(s.to_owned()));
        }
        // Only the part before `://`: the rest may hold a password.
        let kind = s.split("://").next().unwrap_or_default();
        Err(format!(
            "unknown store \"{kind}\": write \"sqlite\" or a URL like \"postgres://user@host/db\""
        ))
    }
}

/// Shows a Postgres URL without its password.
impl fmt::Debug for StoreKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreKind::Sqlite => f.write_str("Sqlite"),
            StoreKind::Postgres(url) => f
                .debug_tuple("Postgres")
                .field(&crate::store::redact_password(url))
                .finish(),
        }
    }
}

/// What a committed write survives (DESIGN.md, "Storage").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Durability {
    /// `"normal"`: a killed process (SQLite `synchronous=NORMAL`).
    #[default]
    Normal,
    /// `"fsync"`: power loss too; every commit waits for the disk.
    Fsync,
}

impl FromStr for Durability {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "normal" => Ok(Durability::Normal),
            "fsync" => Ok(Durability::Fsync),
            other => Err(format!(
                "unknown durability \"{other}\": write \"normal\" or \"fsync\""
            )),
        }
    }
}

/// Every key of the configuration, each optional: what one source sets.
/// Declared once for all three sources, each layered over the one before:
/// the file deserializes into it (values whose check needs a location keep
/// their span), `Settings::from_env` fills it from `TRELLIS_*` variables,
/// and the command line fills it from its flags (no span: [`Settings::given`]).
/// `Config::apply` is the one validation of every value, whatever its source.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table of settings")]
pub struct Settings {
    pub bind: Option<Spanned<String>>,
    pub data_dir: Option<PathBuf>,
    pub store: Option<Spanned<String>>,
    pub durability: Option<Spanned<String>>,
    pub node_id: Option<Spanned<String>>,
    pub lease: Option<Spanned<HumanDuration>>,
    pub plugin_dirs: Option<Vec<PathBuf>>,
    pub workflow_dirs: Option<Vec<PathBuf>>,
    pub auth_token: Option<String>,
    pub max_concurrent_steps: Option<Spanned<usize>>,
    pub max_body: Option<Spanned<Size>>,
    pub header_timeout: Option<Spanned<HumanDuration>>,
    pub body_timeout: Option<Spanned<HumanDuration>>,
    pub max_connections: Option<Spanned<usize>>,
    pub state_max_keys: Option<Spanned<u64>>,
    pub state_max_bytes: Option<Spanned<Size>>,
    pub limits: Option<LimitsTable>,
    /// Only the file names secrets.
    #[serde(default)]
    pub secrets: BTreeMap<String, SecretSource>,
}

/// The environment variable of each key that has one (`[limits]` keys by
/// their own name). The one place a key's variable is named.
const ENV_VARS: &[(&str, &str)] = &[
    ("bind", "TRELLIS_BIND"),
    ("data_dir", "TRELLIS_DATA_DIR"),
    ("store", "TRELLIS_STORE"),
    ("durability", "TRELLIS_DURABILITY"),
    ("node_id", "TRELLIS_NODE_ID"),
    ("lease", "TRELLIS_LEASE"),
    ("plugin_dirs", "TRELLIS_PLUGIN_DIRS"),
    ("workflow_dirs", "TRELLIS_WORKFLOW_DIRS"),
    ("auth_token", "TRELLIS_AUTH_TOKEN"),
    ("max_concurrent_steps", "TRELLIS_MAX_CONCURRENT_STEPS"),
    ("max_body", "TRELLIS_MAX_BODY"),
    ("header_timeout", "TRELLIS_HEADER_TIMEOUT"),
    ("body_timeout", "TRELLIS_BODY_TIMEOUT"),
    ("max_connections", "TRELLIS_MAX_CONNECTIONS"),
    ("state_max_keys", "TRELLIS_STATE_MAX_KEYS"),
    ("state_max_bytes", "TRELLIS_STATE_MAX_BYTES"),
    ("fuel", "TRELLIS_FUEL"),
    ("memory", "TRELLIS_MEMORY"),
    ("timeout", "TRELLIS_TIMEOUT"),
];

impl Settings {
    /// A value from a source without positions (the environment, a flag).
    pub fn given<T>(value: T) -> Spanned<T> {
        Spanned::new(0..0, value)
    }

    /// The `TRELLIS_*` variables that are set (an empty one counts as unset),
    /// parsed; a value that does not parse is an error naming its variable.
    fn from_env(env: &Env<'_>) -> Result<Settings, ConfigError> {
        let mut settings = Settings {
            bind: env.get("bind").map(Settings::given),
            data_dir: env.get("data_dir").map(PathBuf::from),
            store: env.get("store").map(Settings::given),
            durability: env.get("durability").map(Settings::given),
            node_id: env.get("node_id").map(Settings::given),
            plugin_dirs: env.get("plugin_dirs").map(|dirs| split_paths(&dirs)),
            workflow_dirs: env.get("workflow_dirs").map(|dirs| split_paths(&dirs)),
            auth_token: env.get("auth_token"),
            ..Settings::default()
        };
        settings.max_concurrent_steps = env
            .parse("max_concurrent_steps", parse_count)?
            .map(Settings::given);
        settings.max_body = env.parse("max_body", str::parse)?.map(Settings::given);
        settings.header_timeout = env
            .parse("header_timeout", str::parse)?
            .map(Settings::given);
        settings.body_timeout = env.parse("body_timeout", str::parse)?.map(Settings::given);
        settings.lease = env.parse("lease", str::parse)?.map(Settings::given);
        settings.max_connections = env
            .parse("max_connections", parse_count)?
            .map(Settings::given);
        settings.state_max_keys = env
            .parse("state_max_keys", parse_count)?
            .map(Settings::given);
        settings.state_max_bytes = env
            .parse("state_max_bytes", str::parse)?
            .map(Settings::given);
        let limits = LimitsTable {
            fuel: env.parse("fuel", parse_count)?.map(Settings::given),
            memory: env.parse("memory", str::parse)?.map(Settings::given),
            timeout: env.parse("timeout", str::parse)?.map(Settings::given),
            ..LimitsTable::default()
        };
        let any_limit =
            limits.fuel.is_some() || limits.memory.is_some() || limits.timeout.is_some();
        settings.limits = any_limit.then_some(limits);
        Ok(settings)
    }
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not TOML, has a key Trellis does not know, or a value that
    /// is wrong: each problem as `FILE:LINE:COL: message`.
    #[error("{0}")]
    File(Diagnostics),
    /// An environment variable's value does not parse or is out of range.
    #[error("{var}: {message}")]
    Env { var: &'static str, message: String },
    /// A flag's value is out of range.
    #[error("--{flag}: {message}")]
    Flag { flag: String, message: String },
    /// A bind address other machines can reach, and no auth token.
    #[error(
        "refusing to listen on {bind} without an auth token: set auth_token in trellis.toml or TRELLIS_AUTH_TOKEN, or bind 127.0.0.1"
    )]
    UnprotectedBind { bind: SocketAddr },
}

impl Config {
    /// The configuration from `file` (the `--config` path, which must exist;
    /// `None`: `./trellis.toml` if it exists, else only defaults), the process
    /// environment and `flags`.
    pub fn load(file: Option<&Path>, flags: Settings) -> Result<Config, ConfigError> {
        Config::load_with_env(file, flags, &|name| std::env::var(name).ok())
    }

    /// [`Config::load`] with the environment given as a lookup function.
    pub fn load_with_env(
        file: Option<&Path>,
        flags: Settings,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut config = Config::default();
        let file = match file {
            Some(path) => Some(path.to_owned()),
            None => Some(PathBuf::from(DEFAULT_FILE)).filter(|path| path.is_file()),
        };
        if let Some(path) = file {
            let source = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            config.apply_file(&path, &source)?;
        }

        let mut first = None;
        let env = Env(env);
        config.apply(
            Settings::from_env(&env)?,
            Path::new(""),
            &mut |key, _, message| {
                let var = env_var(key);
                first.get_or_insert(ConfigError::Env { var, message });
            },
        );
        if let Some(error) = first {
            return Err(error);
        }
        config.apply(flags, Path::new(""), &mut |key, _, message| {
            let flag = key.replace('_', "-");
            first.get_or_insert(ConfigError::Flag { flag, message });
        });
        match first {
            Some(error) => Err(error),
            None => Ok(config),
        }
    }

    /// Refuses a bind address other machines can reach (anything but
    /// 127.0.0.0/8 and ::1) when there is no auth token: every route would be
    /// open to the network, and plugins run whatever a caller sends them.
    pub fn check_bind(&self) -> Result<(), ConfigError> {
        if self.bind.ip().to_canonical().is_loopback() || self.auth_token.is_some() {
            Ok(())
        } else {
            Err(ConfigError::UnprotectedBind { bind: self.bind })
        }
    }

    /// The file's values over `self`; `path` names the file in messages and
    /// anchors its relative paths. Every problem is reported, in file order.
    fn apply_file(&mut self, path: &Path, source: &str) -> Result<(), ConfigError> {
        let file_name = path.display().to_string();
        let mut report = Reporter::new(&file_name, source);
        let settings: Settings = match toml::from_str(source) {
            Ok(settings) => settings,
            Err(error) => {
                let offset = error.span().map_or(0, |span| span.start);
                report.error_at(offset, error.message().trim_end());
                return report.finish(None).map_err(ConfigError::File);
            }
        };
        let base = path.parent().unwrap_or(Path::new(""));
        self.apply(settings, base, &mut |_, span, message| {
            report.error(&span, message);
        });
        report.finish(Some(())).map_err(ConfigError::File)
    }

    /// `settings` over `self`, each value checked: the one validation of every
    /// key. A value out of range is passed to `problem` with its key and span,
    /// and leaves `self` as it was; relative paths are taken from `base`.
    fn apply(
        &mut self,
        settings: Settings,
        base: &Path,
        problem: &mut dyn FnMut(&'static str, Range<usize>, String),
    ) {
        let mut check = |key: &'static str, span: Range<usize>, result: Result<(), String>| {
            if let Err(message) = result {
                problem(key, span, message);
            }
        };
        if let Some(bind) = settings.bind {
            let parsed = parse_bind(bind.get_ref()).map(|v| self.bind = v);
            check("bind", bind.span(), parsed);
        }
        if let Some(data_dir) = settings.data_dir {
            self.data_dir = base.join(data_dir);
        }
        if let Some(store) = settings.store {
            let parsed = store.get_ref().parse().map(|v| self.store = v);
            check("store", store.span(), parsed);
        }
        if let Some(durability) = settings.durability {
            let parsed = durability.get_ref().parse().map(|v| self.durability = v);
            check("durability", durability.span(), parsed);
        }
        if let Some(node_id) = settings.node_id {
            let span = node_id.span();
            let value = node_id.into_inner();
            let checked = check_node_id(&value).map(|()| self.node_id = Some(value));
            check("node_id", span, checked);
        }
        if let Some(lease) = settings.lease {
            let span = lease.span();
            let value = lease.into_inner().0;
            let checked = check_lease(value).map(|()| self.lease = value);
            check("lease", span, checked);
        }
        if let Some(dirs) = settings.plugin_dirs {
            self.plugin_dirs = dirs.into_iter().map(|dir| base.join(dir)).collect();
        }
        if let Some(dirs) = settings.workflow_dirs {
            self.workflow_dirs = dirs.into_iter().map(|dir| base.join(dir)).collect();
        }
        if let Some(token) = settings.auth_token {
            self.auth_token = Some(token).filter(|token| !token.is_empty());
        }
        if let Some(steps) = settings.max_concurrent_steps {
            let value = *steps.get_ref();
            let checked = check_concurrency(value).map(|()| self.max_concurrent_steps = value);
            check("max_concurrent_steps", steps.span(), checked);
        }
        if let Some(max_body) = settings.max_body {
            self.max_body = max_body.into_inner().0;
        }
        for (key, value, slot) in [
            (
                "header_timeout",
                settings.header_timeout,
                &mut self.header_timeout,
            ),
            (
                "body_timeout",
                settings.body_timeout,
                &mut self.body_timeout,
            ),
        ] {
            if let Some(value) = value {
                let span = value.span();
                let duration = value.into_inner().0;
                let checked = check_server_timeout(key, duration).map(|()| *slot = duration);
                check(key, span, checked);
            }
        }
        if let Some(connections) = settings.max_connections {
            let value = *connections.get_ref();
            let checked = check_connections(value).map(|()| self.max_connections = value);
            check("max_connections", connections.span(), checked);
        }
        if let Some(keys) = settings.state_max_keys {
            let value = *keys.get_ref();
            let checked = check_state_keys(value).map(|()| self.state_quota.max_keys = value);
            check("state_max_keys", keys.span(), checked);
        }
        if let Some(bytes) = settings.state_max_bytes {
            let value = bytes.get_ref().0;
            let checked = check_state_bytes(value).map(|()| self.state_quota.max_bytes = value);
            check("state_max_bytes", bytes.span(), checked);
        }
        if let Some(limits) = settings.limits {
            let overrides =
                limits.overrides(&mut |key, span, message| check(key, span, Err(message)));
            self.limits = overrides.apply(self.limits);
        }
        for (name, secret) in settings.secrets {
            let secret = match secret {
                SecretSource::File(file) => SecretSource::File(base.join(file)),
                env => env,
            };
            self.secrets.insert(name, secret);
        }
    }
}

/// The variable that sets `key`.
fn env_var(key: &str) -> &'static str {
    ENV_VARS
        .iter()
        .find(|(name, _)| *name == key)
        .map(|(_, var)| *var)
        .expect("every key checked from the environment has a variable")
}

/// The environment, where an empty value counts as unset.
struct Env<'a>(&'a dyn Fn(&str) -> Option<String>);

impl Env<'_> {
    /// The value of `key`'s variable.
    fn get(&self, key: &str) -> Option<String> {
        (self.0)(env_var(key)).filter(|value| !value.is_empty())
    }

    /// `key`'s variable's value through `parse`; an error names the variable.
    fn parse<T>(
        &self,
        key: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        let var = env_var(key);
        self.get(key)
            .map(|value| parse(&value).map_err(|message| ConfigError::Env { var, message }))
            .transpose()
    }
}

fn split_paths(list: &str) -> Vec<PathBuf> {
    std::env::split_paths(list)
        .filter(|path| !path.as_os_str().is_empty())
        .collect()
}

fn parse_bind(s: &str) -> Result<SocketAddr, String> {
    s.trim().parse().map_err(|_| {
        format!(
            "invalid bind address \"{s}\": write an IP address and port like \"127.0.0.1:8080\" or \"[::1]:8080\" (not a host name)"
        )
    })
}

/// A whole number; `_` may separate digits, as in TOML (`1_000_000`).
fn parse_count<T: FromStr>(s: &str) -> Result<T, String> {
    s.trim()
        .replace('_', "")
        .parse()
        .map_err(|_| format!("invalid number \"{s}\": write a whole number like 64"))
}

fn check_concurrency(steps: usize) -> Result<(), String> {
    if steps == 0 {
        return Err("`max_concurrent_steps` must be at least 1".to_owned());
    }
    Ok(())
}

/// `header_timeout` and `body_timeout`: long enough to mean something, short
/// enough that a slow client cannot hold a connection for ever.
fn check_server_timeout(key: &str, timeout: Duration) -> Result<(), String> {
    const MAX: Duration = Duration::from_secs(3600);
    if timeout.is_zero() || timeout > MAX {
        return Err(format!("`{key}` must be longer than 0s and at most 1h"));
    }
    Ok(())
}

fn check_node_id(id: &str) -> Result<(), String> {
    let fits = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !fits {
        return Err(format!(
            "`node_id` {id:?} must be 1 to 64 letters, digits, `-`, `_` or `.`"
        ));
    }
    Ok(())
}

fn check_lease(lease: Duration) -> Result<(), String> {
    const MIN: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(600);
    if !(MIN..=MAX).contains(&lease) {
        return Err("`lease` must be at least 1s and at most 10m".to_owned());
    }
    Ok(())
}

fn check_state_keys(keys: u64) -> Result<(), String> {
    if keys == 0 {
        return Err("`state_max_keys` must be at least 1".to_owned());
    }
    Ok(())
}

fn check_state_bytes(bytes: u64) -> Result<(), String> {
    if bytes == 0 {
        return Err("`state_max_bytes` must be more than 0 bytes".to_owned());
    }
    Ok(())
}

fn check_connections(connections: usize) -> Result<(), String> {
    if connections == 0 {
        return Err("`max_connections` must be at least 1".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// Loads `toml` written to a `trellis.toml` in a fresh directory, with `env`
    /// as the whole environment.
    fn load(
        toml: &str,
        env: &[(&str, &str)],
        flags: Settings,
    ) -> (tempfile::TempDir, Result<Config, ConfigError>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trellis.toml");
        std::fs::write(&path, toml).unwrap();
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let config = Config::load_with_env(Some(&path), flags, &|name| env.get(name).cloned());
        (dir, config)
    }

    fn load_ok(toml: &str, env: &[(&str, &str)], flags: Settings) -> Config {
        let (_dir, config) = load(toml, env, flags);
        config.unwrap()
    }

    /// The message, with the temp dir's path replaced by `DIR`.
    fn load_err(toml: &str, env: &[(&str, &str)]) -> String {
        let (dir, config) = load(toml, env, Settings::default());
        let message = config.unwrap_err().to_string();
        message.replace(&dir.path().display().to_string(), "DIR")
    }

    #[test]
    fn defaults_without_file_or_environment() {
        let config = Config::load_with_env(None, Settings::default(), &|_| None).unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.bind, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(config.data_dir, PathBuf::from("trellis-data"));
        assert_eq!(config.store, StoreKind::Sqlite);
        assert_eq!(config.durability, Durability::Normal);
        assert_eq!(config.workflow_dirs, vec![PathBuf::from("workflows")]);
        assert_eq!(config.auth_token, None);
        assert_eq!(config.max_concurrent_steps, 64);
        assert_eq!(config.max_body, 16 * 1024 * 1024);
        assert_eq!(config.header_timeout, Duration::from_secs(10));
        assert_eq!(config.body_timeout, Duration::from_secs(60));
        assert_eq!(config.max_connections, 1024);
        assert_eq!(
            config.state_quota,
            StateQuota {
                max_keys: 100_000,
                max_bytes: 1024 * 1024 * 1024
            }
        );
        assert_eq!(config.limits, Limits::default());
        assert!(config.secrets.is_empty());
        assert_eq!(config.plugin_dirs, builtin_plugin_dirs());
        assert!(config.check_bind().is_ok());
    }

    #[test]
    fn an_empty_file_gives_the_defaults() {
        assert_eq!(load_ok("", &[], Settings::default()), Config::default());
    }

    #[test]
    fn every_key_of_the_file() {
        let (dir, config) = load(
            r#"
                bind = "0.0.0.0:9000"
                data_dir = "data"
                store = "sqlite"
                durability = "fsync"
                plugin_dirs = ["plugins", "/opt/plugins"]
                workflow_dirs = ["flows"]
                auth_token = "s3cret"
                max_concurrent_steps = 8
                max_body = "1MiB"
                header_timeout = "5s"
                body_timeout = "2m"
                max_connections = 200
                state_max_keys = 1_000
                state_max_bytes = "10MiB"

                [limits]
                fuel = 1_000
                memory = "64MiB"
                timeout = "10s"
                max_output = 2048
                max_log = "4KiB"
                http_requests = 5
                http_request_body = "1KiB"
                http_response_body = "2KiB"

                [secrets]
                api_token = { env = "API_TOKEN" }
                db_password = { file = "secrets/db" }
                tls_key = { file = "/run/secrets/key" }
            "#,
            &[],
            Settings::default(),
        );
        let config = config.unwrap();
        let dir = dir.path();
        assert_eq!(config.bind, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(config.data_dir, dir.join("data"));
        assert_eq!(config.store, StoreKind::Sqlite);
        assert_eq!(config.durability, Durability::Fsync);
        assert_eq!(
            config.plugin_dirs,
            vec![dir.join("plugins"), PathBuf::from("/opt/plugins")]
        );
        assert_eq!(config.workflow_dirs, vec![dir.join("flows")]);
        assert_eq!(config.auth_token.as_deref(), Some("s3cret"));
        assert_eq!(config.max_concurrent_steps, 8);
        assert_eq!(config.max_body, 1024 * 1024);
        assert_eq!(config.header_timeout, Duration::from_secs(5));
        assert_eq!(config.body_timeout, Duration::from_secs(120));
        assert_eq!(config.max_connections, 200);
        assert_eq!(
            config.state_quota,
            StateQuota {
                max_keys: 1000,
                max_bytes: 10 * 1024 * 1024
            }
        );
        assert_eq!(
            config.limits,
            Limits {
                fuel: 1000,
                memory: 64 * 1024 * 1024,
                timeout: Duration::from_secs(10),
                max_output: 2048,
                max_log: 4096,
                http_requests: 5,
                http_request_body: 1024,
                http_response_body: 2048,
            }
        );
        assert_eq!(
            config.secrets,
            BTreeMap::from([
                (
                    "api_token".to_owned(),
                    SecretSource::Env("API_TOKEN".to_owned())
                ),
                (
                    "db_password".to_owned(),
                    SecretSource::File(dir.join("secrets/db"))
                ),
                (
                    "tls_key".to_owned(),
                    SecretSource::File(PathBuf::from("/run/secrets/key"))
                ),
            ])
        );
    }

    #[test]
    fn limits_the_file_leaves_out_keep_their_defaults() {
        let config = load_ok("[limits]\nfuel = 5\n", &[], Settings::default());
        assert_eq!(
            config.limits,
            Limits {
                fuel: 5,
                ..Limits::default()
            }
        );
    }

    #[test]
    fn an_empty_auth_token_means_no_auth() {
        let config = load_ok("auth_token = \"\"\n", &[], Settings::default());
        assert_eq!(config.auth_token, None);
    }

    #[test]
    fn the_environment_overrides_the_file() {
        let config = load_ok(
            r#"
                bind = "127.0.0.1:1"
                data_dir = "from-file"
                store = "sqlite"
                durability = "normal"
                plugin_dirs = ["file-plugins"]
                workflow_dirs = ["file-flows"]
                auth_token = "file-token"
                max_concurrent_steps = 2
                max_body = 10
                header_timeout = "1s"
                body_timeout = "1s"
                max_connections = 1
                state_max_keys = 1
                state_max_bytes = 1
                [limits]
                fuel = 1
                memory = 1
                timeout = "1s"
            "#,
            &[
                ("TRELLIS_BIND", "[::1]:9090"),
                ("TRELLIS_DATA_DIR", "env-data"),
                ("TRELLIS_STORE", "postgres://trellis@db/trellis"),
                ("TRELLIS_DURABILITY", "fsync"),
                ("TRELLIS_PLUGIN_DIRS", "a:/b::c"),
                ("TRELLIS_WORKFLOW_DIRS", "flows"),
                ("TRELLIS_AUTH_TOKEN", "env-token"),
                ("TRELLIS_MAX_CONCURRENT_STEPS", "3"),
                ("TRELLIS_MAX_BODY", "2KiB"),
                ("TRELLIS_HEADER_TIMEOUT", "3s"),
                ("TRELLIS_BODY_TIMEOUT", "4s"),
                ("TRELLIS_MAX_CONNECTIONS", "5"),
                ("TRELLIS_STATE_MAX_KEYS", "7"),
                ("TRELLIS_STATE_MAX_BYTES", "1KiB"),
                ("TRELLIS_FUEL", "1_000"),
                ("TRELLIS_MEMORY", "1MiB"),
                ("TRELLIS_TIMEOUT", "1m 30s"),
            ],
            Settings::default(),
        );
        assert_eq!(config.bind, "[::1]:9090".parse().unwrap());
        assert_eq!(config.data_dir, PathBuf::from("env-data"));
        assert_eq!(
            config.store,
            StoreKind::Postgres("postgres://trellis@db/trellis".to_owned())
        );
        assert_eq!(config.durability, Durability::Fsync);
        assert_eq!(
            config.plugin_dirs,
            vec![PathBuf::from("a"), PathBuf::from("/b"), PathBuf::from("c")]
        );
        assert_eq!(config.workflow_dirs, vec![PathBuf::from("flows")]);
        assert_eq!(config.auth_token.as_deref(), Some("env-token"));
        assert_eq!(config.max_concurrent_steps, 3);
        assert_eq!(config.max_body, 2048);
        assert_eq!(config.header_timeout, Duration::from_secs(3));
        assert_eq!(config.body_timeout, Duration::from_secs(4));
        assert_eq!(config.max_connections, 5);
        assert_eq!(
            config.state_quota,
            StateQuota {
                max_keys: 7,
                max_bytes: 1024
            }
        );
        assert_eq!(config.limits.fuel, 1000);
        assert_eq!(config.limits.memory, 1024 * 1024);
        assert_eq!(config.limits.timeout, Duration::from_secs(90));
    }

    #[test]
    fn an_empty_variable_counts_as_unset() {
        let config = load_ok(
            "auth_token = \"file-token\"\ndata_dir = \"/data\"\n",
            &[("TRELLIS_AUTH_TOKEN", ""), ("TRELLIS_DATA_DIR", "")],
            Settings::default(),
        );
        assert_eq!(config.auth_token.as_deref(), Some("file-token"));
        assert_eq!(config.data_dir, PathBuf::from("/data"));
    }

    #[test]
    fn flags_override_the_environment() {
        let flags = Settings {
            bind: Some(Settings::given("127.0.0.2:7000".to_owned())),
            data_dir: Some(PathBuf::from("flag-data")),
            plugin_dirs: Some(vec![PathBuf::from("flag-plugins")]),
            workflow_dirs: Some(vec![PathBuf::from("flag-flows"), PathBuf::from("more")]),
            ..Settings::default()
        };
        let config = load_ok(
            "bind = \"127.0.0.1:1\"\n",
            &[
                ("TRELLIS_BIND", "127.0.0.1:2"),
                ("TRELLIS_DATA_DIR", "env-data"),
                ("TRELLIS_PLUGIN_DIRS", "env-plugins"),
                ("TRELLIS_WORKFLOW_DIRS", "env-flows"),
            ],
            flags,
        );
        assert_eq!(config.bind, "127.0.0.2:7000".parse().unwrap());
        assert_eq!(config.data_dir, PathBuf::from("flag-data"));
        assert_eq!(config.plugin_dirs, vec![PathBuf::from("flag-plugins")]);
        assert_eq!(
            config.workflow_dirs,
            vec![PathBuf::from("flag-flows"), PathBuf::from("more")]
        );
    }

    #[test]
    fn a_bad_flag_is_named() {
        let flags = Settings {
            bind: Some(Settings::given("localhost".to_owned())),
            ..Settings::default()
        };
        let (_dir, config) = load("", &[], flags);
        let message = config.unwrap_err().to_string();
        assert!(
            message.starts_with("--bind: invalid bind address \"localhost\""),
            "{message}"
        );
    }

    #[test]
    fn flags_not_given_leave_the_environment_alone() {
        let config = load_ok(
            "",
            &[("TRELLIS_PLUGIN_DIRS", "env-plugins")],
            Settings::default(),
        );
        assert_eq!(config.plugin_dirs, vec![PathBuf::from("env-plugins")]);
    }

    #[test]
    fn a_postgres_store_is_parsed() {
        let config = load_ok(
            "store = \"postgresql://trellis:pw@db:5432/trellis\"\n",
            &[],
            Settings::default(),
        );
        assert_eq!(
            config.store,
            StoreKind::Postgres("postgresql://trellis:pw@db:5432/trellis".to_owned())
        );
    }

    #[test]
    fn debug_hides_the_token_and_the_database_password() {
        let config = Config {
            auth_token: Some("tok-123".to_owned()),
            store: StoreKind::Postgres("postgres://u:pw-456@db:5432/x".to_owned()),
            ..Config::default()
        };
        let debug = format!("{config:?}");
        assert!(!debug.contains("tok-123"), "{debug}");
        assert!(!debug.contains("pw-456"), "{debug}");
        assert!(
            debug.contains("postgres://u:<redacted>@db:5432/x"),
            "{debug}"
        );
        assert_eq!(
            crate::store::redact_password("postgres://u@db/x"),
            "postgres://u@db/x",
            "no password, nothing to hide"
        );
    }

    #[test]
    fn an_unknown_key_is_reported_at_its_line_and_column() {
        let message = load_err("bind = \"127.0.0.1:80\"\n  bnd = 1\n", &[]);
        assert!(
            message.starts_with("DIR/trellis.toml:2:3: unknown field `bnd`, expected one of"),
            "{message}"
        );
        let message = load_err("[limits]\nfule = 1\n", &[]);
        assert!(
            message.starts_with("DIR/trellis.toml:2:1: unknown field `fule`"),
            "{message}"
        );
    }

    #[test]
    fn a_bad_size_is_reported_at_its_value() {
        let message = load_err("max_body = \"lots\"\n", &[]);
        assert_eq!(
            message,
            "DIR/trellis.toml:1:12: invalid size \"lots\"; write it like \"64MiB\", \"512KiB\", \"1GB\" or as a number of bytes"
        );
    }

    #[test]
    fn server_timeouts_and_connections_are_bounded() {
        assert_eq!(
            load_err("header_timeout = \"0s\"\n", &[]),
            "DIR/trellis.toml:1:18: `header_timeout` must be longer than 0s and at most 1h"
        );
        assert_eq!(
            load_err("body_timeout = \"2h\"\n", &[]),
            "DIR/trellis.toml:1:16: `body_timeout` must be longer than 0s and at most 1h"
        );
        assert_eq!(
            load_err("max_connections = 0\n", &[]),
            "DIR/trellis.toml:1:19: `max_connections` must be at least 1"
        );
        assert_eq!(
            load_err("", &[("TRELLIS_BODY_TIMEOUT", "0s")]),
            "TRELLIS_BODY_TIMEOUT: `body_timeout` must be longer than 0s and at most 1h"
        );
    }

    #[test]
    fn the_cluster_keys_are_read_and_checked() {
        let config = load_ok("", &[], Settings::default());
        assert_eq!(
            (config.node_id, config.lease),
            (None, Duration::from_secs(10))
        );
        let config = load_ok(
            "node_id = \"worker-a\"\nlease = \"30s\"\n",
            &[],
            Settings::default(),
        );
        assert_eq!(
            (config.node_id.as_deref(), config.lease),
            (Some("worker-a"), Duration::from_secs(30))
        );
        let config = load_ok(
            "node_id = \"worker-a\"\n",
            &[("TRELLIS_NODE_ID", "worker-b"), ("TRELLIS_LEASE", "2s")],
            Settings::default(),
        );
        assert_eq!(
            (config.node_id.as_deref(), config.lease),
            (Some("worker-b"), Duration::from_secs(2))
        );
        assert_eq!(
            load_err("lease = \"500ms\"\n", &[]),
            "DIR/trellis.toml:1:9: `lease` must be at least 1s and at most 10m"
        );
        assert_eq!(
            load_err("", &[("TRELLIS_NODE_ID", "a b")]),
            "TRELLIS_NODE_ID: `node_id` \"a b\" must be 1 to 64 letters, digits, `-`, `_` or `.`"
        );
    }

    #[test]
    fn the_state_quota_is_checked() {
        assert_eq!(
            load_err("\nstate_max_keys = 0\n", &[]),
            "DIR/trellis.toml:2:18: `state_max_keys` must be at least 1"
        );
        assert_eq!(
            load_err("state_max_bytes = \"0B\"\n", &[]),
            "DIR/trellis.toml:1:19: `state_max_bytes` must be more than 0 bytes"
        );
        assert_eq!(
            load_err("", &[("TRELLIS_STATE_MAX_KEYS", "none")]),
            "TRELLIS_STATE_MAX_KEYS: invalid number \"none\": write a whole number like 64"
        );
    }

    #[test]
    fn a_bad_duration_is_reported_at_its_value() {
        let message = load_err("[limits]\ntimeout = \"10 parsecs\"\n", &[]);
        assert!(
            message.starts_with("DIR/trellis.toml:2:11: invalid duration \"10 parsecs\""),
            "{message}"
        );
        let message = load_err("[limits]\ntimeout = 10\n", &[]);
        assert!(
            message.starts_with("DIR/trellis.toml:2:11: a duration needs a unit"),
            "{message}"
        );
    }

    #[test]
    fn every_wrong_value_is_reported_in_file_order() {
        let message = load_err(
            r#"
bind = "localhost:8080"
store = "mysql://u:pw@db/x"
durability = "sometimes"
max_concurrent_steps = 0
[limits]
fuel = 0
memory = "8GiB"
timeout = "0s"
"#,
            &[],
        );
        assert_eq!(
            message,
            [
                "DIR/trellis.toml:2:8: invalid bind address \"localhost:8080\": write an IP address and port like \"127.0.0.1:8080\" or \"[::1]:8080\" (not a host name)",
                "DIR/trellis.toml:3:9: unknown store \"mysql\": write \"sqlite\" or a URL like \"postgres://user@host/db\"",
                "DIR/trellis.toml:4:14: unknown durability \"sometimes\": write \"normal\" or \"fsync\"",
                "DIR/trellis.toml:5:24: `max_concurrent_steps` must be at least 1",
                "DIR/trellis.toml:7:8: `fuel` must be at least 1",
                "DIR/trellis.toml:8:10: `memory` is 8.0 GiB, but a wasm32 instance cannot use more than 4.0 GiB",
                "DIR/trellis.toml:9:11: `timeout` must be longer than 0s",
            ]
            .join("\n")
        );
    }

    #[test]
    fn a_bad_secret_source_is_reported() {
        let message = load_err("[secrets]\nkey = { path = \"/x\" }\n", &[]);
        assert_eq!(
            message,
            "DIR/trellis.toml:2:9: unknown field `path`, expected `env` or `file`"
        );
        let message = load_err("[secrets]\nkey = { env = \"A\", file = \"/x\" }\n", &[]);
        assert_eq!(
            message,
            "DIR/trellis.toml:2:7: a secret comes from exactly one place: write { env = \"VAR\" } or { file = \"/path\" }"
        );
        let message = load_err("[secrets]\nkey = \"hunter2\"\n", &[]);
        assert_eq!(
            message,
            "DIR/trellis.toml:2:7: a secret's value does not belong in the configuration file: write { env = \"VAR\" } or { file = \"/path\" }"
        );
    }

    #[test]
    fn a_file_that_is_not_toml_is_reported() {
        let message = load_err("bind = \n", &[]);
        assert!(message.starts_with("DIR/trellis.toml:1:8: "), "{message}");
    }

    #[test]
    fn a_missing_config_file_is_an_error() {
        let error = Config::load_with_env(
            Some(Path::new("/nonexistent/trellis.toml")),
            Settings::default(),
            &|_| None,
        )
        .unwrap_err();
        assert!(matches!(error, ConfigError::Read { .. }));
        assert!(
            error
                .to_string()
                .starts_with("cannot read /nonexistent/trellis.toml: "),
            "{error}"
        );
    }

    #[test]
    fn a_bad_variable_is_named() {
        let cases = [
            (
                "TRELLIS_BIND",
                "0.0.0.0",
                "invalid bind address \"0.0.0.0\"",
            ),
            ("TRELLIS_STORE", "redis://x", "unknown store \"redis\""),
            ("TRELLIS_DURABILITY", "fast", "unknown durability \"fast\""),
            (
                "TRELLIS_MAX_CONCURRENT_STEPS",
                "many",
                "invalid number \"many\"",
            ),
            (
                "TRELLIS_MAX_CONCURRENT_STEPS",
                "0",
                "`max_concurrent_steps` must be at least 1",
            ),
            ("TRELLIS_MAX_BODY", "lots", "invalid size \"lots\""),
            ("TRELLIS_FUEL", "-1", "invalid number \"-1\""),
            ("TRELLIS_MEMORY", "5GiB", "`memory` is 5.0 GiB, but"),
            (
                "TRELLIS_TIMEOUT",
                "10",
                "invalid duration \"10\" (time unit needed",
            ),
            ("TRELLIS_TIMEOUT", "soon", "invalid duration \"soon\""),
        ];
        for (var, value, expected) in cases {
            let message = load_err("", &[(var, value)]);
            assert!(
                message.starts_with(&format!("{var}: {expected}")),
                "{var}={value}: {message}"
            );
        }
    }

    #[test]
    fn a_non_loopback_bind_needs_a_token() {
        let config = load_ok("", &[("TRELLIS_BIND", "0.0.0.0:8080")], Settings::default());
        let error = config.check_bind().unwrap_err();
        assert_eq!(
            error.to_string(),
            "refusing to listen on 0.0.0.0:8080 without an auth token: set auth_token in trellis.toml or TRELLIS_AUTH_TOKEN, or bind 127.0.0.1"
        );
        for bind in ["[::]:80", "192.168.1.5:80", "[::ffff:10.0.0.1]:80"] {
            let config = Config {
                bind: bind.parse().unwrap(),
                ..Config::default()
            };
            assert!(config.check_bind().is_err(), "{bind}");
        }
    }

    #[test]
    fn a_non_loopback_bind_with_a_token_is_allowed() {
        let config = load_ok(
            "bind = \"0.0.0.0:8080\"\n",
            &[("TRELLIS_AUTH_TOKEN", "t")],
            Settings::default(),
        );
        assert!(config.check_bind().is_ok());
    }

    #[test]
    fn every_loopback_address_is_allowed_without_a_token() {
        for bind in [
            "127.0.0.1:80",
            "127.1.2.3:80",
            "[::1]:80",
            "[::ffff:127.0.0.1]:80",
        ] {
            let config = Config {
                bind: bind.parse().unwrap(),
                ..Config::default()
            };
            assert!(config.check_bind().is_ok(), "{bind}");
        }
    }

    #[test]
    fn an_example_plugin_that_is_not_built_is_named_with_its_language() {
        let dir = tempfile::tempdir().unwrap();
        let (sources, out) = (dir.path().join("plugins"), dir.path().join("out"));
        for (name, file) in [
            ("csv-parse", "app.py"),
            ("date-math", "plugin.js"),
            ("sum", "x.rs"),
        ] {
            std::fs::create_dir_all(sources.join(name)).unwrap();
            std::fs::write(sources.join(name).join(file), "").unwrap();
        }
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join("date-math.wasm"), "").unwrap();
        assert_eq!(
            unbuilt_example_in("csv-parse", &sources, &out),
            Some("Python")
        );
        // Built already, not an example in those languages, no such plugin.
        assert_eq!(unbuilt_example_in("date-math", &sources, &out), None);
        assert_eq!(unbuilt_example_in("sum", &sources, &out), None);
        assert_eq!(unbuilt_example_in("nope", &sources, &out), None);
    }
}

//! `trellis-c-toolchain`: the two steps of a C plugin build that clang cannot do.
//!
//! ```text
//! trellis-c-toolchain bindings WIT_DIR [--world WORLD] [--out-dir DIR]
//! trellis-c-toolchain component CORE.wasm -o OUT.wasm [--no-adapter]
//! trellis-c-toolchain adapter -o FILE
//! ```
//!
//! - `bindings` writes what `wit-bindgen c WIT_DIR --world WORLD` writes:
//!   `<world>.h`, `<world>.c` and `<world>_component_type.o` (the world's type,
//!   which the linker carries into the core module as a custom section).
//! - `component` turns a core module built by clang for `wasm32-wasi` into a
//!   component, adapting its `wasi_snapshot_preview1` imports to WASI 0.2 with
//!   the reactor adapter of wasmtime 48 (the host's). Same as
//!   `wasm-tools component new CORE.wasm --adapt wasi_snapshot_preview1.reactor.wasm -o OUT.wasm`.
//! - `adapter` writes that reactor adapter, for builds that use `wasm-tools`.
//!
//! Files are only rewritten when their content changes, so make-style builds
//! that compare modification times stay incremental.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use wasi_preview1_component_adapter_provider::{
    WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME, WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
};
use wit_bindgen_core::Files;
use wit_bindgen_core::wit_parser::Resolve;

const USAGE: &str = "\
usage:
  trellis-c-toolchain bindings WIT_DIR [--world WORLD] [--out-dir DIR]
      C bindings for WORLD (default: the package's only world): <world>.h,
      <world>.c and <world>_component_type.o, written into DIR (default: .)
  trellis-c-toolchain component CORE.wasm -o OUT.wasm [--no-adapter]
      encode a core wasm module as a component, adapting wasi_snapshot_preview1
      with the reactor adapter of wasmtime 48
  trellis-c-toolchain adapter -o FILE
      write that reactor adapter (wasi_snapshot_preview1.reactor.wasm)
  trellis-c-toolchain --version";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("trellis-c-toolchain: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<()> {
    let Some((command, rest)) = args.split_first() else {
        println!("{USAGE}");
        bail!("no command given");
    };
    match command.as_str() {
        "bindings" => {
            let mut args = Args::parse(rest, &["--world", "--out-dir"], &[])?;
            let wit = args.positional("WIT_DIR")?;
            let out_dir = args.value("--out-dir").unwrap_or_else(|| ".".into());
            bindings(Path::new(&wit), args.value("--world"), Path::new(&out_dir))
        }
        "component" => {
            let mut args = Args::parse(rest, &["-o"], &["--no-adapter"])?;
            let input = args.positional("CORE.wasm")?;
            let output = args.value("-o").context("missing `-o OUT.wasm`")?;
            component(
                Path::new(&input),
                Path::new(&output),
                !args.flag("--no-adapter"),
            )
        }
        "adapter" => {
            let args = Args::parse(rest, &["-o"], &[])?;
            let output = args.value("-o").context("missing `-o FILE`")?;
            write_if_changed(Path::new(&output), WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER)
        }
        "--version" | "-V" => {
            println!(
                "trellis-c-toolchain {} (wit-bindgen-c 0.63, wit-component 0.262, wasi-preview1-component-adapter-provider 48)",
                env!("CARGO_PKG_VERSION")
            );
            Ok(())
        }
        "--help" | "-h" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown command `{other}`\n{USAGE}"),
    }
}

/// `wit-bindgen c WIT_DIR --world WORLD --out-dir DIR`.
fn bindings(wit: &Path, world: Option<String>, out_dir: &Path) -> Result<()> {
    let mut resolve = Resolve::default();
    let (package, _) = resolve
        .push_path(wit)
        .with_context(|| format!("reading the WIT package in {}", wit.display()))?;
    let world = resolve.select_world(&[package], world.as_deref())?;
    let mut files = Files::default();
    wit_bindgen_c::Opts::default()
        .build()
        .generate(&mut resolve, world, &mut files)?;
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    for (name, contents) in files.iter() {
        write_if_changed(&out_dir.join(name), contents)?;
    }
    Ok(())
}

/// `wasm-tools component new INPUT --adapt wasi_snapshot_preview1=REACTOR -o OUTPUT`.
fn component(input: &Path, output: &Path, adapt: bool) -> Result<()> {
    let module = std::fs::read(input).with_context(|| format!("reading {}", input.display()))?;
    // Without the world's type the encoder makes a component that exports
    // nothing, which a host only rejects later: say so now.
    let has_type = wasmparser::Parser::new(0)
        .parse_all(&module)
        .filter_map(|payload| match payload {
            Ok(wasmparser::Payload::CustomSection(section)) => Some(section),
            _ => None,
        })
        .any(|section| section.name().starts_with("component-type"));
    if !has_type {
        bail!(
            "{}: no component type in the module: link the <world>_component_type.o that `bindings` wrote (and the <world>.c that references it)",
            input.display()
        );
    }
    let mut encoder = wit_component::ComponentEncoder::default();
    encoder.validate(true).module(&module).with_context(|| {
        format!(
            "{}: not a core wasm module for a component",
            input.display()
        )
    })?;
    if adapt {
        encoder.adapter(
            WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME,
            WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
        )?;
    }
    let bytes = encoder
        .encode()
        .with_context(|| format!("encoding {} as a component", input.display()))?;
    write_if_changed(output, &bytes)
}

/// Writes through a temp file and a rename (a reader never sees half a
/// file), and not at all when the file already holds `contents`.
fn write_if_changed(path: &Path, contents: &[u8]) -> Result<()> {
    if std::fs::read(path).ok().as_deref() == Some(contents) {
        return Ok(());
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let mut temp = PathBuf::from(path);
    temp.as_mut_os_string().push(".tmp");
    std::fs::write(&temp, contents).with_context(|| format!("writing {}", temp.display()))?;
    std::fs::rename(&temp, path).with_context(|| format!("writing {}", path.display()))
}

/// Minimal argument parsing: `--name VALUE` options, flags, positionals.
struct Args {
    values: Vec<(String, String)>,
    flags: Vec<String>,
    positionals: Vec<String>,
}

impl Args {
    fn parse(args: &[String], with_value: &[&str], flags: &[&str]) -> Result<Args> {
        let mut parsed = Args {
            values: Vec::new(),
            flags: Vec::new(),
            positionals: Vec::new(),
        };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            if with_value.contains(&arg.as_str()) {
                let value = args
                    .next()
                    .with_context(|| format!("`{arg}` needs a value"))?;
                parsed.values.push((arg.clone(), value.clone()));
            } else if flags.contains(&arg.as_str()) {
                parsed.flags.push(arg.clone());
            } else if arg.starts_with('-') && arg.len() > 1 {
                bail!("unknown option `{arg}`\n{USAGE}");
            } else {
                parsed.positionals.push(arg.clone());
            }
        }
        Ok(parsed)
    }

    fn value(&self, name: &str) -> Option<String> {
        self.values
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    }

    fn flag(&self, name: &str) -> bool {
        self.flags.iter().any(|f| f == name)
    }

    /// The one positional argument.
    fn positional(&mut self, what: &str) -> Result<String> {
        match self.positionals.len() {
            0 => bail!("missing {what}\n{USAGE}"),
            1 => Ok(self.positionals.remove(0)),
            _ => bail!("unexpected argument `{}`\n{USAGE}", self.positionals[1]),
        }
    }
}

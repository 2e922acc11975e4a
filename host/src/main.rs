use std::process::ExitCode;

fn main() -> ExitCode {
    trellis::telemetry::init();
    trellis::cli::main()
}

use std::process::ExitCode;

fn main() -> ExitCode {
    trellis::telemetry::init(trellis::telemetry::LogFormat::Text);
    trellis::cli::main()
}

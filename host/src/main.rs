use std::process::ExitCode;

fn main() -> ExitCode {
    // `cli::main` sets up logging once it knows the format (`serve --log-format`).
    trellis::cli::main()
}

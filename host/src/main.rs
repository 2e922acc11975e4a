use std::process::ExitCode;

/// glibc's malloc and free were about a tenth of the server's CPU (many small,
/// short-lived records and JSON values per step); mimalloc is cheaper at that.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // `cli::main` sets up logging once it knows the format (`serve --log-format`).
    trellis::cli::main()
}

use std::process::ExitCode;

/// The coordinator allocates and frees small buffers for every message; with glibc's
/// allocator that was about a fifth of its CPU time under load.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    flowgrid_cli::main()
}

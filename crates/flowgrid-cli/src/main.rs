use std::process::ExitCode;

/// The coordinator allocates and frees small buffers for every message; with glibc's
/// allocator that was about a fifth of its CPU time under load.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options (its prefixed `malloc_conf`): freed pages go back to the system from
/// a background thread after 1 s instead of 10 s, so the resident memory follows the live
/// state. `_RJEM_MALLOC_CONF` in the environment still overrides them.
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: &[u8] = b"background_thread:true,dirty_decay_ms:1000\0";

fn main() -> ExitCode {
    flowgrid_cli::main()
}

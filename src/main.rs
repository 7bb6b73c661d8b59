//! The `herald` binary; everything lives in the library.

/// mimalloc instead of the system allocator: the delivery path allocates per alert on every
/// worker thread, where glibc's malloc spent a quarter of Herald's CPU time in the benchmark.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    herald::cli::main()
}
